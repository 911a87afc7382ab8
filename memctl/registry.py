"""Name -> (class, config schema) registries for models and tasks.

Model and task modules register themselves with a decorator; the packages import every
module in their folder, so adding a model is adding one file. Plugins register through
the same decorators (``memctl.register_task``, ``memctl.register_model``).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from memctl.errors import UserError


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    config: type[BaseModel]


class RegistrationClash(ValueError):
    """A name registered twice: ``existing`` holds it, ``cls`` asked for it too."""

    def __init__(self, kind: str, name: str, existing: type, cls: type) -> None:
        self.kind, self.name, self.existing, self.cls = kind, name, existing, cls
        super().__init__(
            f"{kind} {name!r} registered twice: by {existing.__module__}.{existing.__qualname__} "
            f"and by {cls.__module__}.{cls.__qualname__}"
        )


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: type[BaseModel]):
        def decorate(cls: type) -> type:
            if name in self._entries:
                raise RegistrationClash(self.kind, name, self._entries[name].cls, cls)
            self._entries[name] = Entry(name, cls, config)
            return cls

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            hint = difflib.get_close_matches(str(name), self.names(), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise UserError(
                f"{self.kind}.type: {name!r} is not registered{did_you_mean} "
                f"(known: {', '.join(self.names())}); if a plugin provides it, pass --plugin FILE"
            ) from None

    def __contains__(self, name: Any) -> bool:
        return name in self._entries


def import_submodules(package: ModuleType) -> None:
    """Import every module of a package and of its subpackages (``models/dnc/``), so
    that their registrations run wherever in the tree they are."""
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        importlib.import_module(info.name)


MODELS = Registry("model")
TASKS = Registry("task")


def task_class(section: Any) -> type | None:
    """The class whose loss and metrics a recipe's ``task`` section (plain data, as in a
    run's recipe.yaml) has: ``Task.for_config`` of its registered type, or None when the
    section names no registered task."""
    if not isinstance(section, dict) or section.get("type") not in TASKS:
        return None
    entry = TASKS.get(section["type"])
    return entry.cls.for_config(entry.config.model_validate(section))
