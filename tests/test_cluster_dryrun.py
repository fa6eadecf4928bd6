"""Cluster dry-runs: the job spec every job component gives the Kubernetes and Slurm schedulers.

Each component of ``torchx_components`` (``train``, ``lifecycle``, ``downstream``, ``pipeline``; the
``dist`` group is covered by test_torchx.py) is built in Python with cluster-like arguments and
handed to TorchX's ``Runner.dryrun`` for ``kubernetes`` and ``slurm``: nothing is submitted and no
CLI subprocess runs. The request each scheduler would get (the Volcano job as ``torchx run --dryrun``
prints it, read back from YAML; the sbatch script) is reduced to one ``Node`` per node (Volcano
task, heterogeneous Slurm group): what it runs, its resources, env and image. Checked against what
the component should launch: the program and its key arguments, the resources, env, retries, and
for torchrun jobs the nodes x processes topology (one Volcano task / Slurm group per node).
Also checked: the component groups are registered entry points without their helpers, and
``pipeline.daily`` refuses settings it must not pass on.
"""

from __future__ import annotations

import inspect
import shlex
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import yaml
from torchx.runner import get_runner
from torchx.specs import AppDef
from torchx.specs.file_linter import get_fn_docstring
from torchx.specs.finder import get_components

from torchx_components import downstream, lifecycle, pipeline, train

IMAGE = "reg/derm:1"
ENV = {"DERM_X": "1"}
RETRIES = 3
SCHEDULERS = ("kubernetes", "slurm")
SCHEDULER_CFG = {"kubernetes": {"queue": "default"}, "slurm": {}}

# torchrun (dist.ddp) jobs: 2 nodes x 4 processes, a node's resources; single-process jobs: one.
TORCHRUN = dict(image=IMAGE, j="2x4", cpu=32, gpu=4, memMB=65536, env=ENV, max_retries=RETRIES)
SINGLE = dict(image=IMAGE, cpu=8, memMB=16384, env=ENV, max_retries=RETRIES)

SNAPSHOT = "/ckpt/derm/ctr/snapshots/day=2026-01-03"


@dataclass(frozen=True)
class Case:
    build: Callable[[str], AppDef]
    """The AppDef, given the scheduler (``pipeline.daily`` passes it on to its steps)."""
    program: str
    """What runs, ``{scheduler}`` filled in: the script and its arguments under torchrun, else the
    whole command line."""
    torchrun: bool


CASES = {
    "train.initial": Case(
        lambda _: train.initial("--data.root=/data/derm", days="2026-01-01,2026-01-02", **TORCHRUN),
        "trainer/main.py --mode initial --days 2026-01-01,2026-01-02 --data.root=/data/derm",
        torchrun=True,
    ),
    "train.incremental": Case(
        lambda _: train.incremental("--train.run_dir=/ckpt/derm/ctr", day="2026-01-03", **TORCHRUN),
        "trainer/main.py --mode incremental --day 2026-01-03 --train.run_dir=/ckpt/derm/ctr",
        torchrun=True,
    ),
    "lifecycle.infer": Case(
        lambda _: lifecycle.infer(
            SNAPSHOT, "/data/derm", "2026-01-01,2026-01-02,2026-01-03", "/data/derm/emb", **TORCHRUN
        ),
        f"embeddings/infer.py --snapshot {SNAPSHOT} --data /data/derm --days 2026-01-01,2026-01-02,2026-01-03"
        " --out /data/derm/emb --batch-size 4096",
        torchrun=True,
    ),
    "lifecycle.aggregate": Case(
        lambda _: lifecycle.aggregate("/data/derm/emb", "/data/derm/pool", "ctr", "user", "2026-01-03", **SINGLE),
        "python -m embeddings.aggregate --emb /data/derm/emb --pool /data/derm/pool --source ctr --entity user"
        " --day 2026-01-03 --method ma --ttl-days 90 --workers 2 --alpha 0.9",
        torchrun=False,
    ),
    "lifecycle.publish": Case(
        lambda _: lifecycle.publish(
            "/data/derm/pool/ctr/pin/day=2026-01-03", "ctr-pin-2026-01-03", redis="redis://redis:6379/0",
            ann_dir="/data/derm/ann", **SINGLE,
        ),
        "python -m embeddings.publish --pool /data/derm/pool/ctr/pin/day=2026-01-03 --version ctr-pin-2026-01-03"
        " --redis redis://redis:6379/0 --namespace derm --ann-dir /data/derm/ann",
        torchrun=False,
    ),
    "lifecycle.daily": Case(
        lambda _: lifecycle.daily(SNAPSHOT, "/data/derm", "2026-01-03", "/data/derm/pipeline", **TORCHRUN),
        f"embeddings/daily.py --snapshot {SNAPSHOT} --data /data/derm --day 2026-01-03 --work /data/derm/pipeline"
        " --method ma --alpha 0.9 --batch-size 4096 --ann",
        torchrun=True,
    ),
    "downstream.train": Case(
        lambda _: downstream.train(
            "--derm.store_root=/data/derm/pipeline/store", kind="cvr", mode="incremental", day="2026-01-03", **TORCHRUN
        ),
        "trainer/main.py --task=downstream --kind=cvr --mode incremental --day 2026-01-03 --derm.store_root=/data/derm/pipeline/store",
        torchrun=True,
    ),
    "pipeline.daily": Case(
        lambda scheduler: pipeline.daily(
            "--data=/data/derm", "--work=/data/derm/pipeline", "--j=2x4", "--gpu=4", jobs_scheduler=scheduler, **SINGLE
        ),
        "python -m pipeline --scheduler={scheduler} --image=reg/derm:1 --data=/data/derm"
        " --work=/data/derm/pipeline --j=2x4 --gpu=4",
        torchrun=False,
    ),
}


