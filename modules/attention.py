"""The pre-norm transformer encoder layer of the DHEN transformer modules and the sequence encoders
(paper §3.1, Appendix A.1), written for speed on the training path.

Same computation, parameters and state-dict keys as ``nn.TransformerEncoderLayer(d_model, heads,
2·d_model, dropout, batch_first=True, norm_first=True)`` with a ReLU feed-forward::

    x = x + Dropout( SelfAttention( LayerNorm_1(x) ) )
    x = x + Dropout( W_2 · Dropout( ReLU( W_1 · LayerNorm_2(x) ) ) )
    SelfAttention(h) = W_o · concat_heads( softmax( Q_h K_hᵀ / √d ) V_h ),   [Q K V] = W_in h + b_in

Why not ``nn.MultiheadAttention``: in training it runs the packed in-projection path, whose backward
zero-fills and clones three [3, L, B, D] buffers (about 10 % of a DERM step on CPU; measured in
``bench/bench_train.py``). Here one linear makes Q, K and V, a ``view`` splits them into heads
without copying, and ``F.scaled_dot_product_attention`` attends. Under CPU autocast the
projections run in bfloat16 and the attention core in float32: on this project's shapes (B·H
matrices of L ≤ 33 by d = 16) the fused CPU kernel's bfloat16 backward was 4-7× slower than its
float32 one, and the math backend's bfloat16 batched matmuls 2-5× (docs/benchmarks.md).

A reader of the first N tokens alone (the sequence encoder's summary token) passes
``num_queries = N``: every token is still a key and a value, but only N queries, output
projections and feed-forwards are computed.

:func:`set_attention` (``model, "reference"``) switches the layers back to the path before issue 13:
``nn.MultiheadAttention``'s own function on the same parameters, every token through every layer.
The baseline of the speed benchmark and of the tests.

Glossary: B batch, L tokens (sequence length), D width, H heads, d = D / H.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_KERNELS = ("sdpa", "reference")


class SelfAttention(nn.Module):
    """Multi-head self-attention with one packed input projection. [B, L, D] -> [B, L, D].

    Parameter names and initialisation are ``nn.MultiheadAttention``'s (``in_proj_weight`` [3D, D],
    ``in_proj_bias`` [3D], ``out_proj``), so its state dicts load either way.

    Args:
        dim: D.
        num_heads: H (must divide D).
        dropout: dropout on the attention weights in training.
        device: where to build the parameters (``meta`` works).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, device=None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the width ({dim})")
        self.dim, self.num_heads, self.dropout = dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, device=device))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim, device=device))
        self.out_proj = nn.Linear(dim, dim, device=device)
        self.kernel = "sdpa"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, num_queries: Optional[int] = None) -> torch.Tensor:
        """``x`` [B, L, D]; ``key_padding_mask`` [B, L] bool, True = a padded slot no token attends
        to; ``num_queries`` N: only the first N tokens attend (all L by default) -> [B, N, D]."""
        if self.kernel == "reference":
            return self._reference(x, key_padding_mask)[:, :num_queries]  # every query, then the slice
        D = self.dim
        if num_queries is None:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
            q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
        else:  # keys and values of every token, queries of the first N only
            q = F.linear(x[:, :num_queries], self.in_proj_weight[:D], self.in_proj_bias[:D])  # [B, N, D]
            kv = F.linear(x, self.in_proj_weight[D:], self.in_proj_bias[D:])  # [B, L, 2D]
            k, v = kv[..., :D], kv[..., D:]
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # [B, 1, 1, L], True = attend
        dropout = self.dropout if self.training else 0.0
        if torch.is_autocast_enabled("cpu"):
            # The core in float32: on CPU the bfloat16 kernels for these many tiny [L, d] matrices
            # are several times slower than the float32 ones (the fused kernel's backward most).
            # (CPU autocast covers CPU tensors only; a plain Python test, so FX can trace it.)
            with torch.autocast("cpu", enabled=False):
                out = self._attend(q.float(), k.float(), v.float(), mask, dropout)
        else:
            out = self._attend(q, k, v, mask, dropout)
        return self.out_proj(out)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], dropout: float) -> torch.Tensor:
        """Queries [B, N, D], keys and values [B, L, D] -> [B, N, D], heads attended and concatenated."""
        B, N, L, H = q.shape[0], q.shape[1], k.shape[1], self.num_heads
        d = self.dim // H
        heads = lambda t, n: t.view(B, n, H, d).transpose(1, 2)  # noqa: E731  [B, n, D] -> [B, H, n, d], no copy
        out = F.scaled_dot_product_attention(heads(q, N), heads(k, L), heads(v, L), attn_mask=mask, dropout_p=dropout)
        return out.transpose(1, 2).reshape(B, N, self.dim)  # [B, H, N, d] -> [B, N, D]

    def _reference(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``nn.MultiheadAttention``'s training path on these parameters (batch-first in and out)."""
        t = x.transpose(0, 1)  # [L, B, D]
        out, _ = F.multi_head_attention_forward(
            t, t, t, self.dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, None, None, False,
            self.dropout, self.out_proj.weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=False,
        )
        return out.transpose(0, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, dropout={self.dropout}, kernel={self.kernel}"


class TransformerEncoderLayer(nn.Module):
    """Pre-norm encoder layer (see the module docstring). [B, L, D] -> [B, L, D].

    Args:
        dim: D.
        num_heads: H.
        ffn_dim: hidden width of the feed-forward block.
        dropout: on the attention weights, the feed-forward hidden layer and both residual branches.
        device: where to build the parameters (``meta`` works).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0, device=None) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads, dropout, device)
        self.norm1 = nn.LayerNorm(dim, device=device)
        self.norm2 = nn.LayerNorm(dim, device=device)
        self.linear1 = nn.Linear(dim, ffn_dim, device=device)
        self.linear2 = nn.Linear(ffn_dim, dim, device=device)
        self.dropout = nn.Dropout(dropout)  # the feed-forward's hidden layer
        self.dropout1 = nn.Dropout(dropout)  # the attention branch
        self.dropout2 = nn.Dropout(dropout)  # the feed-forward branch

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, num_queries: Optional[int] = None) -> torch.Tensor:
        """``x`` [B, L, D], ``key_padding_mask`` [B, L] (True = padding) -> [B, N, D]: the outputs
        of the first ``num_queries`` = N tokens (all L by default). Every token is still attended
        to; a reader of the first token alone (the sequence encoder's summary) skips the rest of
        the queries, the output projection and the feed-forward of L - 1 tokens."""
        if self.self_attn.kernel == "reference" and num_queries is not None:
            return self.forward(x, key_padding_mask)[:, :num_queries]  # as before: every token, then the slice
        x = x[:, :num_queries] + self.dropout1(self.self_attn(self.norm1(x), key_padding_mask, num_queries))
        return x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(self.norm2(x))))))


class TransformerEncoder(nn.Module):
    """``num_layers`` :class:`TransformerEncoderLayer`s in a row (state-dict keys ``layers.<i>.*``, as
    ``nn.TransformerEncoder``'s without a final norm)."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0, device=None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(dim, num_heads, ffn_dim, dropout, device) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, num_queries: Optional[int] = None) -> torch.Tensor:
        """[B, L, D] -> [B, N, D], the last layer's outputs of the first ``num_queries`` = N tokens
        (all L by default; the layers before it compute every token, which the last one reads)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, key_padding_mask, num_queries if i == last else None)
        return x


def set_attention(model: nn.Module, kernel: str) -> int:
    """Switches every :class:`SelfAttention` in ``model`` to ``kernel`` (sdpa or reference); -> how
    many it switched."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
    for m in layers:
        m.kernel = kernel
    return len(layers)


def attention_flops(batch: int, heads: int, queries: int, keys: int, head_dim: int) -> int:
    """Forward FLOPs of the attention product and weighted sum of one call, 4·B·H·N·L·d for N
    queries over L keys (the CPU SDPA kernels are invisible to ``torch.utils.flop_counter``;
    backward is about twice this)."""
    return 4 * batch * heads * queries * keys * head_dim


__all__ = ["SelfAttention", "TransformerEncoderLayer", "TransformerEncoder", "set_attention", "attention_flops", "ATTENTION_KERNELS"]
