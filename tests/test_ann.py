"""ANN index over a Pin version (embeddings/ann.py): exact and approximate user -> Pin retrieval."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from embeddings.ann import AnnConfig, AnnIndex

DIM = 32


def clustered_unit_vectors(n: int, rng: np.random.Generator, clusters: int = 400, spread: float = 1.0) -> np.ndarray:
    """[n, DIM] unit vectors around ``clusters`` random centres (noise of norm ~``spread``): the
    structure IVF relies on, like interest clusters of real Pin embeddings."""
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + spread / np.sqrt(DIM) * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def pins():
    """20k Pins with random, non-contiguous int64 ids, and 200 user queries."""
    rng = np.random.default_rng(0)
    x = clustered_unit_vectors(20_200, rng)
    ids = rng.choice(2**62, 20_000, replace=False).astype(np.int64) - 2**61
    return ids, x[:20_000], x[20_000:]


@pytest.fixture(scope="module")
def exact(pins):
    ids, emb, _ = pins
    return AnnIndex.build(ids, emb)  # 20k <= exact_max_rows: IndexFlatIP


@pytest.fixture(scope="module")
def ivf(pins):
    ids, emb, _ = pins
    return AnnIndex.build(ids, emb, AnnConfig(exact_max_rows=10_000, kind="ivf"))


@pytest.fixture(scope="module")
def ivfpq(pins):
    ids, emb, _ = pins
    return AnnIndex.build(ids, emb, AnnConfig(exact_max_rows=10_000))  # the default kind on CPU


def recall(approx: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the true top-k found by the approximate top-k."""
    return float(np.mean([len(np.intersect1d(a, t)) / len(t) for a, t in zip(approx, truth)]))


def test_exact_index_returns_the_true_top_k(pins, exact):
    ids, emb, queries = pins
    assert exact.kind == "flat" and len(exact) == 20_000
    got_ids, got_scores = exact.search(queries, k=10)
    scores = queries @ emb.T  # [Q, P] cosines: both sides are unit vectors
    top = np.argsort(-scores, axis=1)[:, :10]
    np.testing.assert_array_equal(got_ids, ids[top])
    np.testing.assert_allclose(got_scores, np.take_along_axis(scores, top, axis=1), atol=1e-5)
    assert got_ids.dtype == np.int64 and got_scores.dtype == np.float32


def test_ivf_recall_at_10_against_exact(pins, exact, ivf):
    _, _, queries = pins
    assert ivf.kind == "ivf"
    ivf_index = faiss.extract_index_ivf(ivf.index)
    assert ivf_index.nlist > 100 and ivf_index.nprobe < ivf_index.nlist  # a real approximation
    truth, _ = exact.search(queries, k=10)
    got, _ = ivf.search(queries, k=10)
    assert recall(got, truth) >= 0.9


def test_probing_every_list_makes_ivf_exact(pins, exact, ivf):
    _, _, queries = pins
    nlist, nprobe = faiss.extract_index_ivf(ivf.index).nlist, ivf.search_params["nprobe"]
    try:
        ivf.set_search_params(nprobe=nlist)
        np.testing.assert_array_equal(ivf.search(queries, k=10)[0], exact.search(queries, k=10)[0])
    finally:
        ivf.set_search_params(nprobe=nprobe)
    with pytest.raises(ValueError, match="applies to HNSW"):
        ivf.set_search_params(ef_search=64)
    with pytest.raises(ValueError, match="applies to ivfpq"):
        ivf.set_search_params(k_factor=4)


@pytest.mark.slow
def test_ivfpq_recall_at_10_against_exact(pins, exact, ivfpq):
    _, _, queries = pins
    assert ivfpq.kind == "ivfpq" and len(ivfpq) == 20_000
    assert isinstance(ivfpq.index, faiss.IndexRefineFlat)
    assert isinstance(faiss.downcast_index(ivfpq.index.base_index), faiss.IndexIVFPQFastScan)
    assert ivfpq.search_params == {"nprobe": faiss.extract_index_ivf(ivfpq.index).nprobe, "k_factor": 2.0}
    truth, truth_scores = exact.search(queries, k=10)
    got, scores = ivfpq.search(queries, k=10)
    assert recall(got, truth) >= 0.9
    same = got == truth  # re-ranking makes the scores exact, not PQ estimates
    np.testing.assert_allclose(scores[same], truth_scores[same], atol=1e-5)