# --- the scheduler requests, reduced to what every node runs ------------------------------------


@dataclass
class Node:
    argv: list[str]
    """The command, a ``bash -c`` command line split into words."""
    resources: tuple[int, int, int]
    """(cpu, memMB, gpu)."""
    env: dict[str, str]
    image: Optional[str]
    """None on Slurm, which runs no container."""


@dataclass
class Job:
    nodes: list[Node]
    retries: int


def _argv(command: list[str]) -> list[str]:
    return shlex.split(command[2]) if command[:2] == ["bash", "-c"] else command


def _dryrun(app: AppDef, scheduler: str):
    with warnings.catch_warnings():  # Kubernetes: "Volcano does NOT support retries correctly"
        warnings.filterwarnings("ignore", r"\s*Role \S+ configured with restarts", UserWarning)
        return get_runner().dryrun(app, scheduler, cfg=SCHEDULER_CFG[scheduler]).request


def kubernetes_job(app: AppDef) -> Job:
    """The Volcano job as ``torchx run --dryrun -s kubernetes`` prints it: one task per node."""
    job = yaml.safe_load(str(_dryrun(app, "kubernetes")))
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    assert job["spec"]["queue"] == "default"
    nodes = []
    for task in job["spec"]["tasks"]:
        assert task["replicas"] == 1 and task["maxRetry"] == job["spec"]["maxRetry"]
        (container,) = task["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert limits["cpu"].endswith("000m") and limits["memory"].endswith("M"), limits
        resources = (int(limits["cpu"][:-4]), int(limits["memory"][:-1]), int(limits.get("nvidia.com/gpu", 0)))
        env = {e["name"]: e["value"] for e in container["env"]}
        nodes.append(Node(_argv(container["command"]), resources, env, container["image"]))
    return Job(nodes, job["spec"]["maxRetry"])


def _options(words: list[str]) -> dict[str, Optional[str]]:
    """``--key=value`` / ``--flag`` words as a dict."""
    assert all(w.startswith("--") for w in words), words
    return dict((w[2:].split("=", 1) + [None])[:2] for w in words)


def slurm_job(app: AppDef) -> Job:
    """The sbatch script: one ``#SBATCH`` heterogeneous group and one ``srun`` group per node."""
    script = _dryrun(app, "slurm").materialize()
    lines = script.replace(" :\\\n", " : ").splitlines()
    sbatch = [_options(line.split()[1:]) for line in lines if line.startswith("#SBATCH --job-name=")]
    (retries,) = [int(line.split("=")[1]) for line in lines if line.startswith("export TORCHX_MAX_RETRIES=")]
    (srun,) = [shlex.split(line)[1:] for line in lines if line.startswith("srun ")]
    groups = [[]]
    for word in srun:  # the groups are separated by ":"
        if word == ":":
            groups.append([])
        else:
            groups[-1].append(word)
    assert len(groups) == len(sbatch)
    nodes = []
    for opts, words in zip(sbatch, groups):
        n_opts = next(i for i, w in enumerate(words) if not w.startswith("--"))
        srun_opts = _options(words[:n_opts])
        assert "requeue" in opts and opts["ntasks-per-node"] == "1", opts
        resources = (int(opts["cpus-per-task"]), int(opts["mem"]), int(opts.get("gpus-per-task", 0)))
        env = dict(kv.split("=", 1) for kv in srun_opts["export"].split(",")[1:])  # ALL,K=V,...
        nodes.append(Node(_argv(words[n_opts:]), resources, env, image=None))
    return Job(nodes, retries)


SCHEDULER_JOB = {"kubernetes": kubernetes_job, "slurm": slurm_job}


def _torchrun_opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _torchrun_program(argv: list[str]) -> list[str]:
    """What torchrun runs: everything after ``--role ''``."""
    assert argv[0] == "torchrun", argv
    return argv[argv.index("--role") + 2 :]


# --- every component on both schedulers ---------------------------------------------------------


@pytest.mark.parametrize(
    "component, scheduler", [pytest.param(c, s, id=f"{c}-{s}") for c in CASES for s in SCHEDULERS]
)
def test_job_spec(component, scheduler):
    case = CASES[component]
    job = SCHEDULER_JOB[scheduler](case.build(scheduler))
    program = shlex.split(case.program.format(scheduler=scheduler))

    assert job.retries == RETRIES
    if case.torchrun:
        assert len(job.nodes) == 2  # -j 2x4: one task / group per node
        expected_resources = (TORCHRUN["cpu"], TORCHRUN["memMB"], TORCHRUN["gpu"])
    else:
        assert len(job.nodes) == 1
        expected_resources = (SINGLE["cpu"], SINGLE["memMB"], 0)
    for node in job.nodes:
        assert node.resources == expected_resources
        assert node.env["DERM_X"] == "1"
        assert node.image == (IMAGE if scheduler == "kubernetes" else None)
        if case.torchrun:
            assert (_torchrun_opt(node.argv, "--nnodes"), _torchrun_opt(node.argv, "--nproc_per_node")) == ("2", "4")
            assert _torchrun_program(node.argv) == program
        else:
            assert node.argv == program


# --- registration and refusals ------------------------------------------------------------------


def test_component_groups_are_registered_without_helpers():
    modules = {"train": train, "lifecycle": lifecycle, "downstream": downstream, "pipeline": pipeline}
    components = get_components()
    listed = {name for name in components if name.split(".")[0] in modules}
    assert listed == set(CASES)  # every component is tested above, and nothing else is listed
    for name in CASES:  # the functions themselves, not look-alikes
        group, fn = name.split(".")
        assert components[name].fn is getattr(modules[group], fn)
    helpers = [c.fn_name for c in components.values() if c.fn_name.startswith("_") or c.fn_name == "python_module_job"]
    assert helpers == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_component_parameter_has_its_help_line(name):
    """The shared job parameters are documented once (jobs.JOB_ARG_DOCS) and added to each
    component's Args: ``--help`` must still describe every parameter, not TorchX's bare default."""
    group, fn_name = name.split(".")
    fn = getattr({"train": train, "lifecycle": lifecycle, "downstream": downstream, "pipeline": pipeline}[group], fn_name)
    _, described = get_fn_docstring(fn)
    for param in inspect.signature(fn).parameters:
        assert described[param].strip(), f"{name}: --{param} has no help line"
    assert fn.__doc__.count("\n    image:") == 1  # added once, not again on re-import


@pytest.mark.parametrize(
    "setting, match",
    [
        pytest.param("--scheduler=slurm", "use the component's --jobs_scheduler", id="scheduler-setting"),
        pytest.param("--data", "expected --key=value", id="no-equals"),
    ],
)
def test_pipeline_daily_refuses_settings(setting, match):
    with pytest.raises(ValueError, match=match):
        pipeline.daily("--work=/data/derm/pipeline", setting, jobs_scheduler="kubernetes")
