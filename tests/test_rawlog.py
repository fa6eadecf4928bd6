"""Raw logs into the input contract (data/rawlog.py): an impression log with real negatives
(CSV) and a log of views and buys without impressions (JSON lines, times in ms), generated here
in the shapes of real logs; then the loader reads them, and the whole pipeline runs on one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from data.loader import EventLog, make_loader
from data.rawlog import Label, RawLogError, main

DAY0 = 1_767_225_600  # 2026-01-01 00:00:00 UTC
DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]


def impression_log(path: Path, users: int = 60, items: int = 25, per_day: int = 600, seed: int = 0) -> pa.Table:
    """Impressions with string keys, clicks more likely when user and item share a taste."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(len(DAYS)):
        u, i = rng.integers(0, users, per_day), rng.integers(0, items, per_day)
        t = np.sort(DAY0 + d * 86_400 + rng.integers(0, 86_400, per_day))
        click = (rng.random(per_day) < np.where(u % 5 == i % 5, 0.5, 0.05)).astype(np.int8)
        rows.append(pa.table({"user": [f"u{x}" for x in u], "ad": [f"ad{x}" for x in i], "ts": t, "click": click}))
    table = pa.concat_tables(rows)
    pacsv.write_csv(table, path)
    return table


def event_log(path: Path, users: int = 60, items: int = 40, per_day: int = 500, seed: int = 1) -> list[dict]:
    """Views and buys (no impressions), times in milliseconds, as a shop's event export has them."""
    rng = np.random.default_rng(seed)
    events = []
    for d in range(len(DAYS)):
        for _ in range(per_day):
            u, i = int(rng.integers(0, users)), int(rng.integers(0, items))
            ms = (DAY0 + d * 86_400) * 1000 + int(rng.integers(0, 86_400_000))
            events.append({"visitor": u, "product": 1000 + i, "ts": ms, "event": "transaction" if rng.random() < 0.1 else "view"})
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return events


def test_an_impression_log_keeps_every_row_and_builds_features_from_earlier_days(tmp_path):
    raw = impression_log(tmp_path / "clicks.csv")
    out = tmp_path / "data"
    assert main(["--input", str(tmp_path / "clicks.csv"), "--out", str(out), "--user", "user", "--item", "ad",
                 "--time", "ts", "--labels", "click"]) == 0
    log = EventLog(out, "ctr")  # the loader's checks, the UTC-day one included, pass
    assert log.days == DAYS and log.num_rows == raw.num_rows
    table = pq.read_table(out / "ctr").sort_by([("event_time", "ascending")])
    users = dict(zip(*(pq.read_table(out / "ids" / "user.parquet")[c].to_pylist() for c in ("raw", "id"))))
    items = dict(zip(*(pq.read_table(out / "ids" / "item.parquet")[c].to_pylist() for c in ("raw", "id"))))
    assert sorted(users) == sorted(set(raw["user"].to_pylist())) and sorted(users.values()) == list(range(len(users)))
    assert table["click"].to_numpy().sum() == raw["click"].to_numpy().sum()
    # as of the start of the day: a user's sequence holds only items clicked on earlier days, and
    # its 1-day counters are the day before's
    t, uid, seq = table["event_time"].to_numpy(), table["user_id"].to_numpy(), table["seq_item_ids"].to_pylist()
    r_t, r_user, r_item, r_click = (raw[c].to_numpy(zero_copy_only=False) for c in ("ts", "user", "ad", "click"))
    for row in np.flatnonzero(t >= DAY0 + 2 * 86_400)[:50]:
        user = [k for k, v in users.items() if v == uid[row]][0]
        earlier = {items[a] for a, tt, c, uu in zip(r_item, r_t, r_click, r_user) if uu == user and c and tt < DAY0 + 2 * 86_400}
        assert set(seq[row]) <= earlier
        day1 = int(((r_user == user) & (r_t >= DAY0 + 86_400) & (r_t < DAY0 + 2 * 86_400)).sum())
        assert table["user_events_1d"][int(row)].as_py() == day1
    first_day = t < DAY0 + 86_400
    assert all(len(s) == 0 for s, f in zip(seq, first_day) if f) and table["user_events_1d"].to_numpy()[first_day].sum() == 0
    batch = next(iter(make_loader(out, "ctr", batch_size=64)))
    assert batch.labels.shape == (64, 1) and "user_seq" in batch.sequence.keys()


