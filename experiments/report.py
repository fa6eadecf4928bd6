"""The experiment report: markdown tables and PNG plots from ``experiments/lift.py`` results.

Every lift is per seed, against the same seed's baseline (the same downstream model without DERM
embeddings): ``100 * (AUC_cell / AUC_baseline - 1)``; cells show the mean ± sample standard
deviation over seeds, with the paper's figure beside it where the paper gives one.

Usage::

    python experiments/report.py runs/experiments/small/results.jsonl runs/experiments/ml-100k/results.jsonl \\
        --out docs/experiments
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: import from the repo root
    sys.path[0] = str(REPO)


PAPER_TABLE1 = {"acc": "0.02", "ma0.5": "0.03–0.09 *", "ma0.9": "0.03–0.09 *", "ma0.99": "0.03–0.09 *", "ap": "0.03"}
PAPER_TABLE2 = {  # (ctr_user, ctr_pin, cvr_user, cvr_pin) -> (ROC-AUC lift %, PR-AUC lift %)
    ("ctr_user",): ("0.095", "0.2"),
    ("cvr_user",): ("0.059", "0.14"),
    ("ctr_user", "ctr_pin"): ("0.160", "0.4"),
    ("ctr_user", "cvr_user"): ("0.120", "0.25"),
    ("cvr_user", "cvr_pin"): ("0.083", "0.19"),
    ("ctr_user", "ctr_pin", "cvr_user", "cvr_pin"): ("0.190", "0.46"),
}
PAPER_TABLE4 = {
    ("cvr_user", "cvr_pin"): ("0.15", "1.1"),
    ("ctr_user", "ctr_pin", "cvr_user"): ("0.17", "1.79"),
    ("ctr_user", "ctr_pin", "cvr_user", "cvr_pin"): ("0.22", "1.92"),
}
ALL4 = ("ctr_user", "ctr_pin", "cvr_user", "cvr_pin")
POOL_ORDER = ["acc", "ma0.5", "ma0.9", "ma0.99", "ap"]
POOL_LABEL = {"acc": "ACC", "ma0.5": "MA α=0.5", "ma0.9": "MA α=0.9", "ma0.99": "MA α=0.99", "ap": "AP"}


OLD_CAPS = {"tiny": 8, "small": 40, "movielens": 0}
"""Upstream steps per day of rows from before protocol files, where the dataset fixed them."""
DATASET_NAMES = {"small": "synthetic small world", "tiny": "synthetic tiny world", "movielens": "MovieLens-100K"}


def dataset_name(dataset: str) -> str:
    """The readable name of a dataset; ``small-14d`` (a world generated with ``--days 14``) reads
    "synthetic small world, 14 days"."""
    longer = re.fullmatch(r"(.+)-(\d+)d", dataset)
    if longer and longer[1] in DATASET_NAMES:
        return f"{DATASET_NAMES[longer[1]]}, {longer[2]} days"
    return DATASET_NAMES.get(dataset, dataset)


def load(paths: list[Path]) -> dict[str, list[dict]]:
    """Rows by dataset and protocol, keyed by the section title (the last row wins when a cell of
    a seed appears twice). Rows from before protocol files (no ``protocol`` key) trained the
    downstream models on one day and are titled so."""
    by_key: dict[tuple, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                title = _title(r)
                by_key[(r["dataset"], title, r["seed"], r["cell"])] = r
    out: dict[str, list[dict]] = defaultdict(list)
    for (_, title, _, _), r in sorted(by_key.items()):
        out[title].append(r)
    return dict(out)


def _title(r: dict) -> str:
    """The section title: the dataset's name, its protocol where it is not the dataset's own, and
    the upstream settings where they are not the protocol's."""
    dataset, protocol = r["dataset"], r.get("protocol")
    parts = [dataset_name(dataset)]
    if protocol is None:
        parts.append("one downstream training day (before protocol files)")
    elif protocol != dataset:
        parts.append(f"protocol {protocol}")
    cap = r.get("upstream_steps_per_day_override") if protocol is not None else r.get("upstream_steps_per_day")
    if cap is not None and (protocol is not None or cap != OLD_CAPS.get(dataset, 0)):
        parts.append("upstream on full days" if cap == 0 else f"upstream capped at {cap} steps a day")
    if r.get("embed", "daily") != "daily":
        parts.append("back-inferred embeddings" if r["embed"] == "back" else f"embed {r['embed']}")
    return ", ".join(parts)


