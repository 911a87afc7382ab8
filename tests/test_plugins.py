"""Plugins: a task and a model from files outside memctl, named with --plugin (or
MEMCTL_PLUGINS, or an installed package's entry point), recorded in run.json, loaded
again by every command that opens the run and by sweep trials, refused when changed.

Runs that import a plugin go through their own processes (``cli_process``): the
registries of this test process are shared by every test, and must keep only memctl's
own types."""

from __future__ import annotations

import hashlib
import inspect
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

import memctl
from memctl.executors import SlurmTrial, TrialLaunch, trial_arguments
from memctl.registry import MODELS, TASKS
from tests.conftest import cli, cli_process, run_page_commands, snapshot, write_recipe

TASK_PLUGIN = '''
"""A plugin task: the target at each step is the input bit of the step before."""

import torch
from pydantic import Field

import memctl


class DelayConfig(memctl.TaskConfig):
    type: str = "delay"
    max_length: int = Field(6, ge=1)


@memctl.register_task("delay", DelayConfig)
class DelayTask(memctl.Task):
    level_field = "max_length"
    input_size = 1
    output_size = 1

    def sample(self, batch_size, generator, *, max_level, min_level):
        bits = torch.randint(0, 2, (max_level, batch_size, 1), generator=generator).float()
        targets = torch.cat([torch.zeros(1, batch_size, 1), bits[:-1]])
        return memctl.Batch(bits, targets, torch.ones(max_level, batch_size))
'''

MODEL_PLUGIN = '''
"""A plugin model: a GRU and a linear read-out."""

from typing import NamedTuple

import torch
from pydantic import Field

import memctl


class TinyConfig(memctl.ModelConfig):
    type: str = "tinygru"
    hidden: int = Field(8, ge=1)


class TinyState(NamedTuple):
    hidden: torch.Tensor


@memctl.register_model("tinygru", TinyConfig)
class TinyGRU(torch.nn.Module):
    def __init__(self, config, input_size, output_size):
        super().__init__()
        self.rnn = torch.nn.GRU(input_size, config.hidden)
        self.readout = torch.nn.Linear(config.hidden, output_size)

    def forward(self, inputs, state=None):
        out, hidden = self.rnn(inputs, None if state is None else state.hidden)
        return self.readout(out), TinyState(hidden)
'''

RECIPE = {
    "name": "delay",
    "seed": 1,
    "device": "cpu",
    "model": {"type": "tinygru", "hidden": 8},
    "task": {"type": "delay", "max_length": 4},
    "train": {"steps": 20, "batch_size": 4, "log_every": 5, "checkpoint_every": 10},
    "eval": {"batches": 1},
}


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """memctl in its own process, to the end: exit code, stdout, stderr."""
    process = cli_process(*args, cwd=cwd)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def write_plugins(tmp_path: Path) -> tuple[Path, Path, Path]:
    task = tmp_path / "delay_task.py"
    task.write_text(TASK_PLUGIN)
    model = tmp_path / "tiny_model.py"
    model.write_text(MODEL_PLUGIN)
    return task, model, write_recipe(tmp_path / "delay.yaml", RECIPE)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_public_api_is_lazy_and_what_the_registry_uses():
    code = (
        "import sys, memctl; assert 'torch' not in sys.modules, 'import memctl imports torch'; "
        "print(sorted(set(memctl.__all__) - {'__version__'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(
        sorted(["Batch", "ModelConfig", "Task", "TaskConfig", "register_model", "register_task"])
    )
    from memctl.models.base import ModelConfig
    from memctl.tasks.base import Batch, Task, TaskConfig

    assert (memctl.Task, memctl.Batch, memctl.TaskConfig) == (Task, Batch, TaskConfig)
    assert memctl.ModelConfig is ModelConfig
    assert {"register_task", "Task"} <= set(dir(memctl))


def test_every_task_takes_its_levels_by_keyword_only():
    for name in TASKS.names():
        parameters = inspect.signature(TASKS.get(name).cls.sample).parameters
        kinds = {key: parameters[key].kind for key in ("max_level", "min_level")}
        assert set(kinds.values()) == {inspect.Parameter.KEYWORD_ONLY}, name


