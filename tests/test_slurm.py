"""Sweeps on a real single-node SLURM cluster (``tests/slurm/slurm-local.sh start``).

A 4-trial sweep goes out as one job array through submitit; one running trial gets
SLURM's time-limit warning (SIGUSR2, what ``--signal`` sends before a limit or a
preemption), checkpoints, is requeued and resumes with exactly one row per logged step;
the same sweep run by the local executor gives identical per-trial metrics. A sweep
with plugins carries them to every array task.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from memctl.sweep import make_executor, plan_sweep, read_trials_csv, run_sweep
from tests.test_plugins import run as run_plugin_cli
from tests.test_plugins import write_plugins

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "slurm" / "slurm-local.sh"
STATE_DIR = Path(os.environ.get("SLURM_LOCAL_DIR", "/var/tmp/memctl-slurm"))
# Columns that measure the machine or the clock rather than the training.
TIMING = ["wall_s", "steps_per_s", "time"]
DEADLINE_S = 600
# Long enough (a few seconds a trial) that the preemption lands before a trial ends.
TRIAL_STEPS = 2000


def why_no_cluster() -> str | None:
    if importlib.util.find_spec("submitit") is None:
        return "submitit is not installed"
    if shutil.which("sbatch") is None:
        return "SLURM is not installed"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return "no SLURM controller answers"
    return None


REASON = why_no_cluster()
pytestmark = pytest.mark.skipif(
    REASON is not None,
    reason=f"{REASON}: start the local cluster with `tests/slurm/slurm-local.sh start` "
    "(as root; `make test` does this)",
)


def write_sweep(tmp_path: Path) -> Path:
    data = {
        "name": "sl",
        "base": str(ROOT / "recipes" / "copy_lstm.yaml"),
        "set": {
            "model.hidden": 16,
            "train.batch_size": 8,
            "train.steps": TRIAL_STEPS,
            "train.log_every": 10,
            "train.eval_every": 200,
            "train.checkpoint_every": 50,
            "task.max_length": 4,
            "curriculum.type": "fixed",
            "eval.batches": 2,
            "eval.lengths": [6],
        },
        "grid": {"train.optimizer.lr": [0.01, 0.003]},
        "seeds": [0, 1],
        "workers": 2,
        "slurm": {"time_min": 15, "cpus_per_task": 1, "array_parallelism": 2},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def cancel_leftovers(tmp_path):
    yield
    for path in tmp_path.rglob("trials.csv"):
        jobs = {row["job_id"].split("_")[0] for row in read_trials_csv(path.parent)}
        jobs.discard("")
        if jobs:
            subprocess.run(["scancel", *sorted(jobs)], check=False)


def test_start_script_is_a_no_op_when_the_cluster_runs():
    if os.geteuid() != 0:
        pytest.skip("the start script configures system daemons: run as root")
    pid_files = sorted((STATE_DIR / "run").glob("*.pid"))
    if not pid_files:
        pytest.skip(f"no local cluster running: start it with {SCRIPT} start")
    before = {p.name: p.read_text() for p in pid_files}
    started = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    assert "cluster up" in started.stdout and "started" not in started.stdout
    assert {p.name: p.read_text() for p in pid_files} == before


def test_slurm_sweep_survives_preemption_and_matches_the_local_executor(tmp_path, cancel_leftovers):
    path = write_sweep(tmp_path)
    plan = plan_sweep(path, tmp_path / "runs")
    target = plan.trials[0].name
    log = plan.sweep_dir / f"{target}.log"
    signaller: list[subprocess.Popen] = []
    start = time.monotonic()

    def preempt_first_trial(rows: list[dict]) -> None:
        assert time.monotonic() - start < DEADLINE_S, f"sweep still running: {rows}"
        row = rows[0]
        if not signaller and row["status"] == "running" and int(row["step"] or 0) >= 20:
            # What SLURM sends before a time limit (submitit's --signal=USR2@delay).
            signaller.append(subprocess.Popen(["scancel", "--signal=USR2", row["job_id"]]))
        # scancel of an array task retries while the array is in flux; once the trial
        # has checkpointed, a late retry must not hit the requeued task again.
        checkpointed = signaller and "interrupted at step" in log.read_text()
        if checkpointed and signaller[0].poll() is None:
            signaller[0].terminate()
            signaller[0].wait()

    rows = run_sweep(plan, make_executor(plan, "slurm", 1), on_update=preempt_first_trial)
    assert [row["status"] for row in rows] == ["finished"] * 4, rows
    assert len({row["job_id"].split("_")[0] for row in rows}) == 1  # one job array
    assert signaller, "the first trial was never seen running"

    info = json.loads((plan.sweep_dir / target / "run.json").read_text())
    assert [entry["event"] for entry in info["lineage"]] == ["train", "resume"]
    text = log.read_text()
    assert "SIGUSR1 received" in text and "--- memctl resume" in text
    worker_logs = "".join(p.read_text() for p in (plan.sweep_dir / "slurm").rglob("*_log.out"))
    assert "Requeued job" in worker_logs
    steps = pd.read_csv(plan.sweep_dir / target / "metrics.csv")["step"].tolist()
    assert steps == list(range(10, TRIAL_STEPS + 1, 10))

    local = plan_sweep(path, tmp_path / "runs", name="sl-local")
    local_rows = run_sweep(local, make_executor(local, "local", 2))
    assert [row["status"] for row in local_rows] == ["finished"] * 4
    for slurm_trial, local_trial in zip(plan.trials, local.trials, strict=True):
        for name in ("metrics.csv", "eval.csv"):
            on_slurm = pd.read_csv(plan.sweep_dir / slurm_trial.name / name)
            on_local = pd.read_csv(local.sweep_dir / local_trial.name / name)
            pd.testing.assert_frame_equal(
                on_slurm.drop(columns=TIMING, errors="ignore"),
                on_local.drop(columns=TIMING, errors="ignore"),
            )


def test_a_slurm_sweep_passes_its_plugins_to_every_trial(tmp_path, cancel_leftovers):
    """A plugin task and model on the real cluster: every array task imports them again
    from the paths the sweep recorded, and its run.json lists them."""
    task, model, recipe = write_plugins(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "slp",
                "base": str(recipe),
                "seeds": [0, 1],
                "slurm": {"time_min": 10, "cpus_per_task": 1, "array_parallelism": 2},
            }
        )
    )
    runs = tmp_path / "runs"
    swept = run_plugin_cli(
        "--plugin", task, "--plugin", model, "sweep", sweep, "--executor", "slurm",
        "--runs-dir", runs,
    )  # fmt: skip
    assert swept.returncode == 0, swept.stdout + swept.stderr
    for seed in (0, 1):
        info = json.loads((runs / "slp" / f"slp-seed={seed}" / "run.json").read_text())
        assert info["status"] == "finished"
        assert [entry["path"] for entry in info["plugins"]] == [str(task), str(model)]
