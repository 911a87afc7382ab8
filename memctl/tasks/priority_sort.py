"""Priority sort task (Graves, Wayne & Danihelka 2014, section 4.5).

A sequence of random binary vectors, each with a scalar priority drawn from U[-1, 1] on
its own input channel, then a delimiter. The network must output the highest-priority
vectors in order of decreasing priority: the paper's 16 of 20, here the
``round(keep_fraction * n)`` highest of ``n`` (0.8: 16 of 20), so shorter or longer
sequences from the curriculum or at evaluation keep the same proportion.

Layout of one sequence of ``n`` vectors and ``k`` outputs (``W`` = width):

    step          0 .. n-1         n               n+1 .. n+k
    inputs[:W]    the vectors      0               0
    inputs[W]     their priority   0               0
    inputs[W+1]   0                1 (delimiter)   0
    targets       -                -               the j-th highest-priority vector

Only the ``k`` output steps are scored; sequences with different ``n`` share a batch,
padded at the end and masked.
"""

from __future__ import annotations

import torch
from pydantic import Field

from memctl.registry import TASKS
from memctl.tasks.base import Batch, Task, TaskConfig, draw_levels


class PrioritySortConfig(TaskConfig):
    type: str = "priority_sort"
    width: int = Field(8, ge=1, description="bits per vector")
    max_items: int = Field(20, ge=1, description="vectors per sequence; curriculum parameter")
    min_items: int | None = Field(None, ge=1, description="default: max_items (all equal)")
    keep_fraction: float = Field(0.8, gt=0, le=1, description="share of vectors output")

    ordered_fields = (("min_items", "max_items"),)


@TASKS.register("priority_sort", PrioritySortConfig)
class PrioritySortTask(Task):
    level_field = "max_items"

    def __init__(self, config: PrioritySortConfig) -> None:
        super().__init__(config)
        self.width = config.width
        self.input_size = config.width + 2  # + priority, + delimiter
        self.output_size = config.width

    @property
    def min_level(self) -> int:
        config = self.config
        return config.max_items if config.min_items is None else config.min_items

    def output_count(self, items: torch.Tensor) -> torch.Tensor:
        """How many vectors a sequence of ``items`` vectors outputs (at least one)."""
        return torch.floor(items * self.config.keep_fraction + 0.5).long().clamp_min(1)

    def sample(
        self, batch_size: int, generator: torch.Generator, *, max_level: int, min_level: int
    ) -> Batch:
        counts = draw_levels(batch_size, min_level, max_level, generator)
        outputs = self.output_count(counts)
        most = int(counts.max())
        steps = int((counts + outputs).max()) + 1
        bits = torch.randint(0, 2, (most, batch_size, self.width), generator=generator).float()
        priority = torch.rand(most, batch_size, generator=generator) * 2 - 1

        time = torch.arange(steps).unsqueeze(1)  # [T, 1]
        in_sequence = time < counts  # [T, B]
        present = in_sequence[:most]
        # Padding vectors sort last; stable order keeps the result deterministic.
        ranked = torch.where(present, priority, torch.full_like(priority, -2.0))
        order = torch.argsort(ranked, dim=0, descending=True, stable=True)  # [N, B]

        output_index = time - counts - 1  # [T, B]: rank of the vector output at step t
        in_output = (output_index >= 0) & (output_index < outputs)
        source = order.gather(0, output_index.clamp(0, most - 1))  # [T, B]
        batch_index = torch.arange(batch_size).expand(steps, batch_size)

        inputs = torch.zeros(steps, batch_size, self.input_size)
        inputs[:most, :, : self.width] = bits * present.unsqueeze(-1)
        inputs[:most, :, self.width] = priority * present
        inputs[:, :, self.width + 1] = (time == counts).float()
        targets = bits[source, batch_index] * in_output.unsqueeze(-1)
        return Batch(inputs, targets, in_output.float())
