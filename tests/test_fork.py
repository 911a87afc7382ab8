"""Continuing from a chosen checkpoint: resume --from cuts what came after it; fork
copies a run's state into a new run. Both continue exactly where a straight run would,
and `show` / `train --dry-run` describe a run without creating one."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from memctl.rundir import RunDir
from tests.conftest import cli, snapshot
from tests.test_bad_input import assert_one_line_error
from tests.test_reliability import metrics_text


def train(tiny_recipe: Path, runs_dir: Path, *args: str) -> Path:
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, *args)
    assert result.exit_code == 0, result.output
    return runs_dir / "tiny"


def test_resume_from_an_earlier_checkpoint_cuts_and_repeats_exactly(
    tiny_recipe: Path, runs_dir: Path
):
    run = train(tiny_recipe, runs_dir, "--set", "train.keep_checkpoints=9")
    straight = metrics_text(run)
    result = cli("resume", run, "--from", "step_20", "--steps", "20")
    assert result.exit_code == 0, result.output
    assert "cut metrics.csv rows after step 20" in result.output
    assert "step_30.pt, step_40.pt" in result.output
    assert metrics_text(run) == straight
    assert RunDir(run).read_info()["lineage"][-1]["from"] == "step_20"
    evals = pd.read_csv(run / "eval.csv")
    assert evals.groupby(["checkpoint_step", "checkpoint", "level"]).size().max() == 1


def test_resume_from_drops_a_later_best(tiny_recipe: Path, runs_dir: Path):
    run = train(tiny_recipe, runs_dir, "--set", "train.keep_checkpoints=9")
    result = cli("resume", run, "--from", "step_10", "--steps", "5")
    assert result.exit_code == 0, result.output
    assert "best.pt (a later step)" in result.output
    # The run ends at step 15 with a final evaluation there: its best.pt is from then.
    assert cli("eval", run, "--checkpoint", "best").exit_code == 0


def test_fork_continues_as_the_parent_did_and_leaves_it_alone(tiny_recipe: Path, runs_dir: Path):
    parent = train(tiny_recipe, runs_dir, "--set", "train.keep_checkpoints=9")
    before = snapshot(parent)
    result = cli("fork", parent, "child", "--from", "step_20", "--steps", "20")
    assert result.exit_code == 0, result.output
    assert snapshot(parent) == before
    child = runs_dir / "child"
    assert metrics_text(child) == metrics_text(parent)
    info = json.loads((child / "run.json").read_text())
    assert info["lineage"][0]["event"] == "fork"
    assert info["lineage"][0]["parent"] == str(parent) and info["lineage"][0]["from"] == "step_20"
    assert info["status"] == "finished" and info["name"] == "child"


def test_fork_with_changed_settings_records_them(tiny_recipe: Path, runs_dir: Path):
    parent = train(tiny_recipe, runs_dir)
    result = cli("fork", parent, "slower", "--steps", "10", "--set", "train.optimizer.lr=1e-4")
    assert result.exit_code == 0, result.output
    child = RunDir(runs_dir / "slower")
    assert child.read_info()["lineage"][0]["overrides"][0] == "train.optimizer.lr=1e-4"
    frame = pd.read_csv(child.metrics_file)
    assert frame["step"].iloc[-1] == 50 and frame["lr"].iloc[-1] == 1e-4


def test_fork_refusals_change_nothing(tiny_recipe: Path, runs_dir: Path):
    parent = train(tiny_recipe, runs_dir)
    before = snapshot(runs_dir)
    assert_one_line_error(cli("fork", parent, "tiny", "--steps", "5"), "tiny", "exists")
    assert_one_line_error(cli("fork", parent, "done"), "train.steps=40", "--steps")
    assert_one_line_error(cli("fork", parent, "bad/name", "--steps", "5"), "name")
    result = cli("fork", parent, "wide", "--steps", "5", "--set", "model.hidden=32")
    assert_one_line_error(result, "refused", "shape")
    assert_one_line_error(cli("fork", parent, "x", "--from", "step_7"), "step_7.pt")
    assert snapshot(runs_dir) == before


def test_show_and_dry_run_describe_and_create_nothing(tiny_recipe: Path, runs_dir: Path):
    before = snapshot(runs_dir)
    for command in (["show", tiny_recipe], ["train", tiny_recipe, "--dry-run"]):
        result = cli(*command, "--runs-dir", runs_dir) if command[0] == "train" else cli(*command)
        assert result.exit_code == 0, result.output
        assert "name: tiny" in result.output and "parameters" in result.output
        assert "reference (PyTorch autograd)" in result.output
        assert "available CPU RAM" in result.output
    assert snapshot(runs_dir) == before and not any(runs_dir.iterdir())


def test_show_says_when_a_recipe_does_not_fit():
    result = cli("show", "recipes/ntm_copy_small.yaml", "--set", "model.memory_size=1000000000")
    assert result.exit_code == 0, result.output
    assert "not built: it does not fit" in result.output
