"""best.pt across resumes, the last partial log row, timing across resumes, eval.csv's
bookkeeping columns, and failed writes (full disk, vanished run folder)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from memctl.lifecycle import resume_run, start_run
from memctl.recipe import validate_recipe
from memctl.rundir import CsvLog, RunDir, format_size
from memctl.trainer import Trainer
from tests.conftest import TINY, cli, cli_process, snapshot
from tests.test_reliability import NanAt, finish, metrics_text


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def tiny(**train) -> dict:
    return {**TINY, "train": {**TINY["train"], **train}}


def stop_at(monkeypatch, step: int) -> None:
    """Make the trainer act as if SIGTERM arrived during step ``step``."""
    original = Trainer.train_step

    def train_step(self):
        stepped = original(self)
        if self.step == step:
            self.stop_signal = signal.SIGTERM
        return stepped

    monkeypatch.setattr(Trainer, "train_step", train_step)


# -- 1. best.pt ------------------------------------------------------------------------


def test_best_survives_a_resume(tiny_recipe: Path, runs_dir: Path):
    # 15 steps: the final evaluation (step 15) is the first, after the step-10 checkpoint.
    fixed = ["--set", "curriculum.type=fixed", "--set", "train.steps=15"]
    fixed += ["--set", "train.optimizer.lr=0.03"]
    assert cli("train", tiny_recipe, "--runs-dir", runs_dir, *fixed).exit_code == 0
    run = runs_dir / "tiny"
    first = pd.read_csv(run / "eval.csv")
    at_15 = float(first.loc[first.level == 4, "bit_errors"].iloc[-1])
    last = load(run / "checkpoints" / "last.pt")
    assert (last["step"], last["best"], last["best_level"]) == (15, at_15, 4)
    # A huge learning rate makes the resumed steps worse, deterministically.
    result = cli("resume", run, "--steps", "5", "--set", "train.optimizer.lr=5")
    assert result.exit_code == 0, result.output
    evals = pd.read_csv(run / "eval.csv")
    later = evals.loc[(evals.step == 20) & (evals.level == 4), "bit_errors"]
    assert len(later) == 2 and (later > at_15).all()  # the periodic and the final one
    assert load(run / "checkpoints" / "best.pt")["step"] == 15
    assert load(run / "checkpoints" / "last.pt")["best"] == at_15
    result = cli("eval", run, "--checkpoint", "best")
    assert result.exit_code == 0, result.output
    assert "best checkpoint (step 15)" in result.output
    assert float(pd.read_csv(run / "eval.csv")["bit_errors"].iloc[-2]) == at_15


def test_best_prefers_a_higher_curriculum_level(tiny_recipe: Path, runs_dir: Path):
    # Levels 2, 3, 4 from steps 0, 15, 30; evaluations every 10 steps.
    args = ["--set", "train.eval_every=10"]
    assert cli("train", tiny_recipe, "--runs-dir", runs_dir, *args).exit_code == 0
    run = runs_dir / "tiny"
    evals = pd.read_csv(run / "eval.csv")
    trained = evals[evals.level != 6]  # each evaluation's row at its training level
    assert trained.level.max() == 4
    # Fewer errors at the easy levels: the lowest value overall is not at level 4.
    assert trained.loc[trained.bit_errors.idxmin(), "level"] < 4
    top = trained[trained.level == 4]
    best = load(run / "checkpoints" / "best.pt")
    assert best["best_level"] == 4
    assert best["best"] == top.bit_errors.min()
    assert best["step"] == top.loc[top.bit_errors.idxmin(), "checkpoint_step"]


def test_a_rollback_keeps_the_best_that_best_pt_holds(runs_dir: Path, monkeypatch):
    # Scripted evaluations (bit errors at steps 5, 10, 15, then again from the rollback to
    # step 10 caused by a NaN loss in step 17: 15, 20, 25, 30, final).
    values, steps = iter([3.0, 2.0, 1.0, 1.5, 1.6, 1.7, 1.8, 1.8]), []

    def evaluate(self, levels, label, run_step=None):
        steps.append(self.step)
        return [
            {"step": self.step, "level": level, "bit_errors": next(values)} for level in levels[:1]
        ]

    original = Trainer.__init__

    def with_nan(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.task = NanAt(self.task, {17})

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    monkeypatch.setattr(Trainer, "__init__", with_nan)
    data = {**tiny(steps=30, eval_every=5, on_nan="rollback"), "curriculum": {"type": "fixed"}}
    _, status = start_run(validate_recipe(data, "tiny"), runs_dir, [])
    assert status == "finished"
    assert [e["event"] for e in RunDir(runs_dir / "tiny").read_info()["events"]] == [
        "nonfinite", "rollback",
    ]  # fmt: skip
    # The restored step 10 was evaluated before; it is not evaluated again.
    assert steps == [5, 10, 15, 15, 20, 25, 30, 30]
    assert pd.read_csv(runs_dir / "tiny" / "eval.csv")["step"].tolist() == [
        5,
        10,
        15,
        20,
        25,
        30,
        30,
    ]
    assert load(runs_dir / "tiny" / "checkpoints" / "best.pt")["best"] == 1.0
    assert load(runs_dir / "tiny" / "checkpoints" / "last.pt")["best"] == 1.0


def test_best_rule_and_old_checkpoints(monkeypatch):
    trainer = Trainer(validate_recipe(tiny(), "tiny"))
    assert trainer._beats_best(2, 9.0)  # nothing yet
    trainer.best, trainer.best_level = 1.0, 3
    assert not trainer._beats_best(2, 0.0)  # a lower level never wins
    assert trainer._beats_best(4, 99.0)  # a higher level always does
    assert trainer._beats_best(3, 0.5) and not trainer._beats_best(3, 1.5)
    monkeypatch.setattr(type(trainer.task), "higher_is_better", True)
    assert trainer._beats_best(3, 1.5) and not trainer._beats_best(3, 0.5)
    # A checkpoint saved before best_level existed: its best counts at its own level.
    state = trainer.state()
    del state["best_level"]
    state["curriculum"]["level"] = 3
    fresh = Trainer(validate_recipe(tiny(), "tiny"))
    fresh.load_state(state, "old.pt", [])
    assert (fresh.best, fresh.best_level) == (1.0, 3)


# -- 2. the last partial log interval --------------------------------------------------


def test_the_last_step_gets_a_row_and_a_checkpoint(runs_dir: Path):
    recipe = validate_recipe(tiny(steps=33, log_every=25, checkpoint_every=25), "tiny")
    _, status = start_run(recipe, runs_dir, [])
    assert status == "finished"
    run = runs_dir / "tiny"
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["step"].tolist() == [25, 33]
    assert metrics["samples"].tolist() == [25 * 8, 33 * 8]
    assert load(run / "checkpoints" / "last.pt")["step"] == 33
    assert RunDir(run).summary()["step"] == "33"


def test_a_signal_between_rows_writes_no_row_and_resume_is_exact(
    tiny_recipe: Path, runs_dir: Path, monkeypatch
):
    args = ["--set", "train.log_every=25", "--set", "train.checkpoint_every=25"]
    code, _, err = finish(
        cli_process("train", tiny_recipe, "--runs-dir", runs_dir, "--name", "straight", *args)
    )
    assert code == 0, err
    straight = runs_dir / "straight"
    assert pd.read_csv(straight / "metrics.csv")["step"].tolist() == [25, 40]
    stop_at(monkeypatch, 33)
    recipe = validate_recipe(tiny(log_every=25, checkpoint_every=25), "tiny")
    recipe = recipe.model_copy(update={"name": "split"})
    _, status = start_run(recipe, runs_dir, [])
    split = runs_dir / "split"
    assert status == "interrupted"
    assert pd.read_csv(split / "metrics.csv")["step"].tolist() == [25]
    assert load(split / "checkpoints" / "last.pt")["step"] == 33
    code, _, err = finish(cli_process("resume", split))
    assert code == 0, err
    assert metrics_text(split) == metrics_text(straight)


# -- 3. timing across a resume ---------------------------------------------------------


def test_the_row_spanning_a_resume_leaves_start_up_out(runs_dir: Path, monkeypatch):
    recipe = validate_recipe(tiny(), "tiny")
    stop_at(monkeypatch, 22)
    trainer, status = start_run(recipe, runs_dir, [])
    assert status == "interrupted" and trainer.startup_s > 0
    monkeypatch.undo()
    slow = 1.0
    original = Trainer.train_step

    def slow_first_step(self):
        if not getattr(self, "warmed_up", False):
            time.sleep(slow)  # a kernel build or compilation on the first step
            self.warmed_up = True
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", slow_first_step)
    trainer, status = resume_run(runs_dir / "tiny", [])
    assert status == "finished"
    assert trainer.startup_s >= slow
    metrics = pd.read_csv(runs_dir / "tiny" / "metrics.csv").set_index("step")
    spanning = metrics.loc[25, "steps_per_s"]  # steps 21-22 before, 23-25 after the resume
    neighbours = metrics.loc[[15, 20, 30, 35], "steps_per_s"]
    assert spanning > neighbours.min() / 4, metrics["steps_per_s"].tolist()
    # wall_s is training time: the slow start-up is not in it.
    assert metrics.loc[25, "wall_s"] - metrics.loc[20, "wall_s"] < slow / 2
    assert metrics["wall_s"].is_monotonic_increasing


def test_a_row_of_only_a_first_step_has_a_rate(runs_dir: Path):
    recipe = validate_recipe(tiny(steps=3, log_every=1), "tiny")
    trainer, _ = start_run(recipe, runs_dir, [])
    rates = pd.read_csv(runs_dir / "tiny" / "metrics.csv")["steps_per_s"]
    assert len(rates) == 3 and (rates > 0).all() and rates.map(math.isfinite).all()
    assert rates.iloc[0] == pytest.approx(1 / trainer.startup_s, rel=1e-3)


# -- 4. eval.csv's bookkeeping columns -------------------------------------------------


def test_eval_rows_say_when_which_weights_and_which_seed(tiny_recipe: Path, runs_dir: Path):
    args = ["--set", "train.steps=30", "--set", "eval.seed=11"]
    assert cli("train", tiny_recipe, "--runs-dir", runs_dir, *args).exit_code == 0
    run = runs_dir / "tiny"
    result = cli("eval", run, "--checkpoint", "20")
    assert result.exit_code == 0, result.output
    assert "checkpoint (step 20)" in result.output and "eval_seed" not in result.output
    evals = pd.read_csv(run / "eval.csv")
    assert list(evals.columns[:6]) == [
        "step", "time", "checkpoint", "checkpoint_step", "eval_seed", "level",
    ]  # fmt: skip
    assert evals["checkpoint"].tolist() == [
        "train",
        "train",
        "final",
        "final",
        "step_20",
        "step_20",
    ]
    # step: where the run stood when the row was written; checkpoint_step: whose weights.
    assert evals["step"].tolist() == [20, 20, 30, 30, 30, 30]
    assert evals["checkpoint_step"].tolist() == [20, 20, 30, 30, 20, 20]
    assert set(evals["eval_seed"]) == {11}
    times = pd.to_datetime(evals["time"])
    assert all(t.tzname() == "UTC" for t in times) and times.is_monotonic_increasing


OLD_HEADER = "step,checkpoint,level,loss,bit_errors,accuracy,sequences\n"


def test_an_old_eval_csv_gains_the_new_columns(tiny_recipe: Path, runs_dir: Path):
    assert (
        cli("train", tiny_recipe, "--runs-dir", runs_dir, "--set", "train.steps=20").exit_code == 0
    )
    run = runs_dir / "tiny"
    old_rows = "20,final,3,0.7,5.5,0.0,16\n20,final,6,0.8,11.0,0.0,16\n"
    (run / "eval.csv").write_text(OLD_HEADER + old_rows)
    assert cli("eval", run).exit_code == 0
    evals = pd.read_csv(run / "eval.csv")
    assert len(evals) == 4 and "checkpoint_step" in evals.columns
    assert evals["bit_errors"].tolist()[:2] == [5.5, 11.0]
    assert evals[["time", "checkpoint_step", "eval_seed"]].iloc[:2].isna().all().all()
    assert evals[["time", "checkpoint_step", "eval_seed"]].iloc[2:].notna().all().all()
    assert evals["checkpoint"].tolist() == ["final", "final", "last", "last"]


def test_csv_log_rewrites_an_old_file_at_its_first_append_only(tmp_path: Path):
    path = tmp_path / "eval.csv"
    path.write_text("step,a\n1,2\n")
    log = CsvLog(path, ["step", "time", "a"])
    before = snapshot(tmp_path)  # opening it (as a command that then fails does) is harmless
    assert log.truncate_after(5) == 1 and snapshot(tmp_path) == before
    path.write_text("step,a\n1,2\n3,")  # a torn last line is not carried over
    log.append([{"step": 2, "time": "t", "a": 3}])
    assert path.read_text() == "step,time,a\n1,,2\n2,t,3\n"


def test_csv_log_keeps_a_header_with_columns_it_lacks(tmp_path: Path):
    path = tmp_path / "log.csv"
    path.write_text("step,a,b,old\n1,2,3,4\n")
    log = CsvLog(path, ["step", "a", "b"])
    log.append([{"step": 2, "a": 5, "b": 6}])
    assert path.read_text() == "step,a,b,old\n1,2,3,4\n2,5,6,\n"
    assert log.truncate_after(1) == 1


# -- 5. failed writes ------------------------------------------------------------------


def failing_replace(monkeypatch, name: str) -> list[int]:
    """os.replace fails with ENOSPC for a file called ``name``, as on a full disk; the
    list returned gets the sizes of the files that failed."""
    original, sizes = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            sizes.append(os.path.getsize(src))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return sizes


def test_a_full_disk_is_one_line_and_resume_continues_exactly(
    tiny_recipe: Path, runs_dir: Path, monkeypatch
):
    code, _, err = finish(
        cli_process("train", tiny_recipe, "--runs-dir", runs_dir, "--name", "straight")
    )
    assert code == 0, err
    sizes = failing_replace(monkeypatch, "step_30.pt")
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir)
    run = runs_dir / "tiny"
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    (size,) = sizes
    assert lines[0] == (
        f"error: {run / 'checkpoints' / 'step_30.pt'}: cannot write (No space left on device); "
        f"it needs {format_size(size)} free; the last good checkpoint is "
        f"{run / 'checkpoints' / 'last.pt'} (step 20), resume continues from it"
    )
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "No space left on device" in info["error"]
    assert not list((run / "checkpoints").glob(".*.tmp"))
    monkeypatch.undo()
    code, _, err = finish(cli_process("resume", run))
    assert code == 0, err
    assert metrics_text(run) == metrics_text(runs_dir / "straight")
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_a_vanished_run_folder_is_one_line(tiny_recipe: Path, runs_dir: Path, monkeypatch):
    original = Trainer.train_step

    def train_step(self):
        stepped = original(self)
        if self.step == 12:
            shutil.rmtree(self.run.path)
        return stepped

    monkeypatch.setattr(Trainer, "train_step", train_step)
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {runs_dir / 'tiny' / 'metrics.csv'}: cannot write (")
    assert lines[0].endswith("; no checkpoint of this run is left")
    assert list(runs_dir.iterdir()) == []


def test_format_size():
    assert [format_size(n) for n in (812, 45_100, 1_234_567, 5 * 10**12)] == [
        "812 B", "45.1 kB", "1.2 MB", "5.0 TB",
    ]  # fmt: skip
