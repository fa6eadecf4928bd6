"""What a synthetic world's log can teach about its planted user x Pin signal, as references for
the ``corr planted`` column of ``experiments/quality.py`` (issue 11): how much of the planted
score a plain logistic matrix factorisation learns from the same training days, and the ceiling
no user/Pin embedding can pass.

- **MF reference**: ``logit = b + b_u + b_p + <e_u, e_p>`` (ids only, width ``--dim``), fitted
  with Adam on the source's first label over the training days (batches of 1,024, ``--passes``
  passes over them, ``--seeds`` seeds); after each pass, the correlation of ``<e_u, e_p>`` with
  the planted score over random (user, Pin) pairs of the evaluation day: the same pairs and the
  same measure as ``quality.planted_correlation``, so the columns compare.
- **ceiling**: the world's true log-odds of the label for those users and Pins (context at fixed
  values), with each user's and Pin's main effect removed (double centring over the users x Pins
  grid), correlated with the planted score: what the label's user x Pin interaction carries of it.
  For cvr the log-odds of a conversion also hold the click affinity (conversions need clicks or
  views), so the ceiling is below 1.

Usage::

    python experiments/intent_reference.py --data runs/data/small --source cvr \\
        --days 2026-01-01,2026-01-02,2026-01-03,2026-01-04,2026-01-05,2026-01-06 --eval-day 2026-01-07
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import pyarrow.parquet as pq

from experiments.quality import format_mean_std, planted, protocol_parser, random_pairs

BATCH = 1024


def eval_entities(data: Path, source: str, day: str) -> tuple[np.ndarray, np.ndarray]:
    log = pq.read_table(data / source / f"day={day}", columns=["user_id", "pin_id"])
    return np.unique(log.column("user_id").to_numpy()), np.unique(log.column("pin_id").to_numpy())


def training_rows(data: Path, source: str, label: str, days: list[str]):
    """The training days' (user, Pin, label) as tensors, read once for every seed."""
    import torch

    logs = [pq.read_table(data / source / f"day={d}", columns=["user_id", "pin_id", label]) for d in days]
    return tuple(torch.from_numpy(np.concatenate([t.column(c).to_numpy() for t in logs]).astype(dtype))
                 for c, dtype in (("user_id", np.int64), ("pin_id", np.int64), (label, np.float32)))


def eval_pairs(data: Path, source: str, eval_day: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random (user, Pin) pairs of the evaluation day, as ids, and their planted scores."""
    users, pins = eval_entities(data, source, eval_day)
    a, b = random_pairs(len(users), len(pins))
    truth = (planted(data, source, eval_day, "user", users)[a] * planted(data, source, eval_day, "pin", pins)[b]).sum(1)
    return users[a].astype(np.int64), pins[b].astype(np.int64), truth


def mf_reference(rows, pairs, dim: int, passes: int, seed: int) -> dict:
    """Fits the MF on ``rows`` (users, Pins, labels) and returns the planted correlation over
    ``pairs`` (users, Pins, planted scores) after each pass, and the data's size."""
    import torch

    u, p, y = rows
    pair_users, pair_pins, truth = pairs
    n_users, n_pins = int(max(u.max(), pair_users.max())) + 1, int(max(p.max(), pair_pins.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    eu, ep = (torch.nn.Parameter(0.1 * torch.randn(n, dim, generator=gen)) for n in (n_users, n_pins))
    bu, bp = torch.nn.Parameter(torch.zeros(n_users)), torch.nn.Parameter(torch.zeros(n_pins))
    rate = float(y.mean())
    b0 = torch.nn.Parameter(torch.tensor(math.log(rate / (1 - rate))))
    opt = torch.optim.Adam([eu, ep, bu, bp, b0], lr=0.01)
    ua, pb = torch.from_numpy(pair_users), torch.from_numpy(pair_pins)
    corr = []
    for _ in range(passes):
        for j in torch.randperm(len(y), generator=gen).split(BATCH):
            logit = b0 + bu[u[j]] + bp[p[j]] + (eu[u[j]] * ep[p[j]]).sum(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            score = (eu[ua] * ep[pb]).sum(1).numpy()
        corr.append(round(float(np.corrcoef(score, truth)[0, 1]), 4))
    positives, n_train_users = int(y.sum()), int(u.unique().numel())
    return {"seed": seed, "corr_by_pass": corr, "rows": len(y), "positives": positives, "users": n_train_users,
            "positives_per_user": round(positives / n_train_users, 2)}


def ceiling(data: Path, source: str, label: str, eval_day: str, grid: int = 400) -> float:
    """Correlation of the label's true user x Pin log-odds interaction with the planted score."""
    from data.synthetic.config import WorldConfig
    from data.synthetic.world import World
    from experiments.probe import world_day

    meta = json.loads((data / "truth" / "world.json").read_text())
    world = World.create(WorldConfig(**meta["config"]), meta["seed"])
    _, d = world_day(data, eval_day)
    users, pins = eval_entities(data, source, eval_day)
    rng = np.random.default_rng(0)
    users = rng.choice(users, min(grid, len(users)), replace=False)
    pins = rng.choice(pins, min(grid, len(pins)), replace=False)
    uu, pp = (g.ravel() for g in np.meshgrid(users, pins, indexing="ij"))
    n = uu.size
    prob = world.probabilities(uu, pp, d, np.zeros(n, np.int64), np.full(n, 12.0), np.zeros(n))[label]
    logit = np.log(prob / (1 - prob)).reshape(len(users), len(pins))
    inter = logit - logit.mean(1, keepdims=True) - logit.mean(0, keepdims=True) + logit.mean()
    truth = planted(data, source, eval_day, "user", users) @ planted(data, source, eval_day, "pin", pins).T
    return round(float(np.corrcoef(inter.ravel(), truth.ravel())[0, 1]), 4)


def main(argv: list[str] | None = None) -> int:
    p = protocol_parser("experiments/intent_reference.py", __doc__, "cvr")  # --data: a synthetic world
    p.add_argument("--dim", type=int, default=8, help="MF width (default 8)")
    p.add_argument("--passes", type=int, default=4, help="passes over the training days (default 4)")
    p.add_argument("--out", help="append the result as a JSON line to this file")
    args = p.parse_args(argv)
    data = Path(args.data)
    if not (data / "truth" / "world.json").is_file():
        p.error(f"{data}: not a synthetic world (no truth/world.json)")
    from data.spec import load_spec

    label = load_spec(data / "spec.toml").source(args.source).labels[0]
    rows = training_rows(data, args.source, label, args.days.split(","))
    pairs = eval_pairs(data, args.source, args.eval_day)
    runs = [mf_reference(rows, pairs, args.dim, args.passes, int(s)) for s in args.seeds.split(",")]
    result = {"data": str(data), "source": args.source, "label": label, "dim": args.dim, "runs": runs,
              "ceiling": ceiling(data, args.source, label, args.eval_day)}
    by_pass = [[r["corr_by_pass"][i] for r in runs] for i in range(args.passes)]
    print(f"{data} ({args.source}, label {label}): {runs[0]['rows']:,} training rows, {runs[0]['positives']:,} positives, "
          f"{runs[0]['users']:,} users, {runs[0]['positives_per_user']} positives per user")
    print("| MF pass | " + " | ".join(str(i + 1) for i in range(args.passes)) + " | ceiling |")
    print("|---|" + "---|" * (args.passes + 1))
    print(f"| corr planted ({len(runs)} seeds) | " + " | ".join(format_mean_std(values) for values in by_pass)
          + f" | {result['ceiling']:.3f} |")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
