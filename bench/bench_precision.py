"""Mixed-precision parity: the upstream model trained in float32 and in bfloat16 autocast on the same
days with the same seeds, compared on a held-out day (what ``train.mixed_precision = auto`` is
allowed to change: speed, not quality).

For each seed and precision, one ``trainer/main.py`` run (its own process, the trainer's thread
policy) trains the ``--source`` model of ``--data`` on ``--days`` from scratch and evaluates on
``--eval-day``; the runs of a seed go in turns (float32, then bfloat16). The table gives each run's
eval ROC-AUC per label, its last day's mean training loss and its examples/s, then per label the
mean ± std over seeds of the *paired* difference (bf16 minus the same seed's fp32) next to the
float32 runs' own seed-to-seed std. The speed column is the trainer's own (TrainPipelineSparseDist,
loader included), from runs that did not step in turns: ``bench/bench_train.py`` measures speed.

Usage::

    python bench/bench_precision.py                        # small world ctr, 3 days, 3 seeds: ~20 min
    python bench/bench_precision.py --days 2026-01-01 --eval-day 2026-01-02 --seeds 0 --max-steps 5   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("none", "bf16")


def _train(args: argparse.Namespace, seed: int, precision: str, run_dir: Path) -> dict:
    cmd = [
        sys.executable, "trainer/main.py", f"--data.root={args.data}", f"--data.source={args.source}",
        f"--data.batch_size={args.batch_size}", "--data.synthetic_preset=", f"--train.run_dir={run_dir}",
        f"--days={args.days}", f"--eval-day={args.eval_day}", f"--train.seed={seed}",
        f"--train.mixed_precision={precision}", "--train.log_every=50", f"--train.max_steps_per_day={args.max_steps}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    days = summary["days"]
    return {
        "auc": {label: m["roc_auc"] for label, m in summary["eval"].items()},
        "loss": days[-1]["mean_loss"],
        "examples_s": sum(d["examples"] for d in days) / sum(d["seconds"] for d in days),
    }


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):+.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/bench_precision.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/data/small", help="a dataset root (the small world is generated when absent)")
    p.add_argument("--source", default="ctr")
    p.add_argument("--days", default="2026-01-01,2026-01-02,2026-01-03", help="days to train, comma-separated")
    p.add_argument("--eval-day", default="2026-01-04")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--max-steps", type=int, default=0, help="cap on steps per day (0: full days)")
    args = p.parse_args(argv)
    if not (Path(args.data) / "spec.toml").exists():
        cmd = [sys.executable, "-m", "data.synthetic", "--preset", "small", "--out", args.data]
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="derm-bench-precision-") as tmp:
        for seed in seeds:
            for precision in PRECISIONS:
                runs[seed, precision] = _train(args, seed, precision, Path(tmp) / f"{precision}-{seed}")
    labels = list(runs[seeds[0], "none"]["auc"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}; "
          f"{args.source} source of {args.data}; days {args.days}, eval {args.eval_day}; batch {args.batch_size}")
    print(f"{'seed':>4}  {'precision':<9}" + "".join(f"{label + ' AUC':>16}" for label in labels) + f"{'last-day loss':>15}{'examples/s':>12}")
    for (seed, precision), r in runs.items():
        print(f"{seed:>4}  {precision:<9}" + "".join(f"{r['auc'][label]:>16.4f}" for label in labels)
              + f"{r['loss']:>15.4f}{r['examples_s']:>12,.0f}")
    print("bf16 - fp32, paired by seed (mean ± std over seeds), next to fp32's own seed-to-seed std:")
    for label in labels:
        diffs = [runs[s, "bf16"]["auc"][label] - runs[s, "none"]["auc"][label] for s in seeds]
        spread = statistics.stdev([runs[s, "none"]["auc"][label] for s in seeds]) if len(seeds) > 1 else 0.0
        print(f"  {label:<14} ROC-AUC {_mean_std(diffs)}   (fp32 seed std {spread:.4f})")
    loss_diffs = [runs[s, "bf16"]["loss"] - runs[s, "none"]["loss"] for s in seeds]
    speed = [runs[s, "bf16"]["examples_s"] / runs[s, "none"]["examples_s"] for s in seeds]
    print(f"  last-day loss {_mean_std(loss_diffs)}; trainer examples/s bf16/fp32 {statistics.mean(speed):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
