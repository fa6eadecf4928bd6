"""The ``[optimizer]`` section of a run config, torch-free (a config answers ``--help`` and its
errors before TorchRec loads); ``sharding.dmp`` maps its names to the optimizers it builds."""

from __future__ import annotations

from dataclasses import dataclass

SPARSE_OPTIMIZER_NAMES = ("rowwise_adagrad", "adagrad", "sgd", "adam")
"""Fused optimizers of the embedding tables (``sharding.dmp.SPARSE_OPTIMIZERS``); adam is CUDA-only."""
DENSE_OPTIMIZER_NAMES = ("adam", "adagrad", "sgd")


@dataclass(frozen=True)
class OptimizerConfig:
    sparse: str = "rowwise_adagrad"
    """Fused optimizer of the embedding tables: rowwise_adagrad, adagrad, sgd, adam (CUDA only)."""
    sparse_lr: float = 0.05
    dense: str = "adam"
    """Optimizer of everything else: adam, adagrad, sgd."""
    dense_lr: float = 1e-3
    fused_dense: bool = True
    """Run the dense optimizer as PyTorch's fused kernel (CPU and CUDA); false: the per-parameter
    loop (for comparison; same update)."""

    def __post_init__(self) -> None:
        if self.sparse not in SPARSE_OPTIMIZER_NAMES:
            raise ValueError(f"optimizer.sparse must be one of {sorted(SPARSE_OPTIMIZER_NAMES)}, got {self.sparse!r}")
        if self.dense not in DENSE_OPTIMIZER_NAMES:
            raise ValueError(f"optimizer.dense must be one of {sorted(DENSE_OPTIMIZER_NAMES)}, got {self.dense!r}")

    def check(self, device_type: str) -> None:
        """Refuses what the device cannot run (fused Adam off CUDA)."""
        if self.sparse == "adam" and device_type != "cuda":
            raise ValueError("optimizer.sparse = 'adam' needs CUDA (FBGEMM has no fused Adam on CPU); use rowwise_adagrad")
