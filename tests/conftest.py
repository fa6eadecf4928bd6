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


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 5 MiB tmpfs of its own: a real full disk (ENOSPC from the kernel, wherever the
    write happens). Needs root (``mount``), as here and in CI; elsewhere the test skips, except
    under CI, where a skip would hide the check."""
    import os
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a small tmpfs for the disk-full test: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a small tmpfs (not root?): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder, leave: int = 0) -> None:
    """Fills the file system of ``folder`` up to ``leave`` bytes free (a file ``folder/.filler``)."""
    import os

    stat = os.statvfs(folder)
    with open(os.path.join(folder, ".filler"), "wb") as f:
        try:
            f.write(b"\0" * max(stat.f_bavail * stat.f_frsize - leave, 0))
        except OSError:
            pass


@pytest.fixture
def one_rank(tmp_path):
    """A world-size-1 gloo process group in this process, gone after the test. A group that an
    earlier in-process test left behind is destroyed first (init_process_group refuses a second)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _sane_logging():
    """Each test starts with working loggers: a library configured in-process earlier (e.g. a
    dictConfig with disable_existing_loggers) may have disabled ours, and ``setup_logging``'s
    ``basicConfig(force=True)`` in an earlier test may have left a handler on that test's captured,
    now closed, stderr. Without this, log assertions depend on test order."""
    import logging

    def reset() -> None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if type(handler) is logging.StreamHandler:  # basicConfig's; pytest's own are subclasses
                root.removeHandler(handler)
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if name.startswith("derm") and isinstance(logger, logging.Logger):
                logger.disabled = False

    reset()
    yield
    reset()
