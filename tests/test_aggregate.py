"""Aggregation of daily embeddings into the pool (embeddings/aggregate.py and its modules).

The hand example (3 entities, E = 2, 3 days; α = 0.75 so every MA value is exact in float32):

    day          entity 1   entity 2   entity 3
    2026-01-01   [1, 0]     [0, 2]     -
    2026-01-02   [0, 1]     -          [3, 3]
    2026-01-03   [1, 1]     [2, 0]     -
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embeddings.aggregate import InputError, PoolError, aggregate_day, finalize_day, read_pool
from embeddings.buckets import bucket_of, splitmix64
from embeddings.heuristics import Heuristic
from embeddings.pool import bucket_file, pool_days, snapshot_dir
from embeddings.quality import cosine_rows

ROOT = Path(__file__).resolve().parents[1]
D1, D2, D3 = "2026-01-01", "2026-01-02", "2026-01-03"
HAND = {
    D1: {1: [1, 0], 2: [0, 2]},
    D2: {1: [0, 1], 3: [3, 3]},
    D3: {1: [1, 1], 2: [2, 0]},
}


def write_day(emb_root: Path, day: str, rows: dict, *, part: int = 0, event_time=None, emb_type=None, row_group_size=None,
              source="ctr", entity="user"):
    """Writes ``{id: vector}`` as one part file of the day's partition."""
    path = emb_root / source / entity / f"day={day}"
    path.mkdir(parents=True, exist_ok=True)
    ids = list(rows)
    vectors = [rows[i] for i in ids]
    dim = len(vectors[0]) if vectors else 2
    emb = pa.array(vectors, type=emb_type or pa.list_(pa.float32(), dim))
    times = event_time if event_time is not None else [1000 + i for i in range(len(ids))]
    table = pa.table({"entity_id": pa.array(ids, pa.int64()), "embedding": emb, "event_time": pa.array(times, pa.int64())})
    pq.write_table(table, path / f"part-{part:05d}.parquet", row_group_size=row_group_size)
    return path / f"part-{part:05d}.parquet"


def pool_dict(pool_root: Path, day: str, column: str = "embedding", source="ctr", entity="user") -> dict:
    t = read_pool(pool_root, source, entity, day)
    return dict(zip(t.column("entity_id").to_pylist(), t.column(column).to_pylist()))


