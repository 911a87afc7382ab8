"""``train.compile``: a model's compiled per-step cell gives its eager losses and gradients.

The step is traced with the ``aot_eager`` backend: dynamo and AOT autograd, as inductor
uses them, without compiling C++ kernels (minutes on a loaded 2-core machine). One graph
serves every sequence length; the DNC's hand-written autograd Functions go through it.
"""

from __future__ import annotations

import pytest
import torch

from memctl.models.dnc import DNCConfig, DNCModel
from memctl.models.ntm import NTM, NTMConfig
from memctl.tasks.copy import CopyConfig, CopyTask
from tests.test_dnc import TINY as DNC_TINY
from tests.test_ntm import TINY as NTM_TINY

MODELS = {"ntm": (NTM, NTMConfig, NTM_TINY), "dnc": (DNCModel, DNCConfig, DNC_TINY)}


@pytest.mark.parametrize("kind", MODELS)
def test_compiled_step_gives_the_eager_losses_and_gradients(kind: str):
    model_class, config_class, tiny = MODELS[kind]
    task = CopyTask(CopyConfig(width=4, max_length=5))
    model = model_class(config_class(**tiny), task.input_size, task.output_size)
    batches = [task.sample(8, 5, torch.Generator().manual_seed(s), 1) for s in range(3)]

    def losses_and_gradients():
        losses = [task.loss(model(b.inputs)[0], b) for b in batches]
        gradients = torch.autograd.grad(sum(losses), list(model.parameters()))
        return torch.stack(losses), gradients

    eager_losses, eager_gradients = losses_and_gradients()
    model.compile_step(backend="aot_eager", dynamic=False)
    compiled_losses, compiled_gradients = losses_and_gradients()
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(compiled_gradients, eager_gradients, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
