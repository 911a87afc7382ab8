"""The run lifecycle: seeding where a run starts, load_run, what run.json records, and
resume's refusals and its finishing of a run stopped before it recorded its end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch

from memctl.lifecycle import load_run, seed_everything, start_run
from memctl.recipe import validate_recipe
from memctl.rundir import RunDir
from memctl.trainer import Trainer
from tests.conftest import TINY, cli, snapshot
from tests.test_bad_input import assert_one_line_error


def first_weight(trainer: Trainer) -> torch.Tensor:
    return next(trainer.model.parameters()).detach().clone()


def test_only_a_starting_run_seeds_the_process(runs_dir: Path):
    recipe = validate_recipe({**TINY, "train": {**TINY["train"], "keep_checkpoints": 9}}, "tiny")
    seed_everything(recipe.seed)
    seeded = first_weight(Trainer(recipe))
    # A trainer built alone (to evaluate or inspect) draws on from where the process is.
    assert not torch.equal(first_weight(Trainer(recipe)), seeded)
    torch.manual_seed(999)
    _, status = start_run(recipe, runs_dir, [])
    assert status == "finished"
    initial = torch.load(runs_dir / "tiny" / "checkpoints" / "step_0.pt", weights_only=True)
    assert torch.equal(next(iter(initial["model"].values())), seeded)


def test_run_json_names_backend_threads_and_cpu(tiny_recipe: Path, runs_dir: Path):
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir)
    assert result.exit_code == 0, result.output
    info = json.loads((runs_dir / "tiny" / "run.json").read_text())
    assert info["backend"] == "reference (PyTorch autograd)"
    assert info["threads"] == torch.get_num_threads() and info["cpu"]
    assert info["cores"] == len(os.sched_getaffinity(0))
    assert "reference (PyTorch autograd)" in result.stdout


def test_load_run_without_a_checkpoint_builds_no_model(tiny_recipe: Path, runs_dir: Path):
    assert cli("train", tiny_recipe, "--runs-dir", runs_dir).exit_code == 0
    loaded = load_run(runs_dir / "tiny")
    assert loaded.trainer is None and loaded.recipe.name == "tiny"
    loaded = load_run(runs_dir / "tiny", "step_40")
    assert loaded.trainer is not None and loaded.trainer.step == 40
    assert loaded.label == "step_40"


def test_resume_cannot_rename_the_run(tiny_recipe: Path, runs_dir: Path):
    assert (
        cli("train", tiny_recipe, "--runs-dir", runs_dir, "--set", "train.steps=10").exit_code == 0
    )
    before = snapshot(runs_dir)
    result = cli("resume", runs_dir / "tiny", "--steps", "5", "--set", "name=other")
    assert_one_line_error(result, "--set name", "cannot change", "tiny")
    assert snapshot(runs_dir) == before


def stop_before_final_eval(run: Path, keep_final_rows: bool) -> None:
    """Leave a run as a kill after its last checkpoint leaves it: status not finished,
    and the final evaluation's rows written or not."""
    eval_file = run / "eval.csv"
    frame = pd.read_csv(eval_file)
    if not keep_final_rows:
        frame = frame[frame["checkpoint"] != "final"]
    eval_file.write_text(frame.to_csv(index=False))
    RunDir(run).update_info(status="interrupted")


def final_rows(run: Path) -> pd.DataFrame:
    frame = pd.read_csv(run / "eval.csv")
    return frame[frame["checkpoint"] == "final"]


def test_resume_finishes_a_run_killed_before_its_final_evaluation(
    tiny_recipe: Path, runs_dir: Path
):
    assert cli("train", tiny_recipe, "--runs-dir", runs_dir).exit_code == 0
    run = runs_dir / "tiny"
    expected = final_rows(run).drop(columns=["time"], errors="ignore")
    stop_before_final_eval(run, keep_final_rows=False)
    result = cli("resume", run)
    assert result.exit_code == 0, result.output
    assert RunDir(run).read_info()["status"] == "finished"
    again = final_rows(run).drop(columns=["time"], errors="ignore")
    pd.testing.assert_frame_equal(again.reset_index(drop=True), expected.reset_index(drop=True))
    # Finished now: a second resume has nothing to do.
    assert cli("resume", run).exit_code == 2


def test_resume_finishing_does_not_evaluate_twice(tiny_recipe: Path, runs_dir: Path):
    assert cli("train", tiny_recipe, "--runs-dir", runs_dir).exit_code == 0
    run = runs_dir / "tiny"
    rows = len(final_rows(run))
    stop_before_final_eval(run, keep_final_rows=True)
    result = cli("resume", run)
    assert result.exit_code == 0, result.output
    assert len(final_rows(run)) == rows
    assert RunDir(run).read_info()["status"] == "finished"
