"""Issue 29 items 11 and 12: every pipeline setting is checked before the first job, a first day
that failed does not lock in its settings, and a missing dataset is an error, never a new world."""

from __future__ import annotations

import json

import pytest

from pipeline.driver import Pipeline, PipelineConfig, main


def _config(data, work, **kw) -> PipelineConfig:
    return PipelineConfig(data=str(data), work=str(work), **kw)


@pytest.mark.parametrize("key, value, message", [
    ("alpha", 1.5, r"alpha must be in \[0, 1\)"), ("alpha", float("nan"), r"alpha must be in \[0, 1\)"),
    ("j", "2", "j must be NODESxPROCS"), ("cpu", 0, "cpu must be >= 1"),
])
def test_a_bad_setting_is_refused_by_the_config_itself(key, value, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**{key: value})


def test_a_bad_trainer_override_is_refused_before_the_first_job(tiny_world, tmp_path, monkeypatch):
    submitted = []
    monkeypatch.setattr(Pipeline, "_run_stage", lambda self, runner, day, steps: submitted.append(steps))
    for key, override, message in [
        ("upstream_overrides", "--data.batch_sizee=256", r"upstream_overrides \(the upstream ctr model\): .*batch_sizee"),
        ("downstream_overrides", "--train.max_steps_per_day=many", r"downstream_overrides \(the downstream ctr-derm model\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            Pipeline(_config(tiny_world, tmp_path / "work", **{key: (override,)})).run()
    assert submitted == [] and not (tmp_path / "work" / "pipeline.json").exists()


def test_a_failed_first_day_does_not_lock_in_its_settings(tiny_world, tmp_path):
    work = tmp_path / "work"
    Pipeline(_config(tiny_world, work, alpha=0.5))._check_settings()  # a first run that then failed in its lifecycle
    assert json.loads((work / "pipeline.json").read_text())["alpha"] == 0.5
    Pipeline(_config(tiny_world, work, alpha=0.9))._check_settings()  # nothing finished: the corrected alpha goes on
    assert json.loads((work / "pipeline.json").read_text())["alpha"] == 0.9
    # an upstream snapshot finished under alpha 0.9: alpha (a lifecycle setting) may still change,
    # the upstream settings may not
    snapshot = work / "upstream" / "ctr" / "snapshots" / "day=2026-01-01"
    snapshot.mkdir(parents=True)
    (snapshot / "meta.json").write_text("{}")
    Pipeline(_config(tiny_world, work, alpha=0.8))._check_settings()
    with pytest.raises(ValueError, match=r"other settings \(seed differ; .*\) and has outputs made with them \(upstream\)"):
        Pipeline(_config(tiny_world, work, alpha=0.8, seed=3))._check_settings()
    quality = work / "quality" / "ctr" / "day=2026-01-01.json"  # the lifecycle's last output
    quality.parent.mkdir(parents=True)
    quality.write_text("{}")
    with pytest.raises(ValueError, match=r"alpha differ"):
        Pipeline(_config(tiny_world, work, alpha=0.7))._check_settings()


def test_a_missing_dataset_is_an_error_naming_the_path_not_a_new_world(tmp_path, caplog, monkeypatch):
    import common.log

    monkeypatch.setattr(common.log, "setup_logging", lambda: None)  # its basicConfig(force=True) would drop caplog
    typo = tmp_path / "runs" / "data" / "mylgo"
    assert main([f"--data={typo}", f"--work={tmp_path / 'work'}"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"{typo}: no dataset there (no spec.toml); check the data path")
    assert not typo.exists() and not (tmp_path / "work").exists()
