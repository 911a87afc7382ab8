"""memctl: experiments with differentiable-memory neural networks.

The public API for plugins is here: ``register_task`` and ``register_model`` (class
decorators), and the classes a plugin builds on, ``Task``, ``Batch``, ``TaskConfig`` and
``ModelConfig``. They are imported on first use, so ``import memctl`` stays cheap (no
torch) for the command line's start.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "register_task": "memctl.plugins",
    "register_model": "memctl.plugins",
    "Task": "memctl.tasks.base",
    "Batch": "memctl.tasks.base",
    "TaskConfig": "memctl.tasks.base",
    "ModelConfig": "memctl.models.base",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memctl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
