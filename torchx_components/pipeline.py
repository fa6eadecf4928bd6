"""The daily pipeline as a job: ``python -m pipeline`` in one small container, which then
submits every step of the day (upstream training, lifecycle, downstream) as its own job to
``--jobs_scheduler`` — e.g. a Kubernetes CronJob-style driver whose steps run as Volcano jobs::

    torchx run -s local_cwd pipeline.daily -- --data=runs/demo/data --work=runs/pipeline
    torchx run --dryrun -s kubernetes pipeline.daily --image reg/derm:1 --jobs_scheduler kubernetes \\
        -- --data=/mnt/derm/data --work=/mnt/derm/pipeline --j=2x8 --gpu=8

Pipeline settings (``--key=value``, see ``pipeline/driver.py``) go after ``--``; the driver passes
its own image to the steps unless ``--image=`` is among them.
"""
from typing import Dict, List, Optional

import torchx.specs as specs

from torchx_components.jobs import documented_job_args, python_module_job
from torchx_components.train import DERM_IMAGE


@documented_job_args
def daily(
    *settings: str,
    config: str = "",
    jobs_scheduler: str = "local_cwd",
    image: str = DERM_IMAGE,
    name: str = "derm/derm-pipeline",
    h: Optional[str] = None,
    cpu: int = 1,
    memMB: int = 2048,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 2,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """
    Runs the daily DERM pipeline driver (``python -m pipeline``), which submits each step as its own job.

    The driver only submits and waits; a re-run skips the steps already done, so retries are safe.

    Args:
        settings: pipeline settings, ``--key=value`` (e.g. ``--data=/mnt/data --work=/mnt/pipeline --j=1x8 --gpu=8``)
        config: pipeline config TOML (inside the image); empty: the defaults plus the settings
        jobs_scheduler: the TorchX scheduler the steps are submitted to (kubernetes, slurm, local_cwd, ...)
        image: container image of the driver, and of the steps unless the settings give --image=
        h: a registered named resource; takes precedence over cpu, memMB
        cpu: CPUs of the driver
        memMB: memory of the driver in MB
        env: extra environment variables of the driver
        max_retries: how many times the scheduler may restart the driver after a failure
    """
    for s in settings:
        if not (s.startswith("--") and "=" in s):
            raise ValueError(f"pipeline setting {s!r}: expected --key=value")
        key = s.split("=", 1)[0]
        if key == "--":
            raise ValueError(f"pipeline setting {s!r}: expected --key=value")
        if key in ("--scheduler", "--config"):
            raise ValueError(f"pipeline setting {s!r}: use the component's --{'jobs_scheduler' if key == '--scheduler' else 'config'}")
    args = [*(["--config", config] if config else []), f"--scheduler={jobs_scheduler}"]
    if not any(s.startswith("--image=") for s in settings):
        args.append(f"--image={image}")
    args += list(settings)
    return python_module_job(name, image, "pipeline", args, cpu, memMB, h, env, max_retries, mounts)
