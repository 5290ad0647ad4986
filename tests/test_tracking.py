"""The MLflow module: params, metrics, artifacts, nesting, and survival when MLflow is unreachable."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from moetuner.apps.common import hydra_subdir, out_dir
from moetuner.tracking import AppResult, AppRun, flatten, tracked_app, tracked_run


def _cfg(**mlflow_cfg: object) -> object:
    base = {"enabled": True, "experiment": "t", "tracking_uri": None, "parent_run_id": None}
    base.update(mlflow_cfg)
    return OmegaConf.create({"trace": "a.safetensors", "solver": {"name": "eplb", "time_limit_s": 5},
                             "mlflow": base})


def test_flatten_nested_leaves() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None"}


def test_run_logs_params_metrics_tags_and_config(mlflow_uri: str, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    out.write_text("hello")
    with tracked_run("solve", _cfg(), tags={"model": "tiny"}) as run:
        run.log_metrics({"objective": 3.5, "n": 2, "label": "not-a-number", "flag": True})
        run.log_artifact(out)
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["t"])
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["status"] == "FINISHED"
    assert row["params.solver.name"] == "eplb" and row["params.solver.time_limit_s"] == "5"
    assert "params.mlflow.experiment" not in runs.columns
    assert row["metrics.objective"] == 3.5 and row["metrics.n"] == 2
    assert "metrics.label" not in runs.columns and "metrics.flag" not in runs.columns
    assert row["tags.app"] == "solve" and row["tags.model"] == "tiny"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(row["run_id"])}
    assert artifacts == {"config.yaml", "out.txt"}


def test_nested_under_parent_and_failed_status(mlflow_uri: str) -> None:
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.create_experiment("t")
    parent = client.create_run(exp).info.run_id
    with pytest.raises(RuntimeError):
        with tracked_run("simulate", _cfg(parent_run_id=parent)):
            raise RuntimeError("boom")
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["t"], filter_string="tags.app = 'simulate'")
    assert runs.iloc[0]["tags.mlflow.parentRunId"] == parent
    assert runs.iloc[0]["status"] == "FAILED"


def test_unreachable_mlflow_warns_and_lets_the_app_finish(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "blocker").write_text("a file where the store's folder should be")
    bad = f"sqlite:///{tmp_path / 'blocker' / 'x.db'}"
    done = False
    with caplog.at_level(logging.WARNING):
        with tracked_run("solve", _cfg(tracking_uri=bad)) as run:
            run.log_metrics({"a": 1.0})
            done = True
    assert done and not run.active
    assert "outputs are written anyway" in caplog.text


def test_disabled_tracking_creates_no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    with tracked_run("solve", _cfg(enabled=False)) as run:
        run.log_metrics({"a": 1.0})
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize(("out", "run_dir", "subdir"), [
    ("results/p/placement.json", "results/p", ".hydra/placement.json"),
    ("results/sim/in_domain", "results/sim/in_domain", ".hydra"),
])
def test_hydra_record_sits_beside_outputs(out: str, run_dir: str, subdir: str) -> None:
    assert out_dir(out) == run_dir and hydra_subdir(out) == subdir


def test_env_tags_reach_the_run(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOETUNER_RUN_TAGS", '{"rule": "solve", "wildcard.solver": "eplb"}')
    with tracked_run("solve", _cfg(), tags={"model": "tiny"}):
        pass
    mlflow.set_tracking_uri(mlflow_uri)
    row = mlflow.search_runs(experiment_names=["t"]).iloc[0]
    assert (row["tags.rule"], row["tags.wildcard.solver"], row["tags.model"]) == ("solve", "eplb", "tiny")


def test_malformed_env_tags_are_ignored_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from moetuner.tracking import env_tags

    monkeypatch.setenv("MOETUNER_RUN_TAGS", "[1, 2]")
    with caplog.at_level(logging.WARNING):
        assert env_tags() == {}
    assert "must be a JSON object" in caplog.text


def test_experiments_are_machine_learning_kind_and_runs_named_from_env(mlflow_uri: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from moetuner.tracking import EXPERIMENT_TAGS

    monkeypatch.setenv("MOETUNER_RUN_TAGS", '{"mlflow.runName": "solve:intent/h200_2x8/steptail-r1", "rule": "solve"}')
    with tracked_run("solve", _cfg()):
        pass
    monkeypatch.delenv("MOETUNER_RUN_TAGS")
    with tracked_run("simulate", _cfg()):
        pass
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("t")
    assert EXPERIMENT_TAGS == {"mlflow.experimentKind": "custom_model_development"}
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    names = {run.data.tags["app"]: run.info.run_name for run in client.search_runs([exp.experiment_id])}
    assert names == {"solve": "solve:intent/h200_2x8/steptail-r1", "simulate": "simulate"}


def test_an_existing_experiment_gets_the_kind_tag(mlflow_uri: str) -> None:
    from moetuner import tracking

    client = mlflow.MlflowClient(mlflow_uri)
    exp_id = client.create_experiment("old")
    assert "mlflow.experimentKind" not in client.get_experiment(exp_id).tags
    assert tracking.ensure_experiment(mlflow_uri, "old") == exp_id
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_child_run_names_follow_the_file_layout() -> None:
    from moetuner.study.jobs import run_name

    assert run_name("solve", {"trace": "intent", "topology": "h200_2x8", "solver": "steptail", "replicas": "1"}) \
        == "solve:intent/h200_2x8/steptail-r1"
    assert run_name("simulate", {"trace": "a", "topology": "g", "solver": "eplb", "replicas": "0", "eval": "law"}) \
        == "simulate:a/g/eplb-r0/law"
    assert run_name("report", {}) == "report"
    assert run_name("split", {"trace": "intent"}) == "split:intent"


def test_finish_parent_logs_headline_metrics_note_and_artifacts(mlflow_uri: str, tmp_path: Path) -> None:
    from moetuner import tracking
    from moetuner.study import parent_run as study

    results = tmp_path / "results"
    record = study.start_parent(results, "s", "t", mlflow_uri, tags={"skipped_real_data": "none"})
    headline = tmp_path / "headline.md"
    headline.write_text("| topology | replicas | eplb |\n|---|---|---|\n| g | r0 | **1.100** |\n")
    study.finish_parent(results, "FINISHED", [headline], {"speedup.heldout.g.r0.eplb": 1.1}, headline.read_text())
    client = tracking.client(mlflow_uri)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "study:s"
    assert run.data.metrics == {"speedup.heldout.g.r0.eplb": 1.1}
    assert run.data.tags["mlflow.note.content"] == headline.read_text()
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["headline.md"]
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_tracked_app_logs_the_result_once_and_returns_the_headline(mlflow_uri: str, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    out.write_text("hello")
    (tmp_path / "placements").mkdir()
    (tmp_path / "placements" / "v0.json").write_text("{}")
    calls = []

    @tracked_app("solve")
    def main(cfg: object) -> AppRun:
        calls.append("prepare")
        return AppRun({"model": "tiny"}, lambda: AppResult(
            {"layer_time_s": 2.5, "steps": 3, "dispatch": "dynamic"}, [out, (tmp_path / "placements" / "v0.json",
                                                                         "placements")],
            tags={"status": "optimal"}, series={"per_layer": [1.0, 2.0, 4.0]}, headline="layer_time_s"))

    assert main(_cfg()) == 2.5 and calls == ["prepare"]
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("t").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["solver.name"] == "eplb"
    assert (run.data.tags["model"], run.data.tags["status"], run.data.tags["app"]) == ("tiny", "optimal", "solve")
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "layer_time_s")] == [(0, 2.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "per_layer")] == \
        [(0, 1.0), (1, 2.0), (2, 4.0)]
    assert "dispatch" not in run.data.metrics
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert top == {"config.yaml", "out.txt", "placements"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "placements")] == ["placements/v0.json"]


def test_tracked_app_refuses_bad_input_before_a_run_and_fails_a_run_whose_work_raises(mlflow_uri: str) -> None:
    def refuse(cfg: object) -> AppRun:
        raise ValueError("solver=nope is unknown")

    def boom() -> AppResult:
        raise RuntimeError("boom")

    with pytest.raises(ValueError, match="nope"):
        tracked_app("solve")(refuse)(_cfg())
    assert mlflow.MlflowClient(mlflow_uri).get_experiment_by_name("t") is None  # nothing was opened
    with pytest.raises(RuntimeError):
        tracked_app("solve")(lambda cfg: AppRun({}, boom))(_cfg())
    mlflow.set_tracking_uri(mlflow_uri)
    assert list(mlflow.search_runs(experiment_names=["t"])["status"]) == ["FAILED"]


def test_headline_is_none_without_a_numeric_value() -> None:
    assert AppResult({"a": 1.0}).headline_value() is None
    assert AppResult({"a": None}, headline="a").headline_value() is None
    assert AppResult({"a": 3}, headline="a").headline_value() == 3.0
