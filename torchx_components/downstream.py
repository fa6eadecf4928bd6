"""Downstream training jobs: a CTR or CVR model on DERM embeddings, ``trainer/main.py --task downstream``.

Like the upstream training components, a ``torchx.components.dist.ddp`` (torchrun) job with the
trainer's arguments filled in; trainer overrides (``--section.field=value``) go after ``--``::

    torchx run -s local_cwd downstream.train --kind ctr --days 2026-01-02 -- --data.root=runs/demo/data \\
        --derm.features='["ctr_user","ctr_pin"]' --derm.store_root=runs/pipeline/store \\
        --train.run_dir=runs/pipeline/downstream/ctr-derm
    torchx run --dryrun -s slurm downstream.train --kind cvr --mode incremental --day 2026-01-03 -j 2x8 --gpu 8

See docs/torchx.md.
"""
from typing import Dict, List, Optional

import torchx.specs as specs

from torchx_components.jobs import documented_job_args, split_days, torchrun_job
from torchx_components.train import DERM_IMAGE, _trainer_args

DOWNSTREAM_SCRIPT = "trainer/main.py"


@documented_job_args
def train(
    *overrides: str,
    kind: str = "ctr",
    mode: str = "initial",
    days: str = "",
    day: str = "",
    eval_day: str = "",
    config: str = "",
    image: str = DERM_IMAGE,
    name: str = "derm/derm-downstream",
    j: str = "1x1",
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
    Trains and evaluates a downstream CTR or CVR model that reads DERM embeddings: ``trainer/main.py --task downstream``.

    Initial mode trains ``days`` from scratch; incremental mode loads the latest snapshot before
    ``day`` from the run directory and trains ``day``. Either evaluates on ``eval_day`` (default: the
    day after the last trained one). Trainer overrides go after ``--``.

    Args:
        overrides: trainer config overrides, ``--section.field=value`` (e.g. ``--derm.features=["ctr_user"]``)
        kind: ctr (MMoE of DCNv2 experts) or cvr (DHEN)
        mode: initial or incremental
        days: initial mode: comma-separated days to train
        day: incremental mode: the day to train
        eval_day: held-out day to evaluate, or none; empty: the day after the last trained one
        config: trainer config file; empty: the defaults plus the overrides
    """
    if kind not in ("ctr", "cvr"):
        raise ValueError(f"--kind {kind!r}: expected ctr or cvr")
    for arg in overrides:
        if arg.split("=", 1)[0] in ("--kind", "--task"):
            raise ValueError(f"trainer override {arg!r}: the component sets --task and --kind; use its --kind instead")
    if mode == "initial":
        if day:
            raise ValueError("--day is for --mode incremental; initial mode takes --days")
        mode_args = ["--mode", "initial", *(["--days", ",".join(split_days(days))] if days else [])]
    elif mode == "incremental":
        if not day or "," in day or days:
            raise ValueError(f"--mode incremental needs exactly one --day (got day={day!r}, days={days!r})")
        mode_args = ["--mode", "incremental", "--day", day.strip()]
    else:
        raise ValueError(f"--mode {mode!r}: expected initial or incremental")
    mode_args += ["--eval-day", eval_day] if eval_day else []
    args = ["--task=downstream", f"--kind={kind}", *_trainer_args(mode_args, config, overrides)]
    return torchrun_job(
        DOWNSTREAM_SCRIPT, args, image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=env,
        max_retries=max_retries, rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, mounts=mounts, debug=debug, launcher=launcher,
    )
