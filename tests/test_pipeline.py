"""The daily pipeline (pipeline/driver.py) through TorchX's runner on ``local_cwd``: three days of
the tiny world end to end, then a re-run that submits nothing; a failing job stops the pipeline
naming the day, the step and the job's log; a failed step is retried; one driver per work folder,
and a dead driver's jobs are stopped by the next; and the plan refuses what it cannot run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from data.spec import load_spec
from data.synthetic import PRESETS, generate
from embeddings.embedded_store import EmbeddedStore
from pipeline.driver import Pipeline, PipelineConfig, PipelineError, local_job_path, quality_table, results_table

REPO = Path(__file__).resolve().parents[1]
DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
FAST = ("--train.max_steps_per_day=3", "--data.batch_size=256")


@pytest.fixture(scope="module")
def four_days(tmp_path_factory):
    """The tiny world with its four days: three to run, each evaluated on the next."""
    root = tmp_path_factory.mktemp("pipeline") / "world"
    generate(root, PRESETS["tiny"], seed=0)
    return root



def _config(data, work, **kw) -> PipelineConfig:
    settings = dict(synthetic_preset="", baseline=False, ann=True, upstream_overrides=FAST, downstream_overrides=FAST)
    return PipelineConfig(data=str(data), work=str(work), **{**settings, **kw})


@pytest.mark.slow
def test_three_days_end_to_end_then_a_rerun_is_a_no_op(four_days, tmp_path, in_repo):
    work = tmp_path / "work"
    # keep_versions = 2: the stores' retention (day 1's versions and index go once day 3 publishes)
    first = Pipeline(_config(four_days, work, days=tuple(DAYS[:2]), keep_versions=2)).run()
    # Chained (one-process jobs on local_cwd): a job per source for upstream + lifecycle, on day 1
    # only those (no embeddings of the day before), on day 2 also one job per downstream model
    assert first["jobs_submitted"] == [f"{d} {job}" for d in DAYS[:2] for job in ("upstream+lifecycle ctr", "upstream+lifecycle cvr")
                                       + (("downstream ctr-derm", "downstream cvr-derm") if d == DAYS[1] else ())]
    results = Pipeline(_config(four_days, work, keep_versions=2)).run()  # all three days: only day 3 is left to do
    assert results["days"] == DAYS and results["downstream_days"] == DAYS[1:] and len(results["jobs_submitted"]) == 4
    assert all(job.startswith(DAYS[2]) for job in results["jobs_submitted"])

    for source in ("ctr", "cvr"):
        for day in DAYS:
            assert (work / "upstream" / source / "snapshots" / f"day={day}" / "meta.json").is_file()
        for entity in ("user", "pin"):
            versions = EmbeddedStore(work / "store" / f"{source}-{entity}").versions()
            assert versions == [f"{source}-{entity}-{d}" for d in DAYS[1:]]
    assert sorted(p.name for p in (work / "ann").iterdir()) == [f"{s}-pin-{d}" for s in ("ctr", "cvr") for d in DAYS[1:]]
    # a run started at day 3 still trains it incrementally, from the day-2 snapshots
    for model in ("upstream/ctr", "downstream/cvr-derm"):
        summary = json.loads((work / model / "summaries" / f"{DAYS[-1]}.json").read_text())
        assert summary["mode"] == "incremental" and [d["day"] for d in summary["days"]] == [DAYS[-1]]
    rows = results["rows"]
    assert [(r["day"], r["eval_day"]) for r in rows if r["model"] == "cvr" and r["label"] == "conversion"] == [
        ("2026-01-02", "2026-01-03"), ("2026-01-03", "2026-01-04")]
    assert {r["label"] for r in rows} == {"click", "good_click", "conversion", "click_conversion", "view_conversion"}
    # the tiny world's eval days have a few dozen conversions: those labels are "too few", not AUCs
    assert all(r["roc_auc"] is None and r["positives"] < 100 if r["too_few_positives"] else
               0.0 <= r["roc_auc"] <= 1.0 and r["oracle_roc_auc"] > 0.5 for r in rows)
    assert any(not r["too_few_positives"] for r in rows) and all(r["train_examples"] > 0 for r in rows)
    assert (work / "results.md").read_text().startswith("| trained | eval |")
    quality = results["embedding_quality"]
    embeddings = ("ctr_user", "ctr_pin", "cvr_user", "cvr_pin")
    assert [(q["day"], q["embedding"]) for q in quality] == [(d, e) for d in DAYS for e in embeddings]
    for q in quality:  # every upstream run evaluated on the next day; every version was measured
        assert -1.0 <= q["mean_pairwise_cosine"] <= 1.0 and 1.0 <= q["effective_rank"] <= q["dim"]
        assert 0.0 <= q["popularity_recall_at_100"] <= 1.0 and 0.0 <= q["recall_at_100"] <= 1.0
        assert q["contrastive_loss"] > 0 and q["ln_batch"] > 0
    assert "| day | embedding | mean cos |" in (work / "results.md").read_text()
    upstream = results["upstream"]  # every upstream model evaluated on the next day
    assert {(u["day"], u["model"]) for u in upstream} == {(d, m) for d in DAYS for m in ("ctr", "cvr")}
    assert all(u["roc_auc"] is None or 0.0 <= u["roc_auc"] <= 1.0 for u in upstream) and any(u["roc_auc"] for u in upstream)
    assert "| trained | eval | upstream model |" in (work / "results.md").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("meta.json")}
    again = Pipeline(_config(four_days, work, keep_versions=2)).run()  # pruned days count as done
    assert again["jobs_submitted"] == []
    assert again["rows"] == rows
    assert {p: p.stat().st_mtime_ns for p in work.rglob("meta.json")} == stamps

    with pytest.raises(ValueError, match=r"made with other settings \(alpha, method differ"):
        Pipeline(_config(four_days, work, method="acc", alpha=0.0)).run()


@pytest.mark.slow
def test_a_failing_job_stops_the_pipeline_with_its_log(four_days, tmp_path, in_repo):
    config = _config(four_days, tmp_path / "work", days=(DAYS[0],), max_parallel=1,
                     upstream_overrides=("--train.eval_day=\"2026-02-30\"",))  # parses (a string), fails in the job
    with pytest.raises(PipelineError, match=r"(?s)2026-01-01 upstream\+lifecycle ctr: job .* ended FAILED.*2026-02-30"):
        Pipeline(config).run()
    assert not (tmp_path / "work" / "upstream" / "cvr").exists()  # nothing after the failed step ran
    assert not (tmp_path / "work" / "emb").exists()  # nor the lifecycle chained after it


def test_plan_refuses_days_without_a_next_day_and_missing_sources(four_days, tiny_world, tmp_path):
    with pytest.raises(ValueError, match=r"days \['2026-01-04'\]: each day needs data and a later day"):
        Pipeline(_config(four_days, tmp_path, days=("2026-01-04",))).days()
    days, eval_days = Pipeline(_config(tiny_world, tmp_path)).days()
    assert days == ["2026-01-01", "2026-01-02"] and eval_days["2026-01-02"] == "2026-01-03"
    with pytest.raises(ValueError, match="method must be acc, ma or ap"):
        PipelineConfig(method="median")
    with pytest.raises(ValueError, match=r"derm: \['adsuser'\] not of the form"):
        PipelineConfig(derm=("adsuser",))
    with pytest.raises(ValueError, match=r"derm \['ads_user'\]: no source of that name runs"):
        Pipeline(_config(four_days, tmp_path, derm=("ads_user",))).days()
    with pytest.raises(ValueError, match=r"derm \['cvr_user'\]: no source of that name runs.*\['ctr'\]"):
        Pipeline(_config(four_days, tmp_path, sources=("ctr",), derm=("cvr_user",))).days()
    with pytest.raises(ValueError, match=r"sources \['ads'\]: not sources of"):
        Pipeline(_config(four_days, tmp_path, sources=("ads",))).days()
    assert Pipeline(_config(four_days, tmp_path, sources=("ctr",))).derm() == ["ctr_user", "ctr_pin"]
    assert Pipeline(_config(four_days, tmp_path)).derm() == ["ctr_user", "ctr_pin", "cvr_user", "cvr_pin"]


@pytest.mark.slow
def test_a_click_only_log_runs_end_to_end(four_days, tmp_path, in_repo):
    """A spec with one source, as a click log alone is: one upstream model, its two embeddings,
    one downstream model and its baseline; one job per step (``chain = false``, as on a cluster)."""
    root, work = tmp_path / "clicks", tmp_path / "work"
    root.mkdir()
    (root / "ctr").symlink_to(four_days / "ctr", target_is_directory=True)
    load_spec(four_days / "spec.toml").for_source("ctr").dump(root / "spec.toml")
    results = Pipeline(_config(root, work, days=tuple(DAYS[:2]), baseline=True, chain=False)).run()
    assert results["sources"] == ["ctr"] and results["derm"] == ["ctr_user", "ctr_pin"]
    assert len(results["jobs_submitted"]) == 2 + 4  # day 1: upstream, lifecycle; day 2: + DERM and baseline models
    assert {(r["model"], r["kind"], r["day"]) for r in results["rows"]} == {("ctr", "ctr", DAYS[1])}
    assert all(set(r["coverage"]) == {"ctr_user", "ctr_pin"} and r["baseline_roc_auc"] is not None for r in results["rows"])
    assert [q["embedding"] for q in results["embedding_quality"]] == ["ctr_user", "ctr_pin"] * 2
    assert not (work / "upstream" / "cvr").exists()


def _write(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def test_results_table_shows_lift_against_the_baseline(tiny_world, tmp_path):
    pipeline = Pipeline(PipelineConfig(data=str(tiny_world), work=str(tmp_path), min_positives=100))
    for kind, label, positives in (("ctr", "click", 150), ("cvr", "conversion", 99)):
        for with_derm, auc in ((True, 0.66), (False, 0.60)):
            _write(pipeline.run_dir(kind, with_derm) / "summaries" / "2026-01-01.json",
                   {"eval": {label: {"roc_auc": auc, "pr_auc": auc / 10, "oracle_roc_auc": 0.8, "positives": positives,
                                     "count": 2000}},
                    "days": [{"day": "2026-01-01", "examples": 2048}], "global_step": 8,
                    **({"coverage": {"ctr_user": 0.9, "ctr_pin": 0.5}} if with_derm else {})})
        # the lifecycle's report of the day's versions (embeddings/daily.py); only ctr's upstream run evaluated
        version = {"dim": 64, "mean_pairwise_cosine": 0.97, "effective_rank": 9.5, "procrustes_residual": None}
        retrieval = {"eval_day": "2026-01-02", "recall_at_10": 0.01, "recall_at_100": 0.12,
                     "popularity_recall_at_10": 0.05, "popularity_recall_at_100": 0.3}
        _write(tmp_path / "quality" / kind / "day=2026-01-01.json", {"user": version, "pin": version, "retrieval": retrieval})
    _write(tmp_path / "upstream" / "ctr" / "summaries" / "2026-01-01.json",
           {"embedding_quality": {"contrastive_loss": 6.1, "ln_batch": 6.2383, "temperature": 0.05}})
    results = pipeline.results(["2026-01-01"], ["2026-01-01"], {"2026-01-01": "2026-01-02"})
    (ctr, cvr) = results["rows"]
    assert ctr["roc_auc_lift_pct"] == pytest.approx(10.0) and ctr["pr_auc_lift_pct"] == pytest.approx(10.0)
    assert ctr["positives"] == 150 and ctr["train_examples"] == 2048 and ctr["train_steps"] == 8
    assert ctr["coverage"] == {"ctr_user": 0.9, "ctr_pin": 0.5}
    # 99 conversions: too few for an AUC worth reporting
    assert cvr["too_few_positives"] and cvr["roc_auc"] is None and cvr["roc_auc_lift_pct"] is None
    table = results_table(results)
    assert "| 2026-01-01 | 2026-01-02 | ctr | click | 0.6600 | 0.6000 | +10.00 |" in table
    assert "| 150 | 2,048 (8) | 90% 50% |" in table
    assert "| cvr | conversion | too few positives (99) |" in table

    quality = results["embedding_quality"]
    assert [q["embedding"] for q in quality] == ["ctr_user", "ctr_pin", "cvr_user", "cvr_pin"]
    keys = {"day", "embedding", "mean_pairwise_cosine", "effective_rank", "recall_at_100", "popularity_recall_at_100",
            "contrastive_loss", "ln_batch"}
    assert all(keys <= q.keys() for q in quality)
    assert quality[1]["recall_at_100"] == 0.12 and quality[0]["contrastive_loss"] == 6.1
    assert quality[2]["contrastive_loss"] is None  # cvr's upstream run did not evaluate
    table = quality_table(results)
    assert "| 2026-01-01 | ctr_pin | 0.970 | 9.5 / 64 | – | 0.010 | 0.120 | 0.300 | 6.100 | 6.24 | 0.0500 |" in table
    assert "| 2026-01-01 | cvr_user | 0.970 | 9.5 / 64 | – | 0.010 | 0.120 | 0.300 | – | – | – |" in table


def test_local_one_process_steps_run_chained_and_resubmit_only_what_is_not_done(four_days, tmp_path):
    """On local_cwd with one-process jobs, upstream + lifecycle of a source are one job and the
    downstream models are dealt to ``max_parallel`` jobs; the job of a chain whose first step is
    done runs only the rest. Elsewhere, or with chain = false, every step is a job of its own."""
    pipeline = Pipeline(_config(four_days, tmp_path, baseline=True))
    first, second, third = pipeline.stages(DAYS[1], DAYS[2])
    assert [s.name for s in first] == ["upstream+lifecycle ctr", "upstream+lifecycle cvr"] and second == []
    assert [s.name for s in third] == ["downstream ctr-derm+cvr-derm", "downstream ctr-baseline+cvr-baseline"]
    assert third[1].app().name == f"downstream-ctr-baseline-cvr-baseline-{DAYS[1]}"
    args = first[0].app().roles[0].args
    assert args[:3] == ["-m", "pipeline.chain", "trainer/main.py"] and args.count(":::") == 1
    assert args[args.index(":::") + 1] == "embeddings/daily.py"
    (snapshot := tmp_path / "upstream" / "ctr" / "snapshots" / f"day={DAYS[1]}").mkdir(parents=True)
    (snapshot / "meta.json").write_text("{}")  # the upstream step is done: the job is the lifecycle alone
    assert first[0].app().roles[0].args[:3] == ["-m", "pipeline.chain", "embeddings/daily.py"]
    assert len(Pipeline(_config(four_days, tmp_path, baseline=True, max_parallel=1)).stages(DAYS[1], DAYS[2])[2]) == 1
    for config in (_config(four_days, tmp_path, chain=False), _config(four_days, tmp_path, launcher="torchrun"),
                   _config(four_days, tmp_path, scheduler="kubernetes")):
        stages = Pipeline(config).stages(DAYS[1], DAYS[2])
        assert [[s.name for s in stage] for stage in stages] == [
            ["upstream ctr", "upstream cvr"], ["lifecycle ctr", "lifecycle cvr"], ["downstream ctr-derm", "downstream cvr-derm"]]


def test_kubernetes_jobs_get_the_queue_of_torchxconfig(in_repo):
    assert Pipeline(PipelineConfig(scheduler="kubernetes")).scheduler_cfg()["queue"] == "default"
    assert Pipeline(PipelineConfig(scheduler="kubernetes", scheduler_args={"queue": "q"})).scheduler_cfg()["queue"] == "q"


def test_local_jobs_side_by_side_share_the_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert Pipeline(PipelineConfig(max_parallel=2)).threads_per_rank() == 4
    assert Pipeline(PipelineConfig(max_parallel=2, j="1x2"))._resources()["env"] == {"DERM_THREADS": "2"}
    assert Pipeline(PipelineConfig(max_parallel=16)).threads_per_rank() == 1
    assert "env" not in Pipeline(PipelineConfig(scheduler="kubernetes"))._resources()  # a cluster job owns its cpu


def test_a_work_folder_from_before_a_new_setting_continues_at_its_default(tmp_path, tiny_world):
    config = PipelineConfig(work=str(tmp_path), data=str(tiny_world))
    old = {k: v for k, v in Pipeline(config).settings().items() if k not in ("sources", "seed")}
    (tmp_path / "pipeline.json").write_text(json.dumps(old))
    (tmp_path / "upstream" / "ctr" / "snapshots" / "day=2026-01-01").mkdir(parents=True)
    (tmp_path / "upstream" / "ctr" / "snapshots" / "day=2026-01-01" / "meta.json").write_text("{}")  # an output made with them
    Pipeline(config)._check_settings()  # sources and seed at their defaults: the same settings
    with pytest.raises(ValueError, match=r"made with other settings \(seed differ"):
        Pipeline(PipelineConfig(work=str(tmp_path), data=str(tiny_world), seed=1))._check_settings()


# ---- one driver per work folder, orphans, retries ------------------------------------------------


def test_a_second_driver_is_refused_with_the_holders_pid(tmp_path, tiny_world):
    from pipeline.driver import main
    from pipeline.worklock import WorkInUse, WorkLock

    work = tmp_path / "work"
    with WorkLock(work, "local_cwd") as held:
        held.acquire()
        with pytest.raises(WorkInUse, match=rf"{work} is in use by another pipeline driver \(pid {os.getpid()}, since "):
            WorkLock(work, "local_cwd").acquire()
        assert main([f"--data={tiny_world}", f"--work={work}", "--synthetic_preset="]) == 2  # the CLI: one line, exit 2
    WorkLock(work, "local_cwd").acquire()  # released: the next driver takes it


def _orphan(*argv: str) -> subprocess.Popen:
    """A process in its own session, as TorchX's local_cwd starts a job's replica; reaped by a
    thread, as init would reap it after its driver died."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", *argv], start_new_session=True)
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


