"""Time per HAM memory access against the number of leaves n, soft and hard mode.

The model is the raw HAM of ``recipes/ham_min8.yaml`` (tree size 20, controller 20, MLPs
of 20 hidden units), batch 8. The tree is built once per n (the O(n) EMBED and JOIN
pass, not timed); then A go steps run as A accesses. The cost of one access is the
marginal cost ``(time(A2) - time(A1)) / (A2 - A1)``, each time the fastest of 5 runs,
which cancels every per-call constant (CPU time of the process on CPU, so that other
jobs on shared cores do not count; wall time on CUDA), in two settings:

``forward``   eval mode under ``torch.no_grad`` (greedy paths in hard mode)
``train``     training mode, forward and backward of the outputs' sum, the tree a leaf
              that requires grad (its one O(n) gradient buffer cancels in the difference);
              up to n = 2^14 (hard) and 2^12 (soft) by default, as it is O(n log n) and
              O(n) per access

Hard mode's forward is O(log n) per access: the script fits ``time = a + b log2 n`` and
reports ``b``, the cost of one more tree level. Soft mode is O(n) per access; its log-log
slope is reported. Results are saved as JSON with the machine they came from.

    OMP_NUM_THREADS=1 python benchmarks/ham_access.py --out benchmarks/ham_access.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_name

from memctl.models.ham import HAM, HAMConfig, HAMState

BATCH, ITEM_BITS = 8, 10


def go_steps(accesses: int, device: torch.device) -> torch.Tensor:
    inputs = torch.zeros(accesses, BATCH, ITEM_BITS + 2, device=device)
    inputs[:, :, -1] = 1
    return inputs


def clock(device: torch.device) -> float:
    """CPU time of this process on CPU (robust to other jobs sharing the cores), wall
    time on CUDA."""
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def run_once(model: HAM, tree: torch.Tensor, accesses: int, train: bool) -> float:
    state_tree = tree.detach().requires_grad_(train)
    zeros = tree.new_zeros(BATCH, 0)
    state = HAMState(state_tree, zeros, zeros, tree.new_zeros(BATCH, tree.shape[-1]))
    inputs = go_steps(accesses, tree.device)
    synchronize(tree.device)
    start = clock(tree.device)
    with torch.set_grad_enabled(train):
        outputs, _ = model(inputs, state)
        if train:
            outputs.sum().backward()
    synchronize(tree.device)
    return clock(tree.device) - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_access(model: HAM, tree: torch.Tensor, few: int, many: int, train: bool) -> float:
    """Marginal seconds per access: the fastest of 5 runs of ``many`` accesses minus the
    fastest of 5 runs of ``few`` (after one warm-up), over ``many - few``."""
    run_once(model, tree, few, train)
    fastest = {
        count: min(run_once(model, tree, count, train) for _ in range(5)) for count in (few, many)
    }
    return (fastest[many] - fastest[few]) / (many - few)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; returns (a, b)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return mean_y - slope * mean_x, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-log2-n", type=int, default=16)
    parser.add_argument("--soft-max-log2-n", type=int, default=16)
    parser.add_argument(
        "--train-max-log2-n", type=int, default=14, help="largest n timed with backward, hard"
    )
    parser.add_argument(
        "--soft-train-max-log2-n", type=int, default=12, help="largest n timed with backward, soft"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    rows = []
    for mode in ("hard", "soft"):
        last = args.max_log2_n if mode == "hard" else args.soft_max_log2_n
        last_train = args.train_max_log2_n if mode == "hard" else args.soft_train_max_log2_n
        model = HAM(HAMConfig(mode=mode), ITEM_BITS + 2, 5).to(device)
        for log2_n in range(3, last + 1):
            n = 2**log2_n
            data = torch.zeros(n, BATCH, ITEM_BITS + 2, device=device)
            data[:, :, :ITEM_BITS] = torch.randint(0, 2, (n, BATCH, ITEM_BITS)).float()
            data[:, :, -2] = 1
            with torch.no_grad():
                tree = model.initial_state(data).tree
            few, many = (8, 24) if mode == "hard" else (1, 4)
            row = {"mode": mode, "n": n, "forward_us": None, "train_us": None}
            for setting, train in (("forward", False), ("train", True)):
                if not train or log2_n <= last_train:
                    model.train(train)
                    row[f"{setting}_us"] = 1e6 * per_access(model, tree, few, many, train)
            rows.append(row)
            print(
                f"{mode:4s} n={n:6d}  "
                + "  ".join(
                    f"{setting} {row[f'{setting}_us'] or float('nan'):10.1f} us"
                    for setting in ("forward", "train")
                ),
                flush=True,
            )

    summary = {}
    for mode in ("hard", "soft"):
        for setting in ("forward", "train"):
            mine = [r for r in rows if r["mode"] == mode and r[f"{setting}_us"] is not None]
            levels = [math.log2(r["n"]) for r in mine]
            times = [r[f"{setting}_us"] for r in mine]
            if len(mine) < 2:
                continue
            intercept, per_level = fit_line(levels, times)
            large = [(lv, t) for lv, t in zip(levels, times, strict=True) if lv >= 10]
            loglog = (
                fit_line([lv for lv, _ in large], [math.log2(max(t, 1e-3)) for _, t in large])[1]
                if len(large) >= 2
                else None
            )
            summary[f"{mode}_{setting}"] = {
                "us_per_level": per_level,
                "us_intercept": intercept,
                "loglog_slope_n_ge_1024": loglog,
            }
            print(
                f"{mode} {setting}: {intercept:.1f} + {per_level:.1f} us x log2 n; "
                f"log-log slope (n >= 1024) {loglog}"
            )
    result = {
        "benchmark": "ham_access",
        "batch": BATCH,
        "model": HAMConfig().model_dump(),
        "machine": {
            "cpu": cpu_name(),
            "device": str(device)
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "clock": "wall" if device.type == "cuda" else "process CPU time",
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "rows": rows,
        "fits": summary,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
