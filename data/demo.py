"""The README's ``make demo``: the data path end to end on the embedded default.

Generates the tiny synthetic ads world (once; reused afterwards), streams both of its logs through
the training loader, and prints what a trainer would see: rows, batches, label rates, the oracle
ROC-AUC (the ceiling any model can reach on that log) and loader throughput. Training on it joins
this demo when the sharded trainer lands (``trainer/main.py``).

Usage::

    python -m data.demo                      # runs/demo/data, tiny preset
    python -m data.demo --out /tmp/w --preset small --batch-size 2048
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc

from common.log import setup_logging
from data.loader import make_loader
from data.synthetic import PRESETS, generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo/data", help="where the world is (or will be) written")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="world size when generating")
    p.add_argument("--batch-size", type=int, default=512)
    args = p.parse_args(argv)
    setup_logging()

    out = Path(args.out)
    if (out / "spec.toml").exists():
        print(f"using the world already in {out}")
    else:
        print(f"generating the {args.preset} synthetic world into {out}")
        generate(out, PRESETS[args.preset], seed=0)

    print(f"\n{'source':<7}{'days':>5}{'rows':>10}{'batches':>9}  {'label: rate / oracle AUC':<60}{'rows/s':>9}")
    for source in ("ctr", "cvr"):
        loader = make_loader(out, source, batch_size=args.batch_size)
        t0 = time.perf_counter()
        labels, oracle = [], []
        for batch in loader:
            labels.append(batch.labels)
            oracle.append(batch.oracle)
        secs = time.perf_counter() - t0
        y, p = torch.cat(labels), torch.cat(oracle)
        names = loader.dataset.events.reader.source.labels
        cells = "  ".join(
            f"{n} {y[:, i].mean():.3f}/{binary_auroc(p[:, i], y[:, i].long()):.3f}" for i, n in enumerate(names)
        )
        events = loader.dataset.events
        print(f"{source:<7}{len(events.days):>5}{events.num_rows:>10}{len(loader):>9}  {cells:<60}{events.num_rows / secs:>9.0f}")
    print("\nnext: training on these logs arrives with the sharded trainer (trainer/main.py).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
