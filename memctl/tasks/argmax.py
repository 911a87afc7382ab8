"""Argmax, the argmax task of pytorch-dnc (ixaxaar/pytorch-dnc, ``tasks/argmax_task.py``).

The inputs are those of the adding task (``L`` numbers from ``0 .. size - 2`` one-hot,
then the end symbol ``size - 1``); at the end step the model outputs the position
(``0 .. L - 1``) of the largest number, the last one where several are largest (the
seed's ``<=``). Loss: the squared error of that one output, as the seed's; accuracy:
the fraction of sequences whose output rounds to the right position.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from memctl.registry import TASKS
from memctl.tasks.adding import ScalarOutputTask, one_hot_sequences
from memctl.tasks.base import Batch, TaskConfig, draw_levels


class ArgmaxConfig(TaskConfig):
    type: str = "argmax"
    size: int = Field(6, ge=2, description="one-hot width: numbers 0 .. size-2, then the end")
    min_length: int = Field(2, ge=1)
    max_length: int = Field(20, ge=1, description="curriculum parameter")

    @model_validator(mode="after")
    def _lengths_ordered(self) -> ArgmaxConfig:
        if self.min_length > self.max_length:
            raise ValueError(
                f"min_length ({self.min_length}) must not exceed max_length ({self.max_length})"
            )
        return self


@TASKS.register("argmax", ArgmaxConfig)
class ArgmaxTask(ScalarOutputTask):
    level_field = "max_length"

    def __init__(self, config: ArgmaxConfig) -> None:
        super().__init__(config)
        self.input_size = config.size

    @property
    def min_level(self) -> int:
        return self.config.min_length

    def sample(
        self, batch_size: int, max_level: int, generator: torch.Generator, min_level: int
    ) -> Batch:
        lengths = draw_levels(batch_size, min_level, max_level, generator)
        longest = int(lengths.max())
        numbers = torch.randint(0, self.config.size - 1, (longest, batch_size), generator=generator)
        inputs, _ = one_hot_sequences(numbers, lengths, self.config.size)
        position = torch.arange(longest).unsqueeze(1)  # [L, 1]
        # Padding gets -1, below every number; ties go to the last position by ranking
        # each (number, position) pair as number * longest + position.
        ranked = torch.where(position < lengths, numbers * longest + position, -1)
        argmax = ranked.argmax(0)  # [B]
        batch_index = torch.arange(batch_size)
        targets = torch.zeros(longest + 1, batch_size, 1)
        targets[lengths, batch_index, 0] = argmax.float()
        mask = torch.zeros(longest + 1, batch_size)
        mask[lengths, batch_index] = 1.0
        return Batch(inputs, targets, mask)

    def prediction(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The output at the end step."""
        return (outputs[..., 0] * batch.mask).sum(0)
