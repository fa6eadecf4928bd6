"""What a synthetic world's log can teach about its planted user x Pin signal, as references for
the ``corr planted`` column of ``experiments/quality.py`` (issue 11): how much of the planted
score a plain two-sided model learns from the same training days, and the ceiling no user/Pin
embedding can pass.

- **reference model**: ``logit = b + b_u + b_p + <e_u, e_p>`` fitted on the source's first label
  over the training days (batches of 1,024, ``--passes`` passes over them, ``--seeds`` seeds);
  after each pass, the correlation of ``<e_u, e_p>`` with the planted score over random
  (user, Pin) pairs of the evaluation day: the same pairs and the same measure as
  ``quality.planted_correlation``, so the columns compare. What ``e`` is:

  - ``--model mf`` (default): a free vector per id (width ``--dim``): logistic matrix
    factorisation, what the log teaches a model that has nothing but the ids;
  - ``--model dense``: a linear map of a dense vector feature of each side (``--dense USER,PIN``,
    by default the synthetic world's ``user_pretrained,pin_pretrained``), the biases linear in
    it too: what the log teaches through those features alone, with no depth in between.

  The knobs that tell the upstream model's training apart from this one's, one at a time:
  ``--loss softmax`` (DERM's in-batch sampled softmax over the batch's Pins, on the positive
  rows, logQ-corrected with the Pins' frequency in the training rows, accidental hits masked,
  instead of BCE over every impression), ``--normalize`` (unit-norm ``e`` over a temperature of
  0.2, as DERM's published embeddings), ``--optimizer rowwise_adagrad`` for the vectors (the
  fused optimizer of DERM's tables, instead of Adam) and ``--lr``.
- **ceiling**: the world's true log-odds of the label for those users and Pins (context at fixed
  values), with each user's and Pin's main effect removed (double centring over the users x Pins
  grid), correlated with the planted score: what the label's user x Pin interaction carries of it.
  For cvr the log-odds of a conversion also hold the click affinity (conversions need clicks or
  views), so the ceiling is below 1.

Usage::

    python experiments/intent_reference.py --data runs/data/small --source cvr \\
        --days 2026-01-01,2026-01-02,2026-01-03,2026-01-04,2026-01-05,2026-01-06 --eval-day 2026-01-07
    python experiments/intent_reference.py --data runs/data/small --source ctr --model dense --loss softmax \\
        --days 2026-01-01,2026-01-02,2026-01-03 --eval-day 2026-01-04
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import pyarrow.parquet as pq

from experiments.quality import format_mean_std, planted, protocol_parser, random_pairs

BATCH = 1024
TEMPERATURE = 0.2  # --normalize: DERM's initial temperature


@dataclass(frozen=True)
class Reference:
    """One reference model and how it is trained (see the module docstring)."""

    model: str = "mf"
    dim: int = 8
    loss: str = "bce"
    normalize: bool = False
    optimizer: str = "adam"
    lr: float = 0.01
    passes: int = 4
    dense: tuple[str, str] = ("user_pretrained", "pin_pretrained")


def eval_entities(data: Path, source: str, day: str) -> tuple[np.ndarray, np.ndarray]:
    log = pq.read_table(data / source / f"day={day}", columns=["user_id", "pin_id"])
    return np.unique(log.column("user_id").to_numpy()), np.unique(log.column("pin_id").to_numpy())


def _vectors(table, column: str):
    import torch

    return torch.from_numpy(np.stack(table.column(column).to_numpy(zero_copy_only=False)).astype(np.float32))


def training_rows(data: Path, source: str, label: str, days: list[str], dense: tuple[str, str] | None = None) -> dict:
    """The training days' users, Pins and labels as tensors (and the two dense features when
    given), read once for every seed."""
    import torch

    columns = ["user_id", "pin_id", label, *(dense or ())]
    logs = [pq.read_table(data / source / f"day={d}", columns=columns) for d in days]
    rows = {name: torch.from_numpy(np.concatenate([t.column(c).to_numpy() for t in logs]).astype(dtype))
            for name, c, dtype in (("user", "user_id", np.int64), ("pin", "pin_id", np.int64), ("label", label, np.float32))}
    if dense:
        rows["user_x"] = torch.cat([_vectors(t, dense[0]) for t in logs])
        rows["pin_x"] = torch.cat([_vectors(t, dense[1]) for t in logs])
    return rows


def eval_pairs(data: Path, source: str, eval_day: str, dense: tuple[str, str] | None = None) -> dict:
    """Random (user, Pin) pairs of the evaluation day, as ids (and their dense features, each
    entity's first row's), and their planted scores."""
    import torch

    log = pq.read_table(data / source / f"day={eval_day}", columns=["user_id", "pin_id", *(dense or ())])
    firsts = {e: np.unique(log.column(f"{e}_id").to_numpy(), return_index=True) for e in ("user", "pin")}
    (users, first_user), (pins, first_pin) = firsts["user"], firsts["pin"]
    a, b = random_pairs(len(users), len(pins))
    truth = (planted(data, source, eval_day, "user", users)[a] * planted(data, source, eval_day, "pin", pins)[b]).sum(1)
    pairs = {"user": torch.from_numpy(users[a].astype(np.int64)), "pin": torch.from_numpy(pins[b].astype(np.int64)),
             "truth": truth}
    if dense:
        pairs["user_x"] = _vectors(log.take(first_user), dense[0])[torch.from_numpy(a)]
        pairs["pin_x"] = _vectors(log.take(first_pin), dense[1])[torch.from_numpy(b)]
    return pairs


def fit_reference(rows: dict, pairs: dict, ref: Reference, seed: int) -> dict:
    """Fits ``ref`` on ``rows`` and returns the planted correlation over ``pairs`` after each pass,
    and the data's size."""
    import torch
    import torch.nn.functional as F

    u, p, y = rows["user"], rows["pin"], rows["label"]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rate = float(y.mean())
    b0 = torch.nn.Parameter(torch.tensor(math.log(rate / (1 - rate))))
    if ref.model == "mf":
        n_users, n_pins = int(max(u.max(), pairs["user"].max())) + 1, int(max(p.max(), pairs["pin"].max())) + 1
        eu, ep = (torch.nn.Parameter(0.1 * torch.randn(n, ref.dim, generator=gen)) for n in (n_users, n_pins))
        bu, bp = torch.nn.Parameter(torch.zeros(n_users)), torch.nn.Parameter(torch.zeros(n_pins))
        vectors, others = [eu, ep], [bu, bp, b0]

        def sides(rows_or_pairs, j):
            ui, pi = rows_or_pairs["user"][j], rows_or_pairs["pin"][j]
            return eu[ui], ep[pi], bu[ui], bp[pi]
    else:
        width = rows["user_x"].shape[1], rows["pin_x"].shape[1]
        maps = [torch.nn.Linear(w, ref.dim) for w in width]
        biases = [torch.nn.Linear(w, 1) for w in width]
        vectors, others = [q for m in maps for q in m.parameters()], [*(q for m in biases for q in m.parameters()), b0]

        def sides(rows_or_pairs, j):
            xu, xp = rows_or_pairs["user_x"][j], rows_or_pairs["pin_x"][j]
            return maps[0](xu), maps[1](xp), biases[0](xu)[:, 0], biases[1](xp)[:, 0]
    if ref.optimizer == "rowwise_adagrad":  # TorchRec's unfused twin of FBGEMM's row-wise Adagrad
        from torchrec.optim import RowWiseAdagrad

        optimizers = [RowWiseAdagrad(vectors, lr=ref.lr), torch.optim.Adam(others, lr=0.01)]
    else:
        optimizers = [torch.optim.Adam(vectors + others, lr=ref.lr)]
    log_q = torch.log(torch.bincount(p).float().clamp(min=1) / len(p) * BATCH)
    corr = []
    for _ in range(ref.passes):
        for j in torch.randperm(len(y), generator=gen).split(BATCH):
            a, b, bias_u, bias_p = sides(rows, j)
            if ref.normalize:  # <a, b> = cos / tau
                a, b = F.normalize(a, dim=1) / TEMPERATURE ** 0.5, F.normalize(b, dim=1) / TEMPERATURE ** 0.5
            if ref.loss == "bce":
                loss = F.binary_cross_entropy_with_logits(b0 + bias_u + bias_p + (a * b).sum(1), y[j])
            else:
                positive = torch.nonzero(y[j] > 0.5).squeeze(1)
                if positive.numel() == 0:
                    continue
                pins = p[j]
                logits = a[positive] @ b.T - log_q[pins][None, :]
                hits = pins[positive][:, None] == pins[None, :]
                hits[torch.arange(positive.numel()), positive] = False
                loss = F.cross_entropy(logits.masked_fill(hits, float("-inf")), positive)
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()
        with torch.no_grad():
            a, b, _, _ = sides(pairs, slice(None))
            if ref.normalize:
                a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            score = (a * b).sum(1).numpy()
        corr.append(round(float(np.corrcoef(score, pairs["truth"])[0, 1]), 4))
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
    p.add_argument("--model", choices=("mf", "dense"), default="mf", help="a vector per id, or a linear map of --dense (default mf)")
    p.add_argument("--dense", default="user_pretrained,pin_pretrained",
                   help="--model dense: the user's and the Pin's dense vector feature (default user_pretrained,pin_pretrained)")
    p.add_argument("--dim", type=int, default=8, help="width of the vectors (default 8)")
    p.add_argument("--loss", choices=("bce", "softmax"), default="bce", help="BCE over every row, or DERM's in-batch softmax (default bce)")
    p.add_argument("--normalize", action="store_true", help="unit-norm vectors over a temperature of 0.2, as DERM's")
    p.add_argument("--optimizer", choices=("adam", "rowwise_adagrad"), default="adam",
                   help="optimizer of the vectors (--model mf for rowwise_adagrad; default adam)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of the vectors (default 0.01)")
    p.add_argument("--passes", type=int, default=4, help="passes over the training days (default 4)")
    p.add_argument("--out", help="append the result as a JSON line to this file")
    args = p.parse_args(argv)
    data = Path(args.data)
    if not (data / "truth" / "world.json").is_file():
        p.error(f"{data}: not a synthetic world (no truth/world.json)")
    dense = tuple(args.dense.split(","))
    if args.model == "dense" and len(dense) != 2:
        p.error(f"--dense: write the user's and the Pin's feature, comma-separated; got {args.dense!r}")
    if args.optimizer == "rowwise_adagrad" and args.model != "mf":
        p.error("--optimizer rowwise_adagrad updates id tables: use it with --model mf")
    ref = Reference(args.model, args.dim, args.loss, args.normalize, args.optimizer, args.lr, args.passes, dense)
    from data.spec import load_spec

    label = load_spec(data / "spec.toml").source(args.source).labels[0]
    features = dense if args.model == "dense" else None
    rows = training_rows(data, args.source, label, args.days.split(","), features)
    pairs = eval_pairs(data, args.source, args.eval_day, features)
    runs = [fit_reference(rows, pairs, ref, int(s)) for s in args.seeds.split(",")]
    result = {"data": str(data), "source": args.source, "label": label, **asdict(ref), "runs": runs,
              "ceiling": ceiling(data, args.source, label, args.eval_day)}
    by_pass = [[r["corr_by_pass"][i] for r in runs] for i in range(args.passes)]
    print(f"{data} ({args.source}, label {label}): {runs[0]['rows']:,} training rows, {runs[0]['positives']:,} positives, "
          f"{runs[0]['users']:,} users, {runs[0]['positives_per_user']} positives per user")
    name = f"{ref.model} {ref.loss}" + (" normalized" if ref.normalize else "") + f" {ref.optimizer} lr {ref.lr:g}"
    print(f"| {name}, pass | " + " | ".join(str(i + 1) for i in range(args.passes)) + " | ceiling |")
    print("|---|" + "---|" * (args.passes + 1))
    print(f"| corr planted ({len(runs)} seeds) | " + " | ".join(format_mean_std(values) for values in by_pass)
          + f" | {result['ceiling']:.3f} |")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