class Dataset:
    """The rows of one dataset, with lifts against each seed's baseline."""

    def __init__(self, name: str, rows: list[dict]) -> None:
        self.name, self.rows = name, rows
        self.label = {k: next(iter(next(r for r in rows if r["kind"] == k)["metrics"])) for k in ("ctr", "cvr")
                      if any(r["kind"] == k for r in rows)}
        self.baseline = {(r["seed"], r["kind"]): r for r in rows if r["table"] == "baseline"}
        # A variant's own baseline (the reading table's full-rank baseline) where there is one.
        self.variant_baseline = {(r["seed"], r["kind"], r["variant"]): r for r in rows if r.get("variant") and not r["derm"]}
        self.seeds = sorted({r["seed"] for r in rows})
        self.has_lifts = any(r["derm"] for r in rows)  # False for a run of baselines alone

    def metric(self, r: dict, key: str) -> float:
        return r["metrics"][self.label[r["kind"]]][key]

    def too_few(self, r: dict) -> int | None:
        """The test days' positives of ``r``'s label when fewer than its protocol's minimum, else None."""
        m = r["metrics"][self.label[r["kind"]]]
        n = m.get("positives")
        return n if n is not None and n < r.get("min_positives", 0) else None

    def lifts(self, rows: list[dict], key: str) -> list[float]:
        """Per seed, the paired lift in % over the same seed's baseline (seeds whose test days have
        too few positives are left out)."""
        out = []
        for r in rows:
            base = self.baseline_of(r)
            if base is not None and self.too_few(r) is None:
                out.append(self.lift(self.metric(r, key), self.metric(base, key)))
        return out

    @staticmethod
    def lift(value: float, baseline: float) -> float:
        """The lift in % of ``value`` over ``baseline``."""
        return 100 * (value / baseline - 1)

    def baseline_of(self, r: dict) -> dict | None:
        """The same seed's baseline: the variant's own where it has one, else the plain one."""
        own = self.variant_baseline.get((r["seed"], r["kind"], r.get("variant", "")))
        return own if own is not None and own is not r else self.baseline.get((r["seed"], r["kind"]))

    def gap_closed(self, rows: list[dict]) -> list[float]:
        """Per seed, the share of the baseline-to-oracle ROC-AUC gap that the cell closes (%)."""
        out = []
        for r in rows:
            base = self.baseline_of(r)
            oracle = self.metric(r, "oracle_roc_auc") if "oracle_roc_auc" in r["metrics"][self.label[r["kind"]]] else None
            if base is not None and oracle is not None and self.too_few(r) is None:
                b = self.metric(base, "roc_auc")
                out.append(100 * (self.metric(r, "roc_auc") - b) / (oracle - b))
        return out

    def oracle(self, kind: str) -> str:
        """The oracle ROC-AUC of ``kind``'s evaluation rows (the world's true probabilities), as text."""
        rows = self.select("baseline", kind)
        value = rows[0]["metrics"][self.label[kind]].get("oracle_roc_auc") if rows else None
        return f"oracle ROC-AUC {value:.4f}" if value is not None else "no oracle (real data)"

    def select(self, table: str, kind: str, derm: tuple[str, ...] | None = None, pool: str | None = None,
               projection: int | None = None) -> list[dict]:
        return [r for r in self.rows if r["table"] == table and r["kind"] == kind
                and (derm is None or tuple(r["derm"]) == derm) and (pool is None or r["pool"] == pool)
                and (projection is None or r["projection_dim"] == projection)]


