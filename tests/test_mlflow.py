"""MLflow tracking (log.mlflow), read back from a real local file store: what a run logs,
resume into the same MLflow run, forks, a failing tracker, a missing package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from memctl.recipe import read_yaml, validate_recipe
from memctl.rundir import RunDir
from memctl.tracking import PARAM_VALUE_LIMIT, MlflowLog, flatten_params
from tests.conftest import TINY, cli, cli_process, snapshot, write_recipe
from tests.test_bad_input import assert_one_line_error
from tests.test_reliability import finish, metrics_text

pytest.importorskip(
    "mlflow", reason="mlflow is not installed: pip install 'memctl[mlflow]' (make install does)"
)
from mlflow.tracking import MlflowClient


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """A file store in tmp_path, for memctl (in this process and in the processes it
    starts) and for the test."""
    uri = f"file:{tmp_path}/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return MlflowClient(uri)


def mlflow_id(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["mlflow_run_id"]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def assert_metrics_match_csv(client: MlflowClient, run_id: str, run: Path) -> None:
    frame = pd.read_csv(run / "metrics.csv")
    for column in frame.columns.drop("step"):
        logged = history(client, run_id, column)
        assert [step for step, _ in logged] == frame["step"].tolist(), column
        assert [value for _, value in logged] == pytest.approx(frame[column].tolist()), column


def test_flatten_params_dots_keys_and_respects_the_value_limit():
    params = flatten_params({"a": {"b": 1, "c": "x" * 600, "d": [6], "e": None}, "f": "g"})
    assert params == {
        "a.b": "1",
        "a.c": "x" * (PARAM_VALUE_LIMIT - 3) + "...",
        "a.d": "[6]",
        "a.e": "null",
        "f": "g",
    }
    assert len(params["a.c"]) == PARAM_VALUE_LIMIT


def test_a_run_logs_params_metrics_eval_rows_tags_and_last_checkpoint(
    tiny_recipe: Path, runs_dir: Path, client: MlflowClient, tmp_path: Path
):
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--mlflow")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    run = runs_dir / "tiny"
    info = json.loads((run / "run.json").read_text())
    experiment = client.get_experiment_by_name("tiny")
    [logged] = client.search_runs([experiment.experiment_id])
    assert logged.info.run_id == info["mlflow_run_id"]
    assert logged.info.status == "FINISHED"
    params = logged.data.params
    assert params["model.type"] == "lstm"
    assert params["train.steps"] == "40"
    assert params["eval.lengths"] == "[6]"
    assert_metrics_match_csv(client, logged.info.run_id, run)
    evals = pd.read_csv(run / "eval.csv")
    assert len(evals) > 2
    for row in evals.itertuples():
        logged_eval = dict(
            history(client, logged.info.run_id, f"eval/bit_errors/level_{row.level}")
        )
        assert logged_eval[row.step] == pytest.approx(row.bit_errors)
    tags = logged.data.tags
    assert tags["memctl.run"] == "tiny"
    assert tags["memctl.model"] == "lstm"
    assert tags["memctl.task"] == "copy"
    assert tags["memctl.backend"] == info["backend"]
    if info["git_commit"]:
        assert tags["mlflow.source.git.commit"] == info["git_commit"]
    artifact = client.download_artifacts(logged.info.run_id, "checkpoints/last.pt", str(tmp_path))
    assert Path(artifact).read_bytes() == (run / "checkpoints" / "last.pt").read_bytes()


def test_resume_in_a_new_process_continues_the_same_mlflow_run(
    tiny_recipe: Path, runs_dir: Path, client: MlflowClient
):
    run = runs_dir / "tiny"
    first = cli_process("train", tiny_recipe, "--runs-dir", runs_dir, "--mlflow", "--steps", "20")
    assert finish(first)[0] == 0
    run_id = mlflow_id(run)
    assert history(client, run_id, "loss")[-1][0] == 20
    code, out, err = finish(cli_process("resume", run, "--steps", "20"))
    assert code == 0, out + err
    assert "warning" not in err
    assert mlflow_id(run) == run_id
    experiment = client.get_experiment_by_name("tiny")
    [logged] = client.search_runs([experiment.experiment_id])
    assert logged.info.run_id == run_id
    assert logged.info.status == "FINISHED"
    assert_metrics_match_csv(client, run_id, run)
    assert history(client, run_id, "loss")[-1][0] == 40


def test_fork_starts_a_new_mlflow_run_tagged_with_its_parent(
    tiny_recipe: Path, runs_dir: Path, client: MlflowClient
):
    assert cli("train", tiny_recipe, "--runs-dir", runs_dir, "--mlflow").exit_code == 0
    parent = runs_dir / "tiny"
    result = cli("fork", parent, "tiny-b", "--steps", "10")
    assert result.exit_code == 0, result.output
    child_id = mlflow_id(runs_dir / "tiny-b")
    assert child_id != mlflow_id(parent)
    child = client.get_run(child_id)
    assert child.data.tags["memctl.parent_mlflow_run_id"] == mlflow_id(parent)
    assert child.data.tags["memctl.run"] == "tiny-b"
    assert [step for step, _ in history(client, child_id, "loss")] == [45, 50]


@pytest.fixture(scope="module")
def untracked_metrics(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("untracked")
    recipe = write_recipe(root / "tiny.yaml", TINY)
    assert cli("train", recipe, "--runs-dir", root / "runs").exit_code == 0
    return metrics_text(root / "runs" / "tiny")


@pytest.mark.parametrize(
    "where,method",
    [("start", "create_run"), ("row", "log_batch"), ("end", "log_artifact")],
)
def test_a_failing_tracker_warns_once_and_training_is_unaffected(
    tiny_recipe: Path,
    runs_dir: Path,
    client: MlflowClient,
    monkeypatch: pytest.MonkeyPatch,
    untracked_metrics: list[str],
    where: str,
    method: str,
):
    original = getattr(MlflowClient, method)
    calls = []

    def failing(self, *args, **kwargs):
        if method == "log_batch" and not kwargs.get("metrics"):
            return original(self, *args, **kwargs)  # the parameters go through
        calls.append(method)
        raise RuntimeError("tracking server unavailable")

    monkeypatch.setattr(MlflowClient, method, failing)
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--mlflow")
    assert result.exit_code == 0, result.output
    assert calls == [method], where  # switched off after the first failure
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "warning: mlflow: RuntimeError: tracking server unavailable; tracking is off for the "
        "rest of this run (metrics.csv and checkpoints are unaffected)"
    ]
    run = runs_dir / "tiny"
    assert metrics_text(run) == untracked_metrics
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert (run / "checkpoints" / "last.pt").is_file()


def without_mlflow(*args: str) -> SimpleNamespace:
    """memctl in a process where ``import mlflow`` fails, as when it is not installed;
    the result reads like click's (exit_code, stderr, output)."""
    code = "import sys; sys.modules['mlflow'] = None; from memctl.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    return SimpleNamespace(
        exit_code=done.returncode, stderr=done.stderr, output=done.stdout + done.stderr
    )


