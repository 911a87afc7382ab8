"""Associative recall task (Graves, Wayne & Danihelka 2014, section 4.3).

An item is a short sequence of random binary vectors (3 vectors of 6 bits in the paper).
Each item is preceded by an item delimiter on its own channel. After ``k`` items the
network sees a query item, one of the first ``k - 1``, between two query delimiters on a
second channel, and must then output the item that followed the query in the list.

Layout of one sequence of ``k`` items of ``V`` vectors (``W`` = width, ``S = V + 1``):

    step          i*S           i*S+1 .. i*S+V    kS        kS+1 .. kS+V   kS+V+1    kS+V+2 ..
    inputs[:W]    0             item i            0         query item     0         0
    inputs[W]     1 (item)      0                 0         0              0         0
    inputs[W+1]   0             0                 1 (query) 0              1 (query) 0
    targets       -             -                 -         -              -         next item

Only the ``V`` answer steps are scored. The curriculum parameter is the number of items;
sequences with different numbers of items share a batch, padded at the end and masked.
"""

from __future__ import annotations

import torch
from pydantic import Field

from memctl.registry import TASKS
from memctl.tasks.base import Batch, Task, TaskConfig, draw_levels


class AssociativeRecallConfig(TaskConfig):
    type: str = "associative_recall"
    width: int = Field(6, ge=1, description="bits per vector")
    item_length: int = Field(3, ge=1, description="vectors per item")
    min_items: int = Field(2, ge=2, description="a query needs an item after it")
    max_items: int = Field(6, ge=2, description="curriculum parameter")

    ordered_fields = (("min_items", "max_items"),)


@TASKS.register("associative_recall", AssociativeRecallConfig)
class AssociativeRecallTask(Task):
    level_field = "max_items"

    def __init__(self, config: AssociativeRecallConfig) -> None:
        super().__init__(config)
        self.width = config.width
        self.item_length = config.item_length
        self.input_size = config.width + 2  # + item delimiter, + query delimiter
        self.output_size = config.width

    @property
    def min_level(self) -> int:
        return self.config.min_items

    def sample(
        self, batch_size: int, generator: torch.Generator, *, max_level: int, min_level: int
    ) -> Batch:
        vectors, stride = self.item_length, self.item_length + 1
        if min_level < 2:
            raise ValueError(f"associative recall needs at least 2 items, got {min_level}")
        counts = draw_levels(batch_size, min_level, max_level, generator)
        most = int(counts.max())
        items = torch.randint(
            0, 2, (most, batch_size, vectors, self.width), generator=generator
        ).float()
        # The query is uniform over the items that have a successor.
        query = (torch.rand(batch_size, generator=generator) * (counts - 1)).long()
        query_start = counts * stride  # [B]: the first query delimiter's step
        answer_start = query_start + vectors + 2
        steps = int(answer_start.max()) + vectors

        time = torch.arange(steps).unsqueeze(1)  # [T, 1]
        batch_index = torch.arange(batch_size).expand(steps, batch_size)
        in_items = time < query_start  # [T, B]
        item_index = (time // stride).clamp_max(most - 1).expand(steps, batch_size)
        offset = time % stride
        is_item_delimiter = in_items & (offset == 0)
        is_item_vector = in_items & (offset > 0)
        item_bits = items[item_index, batch_index, (offset - 1).clamp_min(0)]

        query_offset = time - query_start  # [T, B]
        is_query_delimiter = (query_offset == 0) | (query_offset == vectors + 1)
        is_query_vector = (query_offset > 0) & (query_offset <= vectors)
        query_vector = (query_offset - 1).clamp(0, vectors - 1)
        query_bits = items[query.expand(steps, batch_size), batch_index, query_vector]

        answer_offset = time - answer_start
        in_answer = (answer_offset >= 0) & (answer_offset < vectors)
        answer_vector = answer_offset.clamp(0, vectors - 1)
        answer_bits = items[(query + 1).expand(steps, batch_size), batch_index, answer_vector]

        inputs = torch.zeros(steps, batch_size, self.input_size)
        inputs[:, :, : self.width] = item_bits * is_item_vector.unsqueeze(
            -1
        ) + query_bits * is_query_vector.unsqueeze(-1)
        inputs[:, :, self.width] = is_item_delimiter.float()
        inputs[:, :, self.width + 1] = is_query_delimiter.float()
        targets = answer_bits * in_answer.unsqueeze(-1)
        return Batch(inputs, targets, in_answer.float())
