"""Curriculum schedules: which level (sequence length, n, pairs...) the next batch uses.

``fixed``     the task's own parameter, always.
``step``      start, then + increment every N steps, up to max (pytorch-dnc's
              curriculum_increment / curriculum_freq).
``adaptive``  + increment whenever the mean of a metrics.csv column over the last
              ``window`` logged rows passes ``threshold``, up to max.

The state is plain data, saved in every checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from memctl.errors import UserError
from memctl.recipe import CurriculumSection
from memctl.tasks.base import Task


class Trigger:
    """Passes when the mean of a metrics.csv column over the last ``size`` logged rows is
    below (or above) a threshold; the caller empties ``window`` after acting on it."""

    def __init__(self, metric: str, threshold: float, mode: str, size: int) -> None:
        self.metric, self.threshold, self.mode, self.size = metric, threshold, mode, size
        self.window: list[float] = []

    def passed(self, row: dict[str, float]) -> bool:
        self.window = [*self.window, float(row[self.metric])][-self.size :]
        if len(self.window) < self.size:
            return False
        mean = sum(self.window) / len(self.window)
        return mean > self.threshold if self.mode == "above" else mean < self.threshold


class Curriculum:
    def __init__(self, section: CurriculumSection, task: Task) -> None:
        self.section = section
        self.task = task
        self.kind = section.type
        self.max = section.max if section.max is not None else task.level
        start = section.start if section.start is not None else task.min_level
        if self.kind == "fixed":
            start = self.max = task.level
        if start < task.min_level:
            raise UserError(
                f"curriculum.start: {start} is below the task's minimum {task.min_level}"
            )
        if start > self.max:
            raise UserError(f"curriculum.start: {start} exceeds curriculum.max {self.max}")
        self.level = start
        self.trigger = Trigger(section.metric, section.threshold, section.mode, section.window)

    @property
    def min_level(self) -> int:
        """Smallest level in a batch: the task minimum, or the level itself if not mixing."""
        return self.level if self.section.mix == "level" else min(self.task.min_level, self.level)

    def batch_levels(self, generator: torch.Generator) -> tuple[int, int]:
        """(smallest, largest) level of the next batch. ``batch`` draws one level per
        batch, uniform in [min_level, level], so a batch is as long as its level needs
        rather than as long as its longest sequence (pytorch-ntm's copy does this)."""
        if self.section.mix != "batch":
            return self.min_level, self.level
        drawn = int(torch.randint(self.min_level, self.level + 1, (1,), generator=generator))
        return drawn, drawn

    def after_step(self, step: int) -> None:
        if self.kind == "step" and step % self.section.every == 0:
            self._advance()

    @property
    def window(self) -> list[float]:
        return self.trigger.window

    def after_log(self, row: dict[str, float]) -> None:
        if self.kind == "adaptive" and self.trigger.passed(row):
            self._advance()

    def _advance(self) -> None:
        if self.level < self.max:
            self.level = min(self.level + self.section.increment, self.max)
            self.trigger.window = []

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level, "window": list(self.window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.kind == "fixed":
            return  # the task's parameter is the level, also when an override changed it
        self.level = min(int(state["level"]), self.max)
        self.trigger.window = [float(v) for v in state["window"]]
