"""Dynamic N-grams task (Graves, Wayne & Danihelka 2014, section 4.4).

Each sequence has its own N-gram model over bits: for every context of the previous
``N - 1`` bits (32 contexts for the paper's 6-grams) a probability that the next bit is 1,
drawn from Beta(1/2, 1/2). The network reads the bits one at a time and predicts the next.

Beta(1/2, 1/2) is the arcsine distribution, whose inverse CDF is ``sin^2(pi u / 2)``, so
the table is drawn from ``torch.rand`` with the batch's generator. The first ``N - 1`` bits
of a sequence have no full context and are uniform; a prediction is scored once its
context is complete, so a sequence of ``L`` bits scores ``L - N + 1`` predictions.

Layout (time first, one input and one output channel): input step ``t`` is bit ``x_t``,
output step ``t`` predicts ``x_{t+1}``, for ``t = 0 .. L - 2``; scored for ``t >= N - 2``.

The Bayes-optimal predictor, which knows the prior but not the table (paper section 4.4):

    P(x_{t+1} = 1 | context c, x_0..x_t) = (N1 + 1/2) / (N1 + N0 + 1)

where ``N1`` and ``N0`` count the ones and zeros that followed ``c`` earlier in the same
sequence. Its cost on the batch's own sequences is reported as ``bayes_cost_bits``, the
floor under the model's ``cost_bits``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from memctl.registry import TASKS
from memctl.tasks.base import Batch, Task, TaskConfig, draw_levels


class NGramsConfig(TaskConfig):
    type: str = "ngrams"
    order: int = Field(6, ge=2, le=16, description="N: a bit depends on the N - 1 before it")
    length: int = Field(200, ge=3, description="bits per sequence; curriculum parameter")
    min_length: int | None = Field(None, ge=3, description="default: length (all equal)")

    @model_validator(mode="after")
    def _lengths_valid(self) -> NGramsConfig:
        shortest = self.length if self.min_length is None else self.min_length
        if shortest > self.length:
            raise ValueError(f"min_length ({shortest}) must not exceed length ({self.length})")
        if shortest < self.order:
            raise ValueError(
                f"sequences of {shortest} bits score no prediction of order {self.order}; "
                f"lengths must be at least {self.order}"
            )
        return self


def context_indices(bits: torch.Tensor, context_bits: int) -> torch.Tensor:
    """Index of the context ending at each step: ``sum_j x_{t-j} 2^j`` for ``j < context_bits``.

    bits: ``[T, B]`` of 0/1. Returns ``[T, B]`` long; steps ``t < context_bits - 1`` see
    zeros before the sequence and are never scored.
    """
    padded = F.pad(bits.long(), (0, 0, context_bits - 1, 0))  # [T + c - 1, B]
    steps = bits.shape[0]
    index = torch.zeros_like(bits, dtype=torch.long)
    for lag in range(context_bits):  # a handful of shifts, not a loop over data
        index += padded[context_bits - 1 - lag : context_bits - 1 - lag + steps] << lag
    return index


def bayes_predictions(
    bits: torch.Tensor, next_bits: torch.Tensor, scored: torch.Tensor, context_bits: int
) -> torch.Tensor:
    """Bayes-optimal P(next bit = 1) at every step, ``[T, B]`` (paper section 4.4).

    bits:      ``[T, B]`` input bits ``x_t``
    next_bits: ``[T, B]`` the bits to predict, ``x_{t+1}``
    scored:    ``[T, B]`` 1 where the context is complete; only these steps are counted

    ``N1`` and ``N0`` at step ``t`` count the scored steps ``s < t`` with the same context
    whose next bit was 1 and 0: an exclusive cumulative sum over one-hot contexts.
    """
    context = context_indices(bits, context_bits)
    one_hot = F.one_hot(context, 2**context_bits).to(next_bits.dtype)
    one_hot = one_hot * scored.unsqueeze(-1)  # [T, B, C]
    seen = one_hot.cumsum(0) - one_hot
    ones = (one_hot * next_bits.unsqueeze(-1)).cumsum(0) - one_hot * next_bits.unsqueeze(-1)
    seen_here = seen.gather(-1, context.unsqueeze(-1)).squeeze(-1)
    ones_here = ones.gather(-1, context.unsqueeze(-1)).squeeze(-1)
    return (ones_here + 0.5) / (seen_here + 1)


def draw_tables(batch_size: int, contexts: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sequence N-gram tables ``[B, contexts]``, each entry from Beta(1/2, 1/2).

    Inverse-CDF sampling of the arcsine distribution: ``p = sin^2(pi u / 2)``, ``u ~ U[0, 1)``.
    """
    uniform = torch.rand(batch_size, contexts, generator=generator)
    return torch.sin(0.5 * math.pi * uniform) ** 2


