"""Shared fixtures: a tiny synthetic world, generated once per test session."""

from __future__ import annotations

import pytest

from data.synthetic import PRESETS, generate
from tests.helpers import TINY


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Root of a 3-day tiny world (seed 0): spec.toml, ctr/, cvr/, truth/."""
    root = tmp_path_factory.mktemp("tiny") / "world"
    generate(root, TINY, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_world_4(tmp_path_factory):
    """The tiny preset as it is, 4 days (seed 0): enough for a train, a validation and a test day."""
    root = tmp_path_factory.mktemp("tiny4") / "world"
    generate(root, PRESETS["tiny"], seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_snapshot(tiny_world, tmp_path_factory):
    """A cvr snapshot of day 1 of the tiny world, trained for a few steps on 2 gloo ranks."""
    from tests.distributed import run_ranks
    from tests.helpers import two_rank_train_day

    run_dir = tmp_path_factory.mktemp("snap") / "cvr"
    run_ranks(two_rank_train_day, 2, str(tiny_world), str(run_dir), timeout=600)
    return run_dir / "snapshots" / "day=2026-01-01"


@pytest.fixture
def in_repo(monkeypatch):
    """local_cwd runs the job scripts relative to the working directory: the repository root, with
    the venv's torchrun first on PATH."""
    import os
    import sys
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
