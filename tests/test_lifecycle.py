"""The lifecycle end to end on the tiny world: infer two days from a snapshot, aggregate them with
a moving average, publish the user pool to the feature store and the Pin pool with a FAISS index,
then serve: batch get of users and user -> Pin retrieval."""

from __future__ import annotations

import numpy as np
import pytest

from embeddings.aggregate import aggregate_day, read_pool
from embeddings.ann import AnnIndex
from embeddings.embedded_store import EmbeddedStore
from embeddings.publish import publish
from tests.distributed import run_ranks
from tests.helpers import INFER_DAYS as DAYS
from tests.helpers import infer_days


@pytest.mark.slow
def test_infer_aggregate_publish_serve(tiny_snapshot, tiny_world, tmp_path):
    emb, pool = tmp_path / "emb", tmp_path / "pool"
    run_ranks(infer_days, 1, str(tiny_snapshot), str(tiny_world), str(emb), True)
    for day in DAYS:
        for entity in ("user", "pin"):
            report = aggregate_day(emb, pool, "cvr", entity, day, "ma", alpha=0.9, num_buckets=4)
            assert report["pool_size"] > 0
    users = read_pool(pool, "cvr", "user", DAYS[-1])
    ids = users["entity_id"].to_numpy()
    vectors = np.stack(users["embedding"].to_numpy(zero_copy_only=False))

    store = EmbeddedStore(tmp_path / "store")
    publish(pool / "cvr" / "user" / f"day={DAYS[-1]}", store, "cvr-user-1")
    got, found = store.get(np.concatenate([ids[:50], [10**12]]))
    assert found[:50].all() and not found[50]
    np.testing.assert_allclose(got[:50], vectors[:50], atol=1e-6)
    assert store.active_version() == "cvr-user-1"

    pin_store = EmbeddedStore(tmp_path / "pin-store")
    publish(pool / "cvr" / "pin" / f"day={DAYS[-1]}", pin_store, "cvr-pin-1", ann_dir=tmp_path / "ann")
    index = AnnIndex.load(tmp_path / "ann" / "cvr-pin-1")
    pins = set(read_pool(pool, "cvr", "pin", DAYS[-1])["entity_id"].to_numpy().tolist())
    top, scores = index.search(vectors[:8], 5)
    assert top.shape == (8, 5) and set(top.ravel().tolist()) <= pins
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
