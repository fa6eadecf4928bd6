"""Shared fixtures: a tiny synthetic world, generated once per test session."""

from __future__ import annotations

import dataclasses

import pytest

from trainer.data.synthetic import PRESETS, generate

TINY = dataclasses.replace(PRESETS["tiny"], days=3)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Root of a 3-day tiny world (seed 0): spec.toml, ctr/, cvr/, truth/."""
    root = tmp_path_factory.mktemp("tiny") / "world"
    generate(root, TINY, seed=0)
    return root