def test_a_log_without_impressions_gets_sampled_negatives_with_their_probability(tmp_path):
    events = event_log(tmp_path / "events.jsonl")
    out = tmp_path / "shop"
    assert main(["--input", str(tmp_path / "events.jsonl"), "--out", str(out), "--source", "cvr", "--user", "visitor",
                 "--item", "product", "--time", "ts", "--time-unit", "ms", "--labels", "view=1", "buy=event==transaction",
                 "--negatives", "2"]) == 0
    table = pq.read_table(out / "cvr")
    logged = np.isnan(table["sample_prob"].to_numpy(zero_copy_only=False))
    assert logged.sum() == len(events) and (~logged).sum() == 2 * len(events)  # every event is a view
    assert table["buy"].to_numpy()[logged].sum() == sum(e["event"] == "transaction" for e in events)
    neg = ~logged
    assert table["view"].to_numpy()[neg].sum() == 0 and table["buy"].to_numpy()[neg].sum() == 0
    p = table["sample_prob"].to_numpy(zero_copy_only=False)[neg]
    assert np.all((p > 0) & (p <= 1))
    # a negative is never an item its user viewed that day
    day = table["event_time"].to_numpy() // 86_400
    viewed = set(zip(table["user_id"].to_numpy()[logged], table["pin_id"].to_numpy()[logged], day[logged]))
    assert not viewed & set(zip(table["user_id"].to_numpy()[neg], table["pin_id"].to_numpy()[neg], day[neg]))
    assert EventLog(out, "cvr").days == DAYS


def test_history_keeps_each_users_last_positives_newest_first_as_a_queue_would():
    """The vectorised sequences against a per-row reference (a bounded deque per user), over
    days with repeated users, users with more positives in a day than the sequence holds, new
    users appearing later and days without positives."""
    import collections

    from data.rawlog import History

    rng = np.random.default_rng(0)
    for seq_len in (0, 1, 3, 8):
        history, reference = History(seq_len), collections.defaultdict(lambda: collections.deque(maxlen=seq_len))
        n_users = 0
        for d in range(6):
            n_users += int(rng.integers(0, 20))
            n = int(rng.integers(0, 200)) if n_users else 0
            users, items = rng.integers(0, max(n_users, 1), n), rng.integers(0, 50, n)
            positive = rng.random(n) < (0.0 if d == 3 else 0.4)
            got = history.features(users, items)["seq_item_ids"].to_pylist()
            assert got == [list(reversed(reference[int(u)])) for u in users]
            history.end_of_day(f"2026-01-0{d + 1}", users, items, positive, n_users, 50)
            for u, i in zip(users[positive], items[positive]):
                reference[int(u)].append(int(i))


def test_sampled_negatives_are_distinct_drawable_not_excluded_and_carry_their_probability():
    """The sampler MovieLens and raw logs share: never an item of weight 0 or an excluded pair,
    distinct within a row, drawn in proportion to the weights; a user with too few items left is
    refused by name before any draw."""
    from data.rawlog import sample_negatives

    weights = np.array([0, 1, 2, 3, 4, 0, 10])
    users = np.repeat(np.arange(3), 2000)
    excluded = np.array([0 * 7 + 6, 1 * 7 + 1, 1 * 7 + 5])  # user 0: item 6; user 1: items 1 and 5 (5 has weight 0)
    items, prob = sample_negatives(users, excluded, weights, 3, np.random.default_rng(0))
    assert items.shape == (6000, 3) and not np.isin(items, [0, 5]).any()
    assert all(len(set(row)) == 3 for row in items)
    assert not (items[users == 0] == 6).any() and not (items[users == 1] == 1).any()
    np.testing.assert_allclose(prob, weights[items] / weights.sum())
    # user 2 excludes nothing: the first of its three draws follows the weights, about 10/20 for item 6
    assert abs((items[users == 2, 0] == 6).mean() - 0.5) < 0.05
    # five items have weight; user 1's excluded item 5 has none, so it costs user 1 one item, not two
    sample_negatives(users[users == 1], excluded, weights, 4, np.random.default_rng(0))
    with pytest.raises(RawLogError, match=r"user u1 has only 4 items to draw from .* fewer than the 5 negatives"):
        sample_negatives(users[users > 0], excluded, weights, 5, np.random.default_rng(0), names=np.array(["u0", "u1", "u2"]))
    with pytest.raises(ValueError, match="non-negative integer counts"):
        sample_negatives(users, excluded, weights * 0.5, 1, np.random.default_rng(0))


