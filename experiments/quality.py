"""Representation quality of upstream DERM models over seeds: one upstream training run per
(variant, seed), the embedding-quality metrics of its evaluation day (``trainer.metrics.
embedding_quality``; issue 11), and a table of their means ± standard deviations.

A variant is a name and a list of ``--section.field=value`` overrides of ``trainer/main.py``; the
protocol (data, training days, evaluation day, batch size) is the same for every variant and seed,
and every run made is kept in ``OUT/results.jsonl`` and in the table, none dropped. A run already in
``results.jsonl`` is not repeated, so an interrupted sweep resumes.

Usage::

    python experiments/quality.py --data runs/data/small --days 2026-01-01,2026-01-02,2026-01-03 \\
        --eval-day 2026-01-04 --seeds 0,1,2 --out runs/quality/small-ctr \\
        --variant "before=--model.contrastive_weight=0.1 --model.init_temperature=0.1 --model.dense_norm=none --model.center='[]'" \\
        --variant after=

``--variant NAME=`` with nothing after ``=`` is the default config; ``--eval-day`` may name several
comma-separated days (sparse logs). Columns: the ROC-AUC of the upstream model's first label, mean
pairwise cosine and effective rank of user and Pin embeddings, recall@100 of next-day positives
among the day's Pins (beside popularity's), the contrastive loss (beside ln B) and the learned
temperature; with the world's truth (synthetic data), the correlation of
``<user, Pin>`` with the planted affinity (ctr) or intent (cvr), and the oracle recall@100 of the
world's own ranking (ctr). Results and the command: docs/model.md, "Representation quality".
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

ROOT = Path(__file__).resolve().parents[1]
PAIRS = 200_000
COLUMNS = (
    ("auc", "AUC"),
    ("user_mean_pairwise_cosine", "user cos"),
    ("user_effective_rank", "user rank"),
    ("pin_mean_pairwise_cosine", "Pin cos"),
    ("pin_effective_rank", "Pin rank"),
    ("recall_at_100", "recall@100"),
    ("popularity_recall_at_100", "popularity"),
    ("recall_ratio", "ratio"),
    ("contrastive_loss", "contrastive"),
    ("temperature", "tau"),
    ("planted_corr", "corr planted"),
    ("oracle_recall_at_100", "oracle recall@100"),
)


def run_one(args, name: str, overrides: list[str], seed: int) -> dict:
    """Trains one upstream model and returns its row of results."""
    run_dir = Path(args.out) / name / f"seed={seed}"
    cmd = [sys.executable, str(ROOT / "trainer" / "main.py"), f"--data.root={args.data}", "--data.synthetic_preset=",
           f"--data.source={args.source}", f"--data.batch_size={args.batch_size}", f"--train.run_dir={run_dir}",
           f"--train.seed={seed}", "--train.overwrite=true", f"--days={args.days}", f"--eval-day={args.eval_day}",
           *overrides]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed ({done.returncode}):\n{shlex.join(cmd)}\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    quality = summary["embedding_quality"]
    first = next(iter(summary["eval"]))
    row = {"variant": name, "seed": seed, "overrides": overrides, "seconds": round(time.monotonic() - start, 1),
           "auc": summary["eval"][first]["roc_auc"], "label": first, **quality}
    if quality.get("popularity_recall_at_100"):
        row["recall_ratio"] = quality["recall_at_100"] / quality["popularity_recall_at_100"]
    if (Path(args.data) / "truth").is_dir():
        row["planted_corr"] = planted_correlation(args, run_dir)
        if args.source == "ctr":
            row["oracle_recall_at_100"] = oracle_recall(Path(args.data), args.eval_day)
    _keep_last_snapshot(Path(summary["snapshot"]))
    return row


def _keep_last_snapshot(last: Path) -> None:
    """Removes a finished run's snapshots but its last, the one its metrics read: a run over a
    long window snapshots every day (112 days of MovieLens: 300 MB a run), and a sweep of such
    runs filled this machine's disk."""
    import shutil

    for path in last.parent.glob("day=*"):
        if path.name != last.name:
            shutil.rmtree(path)


def oracle_recall(data: Path, day: str, k: int = 100, queries: int = 4000) -> float:
    """Recall@k of the synthetic world's own ranking, the ceiling of ``recall_at_100``: for the
    day's clicks (a fixed random sample of ``queries``), the day's Pins ranked by expected clicks
    E[click on v | u] = P(impression of v | u) · p_click(u, v), from the generator's targeting
    (``data/synthetic/simulate.py``: 60 % of ads from the user's interests, 70/30 primary
    and secondary, Pins by popularity within a category) and its click model without the context
    terms, which no user or Pin embedding can know."""
    import numpy as np
    import pyarrow.parquet as pq

    from data.synthetic.simulate import TARGETED_FRAC
    from data.synthetic.world import B_CLICK
    from experiments.probe import latent_on_day, world_day

    world, d = world_day(data, day)
    users_t, pins_t = (pq.read_table(data / "truth" / f"{e}s.parquet") for e in ("user", "pin"))
    log = pq.read_table(data / "ctr" / f"day={day}", columns=["user_id", "pin_id", "click"])
    clicked = log.column("click").to_numpy() > 0.5
    users, pins = log.column("user_id").to_numpy()[clicked], log.column("pin_id").to_numpy()[clicked]
    candidates = np.unique(log.column("pin_id").to_numpy())
    target = np.searchsorted(candidates, pins)
    user_latent = latent_on_day(users_t, d, world["drift_per_day"])
    pin_latent = latent_on_day(pins_t, d, world["drift_per_day"])[candidates]
    popularity = pins_t.column("popularity").to_numpy()[candidates]
    category = pins_t.column("category_id").to_numpy()[candidates]
    mass = np.bincount(category, weights=popularity, minlength=world["n_categories"])
    primary, secondary = (users_t.column(c).to_numpy() for c in ("primary_cluster", "secondary_cluster"))
    user_bias, pin_bias = users_t.column("bias").to_numpy(), pins_t.column("bias").to_numpy()[candidates]
    hits = 0
    for i in np.random.default_rng(0).choice(len(users), min(queries, len(users)), replace=False):
        u = users[i]
        own = 0.7 * (category == primary[u]) + 0.3 * (category == secondary[u])
        impression = (TARGETED_FRAC * own / mass[category] + (1 - TARGETED_FRAC) / mass.sum()) * popularity
        click = 1.0 / (1.0 + np.exp(-(B_CLICK + 4.0 * pin_latent @ user_latent[u] + user_bias[u] + pin_bias)))
        score = impression * click
        hits += int((score > score[target[i]]).sum() < k)
    return round(hits / min(queries, len(users)), 4)


