"""Every kind of bad input: one line on stderr, exit code 2, nothing under runs/ touched."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, cli, snapshot, write_recipe

# A valid reference for TINY (copy): bit errors under 0.5 at length 4.
REFERENCE = {"source": "a test", "metric": "bit_errors", "value": 0.5, "at": {"level": 4}}


def with_change(path: tuple, value) -> dict:
    data = copy.deepcopy(TINY)
    if isinstance(value, list):
        value = [{k: v for k, v in entry.items() if v is not KeyError} for entry in value]
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


BAD_RECIPES = [
    ("unknown_key", with_change(("train", "stpes"), 3), ["train.stpes", "did you mean 'steps'"]),
    ("wrong_type", with_change(("train", "steps"), "many"), ["train.steps", "integer"]),
    ("negative_lr", with_change(("train", "optimizer"), {"lr": -0.1}), ["train.optimizer.lr"]),
    ("zero_batch", with_change(("train", "batch_size"), 0), ["train.batch_size"]),
    ("unknown_model", with_change(("model", "type"), "lsmt"), ["model.type", "did you mean"]),
    ("unknown_task", with_change(("task", "type"), "cpy"), ["task.type", "copy"]),
    ("model_key", with_change(("model", "hiden"), 3), ["model.hiden", "hidden"]),
    ("no_model", with_change(("model",), KeyError), ["model: missing"]),
    ("bad_name", with_change(("name",), "../escape"), ["name"]),
    ("start_too_big", with_change(("curriculum", "start"), 9), ["curriculum.start"]),
    (
        "lr_decay_metric",
        with_change(("train", "lr_decay"), {"metric": "bit_erors"}),
        ["train.lr_decay.metric", "bit_erors"],
    ),
    ("compile_no_cell", with_change(("train", "compile"), True), ["train.compile", "lstm"]),
    ("reference_key", with_change(("reference",), [{**REFERENCE, "valu": 1}]),
     ["reference.0.valu", "did you mean 'value'"]),
    ("reference_type", with_change(("reference",), [{**REFERENCE, "value": "small"}]),
     ["reference.0.value", "number"]),
    ("reference_no_at", with_change(("reference",), [{**REFERENCE, "at": KeyError}]),
     ["reference.0.at", "Field required"]),
    ("reference_at_key", with_change(("reference",), [{**REFERENCE, "at": {"length": 4}}]),
     ["reference.0.at.length", "unknown key", "known: level"]),
    ("reference_metric", with_change(("reference",), [{**REFERENCE, "metric": "bit_eror"}]),
     ["reference.0.metric", "did you mean 'bit_errors'", "loss, cost_bits"]),
    ("reference_direction",
     with_change(("reference",), [REFERENCE, {**REFERENCE, "lower_is_better": False}]),
     ["reference.1.lower_is_better", "a lower bit_errors is better"]),
    ("reference_not_a_list", with_change(("reference",), 5), ["reference", "list"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "data,needles", [c[1:] for c in BAD_RECIPES], ids=[c[0] for c in BAD_RECIPES]
)
def test_bad_recipe(tmp_path: Path, runs_dir: Path, data: dict, needles: list[str]):
    recipe = write_recipe(tmp_path / "bad.yaml", data)
    result = cli("train", recipe, "--runs-dir", runs_dir)
    assert_one_line_error(result, "bad.yaml", *needles)
    assert snapshot(runs_dir) == {} and list(runs_dir.iterdir()) == []


def test_missing_recipe(tmp_path: Path, runs_dir: Path):
    result = cli("train", tmp_path / "nope.yaml", "--runs-dir", runs_dir)
    assert_one_line_error(result, "nope.yaml", "no such file")


def test_yaml_syntax_error_names_the_line(tmp_path: Path, runs_dir: Path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: x\nmodel:\n  type: lstm\n  hidden: [1, 2\ntask: {type: copy}\n")
    result = cli("train", recipe, "--runs-dir", runs_dir)
    assert_one_line_error(result, "broken.yaml", "line 5", "YAML syntax error")
    assert list(runs_dir.iterdir()) == []


def test_set_on_missing_key(tiny_recipe: Path, runs_dir: Path):
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--set", "train.optimizer.lrr=1")
    assert_one_line_error(result, "--set train.optimizer.lrr", "did you mean 'lr'")
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--set", "model.hidden=-4")
    assert_one_line_error(result, "model.hidden")
    assert list(runs_dir.iterdir()) == []


@pytest.fixture
def trained(tiny_recipe: Path, runs_dir: Path) -> Path:
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--set", "train.steps=10")
    assert result.exit_code == 0, result.output
    return runs_dir / "tiny"


def test_same_name_twice_is_refused(tiny_recipe: Path, runs_dir: Path, trained: Path):
    before = snapshot(runs_dir)
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir)
    assert_one_line_error(result, "exists", "memctl resume")
    assert snapshot(runs_dir) == before


def test_resume_of_a_directory_that_is_not_a_run(tmp_path: Path):
    (tmp_path / "notarun").mkdir()
    assert_one_line_error(cli("resume", tmp_path / "notarun"), "not a memctl run")
    assert_one_line_error(cli("resume", tmp_path / "missing"), "no such run directory")
    assert_one_line_error(cli("eval", tmp_path / "missing"), "no such run directory")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint(runs_dir: Path, trained: Path, damage: str):
    last = trained / "checkpoints" / "last.pt"
    data = last.read_bytes()
    if damage == "truncate":
        last.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        last.write_bytes(b"not a checkpoint at all" * 10)
    else:
        last.write_bytes(b"")
    before = snapshot(runs_dir)
    assert_one_line_error(cli("resume", trained, "--steps", "5"), "last.pt", "checkpoint")
    assert_one_line_error(cli("eval", trained), "last.pt", "checkpoint")
    assert snapshot(runs_dir) == before


def test_checkpoint_that_is_not_ours(runs_dir: Path, trained: Path):
    torch.save({"weights": torch.zeros(3)}, trained / "checkpoints" / "last.pt")
    assert_one_line_error(cli("resume", trained, "--steps", "5"), "not a memctl checkpoint")


def test_resume_that_changes_the_model_shape_is_refused(runs_dir: Path, trained: Path):
    before = snapshot(runs_dir)
    result = cli("resume", trained, "--steps", "5", "--set", "model.hidden=32")
    assert_one_line_error(result, "refused", "model.hidden=32", "shape")
    result = cli("resume", trained, "--steps", "5", "--set", "task.width=6")
    assert_one_line_error(result, "refused", "shape")
    assert snapshot(runs_dir) == before


def test_bad_eval_arguments(runs_dir: Path, trained: Path):
    assert_one_line_error(cli("eval", trained, "--lengths", "a,b"), "--lengths")
    assert_one_line_error(cli("eval", trained, "--checkpoint", "newest"), "--checkpoint")
    assert_one_line_error(cli("eval", trained, "--checkpoint", "999"), "step_999.pt")
    assert_one_line_error(cli("eval", trained, "--batches", "0"), "--batches", "eval.batches")
