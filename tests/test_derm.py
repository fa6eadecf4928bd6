"""The upstream DERM model on real batches of the tiny world: shapes, unit-norm embeddings,
gradients everywhere, meta builds, FX tracing, and the model under DistributedModelParallel."""

from __future__ import annotations

import pytest
import torch
import torchrec.fx

from modules.baselines import LogisticRegression
from modules.config import DERMConfig, DHENConfig
from modules.derm import DERMOutput, build_derm
from trainer.data.loader import make_loader
from trainer.data.spec import load_spec

SMALL = DERMConfig(
    token_dim=16,
    embedding_tokens=2,
    user_dhen=DHENConfig(layers=(("masknet", "transformer"), ("mlp", "dcn")), mlp_hidden=64, masknet_block_dim=32),
    pin_dhen=DHENConfig(layers=(("mlp", "transformer"),), mlp_hidden=64),
    interaction_dhen=DHENConfig(layers=(("transformer", "masknet"),), out_tokens=2, masknet_block_dim=32),
    head_hidden=(16,),
)


def _batch(root, source, size=128):
    """A batch of the last day, when every counting feature has history (day 1's are all zero)."""
    return next(iter(make_loader(root, source, batch_size=size, days=["2026-01-03"])))


@pytest.mark.parametrize("source", ["ctr", "cvr"])
def test_forward_shapes_unit_norm_and_gradients_everywhere(tiny_world, source):
    torch.manual_seed(0)
    spec = load_spec(tiny_world / "spec.toml")
    task = build_derm(spec, source, SMALL, device=torch.device("cpu"))
    batch = _batch(tiny_world, source)
    loss, (parts, out) = task(batch)
    T = len(spec.source(source).labels)
    assert isinstance(out, DERMOutput)
    assert out.logits.shape == (128, T)
    assert out.user_embedding.shape == out.pin_embedding.shape == (128, SMALL.embedding_dim)
    torch.testing.assert_close(out.user_embedding.norm(dim=1), torch.ones(128))
    torch.testing.assert_close(out.pin_embedding.norm(dim=1), torch.ones(128))
    assert torch.isfinite(loss) and parts["contrastive"] > 0
    loss.backward()
    dead = [n for n, p in task.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, f"no gradient reached {dead}"


def test_builds_on_meta(tiny_world):
    spec = load_spec(tiny_world / "spec.toml")
    task = build_derm(spec, "cvr", SMALL, device=torch.device("meta"))
    assert {p.device.type for p in task.parameters()} == {"meta"}
    assert {b.device.type for b in task.buffers()} == {"meta"}
    # Tables on meta and dense parts on a real device: what sharding/ hands to DMP.
    split = build_derm(spec, "cvr", SMALL, device=torch.device("cpu"), embedding_device=torch.device("meta"))
    devices = {n.split(".")[1]: p.device.type for n, p in split.named_parameters() if n.startswith("model.")}
    assert devices["ebc"] == devices["ec"] == "meta" and devices["user_tower"] == "cpu"


def test_fx_traces_like_torchrec_pipelines_do(tiny_world):
    torch.manual_seed(0)
    spec = load_spec(tiny_world / "spec.toml")
    model = build_derm(spec, "ctr", SMALL, device=torch.device("cpu")).model.eval()
    batch = _batch(tiny_world, "ctr", 32)
    traced = torchrec.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(batch).logits, model(batch).logits)


def test_bad_model_arguments(tiny_world):
    spec = load_spec(tiny_world / "spec.toml")
    with pytest.raises(ValueError, match=r"positive_labels \['purchase'\] are not labels of source 'ctr'"):
        build_derm(spec, "ctr", DERMConfig(positive_labels=("purchase",)))
    with pytest.raises(ValueError, match="task_weights has 1 entries; source 'ctr' has 2 labels"):
        build_derm(spec, "ctr", DERMConfig(task_weights=(1.0,)))


def test_logistic_regression_baseline_runs(tiny_world):
    spec = load_spec(tiny_world / "spec.toml").for_source("cvr")
    lr = LogisticRegression(spec)
    batch = _batch(tiny_world, "cvr", 64)
    logits = lr(batch)
    assert logits.shape == (64, 3)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    assert lr.sparse["user_id"].weight.grad is not None
