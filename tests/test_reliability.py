"""Exact resume, hard kills, signals, non-finite losses, the lineage of a changed setting."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from memctl.lifecycle import start_run
from memctl.recipe import validate_recipe
from memctl.rundir import RunDir, new_file_mode
from memctl.trainer import TrainingError
from tests.conftest import TINY, cli, cli_process

# Columns that depend on time, not on the computation.
TIMING = ["wall_s", "steps_per_s"]


def finish(process, timeout: float = 180) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def metrics_text(run: Path) -> list[str]:
    frame = pd.read_csv(run / "metrics.csv", dtype=str).drop(columns=TIMING)
    return frame.to_csv(index=False).splitlines()


def assert_split_run_matches_straight(recipe: Path, runs_dir: Path, *settings: str) -> None:
    """40 steps straight against 20 + a resume of 20 in a new process: the same metrics
    rows (timing apart), 8 of them."""
    code, _, err = finish(
        cli_process("train", recipe, "--runs-dir", runs_dir, "--name", "straight", *settings)
    )
    assert code == 0, err
    code, _, err = finish(
        cli_process(
            "train", recipe, "--runs-dir", runs_dir, "--name", "split", "--steps", "20", *settings
        )
    )
    assert code == 0, err
    code, _, err = finish(cli_process("resume", runs_dir / "split", "--steps", "20"))
    assert code == 0, err
    straight, split = metrics_text(runs_dir / "straight"), metrics_text(runs_dir / "split")
    assert len(straight) == 1 + 40 // 5
    assert split == straight


def test_exact_resume_in_a_new_process(tiny_recipe: Path, runs_dir: Path):
    # The lr decay watches 3 logged rows (always passing), so its window crosses the resume.
    decay = ["--set", "train.lr_decay.metric=loss", "--set", "train.lr_decay.threshold=10"]
    decay += ["--set", "train.lr_decay.window=3"]
    assert_split_run_matches_straight(tiny_recipe, runs_dir, *decay)
    # The step curriculum (every 15 steps) crossed the resume point: levels 2, 3, 4.
    metrics = pd.read_csv(runs_dir / "split" / "metrics.csv")
    assert metrics["level"].tolist() == [2, 2, 2, 3, 3, 3, 4, 4]
    # Halved after the rows of steps 15 and 30 (each row shows the lr it trained with).
    assert metrics["lr"].tolist() == [1e-3] * 3 + [5e-4] * 3 + [2.5e-4] * 2
    # Periodic evaluations match too; the split run also evaluated when its first part ended.
    evals = {name: pd.read_csv(runs_dir / name / "eval.csv") for name in ("straight", "split")}
    periodic = {
        name: frame[frame.checkpoint == "train"].drop(columns=["time"])  # when, not what
        for name, frame in evals.items()
    }
    assert periodic["split"].to_csv(index=False) == periodic["straight"].to_csv(index=False)
    assert evals["split"]["checkpoint"].tolist().count("final") == 4
    lineage = json.loads((runs_dir / "split" / "run.json").read_text())["lineage"]
    assert [e["event"] for e in lineage] == ["train", "resume"]


def test_lr_decay_after_the_curriculum_watches_only_last_level_rows(
    tiny_recipe: Path, runs_dir: Path
):
    # The same always-passing decay; the step curriculum ends at level 3 (from step 15).
    decay = ["--set", "train.lr_decay.metric=loss", "--set", "train.lr_decay.threshold=10"]
    decay += ["--set", "train.lr_decay.window=3", "--set", "train.lr_decay.after_curriculum=true"]
    code, _, err = finish(
        cli_process(
            "train", tiny_recipe, "--runs-dir", runs_dir, "--set", "curriculum.max=3", *decay
        )
    )
    assert code == 0, err
    (run,) = runs_dir.iterdir()
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["level"].tolist() == [2, 2, 2, 3, 3, 3, 3, 3]
    # Rows of steps 20, 25 and 30 fill the window: halved from step 31, not before.
    assert metrics["lr"].tolist() == [1e-3] * 6 + [5e-4] * 2


def wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def last_step(run: Path) -> int:
    path = run / "metrics.csv"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return int(lines[-1].split(",")[0]) if len(lines) > 1 and lines[-1][:1].isdigit() else 0


def test_hard_kill_then_resume_has_no_duplicate_or_missing_rows(tiny_recipe: Path, runs_dir: Path):
    run = runs_dir / "tiny"
    args = ["--set", "train.steps=100000", "--set", "train.checkpoint_every=50"]
    process = cli_process("train", tiny_recipe, "--runs-dir", runs_dir, *args)
    wait_for(lambda: last_step(run) >= 75)  # past the step-50 checkpoint, before step 100's
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = last_step(run)
    assert killed_at > 50
    listing = cli("runs", runs_dir)
    assert "interrupted" in listing.output
    code, _, err = finish(cli_process("resume", run, "--set", "train.steps=160"))
    assert code == 0, err
    steps = pd.read_csv(run / "metrics.csv")["step"].tolist()
    assert steps == list(range(5, 161, 5))


@pytest.mark.parametrize("sig,expected", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_resume_continues(tiny_recipe: Path, runs_dir: Path, sig, expected):
    run = runs_dir / "tiny"
    process = cli_process(
        "train", tiny_recipe, "--runs-dir", runs_dir, "--set", "train.steps=100000"
    )
    wait_for(lambda: last_step(run) >= 10)
    process.send_signal(sig)
    code, out, err = finish(process)
    assert code == expected, err
    assert "Traceback" not in err
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted"
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    stopped = state["step"]
    assert stopped >= 10
    assert f"interrupted at step {stopped}" in out
    code, _, err = finish(cli_process("resume", run, "--steps", "7"))
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == stopped + 7


def test_resume_with_a_changed_setting_is_recorded(tiny_recipe: Path, runs_dir: Path):
    fixed = ["--set", "curriculum.type=fixed", "--set", "train.steps=20"]
    assert cli("train", tiny_recipe, "--runs-dir", runs_dir, *fixed).exit_code == 0
    run = runs_dir / "tiny"
    result = cli("resume", run, "--steps", "10", "--set", "task.max_length=7")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(run / "metrics.csv")
    assert frame.loc[frame.step <= 20, "level"].eq(4).all()
    assert frame.loc[frame.step > 20, "level"].eq(7).all()
    info = json.loads((run / "run.json").read_text())
    assert info["lineage"][-1]["overrides"][0] == "task.max_length=7"
    assert info["lineage"][-1]["step"] == 20
    assert "max_length: 7" in (run / "recipe.yaml").read_text()
    again = cli("resume", run)
    assert again.exit_code == 2 and "--steps" in again.stderr


def test_eval_and_runs_commands(tiny_recipe: Path, runs_dir: Path):
    assert (
        cli("train", tiny_recipe, "--runs-dir", runs_dir, "--set", "train.steps=20").exit_code == 0
    )
    run = runs_dir / "tiny"
    # Atomically written files get the usual permissions, not mkstemp's owner-only 0o600.
    for name in ("run.json", "checkpoints/last.pt"):
        assert (run / name).stat().st_mode & 0o777 == new_file_mode(), name
    before = len(pd.read_csv(run / "eval.csv"))
    result = cli("eval", run, "--checkpoint", "best", "--lengths", "5,8")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(run / "eval.csv")
    added = frame.iloc[before:]
    assert added["level"].tolist() == [3, 5, 8] and set(added["checkpoint"]) == {"best"}
    assert (added["bit_errors"] >= 0).all() and added["bit_errors"].iloc[-1] > 0
    assert "bit_errors" in result.output
    # --batches: more held-out sequences for this evaluation only; the recipe is untouched.
    recipe_text = (run / "recipe.yaml").read_text()
    result = cli("eval", run, "--lengths", "5", "--batches", "5")
    assert result.exit_code == 0, result.output
    added = pd.read_csv(run / "eval.csv").iloc[before + 3 :]
    assert added["level"].tolist() == [3, 5] and set(added["sequences"]) == {5 * 8}
    assert (run / "recipe.yaml").read_text() == recipe_text
    listing = cli("runs", runs_dir)
    assert listing.exit_code == 0
    assert "tiny" in listing.output and "finished" in listing.output and "copy" in listing.output
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["best.pt", "last.pt", "step_10.pt", "step_20.pt"]


class NanAt:
    """Wraps a task so that the loss is NaN at chosen calls of loss()."""

    def __init__(self, task, bad_calls: set[int]):
        self.task, self.bad_calls, self.calls = task, bad_calls, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, outputs, batch):
        self.calls += 1
        loss = self.task.loss(outputs, batch)
        return loss * float("nan") if self.calls in self.bad_calls else loss


def nan_trainer(runs_dir: Path, policy: str, bad_calls: set[int]):
    data = {**TINY, "train": {**TINY["train"], "on_nan": policy, "steps": 30}}
    recipe = validate_recipe(data, "nan-test")
    from memctl.trainer import Trainer

    original = Trainer.__init__

    def patched(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.task = NanAt(self.task, bad_calls)

    return recipe, patched


def test_nonfinite_rollback_halves_lr_and_records_event(runs_dir: Path, monkeypatch):
    from memctl.trainer import Trainer

    recipe, patched = nan_trainer(runs_dir, "rollback", {15})
    monkeypatch.setattr(Trainer, "__init__", patched)
    trainer, status = start_run(recipe, runs_dir, [])
    assert status == "finished" and trainer.step == 30
    assert trainer.lr == pytest.approx(recipe.train.optimizer.lr / 2)
    events = RunDir(runs_dir / "tiny").read_info()["events"]
    assert [e["event"] for e in events] == ["nonfinite", "rollback"]
    assert events[1]["to_step"] == 10 and events[0]["step"] == 15
    steps = pd.read_csv(runs_dir / "tiny" / "metrics.csv")["step"].tolist()
    assert steps == list(range(5, 31, 5))


def test_nonfinite_rollback_gives_up_after_three_in_a_row(runs_dir: Path, monkeypatch):
    from memctl.trainer import Trainer

    recipe, patched = nan_trainer(runs_dir, "rollback", {13, 17, 21, 25})
    monkeypatch.setattr(Trainer, "__init__", patched)
    with pytest.raises(TrainingError, match=r"at step 14 \(after 3 rollbacks in a row\)"):
        start_run(recipe, runs_dir, [])
    info = RunDir(runs_dir / "tiny").read_info()
    assert info["status"] == "failed" and "non-finite" in info["error"]
    assert [e["event"] for e in info["events"]].count("rollback") == 3


def test_nonfinite_skip_and_stop(runs_dir: Path, monkeypatch):
    from memctl.trainer import Trainer

    recipe, patched = nan_trainer(runs_dir, "skip", {4})
    monkeypatch.setattr(Trainer, "__init__", patched)
    trainer, status = start_run(recipe, runs_dir, [])
    assert status == "finished" and trainer.lr == recipe.train.optimizer.lr
    assert [e["event"] for e in RunDir(runs_dir / "tiny").read_info()["events"]] == ["nonfinite"]

    recipe, patched = nan_trainer(runs_dir, "stop", {4})
    recipe = recipe.model_copy(update={"name": "stopper"})
    monkeypatch.setattr(Trainer, "__init__", patched)
    with pytest.raises(TrainingError, match="step 4"):
        start_run(recipe, runs_dir, [])


@pytest.mark.slow
def test_lstm_learns_short_copies(tmp_path: Path, runs_dir: Path):
    """Learning smoke test: bit errors fall by a large factor in well under a minute."""
    result = cli(
        "train", "recipes/copy_lstm.yaml", "--runs-dir", runs_dir, "--device", "cpu",
        "--set", "train.steps=800", "--set", "curriculum.type=fixed", "--set", "train.log_every=50",
        "--set", "task.max_length=3", "--set", "model.hidden=128", "--set", "train.eval_every=0",
        "--set", "train.optimizer.lr=0.003",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(runs_dir / "copy_lstm" / "metrics.csv")
    assert frame["bit_errors"].iloc[0] > 4
    assert frame["bit_errors"].iloc[-1] < frame["bit_errors"].iloc[0] / 10
