"""MLflow tracking (``log.mlflow``): a run's recipe, metrics.csv and eval.csv rows and its
final checkpoint, mirrored into an MLflow run for people who compare runs there.

The run directory stays the record: a tracker that fails (server down, store unwritable,
a value MLflow refuses) prints one warning line and is switched off for the rest of the
run, and training, metrics.csv and the checkpoints go on as without it. ``mlflow`` is
imported only when a run asks for it, because importing it takes seconds.

Where: ``MLFLOW_TRACKING_URI`` when set, else the file store ``./mlruns`` (the
``mlflow-skinny`` package has no SQL store, so the file store is what works everywhere;
MLflow 3 refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is true, which memctl sets for a
``file:`` store the user has not decided on). The experiment is ``MLFLOW_EXPERIMENT_NAME``
when set, else the recipe's name. run.json keeps the MLflow run's id
(``mlflow_run_id``), so ``memctl resume`` logs into the same MLflow run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from memctl.errors import UserError
from memctl.recipe import Recipe
from memctl.rundir import RunDir

MLFLOW_HINT = "mlflow is not installed: pip install 'memctl[mlflow]'"
# The parameter value length every MLflow version accepts (newer ones allow more).
PARAM_VALUE_LIMIT = 500
# log_batch takes at most 100 parameters per call.
PARAMS_PER_BATCH = 100
# eval.csv columns that say which evaluation a row is, rather than measure it.
EVAL_BOOKKEEPING = (
    "step", "time", "checkpoint", "checkpoint_step", "eval_seed", "level", "sequences",
)  # fmt: skip
MLFLOW_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


def mlflow_client_class() -> type:
    """``mlflow.tracking.MlflowClient``; a UserError when mlflow is missing."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError(f"log.mlflow: {MLFLOW_HINT}") from None
    return MlflowClient


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the file store ``mlruns/`` in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A resolved recipe as MLflow parameters: dotted keys (``model.type``), values as
    text (JSON for all but strings), cut to ``PARAM_VALUE_LIMIT`` characters."""
    params: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            params.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) > PARAM_VALUE_LIMIT:
            text = text[: PARAM_VALUE_LIMIT - 3] + "..."
        params[name] = text
    return params


def run_tags(run: RunDir, info: dict[str, Any]) -> dict[str, str]:
    """What identifies a memctl run among MLflow's runs: its name and directory, model,
    task, implementation and git commit; a fork also names its parent's MLflow run."""
    tags = {
        "memctl.run": run.name,
        "memctl.run_dir": str(run.path.resolve()),
        "memctl.model": str(info.get("model")),
        "memctl.task": str(info.get("task")),
        "memctl.backend": str(info.get("backend")),
    }
    if info.get("git_commit"):
        tags["mlflow.source.git.commit"] = tags["memctl.git_commit"] = info["git_commit"]
    origin = info["lineage"][0] if info.get("lineage") else {}
    if origin.get("event") == "fork":
        tags["memctl.parent"] = str(origin["parent"])
        parent_info = Path(origin["parent"]) / "run.json"
        if parent_info.is_file():
            parent_id = json.loads(parent_info.read_text()).get("mlflow_run_id")
            if parent_id:
                tags["memctl.parent_mlflow_run_id"] = parent_id
    return tags


class MlflowLog:
    """metrics.csv and eval.csv rows again as MLflow metrics, called where the trainer
    writes those rows (as ``TensorBoardLog``).

    The MLflow run is opened at the first write: created, with the recipe as parameters
    and ``run_tags`` as tags, when run.json has no ``mlflow_run_id`` yet (its id is then
    stored there), otherwise re-opened, its tags brought up to date. Metrics are logged
    at the row's step, one ``log_batch`` per row. MLflow keeps every value ever logged, so
    after a rollback or ``resume --from`` the steps logged again follow the earlier ones
    in a metric's history.
    """

    def __init__(self, run: RunDir, recipe: Recipe) -> None:
        self.run = run
        self.recipe = recipe
        self.client: Any = None
        self.run_id: str | None = None
        self.off = False

    def _guarded(self, action: Callable[[], None]) -> None:
        """Open the MLflow run if need be and do ``action``; the first failure is one
        warning on stderr and switches tracking off."""
        if self.off:
            return
        try:
            if self.client is None:
                self._open()
            action()
        except Exception as exc:
            self.off = True
            detail = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {detail[0]}" if detail else type(exc).__name__
            print(
                f"warning: mlflow: {reason}; tracking is off for the rest of this run "
                "(metrics.csv and checkpoints are unaffected)",
                file=sys.stderr,
                flush=True,
            )

    def _open(self) -> None:
        from mlflow.entities import Param, RunTag

        client = mlflow_client_class()(tracking_uri())
        info = self.run.read_info()
        tags = run_tags(self.run, info)
        run_id = info.get("mlflow_run_id")
        if run_id is None:
            experiment_id = self._experiment_id(client)
            run_id = client.create_run(experiment_id, tags=tags, run_name=self.run.name).info.run_id
            params = [Param(k, v) for k, v in flatten_params(self.recipe.resolved()).items()]
            for start in range(0, len(params), PARAMS_PER_BATCH):
                client.log_batch(run_id, params=params[start : start + PARAMS_PER_BATCH])
            self.run.update_info(mlflow_run_id=run_id)
        else:
            client.update_run(run_id, status="RUNNING")
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client, self.run_id = client, run_id

    def _experiment_id(self, client: Any) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.recipe.name
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(name)
        except Exception:  # created meanwhile by another run of a sweep
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log(self, values: list[tuple[str, Any, int]]) -> None:
        def log() -> None:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            metrics = [Metric(key, float(value), stamp, step) for key, value, step in values]
            self.client.log_batch(self.run_id, metrics=metrics)

        self._guarded(log)

    def add_metrics(self, row: dict[str, Any]) -> None:
        """Every metrics.csv column but ``step``, under its own name, at the row's step."""
        self._log([(key, value, int(row["step"])) for key, value in row.items() if key != "step"])

    def add_eval(self, rows: list[dict[str, Any]]) -> None:
        """``eval/<column>/level_<n>`` for each measured column of each row."""
        self._log([(f"eval/{key}/level_{row['level']}", value, int(row["step"]))
                   for row in rows for key, value in row.items()
                   if key not in EVAL_BOOKKEEPING])  # fmt: skip

    def close(self, status: str, last_checkpoint: Path) -> None:
        """End the MLflow run with memctl's status (``finished``, ``interrupted``: resume
        re-opens it, ``failed``); a finished run's ``last_checkpoint`` is kept as the
        artifact ``checkpoints/last.pt``."""

        def end() -> None:
            if status == "finished":
                self.client.log_artifact(self.run_id, str(last_checkpoint), "checkpoints")
            self.client.set_terminated(self.run_id, MLFLOW_STATUS[status])

        self._guarded(end)
