"""Faults and bad input (issue 14): what a crafted, broken or unexpected file does to a job."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from sharding.checkpoint import SnapshotError, _rng_state, _set_rng_state, load_rng_state


class _Payload:
    """Unpickling this runs a shell command: what a crafted rng-rank0.pt in a snapshot would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_snapshots_rng_file_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"
    crafted = tmp_path / "rng-rank0.pt"
    torch.save({"torch": _Payload(str(marker))}, crafted)
    with pytest.raises(SnapshotError, match="not a plain RNG state"):
        load_rng_state(crafted)
    assert not marker.exists()


def test_rng_states_round_trip_as_plain_tensors(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    _set_rng_state(load_rng_state(tmp_path / "rng.pt"))  # weights_only=True
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2:] == again[2:]
