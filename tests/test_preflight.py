"""Checks before anything is created: the device asked for, and what a run would
allocate. Each refusal is one line, exit code 2, and runs/ byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memctl import preflight
from memctl.recipe import read_yaml, validate_recipe
from tests.conftest import cli, snapshot
from tests.test_bad_input import assert_one_line_error

BAD_DEVICES = [
    ("tpu", "expected auto, cpu, cuda or cuda:N"),
    ("meta", "expected auto, cpu, cuda or cuda:N"),
    ("cuda:x", "expected auto, cpu, cuda or cuda:N"),
]
if not torch.cuda.is_available():
    BAD_DEVICES += [("cuda", "CUDA is not available"), ("cuda:0", "CUDA is not available")]


@pytest.fixture
def trained(tiny_recipe: Path, runs_dir: Path) -> Path:
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--set", "train.steps=10")
    assert result.exit_code == 0, result.output
    return runs_dir / "tiny"


@pytest.mark.parametrize(("device", "message"), BAD_DEVICES)
def test_bad_device_is_one_line_on_every_command(
    tiny_recipe: Path, runs_dir: Path, trained: Path, device: str, message: str
):
    before = snapshot(runs_dir)
    train = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--name", "other", "--device", device)
    assert_one_line_error(train, f"--device {device}", message)
    assert_one_line_error(cli("resume", trained, "--steps", "5", "--device", device), message)
    assert_one_line_error(cli("eval", trained, "--device", device), message)
    assert_one_line_error(cli("inspect", trained, "--device", device), message)
    assert snapshot(runs_dir) == before


def test_bad_recipe_device_names_the_field(tiny_recipe: Path, runs_dir: Path):
    before = snapshot(runs_dir)
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--set", "device=tpu")
    assert_one_line_error(result, "device")
    assert snapshot(runs_dir) == before


HUGE = [
    ("recipes/ntm_copy_small.yaml", "model.memory_size=1000000000"),
    ("recipes/dnc_copy.yaml", "model.memory_size=1000000"),
]


@pytest.mark.parametrize(("recipe", "setting"), HUGE)
def test_a_model_too_big_for_the_machine_is_refused_before_anything(
    runs_dir: Path, recipe: str, setting: str
):
    before = snapshot(runs_dir)
    result = cli("train", recipe, "--runs-dir", runs_dir, "--set", setting)
    assert_one_line_error(result, recipe, setting, "needs about", "available CPU RAM", "--force")
    assert snapshot(runs_dir) == before and not any(runs_dir.iterdir())


def test_estimate_grows_with_the_memory_and_the_length():
    recipe = validate_recipe(read_yaml(Path("recipes/ntm_copy_small.yaml")), "ntm")
    small = preflight.estimate(recipe, 8, 10, training=True)
    wide = recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"memory_size": 1280})}
    )
    large = preflight.estimate(wide, 8, 10, training=True)
    longer = preflight.estimate(recipe, 8, 20, training=True)
    assert small.per_step is not None and small.steps == 2 * 10 + 1
    # The memory (N x M x batch float32) is kept for backward at every step.
    assert large.per_step - small.per_step >= (1280 - 128) * 20 * 8 * 4
    assert longer.total - small.total == pytest.approx(small.per_step * 20, rel=0.05)
    assert preflight.estimate(recipe, 8, 10, training=False).total < small.total


def test_eval_at_a_huge_length_is_refused(runs_dir: Path, trained: Path):
    before = snapshot(runs_dir)
    result = cli("eval", trained, "--lengths", "100000000")
    assert_one_line_error(result, "evaluation at level 100000000", "needs about", "--force")
    assert snapshot(runs_dir) == before


def test_a_run_that_fits_trains_as_before(tiny_recipe: Path, runs_dir: Path):
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir)
    assert result.exit_code == 0, result.output


def test_a_run_that_fails_at_its_first_step_leaves_nothing(
    tiny_recipe: Path, runs_dir: Path, monkeypatch
):
    from memctl.trainer import Trainer

    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", out_of_memory)
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir)
    assert_one_line_error(result, "out of memory at step 1", "80.00 GiB", "lower")
    assert not any(runs_dir.iterdir())

    def broken(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Trainer, "train_step", broken)
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir)
    assert isinstance(result.exception, RuntimeError)
    assert not any(runs_dir.iterdir())
    # The name is free: the next try trains.
    monkeypatch.undo()
    assert cli("train", tiny_recipe, "--runs-dir", runs_dir).exit_code == 0
