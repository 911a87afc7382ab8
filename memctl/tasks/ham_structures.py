"""Data structures of Hierarchical Attentive Memory (Andrychowicz & Kurach 2016, section
4.3): ``stack``, ``queue`` and ``priority_queue`` as sequences of push and pop operations
with the values the pops must return.

A sequence is ``2n`` operations: n pushes of random values of ``value_bits`` bits
(``priority_queue``: each with a random priority of ``key_bits`` bits) and n pops,
interleaved at random but never a pop of an empty structure (at each step, where both
are allowed, a push with probability ``push_probability``). Every pop is scored: the
target is the value that leaves the structure,

``stack``           the last pushed value not yet popped (LIFO)
``queue``           the first pushed value not yet popped (FIFO)
``priority_queue``  the value of the highest priority (``priority: min``: the lowest)
                    not yet popped, ties to the earliest pushed

One operation per step (``N`` the batch's largest n, shorter sequences padded and
masked after their 2n operations):

    inputs[:K]       the pushed priority (priority_queue only; K = key_bits)
    inputs[K:K+V]    the pushed value (V = value_bits)
    inputs[K+V]      1 on a push (is_data)
    inputs[K+V+1]    1 on a pop (is_go)
    targets          on a pop: the popped value

The last two channels are the layout of the other HAM tasks: the pushes before the
first pop are data steps; from the first pop on the HAM model makes one memory access a
step. The curriculum parameter is ``n``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from memctl.registry import TASKS
from memctl.tasks.base import Batch, Task, TaskConfig, draw_levels
from memctl.tasks.ham_tasks import to_bits


class StructureConfig(TaskConfig):
    value_bits: int = Field(5, ge=1, description="bits per value")
    push_probability: float = Field(
        0.5, gt=0, lt=1, description="chance of a push where a push and a pop are both allowed"
    )
    min_n: int = Field(1, ge=1, description="fewest pushes per sequence in a mixed batch")
    n: int = Field(8, ge=1, description="pushes (and pops) per sequence: the curriculum parameter")

    ordered_fields = (("min_n", "n"),)


def operations(
    counts: torch.Tensor, push_probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random valid push/pop orders: ``counts`` ``[B]`` -> is_push, is_pop ``[2N, B]``
    (bool; both False after a sequence's 2n operations). A pop never meets an empty
    structure, and every sequence ends empty."""
    batch_size = counts.shape[0]
    steps = 2 * int(counts.max())
    coins = torch.rand(steps, batch_size, generator=generator) < push_probability
    is_push = torch.zeros(steps, batch_size, dtype=torch.bool)
    pushed = torch.zeros(batch_size, dtype=torch.long)
    size = torch.zeros(batch_size, dtype=torch.long)
    for t in range(steps):
        active = t < 2 * counts
        can_push, can_pop = pushed < counts, size > 0
        is_push[t] = active & can_push & (coins[t] | ~can_pop)
        pushed += is_push[t]
        size += is_push[t].long() - (active & ~is_push[t]).long()
    is_pop = (torch.arange(steps).unsqueeze(1) < 2 * counts) & ~is_push
    return is_push, is_pop


