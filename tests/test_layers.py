"""The layering of ../shared/DESIGN.md §Layout, enforced: every import points down the floors
(common, data, modules, sharding, embeddings, trainer, torchx_components, pipeline, experiments),
checked by import-linter's layers contract in pyproject.toml; and the configs answer without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_import_points_down_the_floors(capsys):
    from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

    os.chdir(REPO)
    status = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    assert status == EXIT_STATUS_SUCCESS, capsys.readouterr().out


def test_a_broken_floor_is_caught(tmp_path):
    """The contract can fail: a copy of the tree where ``data`` imports ``trainer`` breaks it.
    (Its own process: grimp finds packages through the importer, which here already holds the
    repository's.)"""
    import shutil

    for name in ("common", "data", "modules", "sharding", "embeddings", "trainer", "torchx_components", "pipeline", "experiments"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / "data" / "upward.py").write_text("from trainer.loop import run\n")
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "data.upward -> trainer.loop" in out.stdout


def test_configs_and_help_load_no_torch():
    """Run configs, pipeline settings and ``--help`` of the training job answer without importing
    torch, TorchRec or FBGEMM (seconds instead of a TorchRec start-up; a bad config fails fast)."""
    code = (
        "import sys, runpy\n"
        "import trainer.config, pipeline.driver, sharding.config, modules.config, modules.downstream_config, common.files\n"
        "trainer.config.load_run_config('downstream', None, ['kind=cvr', 'derm.features=[\"ctr_user\"]', 'derm.store_root=s'])\n"
        "sys.argv = ['trainer/main.py', '--help']\n"
        "try:\n"
        "    runpy.run_path('trainer/main.py', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = [m for m in ('torch', 'torchrec', 'fbgemm_gpu') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--task {upstream,downstream}" in out.stdout
