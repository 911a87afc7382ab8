"""What machine a benchmark ran on, for the saved results, and the timed loop and the
one-process-per-point runner the benchmarks share."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

from memctl.lifecycle import cpu_name

__all__ = ["cpu_name", "run_in_process", "time_steps"]


def time_steps(step: Callable[[], object], steps: int, warmup: int) -> tuple[list[float], float]:
    """Run ``step`` ``warmup`` times untimed, then ``steps`` times: (each timed step's
    wall seconds, the CPU seconds of all timed steps). On a shared machine wall time
    includes waiting for a core; CPU time does not."""
    for _ in range(warmup):
        step()
    times = []
    cpu_start = time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times, time.process_time() - cpu_start


def describe_machine(torch_threads: int) -> dict[str, object]:
    """The machine fields every speed benchmark saves with its results."""
    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch_threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def synchronizer(device: str) -> Callable[[], object]:
    """A function that waits for the device's queued work (nothing to wait for on a
    CPU), so that a timed step ends when its work does."""
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def run_in_process(
    script: str,
    spec: dict,
    timeout: float,
    python: str = sys.executable,
    environment: dict[str, str | None] | None = None,
) -> dict:
    """One point in a fresh process of ``python script --worker SPEC`` with
    ``spec["threads"]`` OpenMP threads, ``OMP_WAIT_POLICY=PASSIVE`` unless set, and the
    ``environment`` changes (None: unset): the spec updated with the JSON the worker
    prints last. A failure (memory limit, timeout) is a result too: the spec with an
    ``error``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for name, value in (environment or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    command = [python, script, "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["exit " + str(done.returncode)])[-1]
        return {**spec, "error": last[-300:]}
    return {**spec, **json.loads(done.stdout.strip().splitlines()[-1])}
