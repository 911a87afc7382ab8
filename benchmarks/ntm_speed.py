"""NTM training throughput on the copy configuration of Graves et al. 2014.

LSTM controller 100, memory 128 x 20, 1 read + 1 write head, 8-bit vectors. One training
step = sample a batch, forward, sigmoid cross-entropy, backward, global-norm clip 50,
Adam step: what ``memctl train recipes/ntm_copy.yaml`` does per step.

Reports sequences per second at batch 1 and 32, for three ways of drawing lengths:
``batch``, one length in 1..20 per batch (the peer's convention and the trainer's
``curriculum.mix: batch``); ``padded``, each sequence's length in 1..20, the batch padded
to its longest (``mix: uniform``, the default); ``fixed``, every sequence of length 20;
eager and (``--compile``) with the per-step cell compiled, whose first-call compile time
is reported separately. Results are saved as JSON with the machine they came from.

``--peer-src DIR`` also times, in the same run and on the same batches, the PyTorch NTM
most people start from: a checkout of loudinthecloud/pytorch-ntm (commit 3c64937; it is
not on PyPI, and never a dependency of memctl), one call of its ``train_batch`` per step
(forward one time step at a time, BCE loss, backward, element-wise clip 10, RMSProp).

    git clone https://github.com/loudinthecloud/pytorch-ntm /tmp/pytorch-ntm
    OMP_NUM_THREADS=2 python benchmarks/ntm_speed.py --compile --peer-src /tmp/pytorch-ntm \
        --out benchmarks/ntm_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import describe_machine, time_steps

from memctl.models.base import parameter_count
from memctl.models.ntm import NTM, NTMConfig
from memctl.tasks.copy import CopyConfig, CopyTask

LENGTHS = {"batch": "1..20 per batch", "padded": "1..20 per sequence, padded", "fixed": "20"}


def batches(task: CopyTask, batch_size: int, lengths: str, seed: int):
    """The benchmark's copy batches: the same stream for memctl and the peer."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        if lengths == "batch":
            low = high = int(torch.randint(1, 21, (1,), generator=generator))
        else:
            low, high = (1 if lengths == "padded" else 20), 20
        yield task.sample(batch_size, generator, max_level=high, min_level=low)


def memctl_step(task: CopyTask, stream, compiled: bool) -> tuple[Callable[[], float], int]:
    """memctl's training step on the copy recipe (Adam 1e-3, global norm clip 50)."""
    model = NTM(NTMConfig(), task.input_size, task.output_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    if compiled:
        model.compile_step()

    def train_step() -> float:
        batch = next(stream)
        outputs, _ = model(batch.inputs)
        loss = task.loss(outputs, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0, foreach=True)
        optimizer.step()
        return loss.item()

    return train_step, parameter_count(model)


def peer_step(task: CopyTask, stream, source: Path) -> tuple[Callable[[], float], int]:
    """pytorch-ntm's ``train_batch`` on the same batches: the input vectors and the
    delimiter step one time step at a time, then as many blank steps as the sequence is
    long; BCE on its sigmoid outputs, backward, element-wise clip 10, RMSProp 1e-4 with
    momentum 0.9 (its copy-task defaults)."""
    sys.path.insert(0, str(source))
    from ntm.aio import EncapsulatedNTM

    width = task.output_size
    net = EncapsulatedNTM(width + 1, width, 100, 1, 1, 128, 20)
    optimizer = torch.optim.RMSprop(net.parameters(), momentum=0.9, alpha=0.95, lr=1e-4)
    criterion = torch.nn.BCELoss()

    def train_step() -> float:
        batch = next(stream)
        length = (batch.inputs.shape[0] - 1) // 2
        inputs, targets = batch.inputs[: length + 1], batch.targets[length + 1 :]
        optimizer.zero_grad()
        net.init_sequence(inputs.shape[1])
        for step in inputs:
            net(step)
        outputs = torch.stack([net()[0] for _ in range(length)])
        loss = criterion(outputs, targets)
        loss.backward()
        for parameter in net.parameters():
            if parameter.grad is not None:
                parameter.grad.data.clamp_(-10, 10)
        optimizer.step()
        return loss.item()

    return train_step, sum(p.numel() for p in net.parameters())


def measure(
    batch_size: int,
    lengths: str,
    steps: int,
    warmup: int,
    implementation: str,
    peer_source: Path | None = None,
    seed: int = 0,
) -> dict:
    torch.manual_seed(seed)
    task = CopyTask(CopyConfig(width=8, max_length=20))
    stream = batches(task, batch_size, lengths, seed)
    if implementation == "peer":
        train_step, parameters = peer_step(task, stream, peer_source)
    else:
        train_step, parameters = memctl_step(task, stream, implementation == "compiled")

    compile_seconds = None
    if implementation == "compiled":
        start = time.perf_counter()
        train_step()
        compile_seconds = time.perf_counter() - start
    times, cpu_seconds = time_steps(train_step, steps, warmup)
    return {
        "mode": implementation,
        "batch_size": batch_size,
        "lengths": LENGTHS[lengths],
        "steps": steps,
        "sequences_per_second": round(batch_size * steps / sum(times), 1),
        "median_step_ms": round(1000 * statistics.median(times), 2),
        "sequences_per_cpu_second": round(batch_size * steps / cpu_seconds, 1),
        "compile_seconds": None if compile_seconds is None else round(compile_seconds, 1),
        "parameters": parameters,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--compile", action="store_true", help="also time the compiled step")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--lengths", default="batch,padded,fixed", help=", ".join(LENGTHS))
    parser.add_argument(
        "--peer-src", type=Path, default=None, help="a pytorch-ntm checkout: time it too"
    )
    parser.add_argument("--out", type=Path, default=None, help="save results as JSON")
    parser.add_argument("--note", default="", help="saved with the results (e.g. machine load)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    modes = (["peer"] if args.peer_src else []) + ["eager"] + (["compiled"] if args.compile else [])
    for implementation in modes:
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            for lengths in args.lengths.split(","):
                # Batch 1 steps are short: time more of them for a stable figure.
                steps = args.steps * (4 if batch_size == 1 else 1)
                row = measure(
                    batch_size, lengths, steps, args.warmup, implementation, args.peer_src
                )
                print(json.dumps(row), flush=True)
                results.append(row)

    report = {
        "benchmark": "ntm_copy_training_throughput",
        "machine": {
            **describe_machine(torch.get_num_threads()),
            "torch": torch.__version__,
            "load_average_at_end": os.getloadavg(),
        },
        "note": args.note,
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
