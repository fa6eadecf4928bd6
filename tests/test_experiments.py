"""The lift experiments (experiments/lift.py) and their report (experiments/report.py): a smoke run
on the tiny world end to end, resuming without redoing cells; and the report's statistics — each
lift against the same seed's baseline, mean ± sample std over seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import lift, probe, report

REPO = Path(__file__).resolve().parents[1]


def _row(seed: int, table: str, kind: str, derm: tuple[str, ...], roc: float, pr: float, projection: int = 32, pool: str = "ma0.9"):
    label = "click" if kind == "ctr" else "conversion"
    return {"dataset": "small", "seed": seed, "cell": f"{table}-{kind}-{'+'.join(derm)}-{pool}-p{projection}", "table": table,
            "kind": kind, "derm": list(derm), "pool": pool, "projection_dim": projection, "train_examples_per_s": 1000.0,
            "input_width": 100, "metrics": {label: {"roc_auc": roc, "pr_auc": pr, "oracle_roc_auc": 0.8}}}


def test_lifts_pair_each_cell_with_its_own_seeds_baseline(tmp_path):
    rows = [
        _row(0, "baseline", "ctr", (), 0.60, 0.10), _row(1, "baseline", "ctr", (), 0.50, 0.20),
        _row(0, "table2", "ctr", ("ctr_user",), 0.66, 0.11), _row(1, "table2", "ctr", ("ctr_user",), 0.55, 0.22),
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ds,) = [report.Dataset("small", rs) for rs in report.load([path]).values()]
    cell = ds.select("table2", "ctr", ("ctr_user",))
    assert ds.lifts(cell, "roc_auc") == pytest.approx([10.0, 10.0])  # 0.66/0.60 and 0.55/0.50, not across seeds
    assert report.fmt([10.0, 10.0]) == "+10.00 ± 0.00" and report.fmt([1.0, 3.0]) == "+2.00 ± 1.41"
    text = "\n".join(report._table_subsets(ds, "table2", "ctr", report.PAPER_TABLE2, "Table 2"))
    assert "| ✓ | ✗ | ✗ | ✗ | +10.00 ± 0.00 | +10.00 ± 0.00 |" in text and "oracle ROC-AUC 0.8000" in text


def test_rows_of_another_protocol_are_reported_apart(tmp_path):
    single_day = [_row(0, "baseline", "ctr", (), 0.60, 0.10)]  # written before protocol files: one training day
    full = [{**_row(0, "baseline", "ctr", (), 0.62, 0.12), "protocol": "small", "upstream_steps_per_day_override": 0}]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in single_day + full))
    sections = report.load([path])
    assert list(sections) == ["synthetic small world, one downstream training day (before protocol files)",
                              "synthetic small world, upstream on full days"]
    assert [r["metrics"]["click"]["roc_auc"] for rows in sections.values() for r in rows] == [0.60, 0.62]
    days = [f"2026-01-0{i}" for i in range(1, 8)]
    assert lift.protocol("small", days, 8).upstream_overrides["train"]["max_steps_per_day"] == 8


def test_too_few_positives_are_reported_as_such_and_left_out_of_lifts(tmp_path):
    rows = [_row(s, "baseline", "ctr", (), 0.60, 0.10) for s in (0, 1)]
    rows += [_row(0, "table2", "ctr", ("ctr_user",), 0.66, 0.11), _row(1, "table2", "ctr", ("ctr_user",), 0.90, 0.5)]
    for r in rows:
        r.update(min_positives=100)
        r["metrics"]["click"]["positives"] = 40 if (r["seed"], r["table"]) == (1, "table2") else 500
    ds = report.Dataset("small", rows)
    cell = ds.select("table2", "ctr", ("ctr_user",))
    assert ds.lifts(cell, "roc_auc") == pytest.approx([10.0])  # seed 1: 40 positives, no lift
    assert ds.too_few(cell[1]) == 40 and ds.too_few(cell[0]) is None
    assert ds.gap_closed(cell) == pytest.approx([30.0])  # (0.66 - 0.60) / (0.80 - 0.60)
    assert "too few positives (40)" in "\n".join(report._table_subsets(ds, "table2", "ctr", report.PAPER_TABLE2, "Table 2"))


def test_a_run_of_baselines_alone_reports_their_table_and_no_lifts(tmp_path):
    rows = [_row(0, "baseline", "ctr", (), 0.60, 0.10), _row(0, "baseline", "cvr", (), 0.55, 0.05)]
    for r in rows:
        r.update(protocol="small", train_days=["2026-01-02"], validation_days=["2026-01-03"], test_days=["2026-01-04"],
                 train_examples=2048, train_steps=1, tuning=[{"dense_lr": 1e-3}])
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "docs" / "experiments" / "longer"
    assert report.main([str(path), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| ctr | click | 0.6000 (n=1) |" in text  # one seed: no spread to show
    assert "Tuning grid (dense learning rate, every cell alike: 0.001)" in text  # rows from before the sparse rate
    assert "The lift, paired by seed" not in text and "-lifts.png" not in text
    assert not list(out.glob("*-lifts.png"))
    # the link to the discussion is relative to the report's own folder
    link = os.path.relpath(REPO / "docs" / "experiments.md", out)
    assert f"[{link}]({link})" in text


def test_the_next_day_curve_reports_each_days_gap_to_the_oracle():
    steps = (("2026-01-02", "2026-01-03"), ("2026-01-03", "2026-01-04"), ("2026-01-04", "2026-01-05"))  # 05: validation
    rows = []
    for seed, auc in ((0, 0.60), (1, 0.62)):
        row = {**_row(seed, "baseline", "ctr", (), auc, 0.10), "validation_days": ["2026-01-05"], "min_positives": 100}
        row["curve"] = [{"day": d, "examples": 2048 * (i + 1), "validation": {"click": auc},
                         "next_day": {"day": ahead, "click": {"roc_auc": auc + i / 100, "oracle_roc_auc": 0.8, "positives": 500}}}
                        for i, (d, ahead) in enumerate(steps)]
        rows.append(row)
    text = "\n".join(report._curve(report.Dataset("small", rows)))
    assert "| 2026-01-03 | 0.6100 ± 0.0141; gap 0.1900 |" in text and "| 2026-01-04 | 0.6200 ± 0.0141; gap 0.1800 |" in text
    derm = []
    for seed, factor in ((0, 1.10), (1, 1.20)):  # 10 % and 20 % above the same seed's baseline, every day
        row = {**_row(seed, "table2", "ctr", lift.ALL4, 0.7, 0.1), "validation_days": ["2026-01-05"], "min_positives": 100,
               "curve": json.loads(json.dumps(rows[seed]["curve"]))}
        for point in row["curve"]:
            point["next_day"]["click"]["roc_auc"] *= factor
        derm.append(row)
    # the second half of the next days, leaving out the validation day: 2026-01-04 alone
    text = "\n".join(report._curve(report.Dataset("small", rows + derm)))
    assert "| CTR, all four embeddings | 2026-01-04 .. 2026-01-04 (1 day) | +15.00 ± 7.07 |" in text
    # a day with too few positives, or one class only (NaN), is left out of the table and the lifts
    rows[0]["curve"][0]["next_day"]["click"]["positives"] = 40
    rows[1]["curve"][0]["next_day"]["click"]["roc_auc"] = float("nan")
    derm[0]["curve"][1]["next_day"]["click"]["roc_auc"] = float("nan")
    text = "\n".join(report._curve(report.Dataset("small", rows + derm)))
    assert "| 2026-01-03 | – | 0.7020 ± 0.0594; gap 0.0980 |" in text  # the baselines: one left out, one NaN
    assert "| CTR, all four embeddings | 2026-01-04 .. 2026-01-04 (1 day) | +20.00 (n=1) |" in text
    for r in rows + derm:  # rows made before the next-day curve: no such table
        for point in r["curve"]:
            del point["next_day"]
    assert "Next-day" not in "\n".join(report._curve(report.Dataset("small", rows + derm)))


def test_every_paper_cell_is_planned_once():
    cells = lift.cells()
    names = [c.name for c in cells]
    assert len(names) == len(set(names)) == 27
    assert [c.table for c in cells[:2]] == ["baseline", "baseline"]
    assert {c.derm for c in cells if c.table == "table2"} == set(report.PAPER_TABLE2)
    assert {c.derm for c in cells if c.table == "table4"} == set(report.PAPER_TABLE4)
    assert sorted(c.pool for c in cells if c.table == "table1") == sorted(lift.TABLE1_POOLS)
    assert all(c.similarity for c in cells if c.table == "similarity") and not any(c.similarity for c in cells if c.table != "similarity")


def test_validation_and_test_days_are_kept_apart_and_read_published_versions(tmp_path):
    days = [f"2026-01-0{i}" for i in range(1, 8)]
    p = lift.protocol("small", days)
    assert p.train_days == days[1:5] and p.validation_days == ["2026-01-06"] and p.test_days == ["2026-01-07"]
    assert p.upstream_days == p.embed_days == days[:-1]
    ml_days = [f"1998-03-{i:02d}" for i in range(1, 32)] + [f"1998-04-{i:02d}" for i in range(1, 23)]
    for name, all_days in (("small", days), ("movielens", ml_days)):
        p = lift.protocol(name, all_days)
        assert max(p.train_days) < min(p.validation_days) and max(p.validation_days) < min(p.test_days)
        previous = {d: all_days[all_days.index(d) - 1] for d in p.train_days + p.validation_days + p.test_days}
        assert set(previous.values()) <= set(p.embed_days)  # every row's day d - 1 has a published version
        assert set(p.embed_days) <= set(p.upstream_days)  # embedded right after the upstream trained that day
    bad = tmp_path / "bad.toml"
    bad.write_text((lift.PROTOCOLS / "small.toml").read_text().replace('validation = "-2:-1"', 'validation = "-3:-1"'))
    with pytest.raises(ValueError, match="train days must precede validation days"):
        lift.load_protocol(bad, days)
    bad.write_text((lift.PROTOCOLS / "small.toml").read_text().replace('train = "1:-2"', 'train = "one"'))
    with pytest.raises(ValueError, match="'one' is not a slice"):
        lift.load_protocol(bad, days)


def test_the_tuning_grid_pairs_every_dense_with_every_sparse_learning_rate(tmp_path):
    from sharding.config import OptimizerConfig

    days = [f"2026-01-0{i}" for i in range(1, 8)]
    grid = tmp_path / "grid.toml"
    text = (lift.PROTOCOLS / "tiny.toml").read_text()
    grid.write_text(text.replace("dense_lr = [1e-3]", "dense_lr = [1e-3, 3e-3]\nsparse_lr = [0.05, 0.2]"))
    assert lift.load_protocol(grid, days).grid == [(1e-3, 0.05), (1e-3, 0.2), (3e-3, 0.05), (3e-3, 0.2)]
    assert lift.protocol("tiny", days).grid == [(1e-3, OptimizerConfig.sparse_lr)]  # unset: the optimizer's default
    # progressive validation: each training day, then the next one before it is trained; the last, the first validation day
    assert lift.protocol("small", days).next_days == [(days[i], days[i + 1]) for i in range(1, 5)]
    ml_days = [f"1998-03-{i:02d}" for i in range(1, 32)] + [f"1998-04-{i:02d}" for i in range(1, 23)]
    p = lift.protocol("movielens", ml_days)
    assert p.next_days[-1] == (p.train_days[-1], p.validation_days[0]) and len(p.validation_days) > 1
    rows = [{**_row(0, "baseline", "ctr", (), 0.60, 0.10), "protocol": "grid", "train_days": days[1:5], "validation_days": days[5:6],
             "test_days": days[6:], "train_examples": 2048, "train_steps": 1,
             "tuning": [{"dense_lr": d, "sparse_lr": s, "validation_roc_auc": 0.6} for d, s in lift.load_protocol(grid, days).grid]}]
    assert ("Tuning grid (dense / sparse learning rate, every cell alike: 0.001 / 0.05, 0.001 / 0.2, 0.003 / 0.05, 0.003 / 0.2)"
            in "\n".join(report._protocol(report.Dataset("small", rows))))


@pytest.mark.slow
def test_smoke_run_on_the_tiny_world_resumes_and_reports(tiny_world_4, tmp_path):
    out = tmp_path / "lift"
    cmd = [sys.executable, "experiments/lift.py", "--dataset", "tiny", "--data", str(tiny_world_4), "--seeds", "0",
           "--out", str(out), "--cells", "baseline,appendix_d"]
    # the baselines first, alone: they read no embedding, so no upstream model is trained for them
    subprocess.run([*cmd[:-1], "baseline"], cwd=REPO, check=True, capture_output=True, timeout=600)
    assert not (out / "seed=0" / "upstream.json").exists()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["table"] for r in rows] == ["baseline"] * 2 + ["appendix_d"] * 4
    assert all(0.0 <= next(iter(r["metrics"].values()))["roc_auc"] <= 1.0 for r in rows)
    # train on day 2, choose on day 3, report day 4; the learning curve has a point per training day
    assert {(tuple(r["train_days"]), tuple(r["validation_days"]), tuple(r["test_days"])) for r in rows} == {
        (("2026-01-02",), ("2026-01-03",), ("2026-01-04",))}
    assert all(len(r["curve"]) == 1 and r["train_examples"] > 0 for r in rows)
    # the progressive curve: after the one training day, its next day (the validation day), with counts
    label = next(iter(rows[0]["metrics"]))
    assert rows[0]["curve"][0]["next_day"]["day"] == "2026-01-03"
    assert set(rows[0]["curve"][0]["next_day"][label]) == set(lift.NEXT_DAY_METRICS)
    assert rows[0]["curve"][0]["next_day"][label]["roc_auc"] == rows[0]["curve"][0]["validation"][label]
    assert rows[0]["coverage"] is None and 0.5 < rows[2]["coverage"]["test"]["ctr_user"] <= 1.0
    width = {r["projection_dim"]: r["input_width"] for r in rows if r["table"] == "appendix_d"}
    # the MoE's input width F grows by 4 x the projection width (none: 4 x (64 + 1) unprojected)
    assert {p: width[p] - width[8] for p in (0, 16, 64)} == {0: 4 * 65 - 32, 16: 32, 64: 4 * 56}
    assert (out / "seed=0" / "upstream.json").is_file()

    again = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    assert len((out / "results.jsonl").read_text().splitlines()) == 6  # nothing redone
    assert "cell" not in again.stderr

    subprocess.run([sys.executable, "experiments/report.py", str(out / "results.jsonl"), "--out", str(tmp_path / "rep")],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "### Appendix D.1" in text and "| none | 260 |" in text  # 4 x (64 + 1) unprojected
    assert "### Learning curve" in text and "### Next-day ROC-AUC" in text
    assert (tmp_path / "rep" / "synthetic-tiny-world-projection.png").stat().st_size > 10_000

    days = sorted(p.name[4:] for p in (tiny_world_4 / "ctr").glob("day=*"))
    probe = subprocess.run([sys.executable, "experiments/probe.py", "--data", str(tiny_world_4), "--stores",
                            str(out / "seed=0" / "store" / "ma0.9"), "--day", days[-2]],
                           cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
    assert "| ctr_user · ctr_pin |" in probe.stdout and f"alone on {days[-1]}: 0." in probe.stdout


def test_a_seed_folder_made_under_another_protocol_is_refused(tiny_world_4, tmp_path):
    exp = lift.Experiment("tiny", tiny_world_4, tmp_path, 0, ctx=None)
    (tmp_path / "seed=0").mkdir()
    (tmp_path / "seed=0" / "upstream.json").write_text(json.dumps({**exp.upstream_settings(), "upstream_steps_per_day": 0,
                                                                   "embed": "back"}))
    with pytest.raises(SystemExit, match=r"other settings \(embed, upstream_steps_per_day: \['back', 0\], not \['daily', 8\]\)"):
        lift.Experiment("tiny", tiny_world_4, tmp_path, 0, ctx=None)
    lift.Experiment("tiny", tiny_world_4, tmp_path, 0, ctx=None, upstream_steps_per_day=0, embed="back")  # the same: fine


def test_rank_auc_is_the_mann_whitney_statistic():
    labels = np.array([0, 1, 0, 1, 1])
    assert probe.rank_auc(labels, labels * 1.0) == 1.0 and probe.rank_auc(labels, -labels * 1.0) == 0.0
    # positives at ranks 5, 2 and 4 of 5, 2 negatives: (11 - 3 * 4 / 2) / (3 * 2)
    assert probe.rank_auc(labels, np.array([0.3, 0.9, 0.1, 0.2, 0.5])) == pytest.approx(5 / 6)


def test_quality_table_keeps_every_seed_and_the_oracle_bounds_recall(tiny_world):
    from experiments.quality import oracle_recall, table

    rows = [{"variant": "a", "seed": s, "auc": 0.6 + 0.01 * s, "recall_at_100": 0.4} for s in range(3)]
    rows.append({"variant": "b", "seed": 0, "auc": 0.7})
    lines = table(rows, ["a", "b"]).splitlines()
    assert lines[2].startswith("| a | 3 | 0.610 ± 0.010 |") and lines[3].startswith("| b | 1 | 0.700 |")
    assert "–" in lines[3]  # b has no recall: shown as missing, not as 0
    # The world's own ranking finds most next-day clicks among its top Pins, and not all at k = 1.
    assert 0.0 < oracle_recall(tiny_world, "2026-01-03", k=1) < oracle_recall(tiny_world, "2026-01-03", k=50) <= 1.0


def test_quality_keeps_only_a_finished_runs_last_snapshot(tmp_path):
    from experiments.quality import _keep_last_snapshot

    for day in ("2026-01-01", "2026-01-02", "2026-01-03"):
        (tmp_path / f"day={day}").mkdir()
        (tmp_path / f"day={day}" / "meta.json").write_text("{}")
    (tmp_path / "partial").mkdir()
    _keep_last_snapshot(tmp_path / "day=2026-01-03")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day=2026-01-03", "partial"]


def test_intent_reference_bounds_the_planted_correlation(tiny_world, tmp_path, capsys):
    """The ceiling of ``corr planted``: a click's user x Pin log-odds is 4 x the planted affinity,
    so its ceiling is about 1; a conversion's also holds the click affinity, so its ceiling is
    high but below 1. The MF reference reports one figure per pass and writes its JSON line."""
    from experiments.intent_reference import ceiling, main

    assert ceiling(tiny_world, "ctr", "click", "2026-01-03") > 0.95
    assert 0.5 < ceiling(tiny_world, "cvr", "conversion", "2026-01-03") < 0.99
    out = tmp_path / "ref.jsonl"
    assert main(["--data", str(tiny_world), "--days", "2026-01-01,2026-01-02", "--eval-day", "2026-01-03", "--passes", "2",
                 "--seeds", "0,1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [len(r["corr_by_pass"]) for r in result["runs"]] == [2, 2] and result["label"] == "conversion"
    assert all(-1.0 <= c <= 1.0 for r in result["runs"] for c in r["corr_by_pass"])
    assert "| corr planted (2 seeds) |" in capsys.readouterr().out
    # The other references: the dense features through the in-batch softmax on unit vectors, and
    # the id MF under the tables' row-wise Adagrad; one figure per pass each.
    common = ["--data", str(tiny_world), "--days", "2026-01-01,2026-01-02", "--eval-day", "2026-01-03", "--passes", "1",
              "--seeds", "0", "--out", str(out)]
    assert main([*common, "--source", "ctr", "--model", "dense", "--loss", "softmax", "--normalize"]) == 0
    assert main([*common, "--optimizer", "rowwise_adagrad", "--lr", "0.05"]) == 0
    dense, adagrad = (json.loads(line) for line in out.read_text().splitlines()[1:])
    assert (dense["model"], dense["loss"], dense["normalize"], dense["label"]) == ("dense", "softmax", True, "click")
    assert adagrad["optimizer"] == "rowwise_adagrad" and len(adagrad["runs"][0]["corr_by_pass"]) == 1
    assert all(-1.0 <= r["corr_by_pass"][0] <= 1.0 for r in (*dense["runs"], *adagrad["runs"]))
    with pytest.raises(SystemExit):  # row-wise Adagrad is for id tables
        main([*common, "--model", "dense", "--optimizer", "rowwise_adagrad"])
