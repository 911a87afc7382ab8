"""Every task describes, with its unit, each metric it logs (plots label their axes so)."""

from __future__ import annotations

import pytest
import torch

import memctl.tasks  # noqa: F401  (registers the tasks)
from memctl.registry import TASKS


@pytest.mark.parametrize("name", TASKS.names())
def test_every_task_describes_every_metric_it_logs(name: str):
    entry = TASKS.get(name)
    task = entry.cls(entry.config())
    batch = task.sample(
        2, torch.Generator().manual_seed(0), max_level=task.level, min_level=task.min_level
    )
    logged = task.metrics(torch.zeros_like(batch.targets), batch)
    assert list(logged) == list(task.metric_names)
    assert set(task.metric_descriptions) == set(task.metric_names)
    for metric, description in task.metric_descriptions.items():
        assert isinstance(description, str) and 10 <= len(description) <= 60, (metric, description)