def test_a_dead_drivers_jobs_are_stopped_by_the_next_one(tmp_path):
    from pipeline.worklock import LOCK, WorkLock

    work = tmp_path / "work"
    work.mkdir()
    mine, stranger = _orphan(f"--train.run_dir={work}/upstream/ctr"), _orphan("--train.run_dir=/elsewhere")
    # What a driver killed with kill -9 leaves: the lock file naming its jobs, no lock held.
    (work / LOCK).write_text(json.dumps({"pid": 999999, "scheduler": "local_cwd",
                                         "jobs": {"local_cwd://torchx/up-1": [mine.pid], "local_cwd://torchx/up-2": [stranger.pid]}}))
    t0 = time.monotonic()
    lock = WorkLock(work, "local_cwd")
    assert lock.acquire() == ["local_cwd://torchx/up-1", "local_cwd://torchx/up-2"]
    assert time.monotonic() - t0 < 10  # SIGTERM was enough
    assert mine.wait(timeout=5) == -signal.SIGTERM
    assert stranger.poll() is None  # a PID that runs something else is never signalled
    assert json.loads((work / LOCK).read_text())["jobs"] == {}
    lock.release()
    stranger.kill()


def test_a_failed_step_is_submitted_again_then_the_stage_goes_on(tmp_path, tiny_world, in_repo):
    """retries = 1: a job that fails once (its first attempt leaves a marker) runs again and the
    stage succeeds; with retries = 0 the same step stops the pipeline."""
    from torchx import specs
    from torchx.runner import get_runner

    from pipeline.driver import Step

    def flaky(marker: Path) -> Step:
        script = f"test -f {marker} && touch {marker}.done || {{ touch {marker}; exit 3; }}"
        app = specs.AppDef("flaky", roles=[specs.Role("flaky", image=".", entrypoint="bash", args=["-c", script])])
        return Step("flaky", lambda: Path(f"{marker}.done").exists(), lambda: app)

    for retries, ok in ((1, True), (0, False)):
        pipeline = Pipeline(_config(tiny_world, tmp_path / f"work{retries}", retries=retries))
        with get_runner() as runner, pipeline.lock:
            pipeline.lock.acquire(runner)
            if ok:
                pipeline._run_stage(runner, DAYS[0], [flaky(tmp_path / "m1")])
                assert pipeline.submitted == [f"{DAYS[0]} flaky"] * 2
            else:
                with pytest.raises(PipelineError, match="flaky: job .* ended FAILED"):
                    pipeline._run_stage(runner, DAYS[0], [flaky(tmp_path / "m0")])
                assert pipeline.submitted == [f"{DAYS[0]} flaky"]


