"""``model.backend`` and ``backend.py``, the one place that chooses the DNC's
implementation: reference, fused and native give the same outputs and gradients in
float64; ``native`` where the kernel cannot serve is one clear error; ``describe_backend``
says what ``run`` does."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from memctl.errors import UserError
from memctl.models.dnc import DNCConfig, DNCModel, backend, fused, native
from memctl.recipe import validate_recipe
from memctl.toolchain import cpp_compiler
from tests.conftest import TINY, cli, snapshot, write_recipe
from tests.test_bad_input import assert_one_line_error

SMALL = {"controller_size": 6, "memory_size": 5, "word_size": 3, "read_heads": 2}
needs_compiler = pytest.mark.skipif(cpp_compiler() is None, reason="no C++ compiler")


def small_dnc(**overrides) -> DNCModel:
    torch.manual_seed(0)
    return DNCModel(DNCConfig(**{**SMALL, **overrides}), 3, 2).double()


def outputs_and_gradients(model: DNCModel) -> list[torch.Tensor]:
    inputs = torch.randn(6, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    inputs.requires_grad_()
    outputs, state = model(inputs)
    loss = outputs.sin().sum() + state.access[0].link.square().sum() + state.reads.sum()
    gradients = torch.autograd.grad(loss, [inputs, *model.parameters()])
    return [outputs.detach(), *gradients]


def counting(monkeypatch, calls: dict[str, int], module, *names: str) -> None:
    """Count calls of ``module``'s functions ``names`` into ``calls``."""
    calls.update(dict.fromkeys(names, 0))
    for name in names:
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


BACKENDS = ["reference", "fused", pytest.param("native", marks=needs_compiler)]


@pytest.mark.parametrize("controller", ["lstm", "gru"])
@pytest.mark.parametrize("chosen", BACKENDS)
def test_backends_give_the_references_outputs_and_gradients(chosen, controller, monkeypatch):
    # gru: the native kernel runs the memory access of each step (no whole sequence).
    expected = outputs_and_gradients(small_dnc(backend="reference", controller=controller))
    calls: dict[str, int] = {}
    counting(monkeypatch, calls, fused, "link_step")
    counting(monkeypatch, calls, native, "dnc_sequence", "dnc_access")
    got = outputs_and_gradients(small_dnc(backend=chosen, controller=controller))
    ran = {name for name, count in calls.items() if count}
    if chosen == "reference":
        assert ran == set()
    elif chosen == "fused":
        assert ran == {"link_step"}
    else:
        assert ran == {"dnc_sequence" if controller == "lstm" else "dnc_access"}
    for have, want in zip(got, expected, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-12)


def test_auto_with_native_turned_off_is_fused(monkeypatch):
    monkeypatch.setenv("MEMCTL_NATIVE", "0")
    model = small_dnc()
    calls: dict[str, int] = {}
    counting(monkeypatch, calls, fused, "link_step")
    outputs_and_gradients(model)
    assert calls["link_step"] == 6
    assert model.describe_backend(3) == "fused (PyTorch, hand-written backwards)"


@needs_compiler
def test_describe_backend_says_what_runs():
    assert small_dnc().describe_backend(8) == "native (C++ kernel, whole sequence)"
    per_step = small_dnc(controller="gru")
    assert per_step.describe_backend(8) == "native access (C++ kernel per step)"
    assert small_dnc(write_heads=2).describe_backend(8) == "fused (PyTorch, hand-written backwards)"
    # float16 and link matrices past the kernel's limit take the fused path.
    assert small_dnc().half().describe_backend(8).startswith("fused")
    large = native.MAX_LINK_ELEMENTS // SMALL["memory_size"] ** 2 + 1
    assert small_dnc().describe_backend(large).startswith("fused")
    assert small_dnc(backend="reference").describe_backend(8) == "reference (PyTorch autograd)"
    assert small_dnc(backend="fused").describe_backend(8).startswith("fused")


def test_describe_backend_of_compiled_models():
    # A compiled step runs where the native sequence does not serve the model; nothing is
    # compiled until the first call.
    model = small_dnc(controller="gru")
    model.compile_step()
    assert model.describe_backend(4) == "compiled (torch.compile step)"
    reference = small_dnc(controller="gru", backend="reference")
    reference.compile_step()
    assert reference.describe_backend(4) == "compiled (torch.compile step, reference maths)"
    whole = small_dnc(write_heads=2)
    whole.compile_sequence()
    assert whole.describe_backend(4) == "compiled (torch.compile whole sequence)"


@needs_compiler
def test_describe_backend_is_the_plan_run_follows(monkeypatch):
    model = small_dnc(controller="gru")
    described = model.describe_backend(3)
    plans = []
    original = backend.plan

    def recorded(*args, **kwargs):
        plans.append(original(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(backend, "plan", recorded)
    outputs_and_gradients(model)
    assert [plan.describe() for plan in plans] == [described]


@needs_compiler
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda model: model.half(), "float32 or float64"),
        (lambda model: model.compile_step(), "compiled step"),
    ],
)
def test_native_where_the_kernel_cannot_serve_is_a_user_error(change, reason):
    model = small_dnc(backend="native", controller="gru")
    change(model)
    with pytest.raises(UserError, match=f"model.backend: native .*{reason}"):
        model.describe_backend(3)
    inputs = torch.randn(2, 3, 3).to(model.readout.weight.dtype)
    with pytest.raises(UserError, match=r"model.backend: native"):
        model(inputs)


@needs_compiler
def test_native_with_link_matrices_past_the_kernels_limit_is_a_user_error():
    model = small_dnc(backend="native")
    large = native.MAX_LINK_ELEMENTS // SMALL["memory_size"] ** 2 + 1
    with pytest.raises(UserError, match=r"model.backend: native .*link matrix"):
        model.describe_backend(large)


def test_native_with_two_write_heads_fails_when_the_model_is_built():
    with pytest.raises(UserError, match=r"model.backend: native .*one write head"):
        small_dnc(backend="native", write_heads=2)


def test_native_turned_off_fails_when_the_model_is_built(monkeypatch):
    monkeypatch.setenv("MEMCTL_NATIVE", "0")
    with pytest.raises(UserError, match=r"model.backend: native .*MEMCTL_NATIVE=0"):
        small_dnc(backend="native")


def test_recipe_backend_names_the_field():
    data = {"name": "x", "model": {"type": "dnc", "backend": "fast"}, "task": {"type": "copy"}}
    with pytest.raises(UserError, match=r"model.backend"):
        validate_recipe(data, "r.yaml")
    data["model"]["backend"] = "reference"
    assert validate_recipe(data, "r.yaml").model.backend == "reference"


def test_train_with_an_unservable_native_backend_is_one_line(tmp_path: Path, runs_dir: Path):
    data = copy.deepcopy(TINY)
    data["model"] = {"type": "dnc", **SMALL, "write_heads": 2, "backend": "native"}
    before = snapshot(runs_dir)
    result = cli("train", write_recipe(tmp_path / "dnc.yaml", data), "--runs-dir", runs_dir)
    assert_one_line_error(result, "model.backend", "write head")
    assert snapshot(runs_dir) == before
