"""The machine's build tools, for anything that compiles native code at run time
(``torch.compile`` on the CPU, a model's native kernel). Knows nothing of any model.

``shared_library`` compiles one C++ source into a shared library cached under
``$MEMCTL_CACHE`` (default ``~/.cache/memctl``), keyed by the source, the compile command
(with the compiler), the torch version, the Python ABI and the CPU, so that a cache shared
by a cluster of mixed nodes keeps one build per kind of machine. Parallel processes (the
trials of a sweep) build it once, under a file lock; the library is written atomically. A
failed build leaves a marker with its error beside where the library would be, so later
processes on that machine and compiler do not try again (remove the marker to retry); a
compiler killed by a signal leaves none.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# What a failed build leaves in its cache folder: the error, one line.
FAILURE_MARKER = "build-failed.txt"


def cpp_compiler() -> str | None:
    """The C++ compiler (as TorchInductor looks for one): ``$CXX``, else g++, c++ or
    clang++. A ``$CXX`` that is set is taken strictly: where it names nothing that runs,
    there is no compiler (no fallback to another one)."""
    explicit = os.environ.get("CXX")
    if explicit:
        return shutil.which(explicit)
    return next((path for name in ("g++", "c++", "clang++") if (path := shutil.which(name))), None)


def cache_root() -> Path:
    return Path(os.environ.get("MEMCTL_CACHE") or Path.home() / ".cache" / "memctl")


def _cpu() -> bytes:
    """What ``-march=native`` compiles for: the CPU's model and feature flags (Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)})).encode()


class BuildError(RuntimeError):
    """A native library that cannot be had. ``cached``: the failure was recorded by an
    earlier process (nothing was tried now); ``marker``: the file that records it."""

    def __init__(self, message: str, marker: Path, cached: bool) -> None:
        super().__init__(message)
        self.marker, self.cached = marker, cached


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` where the platform has ``fcntl`` (imported here, so
    that importing memctl needs no ``fcntl``); elsewhere none: a build may then run twice
    and the atomic rename keeps the library whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def shared_library(source: Path, command: Callable[[str, Path], list[str]], announce: str) -> Path:
    """The path of ``source`` compiled into a shared library, building it if needed.

    ``command(compiler, output)`` is the compile command; ``announce`` is printed on
    stderr before a build starts (it takes a while). Raises ``BuildError`` where there is
    no compiler or the build fails (writing the failure marker), and where an earlier
    process's failure marker is there (printing nothing, trying nothing).
    """
    compiler = cpp_compiler()
    key = hashlib.sha256(
        source.read_bytes()
        + " ".join(command(compiler or "<none>", Path("out"))).encode()
        + torch.__version__.encode()
        + (sysconfig.get_config_var("SOABI") or "").encode()
        + _cpu()
    ).hexdigest()[:16]
    folder = cache_root() / "native" / key
    target, marker = folder / f"{source.stem}.so", folder / FAILURE_MARKER

    def recorded_failure() -> BuildError | None:
        if target.exists() or not marker.exists():
            return None
        return BuildError(marker.read_text().strip(), marker, cached=True)

    if target.exists():
        return target
    if (failure := recorded_failure()) is not None:
        raise failure
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / "build.lock"):
        if target.exists():
            return target
        if (failure := recorded_failure()) is not None:
            raise failure
        if compiler is None:
            error, interrupted = "no C++ compiler ($CXX, g++, c++ or clang++)", False
        else:
            print(announce, file=sys.stderr)
            error, interrupted = _compile(functools.partial(command, compiler), target)
        if error is not None:
            if not interrupted:
                _write_atomically(marker, error + "\n")
            raise BuildError(error, marker, cached=False)
    return target


def _compile(command: Callable[[Path], list[str]], target: Path) -> tuple[str | None, bool]:
    """Compile into a scratch folder (``command(output)``), then rename the result over
    ``target``. Returns the compiler's first error line where it fails (None where it
    built) and whether the compiler was killed by a signal: a build stopped from outside
    (Ctrl-C, a job's time limit) says nothing of the next try, so it leaves no marker."""
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        arguments = command(partial)
        try:
            result = subprocess.run(arguments, capture_output=True, text=True)
        except OSError as error:
            return f"{arguments[0]}: {error.strerror}", False
        if result.returncode < 0:
            return f"{arguments[0]} was stopped by signal {-result.returncode}", True
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            errors = [line for line in lines if "error" in line] or lines[-1:]
            return (
                errors[0] if errors else f"{arguments[0]} exited with {result.returncode}"
            ), False
        os.replace(partial, target)
    return None, False