def test_iso_times_are_read_in_their_time_zone_and_partitioned_by_utc_day(tmp_path, capsys):
    path = tmp_path / "la.csv"
    iso = ["--input", str(path), "--time", "time", "--time-unit", "iso", "--user", "user", "--item", "item",
           "--labels", "click", "--tz", "America/Los_Angeles"]
    path.write_text("user,item,time,click\na,x,2026-01-01T23:30:00,1\nb,y,2026-01-01T10:00:00,0\nc,z,2026-01-02T01:00:00Z,1\n")
    assert main([*iso, "--out", str(tmp_path / "mixed")]) == 2
    assert "mixes times with and without a UTC offset" in capsys.readouterr().err
    path.write_text("user,item,time,click\na,x,2026-01-01T23:30:00,1\nb,y,2026-01-01T10:00:00,0\n")
    assert main([*iso, "--out", str(tmp_path / "o")]) == 0
    # 23:30 in Los Angeles is 07:30 UTC the next day; 10:00 is 18:00 UTC the same day
    assert EventLog(tmp_path / "o", "ctr").days == ["2026-01-01", "2026-01-02"]


def test_bad_input_names_the_file_column_and_problem(tmp_path, capsys):
    impression_log(tmp_path / "clicks.csv")
    base = ["--input", str(tmp_path / "clicks.csv"), "--user", "user", "--item", "ad", "--time", "ts"]
    assert main([*base, "--out", str(tmp_path / "a"), "--labels", "clicked"]) == 2
    assert "clicks.csv: missing column(s) ['clicked']" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # nothing half-written
    event_log(tmp_path / "events.jsonl")  # times in ms, read as seconds
    assert main(["--input", str(tmp_path / "events.jsonl"), "--out", str(tmp_path / "b"), "--user", "visitor", "--item",
                 "product", "--time", "ts", "--labels", "view=1"]) == 2
    assert "times outside 1970..2100" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("user,ad,ts,click\nu1,a1,1767225600,2\n")
    assert main(["--input", str(bad), "--out", str(tmp_path / "c"), "--user", "user", "--item", "ad", "--time", "ts",
                 "--labels", "click"]) == 2
    assert "bad.csv row 1: column 'click' (label 'click') must be 0 or 1; it has 2" in capsys.readouterr().err
    with pytest.raises(RawLogError, match="expected NAME, NAME=COLUMN==VALUE or NAME=1"):
        Label.parse("buy=event")


@pytest.mark.slow
def test_a_view_and_buy_log_runs_through_the_whole_pipeline(tmp_path, in_repo):
    """The shop's export → rawlog → the daily pipeline as TorchX jobs, with nothing else written by
    hand: one source, its two embeddings, a downstream model and its baseline."""
    from pipeline.driver import Pipeline, PipelineConfig

    event_log(tmp_path / "events.jsonl")
    data = tmp_path / "shop"
    assert main(["--input", str(tmp_path / "events.jsonl"), "--out", str(data), "--source", "shop", "--user", "visitor",
                 "--item", "product", "--time", "ts", "--time-unit", "ms", "--labels", "view=1", "buy=event==transaction",
                 "--negatives", "2"]) == 0
    fast = ("--train.max_steps_per_day=3", "--data.batch_size=256")
    config = PipelineConfig(data=str(data), work=str(tmp_path / "work"), synthetic_preset="", days=tuple(DAYS[:2]),
                            downstream_kinds={"shop": "cvr"}, upstream_overrides=fast, downstream_overrides=fast)
    results = Pipeline(config).run()
    assert results["sources"] == ["shop"] and results["derm"] == ["shop_user", "shop_pin"]
    rows = {r["label"]: r for r in results["rows"]}
    assert set(rows) == {"view", "buy"} and all(r["kind"] == "cvr" and r["eval_day"] == DAYS[2] for r in rows.values())
    assert rows["view"]["roc_auc"] is not None and rows["view"]["coverage"]["shop_user"] > 0.5
    assert rows["buy"]["too_few_positives"]  # about 50 buys a day: fewer than min_positives
