"""The adding and argmax tasks (pytorch-dnc's), checked against per-sequence loops, and
the DNC recipes validating and building."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memctl.errors import UserError
from memctl.recipe import load_recipe, validate_recipe
from memctl.registry import MODELS, TASKS
from memctl.tasks.adding import AddingConfig, AddingTask
from memctl.tasks.argmax import ArgmaxConfig, ArgmaxTask

RECIPES = Path(__file__).parent.parent / "recipes"


def decode(batch, b):
    """Sequence b's numbers (before the end symbol) from its one-hot inputs."""
    symbols = batch.inputs[:, b].argmax(-1).tolist()
    present = batch.inputs[:, b].sum(-1).tolist()
    steps = [s for s, p in zip(symbols, present, strict=True) if p]
    return steps[:-1], steps[-1]


@pytest.mark.parametrize("task_class", [AddingTask, ArgmaxTask])
def test_inputs_are_numbers_then_the_end_symbol(task_class):
    config = (AddingConfig if task_class is AddingTask else ArgmaxConfig)(size=5, max_length=9)
    task = task_class(config)
    batch = task.sample(16, torch.Generator().manual_seed(0), max_level=9, min_level=3)
    assert batch.inputs.shape[1:] == (16, 5) and batch.targets.shape[1:] == (16, 1)
    assert task.input_size == 5 and task.output_size == 1
    for b in range(16):
        numbers, end = decode(batch, b)
        assert 3 <= len(numbers) <= 9
        assert end == 4 and all(0 <= n <= 3 for n in numbers)
    again = task.sample(16, torch.Generator().manual_seed(0), max_level=9, min_level=3)
    assert all(torch.equal(x, y) for x, y in zip(batch, again, strict=True))


def test_adding_target_is_the_sum_and_the_prediction_sums_every_step():
    task = AddingTask(AddingConfig(max_length=12))
    batch = task.sample(32, torch.Generator().manual_seed(1), max_level=12, min_level=2)
    for b in range(32):
        numbers, _ = decode(batch, b)
        assert task.answer(batch)[b].item() == sum(numbers)
        assert batch.mask[:, b].sum().item() == len(numbers) + 1
    outputs = batch.targets.clone()  # the sum, output at the end step: exact
    assert task.loss(outputs, batch).item() == 0
    ones = torch.ones_like(batch.targets)  # 1 at every step: predicts length + 1
    expected = (batch.mask.sum(0) - task.answer(batch)) ** 2
    torch.testing.assert_close(task.sequence_losses(ones, batch), expected)
    metrics = task.metrics(outputs + 0.4 / 13, batch)
    assert metrics["accuracy"].item() == 1
    assert metrics["abs_error"].item() < 0.4


def test_argmax_target_is_the_last_position_of_the_largest_number():
    task = ArgmaxTask(ArgmaxConfig(size=3, max_length=8))  # numbers 0, 1: many ties
    batch = task.sample(64, torch.Generator().manual_seed(2), max_level=8, min_level=2)
    for b in range(64):
        numbers, _ = decode(batch, b)
        largest = max(numbers)
        assert task.answer(batch)[b].item() == max(i for i, n in enumerate(numbers) if n == largest)
        assert batch.mask[:, b].tolist().index(1.0) == len(numbers)  # scored at the end
        assert batch.mask[:, b].sum().item() == 1
    metrics = task.metrics(batch.targets + 0.6 * batch.mask.unsqueeze(-1), batch)
    assert metrics["accuracy"].item() == 0
    assert metrics["abs_error"].item() == pytest.approx(0.6)


def test_lengths_must_be_ordered():
    data = {"name": "x", "model": {"type": "dnc"}, "task": {"type": "adding", "min_length": 9}}
    data["task"]["max_length"] = 5
    with pytest.raises(UserError, match="min_length"):
        validate_recipe(data, "r.yaml")


@pytest.mark.parametrize("name", ["dnc_copy", "dnc_adding", "dnc_argmax", "dnc_repeat_copy"])
def test_recipes_build(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    task = TASKS.get(recipe.task.type).cls(recipe.task)
    model = MODELS.get(recipe.model.type).cls(recipe.model, task.input_size, task.output_size)
    batch = task.sample(
        2, torch.Generator().manual_seed(0), max_level=task.min_level, min_level=task.min_level
    )
    outputs, _ = model(batch.inputs)
    assert torch.isfinite(task.loss(outputs, batch))