def test_plugins_train_and_every_command_on_the_run_loads_them_again(tmp_path, monkeypatch):
    task, model, recipe = write_plugins(tmp_path)
    runs = tmp_path / "runs"
    monkeypatch.setenv("MEMCTL_PLUGINS", f"{task}:{model}")
    trained = run("train", recipe, "--runs-dir", runs)
    assert trained.returncode == 0, trained.stderr
    info = json.loads((runs / "delay" / "run.json").read_text())
    assert info["plugins"] == [
        {"source": str(task), "path": str(task), "sha256": sha256(task)},
        {"source": str(model), "path": str(model), "sha256": sha256(model)},
    ]
    monkeypatch.delenv("MEMCTL_PLUGINS")

    resumed = run("resume", runs / "delay", "--steps", "10")
    assert resumed.returncode == 0, resumed.stderr
    evaluated = run("eval", runs / "delay", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.splitlines()[0])["checkpoint_step"] == 30
    inspected = run("inspect", runs / "delay", "--out", tmp_path / "figures")
    assert inspected.returncode == 0, inspected.stderr
    assert list((tmp_path / "figures").glob("*.png"))
    plotted = run("plot", runs / "delay", "--out", tmp_path / "curve.png")
    assert plotted.returncode == 0, plotted.stderr
    shown = run("show", runs / "delay" / "recipe.yaml")
    assert shown.returncode == 0, shown.stderr
    assert "type: tinygru" in shown.stdout
    forked = run("fork", runs / "delay", "delay2", "--steps", "10")
    assert forked.returncode == 0, forked.stderr
    assert json.loads((runs / "delay2" / "run.json").read_text())["plugins"] == info["plugins"]


def test_a_changed_plugin_is_refused_until_named_again(tmp_path):
    task, model, recipe = write_plugins(tmp_path)
    runs = tmp_path / "runs"
    trained = run("--plugin", task, "--plugin", model, "train", recipe, "--runs-dir", runs)
    assert trained.returncode == 0, trained.stderr
    old = sha256(task)
    task.write_text(TASK_PLUGIN + "\n# a changed file\n")
    before = snapshot(runs)

    refused = run("resume", runs / "delay", "--steps", "10")
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"error: {runs / 'delay' / 'run.json'}: plugin {task} changed since the run started "
        f"(sha256 {old[:12]}, now {sha256(task)[:12]}); pass --plugin {task} to accept it"
    ]
    assert snapshot(runs) == before

    accepted = run("--plugin", task, "resume", runs / "delay", "--steps", "10")
    assert accepted.returncode == 0, accepted.stderr
    recorded = json.loads((runs / "delay" / "run.json").read_text())["plugins"]
    assert [entry["sha256"] for entry in recorded] == [sha256(task), sha256(model)]

    model.unlink()
    before = snapshot(runs)
    missing = run("eval", runs / "delay")
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"error: {runs / 'delay' / 'run.json'}: plugin {model} is")
    assert len(missing.stderr.splitlines()) == 1
    assert snapshot(runs) == before


def test_a_sweep_passes_its_plugins_to_every_trial(tmp_path):
    task, model, recipe = write_plugins(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "sw", "base": str(recipe), "seeds": [0, 1]}))
    runs = tmp_path / "runs"
    swept = run("--plugin", task, "--plugin", model, "sweep", sweep, "--runs-dir", runs,
                "--workers", "2")  # fmt: skip
    assert swept.returncode == 0, swept.stdout + swept.stderr
    trials = sorted(p for p in (runs / "sw").iterdir() if (p / "run.json").is_file())
    assert [t.name for t in trials] == ["sw-seed=0", "sw-seed=1"]
    for trial in trials:
        info = json.loads((trial / "run.json").read_text())
        assert info["status"] == "finished"
        assert [entry["path"] for entry in info["plugins"]] == [str(task), str(model)]
        log = (runs / "sw" / f"{trial.name}.log").read_text()
        assert log.startswith(f"--- memctl --plugin {task} --plugin {model} train")


def test_slurm_trials_carry_the_plugin_options(tmp_path):
    options = ("--plugin", "/plugins/task.py")
    launch = TrialLaunch("t", tmp_path / "t.yaml", tmp_path, options)
    assert trial_arguments(launch)[:3] == ["--plugin", "/plugins/task.py", "train"]
    requeued = pickle.loads(pickle.dumps(SlurmTrial(launch, 1)))
    assert requeued.trial.plugins == options


