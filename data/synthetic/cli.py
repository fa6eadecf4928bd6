"""Generate a synthetic ads world (both logs, the spec and the planted truth).

Usage::

    python -m data.synthetic --preset tiny --out runs/data/tiny          # seconds
    python -m data.synthetic --preset small --out runs/data/small        # ~1.8M rows
    python -m data.synthetic --preset large --out /data/large --days 3   # 1M users, 2.6M rows/day
    python -m data.synthetic --preset tiny --out X --set n_users=1000 --set drift_per_day=0.1

The same preset, overrides and seed always write the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from common.log import setup_logging
from data.synthetic.config import PRESETS, WorldConfig
from data.synthetic.generator import generate


def build_config(preset: str, overrides: list[str]) -> WorldConfig:
    """The preset with ``key=value`` overrides applied (values parsed as the field's type)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    types = {f.name: f.type for f in dataclasses.fields(WorldConfig)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(types)}")
        kind = {"int": int, "float": float, "str": str}[str(types[key])]
        try:
            changes[key] = kind(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: {key} must be a{'n' if kind is int else ''} {kind.__name__}") from None
    return dataclasses.replace(cfg, **changes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (must be empty or absent unless --overwrite)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="world size (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--days", type=int, help="number of days to write (default: the preset's)")
    p.add_argument("--start-date", help="first day, YYYY-MM-DD (default: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any WorldConfig field")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    setup_logging()
    try:
        extra = [f"days={args.days}"] if args.days is not None else []
        extra += [f"start_date={args.start_date}"] if args.start_date else []
        cfg = build_config(args.preset, args.set + extra)
        summary = generate(args.out, cfg, seed=args.seed, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "rows": summary["rows"], "seconds": summary["seconds"]}))
    return 0
