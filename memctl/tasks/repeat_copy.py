"""Repeat copy task (Graves, Wayne & Danihelka 2014, section 4.2).

A sequence of random binary vectors, then one step that carries the delimiter on its own
channel and the number of repeats on another, then the network must output the sequence
that many times and finally raise an end marker on an extra output channel.

The repeat count is normalised to mean 0 and variance 1 over the training range
``[min_repeats, max_repeats]`` (the discrete uniform distribution the counts are drawn
from), as the paper does; counts outside that range at evaluation keep the same scale.

Layout of one sequence of ``L`` vectors and ``n`` repeats (``W`` = width):

    step          0 .. L-1     L                      L+1 .. L+nL     L+nL+1
    inputs[:W]    the vectors  0                      0               0
    inputs[W]     0            1 (delimiter)          0               0
    inputs[W+1]   0            (n - mean) / std       0               0
    targets[:W]   -            -                      vector (t-L-1)%L 0
    targets[W]    -            -                      0               1 (end marker)

Every output step (the last two column groups) is scored. Sequences of different lengths
and repeat counts share a batch, padded at the end and masked out.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from memctl.registry import TASKS
from memctl.tasks.base import Batch, Task, TaskConfig, draw_levels


class RepeatCopyConfig(TaskConfig):
    type: str = "repeat_copy"
    width: int = Field(8, ge=1, description="bits per vector")
    min_length: int = Field(1, ge=1)
    max_length: int = Field(10, ge=1, description="curriculum parameter")
    min_repeats: int = Field(1, ge=1)
    max_repeats: int = Field(10, ge=1, description="also fixes the count's normalisation")

    ordered_fields = (("min_length", "max_length"), ("min_repeats", "max_repeats"))


def repeat_normalisation(min_repeats: int, max_repeats: int) -> tuple[float, float]:
    """Mean and standard deviation of a count uniform over ``[min_repeats, max_repeats]``.

    For a discrete uniform over ``k`` consecutive integers the variance is
    ``(k^2 - 1) / 12``; a single possible count (variance 0) keeps scale 1.
    """
    count = max_repeats - min_repeats + 1
    mean = (min_repeats + max_repeats) / 2
    variance = (count * count - 1) / 12
    return mean, math.sqrt(variance) if variance > 0 else 1.0


@TASKS.register("repeat_copy", RepeatCopyConfig)
class RepeatCopyTask(Task):
    level_field = "max_length"

    def __init__(self, config: RepeatCopyConfig) -> None:
        super().__init__(config)
        self.width = config.width
        self.input_size = config.width + 2  # + delimiter, + repeat count
        self.output_size = config.width + 1  # + end marker
        self.repeat_mean, self.repeat_std = repeat_normalisation(
            config.min_repeats, config.max_repeats
        )

    @property
    def min_level(self) -> int:
        return self.config.min_length

    def normalise_repeats(self, repeats: torch.Tensor) -> torch.Tensor:
        """What the repeat-count channel carries for ``repeats`` copies."""
        return (repeats.float() - self.repeat_mean) / self.repeat_std

    def sample(
        self, batch_size: int, generator: torch.Generator, *, max_level: int, min_level: int
    ) -> Batch:
        config = self.config
        lengths = draw_levels(batch_size, min_level, max_level, generator)
        repeats = torch.randint(
            config.min_repeats, config.max_repeats + 1, (batch_size,), generator=generator
        )
        longest = int(lengths.max())
        end_step = lengths + lengths * repeats + 1  # [B]: the end marker's step
        steps = int(end_step.max()) + 1
        bits = torch.randint(0, 2, (longest, batch_size, self.width), generator=generator)
        bits = bits.float()
        time = torch.arange(steps).unsqueeze(1)  # [T, 1]
        in_sequence = time < lengths  # [T, B]
        is_delimiter = time == lengths
        in_copies = (time > lengths) & (time < end_step)
        is_end = time == end_step

        inputs = torch.zeros(steps, batch_size, self.input_size)
        inputs[:longest, :, : self.width] = bits * in_sequence[:longest].unsqueeze(-1)
        inputs[:, :, self.width] = is_delimiter.float()
        inputs[:, :, self.width + 1] = is_delimiter * self.normalise_repeats(repeats)

        # Output step t of a copy reproduces input step (t - L - 1) mod L.
        source = (time - lengths - 1).clamp_min(0) % lengths  # [T, B]
        batch_index = torch.arange(batch_size).expand(steps, batch_size)
        targets = torch.zeros(steps, batch_size, self.output_size)
        targets[:, :, : self.width] = bits[source, batch_index] * in_copies.unsqueeze(-1)
        targets[:, :, self.width] = is_end.float()
        return Batch(inputs, targets, (in_copies | is_end).float())
