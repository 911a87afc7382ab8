"""Shared fixtures: a tiny copy recipe, running the CLI in-process or as a process, and
running a docs page's commands as a user would."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from memctl.cli import app

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "name": "tiny",
    "seed": 3,
    "device": "cpu",
    "model": {"type": "lstm", "hidden": 16},
    "task": {"type": "copy", "width": 4, "min_length": 1, "max_length": 4},
    "curriculum": {"type": "step", "start": 2, "increment": 1, "every": 15},
    "train": {
        "steps": 40,
        "batch_size": 8,
        "log_every": 5,
        "eval_every": 20,
        "checkpoint_every": 10,
        "keep_checkpoints": 2,
    },
    "eval": {"lengths": [6], "batches": 2},
}


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", TINY)


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


def cli(*args: str):
    """Run memctl in this process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def cli_process(*args: str, **kwargs) -> subprocess.Popen:
    """Run memctl as its own process (for signals and fresh-process resume)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "memctl", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root and its bytes: to assert nothing was created or changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def import_file(path: Path, name: str):
    """The module in the file at ``path`` (a script or hook outside the package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page_commands(page: str) -> list[str]:
    """The command lines of a docs page's ``bash`` blocks, in order."""
    text = (ROOT / "docs" / page).read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def run_page_commands(page: str, cwd: Path) -> list[str]:
    """Run a docs page's commands in ``cwd`` (given a copy of examples/), each as its own
    process, as a user runs them from a checkout; returns the commands."""
    shutil.copytree(ROOT / "examples", cwd / "examples")
    commands = page_commands(page)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MEMCTL_PLUGINS", None)
    for command in commands:
        program, *args = shlex.split(command)
        head = [sys.executable] if program == "python" else [sys.executable, "-m", "memctl"]
        done = subprocess.run(
            [*head, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
        )
        assert done.returncode == 0, f"{command}: {done.stderr}"
    return commands
