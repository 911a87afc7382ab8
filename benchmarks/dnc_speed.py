"""DNC speed and memory, memctl against pytorch-dnc 1.1.0 (the published peer), side by
side in one run.

1. Copy training (batch 32, 18 time steps of 10 inputs, LSTM 64 with one layer, memory
   32 x 16, 4 read heads, sigmoid cross-entropy, Adam 1e-3 fused for both, as ``memctl
   train`` steps): training steps per second of the peer and of memctl's drop-in
   ``DNC``, by ``mode``: ``eager``, what a user gets (the native CPU sequence,
   ``memctl.models.dnc.native``; with ``train.compile: true`` too, since ``run`` keeps the
   native sequence where it serves the model); ``torch``, the PyTorch path eager
   (``MEMCTL_NATIVE=0``); ``step``, the PyTorch path with ``compile_step()`` (each time
   step compiled); ``sequence``, with ``compile_sequence()`` (the whole 18-step loop as
   one graph; minutes to compile, see ``first_step_s``).
2. One forward + backward (batch 8, T time steps, LSTM 64, cells of 32, 4 read heads,
   16 inputs) against the memory size N: seconds and peak resident memory, each case in
   its own process under an address-space limit (``resource.setrlimit``), so a case that
   does not fit fails alone instead of exhausting the machine.

Both models are built with the same pytorch-dnc constructor arguments, so they have the
same number of parameters. ``--peer`` creates a separate virtual environment (default
/tmp/memctl-dnc-peer) with ``torch==2.13.0`` and ``dnc==1.1.0`` and runs the peer's cases
there; ``--peer-here`` runs them with this Python instead, where ``dnc`` 1.1.0 is already
importable (a GPU machine without internet, the wheel on PYTHONPATH). The peer is never a
dependency of memctl. Results are saved as JSON with the machine, its load average and
the torch threads.

``--device cuda`` runs every case on the GPU (the peer with ``gpu_id=0``); each timed
step ends with ``torch.cuda.synchronize()``, and case 2's memory is the peak of
``torch.cuda.max_memory_allocated`` instead of resident memory (no address-space limit).

    OMP_NUM_THREADS=2 python benchmarks/dnc_speed.py --peer --threads 2 \
        --out benchmarks/dnc_speed.json

``--wait-policies PASSIVE,default`` measures memctl's cases under each OpenMP wait policy
in alternating order, each case in its own process as above (what the ``memctl`` command
sets against what a plain ``python`` gets).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import venv
from pathlib import Path

from machine import describe_machine, run_in_process, synchronizer, time_steps

PEER_PACKAGES = ["torch==2.13.0", "dnc==1.1.0"]
COPY = dict(
    input_size=10,
    hidden_size=64,
    rnn_type="lstm",
    num_layers=1,
    num_hidden_layers=1,
    nr_cells=32,
    cell_size=16,
    read_heads=4,
    batch_first=True,
    gpu_id=-1,
)


def dnc_class(implementation: str):
    if implementation == "peer":
        from dnc import DNC
    else:
        from memctl.models import DNC
    return DNC


def copy_training(implementation: str, mode: str, steps: int, warmup: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    rnn = dnc_class(implementation)(**{**COPY, "gpu_id": 0 if device == "cuda" else -1})
    if mode in ("step", "sequence"):
        getattr(rnn, f"compile_{mode}")()
    # Both with fused Adam (one kernel for all parameters), as `memctl train` steps.
    optimizer = torch.optim.Adam(rnn.parameters(), lr=1e-3, fused=True)
    generator = torch.Generator().manual_seed(0)
    synchronize = synchronizer(device)

    def step() -> None:
        x = torch.randint(0, 2, (32, 18, 10), generator=generator).float().to(device)
        output, _ = rnn(x, (None, None, None), reset_experience=True)
        loss = F.binary_cross_entropy_with_logits(output, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        synchronize()

    start = time.perf_counter()
    step()
    first_step = time.perf_counter() - start
    times, cpu_seconds = time_steps(step, steps, warmup)
    return {
        "median_step_ms": round(1000 * statistics.median(times), 2),
        "steps_per_second": round(1 / statistics.median(times), 2),
        "steps_per_cpu_second": round(steps / cpu_seconds, 2),
        "first_step_s": round(first_step, 2),
        "parameters": sum(p.numel() for p in rnn.parameters()),
        **({"gpu": torch.cuda.get_device_name()} if device == "cuda" else {}),
    }


def forward_backward(implementation: str, slots: int, steps: int, device: str) -> dict:
    import torch

    torch.manual_seed(0)
    rnn = dnc_class(implementation)(
        input_size=16,
        hidden_size=64,
        num_hidden_layers=1,
        nr_cells=slots,
        cell_size=32,
        read_heads=4,
        batch_first=True,
        gpu_id=0 if device == "cuda" else -1,
    )
    x = torch.randn(8, steps, 16).to(device)
    synchronize = synchronizer(device)
    synchronize()
    start = time.perf_counter()
    output, _ = rnn(x, (None, None, None), reset_experience=True)
    output.square().mean().backward()
    synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        return {
            "seconds": round(seconds, 3),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20),
            "gpu": torch.cuda.get_device_name(),
        }
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(peak_kib / 1024)}


def worker(spec: dict) -> None:
    """Run one case in this process and print its JSON."""
    import torch

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    if spec["case"] == "copy":
        result = copy_training(spec["implementation"], spec["mode"], spec["steps"], 3, device)
    else:
        if device == "cpu":
            limit = int(spec["memory_limit_gib"] * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        result = forward_backward(spec["implementation"], spec["slots"], spec["steps"], device)
    print(json.dumps(result), flush=True)


def run_case(python: str, spec: dict, timeout: float) -> dict:
    """One case in a fresh process; a failure (memory limit, timeout) is a result too."""
    policy = spec.get("omp_wait_policy")  # None: as this process has it
    environment: dict[str, str | None] = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    if policy is not None:
        environment["OMP_WAIT_POLICY"] = None if policy == "default" else policy
    if spec.get("mode") in ("torch", "step", "sequence"):
        environment["MEMCTL_NATIVE"] = "0"
    return run_in_process(__file__, spec, timeout, python, environment)


def copy_summary(results: list[dict]) -> dict:
    """Per memctl mode: the median over rounds of its median step time, and of its speed-up
    over the peer's run in the same round."""
    copies = [r for r in results if r["case"] == "copy" and "median_step_ms" in r]
    peer = {r["round"]: r["median_step_ms"] for r in copies if r["implementation"] == "peer"}
    summary = {}
    for mode in sorted({r["mode"] for r in copies if r["implementation"] == "memctl"}):
        rows = [r for r in copies if r["implementation"] == "memctl" and r["mode"] == mode]
        times = [r["median_step_ms"] for r in rows]
        ratios = [peer[r["round"]] / r["median_step_ms"] for r in rows if r["round"] in peer]
        summary[mode] = {
            "median_step_ms": round(statistics.median(times), 2),
            "speedups": [round(ratio, 2) for ratio in ratios],
            **({"median_speedup": round(statistics.median(ratios), 2)} if ratios else {}),
        }
    if peer:
        summary["peer"] = {"median_step_ms": round(statistics.median(peer.values()), 2)}
    return summary


