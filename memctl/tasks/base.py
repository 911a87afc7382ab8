"""The task contract shared by every task family.

A task knows its input/output widths and its curriculum parameter (``level_field``: the
config field that the curriculum's level sets, e.g. ``max_length`` for copy).
``sample`` returns a fully vectorised batch, deterministic for a given generator.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator


class TaskConfig(BaseModel):
    """Base of every task's config: unknown keys are errors, and each (low, high) pair of
    fields named in ``ordered_fields`` must have low <= high (a low of None is unset)."""

    model_config = ConfigDict(extra="forbid")
    ordered_fields: ClassVar[tuple[tuple[str, str], ...]] = ()

    @model_validator(mode="after")
    def _ranges_ordered(self) -> TaskConfig:
        for low_name, high_name in self.ordered_fields:
            low, high = getattr(self, low_name), getattr(self, high_name)
            if low is not None and low > high:
                raise ValueError(f"{low_name} ({low}) must not exceed {high_name} ({high})")
        return self


class Batch(NamedTuple):
    """One batch, time first.

    inputs:  ``[T, B, input_size]``
    targets: ``[T, B, output_size]``
    mask:    ``[T, B]``, 1 where the output is scored
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in self))


class Task:
    """Base class. Subclasses set the widths and implement ``sample``.

    The default loss and metrics are those of binary-vector outputs (the NTM tasks):
    sigmoid cross-entropy on logits, scored where ``mask`` is 1.
    """

    level_field: ClassVar[str]
    # The metric that decides best.pt and that "lower is better" applies to.
    primary_metric: ClassVar[str] = "bit_errors"
    higher_is_better: ClassVar[bool] = False
    metric_names: ClassVar[tuple[str, ...]] = ("cost_bits", "bit_errors", "accuracy")
    # The other metrics of which a higher value is better (fractions right).
    higher_is_better_metrics: ClassVar[frozenset[str]] = frozenset({"accuracy"})
    # Each metric's meaning and unit, short enough for a plot's axis label.
    metric_descriptions: ClassVar[dict[str, str]] = {
        "cost_bits": "cross-entropy, bits per sequence",
        "bit_errors": "wrong bits per sequence",
        "accuracy": "fraction of sequences all right",
    }

    # Whether outputs are scored along the sequence with a loss that is a mean over the
    # scored steps, so that `train.tbptt` can train the task chunk by chunk (each chunk's
    # loss weighted by its share of the scored steps). False for a task that scores only
    # the end of a sequence: a chunk before the last would get no gradient.
    scored_along_sequence: ClassVar[bool] = True

    input_size: int
    output_size: int

    def __init__(self, config: TaskConfig) -> None:
        self.config = config

    @property
    def level(self) -> int:
        """The task's own setting of its curriculum parameter."""
        return int(getattr(self.config, self.level_field))

    @property
    def min_level(self) -> int:
        """Smallest level the task can generate (lower bound of mixed-length batches)."""
        return 1

    @classmethod
    def for_config(cls, config: TaskConfig) -> type[Task]:
        """The class whose loss and metrics a task built from ``config`` has: this one, or,
        where the metrics follow a setting (``sequences``' loss), the subclass it selects.
        Code that knows a recipe but builds no task (progress lines, sweep tables) asks
        this rather than the registered class."""
        return cls

    @classmethod
    def metric_higher_is_better(cls, metric: str) -> bool:
        """Whether a higher value of one of the task's metrics is better."""
        if metric == cls.primary_metric:
            return cls.higher_is_better
        return metric in cls.higher_is_better_metrics

    def output_view(self, logits: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The model's outputs as the task reads them, for figures, and their label:
        bit probabilities for the sigmoid cross-entropy of binary outputs."""
        return torch.sigmoid(logits), r"output $\sigma(y_t)$"

    def sample(
        self, batch_size: int, generator: torch.Generator, *, max_level: int, min_level: int
    ) -> Batch:
        """A batch whose sequences have levels drawn uniformly from [min_level, max_level].

        The levels are keyword-only: this signature is the public contract that plugin
        tasks implement, and two integers side by side are easy to swap."""
        raise NotImplementedError

    def sample_eval(self, batch_size: int, level: int, generator: torch.Generator) -> Batch:
        """A held-out batch at ``level`` for evaluation. A generated task has no held-out
        set: its batches come from the eval seed's generator; a task on files reads its
        eval file here."""
        return self.sample(batch_size, generator, max_level=level, min_level=level)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean sigmoid cross-entropy per scored bit (what the optimiser sees)."""
        bce = F.binary_cross_entropy_with_logits(outputs, batch.targets, reduction="none")
        mask = batch.mask.unsqueeze(-1).expand_as(bce)
        return (bce * mask).sum() / mask.sum().clamp_min(1)

    def sequence_losses(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Summed cross-entropy of each sequence, ``[B]``: the reward signal for models
        trained partly by REINFORCE (their ``auxiliary_loss`` receives it, detached)."""
        bce = F.binary_cross_entropy_with_logits(outputs, batch.targets, reduction="none")
        return (bce * batch.mask.unsqueeze(-1)).sum(dim=(0, 2))

    @torch.no_grad()
    def metrics(self, outputs: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-sequence means over the batch, as 0-d tensors (no device sync here).

        cost_bits:  cross-entropy in bits per sequence
        bit_errors: wrong bits per sequence after thresholding at 0.5
        accuracy:   fraction of sequences with every scored bit right
        """
        batch_size = outputs.shape[1]
        mask = batch.mask.unsqueeze(-1)
        bce = F.binary_cross_entropy_with_logits(outputs, batch.targets, reduction="none")
        cost_bits = (bce * mask).sum() / batch_size / math.log(2)
        wrong = ((outputs > 0).to(batch.targets.dtype) != batch.targets) * mask
        errors_per_sequence = wrong.sum(dim=(0, 2))
        return {
            "cost_bits": cost_bits,
            "bit_errors": errors_per_sequence.mean(),
            "accuracy": (errors_per_sequence == 0).float().mean(),
        }


def draw_levels(
    batch_size: int, min_level: int, max_level: int, generator: torch.Generator
) -> torch.Tensor:
    """Per-sequence levels, uniform over [min_level, max_level], shape ``[B]``."""
    return torch.randint(min_level, max_level + 1, (batch_size,), generator=generator)
