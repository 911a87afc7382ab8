"""What a run will allocate, estimated before anything is built or written, so that a
recipe too big for the machine is one line and not a traceback after gigabytes of
checkpoints.

The estimate runs the model itself, on torch's ``meta`` device (shapes without data):
the model is built there, and its forward runs on two and then four time steps of the
real input width and batch size while a dispatch mode keeps the bytes of every tensor
alive, and their peak. Tensors that autograd keeps for backward stay alive, so with
gradients the peak is what a training step keeps; without, what evaluation needs. The
peak grows linearly with the steps of a sequence, so two lengths give it at any
length. Parameters count once for evaluation and four times for training (weights,
gradients, Adam's two moments). A model whose forward depends on its data (HAM's
attention path) cannot run on ``meta``; its estimate is its parameters alone.

Any model that follows the contract of ``memctl/models/base.py`` is estimated this way;
none needs to know of it.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memctl.curriculum import Curriculum
from memctl.errors import UserError
from memctl.models.base import parameter_count
from memctl.recipe import Recipe
from memctl.registry import MODELS, TASKS
from memctl.rundir import format_size
from memctl.tasks.base import Task

# Levels up to this are sampled to find their length; longer ones extrapolated.
DIRECT_LEVELS = 1024
# Sequences sampled for it (the longest counts: some tasks draw parts of their length).
SAMPLED = 4
# Tensors a training step keeps per parameter: weights, gradients, Adam's two moments.
TRAINING_COPIES = 4


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor an op creates (not views, not in-place results)
    while it is alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(ret.alias_info is not None for ret in func._schema.returns):
            return out
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                size = tensor.numel() * tensor.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, size)
        return out


@dataclass(frozen=True)
class Estimate:
    """Bytes a step needs: ``total`` for a sequence of ``steps`` time steps, of which
    ``per_step`` grow with each step (None where the model cannot run on meta)."""

    total: int
    per_step: int | None
    steps: int
    parameters: int
    parameter_count: int


def _steps(task: Task, level: int) -> int:
    generator = torch.Generator().manual_seed(0)
    return task.sample(SAMPLED, generator, max_level=level, min_level=level).inputs.shape[0]


def sequence_steps(task: Task, level: int) -> int:
    """Time steps of a batch at ``level``: sampled up to ``DIRECT_LEVELS``, beyond that
    extrapolated from two sampled levels (task lengths grow linearly with their level),
    so that a huge level costs no huge sample."""
    if level <= DIRECT_LEVELS:
        return _steps(task, level)
    low, high = DIRECT_LEVELS // 2, DIRECT_LEVELS
    short, longer = _steps(task, low), _steps(task, high)
    return longer + math.ceil((longer - short) / (high - low) * (level - high))


def _forward_peak(model: torch.nn.Module, inputs: torch.Tensor, training: bool) -> int:
    tracker = _LiveBytes()
    with tracker, torch.set_grad_enabled(training):
        model(inputs)
    return tracker.peak


def estimate(recipe: Recipe, batch_size: int, level: int, training: bool) -> Estimate:
    """The bytes one step of ``recipe``'s model needs at ``level`` with ``batch_size``."""
    task = TASKS.get(recipe.task.type).cls(recipe.task)
    model_cls = MODELS.get(recipe.model.type).cls
    steps = sequence_steps(task, level)
    width = task.input_size
    with torch.device("meta"):
        model = model_cls(recipe.model, task.input_size, task.output_size)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    count = parameter_count(model)
    kept = parameters * (TRAINING_COPIES if training else 1)
    model.train(training)
    try:
        short, longer = (
            _forward_peak(model, torch.empty(length, batch_size, width, device="meta"), training)
            for length in (2, 4)
        )
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return Estimate(kept, None, steps, parameters, count)
    per_step = max(longer - short, 0) // 2
    return Estimate(kept + short + per_step * max(steps - 2, 0), per_step, steps, parameters, count)


def available(device: torch.device) -> tuple[int, str]:
    """Bytes free for a run on ``device``, and what they are."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory on {torch.cuda.get_device_name(device)}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available CPU RAM"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "available CPU RAM"


def describe(found: Estimate) -> str:
    if found.per_step is None:
        return f"about {format_size(found.total)} (parameters only)"
    return (
        f"about {format_size(found.total)} "
        f"({format_size(found.per_step)} a time step over {found.steps} steps)"
    )


def model_sizes(recipe: Recipe) -> str:
    """The settings that size a model, as ``--set`` would name them."""
    fields = recipe.model.model_dump()
    named = [f"model.{key}={fields[key]}" for key in ("memory_size", "word_size") if key in fields]
    return ", ".join(named or [f"model.type={recipe.model.type}"])


def check(
    recipe: Recipe,
    device: torch.device,
    batch_size: int,
    level: int,
    training: bool,
    what: str,
) -> Estimate:
    """Refuse (a UserError naming ``what``) a step that needs more than ``device`` has."""
    found = estimate(recipe, batch_size, level, training)
    free, kind = available(device)
    if found.total > free:
        raise UserError(
            f"{what} needs {describe(found)}; this machine has {format_size(free)} ({kind}); "
            "lower it or pass --force"
        )
    return found


def training_level(recipe: Recipe) -> int:
    """The longest level a training batch can have: the curriculum's last."""
    task = TASKS.get(recipe.task.type).cls(recipe.task)
    return Curriculum(recipe.curriculum, task).max
