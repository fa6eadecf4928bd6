"""What the published DERM embeddings know about the synthetic world's planted truth: a linear
probe (ridge regression on standardized embeddings, 80/20 split of the entities) from each
embedding to each entity's true attributes, reported as held-out R².

A first table works on any data: the spread of every published version of the day (mean pairwise
cosine, effective rank; :mod:`embeddings.representation`). The probe tables need a synthetic
world's planted truth. It answers "why is the lift small?" with data: an embedding that cannot linearly predict a user's
click propensity (``bias``) or a Pin's ``quality`` cannot hand them to a downstream model either.
The truth is the world's own (``DATA/truth/users.parquet``, ``pins.parquet``; see docs/data.md).

A second table checks what the two towers' contrastive task (§3.1) should learn: over random
(user, Pin) pairs, the correlation between the dot product of their embeddings and the world's
planted affinity ``<u_d, p_d>`` (drives clicks) and intent match ``<q_u, r_p>`` (drives conversions).
Last, the click ROC-AUC of ``<ctr_user, ctr_pin>`` alone on the next day's ctr log: what the
embeddings could hand a downstream CTR model that reads them as a pair.

Usage::

    python experiments/probe.py --data runs/data/small --stores runs/experiments/small/seed=0/store/ma0.9 \\
        --day 2026-01-06
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from embeddings.embedded_store import EmbeddedStore  # noqa: E402

TARGETS = {"user": ("bias", "activity", "shopper"), "pin": ("bias", "quality", "popularity")}


def probe_r2(x: np.ndarray, y: np.ndarray, seed: int = 0, ridge: float = 1.0) -> float:
    """Held-out R² of a ridge regression of ``y`` on ``x`` (80/20 split)."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    order = np.random.default_rng(seed).permutation(len(y))
    train, test = order[: len(y) * 4 // 5], order[len(y) * 4 // 5:]
    a = np.c_[x[train], np.ones(train.size)]
    w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ y[train])
    pred = np.c_[x[test], np.ones(test.size)] @ w
    return float(1 - ((y[test] - pred) ** 2).sum() / ((y[test] - y[test].mean()) ** 2).sum())


def latent_on_day(truth, day_index: int, drift_per_day: float) -> np.ndarray:
    """``[N, K]`` planted latents on a day (the world's ``cos(θ d) latent0 + sin(θ d) drift``)."""
    base, drift = (np.stack(truth.column(c).to_numpy(zero_copy_only=False)) for c in ("latent0", "drift"))
    return np.cos(drift_per_day * day_index) * base + np.sin(drift_per_day * day_index) * drift


def world_day(data: Path, day: str) -> tuple[dict, int]:
    """(the synthetic world's config, ``day`` as days since its start)."""
    import json

    world = json.loads((data / "truth" / "world.json").read_text())["config"]
    return world, (dt.date.fromisoformat(day) - dt.date.fromisoformat(world["start_date"])).days


def pair_correlations(data: Path, stores: Path, day: str, pairs: int = 200_000, seed: int = 0) -> list[str]:
    """Markdown rows: per source, corr(<user emb, Pin emb>, planted affinity / intent match)."""
    world, d = world_day(data, day)
    truth = {e: pq.read_table(data / "truth" / f"{e}s.parquet") for e in ("user", "pin")}
    latent = {e: latent_on_day(t, d, world["drift_per_day"]) for e, t in truth.items()}
    intent = {e: np.stack(t.column("intent").to_numpy(zero_copy_only=False)) for e, t in truth.items()}
    rng = np.random.default_rng(seed)
    rows = []
    for source in ("ctr", "cvr"):
        emb, ids = {}, {}
        for e, t in truth.items():
            emb[e], hit = lookup(stores, source, e, t.column(f"{e}_id").to_numpy(), day)
            ids[e] = np.flatnonzero(hit)
        u, p = rng.choice(ids["user"], pairs), rng.choice(ids["pin"], pairs)
        score = (emb["user"][u] * emb["pin"][p]).sum(1)
        affinity = (latent["user"][u] * latent["pin"][p]).sum(1)
        match = (intent["user"][u] * intent["pin"][p]).sum(1)
        rows.append(f"| {source}_user · {source}_pin | {pairs:,} | {np.corrcoef(score, affinity)[0, 1]:+.3f} | "
                    f"{np.corrcoef(score, match)[0, 1]:+.3f} |")
    return rows


