"""Synthetic ads world: determinism, label rates, oracle consistency, churn, drift, sequences."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from data.loader import EventLog
from data.spec import load_spec
from data.synthetic import generate
from data.synthetic.cli import build_config, main
from data.synthetic.simulate import History
from tests.helpers import TINY


def _read(root, source):
    return ds.dataset(root / source, format="parquet", partitioning="hive").to_table()


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny_world):
    generate(tmp_path / "again", TINY, seed=0)
    generate(tmp_path / "other", TINY, seed=1)
    for source in ("ctr", "cvr"):
        first = sorted((tiny_world / source).rglob("*.parquet"))
        again = sorted((tmp_path / "again" / source).rglob("*.parquet"))
        assert [p.relative_to(tiny_world) for p in first] == [p.relative_to(tmp_path / "again") for p in again]
        for a, b in zip(first, again):
            assert pq.read_table(a).equals(pq.read_table(b)), a
        assert not _read(tiny_world, source).equals(_read(tmp_path / "other", source))
    assert (tiny_world / "spec.toml").read_text() == (tmp_path / "again" / "spec.toml").read_text()


def test_layout_and_spec(tiny_world):
    spec = load_spec(tiny_world / "spec.toml")
    assert spec.source_names == ["ctr", "cvr"]
    days = sorted(p.name for p in (tiny_world / "ctr").iterdir())
    assert days == ["day=2026-01-01", "day=2026-01-02", "day=2026-01-03"]
    for source in ("ctr", "cvr"):
        events = EventLog(tiny_world, source)  # every file passes the spec's schema checks
        rows = TINY.ctr_events_per_day if source == "ctr" else TINY.cvr_events_per_day
        assert events.num_rows == rows * TINY.days
    t = _read(tiny_world, "ctr")
    assert t["user_id"].to_numpy().max() < TINY.total_users
    assert t["pin_id"].to_numpy().max() < TINY.total_pins
    assert np.all(np.diff(t["event_time"].to_numpy()) >= 0)  # files in time order


def test_label_rates_and_structure(tiny_world):
    ctr, cvr = _read(tiny_world, "ctr"), _read(tiny_world, "cvr")
    click, good = ctr["click"].to_numpy(), ctr["good_click"].to_numpy()
    assert 0.02 < click.mean() < 0.12
    assert np.all(good <= click) and 0.2 < good.sum() / click.sum() < 0.8
    conv, cc, vc = (cvr[c].to_numpy() for c in ("conversion", "click_conversion", "view_conversion"))
    assert 0.003 < conv.mean() < 0.06
    assert np.array_equal(conv, cc | vc) and not np.any(cc & vc)


@pytest.mark.parametrize(
    "source, label, oracle",
    [("ctr", "click", "p_click"), ("ctr", "good_click", "p_good_click"), ("cvr", "conversion", "p_conversion")],
)
def test_oracle_probabilities_match_labels(tiny_world, source, label, oracle):
    t = _read(tiny_world, source)
    y, p = t[label].to_numpy().astype(np.float64), t[oracle].to_numpy().astype(np.float64)
    assert np.all((p > 0) & (p < 1))
    # Calibrated: in each fifth of rows by p, the label rate is within 4 standard errors of mean p.
    order = np.argsort(p)
    for part in np.array_split(order, 5):
        se = np.sqrt(p[part].mean() * (1 - p[part].mean()) / part.size)
        assert abs(y[part].mean() - p[part].mean()) < 4 * se + 1e-3, (label, y[part].mean(), p[part].mean())
    # Informative: the oracle ranks positives well above chance (the ceiling a model aims at).
    auc = binary_auroc(torch.tensor(p), torch.tensor(y, dtype=torch.long)).item()
    assert auc > 0.7


def test_churn_new_entities_and_drift(tiny_world):
    t = _read(tiny_world, "ctr")
    day = t["day"].to_numpy()
    users = t["user_id"].to_numpy()
    first, last = set(users[day == "2026-01-01"]), set(users[day == "2026-01-03"])
    assert max(first) < TINY.n_users  # day 0 knows only the initial users
    assert any(u >= TINY.n_users for u in last)  # users born later appear
    truth = pq.read_table(tiny_world / "truth" / "users.parquet")
    death = truth["death_day"].to_numpy()
    assert not (last & set(np.flatnonzero(death <= 2)))  # the dead never come back
    # Latents drift: high but imperfect day-to-day similarity, as the world.json formula says.
    meta = json.loads((tiny_world / "truth" / "world.json").read_text())
    theta = meta["config"]["drift_per_day"]
    l0 = np.stack(truth["latent0"].to_numpy(zero_copy_only=False))
    dr = np.stack(truth["drift"].to_numpy(zero_copy_only=False))
    cos = (l0 * (np.cos(theta * 2) * l0 + np.sin(theta * 2) * dr)).sum(1)
    assert np.allclose(np.linalg.norm(l0, axis=1), 1, atol=1e-5)
    assert np.all((cos > 0.99) & (cos < 1.0))


def test_sequences_are_as_of_start_of_day(tiny_world):
    t = _read(tiny_world, "ctr")
    seconds_into_day = (t["event_time"].to_numpy() % 86400) / 86400
    ages = t["seq_age_days"].to_pylist()
    pins = t["seq_pin_ids"].to_pylist()
    actions = t["seq_action"].to_pylist()
    assert sum(map(len, pins)) > 0
    for a, p, act, into in zip(ages, pins, actions, seconds_into_day):
        assert len(a) == len(p) == len(act) <= TINY.seq_len
        assert all(x >= into - 1e-4 for x in a)  # nothing from today: no label leakage
        assert a == sorted(a)  # newest first
        assert all(0 <= x < TINY.total_pins for x in p) and all(1 <= x <= 3 for x in act)


def test_pretrained_vectors_are_noisy_views_of_latents(tiny_world):
    t = _read(tiny_world, "ctr").filter(ds.field("day") == "2026-01-01")
    users = t["user_id"].to_numpy()
    x = np.stack(t["user_pretrained"].to_numpy(zero_copy_only=False))
    truth = pq.read_table(tiny_world / "truth" / "users.parquet")
    latent = np.stack(truth["latent0"].to_numpy(zero_copy_only=False))[users]
    # A least-squares map from latent to feature explains most, but not all, of the feature.
    w, *_ = np.linalg.lstsq(latent, x, rcond=None)
    r2 = 1 - ((x - latent @ w) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert 0.5 < r2 < 0.99


def test_history_push_keeps_newest_first():
    h = History(n_users=3, length=3)
    h.push(np.array([0, 0, 2]), np.array([10, 11, 20]), np.array([1, 2, 1], np.int8), np.array([1.0, 2.0, 1.5], np.float32))
    h.push(np.array([0, 0]), np.array([12, 13]), np.array([1, 1], np.int8), np.array([3.5, 3.0], np.float32))
    assert h.pins.tolist() == [[12, 13, 11], [-1, -1, -1], [20, -1, -1]]
    assert h.time[0].tolist() == [3.5, 3.0, 2.0]


def test_cli_writes_refuses_overwrite_and_bad_overrides(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["--out", str(out), "--preset", "tiny", "--days", "1", "--set", "ctr_events_per_day=500"]) == 0
    assert EventLog(out, "ctr").num_rows == 500
    assert main(["--out", str(out), "--days", "1"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["--out", str(out), "--days", "1", "--overwrite", "--set", "ctr_events_per_day=300"]) == 0
    assert EventLog(out, "ctr").num_rows == 300
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    with pytest.raises(ValueError, match="--set 'colour=red'"):
        build_config("tiny", ["colour=red"])
    with pytest.raises(ValueError, match="n_users must be an int"):
        build_config("tiny", ["n_users=many"])


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    from data.synthetic import generate as gen_module

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("data.synthetic.generator.write_part", boom)
    with pytest.raises(RuntimeError):
        gen_module(tmp_path / "w", dataclasses.replace(TINY, days=1), seed=0)
    assert list(tmp_path.iterdir()) == []
