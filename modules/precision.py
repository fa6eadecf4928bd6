"""Mixed precision of the train tasks (``train.mixed_precision``): the model's forward under
``torch.autocast`` in bfloat16, the loss outside it.

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

MIXED_PRECISION = {"none": None, "bf16": torch.bfloat16}


class MixedPrecision:
    """Mixin of the train tasks: ``set_mixed_precision`` once, then ``with self.autocast():``
    around the model's forward."""

    autocast_dtype: Optional[torch.dtype] = None
    autocast_device: str = "cpu"

    def set_mixed_precision(self, mode: str, device_type: str) -> None:
        """``mode``: none or bf16; ``device_type``: cpu or cuda (where the dense parts run)."""
        if mode not in MIXED_PRECISION:
            raise ValueError(f"mixed precision must be one of {sorted(MIXED_PRECISION)}, got {mode!r}")
        self.autocast_dtype, self.autocast_device = MIXED_PRECISION[mode], device_type

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.autocast_device, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)