@TASKS.register("ngrams", NGramsConfig)
class NGramsTask(Task):
    level_field = "length"
    primary_metric = "cost_bits"
    metric_names = ("cost_bits", "bayes_cost_bits", "excess_cost_bits")
    metric_descriptions: ClassVar[dict[str, str]] = {
        "cost_bits": "cross-entropy, bits per sequence",
        "bayes_cost_bits": "Bayes-optimal predictor's cross-entropy, bits per sequence",
        "excess_cost_bits": "cross-entropy above the Bayes-optimal, bits per sequence",
    }

    input_size = 1
    output_size = 1

    def __init__(self, config: NGramsConfig) -> None:
        super().__init__(config)
        self.context_bits = config.order - 1

    @property
    def min_level(self) -> int:
        return self.config.length if self.config.min_length is None else self.config.min_length

    def sample(
        self, batch_size: int, generator: torch.Generator, *, max_level: int, min_level: int
    ) -> Batch:
        context_bits = self.context_bits
        if min_level <= context_bits:
            raise ValueError(
                f"N-gram sequences need more than {context_bits} bits, got {min_level}"
            )
        lengths = draw_levels(batch_size, min_level, max_level, generator)
        longest = int(lengths.max())
        contexts = 2**context_bits
        table = draw_tables(batch_size, contexts, generator)
        draws = torch.rand(longest, batch_size, generator=generator)

        # The chain is sequential in time; each step is one vectorised draw for the batch.
        bits = torch.zeros(longest, batch_size)
        bits[:context_bits] = (draws[:context_bits] < 0.5).float()
        context = context_indices(bits[:context_bits], context_bits)[-1]  # [B]
        rows = torch.arange(batch_size)
        for t in range(context_bits, longest):
            bit = (draws[t] < table[rows, context]).long()
            bits[t] = bit
            context = ((context << 1) | bit) & (contexts - 1)

        time = torch.arange(longest - 1).unsqueeze(1)  # [T, 1], T = longest - 1
        valid = time < lengths - 1
        scored = valid & (time >= context_bits - 1)
        inputs = (bits[:-1] * valid).unsqueeze(-1)
        targets = (bits[1:] * valid).unsqueeze(-1)
        return Batch(inputs, targets, scored.float())

    def bayes_cost(self, batch: Batch) -> torch.Tensor:
        """Bayes-optimal cross-entropy of each sequence in bits, ``[B]``."""
        next_bits = batch.targets[..., 0]
        p_one = bayes_predictions(batch.inputs[..., 0], next_bits, batch.mask, self.context_bits)
        p_target = torch.where(next_bits > 0.5, p_one, 1 - p_one)
        return -(torch.log2(p_target) * batch.mask).sum(0)

    @torch.no_grad()
    def metrics(self, outputs: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-sequence means over the batch, in bits.

        cost_bits:        the model's cross-entropy per sequence
        bayes_cost_bits:  the Bayes-optimal predictor's, on the same sequences (the floor)
        excess_cost_bits: their difference
        """
        bce = F.binary_cross_entropy_with_logits(outputs, batch.targets, reduction="none")
        cost = (bce[..., 0] * batch.mask).sum(0).mean() / math.log(2)
        bayes = self.bayes_cost(batch).mean()
        return {"cost_bits": cost, "bayes_cost_bits": bayes, "excess_cost_bits": cost - bayes}
