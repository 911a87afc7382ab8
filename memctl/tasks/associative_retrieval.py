"""Associative retrieval (Ba, Hinton, Mnih, Leibo & Ionescu 2016, section 4.1).

K key/value pairs, keys distinct letters and values digits, then ``??`` and a query key;
the target is the value paired with the query key::

    c9k8j3f1??c -> 9

Each character is a one-hot vector over 37 symbols (26 letters, 10 digits, ``?``). A
sequence with K pairs has 2K + 3 steps and one scored step, its last, where the model
answers with logits over the 10 digits. Sequences with fewer pairs than the longest in
the batch are padded at the end with blank inputs, which are never scored.

The curriculum parameter is K (``pairs``). Data is drawn on the fly from the generator;
the trainer's held-out set is ``eval.batches x eval.batch_size`` sequences drawn from its
own seed (``eval.seed``), as the paper keeps separate test data.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from memctl.registry import TASKS
from memctl.tasks.base import Batch, Task, TaskConfig, draw_levels

LETTERS = 26
DIGITS = 10
QUESTION_MARK = LETTERS + DIGITS  # symbol index of "?"
VOCABULARY = LETTERS + DIGITS + 1


class AssociativeRetrievalConfig(TaskConfig):
    type: str = "associative_retrieval"
    pairs: int = Field(4, ge=1, le=LETTERS, description="K, the curriculum parameter")
    min_pairs: int = Field(1, ge=1, le=LETTERS)

    ordered_fields = (("min_pairs", "pairs"),)


def decode(inputs: torch.Tensor) -> list[str]:
    """One-hot inputs ``[T, B, 37]`` -> one string per sequence (padding dropped)."""
    symbols = "abcdefghijklmnopqrstuvwxyz0123456789?"
    present = inputs.sum(-1) > 0
    index = inputs.argmax(-1)
    return [
        "".join(symbols[int(i)] for i, p in zip(index[:, b], present[:, b], strict=True) if p)
        for b in range(inputs.shape[1])
    ]


@TASKS.register("associative_retrieval", AssociativeRetrievalConfig)
class AssociativeRetrievalTask(Task):
    level_field = "pairs"
    scored_along_sequence = False
    primary_metric = "error"
    higher_is_better = False
    metric_names = ("cost_bits", "error", "accuracy")
    metric_descriptions: ClassVar[dict[str, str]] = {
        "cost_bits": "cross-entropy of the answer, bits per sequence",
        "error": "fraction of sequences answered wrong",
        "accuracy": "fraction of sequences answered right",
    }

    def __init__(self, config: AssociativeRetrievalConfig) -> None:
        super().__init__(config)
        self.input_size = VOCABULARY
        self.output_size = DIGITS

    @property
    def min_level(self) -> int:
        return self.config.min_pairs

    def sample(
        self, batch_size: int, generator: torch.Generator, *, max_level: int, min_level: int
    ) -> Batch:
        pairs = draw_levels(batch_size, min_level, max_level, generator)  # [B]
        most = int(pairs.max())
        steps = 2 * most + 3
        # Distinct keys: the first `most` letters of a random permutation per sequence.
        keys = torch.rand(batch_size, LETTERS, generator=generator).argsort(dim=1)[:, :most]
        values = torch.randint(0, DIGITS, (batch_size, most), generator=generator)
        query = (torch.rand(batch_size, generator=generator) * pairs).long()
        query = torch.minimum(query, pairs - 1)  # guards against float rounding up to K
        batch_index = torch.arange(batch_size)

        # Symbols [B, T]: k1 v1 ... kK vK ? ? q, then padding (-1).
        symbols = torch.full((batch_size, steps), -1, dtype=torch.long)
        symbols[:, 0 : 2 * most : 2] = keys
        symbols[:, 1 : 2 * most : 2] = values + LETTERS
        pair_step = torch.arange(2 * most).unsqueeze(0)  # [1, 2K]
        symbols[:, : 2 * most] = symbols[:, : 2 * most].masked_fill(
            pair_step >= 2 * pairs.unsqueeze(1), -1
        )
        symbols[batch_index, 2 * pairs] = QUESTION_MARK
        symbols[batch_index, 2 * pairs + 1] = QUESTION_MARK
        symbols[batch_index, 2 * pairs + 2] = keys[batch_index, query]

        present = symbols >= 0
        inputs = F.one_hot(symbols.clamp_min(0), VOCABULARY).float() * present.unsqueeze(-1)
        answer_step = 2 * pairs + 2  # [B]
        mask = torch.zeros(batch_size, steps)
        mask[batch_index, answer_step] = 1.0
        targets = torch.zeros(batch_size, steps, DIGITS)
        targets[batch_index, answer_step] = F.one_hot(values[batch_index, query], DIGITS).float()
        return Batch(inputs.transpose(0, 1), targets.transpose(0, 1), mask.transpose(0, 1))

    def _cross_entropy(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Cross-entropy in nats at every step, masked, ``[T, B]``."""
        log_probs = F.log_softmax(outputs, dim=-1)
        return -(log_probs * batch.targets).sum(-1) * batch.mask

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean softmax cross-entropy over the answered steps."""
        return self._cross_entropy(outputs, batch).sum() / batch.mask.sum().clamp_min(1)

    def output_view(self, logits: torch.Tensor) -> tuple[torch.Tensor, str]:
        """A softmax over the digits."""
        return torch.softmax(logits, dim=-1), r"output softmax$(y_t)$"

    def sequence_losses(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Cross-entropy of each sequence's answer, ``[B]``."""
        return self._cross_entropy(outputs, batch).sum(0)

    @torch.no_grad()
    def metrics(self, outputs: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-sequence means over the batch.

        cost_bits: cross-entropy of the answer in bits
        error:     fraction of sequences whose most likely digit is wrong
        accuracy:  1 - error
        """
        batch_size = outputs.shape[1]
        cost_bits = self._cross_entropy(outputs, batch).sum() / batch_size / math.log(2)
        predicted = outputs.argmax(-1)
        wanted = batch.targets.argmax(-1)
        wrong = ((predicted != wanted).float() * batch.mask).sum(0)  # [B]
        error = wrong.mean()
        return {"cost_bits": cost_bits, "error": error, "accuracy": 1 - error}
