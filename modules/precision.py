"""Mixed precision of the train tasks (``train.mixed_precision``, default auto: bf16 where the device
has bfloat16 matrix units): the model's forward under ``torch.autocast`` in bfloat16, the loss
outside it.

Inside: the towers, DHEN, cross nets and sequence encoders run their matmuls in bfloat16.
Outside: the embedding tables (fbgemm TBE with fused optimizers), the optimizer state and the
losses stay float32 — the losses cast their inputs back to float32, since the contrastive logits
are divided by a small temperature where bfloat16's three significant digits are not enough. The
autocast region ends before the loss, so the backward pass runs outside it, as PyTorch advises.
bfloat16 needs no loss scaling; fp16 would need a gradient scaler around the fused embedding
optimizers and is not offered.
"""

from __future__ import annotations

from typing import Optional

import torch

from modules.config import MIXED_PRECISION_MODES

MIXED_PRECISION = {"none": None, "bf16": torch.bfloat16}
assert MIXED_PRECISION_MODES == ("auto", *MIXED_PRECISION)


def has_bf16_matrix_units(device_type: str) -> bool:
    """Whether the device multiplies bfloat16 matrices in hardware: a CUDA GPU that supports
    bfloat16 (Ampere and later), or a CPU with AVX512-BF16 or AMX tiles (Cooper Lake, Sapphire
    Rapids and later; Zen 4). PyTorch exposes the CPU flags only as private helpers of
    ``torch.cpu``; an older PyTorch without them answers False."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_mixed_precision(mode: str, device_type: str) -> str:
    """``mode`` (auto, none or bf16) -> none or bf16 for ``device_type``. auto is bf16 where the
    device has bfloat16 matrix units: on this project's CPU (AVX512-BF16, no AMX) a bf16 upstream
    step ran 1.5x its fp32 step with eval AUC within seed noise (docs/benchmarks.md)."""
    if mode not in MIXED_PRECISION_MODES:
        raise ValueError(f"mixed precision must be one of {MIXED_PRECISION_MODES}, got {mode!r}")
    if mode == "auto":
        return "bf16" if has_bf16_matrix_units(device_type) else "none"
    return mode


class MixedPrecision:
    """Mixin of the train tasks: ``set_mixed_precision`` once, then ``with self.autocast():``
    around the model's forward."""

    autocast_dtype: Optional[torch.dtype] = None
    autocast_device: str = "cpu"

    def set_mixed_precision(self, mode: str, device_type: str) -> None:
        """``mode``: auto, none or bf16 (:func:`resolve_mixed_precision`); ``device_type``: cpu or
        cuda (where the dense parts run)."""
        mode = resolve_mixed_precision(mode, device_type)
        self.autocast_dtype, self.autocast_device = MIXED_PRECISION[mode], device_type

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.autocast_device, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)