def test_ivfpq_with_every_list_and_many_candidates_is_exact(pins, exact, ivfpq):
    _, _, queries = pins
    before = ivfpq.search_params
    try:
        ivfpq.set_search_params(nprobe=faiss.extract_index_ivf(ivfpq.index).nlist, k_factor=50)
        assert recall(ivfpq.search(queries, k=10)[0], exact.search(queries, k=10)[0]) >= 0.995
    finally:
        ivfpq.set_search_params(**before)
    assert ivfpq.search_params == before
    with pytest.raises(ValueError, match="applies to ivfpq"):
        ivfpq.set_search_params(k_factor=0.5)
    with pytest.raises(ValueError, match="applies to HNSW"):
        ivfpq.set_search_params(ef_search=64)


def test_hnsw_recall_at_10_against_exact(pins, exact):
    ids, emb, queries = pins
    few = 5_000
    hnsw = AnnIndex.build(ids[:few], emb[:few], AnnConfig(exact_max_rows=1_000, kind="hnsw", hnsw_m=16))
    truth = AnnIndex.build(ids[:few], emb[:few]).search(queries, k=10)[0]
    assert hnsw.kind == "hnsw" and recall(hnsw.search(queries, k=10)[0], truth) >= 0.9


@pytest.mark.parametrize("which", ["exact", "ivf", "ivfpq"])
def test_ids_map_back_to_entity_ids(pins, which, request):
    ids, emb, _ = pins
    index = request.getfixturevalue(which)
    sample = np.random.default_rng(1).choice(len(ids), 100, replace=False)
    got, scores = index.search(emb[sample] * 3.0, k=1)  # unnormalised queries score as cosines
    np.testing.assert_array_equal(got[:, 0], ids[sample])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


@pytest.mark.parametrize("which", ["ivf", "ivfpq"])
def test_save_load_round_trip(pins, which, request, tmp_path):
    _, _, queries = pins
    index = request.getfixturevalue(which)
    index.set_search_params(nprobe=index.search_params["nprobe"] + 1)  # a non-default setting survives
    try:
        path = index.save(tmp_path / "ctr-pin-2026-01-03")
        loaded = AnnIndex.load(path)
        assert (loaded.kind, len(loaded), loaded.dim) == (which, len(index), DIM)
        assert loaded.search_params == index.search_params
        for a, b in zip(loaded.search(queries, k=10), index.search(queries, k=10)):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(ValueError, match="already exists"):
            index.save(path)
    finally:
        index.set_search_params(nprobe=index.search_params["nprobe"] - 1)


def test_auto_kind_is_ivfpq_on_cpu(pins):
    ids, emb, _ = pins
    index = AnnIndex.build(ids[:2_000], emb[:2_000], AnnConfig(exact_max_rows=1_000, use_gpu=False))
    assert (index.kind, index.on_gpu) == ("ivfpq", False)


@pytest.mark.gpu
@pytest.mark.skipif(not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0, reason="needs faiss-gpu and a GPU")
def test_auto_kind_is_ivf_on_gpu(pins):
    ids, emb, queries = pins
    index = AnnIndex.build(ids[:2_000], emb[:2_000], AnnConfig(exact_max_rows=1_000))
    assert (index.kind, index.on_gpu) == ("ivf", True)
    assert index.search(queries, k=10)[0].shape == (len(queries), 10)


def test_k_beyond_the_pool_pads_with_minus_one():
    rng = np.random.default_rng(2)
    index = AnnIndex.build(np.array([10, 20, 30]), clustered_unit_vectors(3, rng))
    ids, scores = index.search(clustered_unit_vectors(2, rng), k=5)
    assert sorted(ids[0, :3]) == [10, 20, 30]
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()


def test_bad_arguments_are_refused(exact):
    with pytest.raises(ValueError, match=r"shape \[R, 32\]"):
        exact.search(np.zeros((2, DIM + 1), np.float32), k=3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        exact.search(np.zeros((2, DIM), np.float32), k=0)
    with pytest.raises(ValueError, match="kind must be"):
        AnnConfig(kind="pq")
    with pytest.raises(ValueError, match="refine_k_factor"):
        AnnConfig(refine_k_factor=0.5)
    with pytest.raises(ValueError, match="nprobe must be >= 0"):
        AnnConfig(nprobe=-1)
    with pytest.raises(ValueError, match="must divide"):
        AnnIndex.build(np.arange(2_000), np.ones((2_000, DIM), np.float32), AnnConfig(exact_max_rows=1_000, pq_m=5))
    with pytest.raises(ValueError, match="ids"):
        AnnIndex.build(np.arange(3), np.zeros((4, DIM), np.float32))
