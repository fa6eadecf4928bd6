"""Appendix D.1's cost side: training throughput of the downstream CTR model (MMoE of DCNv2
experts) by the projection width of its four DERM embeddings.

DCNv2's cost grows with its input width F times the number of cross layers (paper Appendix D.1);
four 64-wide DERM embeddings add 4 × 65 = 260 columns unprojected, 4 × P projected. This benchmark
builds the same downstream CTR model (``modules/downstream.py``, sharded through
``sharding.dmp.shard_model`` on one gloo rank) once per width and steps them **in turns** — K steps
of each width, then again, for ``--rounds`` rounds — so that every width sees the same machine
conditions; each width's figure is the median of its step times after warm-up, and the ratio is
against the unprojected model of the same run.

Batches are real rows of the ``small`` world's ctr source (the restricted downstream feature set of
configs/pipeline-demo.toml), loaded into memory first; the DERM embeddings are random unit vectors
with 3 % of rows missing (the lookup itself is not what is measured: it is the same for every
width).

Usage::

    python bench/bench_projection.py                        # generates `small` when absent; ~2 min
    python bench/bench_projection.py --rounds 2 --steps 3   # a smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import tomllib
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from common.log import setup_logging  # noqa: E402
from data.loader import make_loader  # noqa: E402
from data.spec import load_spec  # noqa: E402
from modules.downstream import build_downstream  # noqa: E402
from modules.downstream_config import DERMFeature, DownstreamConfig, missing_key  # noqa: E402
from sharding.distributed import init_distributed, shutdown  # noqa: E402
from sharding.dmp import shard_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DERM = ("ctr_user", "ctr_pin", "cvr_user", "cvr_pin")
WIDTHS = (0, 8, 16, 32, 64)


def _batches(root: Path, n: int, batch_size: int, dim: int) -> list:
    torch.manual_seed(0)
    out = []
    for batch in make_loader(root, "ctr", batch_size, days=["2026-01-06"]):
        for name in DERM:
            batch.derm[name] = torch.nn.functional.normalize(torch.randn(batch.batch_size, dim), dim=1)
            batch.derm[missing_key(name)] = (torch.rand(batch.batch_size, 1) < 0.03).float()
        out.append(batch)
        if len(out) == n:
            return out
    raise SystemExit(f"{root}: fewer than {n} batches of {batch_size} on 2026-01-06")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/bench_projection.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/data/small", help="the small synthetic world (generated when absent)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=6, help="turns over the widths")
    p.add_argument("--steps", type=int, default=5, help="steps of one width per turn")
    p.add_argument("--warmup", type=int, default=1, help="turns dropped at the start")
    p.add_argument("--dim", type=int, default=64, help="width E of each DERM embedding")
    args = p.parse_args(argv)
    setup_logging()

    root = Path(args.data)
    if not (root / "spec.toml").exists():
        from data.synthetic import PRESETS, generate

        generate(root, PRESETS["small"], seed=0)
    features = tuple(tomllib.loads((REPO / "configs" / "pipeline-demo.toml").read_text())["downstream_features"])
    ctx = init_distributed("cpu")
    try:
        spec = load_spec(root / "spec.toml")
        batches = _batches(root, args.steps, args.batch_size, args.dim)
        models = {}
        for width in WIDTHS:
            torch.manual_seed(0)
            config = DownstreamConfig(features=features, derm=tuple(DERMFeature(n, args.dim, width) for n in DERM))
            task = build_downstream(spec, "ctr", config, kind="ctr", device=ctx.device, embedding_device=torch.device("meta"))
            models[width] = (*shard_model(task, ctx.device), task.model.input_dim, task.model.derm.output_dim())
        times: dict[int, list[float]] = {w: [] for w in WIDTHS}
        for turn in range(args.rounds):
            for width, (model, optimizer, _, _) in models.items():
                for batch in batches:
                    t0 = time.perf_counter()
                    loss, _ = model(batch)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    if turn >= args.warmup:
                        times[width].append(time.perf_counter() - t0)
        print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; python {platform.python_version()}; "
              f"torch {torch.__version__}; ctr source of {root}; batch {args.batch_size}; "
              f"median of {args.rounds - args.warmup} x {args.steps} steps per width, widths in turns")
        print(f"{'projection':>10}  {'DERM width':>10}  {'F':>5}  {'step ms':>8}  {'examples/s':>11}  {'vs none':>8}")
        base = statistics.median(times[0])
        for width, (_, _, f, derm_width) in models.items():
            step = statistics.median(times[width])
            print(f"{'none' if width == 0 else width:>10}  {derm_width:>10}  {f:>5}  {1000 * step:>8.1f}  "
                  f"{args.batch_size / step:>11,.0f}  {base / step:>7.2f}x")
        return 0
    finally:
        shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