def planted_correlation(args, run_dir: Path, pairs: int = PAIRS) -> float:
    """Correlation, over random (user, Pin) pairs of the evaluation day, of ``<user, Pin>`` from the
    last snapshot with the synthetic world's planted score: the affinity ``<u_d, p_d>`` that drives
    clicks (ctr) or the intent match ``<q_u, r_p>`` that drives conversions (cvr)."""
    import numpy as np
    import pyarrow.parquet as pq

    emb_dir = run_dir / "emb"
    snapshot = json.loads((run_dir / "summary.json").read_text())["snapshot"]
    cmd = [sys.executable, str(ROOT / "embeddings" / "infer.py"), f"--snapshot={snapshot}", f"--data={args.data}",
           f"--days={args.eval_day}", f"--out={emb_dir}", "--overwrite"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{done.stderr[-3000:]}")
    emb, truth = {}, {}
    for entity in ("user", "pin"):
        t = pq.read_table(emb_dir / args.source / entity / f"day={args.eval_day}")
        emb[entity] = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
        truth[entity] = planted(Path(args.data), args.source, args.eval_day, entity, t.column("entity_id").to_numpy())
    u, p = random_pairs(len(emb["user"]), len(emb["pin"]), pairs)
    score = (emb["user"][u] * emb["pin"][p]).sum(1)
    truth_score = (truth["user"][u] * truth["pin"][p]).sum(1)
    return round(float(np.corrcoef(score, truth_score)[0, 1]), 4)


def planted(data: Path, source: str, day: str, entity: str, ids):
    """``[N, ·]`` planted vectors of a synthetic world's ``ids``: the latents of ``day`` (ctr: what
    drives clicks) or the conversion intents (cvr)."""
    import numpy as np
    import pyarrow.parquet as pq

    from experiments.probe import latent_on_day, world_day

    truth = pq.read_table(data / "truth" / f"{entity}s.parquet")
    row = np.searchsorted(truth.column(f"{entity}_id").to_numpy(), ids)  # truth is sorted by id
    if source == "ctr":
        world, d = world_day(data, day)
        return latent_on_day(truth, d, world["drift_per_day"])[row]
    return np.stack(truth.column("intent").to_numpy(zero_copy_only=False))[row]


def random_pairs(n_users: int, n_pins: int, pairs: int = PAIRS):
    """Row indices of ``pairs`` random (user, Pin) pairs, the same for every run and reference."""
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(0, n_users, pairs), rng.integers(0, n_pins, pairs)


def table(rows: list[dict], names: list[str]) -> str:
    """Markdown: one line per variant, mean ± std over its seeds for every column."""
    head = "| variant | seeds | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        cells = []
        for key, _ in COLUMNS:
            values = [r[key] for r in mine if isinstance(r.get(key), (int, float))]
            cells.append(format_mean_std(values))
        lines.append(f"| {name} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_mean_std(values: list[float]) -> str:
    """``mean ± sample std`` to 3 decimals; the mean alone for one value, ``–`` for none."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def protocol_parser(prog: str, doc: str, source: str) -> argparse.ArgumentParser:
    """The arguments every representation-quality tool shares: data, source, training days,
    evaluation day and seeds."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root (spec.toml and <source>/day=...)")
    p.add_argument("--source", default=source, help=f"which upstream model's data: ctr or cvr (default {source})")
    p.add_argument("--days", required=True, help="comma-separated training days, in order")
    p.add_argument("--eval-day", required=True, help="the held-out day the metrics are computed on")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = protocol_parser("experiments/quality.py", __doc__, "ctr")
    p.add_argument("--batch-size", type=int, default=2048, help="rows per step (default 2048)")
    p.add_argument("--variant", action="append", required=True, metavar="NAME=OVERRIDES",
                   help="a name and its space-separated --section.field=value overrides; repeatable")
    p.add_argument("--out", required=True, help="folder of the runs and results.jsonl")
    args = p.parse_args(argv)
    variants = {}
    for v in args.variant:
        name, sep, rest = v.partition("=")
        if not sep or not name:
            p.error(f"--variant {v!r}: write NAME=OVERRIDES (NAME= for the defaults)")
        variants[name] = shlex.split(rest)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["variant"], r["seed"]) for r in rows}
    for seed in seeds:  # seeds outermost: every variant gets a first figure early
        for name, overrides in variants.items():
            if (name, seed) in done:
                continue
            row = run_one(args, name, overrides, seed)
            rows.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} seed {seed}: " + "  ".join(f"{title} {row.get(key, float('nan')):.4g}" for key, title in COLUMNS
                                                     if isinstance(row.get(key), (int, float))), flush=True)
    print(table(rows, list(variants)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