def fmt(values: list[float], digits: int = 2, seeds: int = 0) -> str:
    """``mean ± std`` of ``values``, with ``(n=k)`` when fewer than ``seeds`` seeds are paired."""
    if not values:
        return "–"
    n = f" (n={len(values)})" if seeds and len(values) < seeds else ""
    if len(values) == 1:
        return f"{values[0]:+.{digits}f}{n}"
    return f"{statistics.mean(values):+.{digits}f} ± {statistics.stdev(values):.{digits}f}{n}"


def lift_text(ds: "Dataset", rows: list[dict], key: str) -> str:
    """The paired lift of ``rows`` (:func:`fmt`), naming every seed whose test days had too few
    positives to measure it."""
    few = [f"seed {r['seed']}: too few positives ({ds.too_few(r)})" for r in rows if ds.too_few(r) is not None]
    return "; ".join([fmt(ds.lifts(rows, key), seeds=len(ds.seeds))] + few)


def auc_text(ds: "Dataset", rows: list[dict], key: str = "roc_auc") -> str:
    return _abs([ds.metric(r, key) for r in rows if ds.too_few(r) is None])


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), 0.0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def ticks(derm: tuple[str, ...]) -> list[str]:
    return ["✓" if f in derm else "✗" for f in ALL4]


def report(datasets: dict[str, Dataset], out: Path) -> str:
    discussion = Path(os.path.relpath(REPO / "docs" / "experiments.md", out.resolve())).as_posix()
    lines = ["# Experiment results (generated)", "",
             "Generated by `python experiments/report.py` from `experiments/lift.py` results; see "
             f"[{discussion}]({discussion}) for the protocol, the commands and the discussion. Lifts are in %, "
             "per seed against the same seed's no-DERM baseline, mean ± std over seeds.", ""]
    for ds in datasets.values():
        lines += [f"## {ds.name}", "", f"Seeds: {', '.join(map(str, ds.seeds))}. "
                  f"Downstream CTR label `{ds.label.get('ctr')}`, CVR label `{ds.label.get('cvr')}`.", ""]
        lines += _protocol(ds) + _baselines(ds) + _headline(ds) + _curve(ds)
        lines += _table1(ds) + _table_subsets(ds, "table2", "ctr", PAPER_TABLE2, "Table 2: DERM embeddings → downstream CTR")
        lines += _table_subsets(ds, "table4", "cvr", PAPER_TABLE4, "Table 4 (Appendix E.1): DERM embeddings → downstream CVR")
        lines += _appendix_d(ds) + _reading(ds)
        _plots(ds, out)
        slug = _slug(ds.name)
        if ds.has_lifts:
            lines += [f"![lifts on {ds.name}]({slug}-lifts.png)", ""]
        if len(_projection_rows(ds)) > 1:
            lines += [f"![projection width on {ds.name}]({slug}-projection.png)", ""]
        if _curve_series(ds):
            lines += [f"![learning curves on {ds.name}]({slug}-curve.png)", ""]
    return "\n".join(lines)


def _baselines(ds: Dataset) -> list[str]:
    lines = ["### Baselines (no DERM embeddings)", "", "| model | label | ROC-AUC | PR-AUC | oracle ROC-AUC |", "|---|---|---|---|---|"]
    for kind in ("ctr", "cvr"):
        rows = ds.select("baseline", kind)
        if not rows:
            continue
        roc = [ds.metric(r, "roc_auc") for r in rows if ds.too_few(r) is None]
        pr = [ds.metric(r, "pr_auc") for r in rows if ds.too_few(r) is None]
        oracle = [r["metrics"][ds.label[kind]].get("oracle_roc_auc") for r in rows]
        o = f"{oracle[0]:.4f}" if oracle[0] is not None else "– (real data)"
        lines.append(f"| {kind} | {ds.label[kind]} | {_abs(roc)} | {_abs(pr)} | {o} |")
    return lines + [""]


HEADLINE = [("table2", "ctr", ALL4, "CTR, all four embeddings"), ("table2", "ctr", ("ctr_user", "ctr_pin"), "CTR, ctr pair"),
            ("similarity", "ctr", ("ctr_user", "ctr_pin"), "CTR, ctr pair + cosine (beyond the paper)"),
            ("similarity", "ctr", ALL4, "CTR, all four + cosines (beyond the paper)"),
            ("table4", "cvr", ALL4, "CVR, all four embeddings"), ("table4", "cvr", ("cvr_user", "cvr_pin"), "CVR, cvr pair"),
            ("similarity", "cvr", ALL4, "CVR, all four + cosines (beyond the paper)")]


