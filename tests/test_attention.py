"""The fast attention path (modules/attention.py) against PyTorch's own encoder layer, and the
training-speed changes that must not change the math: query-pruned sequence encoders, the
contrastive loss scored on positive rows only, bfloat16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modules.attention import SelfAttention, TransformerEncoder, TransformerEncoderLayer, attention_flops, set_attention
from modules.losses import SampledSoftmaxLoss

B, L, D, H = 16, 9, 32, 2


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g)
    lengths = torch.randint(0, L, (B,), generator=g)
    padding = torch.arange(L).unsqueeze(0) > lengths.unsqueeze(1)  # [B, L], True = padding
    padding[:, 0] = False  # the summary slot is never padding
    return x, padding


def _forward_backward(module: nn.Module, x: torch.Tensor, call) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(output, input gradient, parameter gradients by name) of ``call(module, x)`` against a fixed
    random output gradient."""
    module.zero_grad()
    x = x.clone().requires_grad_()
    out = call(module, x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


def _assert_same(a, b, atol=1e-5, rtol=1e-4) -> None:
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=rtol)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("kernel", ["sdpa", "reference"])
def test_layer_equals_torch_encoder_layer(kernel):
    torch.manual_seed(0)
    ours = TransformerEncoderLayer(D, H, 2 * D)
    theirs = nn.TransformerEncoderLayer(D, H, 2 * D, 0.0, batch_first=True, norm_first=True)
    ours.load_state_dict(theirs.state_dict())  # same parameter names: loads both ways
    theirs.load_state_dict(ours.state_dict())
    set_attention(ours, kernel)
    x, padding = _inputs()
    got = _forward_backward(ours, x, lambda m, t: m(t, padding))
    want = _forward_backward(theirs, x, lambda m, t: m(t, src_key_padding_mask=padding))
    _assert_same(got, want)


def test_fresh_layer_initialises_like_multihead_attention():
    torch.manual_seed(0)
    attn = SelfAttention(D, H)
    assert attn.in_proj_weight.shape == (3 * D, D) and attn.in_proj_bias.abs().sum() == 0
    assert attn.out_proj.bias.abs().sum() == 0
    with pytest.raises(ValueError, match="must divide"):
        SelfAttention(D, 3)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_first_query_only_equals_full_encoder(num_layers):
    torch.manual_seed(0)
    encoder = TransformerEncoder(num_layers, D, H, 2 * D)
    x, padding = _inputs()
    pruned = _forward_backward(encoder, x, lambda m, t: m(t, padding, num_queries=1))
    full = _forward_backward(encoder, x, lambda m, t: m(t, padding)[:, :1])
    assert pruned[0].shape == (B, 1, D)
    _assert_same(pruned, full)


def test_reference_kernel_also_takes_num_queries():
    torch.manual_seed(0)
    encoder = TransformerEncoder(1, D, H, 2 * D)
    x, padding = _inputs()
    fast = _forward_backward(encoder, x, lambda m, t: m(t, padding, num_queries=1))
    assert set_attention(encoder, "reference") == 1
    ref = _forward_backward(encoder, x, lambda m, t: m(t, padding, num_queries=1))
    _assert_same(fast, ref)
    with pytest.raises(ValueError, match="attention kernel"):
        set_attention(encoder, "flash")


