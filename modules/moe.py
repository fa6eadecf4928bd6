"""A multi-gate mixture of DCNv2 experts: the core of the downstream CTR model (paper §3.2: "a
Mixture of Experts (MoE) module, which utilizes DCNv2 to perform feature interactions").

MMoE (Ma et al. 2018) with DCNv2 experts (Wang et al. 2021b). Every expert sees the whole
concatenated input; every task has its own softmax gate over the experts::

    e_x(x)  = MLP_x( CrossNet_x(x) )                         x = 1 .. X        [B, H]
    g_t(x)  = softmax( W_t · GateMLP_t(x) )                  t = 1 .. T        [B, X]
    h_t(x)  = Σ_x g_t,x(x) · e_x(x)                                            [B, H]

``CrossNet`` is TorchRec's ``LowRankCrossNet`` (x_{l+1} = x_0 ⊙ (V_l U_l x_l + b_l) + x_l) or its
``LowRankMixtureCrossNet``; TorchRec has no gated mixture over whole networks, hence this module.

Glossary: B batch, F input width, X experts, H expert output width, T tasks.

Example::

    moe = MixtureOfDCNExperts(in_features=40, num_tasks=2, num_experts=3, cross_layers=2, low_rank=8,
                              expert_hidden=(32,))
    mixed, gates = moe(torch.randn(8, 40))     # [8, 2, 32], [8, 2, 3]; gates sum to 1 over experts
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet, LowRankMixtureCrossNet
from torchrec.modules.mlp import MLP


class DCNv2Expert(nn.Module):
    """One expert: a low-rank cross net over the input, then an MLP. [B, F] -> [B, H].

    Args:
        in_features: F.
        cross_layers: cross layers of the cross net.
        low_rank: rank of each cross layer's weight; 0: full rank (TorchRec's ``CrossNet``).
        mixture: 0 for ``LowRankCrossNet``; k >= 1 for ``LowRankMixtureCrossNet`` with k experts.
        hidden: MLP widths after the cross net; H = ``hidden[-1]``.
        device: where to build the parameters (``meta`` works).
    """

    def __init__(self, in_features: int, cross_layers: int, low_rank: int, mixture: int, hidden: tuple[int, ...], device=None) -> None:
        super().__init__()
        if low_rank == 0:  # full rank: x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l, W_l [F, F]
            if mixture:
                raise ValueError("a mixture cross net is low-rank by construction; give low_rank >= 1 with cross_mixture")
            cross = CrossNet(in_features, cross_layers)
        elif mixture:
            cross = LowRankMixtureCrossNet(in_features, cross_layers, num_experts=mixture, low_rank=low_rank)
        else:
            cross = LowRankCrossNet(in_features, cross_layers, low_rank=low_rank)
        # TorchRec's cross nets take no device argument.
        self.cross = cross.to(device) if device is not None else cross
        self.mlp = MLP(in_features, list(hidden), device=device)
        self.out_dim = hidden[-1]

    def output_dim(self) -> int:
        return self.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F] -> [B, H]."""
        return self.mlp(self.cross(x))


class MixtureOfDCNExperts(nn.Module):
    """MMoE over DCNv2 experts with one softmax gate per task (see the module docstring).

    Args:
        in_features: F.
        num_tasks: T, one gate each.
        num_experts: X.
        cross_layers, low_rank, mixture: each expert's cross net (:class:`DCNv2Expert`).
        expert_hidden: each expert's MLP widths; H = ``expert_hidden[-1]``.
        gate_hidden: hidden widths of each gate before its linear map to X logits (empty: linear).
        device: where to build the parameters (``meta`` works).
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        num_experts: int,
        cross_layers: int,
        low_rank: int,
        expert_hidden: tuple[int, ...],
        mixture: int = 0,
        gate_hidden: tuple[int, ...] = (),
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or num_tasks < 1 or num_experts < 1:
            raise ValueError(f"in_features, num_tasks and num_experts must be >= 1, got {in_features}, {num_tasks}, {num_experts}")
        self.experts = nn.ModuleList(
            DCNv2Expert(in_features, cross_layers, low_rank, mixture, expert_hidden, device) for _ in range(num_experts)
        )
        self.gates = nn.ModuleList(
            nn.Sequential(MLP(in_features, list(gate_hidden), device=device), nn.Linear(gate_hidden[-1], num_experts, device=device))
            if gate_hidden
            else nn.Linear(in_features, num_experts, device=device)
            for _ in range(num_tasks)
        )
        self.num_tasks, self.num_experts, self.out_dim = num_tasks, num_experts, expert_hidden[-1]

    def output_dim(self) -> int:
        """H, the width of each task's mixed input."""
        return self.out_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, F] -> (per-task mixtures [B, T, H], gates [B, T, X], each row summing to 1)."""
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, X, H]
        gates = torch.softmax(torch.stack([g(x) for g in self.gates], dim=1), dim=-1)  # [B, T, X]
        return torch.bmm(gates, experts), gates  # [B, T, H]
