"""Plugins: tasks and models from outside memctl, imported because a user named them.

A plugin is a Python file or an importable module that registers tasks or models when it
is imported (``@memctl.register_task``, ``@memctl.register_model``). Code is imported
only when the user names it: ``memctl --plugin FILE_OR_MODULE``, the ``MEMCTL_PLUGINS``
environment variable (``:``-separated), or an installed package's entry point in group
``memctl.plugins``. A recipe names a type, never code.

A run records the plugins named for it (``--plugin``, ``MEMCTL_PLUGINS``) in run.json,
each with the file it resolved to and that file's sha256; a command that opens the run
imports them again, and refuses a file that is missing or no longer the same unless the
user names it again. Entry points are not recorded: their packages are loaded by every
memctl process.

The registries outlive a command in one process (tests run the CLI in-process), so a
file is imported once per process; what a command uses is kept apart (``begin``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from memctl.errors import UserError
from memctl.registry import MODELS, TASKS, RegistrationClash

ENV_VAR = "MEMCTL_PLUGINS"
ENTRY_POINT_GROUP = "memctl.plugins"

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Plugin:
    """One imported plugin: ``source`` as the user gave it, the file it resolved to, that
    file's sha256 when it was imported, and the module name it was imported under."""

    source: str
    path: Path
    sha256: str
    module: str

    @property
    def is_file(self) -> bool:
        return is_file_source(self.source)

    @property
    def argument(self) -> str:
        """What names this plugin to another memctl process (a sweep trial): the resolved
        file, or the module name of a module plugin."""
        return str(self.path) if self.is_file else self.source

    def record(self) -> dict[str, str]:
        """run.json's entry for this plugin."""
        return {"source": self.source, "path": str(self.path), "sha256": self.sha256}


# Every plugin imported in this process, by resolved file: importing one again would
# register its types twice.
_imported: dict[Path, Plugin] = {}
# The plugins of the current command, in load order, and those its user named.
_active: dict[Path, Plugin] = {}
_named: set[Path] = set()
# Where each plugin module came from, for a clash message.
_module_sources: dict[str, Path] = {}


def is_file_source(source: str) -> bool:
    """A source is a file when it looks like one (``.py``, a separator) or exists."""
    return source.endswith(".py") or os.sep in source or Path(source).is_file()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def begin() -> None:
    """Start a command: no plugin is active or named yet (imported ones stay imported)."""
    _active.clear()
    _named.clear()


def active() -> list[Plugin]:
    """The current command's plugins, in the order they were loaded."""
    return list(_active.values())


def records() -> list[dict[str, str]]:
    """What run.json's ``plugins`` holds for a run this command starts or resumes."""
    return [plugin.record() for plugin in _active.values()]


def arguments() -> list[str]:
    """``--plugin`` options that load this command's plugins in another memctl process."""
    return [part for plugin in _active.values() for part in ("--plugin", plugin.argument)]


def _origin(cls: type) -> str:
    """Who registered ``cls``: memctl itself, a plugin file, or an installed package."""
    where = f"{cls.__module__}.{cls.__qualname__}"
    if cls.__module__.startswith("memctl."):
        return f"built-in {where}"
    path = _module_sources.get(cls.__module__)
    return f"plugin {path}" if path is not None else f"{where} (an installed package)"


def _resolve(source: str, where: str) -> tuple[Path, str | None]:
    """The file a source names, and the module name to import (None: import the file)."""
    if is_file_source(source):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"{where} {source}: no such file")
        return path, None
    try:
        spec = importlib.util.find_spec(source)
    except (ImportError, ValueError) as exc:
        raise UserError(f"{where} {source}: cannot import ({_last_line(exc)})") from None
    if spec is None or spec.origin is None or not Path(spec.origin).is_file():
        raise UserError(f"{where} {source}: no such file or importable module")
    return Path(spec.origin).resolve(), source


def _last_line(exc: BaseException) -> str:
    """The exception's last line, with its type (and a syntax error's line)."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    last = text.splitlines()[-1] if text else type(exc).__name__
    if not last.startswith(type(exc).__name__):
        last = f"{type(exc).__name__}: {last}"
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        last += f" (line {exc.lineno})"
    return last


def _module_name(path: Path) -> str:
    """A module name of its own for a plugin file, so that two files called task.py in
    different folders do not replace each other in ``sys.modules``."""
    stem = re.sub(r"\W", "_", path.stem)
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    return f"memctl_plugin_{stem}_{digest}"


def _import(source: str, path: Path, module_name: str | None, where: str) -> Plugin:
    name = module_name or _module_name(path)
    plugin = Plugin(source, path, sha256_of(path), name)
    _module_sources[name] = path
    try:
        if module_name is not None:
            importlib.import_module(module_name)
        else:
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    except RegistrationClash as exc:
        sys.modules.pop(name, None)
        raise UserError(
            f"{where} {source}: {exc.kind} {exc.name!r} of plugin {path} clashes with the "
            f"{_origin(exc.existing)}; rename one of them"
        ) from None
    except UserError:
        sys.modules.pop(name, None)
        raise
    except Exception as exc:
        sys.modules.pop(name, None)
        raise UserError(f"{where} {source}: import failed: {_last_line(exc)}") from None
    _imported[path] = plugin
    return plugin


def load(source: str, where: str = "--plugin") -> Plugin:
    """Import a plugin the user named (``where`` says how, for errors) and make it one of
    this command's: a changed file named again is accepted for a recorded run."""
    path, module_name = _resolve(source, where)
    plugin = _imported.get(path) or _import(source, path, module_name, where)
    _active.setdefault(path, plugin)
    _named.add(path)
    return plugin


