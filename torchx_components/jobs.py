"""Helpers the component modules share. Not a component group itself: TorchX lists every function
returning an AppDef in a registered group, so these live outside ``train``/``dist``."""
import inspect
from typing import Any, Callable, Dict, List, Optional, TypeVar

import torchx.specs as specs
from torchx.components import dist as builtin_dist

# The job parameters every component shares, documented once: ``documented_job_args`` adds these
# lines to a component's ``Args:`` (what ``torchx run COMPONENT --help`` prints).
JOB_ARG_DOCS = {
    "image": "container image with the project at its WORKDIR (ignored by local_cwd, which runs the working tree)",
    "name": "job name, ``{experimentname}/{runname}``, ``/{runname}`` or ``{runname}``",
    "j": "[{min_nnodes}:]{nnodes}x{nproc_per_node}; on GPU nodes nproc_per_node must not exceed the node's GPUs",
    "h": "a registered named resource per node (e.g. aws_p4d.24xlarge); takes precedence over cpu, gpu, memMB",
    "cpu": "CPUs per node",
    "gpu": "GPUs per node",
    "memMB": "memory per node in MB",
    "env": "extra environment variables of the job (e.g. ENV1=v1,ENV2=v2)",
    "max_retries": "how many times the scheduler may restart the job after a failure",
    "rdzv_port": "port on rank 0's host for the c10d rendezvous store (multi-node only)",
    "rdzv_backend": "torchrun rendezvous backend (multi-node only; c10d or static)",
    "mounts": "mounts into the containers, e.g. type=bind,src=/data,dst=/data[,readonly] (see the scheduler's docs)",
    "debug": "run with PyTorch's distributed debug flags set (TORCH_DISTRIBUTED_DEBUG=DETAIL, ...)",
    "launcher": "torchrun, or python: one process started directly, without torchrun's agent (-j 1x1 only; "
                "the pipeline's choice on local_cwd, where the agent's start-up is a few seconds per job)",
}
LAUNCHERS = ("torchrun", "python")

Component = TypeVar("Component", bound=Callable[..., specs.AppDef])


def documented_job_args(component: Component) -> Component:
    """Appends to ``component``'s ``Args:`` the shared job parameters of its signature that its
    docstring does not describe itself (TorchX reads the docstring through ``inspect.getdoc``)."""
    doc = inspect.getdoc(component) or ""
    if "\nArgs:\n" not in f"\n{doc}":
        raise ValueError(f"{component.__name__}: the docstring needs an Args: section")
    documented = {line.strip().split(":", 1)[0] for line in doc.split("\nArgs:\n", 1)[1].splitlines()}
    missing = [p for p in inspect.signature(component).parameters if p in JOB_ARG_DOCS and p not in documented]
    component.__doc__ = doc + "".join(f"\n    {p}: {JOB_ARG_DOCS[p]}" for p in missing)
    return component


def _one_gpu_per_rank(app: specs.AppDef, j: str) -> specs.AppDef:
    """Refuses more processes per node than the node has GPUs: TorchRec gives each rank its own
    GPU, and the job would otherwise fail only after the scheduler has placed it."""
    node_gpus = app.roles[0].resource.gpu
    nproc_per_node = builtin_dist.parse_nnodes(j)[2]
    if node_gpus > 0 and nproc_per_node > node_gpus:
        raise ValueError(
            f"-j {j} starts {nproc_per_node} processes per node but a node has {node_gpus} GPU(s); "
            "each rank needs its own GPU: lower the processes per node or raise --gpu / -h"
        )
    return app


def torchrun_job(script: str, args: List[str], j: str, env: Optional[Dict[str, str]] = None, launcher: str = "torchrun",
                 **ddp: Any) -> specs.AppDef:
    """``script args`` as a ``dist.ddp`` (torchrun) job, refusing more ranks per node than GPUs.
    ``launcher = "python"`` runs a one-process job (``-j 1x1``) as ``python script args``: the
    scripts join a one-rank group of their own without torchrun's environment
    (``sharding.distributed.init_distributed``), and the agent's start-up is saved."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher {launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    if launcher == "python" and builtin_dist.parse_nnodes(j)[:3] != (1, 1, 1):
        raise ValueError(f"--launcher python runs one process: it needs -j 1x1, got -j {j}")
    # ddp adds its own variables to the env dict it gets: give it a copy.
    app = builtin_dist.ddp(*args, script=script, j=j, env=dict(env) if env else None, **ddp)
    if launcher == "python":
        role = app.roles[0]
        role.entrypoint, role.args = "python", [script, *args]
    return _one_gpu_per_rank(app, j)


def split_days(days: str) -> List[str]:
    parts = [d.strip() for d in days.split(",")]
    if any(not d for d in parts):
        raise ValueError(f"--days {days!r}: expected a comma-separated list of days, e.g. 2026-01-01,2026-01-02")
    return parts


def python_module_job(name: str, image: str, module: str, args: List[str], cpu: int, memMB: int,
                      h: Optional[str], env: Optional[Dict[str, str]], max_retries: int,
                      mounts: Optional[List[str]]) -> specs.AppDef:
    """One process running ``python -m module args`` (aggregation and publishing need no ranks)."""
    resource = specs.named_resources[h] if h else specs.Resource(cpu=cpu, gpu=0, memMB=memMB)
    role = specs.Role(
        name=name.split("/")[-1], image=image, entrypoint="python", args=["-m", module, *args],
        resource=resource, env=dict(env or {}), max_retries=max_retries,
        mounts=specs.parse_mounts(mounts) if mounts else [],
    )
    return specs.AppDef(name=name.split("/")[-1], roles=[role])


def chain_job(name: str, apps: List[specs.AppDef]) -> specs.AppDef:
    """One process running the scripts of several one-process jobs in turn (``python -m
    pipeline.chain``): the pipeline's job on ``local_cwd``, where every step started on its own
    would pay the interpreter's imports again. Every job must be a ``launcher = "python"`` job
    (``python SCRIPT ARGS``); the chain gets the first one's resources and environment, which must
    be the others' too."""
    if not apps:
        raise ValueError("a chain needs at least one job")
    roles = [app.roles[0] for app in apps]
    bad = [app.name for app, role in zip(apps, roles) if len(app.roles) != 1 or role.entrypoint != "python" or role.args[0].startswith("-")]
    if bad:
        raise ValueError(f"jobs {bad}: only one-process `python SCRIPT ARGS` jobs (launcher python) can be chained")
    first = roles[0]
    differ = [app.name for app, role in zip(apps, roles) if (role.resource, role.env, role.image) != (first.resource, first.env, first.image)]
    if differ:
        raise ValueError(f"jobs {differ}: a chain runs in one process, so its jobs need the same resources, image and environment")
    args = ["-m", "pipeline.chain"]
    for i, role in enumerate(roles):
        args += [*([":::"] if i else []), *role.args]
    role = specs.Role(name=name.split("/")[-1], image=first.image, entrypoint="python", args=args, resource=first.resource,
                      env=dict(first.env), max_retries=first.max_retries, mounts=list(first.mounts))
    return specs.AppDef(name=name.split("/")[-1], roles=[role])
