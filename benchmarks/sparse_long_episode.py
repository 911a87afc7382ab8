"""A long episode through truncated backpropagation against short episodes, on SAM.

The recipe model ``model.type: sam`` (one LSTM layer of 64, input and output 16, batch
8, words of 32, 4 read heads, K = 4) at N = 2^17 slots, two cases, each in its own
process:

``episodic``  ``--episodes`` episodes (20) of ``--chunk`` steps (1,000), each from a
              reset memory, one forward + backward each: what ``train.tbptt: null`` does
              on sequences of that length. The process's peak grows over the first
              episodes (the heap's free space between allocations settles) and stays
              from about the 20th, so that is the peak of training on such episodes
``long``      one episode of ``--steps`` steps (100,000) cut into chunks of ``--chunk``,
              each chunk's forward + backward starting from the previous chunk's state
              detached, as ``train.tbptt: 1000`` does: the memory carries across chunks
              and fills up (SAM writes a least-used row each step)

Reported per case: ``step_ms`` (wall seconds per time step over all timed chunks, and
``chunk_ms`` the chunks' median, first and last), ``search_ms`` and ``index_update_ms``
(the part of ``step_ms`` in the slot index's ``candidates`` and ``update``, the latter
with the snapshot's refreshes and rebuilds), ``rss_before_mb`` (resident memory
once the model is built), ``peak_rss_mb`` and ``memory_tensor_mb`` (the ``[B, N, 32]``
float32 memory). The comparisons: ``long`` step time over ``episodic``'s, and ``long``'s
peak against ``episodic``'s peak plus twice the memory tensor. The search is
``--index`` (faiss by default: ``auto`` stays exact unless an episode writes 2^17 rows,
which a 100,000-step one does not), its snapshot updated every ``--rebuild-every``
steps (``model.rebuild_every``, 1,000).

    OMP_NUM_THREADS=1 python benchmarks/sparse_long_episode.py --threads 1 \\
        --out benchmarks/sparse_long_episode.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from machine import describe_machine, run_in_process
from sparse_speed import resident_mb

BATCH, WORD, HEADS, K, CONTROLLER, FEATURES = 8, 32, 4, 4, 64, 16


def timed(method: Callable, spent: dict[str, float], name: str) -> Callable:
    """``method``, adding its wall seconds to ``spent[name]``."""

    def run(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args)
        finally:
            spent[name] += time.perf_counter() - start

    return run


def worker(spec: dict) -> dict:
    import torch

    from memctl.models.base import detach_state
    from memctl.registry import MODELS

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    entry = MODELS.get("sam")
    config = entry.config(
        controller_size=CONTROLLER,
        memory_size=spec["slots"],
        word_size=WORD,
        read_heads=HEADS,
        sparse_reads=K,
        index=spec["index"],
        rebuild_every=spec["rebuild_every"],
    )
    model = entry.cls(config, FEATURES, FEATURES)
    spent = {"candidates": 0.0, "update": 0.0}
    for access in model.memories:
        for name in spent:
            setattr(access.index, name, timed(getattr(access.index, name), spent, name))
    chunk, steps = spec["chunk"], spec["steps"]
    chunks = steps // chunk if spec["case"] == "long" else spec["episodes"]
    before = resident_mb()
    state, times = None, []
    for number in range(chunks + 1):  # the first untimed
        x = torch.randn(chunk, BATCH, FEATURES)
        if number == 1:
            spent.update(dict.fromkeys(spent, 0.0))
        start = time.perf_counter()
        output, state = model(x, state if spec["case"] == "long" else None)
        output.square().mean().backward()
        state = detach_state(state)
        if number:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "backend": model.describe_backend(BATCH),
        "timed_chunks": len(times),
        "step_ms": round(1000 * sum(times) / (len(times) * chunk), 3),
        "search_ms": round(1000 * spent["candidates"] / (len(times) * chunk), 3),
        "index_update_ms": round(1000 * spent["update"] / (len(times) * chunk), 3),
        "chunk_ms": {
            "median": round(1000 * statistics.median(times), 1),
            "first": round(1000 * times[0], 1),
            "last": round(1000 * times[-1], 1),
        },
        "rss_before_mb": round(before),
        "peak_rss_mb": round(peak),
        "memory_tensor_mb": round(BATCH * spec["slots"] * WORD * 4 / 2**20, 1),
    }


def markdown(report: dict) -> str:
    """The docs' table of a saved run: a row per case, then the two comparisons."""
    lines = [
        "| case | step | in the search | in the index's updates | peak memory |",
        "|---|---:|---:|---:|---:|",
    ]
    for case, row in report["results"].items():
        if case == "episodic":
            what = f"episodic, {row['timed_chunks']} x {row['chunk']:,} steps"
        else:
            what = f"long, {row['steps']:,} steps"
        lines.append(
            f"| {what} | {row['step_ms']:.3g} ms | {row['search_ms']:.3g} ms"
            f" | {row['index_update_ms']:.2g} ms | {row['peak_rss_mb']:,} MB |"
        )
    if "long_over_episodic_step_time" in report:
        lines += [
            "",
            f"- long over episodic step time: {report['long_over_episodic_step_time']:.2f}",
            f"- long peak over episodic peak: {report['long_peak_over_episodic_peak_mb']:,} MB"
            f" (twice the memory tensor: {report['twice_the_memory_tensor_mb']:.0f} MB)",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--slots", type=int, default=2**17, help="N")
    parser.add_argument("--steps", type=int, default=100_000, help="the long episode's T")
    parser.add_argument("--chunk", type=int, default=1000, help="train.tbptt's chunk")
    parser.add_argument("--episodes", type=int, default=20, help="timed short episodes")
    parser.add_argument("--index", default="faiss", choices=("exact", "faiss", "auto"))
    parser.add_argument(
        "--rebuild-every", type=int, default=1000, help="model.rebuild_every: snapshot updates"
    )
    parser.add_argument("--out", type=Path, default=None, help="save results as JSON")
    parser.add_argument(
        "--markdown", type=Path, metavar="JSON", help="print the docs' table of a saved run"
    )
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    results = {}
    for case in ("episodic", "long"):
        spec = dict(case=case, slots=args.slots, steps=args.steps, chunk=args.chunk)
        spec.update(episodes=args.episodes, index=args.index, threads=args.threads)
        spec.update(rebuild_every=args.rebuild_every)
        results[case] = run_in_process(__file__, spec, 7200)
        print(json.dumps(results[case]), flush=True)
    episodic, long = results["episodic"], results["long"]
    report = {
        "benchmark": "sparse_long_episode",
        "machine": describe_machine(args.threads),
        "batch": BATCH,
        "word": WORD,
        "read_heads": HEADS,
        "sparse_reads": K,
        "results": results,
    }
    if "error" not in episodic and "error" not in long:
        report["long_over_episodic_step_time"] = round(long["step_ms"] / episodic["step_ms"], 3)
        report["long_peak_over_episodic_peak_mb"] = long["peak_rss_mb"] - episodic["peak_rss_mb"]
        report["twice_the_memory_tensor_mb"] = 2 * long["memory_tensor_mb"]
        print(json.dumps({k: v for k, v in report.items() if k.startswith(("long_", "twice"))}))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
