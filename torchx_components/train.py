"""Training jobs: the initial window and the daily incremental run of ``trainer/main.py``.

Both are ``torchx.components.dist.ddp`` (torchrun, c10d rendezvous) with the trainer's own
arguments filled in, so they run wherever ``dist.ddp`` does::

    # 2 local processes (gloo) on the small synthetic world
    torchx run -s local_cwd torchx_components/train.py:initial --days 2026-01-01,2026-01-02 \\
        -- --data.root=runs/data/small --train.run_dir=runs/small
    # the next day, from the checkpoint the initial run left in run_dir
    torchx run -s local_cwd train.incremental --day 2026-01-03 -- --data.root=runs/data/small \\
        --train.run_dir=runs/small
    # 2 nodes x 8 GPUs on Kubernetes (print the Volcano job instead of submitting it)
    torchx run --dryrun -s kubernetes train.initial -j 2x8 --gpu 8 --cpu 64 --memMB 480000 \\
        --days 2026-01-01,2026-01-02

``train.initial`` / ``train.incremental`` are the same functions through pyproject's entry points.
Trainer overrides (``--section.field=value``) go after ``--``. See docs/torchx.md.
"""
from typing import Dict, List, Optional, Tuple

import torchx.specs as specs

from torchx_components.jobs import documented_job_args, split_days, torchrun_job

DERM_IMAGE = "derm-trainer:latest"
"""Image of the cluster jobs (built from docker/; its WORKDIR is the repository root, so the
relative ``trainer/main.py`` resolves). ``local_cwd`` ignores it and runs the working tree."""

TRAINER_SCRIPT = "trainer/main.py"

# Trainer arguments the components set themselves, with what to use instead: passed again as
# overrides, the trainer would see two values.
_COMPONENT_OWNED_FLAGS = {
    "--mode": "the component (initial or incremental)",
    "--config": "the component's --config",
    "--days": "initial's --days",
    "--day": "incremental's --day",
}


def _trainer_overrides(overrides: Tuple[str, ...]) -> List[str]:
    """Refuses overrides of what the component sets itself; the trainer checks the rest."""
    for arg in overrides:
        flag = arg.split("=", 1)[0]
        if flag in _COMPONENT_OWNED_FLAGS:
            raise ValueError(f"trainer override {arg!r}: the component sets {flag}; use {_COMPONENT_OWNED_FLAGS[flag]} instead")
    return list(overrides)


def _trainer_args(mode_args: List[str], config: str, overrides: Tuple[str, ...]) -> List[str]:
    """``trainer/main.py``'s arguments: the mode, ``--config`` when given, then the overrides."""
    return [*mode_args, *(["--config", config] if config else []), *_trainer_overrides(overrides)]


@documented_job_args
def initial(
    *overrides: str,
    config: str = "",
    days: str = "",
    image: str = DERM_IMAGE,
    name: str = "derm/derm-initial",
    j: str = "1x2",
    h: Optional[str] = None,
    cpu: int = 4,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
    debug: bool = False,
    launcher: str = "torchrun",
) -> specs.AppDef:
    """
    Initial training of the upstream DERM model over a window of days: ``trainer/main.py --mode initial``.

    Runs under torchrun like ``dist.ddp``; the trainer joins the process group from torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, ...). Trainer overrides go after ``--``:
    ``torchx run -s local_cwd train.initial --days 2026-01-01,2026-01-02 -- --data.root=runs/data/small``.
    Resources are per node (replica); the defaults size a small CPU job.

    Args:
        overrides: trainer config overrides, ``--section.field=value`` (e.g. ``--data.root=runs/data/small --train.run_dir=runs/small``)
        config: trainer config file (path inside the image, or the working tree for local_cwd); empty: the trainer's default config
        days: comma-separated days of the initial window (e.g. 2026-01-01,2026-01-02); empty: the window the config names
    """
    mode_args = ["--mode", "initial"]
    if days:
        mode_args += ["--days", ",".join(split_days(days))]
    return torchrun_job(
        TRAINER_SCRIPT, _trainer_args(mode_args, config, overrides),
        image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=env, max_retries=max_retries,
        rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, mounts=mounts, debug=debug, launcher=launcher,
    )


@documented_job_args
def incremental(
    *overrides: str,
    day: str,
    config: str = "",
    image: str = DERM_IMAGE,
    name: str = "derm/derm-incremental",
    j: str = "1x2",
    h: Optional[str] = None,
    cpu: int = 4,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
    debug: bool = False,
    launcher: str = "torchrun",
) -> specs.AppDef:
    """
    Daily incremental training of the upstream DERM model: ``trainer/main.py --mode incremental --day DAY``.

    The trainer starts from the latest snapshot before DAY in its run directory (the previous
    day's, or the initial run's) and trains on DAY. Runs under torchrun like ``dist.ddp``. Trainer overrides go
    after ``--``: ``torchx run -s local_cwd train.incremental --day 2026-01-03 -- --train.run_dir=runs/small``.
    Resources are per node (replica); the defaults size a small CPU job.

    Args:
        overrides: trainer config overrides, ``--section.field=value`` (e.g. ``--data.root=runs/data/small --train.run_dir=runs/small``)
        day: the day to train on (e.g. 2026-01-03)
        config: trainer config file (path inside the image, or the working tree for local_cwd); empty: the trainer's default config
    """
    day = day.strip()
    if not day or "," in day:
        raise ValueError(f"--day {day!r}: expected exactly one day (e.g. 2026-01-03); train a window with `initial --days`")
    return torchrun_job(
        TRAINER_SCRIPT, _trainer_args(["--mode", "incremental", "--day", day], config, overrides),
        image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=env, max_retries=max_retries,
        rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, mounts=mounts, debug=debug, launcher=launcher,
    )
