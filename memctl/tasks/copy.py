"""Copy task (Graves, Wayne & Danihelka 2014, section 4.1).

A sequence of random binary vectors, then a delimiter on its own channel, then blank
inputs during which the network must reproduce the sequence. Only the recall phase is
scored. Sequences of different lengths share a batch: each is padded at the end and
its padding is masked out.
"""

from __future__ import annotations

import torch
from pydantic import Field

from memctl.registry import TASKS
from memctl.tasks.base import Batch, Task, TaskConfig, draw_levels


class CopyConfig(TaskConfig):
    type: str = "copy"
    width: int = Field(8, ge=1, description="bits per vector")
    min_length: int = Field(1, ge=1)
    max_length: int = Field(20, ge=1, description="curriculum parameter")

    ordered_fields = (("min_length", "max_length"),)


@TASKS.register("copy", CopyConfig)
class CopyTask(Task):
    level_field = "max_length"

    def __init__(self, config: CopyConfig) -> None:
        super().__init__(config)
        self.width = config.width
        self.input_size = config.width + 1  # + delimiter channel
        self.output_size = config.width

    @property
    def min_level(self) -> int:
        return self.config.min_length

    def sample(
        self, batch_size: int, generator: torch.Generator, *, max_level: int, min_level: int
    ) -> Batch:
        lengths = draw_levels(batch_size, min_level, max_level, generator)
        longest = int(lengths.max())
        steps = 2 * longest + 1
        bits = torch.randint(0, 2, (longest, batch_size, self.width), generator=generator)
        bits = bits.float()
        time = torch.arange(steps).unsqueeze(1)  # [T, 1]
        in_sequence = time < lengths  # [T, B]
        is_delimiter = time == lengths
        in_recall = (time > lengths) & (time <= 2 * lengths)

        inputs = torch.zeros(steps, batch_size, self.input_size)
        inputs[:longest, :, : self.width] = bits * in_sequence[:longest].unsqueeze(-1)
        inputs[:, :, self.width] = is_delimiter.float()

        # Recall step t reproduces input step t - length - 1.
        source = (time - lengths - 1).clamp(0, longest - 1)  # [T, B]
        batch_index = torch.arange(batch_size).expand(steps, batch_size)
        targets = bits[source, batch_index] * in_recall.unsqueeze(-1)
        return Batch(inputs, targets, in_recall.float())
