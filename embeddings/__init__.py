"""The entity-embedding lifecycle (paper §3.1, Appendix B.3 and C): daily and back-inference from
upstream snapshots, deduplication, aggregation into pools (ACC, MA, AP) with carry-over and TTL,
quality reports, and publishing immutable versions to a key-value feature store and an ANN index."""
