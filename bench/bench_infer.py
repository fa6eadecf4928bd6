"""Inference benchmark: entities embedded per second, deduplicating before the towers (the
default) against embedding every row and keeping each entity's last output, in the same run.

It generates the ``small`` synthetic world (one day of each log plus a held-out one), trains a
ctr snapshot for a few steps (the weights do not matter for speed), and times ``infer_day`` both
ways on the same day, one process.

Usage::

    python bench/bench_infer.py                     # small preset: ~2-4 min on 2 cores
    python bench/bench_infer.py --preset tiny       # seconds; a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.log import setup_logging  # noqa: E402
from data.loader import EventLog  # noqa: E402
from data.synthetic import PRESETS, generate  # noqa: E402
from embeddings.infer import Embedder, infer_day  # noqa: E402
from sharding.distributed import init_distributed, shutdown  # noqa: E402
from trainer.config import DataConfig, RunConfig, TrainConfig  # noqa: E402
from trainer.loop import run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=4096)
    args = p.parse_args()
    setup_logging()
    ctx = init_distributed("cpu")
    try:
        with tempfile.TemporaryDirectory(prefix="derm-bench-infer-") as tmp:
            root, run_dir = Path(tmp) / "data", Path(tmp) / "run"
            generate(root, dataclasses.replace(PRESETS[args.preset], days=2), seed=0)
            day = "2026-01-01"
            config = RunConfig(
                data=DataConfig(root=str(root), batch_size=1024, synthetic_preset=""),
                train=TrainConfig(run_dir=str(run_dir), days=(day,), eval_day="none", max_steps_per_day=5),
            )
            run(config, ctx)
            embedder = Embedder.load(run_dir / "snapshots" / f"day={day}", root, ctx.device)
            rows = EventLog(root, "ctr", days=[day]).num_rows
            print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch threads {torch.get_num_threads()}; "
                  f"preset {args.preset}, one day of ctr = {rows:,} rows; batch {args.batch_size}")
            header = f"{'mode':<22}{'users':>9}{'Pins':>9}{'forward rows':>14}{'seconds':>9}{'entities/s':>12}{'speed-up':>10}"
            print(header + "\n" + "-" * len(header))
            base = None
            for name, dedup in (("embed every row", False), ("dedup first", True)):
                t0 = time.perf_counter()
                counts = infer_day(embedder, day, Path(tmp) / name.replace(" ", "-"), args.batch_size, dedup_first=dedup)
                secs = time.perf_counter() - t0
                entities = counts["user"] + counts["pin"]
                forwards = 2 * rows if not dedup else entities
                base = base or secs
                print(f"{name:<22}{counts['user']:>9,}{counts['pin']:>9,}{forwards:>14,}{secs:>9.1f}"
                      f"{entities / secs:>12,.0f}{base / secs:>9.1f}x", flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
