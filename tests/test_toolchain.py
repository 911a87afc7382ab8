"""``memctl.toolchain``: a ``$CXX`` that is set is taken strictly, a machine without a
compiler falls back to the DNC's PyTorch path saying so once (then never again), and
importing the models needs no ``fcntl``. These run without a compiler, in fresh
processes where the native library's state matters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memctl import toolchain


def python_with(env: dict[str, str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        timeout=300,
    )


def test_an_explicit_cxx_that_does_not_exist_is_no_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(
        toolchain.shutil, "which", lambda name: None if name.startswith("/nonexistent") else name
    )
    assert toolchain.cpp_compiler() is None
    monkeypatch.setenv("CXX", "clang++")
    assert toolchain.cpp_compiler() == "clang++"
    monkeypatch.delenv("CXX")
    assert toolchain.cpp_compiler() == "g++"


RUN_A_DNC = """
import torch
from memctl.models import DNC
rnn = DNC(4, 8, nr_cells=4, cell_size=3, read_heads=1)
out, _ = rnn(torch.rand(2, 3, 4))
out.sum().backward()
print(rnn.describe_backend(2))
"""


def test_without_a_compiler_the_first_process_says_so_once_and_the_next_says_nothing(
    tmp_path: Path,
):
    env = {"CXX": "/nonexistent/c++", "MEMCTL_CACHE": str(tmp_path), "MEMCTL_NATIVE": "1"}
    first = python_with(env, RUN_A_DNC)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "fused (PyTorch, hand-written backwards)"
    (line,) = first.stderr.strip().splitlines()
    assert line.startswith("memctl: the DNC's native kernel is not available (no C++ compiler")
    assert "using the PyTorch path" in line
    (marker,) = tmp_path.rglob(toolchain.FAILURE_MARKER)
    assert str(marker) in line
    second = python_with(env, RUN_A_DNC)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "fused (PyTorch, hand-written backwards)"
    assert second.stderr == ""
    assert not list(tmp_path.rglob("*.so"))


def test_a_build_failure_is_recorded_once(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MEMCTL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    if toolchain.cpp_compiler() is None:
        pytest.skip("no false(1)")
    source = tmp_path / "kernel.cpp"
    source.write_text("int f() { return 0; }\n")
    runs = []

    def command(compiler: str, output: Path) -> list[str]:
        runs.append(compiler)
        return [compiler, str(source), "-o", str(output)]

    for cached in (False, True):
        with pytest.raises(toolchain.BuildError) as failure:
            toolchain.shared_library(source, command, "building")
        assert failure.value.cached is cached
        assert failure.value.marker.read_text().strip() == str(failure.value)
    # The key's command once per call; the compile itself only the first time.
    assert len(runs) == 3


def test_importing_the_models_needs_no_fcntl():
    done = python_with(
        {},
        "import sys; sys.modules['fcntl'] = None\n"
        "import memctl.models\n"
        "from memctl.models import DNC, DNCModel\n"
        "from memctl.models.dnc import DNC as Same\n"
        "assert DNC is Same and 'fcntl' not in {m for m in sys.modules if sys.modules[m]}\n"
        "print('ok')",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_compiler_killed_by_a_signal_leaves_no_marker(tmp_path: Path, monkeypatch):
    """A build stopped from outside (SIGTERM to the compiler) is tried again next time."""
    monkeypatch.setenv("MEMCTL_CACHE", str(tmp_path))
    killed = tmp_path / "killed-c++"
    killed.write_text("#!/bin/sh\nkill -TERM $$\n")
    killed.chmod(0o755)
    monkeypatch.setenv("CXX", str(killed))
    source = tmp_path / "kernel.cpp"
    source.write_text("int f() { return 0; }\n")
    runs = []

    def command(compiler: str, output: Path) -> list[str]:
        runs.append(compiler)
        return [compiler, str(source), "-o", str(output)]

    for _ in range(2):
        with pytest.raises(toolchain.BuildError, match="stopped by signal 15") as failure:
            toolchain.shared_library(source, command, "building")
        assert failure.value.cached is False
        assert not failure.value.marker.exists()
    assert len(runs) == 4  # the key's command and the compile, both times
