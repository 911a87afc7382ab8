"""Key-value tasks of Hierarchical Attentive Memory (Andrychowicz & Kurach 2016, section 4).

Every task shows ``n`` items, each a random key of ``key_bits`` bits and a random value of
``value_bits`` bits, then asks for values on "go" steps:

``min``      the value of the item with the smallest key (1 answer; the seed's task)
``sort``     the values in the order of increasing keys (n answers)
``reverse``  the values in reverse order (n answers)
``search``   the items come sorted by key (the paper's binary search); the value of the
             first item whose key is the query (1 answer; the query is the key of a
             random item, shown on the go step)
``merge``    the first ceil(n/2) items and the last floor(n/2) items are each sorted by
             key; the values of the merged, sorted list (n answers)

Keys are drawn with replacement, so they can tie: ties go to the earlier item (stable
order), which a tree can learn as "prefer the left child".

Layout of one sequence (``K`` key bits, ``V`` value bits, ``N`` = the batch's largest n,
``M`` = its largest answer count):

    step                0 .. n-1      n .. N-1    N .. N+m-1     N+m .. N+M-1
    inputs[:K]          item key      0           0 (search: the query key)
    inputs[K:K+V]       item value    0           0              0
    inputs[K+V]         1 (is_data)   0           0              0
    inputs[K+V+1]       0             0           1 (is_go)      0
    targets             -             -           answer values  -

Only the ``m`` go steps are scored. The last two channels are the layout the HAM model
reads: data steps become its leaves, go steps are its memory accesses. The curriculum
parameter is ``n``; sequences with different n share a batch, padded and masked.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from memctl.registry import TASKS
from memctl.tasks.base import Batch, Task, TaskConfig, draw_levels


class KeyValueConfig(TaskConfig):
    key_bits: int = Field(5, ge=1, description="bits per key")
    value_bits: int = Field(5, ge=1, description="bits per value")
    min_n: int = Field(1, ge=1, description="smallest n in a mixed batch")
    n: int = Field(8, ge=1, description="items per sequence: the curriculum parameter")

    ordered_fields = (("min_n", "n"),)


def to_bits(numbers: torch.Tensor, width: int) -> torch.Tensor:
    """Little-endian binary digits: ``[...]`` integers -> ``[..., width]`` floats."""
    return ((numbers.unsqueeze(-1) >> torch.arange(width)) & 1).float()


class KeyValueTask(Task):
    """Shared generator; subclasses choose the keys' layout and which items answer."""

    level_field = "n"
    primary_metric = "accuracy"
    higher_is_better = True
    # Whether the task answers once (min, search) or once per item (sort, reverse, merge).
    single_answer: ClassVar[bool] = False

    def __init__(self, config: KeyValueConfig) -> None:
        super().__init__(config)
        self.key_bits = config.key_bits
        self.value_bits = config.value_bits
        self.input_size = config.key_bits + config.value_bits + 2  # + is_data, is_go
        self.output_size = config.value_bits

    @property
    def min_level(self) -> int:
        return self.config.min_n

    def arrange_keys(self, keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Hook for tasks that constrain the keys' order (merge); ``keys`` ``[N, B]``."""
        return keys

    def answer_items(
        self, keys: torch.Tensor, counts: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Items whose values answer, ``[M, B]``, and the go step's query key ``[B]`` or None.

        ``keys`` is ``[N, B]`` with padding items set to ``2**key_bits`` (above every key).
        """
        raise NotImplementedError

    def sample(
        self, batch_size: int, generator: torch.Generator, *, max_level: int, min_level: int
    ) -> Batch:
        counts = draw_levels(batch_size, min_level, max_level, generator)  # [B]
        most = int(counts.max())
        keys = torch.randint(0, 2**self.key_bits, (most, batch_size), generator=generator)
        values = torch.randint(0, 2, (most, batch_size, self.value_bits), generator=generator)
        present = torch.arange(most).unsqueeze(1) < counts  # [N, B]
        keys = self.arrange_keys(torch.where(present, keys, 2**self.key_bits), counts)
        items, query = self.answer_items(keys, counts, generator)

        answers = counts.new_ones(batch_size) if self.single_answer else counts
        answer_steps = items.shape[0]
        steps = most + answer_steps
        is_answer = torch.arange(answer_steps).unsqueeze(1) < answers  # [M, B]
        width_kv = self.key_bits + self.value_bits

        inputs = torch.zeros(steps, batch_size, self.input_size)
        inputs[:most, :, : self.key_bits] = to_bits(keys, self.key_bits) * present.unsqueeze(-1)
        inputs[:most, :, self.key_bits : width_kv] = values.float() * present.unsqueeze(-1)
        inputs[:most, :, width_kv] = present.float()
        inputs[most:, :, width_kv + 1] = is_answer.float()
        if query is not None:
            inputs[most, :, : self.key_bits] = to_bits(query, self.key_bits)

        batch_index = torch.arange(batch_size).expand_as(items)
        targets = torch.zeros(steps, batch_size, self.value_bits)
        targets[most:] = values[items, batch_index].float() * is_answer.unsqueeze(-1)
        mask = torch.zeros(steps, batch_size)
        mask[most:] = is_answer.float()
        return Batch(inputs, targets, mask)


def stable_key_order(keys: torch.Tensor) -> torch.Tensor:
    """Item indices sorted by key, ties by position: ``[N, B]`` -> ``[N, B]``."""
    return torch.sort(keys, dim=0, stable=True).indices


class MinConfig(KeyValueConfig):
    type: str = "min"


@TASKS.register("min", MinConfig)
class MinTask(KeyValueTask):
    """The seed's task, scored as the seed does: squared error on the value bits (the
    outputs are real numbers, not logits) and exact match after rounding."""

    single_answer = True
    scored_along_sequence = False
    metric_names = ("squared_error", "bit_errors", "accuracy")
    metric_descriptions: ClassVar[dict[str, str]] = {
        "squared_error": "squared error of the value bits, summed per sequence",
        "bit_errors": "wrong bits per sequence after rounding",
        "accuracy": "fraction of sequences all right",
    }

    def answer_items(self, keys, counts, generator):
        return stable_key_order(keys)[:1], None

    def _squared_errors(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return (outputs - batch.targets).pow(2) * batch.mask.unsqueeze(-1)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean squared error per scored output."""
        scored = batch.mask.sum() * outputs.shape[-1]
        return self._squared_errors(outputs, batch).sum() / scored.clamp_min(1)

    def output_view(self, logits: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The raw outputs: the task scores them as real numbers."""
        return logits, r"output $y_t$"

    def sequence_losses(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Summed squared error of each sequence, ``[B]``."""
        return self._squared_errors(outputs, batch).sum(dim=(0, 2))

    @torch.no_grad()
    def metrics(self, outputs: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """squared_error: summed per sequence; bit_errors: wrong bits per sequence after
        rounding; accuracy: fraction of sequences with every bit right."""
        wrong = (torch.round(outputs) != batch.targets) * batch.mask.unsqueeze(-1)
        errors_per_sequence = wrong.sum(dim=(0, 2))
        return {
            "squared_error": self.sequence_losses(outputs, batch).mean(),
            "bit_errors": errors_per_sequence.mean(),
            "accuracy": (errors_per_sequence == 0).float().mean(),
        }


class SortConfig(KeyValueConfig):
    type: str = "sort"


@TASKS.register("sort", SortConfig)
class SortTask(KeyValueTask):
    def answer_items(self, keys, counts, generator):
        return stable_key_order(keys), None


class ReverseConfig(KeyValueConfig):
    type: str = "reverse"


@TASKS.register("reverse", ReverseConfig)
class ReverseTask(KeyValueTask):
    def answer_items(self, keys, counts, generator):
        step = torch.arange(keys.shape[0]).unsqueeze(1)
        return (counts - 1 - step).clamp_min(0), None


class SearchConfig(KeyValueConfig):
    type: str = "search"


@TASKS.register("search", SearchConfig)
class SearchTask(KeyValueTask):
    single_answer = True
    scored_along_sequence = False

    def arrange_keys(self, keys, counts):
        # Sorted keys make the task binary search; padding (2**key_bits) stays last.
        return torch.sort(keys, dim=0).values

    def answer_items(self, keys, counts, generator):
        batch_size = keys.shape[1]
        chosen = (torch.rand(batch_size, generator=generator) * counts).long()
        query = keys[chosen, torch.arange(batch_size)]
        # The first item holding the query key answers (ties go to the earlier item).
        first = (keys == query).float().argmax(dim=0)
        return first.unsqueeze(0), query


class MergeConfig(KeyValueConfig):
    type: str = "merge"


@TASKS.register("merge", MergeConfig)
class MergeTask(KeyValueTask):
    def arrange_keys(self, keys, counts):
        step = torch.arange(keys.shape[0]).unsqueeze(1)
        half = (step >= (counts + 1) // 2).long() + (step >= counts).long()  # 0, 1, 2=padding
        # Sorting by (half, key) keeps each half in its own positions, now sorted.
        order = torch.sort(half * 2 ** (self.key_bits + 1) + keys, dim=0, stable=True).indices
        return keys.gather(0, order)

    def answer_items(self, keys, counts, generator):
        return stable_key_order(keys), None
