"""Sweeps: expansion into trial recipes, names, validation, the sweep folder, the summary,
and one real local sweep (a failing trial, Ctrl-C, continue, retry)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from memctl.errors import UserError
from memctl.executors import LocalExecutor, thread_environment
from memctl.recipe import NAME_PATTERN
from memctl.sweep import (
    make_executor,
    plan_sweep,
    prepare,
    read_trials_csv,
    run_sweep,
    summarise,
    sweep_status,
    trial_table,
)

BASE = Path(__file__).resolve().parents[1] / "recipes" / "copy_lstm.yaml"

# A trial of a few hundred tiny steps: seconds of training after the process starts.
TINY = {
    "model.hidden": 16,
    "train.batch_size": 8,
    "train.steps": 400,
    "train.log_every": 10,
    "train.eval_every": 0,
    "train.checkpoint_every": 50,
    "task.max_length": 4,
    "curriculum.type": "step",
    "curriculum.every": 1000,
    "eval.batches": 1,
    "eval.lengths": [],
}


def write_sweep(tmp_path: Path, **sections) -> Path:
    data = {"name": "s", "base": str(BASE), **sections}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_grid_and_seeds_expand_into_named_resolved_trials(tmp_path):
    path = write_sweep(
        tmp_path,
        set={"train.steps": 7},
        grid={"model.hidden": [8, 16], "train.optimizer.lr": [0.01]},
        seeds=[0, 1],
    )
    plan = plan_sweep(path, tmp_path / "runs")
    assert [t.name for t in plan.trials] == [
        "s-hidden=8-lr=0.01-seed=0",
        "s-hidden=8-lr=0.01-seed=1",
        "s-hidden=16-lr=0.01-seed=0",
        "s-hidden=16-lr=0.01-seed=1",
    ]
    last = plan.trials[-1]
    assert last.recipe.name == last.name
    assert (last.recipe.model.hidden, last.recipe.seed) == (16, 1)
    assert last.recipe.train.optimizer.lr == 0.01
    assert last.recipe.train.steps == 7
    assert last.recipe.task.max_length == 8  # untouched base setting
    assert last.params == {"model.hidden": 16, "train.optimizer.lr": 0.01, "seed": 1}
    assert plan.sweep_dir == tmp_path / "runs" / "s"


def test_changing_a_section_type_starts_from_that_types_defaults(tmp_path):
    path = write_sweep(tmp_path, grid={"model.type": ["lstm", "rnn_ln_fw"]})
    lstm, fast = plan_sweep(path, tmp_path).trials
    assert (lstm.name, fast.name) == ("s-model=lstm", "s-model=rnn_ln_fw")
    assert lstm.recipe.model.hidden == 256  # the base recipe's LSTM
    assert fast.recipe.model.type == "rnn_ln_fw"
    assert fast.recipe.model.hidden == type(fast.recipe.model)().hidden


def test_random_draws_are_deterministic_in_range_and_shared_by_grid_points(tmp_path):
    random_spec = {
        "train.optimizer.lr": {"loguniform": [1e-4, 1e-2]},
        "model.layers": {"randint": [1, 3]},
        "train.clip.norm": {"choice": [1.0, 10.0]},
    }
    path = write_sweep(tmp_path, grid={"model.hidden": [8, 16]}, random=random_spec, trials=3)
    plan = plan_sweep(path, tmp_path)
    again = plan_sweep(path, tmp_path)
    assert [t.params for t in plan.trials] == [t.params for t in again.trials]
    assert len(plan.trials) == 6
    for trial in plan.trials:
        assert 1e-4 <= trial.params["train.optimizer.lr"] <= 1e-2
        assert trial.params["model.layers"] in (1, 2, 3)
        assert trial.recipe.train.clip.norm in (1.0, 10.0)
    assert re.fullmatch(
        r"s-hidden=8-r1-lr=[0-9.e+-]+-layers=\d-norm=\d+\.?\d*", plan.trials[1].name
    )
    draws = [{k: v for k, v in t.params.items() if k != "model.hidden"} for t in plan.trials]
    assert draws[:3] == draws[3:]  # the same draws at both grid points
    path = write_sweep(tmp_path, grid={"model.hidden": [8, 16]}, random=random_spec, trials=3,
                       seed=1)  # fmt: skip
    assert [t.params for t in plan_sweep(path, tmp_path).trials] != [t.params for t in plan.trials]


def test_trial_names_cannot_leave_the_sweep_folder_and_stay_short(tmp_path):
    path = write_sweep(tmp_path, grid={"curriculum.metric": ["../../etc/passwd", "x" * 300]})
    names = [t.name for t in plan_sweep(path, tmp_path).trials]
    for name in names:
        assert "/" not in name and len(name) <= 128
        assert re.match(NAME_PATTERN, name)
    assert names[0] == "s-metric=.._.._etc_passwd"
    assert len(set(names)) == 2


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"grd": {"model.hidden": [8]}}, "grd: unknown key; did you mean 'grid'?"),
        ({"grid": {"model.hidden": []}}, "model.hidden: expected a non-empty list"),
        ({"grid": {"model hidden": [1]}}, "is not a dotted key"),
        ({"random": {"train.optimizer.lr": {"normal": [0, 1]}}}, "expected one of"),
        ({"random": {"train.optimizer.lr": {"loguniform": [0, 1]}}}, "0 < low <= high"),
        ({"set": {"model.hiden": 3}}, "model.hiden: no such key in the recipe; did you mean"),
        ({"grid": {"model.hidden": [0]}}, "trial s-hidden=0: model.hidden: Input should be"),
        ({"trials": 0}, "trials: Input should be greater than or equal to 1"),
        ({"slurm": {"time_min": 1}}, "slurm: Value error, signal_delay_s (90) must be shorter"),
        ({"base": "missing.yaml"}, "missing.yaml: no such file"),
    ],
)
def test_bad_sweep_files_are_one_line_errors(tmp_path, sections, message):
    path = write_sweep(tmp_path, **sections)
    with pytest.raises(UserError) as caught:
        plan_sweep(path, tmp_path)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


def test_a_changed_sweep_is_not_continued_under_the_same_name(tmp_path):
    prepare(plan_sweep(write_sweep(tmp_path, grid={"model.hidden": [8]}), tmp_path / "runs"))
    changed = write_sweep(tmp_path, grid={"model.hidden": [8]}, set={"train.steps": 3})
    with pytest.raises(UserError, match=r"differs from the sweep file's.*--name"):
        prepare(plan_sweep(changed, tmp_path / "runs"))
    rows = prepare(plan_sweep(changed, tmp_path / "runs", name="s2"))
    assert [row["status"] for row in rows] == ["pending"]


def test_local_executor_shares_the_cores_between_workers():
    cores = len(os.sched_getaffinity(0))
    assert LocalExecutor(workers=2).threads == max(1, cores // 2)
    assert thread_environment(3)["OMP_NUM_THREADS"] == "3"
    with pytest.raises(UserError, match="--workers 0"):
        LocalExecutor(workers=0)


def fake_trial(sweep_dir: Path, name: str, values: list[float], eval_value: float) -> None:
    """A finished run as the trainer leaves it: run.json, metrics.csv, eval.csv."""
    run = sweep_dir / name
    run.mkdir()
    info = {"status": "finished", "lineage": [{"event": "train"}]}
    (run / "run.json").write_text(json.dumps(info))
    steps = range(10, 10 * len(values) + 1, 10)
    metrics = {"step": steps, "samples": 0, "wall_s": 0.0, "level": 4, "loss": 0.5,
               "cost_bits": 1.0, "bit_errors": values, "accuracy": 0.0, "grad_norm": 1.0,
               "lr": 0.01, "steps_per_s": 9.0}  # fmt: skip
    pd.DataFrame(metrics).to_csv(run / "metrics.csv", index=False)
    pd.DataFrame({"step": [steps[-1]] * 2, "checkpoint": "final", "level": [4, 8], "loss": 0.5,
                  "cost_bits": 1.0, "bit_errors": [eval_value, 99.0], "accuracy": 0.0,
                  "sequences": 8}).to_csv(run / "eval.csv", index=False)  # fmt: skip


def test_summary_gives_final_best_and_median_spread_over_seeds(tmp_path):
    path = write_sweep(tmp_path, grid={"model.hidden": [8, 16]}, seeds=[0, 1, 2])
    plan = plan_sweep(path, tmp_path)
    prepare(plan)
    values = {0: [5.0, 2.0, 3.0], 1: [4.0, 1.0, 1.5], 2: [6.0, 5.0, 4.0]}
    for trial in plan.trials[:3]:  # hidden=8, seeds 0..2
        seed = trial.params["seed"]
        fake_trial(plan.sweep_dir, trial.name, values[seed], eval_value=10.0 + seed)

    table = trial_table(plan.sweep_dir)
    first = table.iloc[0]
    assert (first["final"], first["best"], first["eval"]) == (3.0, 2.0, 10.0)
    assert list(table["status"]) == ["finished"] * 3 + ["pending"] * 3
    assert math.isnan(table.iloc[3]["final"])

    summary = summarise(plan.sweep_dir)
    assert list(summary["model.hidden"]) == [8, 16]
    row = summary.iloc[0]
    assert (row["n"], row["finished"]) == (3, 3)
    assert (row["final_median"], row["final_min"], row["final_max"]) == (3.0, 1.5, 4.0)
    assert (row["best_median"], row["eval_median"]) == (2.0, 11.0)
    assert summary.iloc[1]["finished"] == 0

    accuracy = trial_table(plan.sweep_dir, metric="accuracy")
    assert accuracy.iloc[0]["metric"] == "accuracy"
    by_type = summarise(plan.sweep_dir, group_by=["model.type"])
    assert list(by_type["model.type"]) == ["lstm"] and by_type.iloc[0]["n"] == 6
    with pytest.raises(UserError, match="--metric nope: not a column"):
        trial_table(plan.sweep_dir, metric="nope")
    with pytest.raises(UserError, match=r"--group-by model\.nope: no such recipe setting"):
        summarise(plan.sweep_dir, group_by=["model.nope"])


def log_starts(sweep_dir: Path, trial: str) -> list[str]:
    text = (sweep_dir / f"{trial}.log").read_text()
    return [line for line in text.splitlines() if line.startswith("--- memctl ")]


def test_local_sweep_survives_a_failing_trial_ctrl_c_and_continues(tmp_path):
    # curriculum.start=9 exceeds the task's length 4: that trial fails when it starts.
    path = write_sweep(tmp_path, set=TINY, grid={"curriculum.start": [2, 9]})
    plan = plan_sweep(path, tmp_path / "runs")
    good, bad = (t.name for t in plan.trials)
    sweep_dir = plan.sweep_dir

    def interrupt_once_training(rows: list[dict]) -> None:
        # Ctrl-C once the good trial is training (the bad one may or may not have failed yet).
        if rows[0]["status"] == "running" and int(rows[0]["step"] or 0) >= 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, make_executor(plan, "local", 2), on_update=interrupt_once_training,
                  poll_s=0.2)  # fmt: skip
    rows = {row["trial"]: row for row in read_trials_csv(sweep_dir)}
    assert rows[good]["status"] == "interrupted"
    assert rows[bad]["status"] in ("failed", "pending")  # pending: stopped before it started

    rows = {row["trial"]: row for row in run_sweep(plan, make_executor(plan, "local", 2),
                                                     poll_s=0.2)}  # fmt: skip
    assert rows[good]["status"] == "finished"
    assert rows[good]["attempts"] == 2  # train, then resume
    assert rows[bad]["status"] == "failed"
    assert "curriculum.start: 9 exceeds curriculum.max 4" in rows[bad]["error"]
    assert "curriculum.start: 9 exceeds" in (sweep_dir / f"{bad}.log").read_text()
    assert log_starts(sweep_dir, good)[1].startswith("--- memctl resume")
    steps = pd.read_csv(sweep_dir / good / "metrics.csv")["step"].tolist()
    assert steps == list(range(10, 401, 10))  # one row per logged step: none lost or repeated
    assert [row["status"] for row in sweep_status(sweep_dir)] == ["finished", "failed"]

    bad_starts = len(log_starts(sweep_dir, bad))
    run_sweep(plan, make_executor(plan, "local", 2), poll_s=0.2)
    assert len(log_starts(sweep_dir, bad)) == bad_starts  # not retried without --retry-failed
    run_sweep(plan, make_executor(plan, "local", 2), retry_failed=True, poll_s=0.2)
    assert len(log_starts(sweep_dir, bad)) == bad_starts + 1
    assert len(log_starts(sweep_dir, good)) == 2  # a finished trial is never re-run


def test_cli_sweep_file_runs_the_sweep_and_status_summary_read_it(tmp_path):
    from typer.testing import CliRunner

    from memctl.cli import app

    runner = CliRunner()
    runs = str(tmp_path / "runs")
    path = write_sweep(tmp_path, grid={"model.hidden": [8, 16]}, seeds=[0, 1, 2])
    short = runner.invoke(app, ["sweep", str(path), "--dry-run", "--runs-dir", runs])
    long = runner.invoke(app, ["sweep", "run", str(path), "--dry-run", "--runs-dir", runs])
    assert short.exit_code == 0, short.output
    assert short.output == long.output
    assert "s-hidden=16-seed=2" in short.output and "6 trials" in short.output
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing

    (tmp_path / "bad").mkdir()
    bad_file = write_sweep(tmp_path / "bad", grd={})
    bad = runner.invoke(app, ["sweep", str(bad_file), "--dry-run"])
    assert bad.exit_code == 2
    assert bad.output.strip().startswith("error: ") and "grd: unknown key" in bad.output

    plan = plan_sweep(path, tmp_path / "runs")
    prepare(plan)
    for trial in plan.trials[:3]:
        fake_trial(plan.sweep_dir, trial.name, [3.0, 1.0], eval_value=2.0)
    status = runner.invoke(app, ["sweep", "status", str(plan.sweep_dir), "--csv"])
    assert status.exit_code == 0, status.output
    rows = list(csv.DictReader(io.StringIO(status.output)))
    assert [row["status"] for row in rows] == ["finished"] * 3 + ["pending"] * 3
    summary = runner.invoke(app, ["sweep", "summary", str(plan.sweep_dir), "--csv"])
    frame = pd.read_csv(io.StringIO(summary.output))
    assert list(frame["model.hidden"]) == [8, 16]
    assert list(frame["final_median"][:1]) == [1.0]
    table = runner.invoke(app, ["sweep", "summary", str(plan.sweep_dir), "--group-by", "seed"])
    assert table.exit_code == 0, table.output
    assert "1 [1, 1]" in table.output  # median [min, max] of the final value over hidden
