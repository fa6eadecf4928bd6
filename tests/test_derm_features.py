"""The DERM feature join: a row of day d reads the version of day d - 1 (a test that would catch
leakage), missing entities and unpublished days get zeros and indicator 1, and the result feeds a
downstream model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.loader import make_loader
from data.spec import load_spec
from embeddings.embedded_store import EmbeddedStore
from embeddings.features import DERMFeatureJoin, DERMSource
from modules.downstream import build_downstream
from modules.downstream_config import DERMFeature, DownstreamConfig

DAY, YESTERDAY = "2026-01-03", "2026-01-02"


def _store(path, ids, days_values: dict[str, float], dim=8) -> EmbeddedStore:
    """A store with one version per day, every value equal to that day's marker."""
    store = EmbeddedStore(path)
    for day, value in days_values.items():
        store.write_version(f"ctr-user-{day}", ids, np.full((ids.size, dim), value, np.float32))
    store.activate(f"ctr-user-{max(days_values)}")  # the newest is active: the join must not just read it
    return store


def test_day_d_reads_version_d_minus_1_never_its_own_day(tiny_world, tmp_path):
    batch = next(iter(make_loader(tiny_world, "ctr", 200, days=[DAY])))
    users = np.unique(batch.user_id.numpy())
    known = users[: users.size // 2]
    store = _store(tmp_path / "users", known, {"2026-01-01": 1.0, YESTERDAY: 2.0, DAY: 3.0})
    derm = DERMFeatureJoin([DERMSource("ctr_user", store, "user", "ctr-user-{day}")])(batch)
    emb, missing = derm["ctr_user"], derm["ctr_user_missing"]
    assert emb.shape == (200, 8) and missing.shape == (200, 1)
    hit = np.isin(batch.user_id.numpy(), known)
    assert torch.all(emb[torch.from_numpy(hit)] == 2.0)  # yesterday's, not the day's own (3.0)
    assert torch.all(emb[torch.from_numpy(~hit)] == 0.0)
    assert torch.equal(missing[:, 0], torch.from_numpy((~hit).astype(np.float32)))


def test_unpublished_day_is_all_missing_and_lag_zero_reads_the_same_day(tiny_world, tmp_path):
    batch = next(iter(make_loader(tiny_world, "ctr", 100, days=["2026-01-01"])))
    ids = np.unique(batch.user_id.numpy())
    store = _store(tmp_path / "users", ids, {"2026-01-01": 5.0})
    derm = DERMFeatureJoin([DERMSource("ctr_user", store, "user", "ctr-user-{day}")])(batch)
    assert torch.all(derm["ctr_user"] == 0) and torch.all(derm["ctr_user_missing"] == 1)
    same_day = DERMFeatureJoin([DERMSource("ctr_user", store, "user", "ctr-user-{day}")], lag_days=0)(batch)
    assert torch.all(same_day["ctr_user"] == 5.0) and torch.all(same_day["ctr_user_missing"] == 0)


def test_joined_features_feed_a_downstream_model(tiny_world, tmp_path):
    spec = load_spec(tiny_world / "spec.toml")
    batch = next(iter(make_loader(tiny_world, "ctr", 64, days=[DAY])))
    users, pins = np.unique(batch.user_id.numpy()), np.unique(batch.pin_id.numpy())
    user_store = _store(tmp_path / "u", users, {YESTERDAY: 0.1})
    pin_store = EmbeddedStore(tmp_path / "p")
    pin_store.write_version(f"ctr-pin-{YESTERDAY}", pins[:-3], np.full((pins.size - 3, 8), 0.2, np.float32))
    join = DERMFeatureJoin([DERMSource("ctr_user", user_store, "user", "ctr-user-{day}"),
                            DERMSource("ctr_pin", pin_store, "pin", "ctr-pin-{day}")])
    config = DownstreamConfig(derm=(DERMFeature("ctr_user", 8, 4), DERMFeature("ctr_pin", 8, 4)), token_dim=16)
    task = build_downstream(spec, "ctr", config, kind="ctr")
    loss, (_, out) = task(batch, join(batch))
    assert torch.isfinite(loss) and out.logits.shape == (64, 2)


def test_coverage_counts_the_rows_that_found_a_version(tiny_world, tmp_path):
    batch = next(iter(make_loader(tiny_world, "ctr", 200, days=[DAY])))
    users, pins = batch.user_id.numpy(), batch.pin_id.numpy()
    known = np.unique(users)[:7]
    user_store = _store(tmp_path / "users", known, {YESTERDAY: 1.0})
    pin_store = EmbeddedStore(tmp_path / "pins")
    pin_store.write_version(f"ctr-pin-{DAY}", np.unique(pins), np.ones((np.unique(pins).size, 8), np.float32))  # the day's own: unread
    join = DERMFeatureJoin([DERMSource("ctr_user", user_store, "user", "ctr-user-{day}"),
                            DERMSource("ctr_pin", pin_store, "pin", "ctr-pin-{day}")])
    assert np.isnan(join.coverage()["ctr_user"])  # no rows yet
    join(batch)
    join(batch)
    expected = np.isin(users, known).mean()
    assert 0 < expected < 1 and join.rows == 400
    assert join.coverage() == pytest.approx({"ctr_user": expected, "ctr_pin": 0.0})
    join.reset_counts()
    assert join.rows == 0 and join.found == {"ctr_user": 0, "ctr_pin": 0}


def test_similarity_input_is_the_cosine_of_each_pair_and_zero_when_missing():
    from modules.downstream import DERMProjection

    features = (DERMFeature("ctr_user", 3, 4), DERMFeature("ctr_pin", 3, 4))
    proj = DERMProjection(features, similarity=(("ctr_user", "ctr_pin"),))
    derm = {"ctr_user": torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 0]]), "ctr_pin": torch.tensor([[3.0, 0, 0], [1, 1, 0], [1, 0, 0]])}
    derm.update(ctr_user_missing=torch.tensor([[0.0], [0], [1]]), ctr_pin_missing=torch.zeros(3, 1))
    assert torch.allclose(proj.cosines(derm)[:, 0], torch.tensor([1.0, 2 ** -0.5, 0.0]))
    assert proj.output_dim() == 4 + 4 + 1 and proj(derm).shape == (3, 9)


def test_bad_sources_are_refused(tmp_path):
    store = EmbeddedStore(tmp_path / "s")
    with pytest.raises(ValueError, match="entity must be user or pin"):
        DERMSource("x", store, "advertiser", "x-{day}")
    with pytest.raises(ValueError, match="needs a \\{day\\} placeholder"):
        DERMSource("x", store, "user", "x-latest")
    with pytest.raises(ValueError, match="names must be unique"):
        DERMFeatureJoin([DERMSource("x", store, "user", "a-{day}"), DERMSource("x", store, "pin", "b-{day}")])
