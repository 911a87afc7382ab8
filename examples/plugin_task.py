"""Running parity: a task that memctl does not ship, registered by a plugin.

The input is a string of random bits, one per time step; at every step the target is
the parity (XOR) of the bits so far. A network must carry one bit of state and flip it
on every 1: easy to state, and hard for a feed-forward reading of a window, because the
answer depends on every earlier bit. The curriculum parameter is the longest string.

Train it with ``memctl --plugin examples/plugin_task.py train examples/plugin_task.yaml``.
"""

from __future__ import annotations

import torch
from pydantic import Field

import memctl


class ParityConfig(memctl.TaskConfig):
    type: str = "parity"
    min_length: int = Field(1, ge=1)
    max_length: int = Field(16, ge=1, description="curriculum parameter: the longest string")

    ordered_fields = (("min_length", "max_length"),)


@memctl.register_task("parity", ParityConfig)
class ParityTask(memctl.Task):
    """Inputs ``[T, B, 1]`` (the bits), targets ``[T, B, 1]`` (the running parity), every
    step of a string scored and its padding not. The loss and metrics are memctl's
    defaults for binary outputs: cross-entropy, wrong bits and fully right strings."""

    level_field = "max_length"
    input_size = 1
    output_size = 1

    @property
    def min_level(self) -> int:
        return self.config.min_length

    def sample(
        self, batch_size: int, generator: torch.Generator, *, max_level: int, min_level: int
    ) -> memctl.Batch:
        lengths = torch.randint(min_level, max_level + 1, (batch_size,), generator=generator)
        longest = int(lengths.max())
        in_string = torch.arange(longest).unsqueeze(1) < lengths  # [T, B]
        bits = torch.randint(0, 2, (longest, batch_size), generator=generator) * in_string
        parity = torch.cumsum(bits, dim=0) % 2
        return memctl.Batch(
            inputs=bits.float().unsqueeze(-1),
            targets=(parity * in_string).float().unsqueeze(-1),
            mask=in_string.float(),
        )
