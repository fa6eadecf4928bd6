"""The upstream DERM model on random batches of the tiny world's spec (no world generated): shapes, unit-norm embeddings,
gradients everywhere, meta builds, FX tracing, and the model under DistributedModelParallel."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchrec.fx

from modules.baselines import LogisticRegression
from modules.config import DERMConfig, DHENConfig
from modules.derm import DERMOutput, build_derm
from tests.helpers import random_batch, tiny_spec

SMALL = DERMConfig(
    token_dim=16,
    embedding_tokens=2,
    user_dhen=DHENConfig(layers=(("masknet", "transformer"), ("mlp", "dcn")), mlp_hidden=64, masknet_block_dim=32),
    pin_dhen=DHENConfig(layers=(("mlp", "transformer"),), mlp_hidden=64),
    interaction_dhen=DHENConfig(layers=(("transformer", "masknet"),), out_tokens=2, masknet_block_dim=32),
    head_hidden=(16,),
)


def _batch(source, size=128):
    """A random batch that fits the tiny world's spec (``tests.helpers.random_batch``)."""
    return random_batch(tiny_spec(), source, size)


@pytest.mark.parametrize("source", ["ctr", "cvr"])
def test_forward_shapes_unit_norm_and_gradients_everywhere(source):
    torch.manual_seed(0)
    spec = tiny_spec()
    task = build_derm(spec, source, SMALL, device=torch.device("cpu"))
    batch = _batch(source)
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


def test_centred_embeddings_and_normalised_counts():
    """model.center: the tower's pre-norm embedding has zero batch mean in training (no direction
    common to every entity) and uses running statistics in eval; model.dense_norm: the counts enter
    the scalar token centred."""
    torch.manual_seed(0)
    spec = tiny_spec()
    config = dataclasses.replace(SMALL, center=("user", "pin"), dense_norm="batch")
    task = build_derm(spec, "ctr", config, device=torch.device("cpu"))
    seen = {}
    for tower in ("user_tower", "pin_tower"):
        module = getattr(task.model, tower)
        assert isinstance(module.center, torch.nn.BatchNorm1d) and isinstance(module.inputs.scalar_norm, torch.nn.BatchNorm1d)
        module.center.register_forward_hook(lambda m, i, o, name=tower: seen.__setitem__(name, o))
        module.inputs.scalar_norm.register_forward_hook(lambda m, i, o, name=tower: seen.__setitem__(name + "/counts", o))
    batch = _batch("ctr")
    _, (_, out) = task(batch)
    for name, value in seen.items():
        torch.testing.assert_close(value.mean(0), torch.zeros(value.shape[1]), atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(out.pin_embedding.norm(dim=1), torch.ones(128))
    task.eval()
    center = task.model.user_tower.center
    inputs = {}
    center.register_forward_hook(lambda m, i, o: inputs.update(x=i[0], y=o))
    with torch.no_grad():
        task(batch)
    expected = (inputs["x"] - center.running_mean) / torch.sqrt(center.running_var + center.eps)
    torch.testing.assert_close(inputs["y"], expected)  # running statistics in eval, not the batch's
    uncentred = build_derm(spec, "ctr", dataclasses.replace(SMALL, center=(), dense_norm="none")).model.pin_tower
    assert isinstance(uncentred.center, torch.nn.Identity) and isinstance(uncentred.inputs.scalar_norm, torch.nn.Identity)


def test_batch_norm_takes_a_one_row_training_batch():
    """A day's last batch can hold one row: normalised with the running statistics, not an error."""
    from modules.towers import BatchNorm

    norm = BatchNorm(3)
    norm(torch.randn(64, 3))  # training: batch statistics, running ones updated
    before = norm.running_mean.clone()
    row = torch.randn(1, 3)
    expected = (row - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
    torch.testing.assert_close(norm(row), expected * norm.weight + norm.bias)
    torch.testing.assert_close(norm.running_mean, before)


def test_dot_logit_adds_the_scaled_dot_product_to_every_task():
    """model.dot_logit: each task's logit is the interaction tower's plus a_t <u, v>, with the
    scale learned (the BCE heads then train the published dot product); the model still traces."""
    torch.manual_seed(0)
    spec = tiny_spec()
    task = build_derm(spec, "cvr", dataclasses.replace(SMALL, dot_logit=True), device=torch.device("cpu"))
    model = task.model
    with torch.no_grad():
        model.dot_scale.copy_(torch.arange(1.0, len(model.labels) + 1))
    model.eval()
    batch = _batch("cvr")
    with torch.no_grad():
        out = model(batch)
        user, pin = model.user_tower(*_inputs(model, batch)), model.pin_tower(*_inputs(model, batch))
        tower = model.interaction(user[0], pin[0], *_inputs(model, batch))
    dot = (out.user_embedding * out.pin_embedding).sum(1, keepdim=True)
    torch.testing.assert_close(out.logits, tower + dot * model.dot_scale)
    torch.testing.assert_close(torchrec.fx.symbolic_trace(model)(batch).logits, out.logits)
    model.train()
    loss, _ = task(batch)
    loss.backward()
    assert model.dot_scale.grad is not None and torch.all(model.dot_scale.grad != 0)
    assert build_derm(spec, "cvr", SMALL).model.dot_scale is None  # off by default: the paper's heads


def _inputs(model, batch):
    pooled = model.ebc(batch.sparse).to_dict()
    return pooled, model.ec(batch.sequence) if model.ec is not None else {}, batch.sequence_side, batch.dense


def test_builds_on_meta():
    spec = tiny_spec()
    task = build_derm(spec, "cvr", SMALL, device=torch.device("meta"))
    assert {p.device.type for p in task.parameters()} == {"meta"}
    assert {b.device.type for b in task.buffers()} == {"meta"}
    # Tables on meta and dense parts on a real device: what sharding/ hands to DMP.
    split = build_derm(spec, "cvr", SMALL, device=torch.device("cpu"), embedding_device=torch.device("meta"))
    devices = {n.split(".")[1]: p.device.type for n, p in split.named_parameters() if n.startswith("model.")}
    assert devices["ebc"] == devices["ec"] == "meta" and devices["user_tower"] == "cpu"


def test_fx_traces_like_torchrec_pipelines_do():
    torch.manual_seed(0)
    spec = tiny_spec()
    model = build_derm(spec, "ctr", SMALL, device=torch.device("cpu")).model.eval()
    batch = _batch("ctr", 32)
    traced = torchrec.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(batch).logits, model(batch).logits)


def test_bad_model_arguments():
    spec = tiny_spec()
    with pytest.raises(ValueError, match=r"positive_labels \['purchase'\] are not labels of source 'ctr'"):
        build_derm(spec, "ctr", DERMConfig(positive_labels=("purchase",)))
    with pytest.raises(ValueError, match="task_weights has 1 entries; source 'ctr' has 2 labels"):
        build_derm(spec, "ctr", DERMConfig(task_weights=(1.0,)))
    with pytest.raises(ValueError, match="center names entity towers"):
        DERMConfig(center=("item",))
    with pytest.raises(ValueError, match="dense_norm must be one of"):
        DERMConfig(dense_norm="layer")
    with pytest.raises(ValueError, match=r"1 / init_temperature \(100\) exceeds max_inv_temperature \(20\)"):
        DERMConfig(init_temperature=0.01, max_inv_temperature=20.0)


def test_logistic_regression_baseline_runs():
    spec = tiny_spec().for_source("cvr")
    lr = LogisticRegression(spec)
    batch = _batch("cvr", 64)
    logits = lr(batch)
    assert logits.shape == (64, 3)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    assert lr.sparse["user_id"].weight.grad is not None