def test_bf16_autocast_is_close_to_float32():
    torch.manual_seed(0)
    encoder = TransformerEncoder(2, D, H, 2 * D)
    x, padding = _inputs()
    fp32 = _forward_backward(encoder, x, lambda m, t: m(t, padding))

    def bf16(m, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(t, padding).float()

    low = _forward_backward(encoder, x, bf16)
    # bfloat16 keeps 8 significant bits: ~2e-3 relative error on the output here. Gradients carry
    # more (1-7 % by relative norm on this layer's weights: ReLU and LayerNorm backward amplify
    # rounding near their kinks), so they are compared by relative norm, not element-wise.
    rel = lambda got, want: ((got - want).norm() / want.norm()).item()  # noqa: E731
    assert rel(low[0], fp32[0]) < 0.01
    assert rel(low[1], fp32[1]) < 0.05
    for name in fp32[2]:
        assert rel(low[2][name], fp32[2][name]) < 0.15, name


def test_attention_flops():
    assert attention_flops(2, 3, 5, 5, 7) == 4 * 2 * 3 * 5 * 5 * 7
    assert attention_flops(2, 3, 1, 5, 7) == 4 * 2 * 3 * 1 * 5 * 7  # one query over five keys


@pytest.mark.parametrize("logq", [False, True])
def test_contrastive_loss_scored_on_positive_rows_equals_all_rows(logq):
    torch.manual_seed(0)
    n, e = 64, 8
    user, pin = torch.randn(n, e, requires_grad=True), torch.randn(n, e, requires_grad=True)
    ids = torch.randint(0, 20, (n,))  # many accidental hits
    positive = torch.rand(n) < 0.2
    log_q = -torch.rand(n) * 3 if logq else None
    results = []
    for all_rows in (False, True):
        loss_fn = SampledSoftmaxLoss(init_temperature=0.2, logq_correction=logq)
        loss_fn.score_all_rows = all_rows
        loss = loss_fn(user, pin, ids, positive, log_q)
        grads = torch.autograd.grad(loss, [user, pin, loss_fn.log_inv_temperature])
        results.append((loss.detach(), *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_contrastive_loss_without_positives_is_zero_with_zero_gradients():
    user, pin = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    loss = SampledSoftmaxLoss(logq_correction=False)(user, pin, torch.arange(5), torch.zeros(5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(user.grad, torch.zeros_like(user))


def _derm_grads(task, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, every dense gradient flattened into one vector) of one forward and backward."""
    task.zero_grad()
    loss, _ = task(batch)
    loss.backward()
    grads = [p.grad.flatten() for n, p in task.named_parameters() if p.grad is not None and ".ebc." not in n and ".ec." not in n]
    return loss.detach(), torch.cat(grads)


@pytest.mark.slow
def test_derm_step_fast_path_equals_reference_and_bf16_is_close(tiny_world):
    """A whole upstream step: the fast path (SDPA attention, pruned sequence queries, positive-row
    contrastive scoring) equals the reference path; a bfloat16-autocast step is close to both."""
    from data.loader import make_loader
    from data.spec import load_spec
    from modules.config import DERMConfig
    from modules.derm import build_derm

    torch.manual_seed(0)
    spec = load_spec(tiny_world / "spec.toml")
    task = build_derm(spec, "ctr", DERMConfig(), device=torch.device("cpu"))
    batch = next(iter(make_loader(tiny_world, "ctr", batch_size=256, days=["2026-01-03"])))
    task.loss.estimator.update(batch.pin_id)  # training-mode forwards update it again: freeze it
    task.loss.eval()

    fast = _derm_grads(task, batch)
    assert set_attention(task, "reference") == 7  # 3 towers x 2 DHEN transformer modules + the sequence encoder
    task.loss.contrastive.score_all_rows = True
    reference = _derm_grads(task, batch)
    torch.testing.assert_close(fast[0], reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], reference[1], rtol=1e-4, atol=1e-5)

    set_attention(task, "sdpa")
    task.loss.contrastive.score_all_rows = False
    task.set_mixed_precision("bf16", "cpu")
    low = _derm_grads(task, batch)
    assert abs(low[0] - fast[0]) / fast[0] < 0.01
    assert (low[1] - fast[1]).norm() / fast[1].norm() < 0.1


def test_auto_mixed_precision_follows_the_hardware(monkeypatch):
    from modules import precision

    monkeypatch.setattr(precision, "has_bf16_matrix_units", lambda device_type: device_type == "cpu")
    assert precision.resolve_mixed_precision("auto", "cpu") == "bf16"
    assert precision.resolve_mixed_precision("auto", "cuda") == "none"
    assert precision.resolve_mixed_precision("none", "cpu") == "none"
    with pytest.raises(ValueError, match="mixed precision must be one of"):
        precision.resolve_mixed_precision("fp16", "cpu")


def test_thread_policy(monkeypatch):
    from sharding.distributed import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_threads() == 4 and torch.get_num_threads() == 4
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
        assert set_threads() == 1
        assert set_threads(3) == 3
        with pytest.raises(ValueError, match="threads must be >= 0"):
            set_threads(-1)
        monkeypatch.setenv("DERM_THREADS", "2")  # the pipeline's share for jobs side by side on one host
        assert set_threads() == 2 and set_threads(3) == 3
        monkeypatch.setenv("DERM_THREADS", "0")
        with pytest.raises(ValueError, match="DERM_THREADS must be >= 1"):
            set_threads()
    finally:
        torch.set_num_threads(before)
