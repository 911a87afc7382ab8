"""Time per HAM memory access against the number of leaves n, soft and hard mode.

The model is the raw HAM of ``recipes/ham_min8.yaml`` (tree size 20, controller 20, MLPs
of 20 hidden units), batch 8. The tree is built once per n (the O(n) EMBED and JOIN
pass, not timed); then A go steps run as A accesses. The cost of one access is the
marginal cost ``(time(A2) - time(A1)) / (A2 - A1)``, each time the fastest of 5 runs,
which cancels every per-call constant (CPU time of the process on CPU, so that other
jobs on shared cores do not count; wall time on CUDA), in these settings:

``forward``          eval mode under ``torch.no_grad`` (greedy paths in hard mode)
``train``            training mode, forward and backward of the outputs' sum plus (hard)
                     REINFORCE's ``auxiliary_loss``, the tree a leaf that requires grad
                     (its O(n) gradient, once per sequence, cancels in the difference);
                     hard mode on the default ``path`` backend, n = 8 .. 65,536; soft
                     mode up to n = 2^12 by default, as it is O(n) per access
``train_reference``  the same, hard mode on ``backend: reference`` (plain autograd on the
                     heap tensor, O(n log n) per access), up to n = 2^12 by default

Hard mode is O(log n) per access: the script fits ``time = a + b log2 n`` and reports
``b``, the cost of one more tree level, and the log-log slope of time against n over
every n timed and over n >= 1,024 (0 for constant time, 1 for time proportional to n).
Results are saved as JSON with the machine they came from.

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
            reinforce = model.auxiliary_loss(outputs.detach().pow(2).sum(dim=(0, 2)))
            (outputs.sum() + reinforce).backward()
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


def loglog_slope(levels: list[float], times: list[float]) -> float | None:
    """Least-squares slope of log2 time against log2 n; None for fewer than 2 points."""
    if len(levels) < 2:
        return None
    return fit_line(levels, [math.log2(max(t, 1e-3)) for t in times])[1]


SETTINGS = {  # name: (mode, backend, training)
    "hard_forward": ("hard", "path", False),
    "hard_train": ("hard", "path", True),
    "hard_train_reference": ("hard", "reference", True),
    "soft_forward": ("soft", "path", False),
    "soft_train": ("soft", "path", True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-log2-n", type=int, default=16, help="largest n, hard mode")
    parser.add_argument("--soft-max-log2-n", type=int, default=16, help="largest n, soft")
    parser.add_argument(
        "--reference-train-max-log2-n",
        type=int,
        default=12,
        help="largest n timed with backward on the hard reference backend",
    )
    parser.add_argument(
        "--soft-train-max-log2-n", type=int, default=12, help="largest n timed with backward, soft"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    largest = {
        "hard_forward": args.max_log2_n,
        "hard_train": args.max_log2_n,
        "hard_train_reference": min(args.reference_train_max_log2_n, args.max_log2_n),
        "soft_forward": args.soft_max_log2_n,
        "soft_train": min(args.soft_train_max_log2_n, args.soft_max_log2_n),
    }

    rows = []
    for mode in ("hard", "soft"):
        models = {
            backend: HAM(HAMConfig(mode=mode, backend=backend), ITEM_BITS + 2, 5).to(device)
            for backend in ("path", "reference")
        }
        models["reference"].load_state_dict(models["path"].state_dict())
        mine = {name: spec for name, spec in SETTINGS.items() if spec[0] == mode}
        for log2_n in range(3, max(largest[name] for name in mine) + 1):
            n = 2**log2_n
            data = torch.zeros(n, BATCH, ITEM_BITS + 2, device=device)
            data[:, :, :ITEM_BITS] = torch.randint(0, 2, (n, BATCH, ITEM_BITS)).float()
            data[:, :, -2] = 1
            with torch.no_grad():
                tree = models["path"].initial_state(data).tree
            few, many = (8, 24) if mode == "hard" else (1, 4)
            row = {"mode": mode, "n": n}
            for name, (_, backend, train) in mine.items():
                setting = name.removeprefix(f"{mode}_")
                row[f"{setting}_us"] = None
                if log2_n <= largest[name]:
                    model = models[backend].train(train)
                    row[f"{setting}_us"] = 1e6 * per_access(model, tree, few, many, train)
            rows.append(row)
            print(
                f"{mode:4s} n={n:6d}  "
                + "  ".join(
                    f"{key.removesuffix('_us')} {value or float('nan'):10.1f} us"
                    for key, value in row.items()
                    if key.endswith("_us")
                ),
                flush=True,
            )

    summary = {}
    for name, (mode, _, _) in SETTINGS.items():
        key = f"{name.removeprefix(f'{mode}_')}_us"
        mine = [r for r in rows if r["mode"] == mode and r.get(key) is not None]
        if len(mine) < 2:
            continue
        levels = [math.log2(r["n"]) for r in mine]
        times = [r[key] for r in mine]
        intercept, per_level = fit_line(levels, times)
        large = [(lv, t) for lv, t in zip(levels, times, strict=True) if lv >= 10]
        summary[name] = {
            "n": [mine[0]["n"], mine[-1]["n"]],
            "us_per_level": per_level,
            "us_intercept": intercept,
            "loglog_slope": loglog_slope(levels, times),
            "loglog_slope_n_ge_1024": loglog_slope([lv for lv, _ in large], [t for _, t in large]),
        }
        print(
            f"{name}: {intercept:.1f} + {per_level:.1f} us x log2 n; log-log slope "
            f"{summary[name]['loglog_slope']:.3f} (n = {mine[0]['n']} .. {mine[-1]['n']}), "
            f"{summary[name]['loglog_slope_n_ge_1024']} (n >= 1024)"
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
