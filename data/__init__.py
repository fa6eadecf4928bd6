"""Data: the feature spec (input contract), the streaming Parquet loader, the synthetic ads world
and public-data adapters. See ../shared/DESIGN.md §Input contract and docs/data.md."""
