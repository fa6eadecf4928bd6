"""MovieLens-100K as a DERM dataset: the first real data our tests and experiments run on.

Converts the MovieLens-100K ratings into the project's input contract (../shared/DESIGN.md,
§Input contract; layout in ``data/dataset_writer.py``)::

    OUT/spec.toml                                  feature spec: sources ctr (click), cvr (conversion)
    OUT/ctr/day=YYYY-MM-DD/part-00000.parquet      impressions of the day, in event_time order
    OUT/cvr/day=YYYY-MM-DD/part-00000.parquet      the same impressions, labelled for conversion

Every rating is an impression of a movie (a "pin") shown to a user, plus ``negatives`` impressions
at the same second of movies the user never rated, drawn by popularity. click = rating >= 4,
conversion = rating == 5; negatives are 0 for both. Each row carries the user's earlier ratings as a
newest-first sequence: only ratings strictly before the impression's second, because ML-100K users
rate many movies within the same second, and those would leak the label. Details: docs/movielens.md.

The data comes from the RecBole 1.2.1 wheel on PyPI (its ``dataset_example/ml-100k`` atomic files),
downloaded once into ``.cache/recbole``, or from a folder holding ``*.inter``, ``*.user`` and
``*.item`` atomic files (tab-separated, ``name:type`` header).

The package: ``source`` (a folder or the wheel), ``atomic`` (parsing and checking the atomic files),
``features`` (impressions, sequences, the spec, ``convert``), ``cli`` (``python -m data.movielens``).

Usage (CPU, about 5 s; the first run downloads the 2 MB wheel)::

    python -m data.movielens --out runs/data/ml-100k
    python -m data.movielens --out runs/data/ml-100k --negatives 4 --max-seq-len 50 --overwrite
    python -m data.movielens --out /tmp/ml --source-dir ~/data/ml-100k   # own atomic files

Glossary for shapes: N ratings, U users, I items, K negatives per rating, R = N * (1 + K) rows
(impressions), L the max sequence length.
"""

from data.movielens.atomic import MovieLens, MovieLensError
from data.movielens.features import build_impressions, build_spec, convert
from data.movielens.source import DEFAULT_CACHE, fetch_recbole_wheel, read_movielens

__all__ = ["DEFAULT_CACHE", "MovieLens", "MovieLensError", "build_impressions", "build_spec", "convert", "fetch_recbole_wheel",
           "read_movielens"]
