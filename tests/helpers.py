"""What several test files share: the small model config, the tiny world's preset and days, the
2-rank snapshot maker behind the ``tiny_snapshot`` fixture, and a synthetic ``Batch`` factory for
module tests that need no generated world. Fixtures live in ``conftest.py``."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.spec import FeatureSpec
from data.synthetic import PRESETS
from data.synthetic.features import synthetic_spec
from modules.config import DERMConfig, DHENConfig

TINY = dataclasses.replace(PRESETS["tiny"], days=3)
"""The tiny preset, 3 days: the session world of ``conftest.tiny_world``."""
D1, D2, D3 = "2026-01-01", "2026-01-02", "2026-01-03"
INFER_DAYS = [D1, D2]
"""The days ``infer_days`` embeds."""

SMALL_MODEL = DERMConfig(
    token_dim=16,
    user_dhen=DHENConfig(layers=(("masknet", "transformer"),), mlp_hidden=32, masknet_block_dim=32),
    pin_dhen=DHENConfig(layers=(("mlp", "dcn"),), mlp_hidden=32),
    interaction_dhen=DHENConfig(layers=(("transformer", "mlp"),), out_tokens=2, mlp_hidden=32),
    head_hidden=(16,),
)
"""A DERM model small enough for multi-rank tests: every DHEN layer kind, 16-wide tokens."""


def tiny_spec() -> FeatureSpec:
    """The tiny world's spec, without generating the world."""
    return synthetic_spec(TINY)


def random_batch(spec: FeatureSpec, source: str, batch_size: int = 32, seed: int = 0) -> Batch:
    """A batch of ``source`` with random ids, sequences, dense values and labels that fit ``spec``
    (ids within each table, sequences up to ``max_length``, side lists padded to it): for module
    tests, which need shapes and types right, not a world behind them."""
    g = np.random.default_rng(seed)
    spec = spec.for_source(source)
    b = batch_size

    def jagged(features, lengths_of) -> KeyedJaggedTensor:
        keys, values, lengths = [], [], []
        for f in features:
            n = lengths_of(f)
            keys.append(f.name)
            lengths.append(n)
            values.append(g.integers(0, f.num_embeddings, int(n.sum())))
        return KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)).long(),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int64)).int(),
        )

    sparse = jagged(spec.sparse, lambda f: g.integers(0, 4, b) if f.multi else np.ones(b, np.int64))
    seq_lengths = {f.name: g.integers(0, f.max_length + 1, b) for f in spec.sequence}
    sequence = jagged(spec.sequence, lambda f: seq_lengths[f.name])
    side: dict[str, dict[str, torch.Tensor]] = {}
    for f in spec.sequence:
        mask = torch.from_numpy(np.arange(f.max_length)[None, :] < seq_lengths[f.name][:, None])
        side[f.name] = {}
        for s in f.side:
            if s.kind == "id":
                v = torch.from_numpy(g.integers(0, max(s.num_embeddings, 1), (b, f.max_length))).long()
            else:
                v = torch.from_numpy(g.random((b, f.max_length), np.float32))
            side[f.name][s.name] = v * mask
    labels = spec.source(source).labels
    return Batch(
        sparse=sparse,
        sequence=sequence,
        sequence_side=side,
        dense={f.name: torch.from_numpy(g.random((b, f.width), np.float32)) for f in spec.dense},
        labels=torch.from_numpy((g.random((b, len(labels))) < 0.3).astype(np.float32)),
        oracle=None,
        user_id=torch.from_numpy(g.integers(0, 10_000, b)).long(),
        pin_id=torch.from_numpy(g.integers(0, 10_000, b)).long(),
        event_time=torch.full((b,), 1_767_225_600, dtype=torch.int64),
    )


def two_rank_train_day(rank: int, world_size: int, root: str, run_dir: str) -> None:
    """A few steps of the small cvr model on day 1 of the tiny world, snapshotted (the fixture
    behind tests of snapshot consumers; run with ``tests.distributed.run_ranks``)."""
    from sharding.distributed import DistContext
    from trainer.config import DataConfig, RunConfig, TrainConfig
    from trainer.loop import run

    ctx = DistContext(rank, world_size, 0, torch.device("cpu"), "gloo")
    config = RunConfig(
        data=DataConfig(root=root, source="cvr", batch_size=200, eval_batch_size=500, synthetic_preset=""),
        train=TrainConfig(run_dir=run_dir, log_every=4, days=(D1,), eval_day="none", max_steps_per_day=4),
        model=SMALL_MODEL,
    )
    run(config, ctx)


def infer_days(rank: int, world_size: int, snapshot: str, root: str, out: str, dedup_first: bool) -> dict:
    """Embeds days 1 and 2 with the snapshot (one call per day), then tries day 1 again: counts
    per day, and the refusal to overwrite under ``"refused"``. Run with ``run_ranks``."""
    from embeddings.infer import Embedder, infer_day

    embedder = Embedder.load(snapshot, root, torch.device("cpu"))
    counts = {day: infer_day(embedder, day, out, batch_size=300, dedup_first=dedup_first) for day in INFER_DAYS}
    try:
        infer_day(embedder, INFER_DAYS[0], out)
    except FileExistsError as e:
        counts["refused"] = str(e)
    return counts
