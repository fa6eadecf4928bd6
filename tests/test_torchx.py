"""TorchX components: the project's ``dist`` group and the training jobs, without a scheduler.

AppDefs are built the way ``torchx run`` builds them (``materialize_appdef`` on CLI-style
arguments), and the CLI itself runs as a subprocess for ``builtins`` and the Kubernetes and Slurm
dry-runs, whose printed job specs are parsed and checked.
"""

from __future__ import annotations

import ast
import inspect
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torchx.components import dist as builtin_dist
from torchx.specs import AppDef
from torchx.specs.builders import materialize_appdef
from torchx.specs.file_linter import get_fn_docstring
from torchx.specs.finder import get_components

from torchx_components import dist, train

REPO = Path(__file__).resolve().parents[1]
TORCHX = str(Path(sys.executable).with_name("torchx"))


def _torchx(*args: str) -> str:
    """Runs the torchx CLI from the repository root (so .torchxconfig applies); returns stdout."""
    proc = subprocess.run([TORCHX, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchx {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _command(app: AppDef) -> list[str]:
    """The role's ``bash -c`` command line, split into words."""
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return shlex.split(role.args[1])


def _torchrun_opt(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def _script_and_args(cmd: list[str]) -> list[str]:
    """What torchrun runs: everything after ``--role ''`` (and ``--node_rank N``, with static rendezvous)."""
    i = cmd.index("--role") + 2
    if cmd[i] == "--node_rank":
        i += 2
    return cmd[i:]


def _scheduler_request(out: str) -> str:
    marker = "=== SCHEDULER REQUEST ===\n"
    assert marker in out, out
    return out.split(marker, 1)[1]


# --- dist: the users' command -------------------------------------------------------------------


@pytest.mark.parametrize(
    "cli",
    [
        ["-j", "1x8"],
        ["-j", "2x4", "--gpu", "4", "--env", "A=1,B=2", "--max_retries", "2", "--name", "exp/run"],
        ["-j", "1:3x2", "-h", "aws_p4d.24xlarge", "--rdzv_backend", "static", "--debug", "True"],
    ],
)
def test_positional_script_is_the_builtin_with_script_flag(cli):
    overrides = ["--data.root=runs/data/small", "--train.run_dir=runs/small"]
    ours = materialize_appdef(dist.ddp, [*cli, "trainer/main.py", *overrides])
    builtin = materialize_appdef(builtin_dist.ddp, [*cli, "--script", "trainer/main.py", "--", *overrides])
    assert ours == builtin
    (role,) = ours.roles
    assert role.entrypoint == "bash"
    assert _script_and_args(_command(ours)) == ["trainer/main.py", *overrides]


def test_script_flag_and_module_are_passed_through_unchanged():
    for cli in (["--script", "trainer/main.py", "--", "x.py"], ["-m", "trainer.main", "x.py"], ["--script", "a.py"]):
        assert materialize_appdef(dist.ddp, cli) == materialize_appdef(builtin_dist.ddp, cli)
    # With --script given, a *.py argument is the script's argument, not a second script.
    app = materialize_appdef(dist.ddp, ["--script", "trainer/main.py", "--", "other.py"])
    assert _script_and_args(_command(app)) == ["trainer/main.py", "other.py"]


@pytest.mark.parametrize("args", [(), ("trainer/main",), ("--data.root=x",)])
def test_no_script_is_refused_like_the_builtin(args):
    with pytest.raises(ValueError, match="exactly one of --script and -m"):
        dist.ddp(*args)


def test_spmd_takes_a_positional_script_too():
    ours = materialize_appdef(dist.spmd, ["-j", "2x8", "-h", "aws_p4d.24xlarge", "trainer/main.py", "--data.root=x"])
    builtin = materialize_appdef(builtin_dist.spmd, ["-j", "2x8", "-h", "aws_p4d.24xlarge", "--script", "trainer/main.py", "--", "--data.root=x"])
    assert ours == builtin


@pytest.mark.parametrize("name, note_arg", [("ddp", "script_args"), ("spmd", "args")])
def test_same_arguments_and_help_as_the_builtin(name, note_arg):
    ours, builtin = getattr(dist, name), getattr(builtin_dist, name)
    assert inspect.signature(ours) == inspect.signature(builtin)
    our_desc, our_args = get_fn_docstring(ours)
    builtin_desc, builtin_args = get_fn_docstring(builtin)
    assert f"dist.{name} -j 1x8 trainer/main.py" in our_desc
    assert builtin_desc.split("\n")[0] in our_desc and builtin_desc.split("\n")[-1] in our_desc
    assert dist._POSITIONAL_ARG_NOTE in our_args[note_arg]
    our_args[note_arg] = our_args[note_arg].replace(dist._POSITIONAL_ARG_NOTE, "")
    assert our_args == builtin_args


def test_entry_points_register_the_project_dist_and_keep_builtin_groups():
    components = get_components()
    assert components["dist.ddp"].fn is dist.ddp
    assert components["dist.spmd"].fn is dist.spmd
    assert components["train.initial"].fn is train.initial
    assert components["train.incremental"].fn is train.incremental
    for kept in ("metrics.tensorboard", "serve.torchserve", "utils.echo", "utils.python", "utils.sh"):
        assert kept in components

    listed = _torchx("builtins")
    for name in ("dist.ddp", "dist.spmd", "train.initial", "train.incremental", "utils.python", "metrics.tensorboard"):
        assert f" {name}\n" in listed


def test_users_command_through_the_cli():
    """``torchx run -s local_cwd dist.ddp -j 1x8 trainer/main.py``, dry-run, with the repo's .torchxconfig."""
    out = _torchx("run", "--dryrun", "-s", "local_cwd", "dist.ddp", "-j", "1x8", "trainer/main.py", "--data.root=x")
    request = ast.literal_eval(_scheduler_request(out))  # local_cwd prints its request as a dict literal
    (replica,) = request["role_params"]["main"]
    assert replica["args"][:2] == ["bash", "-c"]
    cmd = shlex.split(replica["args"][2])
    assert (_torchrun_opt(cmd, "--nnodes"), _torchrun_opt(cmd, "--nproc_per_node")) == ("1", "8")
    assert _script_and_args(cmd) == ["trainer/main.py", "--data.root=x"]
    assert Path(replica["cwd"]) == REPO


# --- train.initial / train.incremental ----------------------------------------------------------


def test_initial_defaults():
    app = train.initial()
    (role,) = app.roles
    cmd = _command(app)
    assert _script_and_args(cmd) == ["trainer/main.py", "--mode", "initial"]
    assert (_torchrun_opt(cmd, "--nnodes"), _torchrun_opt(cmd, "--nproc_per_node")) == ("1", "2")
    assert role.image == train.DERM_IMAGE == "derm-trainer:latest"
    assert (role.num_replicas, role.min_replicas, role.max_retries) == (1, 1, 0)
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (4, 0, 8192)
    assert app.name == "derm-initial"


def test_initial_from_the_cli():
    cli = [
        "-j", "2x4", "--gpu", "4", "--cpu", "32", "--memMB", "65536", "--image", "reg/derm:1",
        "--config", "configs/prod.toml", "--days", "2026-01-01,2026-01-02", "--env", "A=1,B=2",
        "--max_retries", "3", "--rdzv_backend", "static", "--",
        "--data.root=/data/derm", "--train.run_dir=/ckpt/derm",
    ]  # fmt: skip
    app = materialize_appdef(train.initial, cli)
    (role,) = app.roles
    cmd = _command(app)
    assert _script_and_args(cmd) == [
        "trainer/main.py", "--mode", "initial", "--days", "2026-01-01,2026-01-02",
        "--config", "configs/prod.toml", "--data.root=/data/derm", "--train.run_dir=/ckpt/derm",
    ]  # fmt: skip
    assert cmd[0] == "torchrun"
    assert (_torchrun_opt(cmd, "--nnodes"), _torchrun_opt(cmd, "--nproc_per_node")) == ("2", "4")
    assert _torchrun_opt(cmd, "--rdzv_backend") == "static" and "--node_rank" in cmd
    assert role.image == "reg/derm:1"
    assert (role.num_replicas, role.min_replicas, role.max_retries) == (2, 2, 3)
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (32, 4, 65536)
    assert role.env["A"] == "1" and role.env["B"] == "2"


def test_incremental_with_a_named_resource_and_elastic_nodes():
    app = materialize_appdef(
        train.incremental, ["--day", "2026-01-03", "-j", "1:2x8", "-h", "aws_p4d.24xlarge", "--", "--train.run_dir=r"]
    )
    (role,) = app.roles
    cmd = _command(app)
    assert _script_and_args(cmd) == ["trainer/main.py", "--mode", "incremental", "--day", "2026-01-03", "--train.run_dir=r"]
    assert (_torchrun_opt(cmd, "--nnodes"), _torchrun_opt(cmd, "--nproc_per_node")) == ("1:2", "8")
    assert (role.min_replicas, role.num_replicas) == (1, 2)
    assert (role.resource.gpu, role.resource.cpu) == (8, 96)
    assert app.name == "derm-incremental"


def test_incremental_needs_a_day():
    with pytest.raises(SystemExit):  # argparse: --day is required
        materialize_appdef(train.incremental, ["-j", "1x2"])


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: train.initial("--days=2026-01-05"), "use initial's --days"),
        (lambda: train.initial("--mode=incremental"), "the component sets --mode"),
        (lambda: train.incremental("--config=x.toml", day="2026-01-03"), "use the component's --config"),
        (lambda: train.initial(days="2026-01-01,,2026-01-03"), "comma-separated"),
        (lambda: train.incremental(day="2026-01-03,2026-01-04"), "exactly one day"),
        (lambda: train.incremental(day=" "), "exactly one day"),
        (lambda: train.initial(j="1x8", gpu=4), "8 processes per node but a node has 4 GPU"),
        (lambda: train.initial(j="2x8", h="gpu.small"), "8 processes per node but a node has 1 GPU"),
        (lambda: train.initial(j="8by1"), "Invalid format for -j"),
    ],
)
def test_bad_arguments_are_refused_before_submission(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# --- dry-runs: the job specs the schedulers would get -------------------------------------------


def test_kubernetes_dryrun_prints_a_volcano_job():
    out = _torchx(
        "run", "--dryrun", "-s", "kubernetes", "torchx_components/train.py:initial",
        "-j", "2x4", "--gpu", "4", "--cpu", "32", "--memMB", "65536", "--image", "reg/derm:1",
        "--days", "2026-01-01,2026-01-02", "--env", "DERM_X=1", "--max_retries", "3",
        "--", "--data.root=/data/derm",
    )  # fmt: skip
    job = yaml.safe_load(_scheduler_request(out))
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    assert job["spec"]["queue"] == "default"  # from .torchxconfig
    assert job["spec"]["maxRetry"] == 3
    assert job["metadata"]["name"].startswith("derm-initial-")
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 2  # one task per node
    for task in tasks:
        assert task["maxRetry"] == 3
        (container,) = task["template"]["spec"]["containers"]
        assert container["image"] == "reg/derm:1"
        assert container["command"][:2] == ["bash", "-c"]
        cmd = shlex.split(container["command"][2])
        assert (_torchrun_opt(cmd, "--nnodes"), _torchrun_opt(cmd, "--nproc_per_node")) == ("2", "4")
        assert _script_and_args(cmd) == [
            "trainer/main.py", "--mode", "initial", "--days", "2026-01-01,2026-01-02", "--data.root=/data/derm"
        ]  # fmt: skip
        limits = container["resources"]["limits"]
        assert (limits["cpu"], limits["memory"], limits["nvidia.com/gpu"]) == ("32000m", "65536M", "4")
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["DERM_X"] == "1"


def test_slurm_dryrun_prints_an_sbatch_script():
    out = _torchx(
        "run", "--dryrun", "-s", "slurm", "train.incremental", "-j", "2x4", "--gpu", "4", "--cpu", "32",
        "--memMB", "65536", "--day", "2026-01-03", "--max_retries", "2", "--", "--train.run_dir=/ckpt/derm",
    )  # fmt: skip
    script = _scheduler_request(out)
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH --job-name=")]
    assert len(sbatch) == 2  # one heterogeneous group per node
    for line in sbatch:
        opts = line.split()
        assert {"--ntasks-per-node=1", "--cpus-per-task=32", "--mem=65536", "--gpus-per-task=4"} <= set(opts)
    assert "export TORCHX_MAX_RETRIES=2" in script

    (srun,) = [line for line in script.replace(" :\\\n", " : ").splitlines() if line.startswith("srun ")]
    commands = [word for word in shlex.split(srun) if word.startswith("torchrun ")]  # each group's `bash -c`
    assert len(commands) == 2
    for command in commands:
        cmd = shlex.split(command)
        assert (_torchrun_opt(cmd, "--nnodes"), _torchrun_opt(cmd, "--nproc_per_node")) == ("2", "4")
        assert _script_and_args(cmd) == [
            "trainer/main.py", "--mode", "incremental", "--day", "2026-01-03", "--train.run_dir=/ckpt/derm"
        ]  # fmt: skip