def wait_policy_summary(results: list[dict]) -> dict:
    """``--wait-policies``: per case, each policy's median step time (copy) or seconds
    (forward + backward) over the rounds, and the median of each round's ratio of the
    first policy's time to the second's."""
    timed = [r for r in results if "omp_wait_policy" in r and "error" not in r]
    policies = list(dict.fromkeys(r["omp_wait_policy"] for r in timed))
    summary = {}
    for case in sorted({(r["case"], r.get("mode"), r.get("slots")) for r in timed}, key=str):
        rows = [r for r in timed if (r["case"], r.get("mode"), r.get("slots")) == case]
        field = "median_step_ms" if case[0] == "copy" else "seconds"
        by_round = {}
        for r in rows:
            by_round.setdefault(r["round"], {})[r["omp_wait_policy"]] = r[field]
        name = f"copy {case[1]}" if case[0] == "copy" else f"forward_backward N={case[2]}"
        entry = {
            policy: round(
                statistics.median(r[field] for r in rows if r["omp_wait_policy"] == policy), 3
            )
            for policy in policies
        }
        ratios = [t[policies[0]] / t[policies[1]] for t in by_round.values() if len(t) == 2]
        entry[f"{policies[0]}/{policies[1]}"] = [round(x, 3) for x in ratios]
        if ratios:
            entry["median_ratio"] = round(statistics.median(ratios), 3)
        summary[name] = entry
    return summary


