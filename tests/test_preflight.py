"""Checks before anything is created: the device asked for, and what a run would
allocate. Each refusal is one line, exit code 2, and runs/ byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
