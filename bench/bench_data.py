"""Data-path benchmark: synthetic-world generation and loader throughput, with peak memory.

For each preset it generates the world (``--days`` days), then streams one day of the ctr log
through the training loader on one core, next to a baseline in the same run: pyarrow decoding the
same columns of the same files to numpy and nothing else (the floor any Parquet loader pays). Every
measurement runs in its own process, so peak RSS is that step's alone.

Usage::

    python bench/bench_data.py                          # small (7 days) and large (2 days): ~4 min
    python bench/bench_data.py --presets tiny --days 2  # seconds; a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4096


def _child(args: list[str]) -> dict:
    """Runs this script as ``--child ...`` in a fresh process; returns its JSON and peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, env=env, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"bench step {args} failed with status {status}")
    return {**json.loads(out), "peak_mb": usage.ru_maxrss / 1024}


def _run_child(kind: str, preset: str, days: str, out: str) -> None:
    import torch

    from common.log import setup_logging

    setup_logging()
    torch.set_num_threads(1)
    if kind == "generate":
        import dataclasses

        from data.synthetic import PRESETS, generate

        cfg = dataclasses.replace(PRESETS[preset], days=int(days))
        t0 = time.perf_counter()
        summary = generate(out, cfg, seed=0, overwrite=True)
        secs = time.perf_counter() - t0
        rows = sum(summary["rows"].values())
        print(json.dumps({"rows": rows, "seconds": secs}))
        return

    from data.loader import EventLog, make_loader

    first_day = [sorted(p.name[4:] for p in (Path(out) / "ctr").iterdir())[0]]
    if kind == "load":
        loader = make_loader(out, "ctr", batch_size=BATCH, days=first_day)
        t0 = time.perf_counter()
        rows = sum(b.batch_size for b in loader)
    else:  # decode: the same columns of the same files to numpy, nothing else
        import pyarrow.parquet as pq

        events = EventLog(out, "ctr", days=first_day)
        t0 = time.perf_counter()
        rows = 0
        for f in events.files:
            for rb in pq.ParquetFile(f.path).iter_batches(batch_size=BATCH, columns=events.reader.columns):
                for col in rb.columns:
                    col.to_numpy(zero_copy_only=False)
                rows += rb.num_rows
    print(json.dumps({"rows": rows, "seconds": time.perf_counter() - t0}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["small", "large"])
    p.add_argument("--days", type=int, nargs="+", help="days to generate per preset (default: small 7, large 2)")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _run_child(*args.child)
        return
    defaults = {"tiny": 4, "small": 7, "medium": 3, "large": 2}
    days = args.days or [defaults[x] for x in args.presets]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}; one thread per step")
    header = f"{'preset':<7}{'days':>5}{'gen rows':>11}{'gen rows/s':>12}{'gen peak MB':>13}{'load rows':>11}{'loader rows/s':>15}{'decode rows/s':>15}{'loader/decode':>15}{'load peak MB':>14}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="derm-bench-") as tmp:
        for preset, d in zip(args.presets, days):
            out = str(Path(tmp) / preset)
            gen = _child(["generate", preset, str(d), out])
            load = _child(["load", preset, str(d), out])
            decode = _child(["decode", preset, str(d), out])
            lr, dr = load["rows"] / load["seconds"], decode["rows"] / decode["seconds"]
            print(
                f"{preset:<7}{d:>5}{gen['rows']:>11,}{gen['rows'] / gen['seconds']:>12,.0f}{gen['peak_mb']:>13,.0f}"
                f"{load['rows']:>11,}{lr:>15,.0f}{dr:>15,.0f}{lr / dr:>15.2f}{load['peak_mb']:>14,.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