def load_entry_points() -> list[str]:
    """Import every installed package's ``memctl.plugins`` entry point; their names."""
    names = []
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        module = entry.value.partition(":")[0].strip()
        if module in sys.modules:
            names.append(entry.name)
            continue
        where = f"entry point {entry.name!r} ({ENTRY_POINT_GROUP})"
        try:
            entry.load()
        except RegistrationClash as exc:
            raise UserError(
                f"{where}: {exc.kind} {exc.name!r} of {exc.cls.__module__} clashes with the "
                f"{_origin(exc.existing)}; rename one of them"
            ) from None
        except Exception as exc:
            raise UserError(f"{where}: import failed: {_last_line(exc)}") from None
        names.append(entry.name)
    return names


def load_named(sources: Iterable[str], environment: str | None) -> None:
    """Start a command with the plugins its user named: entry points, then
    ``MEMCTL_PLUGINS`` (``environment``), then each ``--plugin``."""
    begin()
    load_entry_points()
    for source in (part for part in (environment or "").split(":") if part.strip()):
        load(source.strip(), ENV_VAR)
    for source in sources:
        load(source)


def load_recorded(recorded: Any, where: str) -> None:
    """Import the plugins a run recorded (run.json's ``plugins``; ``where`` names that
    file for errors). A file named on this command line is taken as it is now; any other
    must be where it was and unchanged. A missing file is passed over when the command
    line names plugins (the user's replacement for it)."""
    if not isinstance(recorded, list):
        raise UserError(f"{where}: plugins: expected a list")
    for record in recorded:
        if not isinstance(record, dict) or not {"source", "path", "sha256"} <= set(record):
            raise UserError(f"{where}: plugins: expected entries with source, path and sha256")
        path = Path(record["path"])
        if path in _named:
            continue
        if not path.is_file():
            if _named:
                continue
            raise UserError(
                f"{where}: plugin {path} is missing (the run was started with it); put it "
                f"back, or pass --plugin FILE for where it is now"
            )
        digest = sha256_of(path)
        if digest != record["sha256"]:
            raise UserError(
                f"{where}: plugin {path} changed since the run started (sha256 "
                f"{record['sha256'][:12]}, now {digest[:12]}); pass --plugin {path} to accept it"
            )
        source = record["source"]
        module_name = None if is_file_source(source) else source
        plugin = _imported.get(path) or _import(source, path, module_name, f"{where}: plugin")
        _active.setdefault(path, plugin)


def load_for_runs(paths: Iterable[Path]) -> None:
    """Import the plugins recorded by runs: each path a run directory, or a sweep folder
    whose started trials are run directories."""
    from memctl.rundir import RunDir

    for path in map(Path, paths):
        runs = [path] if (path / "run.json").is_file() else []
        if not runs and (path / "trials.csv").is_file():
            runs = sorted(p for p in path.iterdir() if (p / "run.json").is_file())
        for run in runs:
            info = RunDir(run).read_info()
            load_recorded(info.get("plugins", []), str(run / "run.json"))


def register_task(name: str, config: type) -> Callable[[T], T]:
    """Register a task class under ``name`` (a recipe's ``task.type``) with its config
    schema, a ``memctl.TaskConfig`` subclass; use as a class decorator. The built-in
    tasks are registered first, so a name that clashes with one names it."""
    import memctl.tasks  # noqa: F401
    from memctl.tasks.base import Task, TaskConfig

    return _registrar(TASKS.register, name, config, TaskConfig, Task)


def register_model(name: str, config: type) -> Callable[[T], T]:
    """Register a model class (a ``torch.nn.Module`` built as ``cls(config, input_size,
    output_size)``) under ``name`` (a recipe's ``model.type``) with its config schema, a
    ``memctl.ModelConfig`` subclass; use as a class decorator."""
    import torch

    import memctl.models  # noqa: F401
    from memctl.models.base import ModelConfig

    return _registrar(MODELS.register, name, config, ModelConfig, torch.nn.Module)


def _registrar(
    register: Callable[..., Callable[[type], type]],
    name: str,
    config: type,
    config_base: type,
    class_base: type,
) -> Callable[[T], T]:
    if not isinstance(name, str) or not name:
        raise TypeError(f"register: name must be a non-empty string, got {name!r}")
    if not (isinstance(config, type) and issubclass(config, config_base)):
        raise TypeError(f"register {name!r}: config must subclass {config_base.__name__}")
    decorate = register(name, config)

    def check(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, class_base)):
            raise TypeError(f"register {name!r}: {cls!r} is not a {class_base.__name__}")
        return decorate(cls)  # type: ignore[return-value]

    return check