def test_an_entry_point_of_an_installed_package_is_loaded(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "mypkg").mkdir(parents=True)
    (site / "mypkg" / "__init__.py").write_text(TASK_PLUGIN.replace('"delay"', '"ep_delay"'))
    info = site / "mypkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[memctl.plugins]\nmypkg = mypkg\n")
    monkeypatch.setenv("PYTHONPATH", f"{site}:{Path(memctl.__file__).parents[1]}")
    listed = run("tasks", "ep_delay")
    assert listed.returncode == 0, listed.stderr
    assert "ep_delay" in listed.stdout and "mypkg.DelayTask" in listed.stdout


def test_two_plugins_with_one_name_clash_naming_both(tmp_path):
    first, second = tmp_path / "first.py", tmp_path / "second.py"
    first.write_text(TASK_PLUGIN)
    second.write_text(TASK_PLUGIN)
    clash = run("--plugin", first, "--plugin", second, "tasks")
    assert clash.returncode == 2
    assert clash.stderr.splitlines() == [
        f"error: --plugin {second}: task 'delay' of plugin {second} clashes with the "
        f"plugin {first}; rename one of them"
    ]


def test_a_clash_with_a_built_in_an_import_error_and_an_unknown_type(tmp_path, runs_dir):
    clash = tmp_path / "clash.py"
    clash.write_text(
        "import memctl\nfrom memctl.models.lstm import LSTMConfig\n\n"
        "@memctl.register_model('lstm', LSTMConfig)\nclass Mine(__import__('torch').nn.Module):\n"
        "    pass\n"
    )
    result = cli("--plugin", clash, "models")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: --plugin {clash}: model 'lstm' of plugin {clash} clashes with the built-in "
        "memctl.models.lstm.LSTM; rename one of them"
    ]
    assert MODELS.get("lstm").cls.__module__ == "memctl.models.lstm"

    broken = tmp_path / "broken.py"
    broken.write_text(
        textwrap.dedent("""
        import memctl

        raise RuntimeError("the plugin's own\\nmulti-line complaint")
    """)
    )
    result = cli("--plugin", broken, "tasks")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: --plugin {broken}: import failed: RuntimeError: multi-line complaint"
    ]
    broken.write_text("import memctl\n\ndef (:\n")
    result = cli("--plugin", broken, "tasks")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: --plugin {broken}: import failed: SyntaxError: invalid syntax (line 3)"
    ]

    for missing in ("no_such_plugin_module", str(tmp_path / "absent.py")):
        result = cli("--plugin", missing, "tasks")
        assert result.exit_code == 2
        assert result.stderr.startswith(f"error: --plugin {missing}: no such")

    before = snapshot(runs_dir)
    recipe = write_recipe(tmp_path / "r.yaml", {**RECIPE, "model": {"type": "lstm"}})
    result = cli("train", recipe, "--runs-dir", runs_dir)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {recipe}: task.type: 'delay' is not registered (known: "
        f"{', '.join(TASKS.names())}); if a plugin provides it, pass --plugin FILE"
    ]
    assert snapshot(runs_dir) == before


@pytest.mark.slow
def test_the_docs_examples_run_as_written(tmp_path: Path):
    """docs/plugins.md's commands from a checkout: the parity task learns to length 16
    (eval needs no --plugin: the run recorded it) and the Elman model copies its training
    lengths and is inspected with its hidden state."""
    commands = run_page_commands("plugins.md", tmp_path)
    assert [c.split()[:4] for c in commands] == [
        ["memctl", "--plugin", "examples/plugin_task.py", "train"],
        ["memctl", "eval", "runs/parity_lstm"],
        ["memctl", "--plugin", "examples/plugin_model.py", "train"],
        ["memctl", "inspect", "runs/copy_elman"],
    ]
    parity = pd.read_csv(tmp_path / "runs/parity_lstm/metrics.csv")
    assert parity["loss"].iloc[-1] < parity["loss"].iloc[0] / 20
    assert parity["level"].iloc[-1] == 12
    evals = pd.read_csv(tmp_path / "runs/parity_lstm/eval.csv")
    assert (evals.groupby("level")["accuracy"].last() > 0.9).all()
    elman = pd.read_csv(tmp_path / "runs/copy_elman/eval.csv")
    assert elman.groupby("level")["bit_errors"].last()[3] < 0.5
    assert (tmp_path / "runs/copy_elman/inspect/hidden.png").is_file()
