"""MaskNet: feature-wise multiplication by instance-guided masks (Wang et al. 2021a).

A MaskBlock multiplies a hidden input by a mask computed from the instance's own feature embedding,
then projects and normalises::

    mask   = W2 · ReLU(W1 · v_emb + b1) + b2                 (aggregation r·m wide, then projection)
    output = ReLU(LayerNorm(W_h · (mask ⊙ v_in)))

The serial form chains blocks (block k's hidden input is block k−1's output); the parallel form runs
blocks side by side on ``LayerNorm(v_emb)`` and merges their concatenation with an MLP. DERM uses
MaskNet as one of DHEN's layer modules (paper §3.1).

Glossary: B batch, M input width (flattened features), H block width.

Example::

    net = MaskNet(input_dim=96, num_blocks=2, block_dim=64)
    net(torch.randn(8, 96)).shape == (8, net.output_dim())
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.mlp import MLP


class MaskBlock(nn.Module):
    """One instance-guided mask, applied to ``hidden_in`` and projected to ``output_dim``.

    Args:
        emb_dim: width of the feature embedding that guides the mask.
        input_dim: width of the hidden input the mask multiplies.
        output_dim: width of the block's output.
        reduction_ratio: aggregation-layer width as a multiple of ``emb_dim``.
        device: where to build the parameters (``meta`` works).
    """

    def __init__(self, emb_dim: int, input_dim: int, output_dim: int, reduction_ratio: float = 2.0, device=None) -> None:
        super().__init__()
        agg = max(1, int(round(emb_dim * reduction_ratio)))
        self.mask = nn.Sequential(nn.Linear(emb_dim, agg, device=device), nn.ReLU(), nn.Linear(agg, input_dim, device=device))
        self.hidden = nn.Linear(input_dim, output_dim, bias=False, device=device)
        self.norm = nn.LayerNorm(output_dim, device=device)

    def forward(self, emb: torch.Tensor, hidden_in: torch.Tensor) -> torch.Tensor:
        """``emb`` [B, emb_dim], ``hidden_in`` [B, input_dim] -> [B, output_dim]."""
        return torch.relu(self.norm(self.hidden(self.mask(emb) * hidden_in)))


class MaskNet(nn.Module):
    """Serial or parallel MaskNet over a flattened feature vector.

    Args:
        input_dim: M, the width of the feature embedding.
        num_blocks: number of MaskBlocks.
        block_dim: H, each block's output width.
        reduction_ratio: see :class:`MaskBlock`.
        mode: ``serial`` or ``parallel``.
        parallel_hidden: the merging MLP's widths (parallel mode).
        device: where to build the parameters.
    """

    def __init__(
        self,
        input_dim: int,
        num_blocks: int = 2,
        block_dim: int = 64,
        reduction_ratio: float = 2.0,
        mode: str = "serial",
        parallel_hidden: tuple[int, ...] = (64,),
        device=None,
    ) -> None:
        super().__init__()
        if mode not in ("serial", "parallel"):
            raise ValueError(f"MaskNet mode must be serial or parallel, got {mode!r}")
        if num_blocks < 1:
            raise ValueError(f"MaskNet needs at least one block, got {num_blocks}")
        self.mode = mode
        self.emb_norm = nn.LayerNorm(input_dim, device=device)
        if mode == "serial":
            widths = [input_dim] + [block_dim] * (num_blocks - 1)
            self.blocks = nn.ModuleList(MaskBlock(input_dim, w, block_dim, reduction_ratio, device) for w in widths)
            self.merge = None
            self._output_dim = block_dim
        else:
            self.blocks = nn.ModuleList(MaskBlock(input_dim, input_dim, block_dim, reduction_ratio, device) for _ in range(num_blocks))
            self.merge = MLP(num_blocks * block_dim, list(parallel_hidden), device=device)
            self._output_dim = parallel_hidden[-1]

    def output_dim(self) -> int:
        return self._output_dim

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """``emb`` [B, M] -> [B, output_dim()]."""
        normed = self.emb_norm(emb)
        if self.merge is None:
            hidden = normed
            for block in self.blocks:
                hidden = block(emb, hidden)
            return hidden
        return self.merge(torch.cat([block(emb, normed) for block in self.blocks], dim=1))
