"""``train.compile``: a model's compiled per-step cell gives its eager losses and gradients
(and the DNC's whole compiled time loop, ``compile_sequence``, too).

The step is traced with the ``aot_eager`` backend: dynamo and AOT autograd, as inductor
uses them, without compiling C++ kernels (minutes on a loaded 2-core machine). One per-step
graph serves every sequence length (the whole-loop graph is traced once per length); the
DNC's hand-written autograd Functions go through both.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from memctl.models.dnc import DNCConfig, DNCModel
from memctl.models.ntm import NTM, NTMConfig
from memctl.tasks.copy import CopyConfig, CopyTask
from tests.conftest import TINY, cli, write_recipe
from tests.test_bad_input import assert_one_line_error
from tests.test_dnc import TINY as DNC_TINY
from tests.test_ntm import TINY as NTM_TINY

MODELS = {
    "ntm": (NTM, NTMConfig, NTM_TINY),
    "dnc": (DNCModel, DNCConfig, DNC_TINY),
    "dnc_reference": (DNCModel, DNCConfig, {**DNC_TINY, "backend": "reference"}),
}


@pytest.mark.parametrize(
    ("kind", "compile_method"),
    [
        ("ntm", "compile_step"),
        ("dnc", "compile_step"),
        ("dnc", "compile_sequence"),
        ("dnc_reference", "compile_step"),
    ],
)
def test_compiled_step_gives_the_eager_losses_and_gradients(
    kind: str, compile_method: str, monkeypatch
):
    # The DNC's PyTorch path: where its native sequence serves a model, run() uses that.
    monkeypatch.setenv("MEMCTL_NATIVE", "0")
    model_class, config_class, tiny = MODELS[kind]
    task = CopyTask(CopyConfig(width=4, max_length=5))
    # float64: in float32 the eager and compiled steps round differently (the DNC's eager
    # link gradient is accumulated in place in a shared buffer), by up to 2e-5 on torch
    # 2.11, more than a float32 tolerance that still means something.
    model = model_class(config_class(**tiny), task.input_size, task.output_size).double()
    batches = [
        task.sample(8, torch.Generator().manual_seed(s), max_level=5, min_level=1) for s in range(3)
    ]

    def losses_and_gradients():
        losses = [task.loss(model(b.inputs.double())[0], b) for b in batches]
        gradients = torch.autograd.grad(sum(losses), list(model.parameters()))
        return torch.stack(losses), gradients

    eager_losses, eager_gradients = losses_and_gradients()
    getattr(model, compile_method)(backend="aot_eager", dynamic=False)
    counters.clear()
    compiled_losses, compiled_gradients = losses_and_gradients()
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled path ran
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-12, atol=1e-12)
    for compiled, eager in zip(compiled_gradients, eager_gradients, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


def ntm_recipe(tmp_path: Path, compile_step: bool) -> Path:
    data = copy.deepcopy(TINY)
    data["model"] = {"type": "ntm", "controller_size": 8, "memory_size": 8, "word_size": 4}
    data["train"].update(steps=2, checkpoint_every=2, eval_every=0, compile=compile_step)
    return write_recipe(tmp_path / "ntm.yaml", data)


def test_compile_without_a_cpp_compiler_is_one_line(tmp_path: Path, runs_dir: Path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("memctl.toolchain.shutil.which", lambda name: None)
    result = cli("train", ntm_recipe(tmp_path, True), "--runs-dir", runs_dir)
    assert_one_line_error(result, "train.compile", "compiler")
    assert list(runs_dir.iterdir()) == []


def test_eval_of_a_compiled_recipe_runs_eager(tmp_path: Path, runs_dir: Path, monkeypatch):
    assert cli("train", ntm_recipe(tmp_path, False), "--runs-dir", runs_dir).exit_code == 0
    run = runs_dir / "tiny"
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("compile: false", "compile: true"))

    def refuse(self, **options):
        raise AssertionError("memctl eval compiled the step")

    monkeypatch.setattr(NTM, "compile_step", refuse)
    result = cli("eval", run, "--lengths", "5")
    assert result.exit_code == 0, result.output
    assert "compile: true" in recipe.read_text()