@pytest.mark.slow
def test_sigterm_cancels_the_jobs_in_flight(four_days, tmp_path):
    """SIGTERM to a running driver (a scheduler stopping it, `kill`): its jobs are cancelled, not
    orphaned, and it exits 130 saying how to go on."""
    from pipeline.worklock import LOCK

    work = tmp_path / "work"
    driver = subprocess.Popen([sys.executable, "-m", "pipeline", f"--data={four_days}", f"--work={work}", "--synthetic_preset=",
                               f'--days=["{DAYS[0]}"]'], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    groups: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not groups and driver.poll() is None:
        time.sleep(0.2)
        try:
            groups = [g for gs in json.loads((work / LOCK).read_text())["jobs"].values() for g in gs]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
    assert groups, "no job was seen in flight"
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 130 and "run the same command to go on" in err, err[-2000:]
    for g in groups:
        with pytest.raises(ProcessLookupError):
            os.killpg(g, 0)
    assert json.loads((work / LOCK).read_text())["jobs"] == {}


def test_local_jobs_find_the_drivers_interpreter_first_on_their_path():
    """`.venv/bin/python -m pipeline` without an activated venv: the local jobs' `python` and
    `torchrun` must still be the venv's (its folder goes first on PATH, once)."""
    venv = "/repo/.venv/bin/python"
    assert local_job_path("/usr/bin:/bin", venv) == "/repo/.venv/bin:/usr/bin:/bin"
    assert local_job_path("/repo/.venv/bin:/usr/bin", venv) == "/repo/.venv/bin:/usr/bin"  # already first: unchanged
    assert local_job_path("", venv) == "/repo/.venv/bin"
