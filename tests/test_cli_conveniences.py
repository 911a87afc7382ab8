"""The command line's conveniences and its fixed defects: help, listings, shortcuts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import memctl
import memctl.models
from memctl.cli import print_json_rows
from memctl.recipe import load_recipe
from memctl.registry import MODELS
from memctl.sweep import write_trials_csv
from tests.conftest import TINY, cli, cli_process, snapshot, write_recipe
from tests.test_bad_input import assert_one_line_error
from tests.test_viz import curve, fake_run

ROOT = Path(__file__).resolve().parent.parent
# The names the package description uses, and the registered model each stands for.
DESCRIBED_MODELS = {"NTM": "ntm", "DNC": "dnc", "HAM": "ham", "Fast Weights": "rnn_ln_fw",
                    "LSTM": "lstm"}  # fmt: skip


def test_package_description_names_only_models_that_exist():
    tomllib = pytest.importorskip("tomllib")
    description = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    named = re.search(r"\(([^)]*)\)", description).group(1).split(", ")
    assert set(named) == set(DESCRIBED_MODELS), named
    assert all(DESCRIBED_MODELS[name] in MODELS for name in named)


def test_set_error_example_is_a_valid_override(tiny_recipe: Path, runs_dir: Path):
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--set", "lr")
    assert_one_line_error(result, "--set 'lr'", "e.g. ")
    example = result.stderr.split("e.g. ")[1].strip()
    assert load_recipe(tiny_recipe, [example]).train.optimizer.lr == 1e-3
    assert list(runs_dir.iterdir()) == []


@pytest.mark.parametrize(
    "key,suggested",
    [
        ("train.lr", "train.optimizer.lr"),
        ("optimizer.lr", "train.optimizer.lr"),
        ("train.tensorboard", "log.tensorboard"),
        ("model.hiden", "hidden"),
    ],
)
def test_set_did_you_mean_searches_every_section(
    tiny_recipe: Path, runs_dir: Path, key: str, suggested: str
):
    before = snapshot(runs_dir)
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--set", f"{key}=1")
    assert_one_line_error(result, f"--set {key.split('.')[0]}", f"did you mean {suggested!r}?")
    assert snapshot(runs_dir) == before


def test_sweep_settings_did_you_mean_searches_every_section(tmp_path: Path):
    base = write_recipe(tmp_path / "base.yaml", TINY)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"base: {base}\nset:\n  train.lr: 0.01\n")
    result = cli("sweep", "run", sweep, "--runs-dir", tmp_path / "runs", "--dry-run")
    assert_one_line_error(result, "train.lr", "did you mean 'train.optimizer.lr'?")


def help_text(*command: str) -> str:
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.output
    return result.stdout


def flat(text: str) -> str:
    """Help text without its boxes' sides and line breaks: sentences read whole."""
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize(
    "command,flags,valued",
    [
        (["train"], ["--tensorboard", "--help"], {"--name": "<str>", "--runs-dir": "<path>"}),
        (["sweep", "run"], ["--dry-run", "--retry-failed"], {"--workers": "<int range>"}),
        (["sweep", "status"], ["--csv"], {}),
        ([], ["--help"], {}),
    ],
)
def test_help_shows_flags_without_a_value_type(
    command: list[str], flags: list[str], valued: dict[str, str]
):
    text = help_text(*command)
    assert "<bool>" not in text
    for flag in flags:
        assert re.search(rf"{flag}\s+[A-Z]", text), (flag, text)
    for option, shown in valued.items():
        assert re.search(rf"{option}\s+{shown}", text), (option, text)


@pytest.mark.parametrize(
    "command,usage",
    [(["train"], "[OPTIONS] RECIPE"), (["runs"], "[OPTIONS] [RUNS_DIR]"),
     (["plot"], "[OPTIONS] RUNS..."), (["sweep", "run"], "[OPTIONS] FILE")],
)  # fmt: skip
def test_help_usage_names_arguments_as_click_does(command: list[str], usage: str):
    text = help_text(*command)
    assert f" {' '.join([*command, usage])}" in " ".join(text.split()), text
    assert "{" not in text.split("Usage:")[1].splitlines()[0]


def runs_with_a_sweep(root: Path) -> Path:
    """``root/runs``: a run ``r``, and a sweep ``s`` with two started trials of three."""
    fake_run(root / "runs" / "r", curve(1.0))
    rows = []
    for trial, started in (("s-a", True), ("s-b", True), ("s-c", False)):
        if started:
            fake_run(root / "runs" / "s" / trial, curve(2.0, 3))
        rows.append({"trial": trial, "status": "finished" if started else "pending"})
    write_trials_csv(root / "runs" / "s", rows)
    return root / "runs"