def _protocol(ds: Dataset) -> list[str]:
    """The day split, steps and tuning grid the rows were made under (from the rows themselves)."""
    r = ds.rows[0]
    if "validation_days" not in r:
        return [f"Downstream training days {', '.join(r['train_days'])}; evaluated on {', '.join(r['eval_days'])}.", ""]

    def span(days: list[str]) -> str:
        return days[0] if len(days) == 1 else f"{days[0]} .. {days[-1]} ({len(days)} days)"

    # Rows made before the grid had a sparse learning rate record the dense one alone.
    grid = sorted({(t["dense_lr"], t.get("sparse_lr")) for row in ds.rows for t in row.get("tuning", [])},
                  key=lambda pair: (pair[0], -1.0 if pair[1] is None else pair[1]))
    if all(s is None for _, s in grid):
        grid_text = f"dense learning rate, every cell alike: {', '.join(f'{d:g}' for d, _ in grid)}"
    else:
        grid_text = ("dense / sparse learning rate, every cell alike: "
                     + ", ".join(f"{d:g} / {'not recorded' if s is None else f'{s:g}'}" for d, s in grid))
    return [f"Protocol `{r['protocol']}`: downstream models train incrementally over {span(r['train_days'])}, one pass a "
            f"day; choices on {span(r['validation_days'])}; reported on {span(r['test_days'])}. Tuning grid "
            f"({grid_text}). Examples seen per CTR / CVR model: "
            + " / ".join(f"{_examples(ds, k)}" for k in ("ctr", "cvr")) + ".", ""]


def _examples(ds: Dataset, kind: str) -> str:
    rows = [r for r in ds.rows if r["kind"] == kind]
    return f"{rows[0]['train_examples']:,} ({rows[0].get('train_steps', '?')} steps)" if rows else "–"


def _headline(ds: Dataset) -> list[str]:
    """The lifts the issue asks for, paired per seed, with the share of the gap to the oracle
    closed, whether the mean clears 2 std, and the embeddings' coverage."""
    if not ds.has_lifts:  # baselines alone: their table and curve say it all
        return []
    lines = ["### The lift, paired by seed", "",
             "| model, DERM input | ROC-AUC | baseline | ROC-AUC lift % | > 2 std | gap to oracle closed % | PR-AUC lift % "
             "| coverage of test rows |", "|---|---|---|---|---|---|---|---|"]
    for table, kind, derm, name in HEADLINE:
        rows = ds.select(table, kind, derm, projection=32)
        if not rows:
            continue
        lifts = ds.lifts(rows, "roc_auc")
        m, sd = mean_std(lifts)
        clear = "–" if len(lifts) < 2 else ("yes" if m > 2 * sd else "no")
        base = [ds.baseline[(r["seed"], kind)] for r in rows if (r["seed"], kind) in ds.baseline]
        coverage = _coverage(rows)
        lines.append(f"| {name} | {auc_text(ds, rows)} | {auc_text(ds, base)} | {lift_text(ds, rows, 'roc_auc')} | {clear} | "
                     f"{fmt(ds.gap_closed(rows), 1)} | {lift_text(ds, rows, 'pr_auc')} | {coverage} |")
    return lines + [""]


def _coverage(rows: list[dict]) -> str:
    """Mean share of test rows that found each embedding (``–`` for rows that did not record it)."""
    shares: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        for k, v in ((r.get("coverage") or {}).get("test") or {}).items():
            shares[k].append(v)
    return ", ".join(f"{k} {statistics.mean(v):.0%}" for k, v in shares.items()) or "–"


