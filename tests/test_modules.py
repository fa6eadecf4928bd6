"""DHEN, MaskNet and the sequence encoder: shapes, gradients, FX tracing, meta builds, bad config."""

from __future__ import annotations

import pytest
import torch
from torch import fx
from torchrec.sparse.jagged_tensor import JaggedTensor

from data.spec import SequenceFeature, SideList
from modules.config import DERMConfig, DHENConfig, SequenceConfig
from modules.dhen import DHEN, interaction_module
from modules.masknet import MaskBlock, MaskNet
from modules.sequence import SequenceEncoder


def _grads_everywhere(module: torch.nn.Module) -> None:
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_masknet_shapes_gradients_and_trace(mode):
    torch.manual_seed(0)
    net = MaskNet(24, num_blocks=3, block_dim=16, mode=mode, parallel_hidden=(12,))
    x = torch.randn(5, 24)
    y = net(x)
    assert y.shape == (5, net.output_dim()) == (5, 16 if mode == "serial" else 12)
    y.pow(2).sum().backward()
    _grads_everywhere(net)
    traced = fx.symbolic_trace(net)
    torch.testing.assert_close(traced(x), net(x))


def test_mask_block_is_instance_guided():
    """The mask depends on the instance: the same hidden input under two embeddings differs."""
    torch.manual_seed(0)
    block = MaskBlock(emb_dim=6, input_dim=4, output_dim=3)
    hidden = torch.randn(1, 4).expand(2, 4)
    out = block(torch.randn(2, 6), hidden)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("kind", ["masknet", "transformer", "mlp", "dcn"])
def test_each_interaction_module_maps_tokens(kind):
    torch.manual_seed(0)
    m = interaction_module(kind, in_tokens=5, out_tokens=3, token_dim=8, config=DHENConfig(num_heads=2, mlp_hidden=32))
    x = torch.randn(4, 5, 8, requires_grad=True)
    y = m(x)
    assert y.shape == (4, 3, 8)
    y.sum().backward()
    assert x.grad is not None and torch.any(x.grad != 0)


@pytest.mark.parametrize(
    "layers",
    [(("masknet", "transformer"), ("mlp", "transformer")), (("dcn", "mlp"),), (("transformer", "transformer"), ("masknet", "dcn"), ("mlp", "masknet"))],
)
def test_dhen_tokens_in_tokens_out(layers):
    torch.manual_seed(0)
    dhen = DHEN(num_tokens=6, token_dim=8, config=DHENConfig(layers=layers, out_tokens=2, num_heads=2, mlp_hidden=32)).eval()
    x = torch.randn(3, 6, 8)
    y = dhen(x)
    assert y.shape == (3, 2, 8) and dhen.output_dim() == 16
    # LayerNorm after every layer: each output token is normalised over D.
    torch.testing.assert_close(y.mean(-1), torch.zeros(3, 2), atol=1e-5, rtol=0)
    y.pow(3).sum().backward()
    _grads_everywhere(dhen)
    torch.testing.assert_close(fx.symbolic_trace(dhen)(x), dhen(x))


def test_dhen_builds_on_meta():
    dhen = DHEN(num_tokens=6, token_dim=8, config=DHENConfig(layers=(("dcn", "masknet"), ("mlp", "transformer")), num_heads=2), device=torch.device("meta"))
    assert {p.device.type for p in dhen.parameters()} == {"meta"}
    assert dhen(torch.empty(3, 6, 8, device="meta")).shape == (3, 4, 8)


def _sequence_feature() -> SequenceFeature:
    return SequenceFeature(
        "user_seq", "user", num_embeddings=50, embedding_dim=12, max_length=4,
        side=(SideList("action", "a", "id", num_embeddings=4), SideList("age", "g", "value", transform="log1p")),
    )


def test_sequence_encoder_handles_empty_rows_and_uses_side_lists():
    torch.manual_seed(0)
    enc = SequenceEncoder(_sequence_feature(), token_dim=8, config=SequenceConfig(num_heads=2)).eval()
    lengths = torch.tensor([3, 0, 4])
    seq = JaggedTensor(values=torch.randn(7, 12, requires_grad=True), lengths=lengths)
    side = {"action": torch.tensor([[1, 2, 1, 0], [0, 0, 0, 0], [3, 3, 1, 2]]), "age": torch.rand(3, 4)}
    out = enc(seq, side)
    assert out.shape == (3, 8) and torch.isfinite(out).all()  # the empty row (a new user) is defined
    # Padding is masked: changing a padded slot's side value changes nothing.
    side2 = {"action": side["action"], "age": side["age"].clone()}
    side2["age"][0, 3] = 100.0
    torch.testing.assert_close(enc(seq, side2), out)
    # A real slot's action type matters.
    side3 = {"action": side["action"].clone(), "age": side["age"]}
    side3["action"][0, 0] = 3
    assert not torch.allclose(enc(seq, side3)[0], out[0])
    enc.train()
    # A weighted sum: the plain sum of a LayerNorm's output has an exactly zero gradient.
    (enc(seq, side) * torch.randn(3, 8)).sum().backward()
    _grads_everywhere(enc)


def test_sequence_encoder_traces():
    torch.manual_seed(0)
    enc = SequenceEncoder(_sequence_feature(), token_dim=8, config=SequenceConfig(num_heads=2)).eval()
    seq = JaggedTensor(values=torch.randn(5, 12), lengths=torch.tensor([2, 3]))
    side = {"action": torch.tensor([[1, 2, 0, 0], [3, 1, 1, 0]]), "age": torch.rand(2, 4)}
    traced = fx.symbolic_trace(enc)
    torch.testing.assert_close(traced(seq, side), enc(seq, side))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DHENConfig(layers=(("masknet", "lstm"),)), r"dhen.layers\[0\] must be two of"),
        (lambda: DHENConfig(layers=()), "dhen.layers must name at least one layer"),
        (lambda: DHENConfig(masknet_mode="tree"), "dhen.masknet_mode must be one of"),
        (lambda: DHENConfig(out_tokens=0), "dhen.out_tokens must be >= 1"),
        (lambda: DERMConfig(token_dim=30, user_dhen=DHENConfig(num_heads=4)), r"user_dhen.num_heads \(4\) must divide token_dim \(30\)"),
        (lambda: DERMConfig(init_temperature=0), "init_temperature must be > 0"),
        (lambda: DERMConfig(contrastive_weight=-1), "contrastive_weight must be >= 0"),
        (lambda: MaskNet(8, mode="diagonal"), "MaskNet mode must be serial or parallel"),
    ],
)
def test_bad_config_is_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()
