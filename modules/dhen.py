"""DHEN: a Deep and Hierarchical Ensemble Network of feature-interaction modules (Zhang et al. 2022),
the backbone of every DERM tower (paper §3.1; Zhuang et al. 2025).

Tokens in, tokens out. Each layer runs two interaction modules on the same tokens, ensembles them
by summation, and adds a residual and a LayerNorm::

    y_l = LayerNorm( m_a(x_l) + m_b(x_l) + R_l x_l )        x_l: [B, T_l, D] -> y_l: [B, T_{l+1}, D]

where R_l mixes tokens (a learned T_l -> T_{l+1} map over the token axis; the identity when the
count is kept). Every layer keeps the token count except the last, which emits ``out_tokens``.

The modules (chosen per layer in :class:`~modules.config.DHENConfig`):

- ``transformer``: a pre-norm transformer encoder layer over the tokens
  (:class:`~modules.attention.TransformerEncoderLayer`), then the token map;
- ``mlp``: TorchRec ``MLP`` over the flattened tokens;
- ``masknet``: :class:`~modules.masknet.MaskNet` over the flattened tokens;
- ``dcn``: TorchRec ``LowRankCrossNet`` (DCNv2) over the flattened tokens.

Flat modules end in a linear map to ``T_{l+1} · D`` values, reshaped into tokens.

Glossary: B batch, T tokens, D token width.

Example::

    dhen = DHEN(num_tokens=6, token_dim=32, config=DHENConfig(out_tokens=2))
    dhen(torch.randn(8, 6, 32)).shape == (8, 2, 32)
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.mlp import MLP

from modules.attention import TransformerEncoderLayer
from modules.config import DHENConfig
from modules.masknet import MaskNet


class TokenMixer(nn.Module):
    """A learned map over the token axis: [B, T_in, D] -> [B, T_out, D]."""

    def __init__(self, in_tokens: int, out_tokens: int, device=None) -> None:
        super().__init__()
        self.proj = nn.Linear(in_tokens, out_tokens, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.transpose(1, 2)).transpose(1, 2)


class TransformerModule(nn.Module):
    """Self-attention across tokens, then a token map to the layer's output count."""

    def __init__(self, in_tokens: int, out_tokens: int, token_dim: int, config: DHENConfig, device=None) -> None:
        super().__init__()
        self.layer = TransformerEncoderLayer(token_dim, config.num_heads, 2 * token_dim, config.dropout, device)
        self.mix = TokenMixer(in_tokens, out_tokens, device) if in_tokens != out_tokens else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.layer(x))


class FlatModule(nn.Module):
    """A module over the flattened tokens [B, T·D], read back as ``out_tokens`` tokens."""

    def __init__(self, body: nn.Module, body_dim: int, out_tokens: int, token_dim: int, device=None) -> None:
        super().__init__()
        self.body = body
        self.out = nn.Linear(body_dim, out_tokens * token_dim, device=device)
        self.out_tokens, self.token_dim = out_tokens, token_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)  # [B, T * D]
        return self.out(self.body(flat)).reshape(-1, self.out_tokens, self.token_dim)


def interaction_module(kind: str, in_tokens: int, out_tokens: int, token_dim: int, config: DHENConfig, device=None) -> nn.Module:
    """One of DHEN's feature-interaction modules, mapping [B, in_tokens, D] -> [B, out_tokens, D]."""
    width = in_tokens * token_dim
    if kind == "transformer":
        return TransformerModule(in_tokens, out_tokens, token_dim, config, device)
    if kind == "mlp":
        body, dim = MLP(width, [config.mlp_hidden], device=device), config.mlp_hidden
    elif kind == "masknet":
        body = MaskNet(width, config.masknet_blocks, config.masknet_block_dim, config.masknet_reduction,
                       config.masknet_mode, (config.masknet_block_dim,), device=device)
        dim = body.output_dim()
    elif kind == "dcn":
        body, dim = LowRankCrossNet(width, config.dcn_layers, config.dcn_low_rank), width
        body = body.to(device) if device is not None else body
    else:
        raise ValueError(f"unknown DHEN module {kind!r}")
    return FlatModule(body, dim, out_tokens, token_dim, device)


class DHENLayer(nn.Module):
    """Two interaction modules ensembled by summation, plus residual and LayerNorm (see module doc)."""

    def __init__(self, kinds: tuple[str, str], in_tokens: int, out_tokens: int, token_dim: int, config: DHENConfig, device=None):
        super().__init__()
        self.first = interaction_module(kinds[0], in_tokens, out_tokens, token_dim, config, device)
        self.second = interaction_module(kinds[1], in_tokens, out_tokens, token_dim, config, device)
        self.residual = TokenMixer(in_tokens, out_tokens, device) if in_tokens != out_tokens else nn.Identity()
        self.norm = nn.LayerNorm(token_dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T_in, D] -> [B, T_out, D]."""
        return self.norm(self.first(x) + self.second(x) + self.residual(x))


class DHEN(nn.Module):
    """A stack of :class:`DHENLayer`s.

    Args:
        num_tokens: T, tokens in.
        token_dim: D, token width.
        config: layer choices and sizes.
        out_tokens: tokens out (default: ``config.out_tokens``).
        device: where to build the parameters (``meta`` works).
    """

    def __init__(self, num_tokens: int, token_dim: int, config: DHENConfig, out_tokens: int | None = None, device=None):
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"DHEN needs at least one input token, got {num_tokens}")
        out = config.out_tokens if out_tokens is None else out_tokens
        counts = [num_tokens] * len(config.layers) + [out]
        self.layers = nn.Sequential(
            *(DHENLayer(kinds, counts[i], counts[i + 1], token_dim, config, device) for i, kinds in enumerate(config.layers))
        )
        self.num_tokens, self.out_tokens, self.token_dim = num_tokens, out, token_dim

    def output_dim(self) -> int:
        """Width of the flattened output, out_tokens · D."""
        return self.out_tokens * self.token_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, out_tokens, D]."""
        return self.layers(tokens)