def peer_python(path: Path) -> str:
    python = path / "bin" / "python"
    if not python.exists():
        print(f"creating {path} with {' '.join(PEER_PACKAGES)}", flush=True)
        venv.create(path, with_pip=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return str(python)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--peer", action="store_true", help="also run pytorch-dnc 1.1.0")
    parser.add_argument("--peer-venv", type=Path, default=Path("/tmp/memctl-dnc-peer"))
    parser.add_argument(
        "--peer-here", action="store_true", help="run the peer with this Python (dnc importable)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per case")
    parser.add_argument("--steps", type=int, default=30, help="timed copy training steps")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of the (uncompiled) copy cases"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled cases")
    parser.add_argument("--no-sequence", action="store_true", help="skip the compile_sequence case")
    parser.add_argument("--slots", default="64,256,1024", help="memory sizes N for case 2")
    parser.add_argument("--time-steps", type=int, default=100, help="T of case 2")
    parser.add_argument("--peer-slots", default="64,256,1024", help="N the peer runs")
    parser.add_argument("--memory-limit-gib", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=None, help="save results as JSON")
    parser.add_argument("--note", default="", help="saved with the results")
    parser.add_argument(
        "--wait-policies",
        default=None,
        help="e.g. PASSIVE,default: run memctl's cases (copy and forward + backward) under "
        "each OMP_WAIT_POLICY in turn every round ('default': unset); no peer, no compiling",
    )
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    pythons = {"memctl": sys.executable}
    if args.peer_here:
        pythons["peer"] = sys.executable
    elif args.peer:
        pythons["peer"] = peer_python(args.peer_venv)
    load_before = os.getloadavg()
    results = []

    def record(python: str, spec: dict, timeout: float) -> None:
        row = run_case(python, {**spec, "threads": args.threads, "device": args.device}, timeout)
        print(json.dumps(row), flush=True)
        results.append(row)

    if args.wait_policies:
        wait_policy_rounds(args, record)
        results_summary = wait_policy_summary(results)
        report = {
            "benchmark": "dnc_speed_wait_policy",
            "wait_policy_summary": results_summary,
            "machine": {
                **describe_machine(args.threads),
                "device": args.device,
                "load_average_at_start": load_before,
                "load_average_at_end": os.getloadavg(),
            },
            "note": args.note,
            "results": results,
        }
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(results_summary))
        return
    modes = ["eager", "torch"] + ([] if args.no_compile else ["step"])
    modes += [] if args.no_compile or args.no_sequence else ["sequence"]
    copy_cases = [("peer", "eager")] if "peer" in pythons else []
    copy_cases += [("memctl", mode) for mode in modes]
    # Round-robin, so that a slow minute of a shared machine hits every case alike.
    for round_number in range(args.repeat):
        for implementation, mode in copy_cases:
            if round_number > 0 and mode in ("step", "sequence"):
                continue  # minutes of compiling: once is enough
            spec = {"case": "copy", "implementation": implementation, "mode": mode}
            spec.update(steps=args.steps, round=round_number)
            record(pythons[implementation], spec, 1800)
    for implementation, slots_list in (("memctl", args.slots), ("peer", args.peer_slots)):
        if implementation not in pythons:
            continue
        for slots in (int(n) for n in slots_list.split(",")):
            spec = {
                "case": "forward_backward",
                "implementation": implementation,
                "slots": slots,
                "steps": args.time_steps,
                "memory_limit_gib": args.memory_limit_gib,
            }
            record(pythons[implementation], spec, 900)

    report = {
        "benchmark": "dnc_speed",
        "copy_summary": copy_summary(results),
        "machine": {
            **describe_machine(args.threads),
            "device": args.device,
            "load_average_at_start": load_before,
            "load_average_at_end": os.getloadavg(),
        },
        "note": args.note,
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["copy_summary"]))


def wait_policy_rounds(args: argparse.Namespace, record) -> None:
    """Every round: memctl's eager copy case, then its forward + backward at each of
    ``--slots``, each under every policy of ``--wait-policies`` in turn."""
    policies = args.wait_policies.split(",")
    for round_number in range(args.repeat):
        for policy in policies if round_number % 2 == 0 else policies[::-1]:
            spec = {"case": "copy", "implementation": "memctl", "mode": "eager"}
            spec.update(steps=args.steps, round=round_number, omp_wait_policy=policy)
            record(sys.executable, spec, 1800)
        for slots in (int(n) for n in args.slots.split(",")):
            for policy in policies if round_number % 2 == 0 else policies[::-1]:
                spec = {"case": "forward_backward", "implementation": "memctl", "slots": slots}
                spec.update(steps=args.time_steps, memory_limit_gib=args.memory_limit_gib)
                spec.update(round=round_number, omp_wait_policy=policy)
                record(sys.executable, spec, 900)


if __name__ == "__main__":
    main()
