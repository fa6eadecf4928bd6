"""The batch every model and train pipeline of the project consumes.

Glossary: B rows, T tasks (the source's labels), L a sequence feature's ``max_length``,
W a dense feature's width.

``sparse`` is laid out as TorchRec expects, feature-major::

    sparse (KeyedJaggedTensor)       row 0      row 1        row 2
    "user_id"                        [17]       [3]          [17]
    "user_interests"                 [2, 5]     []           [1]
    "pin_id"                         [40]       [8]          [9]

``sequence`` holds each sequence's ids, newest first, truncated to ``max_length``; its side lists
are padded to ``[B, L]`` (zeros past each row's length) so a model pairs them with the padded
output of ``JaggedTensor.to_padded_dense(desired_length=L)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """One batch of one source, as TorchRec's train pipelines move it between devices."""

    sparse: KeyedJaggedTensor
    """Pooled id features (keys: the spec's sparse feature names, in spec order)."""
    sequence: KeyedJaggedTensor
    """Sequence ids for the ``EmbeddingCollection`` (keys: sequence feature names)."""
    sequence_side: dict[str, dict[str, torch.Tensor]]
    """``[sequence name][side name] -> [B, L]``: int64 for id side lists, float32 for values."""
    dense: dict[str, torch.Tensor]
    """``name -> [B, W]`` float32, normalised as the spec says."""
    labels: torch.Tensor
    """``[B, T]`` float32 0/1, in the source's label order."""
    oracle: Optional[torch.Tensor]
    """``[B, T]`` float32 true probabilities (NaN for a label without one); None if none given."""
    user_id: torch.Tensor
    """``[B]`` int64 raw user keys (not hashed): what embeddings are published under."""
    pin_id: torch.Tensor
    """``[B]`` int64 raw Pin keys."""
    event_time: torch.Tensor
    """``[B]`` int64 seconds since the epoch."""
    derm: dict[str, torch.Tensor] = field(default_factory=dict)
    """Upstream DERM embeddings joined onto the rows for a downstream model (``name -> [B, E]`` and
    ``name + "_missing" -> [B, 1]``, see :mod:`embeddings.features`); empty for upstream models.
    A field of the batch so that TorchRec's train pipelines, which call ``model(batch)``, move it
    with the rest."""

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def _map(self, fn) -> "Batch":
        """A batch with ``fn`` applied to every tensor and KeyedJaggedTensor (both have ``.to``
        and ``.pin_memory``)."""
        return Batch(
            sparse=fn(self.sparse),
            sequence=fn(self.sequence),
            sequence_side={s: {k: fn(v) for k, v in sides.items()} for s, sides in self.sequence_side.items()},
            dense={k: fn(v) for k, v in self.dense.items()},
            labels=fn(self.labels),
            oracle=None if self.oracle is None else fn(self.oracle),
            user_id=fn(self.user_id),
            pin_id=fn(self.pin_id),
            event_time=fn(self.event_time),
            derm={k: fn(v) for k, v in self.derm.items()},
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    def record_stream(self, stream: torch.Stream) -> None:
        leaves = [self.sparse, self.sequence, self.labels, self.user_id, self.pin_id, self.event_time]
        leaves += [*self.dense.values(), *self.derm.values(), *(v for sides in self.sequence_side.values() for v in sides.values())]
        for leaf in leaves + ([self.oracle] if self.oracle is not None else []):
            leaf.record_stream(stream)
