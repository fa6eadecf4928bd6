"""The ``derm-movielens`` command (``python -m data.movielens``): MovieLens-100K into a DERM dataset."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from common.log import setup_logging
from data import movielens
from data.movielens.atomic import MovieLensError
from data.movielens.features import convert


def main(argv: Sequence[str] | None = None) -> int:
    """The ``derm-movielens`` command: 0 on success, 2 (and a one-line message) on bad input."""
    doc = movielens.__doc__
    p = argparse.ArgumentParser(prog="derm-movielens", description=doc.split("\n\n")[0],
                                epilog=doc[doc.index("Usage"):doc.index("Glossary")].rstrip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="dataset root to write: spec.toml, ctr/, cvr/")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source-dir", help="folder with one *.inter, *.user and *.item RecBole atomic file")
    src.add_argument("--wheel", help="the recbole-1.2.1 wheel (default: downloaded once into .cache/recbole)")
    p.add_argument("--negatives", type=int, default=4, help="negative impressions sampled per rating (default: 4)")
    p.add_argument("--max-seq-len", type=int, default=50,
                   help="longest user sequence kept, newest first (default: 50; ML-100K users average 106 ratings)")
    p.add_argument("--seed", type=int, default=0, help="seed of the negative sampling (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    setup_logging()
    try:
        convert(args.out, args.source_dir, args.wheel, args.negatives, args.max_seq_len, args.seed, args.overwrite)
    except (MovieLensError, FileExistsError, FileNotFoundError) as e:
        print(f"derm-movielens: error: {e}", file=sys.stderr)
        return 2
    return 0
