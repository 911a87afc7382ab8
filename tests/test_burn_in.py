"""train.burn_in: unscored batches before each training batch, run without gradient, whose
state the training batch starts from; the draws, the state carried, exact resume."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import torch

from memctl.trainer import Trainer
from tests.conftest import TINY, cli, snapshot, write_recipe
from tests.test_bad_input import assert_one_line_error
from tests.test_reliability import assert_split_run_matches_straight
from tests.test_tbptt import float64_trainer


def tensors(state: object) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for part in state for t in tensors(part)]


def recorded_calls(trainer: Trainer) -> list[tuple[torch.Tensor, object, object, bool]]:
    """Each forward of the trainer's model: (inputs, state given, state returned, whether
    gradient was on)."""
    calls = []
    forward = trainer.model.forward

    def recording(inputs, state=None):
        outputs, new_state = forward(inputs, state)
        calls.append((inputs, state, new_state, torch.is_grad_enabled()))
        return outputs, new_state

    trainer.model.forward = recording
    return calls


def test_the_batch_starts_from_the_state_the_unscored_batches_leave():
    trainer, _ = float64_trainer(burn_in=2)
    trainer.model.float()
    calls = recorded_calls(trainer)
    counts = []
    for _ in range(20):
        calls.clear()
        assert trainer.train_step()
        *burn, scored = calls
        counts.append(len(burn))
        assert scored[3] and not any(call[3] for call in burn)
        if not burn:
            assert scored[1] is None
            continue
        assert burn[0][1] is None
        for before, after in itertools.pairwise(burn):
            assert after[1] is before[2]
        assert tensors(scored[1])
        for given, left in zip(tensors(scored[1]), tensors(burn[-1][2]), strict=True):
            assert torch.equal(given, left) and not given.requires_grad
    # The number of unscored batches is drawn from 0..burn_in.
    assert set(counts) == {0, 1, 2}


def test_burn_in_leaves_the_training_batches_unchanged():
    batches = []
    for burn_in in (0, 2):
        trainer, _ = float64_trainer(burn_in=burn_in)
        trainer.model.float()
        calls = recorded_calls(trainer)
        assert trainer.train_step()
        batches.append(calls[-1][0])
    assert torch.equal(*batches)


def test_exact_resume_with_burn_in(tiny_recipe: Path, runs_dir: Path):
    assert_split_run_matches_straight(tiny_recipe, runs_dir, "--set", "train.burn_in=2")


def test_burn_in_must_not_be_negative(tmp_path: Path, runs_dir: Path):
    data = copy.deepcopy(TINY)
    data["train"]["burn_in"] = -1
    recipe = write_recipe(tmp_path / "bad.yaml", data)
    before = snapshot(runs_dir)
    result = cli("train", recipe, "--runs-dir", runs_dir)
    assert_one_line_error(result, "train.burn_in")
    assert snapshot(runs_dir) == before
