"""Every task describes, with its unit, each metric it logs (plots label their axes so)."""

from __future__ import annotations

import pytest
import torch

import memctl.tasks  # noqa: F401  (registers the tasks)
from memctl.registry import TASKS
from memctl.tasks import Task


def check_metrics_described(task: Task) -> None:
    """The task logs exactly the metrics it names, and describes each in a few words."""
    batch = task.sample(
        2, torch.Generator().manual_seed(0), max_level=task.level, min_level=task.min_level
    )
    logged = task.metrics(torch.zeros_like(batch.targets), batch)
    assert list(logged) == list(task.metric_names)
    assert set(task.metric_descriptions) == set(task.metric_names)
    for metric, description in task.metric_descriptions.items():
        assert isinstance(description, str) and 10 <= len(description) <= 60, (metric, description)


# sequences needs a data file: tests/test_sequences.py checks it for each loss.
@pytest.mark.parametrize("name", [name for name in TASKS.names() if name != "sequences"])
def test_every_task_describes_every_metric_it_logs(name: str):
    entry = TASKS.get(name)
    check_metrics_described(entry.cls(entry.config()))
