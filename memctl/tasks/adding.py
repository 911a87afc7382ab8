"""Generalising addition, the adding task of pytorch-dnc (ixaxaar/pytorch-dnc,
``tasks/adding_task.py``).

A sequence of ``L`` numbers, each drawn uniformly from ``0 .. size - 2`` and given as a
one-hot vector of ``size``, then one end step carrying the one-hot of ``size - 1``. The
model emits one number per step; its prediction is the sum of those numbers over the
sequence (the seed sums every output of every step: a linear output layer to one number
is the same function), and the target is the sum of the inputs. Loss: the squared error
of that sum, as the seed's. The seed trains at lengths up to ~100 and tests at ~1000, so
the curriculum parameter is the length and ``memctl eval RUN --lengths 1000`` is its test.

Layout of one sequence (``S`` = size), padded at the end to the batch's longest:

    step          0 .. L-1                 L
    inputs        one-hot(number), < S-1   one-hot(S - 1)
    mask          1                        1        (steps whose outputs are summed)
    targets[0]    0                        the sum of the numbers
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from memctl.registry import TASKS
from memctl.tasks.base import Batch, Task, TaskConfig, draw_levels


class NumbersConfig(TaskConfig):
    """Sequences of one-hot numbers ended by an end symbol (adding, argmax)."""

    size: int = Field(6, ge=2, description="one-hot width: numbers 0 .. size-2, then the end")
    min_length: int = Field(2, ge=1)
    max_length: int = Field(100, ge=1, description="curriculum parameter")

    ordered_fields = (("min_length", "max_length"),)


class AddingConfig(NumbersConfig):
    type: str = "adding"


def one_hot_sequences(
    numbers: torch.Tensor, lengths: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """numbers ``[Lmax, B]`` (in ``0 .. size-2``), lengths ``[B]`` -> (inputs
    ``[Lmax + 1, B, size]``: the first ``L`` numbers one-hot, then the end symbol
    ``size - 1``, then zeros; the mask ``[Lmax + 1, B]`` of the ``L + 1`` real steps)."""
    steps = numbers.shape[0] + 1
    time = torch.arange(steps).unsqueeze(1)
    symbols = torch.cat([numbers, numbers[:1]]).masked_fill(time == lengths, size - 1)
    present = time <= lengths
    inputs = F.one_hot(symbols, size).float() * present.unsqueeze(-1)
    return inputs, present.float()


class ScalarOutputTask(Task):
    """A task scored on one predicted number per sequence: squared-error loss, absolute
    error and exact (rounded) accuracy. The prediction is the sum of the outputs over the
    masked steps. Inputs: ``L`` one-hot numbers from ``0 .. size - 2``, then the end
    symbol; subclasses define ``targets``."""

    level_field = "max_length"
    # The prediction sums the outputs of every step: one number scored at the end.
    scored_along_sequence = False
    primary_metric = "abs_error"
    higher_is_better = False
    metric_names = ("abs_error", "accuracy")
    metric_descriptions: ClassVar[dict[str, str]] = {
        "abs_error": "absolute error of the predicted number",
        "accuracy": "fraction of sequences whose rounded prediction is right",
    }
    output_size = 1

    def __init__(self, config: NumbersConfig) -> None:
        super().__init__(config)
        self.input_size = config.size

    @property
    def min_level(self) -> int:
        return self.config.min_length

    def sample(
        self, batch_size: int, generator: torch.Generator, *, max_level: int, min_level: int
    ) -> Batch:
        lengths = draw_levels(batch_size, min_level, max_level, generator)
        longest = int(lengths.max())
        numbers = torch.randint(0, self.config.size - 1, (longest, batch_size), generator=generator)
        inputs, present = one_hot_sequences(numbers, lengths, self.config.size)
        targets, mask = self.targets(numbers, lengths, present)
        return Batch(inputs, targets, mask)

    def targets(
        self, numbers: torch.Tensor, lengths: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """numbers ``[Lmax, B]``, lengths ``[B]``, present ``[Lmax + 1, B]`` (the real
        steps) -> (targets ``[Lmax + 1, B, 1]``, zero but at one step of each sequence;
        the mask ``[Lmax + 1, B]`` of the steps whose outputs make the prediction)."""
        raise NotImplementedError

    def prediction(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The predicted number of each sequence, ``[B]``: its masked outputs summed."""
        return (outputs[..., 0] * batch.mask).sum(0)

    @staticmethod
    def answer(batch: Batch) -> torch.Tensor:
        """The target number of each sequence, ``[B]`` (targets are 0 but at one step)."""
        return batch.targets[..., 0].sum(0)

    def sequence_losses(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return (self.prediction(outputs, batch) - self.answer(batch)) ** 2

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean squared error of the predicted number."""
        return self.sequence_losses(outputs, batch).mean()

    def output_view(self, logits: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The raw outputs: the task scores them as real numbers."""
        return logits, r"output $y_t$"

    @torch.no_grad()
    def metrics(self, outputs: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """abs_error: mean |prediction - target|; accuracy: fraction of sequences whose
        prediction rounds to the target."""
        error = (self.prediction(outputs, batch) - self.answer(batch)).abs()
        return {"abs_error": error.mean(), "accuracy": (error < 0.5).float().mean()}


@TASKS.register("adding", AddingConfig)
class AddingTask(ScalarOutputTask):
    def targets(
        self, numbers: torch.Tensor, lengths: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum of the numbers at the end step; every real step's output counts."""
        longest, batch_size = numbers.shape
        in_sequence = torch.arange(longest).unsqueeze(1) < lengths
        targets = torch.zeros(longest + 1, batch_size, 1)
        targets[lengths, torch.arange(batch_size), 0] = (numbers * in_sequence).sum(0).float()
        return targets, present
