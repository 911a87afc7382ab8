"""Truncated backpropagation through time (train.tbptt): the gradients against the plain
backward and a hand-chunked reference, exact resume, and the tasks that refuse it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from memctl.models.base import detach_state
from memctl.recipe import validate_recipe
from memctl.tasks.base import Batch
from memctl.trainer import Trainer
from tests.conftest import TINY, cli, snapshot, write_recipe
from tests.test_bad_input import assert_one_line_error
from tests.test_reliability import assert_split_run_matches_straight

DNC = {"type": "dnc", "backend": "reference", "controller_size": 8, "memory_size": 6}
DNC.update(word_size=4, read_heads=2)


def float64_trainer(**train) -> tuple[Trainer, Batch]:
    """A small DNC on repeat copy (scored at many steps) in float64, and a batch with
    sequences of different lengths (padding masked)."""
    data = copy.deepcopy(TINY)
    data["model"] = DNC
    data["task"] = {"type": "repeat_copy", "width": 3, "max_length": 3, "max_repeats": 2}
    data["train"].update(train)
    trainer = Trainer(validate_recipe(data, "test"))
    trainer.model.double()
    generator = torch.Generator().manual_seed(0)
    batch = trainer.task.sample(4, generator, max_level=3, min_level=1)
    return trainer, Batch(*(part.double() for part in batch))


def gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def test_a_chunk_as_long_as_the_sequence_changes_no_gradient():
    trainer, batch = float64_trainer()
    steps = batch.inputs.shape[0]
    outputs, _ = trainer.model(batch.inputs)
    loss = trainer.task.loss(outputs, batch)
    loss.backward()
    plain = gradients(trainer.model)
    for chunk in (steps, steps + 7):
        chunked_outputs, chunked_loss = trainer._truncated_backward(batch, chunk)
        assert torch.equal(chunked_loss, loss.detach())
        assert torch.equal(chunked_outputs, outputs.detach())
        for a, b in zip(gradients(trainer.model), plain, strict=True):
            assert torch.equal(a, b)


def test_chunks_equal_a_hand_chunked_reference():
    trainer, batch = float64_trainer()
    model, task, chunk = trainer.model, trainer.task, 3
    steps = batch.inputs.shape[0]
    assert steps > 2 * chunk
    # One loss over the whole batch, of outputs computed chunk by chunk from detached states.
    state, pieces = None, []
    for start in range(0, steps, chunk):
        piece, state = model(batch.inputs[start : start + chunk], state)
        pieces.append(piece)
        state = detach_state(state)
    reference_loss = task.loss(torch.cat(pieces), batch)
    reference_loss.backward()
    reference = gradients(model)
    outputs, loss = trainer._truncated_backward(batch, chunk)
    torch.testing.assert_close(loss, reference_loss.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(outputs, torch.cat(pieces).detach(), rtol=0, atol=0)
    for a, b in zip(gradients(model), reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # Truncation is real: the untruncated gradient differs.
    task.loss(model(batch.inputs)[0], batch).backward()
    assert any(not torch.allclose(a, b) for a, b in zip(gradients(model), reference, strict=True))


def test_train_step_with_tbptt_steps_once_per_batch():
    trainer, _ = float64_trainer(tbptt=2)
    trainer.model.float()
    calls = []
    original = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: calls.append(1) or original(*a, **k)
    assert trainer.train_step()
    assert calls == [1] and trainer.step == 1


def test_exact_resume_with_tbptt(tiny_recipe: Path, runs_dir: Path):
    assert_split_run_matches_straight(tiny_recipe, runs_dir, "--set", "train.tbptt=3")


@pytest.mark.parametrize(
    "model,task,needle",
    [
        (TINY["model"], {"type": "adding", "max_length": 5}, "'adding' scores only the end"),
        (TINY["model"], {"type": "argmax", "max_length": 5}, "'argmax' scores only the end"),
        (TINY["model"], {"type": "min", "n": 4}, "'min' scores only the end"),
        (TINY["model"], {"type": "associative_retrieval"}, "scores only the end"),
        ({"type": "ham", "mode": "hard"}, {"type": "sort", "n": 4}, "REINFORCE"),
    ],
    ids=["adding", "argmax", "min", "associative_retrieval", "ham"],
)
def test_tasks_scored_at_the_end_refuse_tbptt(tmp_path: Path, runs_dir: Path, model, task, needle):
    data = {**copy.deepcopy(TINY), "model": model, "task": task}
    data["curriculum"] = {"type": "fixed"}
    data["train"]["tbptt"] = 5
    recipe = write_recipe(tmp_path / "bad.yaml", data)
    before = snapshot(runs_dir)
    result = cli("train", recipe, "--runs-dir", runs_dir)
    assert_one_line_error(result, "train.tbptt", needle)
    assert snapshot(runs_dir) == before


def test_tbptt_must_be_positive(tmp_path: Path, runs_dir: Path):
    data = copy.deepcopy(TINY)
    data["train"]["tbptt"] = 0
    result = cli("train", write_recipe(tmp_path / "bad.yaml", data), "--runs-dir", runs_dir)
    assert_one_line_error(result, "train.tbptt")
