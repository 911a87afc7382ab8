"""Argmax, the argmax task of pytorch-dnc (ixaxaar/pytorch-dnc, ``tasks/argmax_task.py``).

The inputs are those of the adding task (``L`` numbers from ``0 .. size - 2`` one-hot,
then the end symbol ``size - 1``); at the end step the model outputs the position
(``0 .. L - 1``) of the largest number, the last one where several are largest (the
seed's ``<=``). Loss: the squared error of that one output, as the seed's; accuracy:
the fraction of sequences whose output rounds to the right position.
"""

from __future__ import annotations

import torch
from pydantic import Field

from memctl.registry import TASKS
from memctl.tasks.adding import NumbersConfig, ScalarOutputTask


class ArgmaxConfig(NumbersConfig):
    type: str = "argmax"
    max_length: int = Field(20, ge=1, description="curriculum parameter")


@TASKS.register("argmax", ArgmaxConfig)
class ArgmaxTask(ScalarOutputTask):
    def targets(
        self, numbers: torch.Tensor, lengths: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The position of the largest number, at the end step, the only step scored."""
        longest, batch_size = numbers.shape
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
        return targets, mask
