"""``pipeline/chain.py``: several one-process job scripts in turn in one interpreter (the daily
pipeline's jobs on local_cwd), and ``torchx_components.jobs.chain_job``, the AppDef that runs it."""

from __future__ import annotations

import pytest

from pipeline.chain import main, parse_steps
from torchx_components import lifecycle, train
from torchx_components.jobs import chain_job


def test_steps_are_scripts_of_the_repository_separated_by_three_colons():
    assert parse_steps(["trainer/main.py", "--a=1", ":::", "embeddings/daily.py", "--day", "d"]) == [
        ("trainer.main", ["--a=1"]), ("embeddings.daily", ["--day", "d"])]
    for bad, message in ((["trainer/main.py", ":::"], "an empty step"), ([":::", "trainer/main.py"], "an empty step"),
                         (["/bin/ls"], "not a script of this repository"), (["trainer/nope.py"], "not a script")):
        with pytest.raises(ValueError, match=message):
            parse_steps(bad)
    assert main(["trainer/main.py", ":::"]) == 2


def test_the_steps_run_in_turn_and_the_first_failure_ends_the_chain(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["data/synthetic/cli.py", f"--out={a}", "--days=2", ":::", "data/synthetic/cli.py", f"--out={b}", "--days=2"]) == 0
    assert (a / "spec.toml").is_file() and (b / "spec.toml").is_file()
    # the same world again without --overwrite fails (2), and the step after it never starts
    c = tmp_path / "c"
    assert main(["data/synthetic/cli.py", f"--out={a}", "--days=2", ":::", "data/synthetic/cli.py", f"--out={c}"]) == 2
    assert not c.exists()
    assert "step 1/2 (data.synthetic.cli) failed with status 2" in capsys.readouterr().err


def test_chain_job_runs_one_process_jobs_in_one_python():
    kw = dict(j="1x1", launcher="python", env={"DERM_THREADS": "1"})
    up = train.initial("--data.source=ctr", days="2026-01-01", **kw)
    daily = lifecycle.daily("S", "D", "2026-01-01", "W", **kw)
    app = chain_job("derm/up-life", [up, daily])
    role = app.roles[0]
    assert app.name == "up-life" and role.entrypoint == "python" and role.env == up.roles[0].env
    assert role.args == ["-m", "pipeline.chain", *up.roles[0].args, ":::", *daily.roles[0].args]
    with pytest.raises(ValueError, match="only one-process `python SCRIPT ARGS` jobs"):
        chain_job("x", [up, train.initial("--data.source=ctr", days="2026-01-01", j="1x1")])  # through torchrun
    with pytest.raises(ValueError, match="the same resources, image and environment"):
        chain_job("x", [up, lifecycle.daily("S", "D", "2026-01-01", "W", j="1x1", launcher="python")])
    with pytest.raises(ValueError, match="at least one job"):
        chain_job("x", [])