class StructureTask(Task):
    """Shared generator; subclasses say which pushed item each pop returns."""

    level_field = "n"
    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(self, config: StructureConfig) -> None:
        super().__init__(config)
        self.key_bits = getattr(config, "key_bits", 0)
        self.input_size = self.key_bits + config.value_bits + 2  # + is_push, is_pop
        self.output_size = config.value_bits

    @property
    def min_level(self) -> int:
        return self.config.min_n

    def popped_items(
        self, is_push: torch.Tensor, is_pop: torch.Tensor, keys: torch.Tensor
    ) -> torch.Tensor:
        """The push index (0 = first pushed) of the item each step's pop returns,
        ``[2N, B]`` (0 where no pop); keys: the items' priorities ``[N, B]``."""
        raise NotImplementedError

    def sample(
        self, batch_size: int, generator: torch.Generator, *, max_level: int, min_level: int
    ) -> Batch:
        counts = draw_levels(batch_size, min_level, max_level, generator)  # [B]
        most = int(counts.max())
        value_bits = self.config.value_bits
        values = torch.randint(0, 2, (most, batch_size, value_bits), generator=generator)
        keys = torch.randint(0, 2 ** max(self.key_bits, 1), (most, batch_size), generator=generator)
        is_push, is_pop = operations(counts, self.config.push_probability, generator)
        # The push index of the item pushed at each step: pushes so far, minus this one.
        push_index = (is_push.long().cumsum(0) - 1).clamp_min(0)  # [2N, B]
        popped = self.popped_items(is_push, is_pop, keys)
        batch_index = torch.arange(batch_size).expand_as(push_index)

        steps = 2 * most
        inputs = torch.zeros(steps, batch_size, self.input_size)
        pushes = is_push.unsqueeze(-1).float()
        if self.key_bits:
            inputs[..., : self.key_bits] = to_bits(keys[push_index, batch_index], self.key_bits)
            inputs[..., : self.key_bits] *= pushes
        width = self.key_bits + value_bits
        inputs[..., self.key_bits : width] = values[push_index, batch_index].float() * pushes
        inputs[..., width] = is_push.float()
        inputs[..., width + 1] = is_pop.float()
        targets = values[popped, batch_index].float() * is_pop.unsqueeze(-1)
        return Batch(inputs, targets, is_pop.float())


class StackConfig(StructureConfig):
    type: str = "stack"


@TASKS.register("stack", StackConfig)
class StackTask(StructureTask):
    def popped_items(self, is_push, is_pop, keys):
        steps, batch_size = is_push.shape
        stack = torch.zeros(batch_size, steps, dtype=torch.long)  # push indices, bottom first
        top = torch.zeros(batch_size, dtype=torch.long)
        pushed = torch.zeros(batch_size, dtype=torch.long)
        popped = torch.zeros(steps, batch_size, dtype=torch.long)
        batch_index = torch.arange(batch_size)
        for t in range(steps):
            stack[batch_index, top] = torch.where(is_push[t], pushed, stack[batch_index, top])
            top = top + is_push[t].long() - is_pop[t].long()
            pushed = pushed + is_push[t].long()
            popped[t] = torch.where(is_pop[t], stack[batch_index, top], 0)
        return popped


class QueueConfig(StructureConfig):
    type: str = "queue"


@TASKS.register("queue", QueueConfig)
class QueueTask(StructureTask):
    def popped_items(self, is_push, is_pop, keys):
        # Items leave in the order they came: the k-th pop returns the k-th push.
        return torch.where(is_pop, is_pop.long().cumsum(0) - 1, 0)


class PriorityQueueConfig(StructureConfig):
    type: str = "priority_queue"
    key_bits: int = Field(5, ge=1, description="bits per priority")
    priority: Literal["max", "min"] = Field(
        "max", description="which priority a pop returns: the highest (max) or the lowest"
    )


@TASKS.register("priority_queue", PriorityQueueConfig)
class PriorityQueueTask(StructureTask):
    def popped_items(self, is_push, is_pop, keys):
        steps, batch_size = is_push.shape
        items = keys.shape[0]
        # One score per item: its priority first, then the earlier push; higher pops first.
        priority = keys if self.config.priority == "max" else 2**self.key_bits - 1 - keys
        score = (priority * (items + 1) + (items - torch.arange(items).unsqueeze(1))).T  # [B, N]
        waiting = torch.zeros(batch_size, items, dtype=torch.bool)
        pushed = torch.zeros(batch_size, dtype=torch.long)
        popped = torch.zeros(steps, batch_size, dtype=torch.long)
        batch_index = torch.arange(batch_size)
        for t in range(steps):
            slot = pushed.clamp(max=items - 1)
            waiting[batch_index, slot] |= is_push[t]
            pushed = pushed + is_push[t].long()
            best = torch.where(waiting, score, -1).argmax(dim=1)
            popped[t] = torch.where(is_pop[t], best, 0)
            waiting[batch_index, best] &= ~is_pop[t]
        return popped