def test_runs_lists_sweep_trials_under_the_sweeps_name(tmp_path: Path):
    runs = runs_with_a_sweep(tmp_path)
    before = snapshot(runs)
    result = cli("runs", runs)
    assert result.exit_code == 0, result.output
    names = [line.split("│")[1].strip() for line in result.stdout.splitlines() if "│" in line]
    assert names == ["r", "s/s-a", "s/s-b"]
    assert snapshot(runs) == before
    assert "SWEEP/TRIAL" in help_text("runs")


def test_train_steps_and_seed_are_the_set_shortcuts(tiny_recipe: Path, runs_dir: Path):
    short = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--steps", 10, "--seed", 7)
    assert short.exit_code == 0, short.output
    longhand = ["--set", "train.steps=10", "--set", "seed=7", "--name", "long"]
    assert cli("train", tiny_recipe, "--runs-dir", runs_dir, *longhand).exit_code == 0
    recipe = yaml.safe_load((runs_dir / "tiny" / "recipe.yaml").read_text())
    assert recipe["train"]["steps"] == 10 and recipe["seed"] == 7
    assert recipe == {**yaml.safe_load((runs_dir / "long" / "recipe.yaml").read_text()),
                      "name": "tiny"}  # fmt: skip
    assert pd.read_csv(runs_dir / "tiny" / "metrics.csv")["step"].iloc[-1] == 10
    text = flat(help_text("train"))
    assert "same as --set train.steps=N; resume --steps is N more steps" in text
    assert "--seed <int> Seed of the run (same as --set seed=S)" in text


def test_train_steps_below_one_is_one_line(tiny_recipe: Path, runs_dir: Path):
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--steps", 0)
    assert_one_line_error(result, "train.steps", "greater than 0")
    assert list(runs_dir.iterdir()) == []


def json_lines(text: str) -> list[dict]:
    lines = text.splitlines()
    assert lines and all(line.startswith("{") for line in lines), text
    return [json.loads(line) for line in lines]


def test_runs_json_prints_one_object_per_row(tmp_path: Path):
    runs = runs_with_a_sweep(tmp_path)
    result = cli("runs", runs, "--json")
    assert result.exit_code == 0, result.output
    rows = json_lines(result.stdout)
    assert [row["name"] for row in rows] == ["r", "s/s-a", "s/s-b"]
    assert rows[0]["step"] == 80 and rows[0]["status"] == "finished"
    assert isinstance(rows[0]["loss"], float)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("runs", empty, "--json").stdout == ""


def test_eval_json_prints_one_object_per_level(tiny_recipe: Path, runs_dir: Path):
    assert cli("train", tiny_recipe, "--runs-dir", runs_dir, "--steps", 10).exit_code == 0
    run = runs_dir / "tiny"
    before = len(pd.read_csv(run / "eval.csv"))
    result = cli("eval", run, "--lengths", "5", "--json")
    assert result.exit_code == 0, result.output
    rows = json_lines(result.stdout)
    assert [row["level"] for row in rows] == [2, 5]  # the trained level, then --lengths
    assert all(row["step"] == 10 and row["checkpoint"] == "last" for row in rows)
    assert all(isinstance(row["bit_errors"], float) for row in rows)
    added = pd.read_csv(run / "eval.csv").iloc[before:]
    assert added["bit_errors"].tolist() == [row["bit_errors"] for row in rows]
    assert "--json" in help_text("eval") and "--json" in help_text("runs")


def test_json_rows_are_valid_json_for_non_finite_values(capsys):
    row = {"name": "1e3", "step": "40", "level": "-", "loss": float("nan"), "metric": "-"}
    print_json_rows([row], numeric=("step", "level", "loss"))
    assert json.loads(capsys.readouterr().out) == {"name": "1e3", "step": 40, "level": None,
                                                   "loss": None, "metric": "-"}  # fmt: skip


def test_version_names_memctl_and_torch():
    result = cli("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"memctl {memctl.__version__} (torch {torch.__version__})\n"
    process = cli_process("--version")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert out.startswith(f"memctl {memctl.__version__} ")


def test_shell_completion_is_offered():
    text = help_text()
    assert "--install-completion" in text and "--show-completion" in text
    # A clean environment: what the user's shell gives, not what earlier tests left.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), "SHELL": "/bin/bash"}
    process = subprocess.Popen(
        [sys.executable, "-m", "memctl", "--show-completion", "bash"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "_COMPLETE=complete_bash" in out and "complete -o default -F" in out
