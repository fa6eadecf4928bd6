"""Single-GPU smoke test of an install: the CUDA path of the same code the CPU tests cover.

Run it on a machine (or in the GPU image) with one visible GPU, from the repository root::

    pytest -m gpu tests/test_gpu_smoke.py
    # in the image:  docker run --gpus 1 REGISTRY/derm-trainer:TAG pytest -m gpu tests/test_gpu_smoke.py

Without CUDA (``torch.cuda.is_available()`` False, e.g. a CPU install) it is skipped, and says so.

What it does, in one process on ``cuda:0`` with a one-rank nccl process group:

1. initial training of the cvr model on two days of the tiny synthetic world (a few steps per day,
   TorchRec's sharded train pipeline, ``train.device = cuda``), snapshots, evaluation on day 3,
   then one incremental day from the day-2 snapshot;
2. the day-2 snapshot loaded sharded on the GPU (``embeddings.infer.Embedder``) gives the same
   user and Pin embeddings as the same snapshot loaded into a plain CPU model;
3. inference of two days (``infer_day``), aggregation (MA), publishing the user pool to an embedded
   feature store and the Pin pool with a FAISS index, searched on the GPU when FAISS sees one
   (the faiss-gpu build) and on the CPU otherwise.

Everything here has only been checked for correctness by reading: no GPU was available where it was
written (see docs/cluster.md, "What has run on a GPU").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.helpers import SMALL_MODEL
from trainer.config import DataConfig, RunConfig, TrainConfig

D1, D2, D3 = "2026-01-01", "2026-01-02", "2026-01-03"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False here"),
]


@pytest.fixture(scope="module")
def ctx():
    """A one-rank nccl group on cuda:0, as sharding.distributed.init_distributed makes under torchrun."""
    from sharding.distributed import DistContext

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process; run this file on its own")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield DistContext(0, 1, 0, torch.device("cuda", 0), "nccl")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _config(root: Path, run_dir: Path, **train) -> RunConfig:
    return RunConfig(
        data=DataConfig(root=str(root), source="cvr", batch_size=200, eval_batch_size=500, synthetic_preset=""),
        train=TrainConfig(run_dir=str(run_dir), log_every=2, device="cuda", max_steps_per_day=4, **train),
        model=SMALL_MODEL,
    )


def test_train_infer_publish_search_on_one_gpu(ctx, tiny_world, tmp_path):
    from data.loader import make_loader
    from data.spec import load_spec
    from embeddings.aggregate import aggregate_day, read_pool
    from embeddings.ann import AnnIndex
    from embeddings.embedded_store import EmbeddedStore
    from embeddings.infer import Embedder, infer_day
    from embeddings.publish import publish
    from modules.derm import build_derm
    from sharding.checkpoint import load_unsharded
    from trainer.loop import run

    run_dir = tmp_path / "cvr"

    # 1. sharded training on the GPU: initial window, evaluation, then one incremental day
    initial = run(_config(tiny_world, run_dir, days=(D1, D2), eval_day=D3), ctx)
    assert [d["day"] for d in initial["days"]] == [D1, D2]
    assert all(d["steps"] == 4 and np.isfinite(d["mean_loss"]) for d in initial["days"]), initial["days"]
    conv = initial["eval"]["conversion"]
    assert conv["count"] > 0 and 0.0 <= conv["roc_auc"] <= 1.0 and np.isfinite(conv["ne"]), conv
    # the incremental day under bf16 autocast (train.mixed_precision), as a GPU user would run it
    incremental = run(_config(tiny_world, run_dir, mode="incremental", day=D3, mixed_precision="bf16"), ctx)
    assert incremental["global_step"] == initial["global_step"] + 4
    assert np.isfinite(incremental["days"][0]["mean_loss"])
    snapshot = run_dir / "snapshots" / f"day={D2}"
    assert (snapshot / "meta.json").exists()

    # 2. the snapshot, sharded on the GPU, embeds like the same snapshot in a plain CPU model
    embedder = Embedder.load(snapshot, tiny_world, ctx.device)
    assert next(p for p in embedder.model.parameters() if p.is_floating_point()).device.type == ctx.device.type
    batch = next(iter(make_loader(tiny_world, "cvr", 64, days=[D1], rank=0, world_size=1)))
    with torch.no_grad():
        _, (_, on_gpu) = embedder.model(batch.to(ctx.device))
    cpu_task = build_derm(load_spec(tiny_world / "spec.toml"), "cvr", SMALL_MODEL, device=torch.device("cpu"))
    load_unsharded(snapshot, cpu_task)
    cpu_task.eval()
    with torch.no_grad():
        on_cpu = cpu_task.model(batch)
    assert on_gpu.user_embedding.device.type == ctx.device.type
    torch.testing.assert_close(on_gpu.user_embedding.cpu(), on_cpu.user_embedding, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(on_gpu.pin_embedding.cpu(), on_cpu.pin_embedding, atol=1e-4, rtol=1e-3)

    # 3. inference, aggregation, publishing, retrieval
    emb, pool = tmp_path / "emb", tmp_path / "pool"
    for day in (D2, D3):
        counts = infer_day(embedder, day, emb, batch_size=300)
        assert counts["user"] > 0 and counts["pin"] > 0, counts
        for entity in ("user", "pin"):
            assert aggregate_day(emb, pool, "cvr", entity, day, "ma", alpha=0.9, num_buckets=4)["pool_size"] > 0

    users = read_pool(pool, "cvr", "user", D3)
    user_ids = users["entity_id"].to_numpy()
    user_vectors = np.stack(users["embedding"].to_numpy(zero_copy_only=False))
    assert np.isfinite(user_vectors).all()
    store = EmbeddedStore(tmp_path / "store")
    publish(pool / "cvr" / "user" / f"day={D3}", store, "cvr-user-1")
    got, found = store.get(user_ids[:32])
    assert found.all()
    np.testing.assert_allclose(got, user_vectors[:32], atol=1e-6)

    import faiss

    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    pin_store = EmbeddedStore(tmp_path / "pin-store")
    publish(pool / "cvr" / "pin" / f"day={D3}", pin_store, "cvr-pin-1", ann_dir=tmp_path / "ann")
    index = AnnIndex.load(tmp_path / "ann" / "cvr-pin-1")
    assert index.on_gpu == (faiss_gpus > 0), (index, faiss_gpus)  # GPU search with faiss-gpu, else the CPU index
    pins = set(read_pool(pool, "cvr", "pin", D3)["entity_id"].to_numpy().tolist())
    top, scores = index.search(user_vectors[:8], 5)
    assert top.shape == (8, 5) and set(top[top >= 0].ravel().tolist()) <= pins
    assert np.all(np.diff(scores, axis=1)[np.isfinite(scores[:, 1:])] <= 1e-5)  # best first
    # the GPU (or CPU) search agrees with an exact search in numpy (a flat index at this size)
    if index.kind == "flat":
        pin_ids = np.array(sorted(pins))
        pin_vec = dict(zip(*[read_pool(pool, "cvr", "pin", D3)[c].to_numpy(zero_copy_only=False) for c in ("entity_id", "embedding")]))
        mat = np.stack([pin_vec[i] for i in pin_ids]).astype(np.float32)
        mat /= np.linalg.norm(mat, axis=1, keepdims=True)
        q = user_vectors[:8] / np.linalg.norm(user_vectors[:8], axis=1, keepdims=True)
        best = (q @ mat.T).max(axis=1)
        np.testing.assert_allclose(scores[:, 0], best, atol=1e-4)