def test_mlflow_missing_is_one_line_and_creates_nothing(
    tiny_recipe: Path, runs_dir: Path, client: MlflowClient
):
    result = without_mlflow("train", tiny_recipe, "--runs-dir", runs_dir, "--mlflow")
    assert_one_line_error(result, "tiny.yaml", "log.mlflow", "pip install 'memctl[mlflow]'")
    assert list(runs_dir.iterdir()) == []
    assert cli("train", tiny_recipe, "--runs-dir", runs_dir, "--steps", "10").exit_code == 0
    before = snapshot(runs_dir)
    result = without_mlflow("resume", runs_dir / "tiny", "--steps", "5", "--mlflow")
    assert_one_line_error(result, "log.mlflow", "memctl[mlflow]")
    assert snapshot(runs_dir) == before
    assert client.get_experiment_by_name("tiny") is None


def test_resume_from_an_earlier_checkpoint_logs_its_steps_again(
    tiny_recipe: Path, runs_dir: Path, client: MlflowClient
):
    assert cli("train", tiny_recipe, "--runs-dir", runs_dir, "--mlflow").exit_code == 0
    run = runs_dir / "tiny"
    result = cli("resume", run, "--from", "step_30")
    assert result.exit_code == 0, result.output
    steps = [step for step, _ in history(client, mlflow_id(run), "loss")]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 35, 40, 40]  # MLflow keeps the cut values
    assert pd.read_csv(run / "metrics.csv")["step"].tolist() == [5, 10, 15, 20, 25, 30, 35, 40]


def test_an_interrupted_run_is_killed_in_mlflow_and_resume_reopens_it(
    tiny_recipe: Path, runs_dir: Path, client: MlflowClient
):
    assert (
        cli("train", tiny_recipe, "--runs-dir", runs_dir, "--mlflow", "--steps", "20").exit_code
        == 0
    )
    run = RunDir.open(runs_dir / "tiny")
    recipe = validate_recipe(read_yaml(run.recipe_file), str(run.recipe_file))
    MlflowLog(run, recipe).close("interrupted", run.checkpoint_path("last"))
    assert client.get_run(mlflow_id(run.path)).info.status == "KILLED"
    assert cli("resume", run.path, "--steps", "5").exit_code == 0
    logged = client.get_run(mlflow_id(run.path))
    assert logged.info.status == "FINISHED"
    assert history(client, logged.info.run_id, "loss")[-1][0] == 25
