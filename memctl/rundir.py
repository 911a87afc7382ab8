"""The ``runs/<name>/`` layout, atomic writes, run.json and the CSV logs.

recipe.yaml     the fully resolved recipe (updated by ``resume --set``)
run.json        status, versions, device, seed, lineage of trains/resumes, events
metrics.csv     one row per logged step, appended and flushed
eval.csv        one row per (evaluation, level)
checkpoints/    step_<N>.pt (last K), last.pt, best.pt
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from memctl.errors import StorageError, UserError

STATUSES = ("running", "finished", "interrupted", "failed")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_file_mode() -> int:
    """What ``open`` gives a new file: 0o666 less the umask (``mkstemp`` gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def format_size(size: int) -> str:
    """Bytes for people: 812 B, 45.1 kB, 1.2 MB (powers of 1000, as ``df -H``)."""
    if size < 1000:
        return f"{size} B"
    value, unit = size / 1000, "kB"
    for bigger in ("MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.1f} {unit}"


def storage_error(path: Path, size: int, exc: OSError) -> StorageError:
    """The one line for a failed write: the file, why, and the free space it needed."""
    reason = exc.strerror or exc.__class__.__name__
    return StorageError(f"{path}: cannot write ({reason}); it needs {format_size(size)} free")


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, fsync, rename over ``path``.

    Any OSError (full disk, read-only or vanished folder) leaves ``path`` as it was and
    becomes a StorageError naming the file and its size.
    """
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    try:
        _write_and_rename(path, raw)
    except OSError as exc:
        raise storage_error(path, len(raw), exc) from None


def _write_and_rename(path: Path, raw: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CsvLog:
    """An append-only CSV whose first column is ``step``; flushed after every row.

    A file written with fewer columns (an older memctl) gains the new ones at the first
    append: it is rewritten atomically under the new header, its old rows with empty
    cells there, so every row stays under its own header. A file with columns this log
    lacks (a resumed run whose columns changed) keeps its header; new columns are dropped.
    """

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns
        self.upgrade = False
        if not path.exists() or path.stat().st_size == 0:
            atomic_write(path, ",".join(columns) + "\n")
        else:
            header = path.read_text().splitlines()[0].split(",")
            if not set(header) <= set(columns):
                self.columns = header
            self.upgrade = header != self.columns

    @staticmethod
    def _complete(lines: list[str]) -> tuple[list[str], list[str]]:
        """The header line and the complete rows (a torn last line is not one)."""
        if not lines:
            return [], []
        width = len(lines[0].split(","))
        rows = [
            line
            for line in lines[1:]
            if line.endswith("\n") and len(line.rstrip("\n").split(",")) == width
        ]
        return lines[:1], rows

    def _rewrite_with_new_columns(self) -> None:
        header, old = self._complete(self.path.read_text().splitlines(keepends=True))
        rows = csv.DictReader(io.StringIO("".join(header + old)))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path, buffer.getvalue())
        self.upgrade = False

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append and fsync; a failed write is a StorageError (a torn last line that it
        may leave is dropped by ``truncate_after`` on resume)."""
        if self.upgrade:
            self._rewrite_with_new_columns()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writerows(rows)
        text = buffer.getvalue()
        try:
            with self.path.open("a") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise storage_error(self.path, len(text.encode()), exc) from None

    def truncate_after(self, step: int) -> int:
        """Drop rows past ``step`` and any torn last line; return the rows kept."""
        if not self.path.exists():
            return 0
        lines = self.path.read_text().splitlines(keepends=True)
        header, rows = self._complete(lines)
        kept = header + [line for line in rows if int(line.split(",")[0]) <= step]
        if kept != lines:
            atomic_write(self.path, "".join(kept))
        return len(kept) - 1


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    recipe_file = property(lambda self: self.path / "recipe.yaml")
    run_file = property(lambda self: self.path / "run.json")
    metrics_file = property(lambda self: self.path / "metrics.csv")
    eval_file = property(lambda self: self.path / "eval.csv")
    checkpoints = property(lambda self: self.path / "checkpoints")

    @classmethod
    def create(cls, runs_dir: Path, name: str) -> RunDir:
        """Make a new run directory; an existing run of that name is never overwritten."""
        path = Path(runs_dir) / name
        if path.exists():
            raise UserError(
                f"{path}: a run with this name exists; choose another --name "
                f"or continue it with `memctl resume {path}`"
            )
        try:
            (path / "checkpoints").mkdir(parents=True)
        except OSError as exc:
            raise UserError(f"{path}: cannot create run directory ({exc.strerror})") from None
        return cls(path)

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """An existing run; anything that is not one is a UserError naming the path."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path}: no such run directory")
        run = cls(path)
        for required in (run.recipe_file, run.run_file):
            if not required.is_file():
                raise UserError(f"{path}: not a memctl run (no {required.name})")
        run.read_info()
        return run

    def read_info(self) -> dict[str, Any]:
        try:
            info = json.loads(self.run_file.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.run_file}: unreadable run.json ({exc})") from None
        if not isinstance(info, dict) or info.get("status") not in STATUSES:
            raise UserError(f"{self.run_file}: not a memctl run.json (no valid status)")
        return info

    def write_info(self, info: dict[str, Any]) -> None:
        info["updated"] = now()
        atomic_write(self.run_file, json.dumps(info, indent=2) + "\n")

    def update_info(self, **changes: Any) -> dict[str, Any]:
        info = self.read_info()
        info.update(changes)
        self.write_info(info)
        return info

    def add_event(self, kind: str, **details: Any) -> None:
        info = self.read_info()
        info.setdefault("events", []).append({"event": kind, "time": now(), **details})
        self.write_info(info)

    def status(self) -> str:
        """run.json's status, with 'running' corrected when its process is gone."""
        info = self.read_info()
        status = info["status"]
        if status == "running" and info.get("host") == socket.gethostname():
            pid = info.get("pid")
            if isinstance(pid, int) and not pid_alive(pid):
                return "interrupted"
        return status

    def last_metrics(self) -> dict[str, str]:
        """The last complete row of metrics.csv ({} when there is none)."""
        if not self.metrics_file.is_file():
            return {}
        lines = self.metrics_file.read_text().splitlines()
        header = lines[0].split(",") if lines else []
        for line in reversed(lines[1:]):
            fields = line.split(",")
            if len(fields) == len(header):
                return dict(zip(header, fields, strict=True))
        return {}

    def summary(self) -> dict[str, str]:
        """One line of ``memctl runs``; an unreadable run says so instead of failing."""
        try:
            info = self.read_info()
            status = self.status()
        except UserError:
            return {"name": self.name, "model": "?", "task": "?", "status": "unreadable"}
        last = self.last_metrics()
        metric = str(info.get("metric", ""))
        return {
            "name": self.name,
            "model": str(info.get("model", "?")),
            "task": str(info.get("task", "?")),
            "status": status,
            "step": last.get("step", "0"),
            "level": last.get("level", "-"),
            "loss": last.get("loss", "-"),
            "metric": f"{metric}={last[metric]}" if metric in last else "-",
        }

    def write_recipe(self, resolved: dict[str, Any]) -> None:
        atomic_write(self.recipe_file, yaml.safe_dump(resolved, sort_keys=False))

    def checkpoint_path(self, which: str) -> Path:
        """``last``, ``best``, or a step number."""
        if which in ("last", "best"):
            return self.checkpoints / f"{which}.pt"
        if which.isdigit():
            return self.checkpoints / f"step_{int(which)}.pt"
        raise UserError(f"--checkpoint {which!r}: expected last, best or a step number")

    def step_checkpoints(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.checkpoints.glob("step_*.pt"):
            suffix = path.stem.removeprefix("step_")
            if suffix.isdigit():
                found.append((int(suffix), path))
        return sorted(found)