def lookup(stores: Path, source: str, entity: str, ids: np.ndarray, day: str) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, hit) of ``ids`` in the ``source``-``entity`` store's version of ``day``."""
    return EmbeddedStore(stores / f"{source}-{entity}").get(ids, version=f"{source}-{entity}-{day}")


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of raw scores, computed as the trainer's evaluation does (torchmetrics; it squashes
    scores outside [0, 1] with a sigmoid, which keeps their order)."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels).long()))


def dot_click_auc(data: Path, stores: Path, version_day: str, eval_day: str) -> tuple[float, float]:
    """(click ROC-AUC of <ctr_user, ctr_pin> on ``eval_day``'s ctr rows, share of rows whose user
    and Pin both have a version of ``version_day``)."""
    import pyarrow as pa

    files = sorted((data / "ctr" / f"day={eval_day}").glob("*.parquet"))
    if not files:
        raise SystemExit(f"{data / 'ctr'}: no day={eval_day} to evaluate on")
    t = pa.concat_tables([pq.read_table(f, columns=["user_id", "pin_id", "click"]) for f in files])
    (user, user_hit), (pin, pin_hit) = (lookup(stores, "ctr", e, t.column(f"{e}_id").to_numpy(), version_day) for e in ("user", "pin"))
    both = user_hit & pin_hit
    score = (user[both] * pin[both]).sum(1)
    return rank_auc(t.column("click").to_numpy()[both], score), float(both.mean())


def spread_rows(data: Path, stores: Path, day: str, limit: int = 20_000) -> list[str]:
    """Markdown rows: spread of every published version of ``day`` under ``stores`` (any data),
    over up to ``limit`` of the entities of the day's log that the version holds."""
    import pyarrow.dataset as ds

    from data.spec import load_spec
    from embeddings.representation import spread

    keys = load_spec(data / "spec.toml").keys
    rows = []
    for source in ("ctr", "cvr"):
        for entity in ("user", "pin"):
            path, version = stores / f"{source}-{entity}", f"{source}-{entity}-{day}"
            log_day = data / source / f"{keys.day}={day}"
            if not path.is_dir() or not log_day.is_dir() or version not in EmbeddedStore(path).versions():
                continue
            column = keys.user if entity == "user" else keys.pin
            ids = np.unique(ds.dataset(log_day, format="parquet").to_table(columns=[column])[column].to_numpy())
            emb, hit = EmbeddedStore(path).get(ids.astype(np.int64), version=version)
            emb = emb[hit][:limit]
            s = spread(emb)
            rows.append(f"| {source}_{entity} | {len(emb):,} | {s['mean_pairwise_cosine']:.3f} | "
                        f"{s['effective_rank']:.1f} / {emb.shape[1]} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="experiments/probe.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root (a synthetic world's truth/ adds the planted tables)")
    p.add_argument("--stores", required=True, help="folder of the stores ctr-user, ctr-pin, cvr-user, cvr-pin")
    p.add_argument("--day", required=True, help="the version's day")
    p.add_argument("--eval-day", default="", help="day of the ctr log for the click AUC (default: the day after --day; none: skip)")
    args = p.parse_args(argv)
    data, stores = Path(args.data), Path(args.stores)
    print("| embedding | entities | mean pairwise cosine | effective rank |")
    print("|---|---|---|---|")
    print("\n".join(spread_rows(data, stores, args.day)))
    if (data / "truth").is_dir():
        print()
        print("| embedding | entities | held-out R² per planted attribute |")
        print("|---|---|---|")
        for source in ("ctr", "cvr"):
            for entity, targets in TARGETS.items():
                truth = pq.read_table(data / "truth" / f"{entity}s.parquet")
                emb, hit = lookup(stores, source, entity, truth.column(f"{entity}_id").to_numpy(), args.day)
                r2 = [probe_r2(emb[hit], truth.column(t).to_numpy()[hit].astype(float)) for t in targets]
                cells = ", ".join(f"{t} {v:.3f}" for t, v in zip(targets, r2))
                print(f"| {source}_{entity} | {int(hit.sum()):,} | {cells} |")
        print()
        print("| dot product of | random pairs | corr with affinity <u, p> (clicks) | corr with intent <q, r> (conversions) |")
        print("|---|---|---|---|")
        print("\n".join(pair_correlations(data, stores, args.day)))
    eval_day = args.eval_day or (dt.date.fromisoformat(args.day) + dt.timedelta(days=1)).isoformat()
    if eval_day != "none" and (data / "ctr" / f"day={eval_day}").is_dir():
        auc, share = dot_click_auc(data, stores, args.day, eval_day)
        print(f"\nclick ROC-AUC of <ctr_user, ctr_pin> alone on {eval_day}: {auc:.4f} ({share:.1%} of its rows have both versions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