def tree(root: Path) -> dict:
    """Every file under root: (mtime_ns, bytes)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def hand(tmp_path):
    emb = tmp_path / "emb"
    for day, rows in HAND.items():
        write_day(emb, day, rows)
    return emb, tmp_path / "pool"


def apply_days(emb, pool, days, method="ma", alpha=0.75, **kw):
    return [aggregate_day(emb, pool, "ctr", "user", d, method, alpha, num_buckets=kw.pop("num_buckets", 4), **kw) for d in days]


# ---- hashing -----------------------------------------------------------------------------------


def _splitmix64_python(x: int) -> int:
    """The reference algorithm in Python integers."""
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_splitmix64_matches_reference_and_buckets_are_stable():
    # The reference generator seeded with 0 outputs mix(1·γ), mix(2·γ): ids 0 and γ here.
    assert int(splitmix64(np.array([0]))[0]) == 0xE220A8397B1DCDAF
    assert int(splitmix64(np.array([0x9E3779B97F4A7C15 - (1 << 64)]))[0]) == 0x6E789E6AA1B965F4
    ids = [0, 1, 2, 3, -1, 1 << 62, -(1 << 63), (1 << 63) - 1, 123456789]
    assert splitmix64(np.array(ids)).tolist() == [_splitmix64_python(x & ((1 << 64) - 1)) for x in ids]
    assert bucket_of(np.array(ids[:6]), 64).tolist() == [47, 1, 14, 45, 32, 43]  # pinned: pools depend on it
    counts = np.bincount(bucket_of(np.arange(64_000), 64), minlength=64)
    assert counts.min() > 850 and counts.max() < 1150  # sequential ids spread evenly


# ---- the heuristics on the hand example --------------------------------------------------------


def test_moving_average_on_hand_example(hand):
    emb, pool = hand
    apply_days(emb, pool, [D1, D2, D3], "ma", 0.75)
    assert pool_dict(pool, D2) == {1: [0.75, 0.25], 2: [0.0, 2.0], 3: [3.0, 3.0]}  # 2 carried, 3 new
    assert pool_dict(pool, D3) == {1: [0.8125, 0.4375], 2: [0.5, 1.5], 3: [3.0, 3.0]}  # 3 carried
    assert pool_dict(pool, D3, "last_daily") == {1: [1.0, 1.0], 2: [2.0, 0.0], 3: [3.0, 3.0]}
    days = {k: v.isoformat() for k, v in pool_dict(pool, D3, "last_day").items()}
    assert days == {1: D3, 2: D3, 3: D2}
    assert {k: v.isoformat() for k, v in pool_dict(pool, D3, "first_day").items()} == {1: D1, 2: D1, 3: D2}
    assert pool_dict(pool, D3, "updates") == {1: 3, 2: 2, 3: 1}


def test_accumulation_and_average_pooling_on_hand_example(hand, tmp_path):
    emb, _ = hand
    apply_days(emb, tmp_path / "acc", [D1, D2, D3], "acc", None)
    assert pool_dict(tmp_path / "acc", D3) == {1: [1.0, 1.0], 2: [2.0, 0.0], 3: [3.0, 3.0]}
    apply_days(emb, tmp_path / "ap", [D1, D2, D3], "ap", None)
    assert pool_dict(tmp_path / "ap", D1) == {1: [1.0, 0.0], 2: [0.0, 2.0]}  # a first daily is used as is
    assert pool_dict(tmp_path / "ap", D2) == {1: [0.5, 0.5], 2: [0.0, 2.0], 3: [3.0, 3.0]}
    # day 3: entity 1 averages days 2 and 3; entity 2 averages days 1 and 3 (its latest two)
    assert pool_dict(tmp_path / "ap", D3) == {1: [0.5, 1.0], 2: [1.0, 1.0], 3: [3.0, 3.0]}


def test_ma_alpha_zero_is_accumulation(hand, tmp_path):
    emb, _ = hand
    apply_days(emb, tmp_path / "ma0", [D1, D2, D3], "ma", 0.0)
    apply_days(emb, tmp_path / "acc", [D1, D2, D3], "acc", None)
    assert pool_dict(tmp_path / "ma0", D3) == pool_dict(tmp_path / "acc", D3)


def test_quality_report_on_hand_example(hand):
    emb, pool = hand
    r1, r2, r3 = apply_days(emb, pool, [D1, D2, D3], "ma", 0.75)
    assert r1["pool_size"] == 2 and r1["new_entities"] == 2 and r1["coverage"] == 0.0
    assert r1["cos_entities"] == 0 and r1["cos_mean"] is None and r1["prev_day"] is None
    assert {k: r2[k] for k in ("pool_size", "prev_pool_size", "daily_entities", "new_entities", "updated_entities",
                               "carried_over", "expired", "coverage", "cos_entities", "prev_day")} == {
        "pool_size": 3, "prev_pool_size": 2, "daily_entities": 2, "new_entities": 1, "updated_entities": 1,
        "carried_over": 1, "expired": 0, "coverage": 0.5, "cos_entities": 2, "prev_day": D1}
    assert r3["pool_size"] == 3 and r3["carried_over"] == 1 and r3["updated_entities"] == 2 and r3["coverage"] == 1.0
    cos = [float(cosine_rows(np.array([a], np.float32), np.array([b], np.float32))[0])
           for a, b in [([0.75, 0.25], [0.8125, 0.4375]), ([0.0, 2.0], [0.5, 1.5])]]
    assert cos[1] == pytest.approx(3 / (2 * np.sqrt(2.5)))
    assert r3["cos_mean"] == pytest.approx((cos[0] + cos[1] + 1.0) / 3, abs=1e-6)  # entity 3 carried: exactly 1
    assert r3["cos_p10"] == pytest.approx(min(cos), abs=1e-4)
    assert r3["cos_updated_mean"] == pytest.approx(np.mean(cos), abs=1e-6)
    assert r3["cos_updated_p10"] == pytest.approx(min(cos), abs=1e-4)
    on_disk = json.loads((snapshot_dir(pool, "ctr", "user", D3) / "report.json").read_text())
    assert on_disk == r3
    assert r3["method"] == "ma" and r3["alpha"] == 0.75 and r3["dim"] == 2 and r3["ttl_days"] == 90


# ---- carry-over and TTL ------------------------------------------------------------------------


def test_ttl_keeps_an_entity_exactly_ttl_days_old_and_drops_it_the_day_after(tmp_path):
    emb, pool = tmp_path / "emb", tmp_path / "pool"
    write_day(emb, "2026-01-01", {1: [1, 0], 2: [0, 1]})
    write_day(emb, "2026-01-03", {1: [1, 1]})  # 2026-01-02 has no partition at all: not a gap
    write_day(emb, "2026-01-04", {1: [1, 2]})
    write_day(emb, "2026-01-05", {2: [5, 5]})
    run = lambda d: aggregate_day(emb, pool, "ctr", "user", d, "acc", ttl_days=2, num_buckets=2)
    run("2026-01-01")
    r = run("2026-01-03")  # entity 2 is 2 days old: kept, carried over unchanged
    assert r["expired"] == 0 and r["carried_over"] == 1 and pool_dict(pool, "2026-01-03")[2] == [0.0, 1.0]
    r = run("2026-01-04")  # 3 days old: dropped
    assert r["expired"] == 1 and r["pool_size"] == 1 and set(pool_dict(pool, "2026-01-04")) == {1}
    r = run("2026-01-05")  # it comes back as a new entity
    assert r["new_entities"] == 1 and r["carried_over"] == 1
    assert pool_dict(pool, "2026-01-05", "first_day")[2].isoformat() == "2026-01-05"
    assert pool_dict(pool, "2026-01-05", "updates")[2] == 1


def test_duplicate_ids_keep_the_latest_event_time(tmp_path, caplog):
    emb, pool = tmp_path / "emb", tmp_path / "pool"
    write_day(emb, D1, {7: [1, 0], 8: [0, 1]}, event_time=[50, 10])
    write_day(emb, D1, {7: [2, 0], 8: [0, 2]}, event_time=[40, 10], part=1)  # 8: a tie, the later file wins
    with caplog.at_level(logging.WARNING, logger="derm.embeddings.aggregate"):
        r = aggregate_day(emb, pool, "ctr", "user", D1, "acc", num_buckets=1)
    assert pool_dict(pool, D1) == {7: [1.0, 0.0], 8: [0.0, 2.0]}
    assert r["daily_rows"] == 4 and r["daily_entities"] == 2 and r["duplicates_dropped"] == 2
    assert "2 duplicate daily rows dropped" in caplog.text


# ---- idempotency and buckets -------------------------------------------------------------------


def test_applying_a_day_again_gives_the_same_snapshot_and_report(hand):
    emb, pool = hand
    _, r2, r3 = apply_days(emb, pool, [D1, D2, D3])
    snap = snapshot_dir(pool, "ctr", "user", D3)
    before = {k: v[1] for k, v in tree(snap).items()}
    assert set(before) == {"_SUCCESS", "report.json"} | {bucket_file(4, b) for b in range(4)}
    assert apply_days(emb, pool, [D3]) == [r3]  # from day 2's pool, not from its own output
    assert {k: v[1] for k, v in tree(snap).items()} == before
    assert apply_days(emb, pool, [D2]) == [r2]  # an earlier day again: later snapshots still valid
    assert pool_days(pool, "ctr", "user") == [D1, D2, D3]
    assert sorted(p.name for p in (pool / "ctr" / "user").iterdir()) == [f"day={d}" for d in (D1, D2, D3)]  # no leftovers


def random_days(emb: Path, n_days: int = 2, n: int = 400, dim: int = 4, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    days = [f"2026-02-0{i + 1}" for i in range(n_days)]
    for i, day in enumerate(days):
        ids = rng.choice(np.arange(i * 100, i * 100 + n), size=n * 3 // 4, replace=False)
        write_day(emb, day, {int(k): rng.standard_normal(dim).astype(np.float32).tolist() for k in ids})
    return days


def test_buckets_computed_by_separate_calls_equal_one_call(tmp_path):
    emb = tmp_path / "emb"
    days = random_days(emb)
    one, split = tmp_path / "one", tmp_path / "split"
    for day in days:
        r_one = aggregate_day(emb, one, "ctr", "user", day, "ma", 0.9, num_buckets=8)
        assert aggregate_day(emb, split, "ctr", "user", day, "ma", 0.9, num_buckets=8, buckets=[5, 1, 3, 7]) is None
        with pytest.raises(PoolError, match="4 of 8 buckets not staged yet"):
            finalize_day(split, "ctr", "user", day)
        aggregate_day(emb, split, "ctr", "user", day, "ma", 0.9, num_buckets=8, buckets=[0, 2, 4, 6])
        assert finalize_day(split, "ctr", "user", day) == r_one
        a, b = (tree(snapshot_dir(p, "ctr", "user", day)) for p in (one, split))
        assert {k: v[1] for k, v in a.items()} == {k: v[1] for k, v in b.items()}
    assert read_pool(one, "ctr", "user").equals(read_pool(split, "ctr", "user"))


def test_each_bucket_holds_only_its_hash_sorted_by_id(tmp_path):
    emb = tmp_path / "emb"
    days = random_days(emb)
    pool = tmp_path / "pool"
    for day in days:
        r = aggregate_day(emb, pool, "ctr", "user", day, "ma", 0.5, num_buckets=8)
    total = 0
    for b in range(8):
        ids = read_pool(pool, "ctr", "user", buckets=[b], columns=["entity_id"]).column("entity_id").to_numpy()
        assert len(ids) and (bucket_of(ids, 8) == b).all() and (np.diff(ids) > 0).all()
        total += len(ids)
    assert total == r["pool_size"] == r["prev_pool_size"] + r["new_entities"]


def test_staged_buckets_from_other_inputs_are_refused(tmp_path):
    emb = tmp_path / "emb"
    write_day(emb, D1, {1: [1, 0], 2: [0, 1], 3: [1, 1], 4: [2, 2]})
    pool = tmp_path / "pool"
    aggregate_day(emb, pool, "ctr", "user", D1, "acc", num_buckets=2, buckets=[0])
    write_day(emb, D1, {5: [1, 0]}, part=1)  # the day's input changes between the two ranks
    aggregate_day(emb, pool, "ctr", "user", D1, "acc", num_buckets=2, buckets=[1])
    with pytest.raises(PoolError, match="staged from other inputs or settings"):
        finalize_day(pool, "ctr", "user", D1)
    assert pool_days(pool, "ctr", "user") == []


# ---- bad input: refused with a message naming the problem, existing snapshots untouched ---------


def _nan_day(emb):
    write_day(emb, D2, {1: [0, 1]})  # the first file is fine: the error comes mid-pass
    write_day(emb, D2, {4: [1, 1], 5: [float("nan"), 1]}, part=1)


def _corrupt(emb):
    write_day(emb, D2, {1: [0, 1]}).write_bytes(b"PAR1 this is not parquet")


def _truncated(emb):
    f = write_day(emb, D2, {1: [0, 1]})
    f.write_bytes(f.read_bytes()[:-20])


BAD_INPUTS = {
    "missing partition": (lambda emb: None, InputError, r"day=2026-01-02: missing daily partition"),
    "empty partition": (lambda emb: (emb / "ctr/user/day=2026-01-02").mkdir(), InputError, "no part-\\*.parquet files"),
    "corrupt parquet": (_corrupt, InputError, r"part-00000.parquet: unreadable Parquet"),
    "truncated parquet": (_truncated, InputError, r"part-00000.parquet: unreadable Parquet"),
    "dim differs from pool": (lambda emb: write_day(emb, D2, {1: [0, 1, 2]}), InputError,
                              "embedding dimension 3 differs from the pool's 2"),
    "dim differs within day": (lambda emb: (write_day(emb, D2, {1: [0, 1]}), write_day(emb, D2, {3: [0, 1, 2]}, part=1)),
                               InputError, r"part-00001.parquet: embedding dimension 3 differs from 2 in part-00000"),
    "list lengths differ": (lambda emb: write_day(emb, D2, {1: [0, 1], 3: [0, 1, 2]}, emb_type=pa.list_(pa.float32())),
                            InputError, "entity_id 3 \\(row 1\\) has length 3, expected 2"),
    "null embedding": (lambda emb: write_day(emb, D2, {1: [0, 1], 3: None}), InputError, "null embedding in row 1"),
    "null value": (lambda emb: write_day(emb, D2, {1: [0, None]}), InputError, "null value inside the embedding of entity_id 1"),
    "nan": (_nan_day, InputError, r"part-00001.parquet: non-finite embedding \(NaN or inf\) for entity_id 5 \(row 1\)"),
    "inf": (lambda emb: write_day(emb, D2, {1: [float("inf"), 1]}), InputError, "non-finite embedding"),
    "float64": (lambda emb: write_day(emb, D2, {1: [0, 1]}, emb_type=pa.list_(pa.float64(), 2)), InputError,
                "'embedding' must be fixed_size_list<float32>"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_daily_input_is_refused_and_the_pool_is_untouched(tmp_path, case):
    make, error, message = BAD_INPUTS[case]
    emb, pool = tmp_path / "emb", tmp_path / "pool"
    write_day(emb, D1, HAND[D1])
    aggregate_day(emb, pool, "ctr", "user", D1, "ma", 0.75, num_buckets=2)
    make(emb)
    before = tree(pool)
    with pytest.raises(error, match=message):
        aggregate_day(emb, pool, "ctr", "user", D2, "ma", 0.75)
    assert tree(pool) == before
    assert sorted(p.name for p in (pool / "ctr" / "user").iterdir()) == [f"day={D1}"]


@pytest.mark.parametrize("method, alpha, message", [
    ("mean", None, "unknown aggregation method 'mean'"),
    ("ma", 1.0, r"alpha must be in \[0, 1\)"),
    ("ma", -0.1, r"alpha must be in \[0, 1\)"),
    ("ma", float("nan"), r"alpha must be in \[0, 1\)"),
    ("ma", None, "method 'ma' needs alpha"),
    ("acc", 0.5, "alpha applies to method 'ma' only"),
])
def test_bad_heuristic_is_refused(hand, method, alpha, message):
    emb, pool = hand
    apply_days(emb, pool, [D1])
    before = tree(pool)
    with pytest.raises(ValueError, match=message):
        aggregate_day(emb, pool, "ctr", "user", D2, method, alpha)
    assert tree(pool) == before


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(day=D3), PoolError,
     "no pool snapshot for 2026-01-02, which has daily embeddings, before 2026-01-03; apply the days in order"),
    (dict(method="acc", alpha=None), PoolError, r"built with ma\(alpha=0.75\), not acc"),
    (dict(num_buckets=8), PoolError, "has 4 buckets, not 8"),
    (dict(buckets=[4]), ValueError, r"buckets must be a non-empty subset of \[0, 4\)"),
    (dict(ttl_days=-1), ValueError, "ttl_days must be an integer >= 0"),
    (dict(day="2026-1-2"), ValueError, "day must be YYYY-MM-DD"),
])
def test_requests_the_pool_cannot_serve_are_refused(hand, kwargs, error, message):
    emb, pool = hand
    apply_days(emb, pool, [D1])
    before = tree(pool)
    args = dict(day=D2, method="ma", alpha=0.75) | kwargs
    with pytest.raises(error, match=message):
        aggregate_day(emb, pool, "ctr", "user", args.pop("day"), args.pop("method"), args.pop("alpha"), **args)
    assert tree(pool) == before


def test_first_day_refused_when_earlier_daily_embeddings_exist(hand):
    emb, pool = hand
    with pytest.raises(PoolError, match=r"no pool snapshot for 2026-01-01 \(and 1 later days\)"):
        aggregate_day(emb, pool, "ctr", "user", D3, "acc")
    assert not pool.exists() or not any(pool.rglob("*.parquet"))


# ---- the CLI ------------------------------------------------------------------------------------


def test_cli_applies_a_day_and_exits_2_on_bad_input(hand, monkeypatch, capsys, caplog):
    import common.log
    from embeddings.aggregate import main

    monkeypatch.setattr(common.log, "setup_logging", lambda: None)  # keep pytest's log capture
    caplog.set_level("INFO")
    emb, pool = hand
    args = ["--emb", str(emb), "--pool", str(pool), "--source", "ctr", "--entity", "user", "--method", "ma", "--alpha", "0.75",
            "--num-buckets", "2"]
    assert main(args + ["--day", D1]) == 0
    assert json.loads(capsys.readouterr().out)["pool_size"] == 2
    assert "ctr/user 2026-01-01: committed" in caplog.text
    assert main(args + ["--day", D3]) == 2
    bad = capsys.readouterr()
    assert bad.out == "" and bad.err.count("\n") == 1 and bad.err.startswith("error: ") and "apply the days in order" in bad.err


def test_cli_buckets_then_finalize(hand, monkeypatch, capsys):
    import common.log
    from embeddings.aggregate import main

    monkeypatch.setattr(common.log, "setup_logging", lambda: None)  # keep pytest's log capture
    emb, pool = hand
    common = ["--pool", str(pool), "--source", "ctr", "--entity", "user", "--day", D1]
    compute = common + ["--emb", str(emb), "--method", "ap", "--num-buckets", "4"]
    assert main(compute + ["--buckets", "0-1,3"]) == 0
    assert json.loads(capsys.readouterr().out) == {"staged_buckets": [0, 1, 3]}
    assert main(common + ["--finalize"]) == 2
    assert "1 of 4 buckets not staged yet (first: bucket=0002.parquet)" in capsys.readouterr().err
    assert main(compute + ["--buckets", "2"]) == 0
    capsys.readouterr()
    assert main(common + ["--finalize"]) == 0
    assert json.loads(capsys.readouterr().out)["pool_size"] == 2
    assert pool_days(pool, "ctr", "user") == [D1]
    assert main(compute + ["--buckets", "x"]) == 2
    assert "--buckets 'x': expected ranges like 0-31,40" in capsys.readouterr().err


def test_workers_do_not_change_the_pool(tmp_path):
    """Three files of 40-row row groups, shared out over threads; the same ids in every file with
    equal event_times, so only the read order (the last file wins) decides which row is kept."""
    emb, rng = tmp_path / "emb", np.random.default_rng(1)
    for part in range(3):
        rows = {i: [part, i] for i in rng.permutation(300).tolist()}
        write_day(emb, D1, rows, event_time=[7] * 300, part=part, row_group_size=40)
    for workers, root in ((1, tmp_path / "w1"), (3, tmp_path / "w3")):
        r = aggregate_day(emb, root, "ctr", "user", D1, "ap", num_buckets=5, workers=workers)
        assert r["daily_rows"] == 900 and r["daily_entities"] == 300
        assert {v[0] for v in pool_dict(root, D1).values()} == {2.0}
    assert {k: v[1] for k, v in tree(tmp_path / "w1").items()} == {k: v[1] for k, v in tree(tmp_path / "w3").items()}


def test_reapplying_a_day_with_changed_input_warns_about_later_days(hand, caplog):
    emb, pool = hand
    apply_days(emb, pool, [D1, D2, D3])
    write_day(emb, D2, {9: [1, 1]}, part=1)  # late data for day 2
    with caplog.at_level(logging.WARNING, logger="derm.embeddings.aggregate"):
        r2 = apply_days(emb, pool, [D2])[0]
    assert r2["new_entities"] == 2
    assert "the later snapshots 2026-01-03 were built on the old one: re-apply them in order" in caplog.text


def test_an_empty_day_of_variable_lists_takes_the_pools_dimension(hand, tmp_path):
    emb, pool = hand
    apply_days(emb, pool, [D1])
    (emb / "ctr/user/day=2026-01-02/part-00000.parquet").unlink()
    write_day(emb, D2, {}, emb_type=pa.list_(pa.float32()))
    r = apply_days(emb, pool, [D2])[0]
    assert r["daily_entities"] == 0 and r["carried_over"] == 2 and r["coverage"] is None and r["cos_p10"] == 1.0
    with pytest.raises(ValueError, match=r"buckets must be in \[0, 4\)"):
        read_pool(pool, "ctr", "user", buckets=[4])
    with pytest.raises(PoolError, match="no complete pool snapshot for 2026-01-05"):
        read_pool(pool, "ctr", "user", "2026-01-05")


def test_heuristic_blend_is_float32_and_in_the_documented_order():
    prev, last, daily = (np.array([[x, 1.0]], np.float32) for x in (0.1, 0.2, 0.3))
    out = Heuristic("ma", 0.9).combine(prev, last, daily)
    assert out.dtype == np.float32
    assert out[0, 0] == np.float32(0.1) * np.float32(0.9) + np.float32(0.3) * np.float32(1 - 0.9)
    assert Heuristic("ap").combine(prev, last, daily)[0, 0] == (np.float32(0.2) + np.float32(0.3)) * np.float32(0.5)


def test_a_killed_aggregates_split_is_removed_by_the_next_one(tmp_path):
    """A killed aggregate leaves its ``_partition-*`` split (138 MB in issue 14's repro); the next
    split in the same folder removes it, and never one whose owner still runs."""
    import signal
    import subprocess
    import sys

    from common.files import claim
    from embeddings.buckets import BucketedDay

    dead, live = tmp_path / "_partition-dead", tmp_path / "_partition-live"
    code = (f"import os, signal; from pathlib import Path; from common.files import claim; Path({str(dead)!r}).mkdir(); "
            f"f = claim({str(dead)!r}); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == -signal.SIGKILL
    live.mkdir()
    owner = claim(live)
    with BucketedDay(tmp_path, num_buckets=2, keep=[0, 1], dim=4) as day:
        assert day.dir.is_dir()
    assert not dead.exists() and live.is_dir() and not day.dir.exists()
    owner.close()
