"""What machine a benchmark ran on, for the saved results, and the timed loop the
benchmarks share."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

from memctl.lifecycle import cpu_name

__all__ = ["cpu_name", "time_steps"]


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