def _curve_series(ds: Dataset) -> list[tuple[str, list[dict]]]:
    """(name, rows) of every model whose learning curve the report shows: the baselines and the
    headline cells."""
    series = [("baseline", kind, (), f"{kind} baseline") for kind in ("ctr", "cvr")]
    series += [(t, k, d, n) for t, k, d, n in HEADLINE if t != "table2" or d == ALL4]
    cols = [(n, ds.select(t, k, d, projection=32 if t != "baseline" else None)) for t, k, d, n in series]
    return [(n, rs) for n, rs in cols if rs and rs[0].get("curve")]


def _curve(ds: Dataset) -> list[str]:
    """Validation ROC-AUC after each downstream training day: has the baseline converged?"""
    cols = _curve_series(ds)
    if not cols:
        return []
    lines = ["### Learning curve: validation ROC-AUC after each downstream training day", "",
             "Mean ± std over seeds, on the validation days (never the test day).", "",
             "| after day | " + " | ".join(n for n, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    points = [_curve_points(rs, lambda p, label=ds.label[rs[0]["kind"]]: p["validation"][label]) for _, rs in cols]
    for i, day in enumerate(p["day"] for p in cols[0][1][0]["curve"]):
        lines.append(f"| {day} | " + " | ".join(_abs(col[i]) for col in points) + " |")
    return lines + [""] + _next_day(ds)


def _curve_points(rs: list[dict], get) -> list[list[float]]:
    """Per point of the first row's curve, ``get(point)`` of every seed's row that has it."""
    return [[get(r["curve"][i]) for r in rs if len(r["curve"]) > i] for i in range(len(rs[0]["curve"]))]


def _has_next_day(r: dict) -> bool:
    """Whether a row has the next-day (progressive) evaluation (rows made before it have none)."""
    return all("next_day" in p for p in r["curve"])


def _next_day_series(ds: Dataset) -> list[tuple[str, list[dict]]]:
    """The curve series whose rows all have the next-day evaluation."""
    return [(n, rs) for n, rs in _curve_series(ds) if all(map(_has_next_day, rs))]


def _next_days(ds: Dataset, r: dict) -> dict[str, dict]:
    """A row's next-day metrics of its label, by evaluated day: only the days with an AUC, and
    (where the count was kept) at least the row's ``min_positives`` positives."""
    label, floor = ds.label[r["kind"]], r.get("min_positives", 0)
    out = {}
    for p in r["curve"]:
        m = p["next_day"][label]
        if m["roc_auc"] == m["roc_auc"] and (m.get("positives") is None or m["positives"] >= floor):
            out[p["next_day"]["day"]] = m
    return out


def _next_day_points(ds: Dataset, rs: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Per point of the first row's curve: the point, and the metrics of its next day in every
    seed's row that kept that day (:func:`_next_days`)."""
    rows = [_next_days(ds, r) for r in rs]
    return [(p, [days[p["next_day"]["day"]] for days in rows if p["next_day"]["day"] in days]) for p in rs[0]["curve"]]


def _gaps(metrics: list[dict]) -> list[float]:
    """The oracle's ROC-AUC minus the model's, where the oracle's is known."""
    return [m["oracle_roc_auc"] - m["roc_auc"] for m in metrics if m.get("oracle_roc_auc") is not None]


def _next_day(ds: Dataset) -> list[str]:
    """The day after each training day, evaluated before training on it, and its gap to the
    oracle: on a drifting world the fixed validation day favours the days nearest to it, so this
    gap is what says whether a model has stopped learning."""
    cols = _next_day_series(ds)
    if not cols:
        return []
    points = [_next_day_points(ds, rs) for _, rs in cols]
    oracle = any(_gaps(metrics) for col in points for _, metrics in col)
    lines = ["### Next-day ROC-AUC, before training on that day (progressive validation)", "",
             "Mean ± std over seeds" + ("; after it, the gap: the oracle's ROC-AUC on that day minus the model's. A model has "
                                        "converged when its gap stops shrinking." if oracle else
                                        ". A model has converged when its next-day ROC-AUC stops rising.")
             + " A day with too few positives is left out.", "",
             "| evaluated day | " + " | ".join(n for n, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for i, (p, _) in enumerate(points[0]):
        cells = []
        for col in points:
            metrics, gaps = col[i][1], _gaps(col[i][1])
            cells.append(_abs([m["roc_auc"] for m in metrics]) + (f"; gap {statistics.mean(gaps):.4f}" if gaps else ""))
        lines.append(f"| {p['next_day']['day']} | " + " | ".join(cells) + " |")
    return lines + [""] + _next_day_lifts(ds, cols)


def _next_day_lifts(ds: Dataset, cols: list[tuple[str, list[dict]]]) -> list[str]:
    """Per model, the paired next-day ROC-AUC lift averaged over the second half of the training
    days' next days, where the baselines have done most of their learning: one mean per seed over
    the days both it and its baseline have, then mean ± std over seeds. More evaluated days than
    the test day alone; the validation days (where the grid chooses) and the test days are never
    among them."""
    out = []
    for name, rs in cols:
        if not rs[0]["derm"]:
            continue
        per_seed, days = [], set()
        for r in rs:
            base = ds.baseline_of(r)
            if base is None or not _has_next_day(base):
                continue
            curve = [p["next_day"]["day"] for p in r["curve"] if p["next_day"]["day"] not in r["validation_days"]]
            mine, theirs = _next_days(ds, r), _next_days(ds, base)
            shared = [d for d in curve[len(curve) // 2:] if d in mine and d in theirs]
            if shared:
                per_seed.append(statistics.mean(ds.lift(mine[d]["roc_auc"], theirs[d]["roc_auc"]) for d in shared))
                days.update(shared)
        if per_seed:
            days = sorted(days)
            out.append(f"| {name} | {days[0]} .. {days[-1]} ({len(days)} day{'s' * (len(days) > 1)}) | "
                       f"{fmt(per_seed, seeds=len(ds.seeds))} |")
    if not out:
        return []
    return ["Paired next-day ROC-AUC lift %: each seed's mean over the second half of its training days' next days "
            "(never a validation or test day), then mean ± std over seeds:", "",
            "| model | next days | ROC-AUC lift % |", "|---|---|---|", *out, ""]


def _abs(values: list[float]) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.4f} ± {s:.4f}" if len(values) > 1 else f"{m:.4f} (n=1)"


def _table1(ds: Dataset) -> list[str]:
    if not ds.select("table1", "cvr"):
        return []
    lines = [f"### Table 1: aggregation of the CVR user embedding → downstream CVR ({ds.oracle('cvr')})", "",
             "| pool | ROC-AUC lift | PR-AUC lift | ROC-AUC | paper ROC-AUC lift |", "|---|---|---|---|---|"]
    for pool in POOL_ORDER:
        rows = ds.select("table1", "cvr", ("cvr_user",), pool)
        if rows:
            lines.append(f"| {POOL_LABEL[pool]} | {lift_text(ds, rows, 'roc_auc')} | {lift_text(ds, rows, 'pr_auc')} | "
                         f"{auc_text(ds, rows)} | {PAPER_TABLE1.get(pool, '')} |")
    return lines + ["", "\\* the paper's three MA figures (0.03, 0.06, 0.09) are for three α its text does not preserve; "
                    "its best is an MA.", ""]


def _table_subsets(ds: Dataset, table: str, kind: str, paper: dict, title: str) -> list[str]:
    if not ds.select(table, kind):
        return []
    lines = [f"### {title} ({ds.oracle(kind)})", "",
             "| CTR user | CTR item | CVR user | CVR item | ROC-AUC lift | PR-AUC lift | ROC-AUC | paper ROC / PR lift |",
             "|---|---|---|---|---|---|---|---|"]
    for key in paper:  # the paper's row order
        rows = ds.select(table, kind, key, projection=32)
        if not rows:
            continue
        p = paper[key]
        lines.append("| " + " | ".join(ticks(key)) + f" | {lift_text(ds, rows, 'roc_auc')} | {lift_text(ds, rows, 'pr_auc')} | "
                     f"{auc_text(ds, rows)} | {p[0]} / {p[1]} |")
    return lines + [""]


def _projection_rows(ds: Dataset) -> list[tuple[int, list[dict]]]:
    out = []
    for width in (0, 8, 16, 32, 64):
        rows = ds.select("table2", "ctr", ALL4, projection=32) if width == 32 else ds.select("appendix_d", "ctr", ALL4, projection=width)
        if rows:
            out.append((width, rows))
    return out


def _appendix_d(ds: Dataset) -> list[str]:
    """AUC side only: the cells train while other work shares the machine, so their examples/s are
    not comparable; the cost side is bench/bench_projection.py's (docs/experiments.md)."""
    if len(_projection_rows(ds)) < 2:  # only Table 2's default width: nothing to compare
        return []
    lines = [f"### Appendix D.1: projection width of the four DERM embeddings → downstream CTR ({ds.oracle('ctr')})", "",
             "| projection | DERM width into the MoE | input width F | ROC-AUC lift | PR-AUC lift | ROC-AUC |",
             "|---|---|---|---|---|---|"]
    for width, rs in _projection_rows(ds):
        derm_width = rs[0].get("derm_width") or (4 * width if width else "4 × (E + 1)")
        lines.append(f"| {'none' if width == 0 else width} | {derm_width} | {rs[0].get('input_width') or '–'} | "
                     f"{lift_text(ds, rs, 'roc_auc')} | {lift_text(ds, rs, 'pr_auc')} | {auc_text(ds, rs)} |")
    return lines + ["", "Throughput by width: `bench/bench_projection.py`, figures in [../benchmarks.md](../benchmarks.md#projection-layer-benchbench_projectionpy).", ""]


READING = [("ctr", "full_rank", (), "CTR baseline, full-rank crosses", "the baseline"),
           ("ctr", "full_rank", ALL4, "CTR, all four, full-rank crosses", "the full-rank baseline"),
           ("ctr", "raw", ALL4, "CTR, all four, not standardized", "the baseline"),
           ("cvr", "raw", ALL4, "CVR, all four, not standardized", "the baseline")]


def _reading(ds: Dataset) -> list[str]:
    """What the downstream side needs to read the embeddings: each variant's paired lift, beside
    the default reading (Tables 2 and 4's all-four cells: standardized, rank-16 crosses)."""
    if not ds.select("reading", "ctr") and not ds.select("reading", "cvr"):
        return []
    lines = ["### Reading the embeddings: ablation", "",
             "| cell | against | ROC-AUC lift | PR-AUC lift | ROC-AUC |", "|---|---|---|---|---|"]
    for table, kind in (("table2", "ctr"), ("table4", "cvr")):
        default = ds.select(table, kind, ALL4, projection=32)
        if default:
            lines.append(f"| {kind.upper()}, all four (default: standardized, rank-16 crosses) | the baseline | "
                         f"{lift_text(ds, default, 'roc_auc')} | {lift_text(ds, default, 'pr_auc')} | {auc_text(ds, default)} |")
    for kind, variant, derm, name, against in READING:
        rows = [r for r in ds.select("reading", kind, derm) if r.get("variant") == variant]
        if rows:
            lines.append(f"| {name} | {against} | {lift_text(ds, rows, 'roc_auc')} | {lift_text(ds, rows, 'pr_auc')} | "
                         f"{auc_text(ds, rows)} |")
    return lines + [""]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _plots(ds: Dataset, out: Path) -> None:
    """Write the dataset's PNGs: the lifts and projection widths where there are lifts, the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _curve_plot(ds, out, plt)
    if not ds.has_lifts:
        return

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("Table 1: CVR user pool → CVR", [(POOL_LABEL[p], ds.select("table1", "cvr", ("cvr_user",), p)) for p in POOL_ORDER]),
        ("Table 2: embeddings → CTR", [(_short(k), ds.select("table2", "ctr", k, projection=32)) for k in PAPER_TABLE2]),
        ("Table 4: embeddings → CVR", [(_short(k), ds.select("table4", "cvr", k, projection=32)) for k in PAPER_TABLE4]),
    ]
    for ax, (title, bars) in zip(axes, panels):
        bars = [(n, rs) for n, rs in bars if rs]
        means = [mean_std(ds.lifts(rs, "roc_auc")) for _, rs in bars]
        ax.bar(range(len(bars)), [m for m, _ in means], yerr=[s for _, s in means], capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(bars)), [n for n, _ in bars], rotation=30, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("ROC-AUC lift over baseline (%)")
    fig.suptitle(f"{ds.name}: DERM lifts (mean ± std over {len(ds.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(out / f"{_slug(ds.name)}-lifts.png", dpi=110)
    plt.close(fig)

    rows = _projection_rows(ds)
    if len(rows) < 2:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = list(range(len(rows)))
    lift = [mean_std(ds.lifts(rs, "roc_auc")) for _, rs in rows]
    ax.errorbar(xs, [m for m, _ in lift], yerr=[s for _, s in lift], marker="o", capsize=4, color="#4c72b0")
    ax.set_xticks(xs, ["none" if w == 0 else str(w) for w, _ in rows])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("projection width per DERM embedding")
    ax.set_ylabel("CTR ROC-AUC lift over baseline (%)")
    ax.set_title(f"{ds.name}: Appendix D.1, projection layer")
    fig.tight_layout()
    fig.savefig(out / f"{_slug(ds.name)}-projection.png", dpi=110)
    plt.close(fig)


def _curve_plot(ds: Dataset, out: Path, plt) -> None:
    """Validation ROC-AUC after each training day, CTR and CVR side by side, mean ± std over seeds."""
    cols = _curve_series(ds)
    if not cols:
        return
    progressive = _next_day_series(ds)
    fig, axes = plt.subplots(2 if progressive else 1, 2, figsize=(12, 8.4 if progressive else 4.2), squeeze=False)
    for ax, kind in zip(axes[0], ("ctr", "cvr")):
        for name, rs in cols:
            if rs[0]["kind"] != kind:
                continue
            label = ds.label[kind]
            points = _curve_points(rs, lambda p: p["validation"][label])
            xs = [p["examples"] for p in rs[0]["curve"]]
            ms = [mean_std(p) for p in points]
            ax.errorbar(xs, [m for m, _ in ms], yerr=[sd for _, sd in ms], marker="o", capsize=3, label=name)
        ax.set_xlabel("examples trained on")
        ax.set_ylabel(f"validation ROC-AUC ({ds.label.get(kind)})")
        ax.set_title(f"downstream {kind.upper()}", fontsize=10)
        ax.legend(fontsize=7)
    for ax, kind in zip(axes[1] if progressive else (), ("ctr", "cvr")):
        for name, rs in progressive:
            if rs[0]["kind"] != kind:
                continue
            points = _next_day_points(ds, rs)
            gap = any(_gaps(metrics) for _, metrics in points)
            xs, ms = [], []
            for p, metrics in points:
                values = _gaps(metrics) if gap else [m["roc_auc"] for m in metrics]
                if values:
                    xs.append(p["examples"])
                    ms.append(mean_std(values))
            ax.errorbar(xs, [m for m, _ in ms], yerr=[sd for _, sd in ms], marker="o", capsize=3, label=name)
            ax.set_ylabel(f"next day: oracle − model ROC-AUC ({ds.label.get(kind)})" if gap else
                          f"next-day ROC-AUC ({ds.label.get(kind)})")
        ax.set_xlabel("examples trained on")
        ax.set_title(f"downstream {kind.upper()}: the next day, before training on it", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"{ds.name}: learning curves (mean ± std over {len(ds.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(out / f"{_slug(ds.name)}-curve.png", dpi=110)
    plt.close(fig)


def _short(derm: tuple[str, ...]) -> str:
    return "+".join(f.replace("_user", " u").replace("_pin", " i") for f in derm)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="experiments/report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="results.jsonl files of experiments/lift.py")
    p.add_argument("--out", type=Path, default=Path("docs/experiments"), help="folder of report.md and the PNGs")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.results if not r.is_file()]
    if missing:
        print(f"error: no such results file: {', '.join(missing)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    datasets = {title: Dataset(title, rows) for title, rows in load(args.results).items()}
    text = report(datasets, args.out)
    (args.out / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
