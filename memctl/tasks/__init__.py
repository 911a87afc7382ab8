"""Tasks, registered by name in ``memctl.registry.TASKS``."""

import sys

from memctl.registry import TASKS, import_submodules
from memctl.tasks.base import Batch, Task, TaskConfig

import_submodules(sys.modules[__name__])

__all__ = ["TASKS", "Batch", "Task", "TaskConfig"]
