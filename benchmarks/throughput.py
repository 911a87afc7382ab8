"""Training throughput of whole recipes: steps and sequences per second, peak memory.

Builds each recipe's trainer exactly as ``memctl train`` does (at the curriculum's top
level, so every batch is as long as training ever gets), runs warm-up steps, then times
``--steps`` training steps (sample, forward, loss, backward, clip, optimizer step).

    python benchmarks/throughput.py recipes/copy_lstm.yaml recipes/ntm_copy.yaml \
        --device cuda --out benchmarks/throughput_cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch
from machine import cpu_name, synchronizer

from memctl.lifecycle import seed_everything
from memctl.recipe import load_recipe
from memctl.trainer import Trainer


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def measure(path: Path, device: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    recipe = load_recipe(path, ["curriculum.type=fixed", f"device={device}", *overrides])
    seed_everything(recipe.seed)
    trainer = Trainer(recipe)
    synchronize = synchronizer(trainer.device.type)
    for _ in range(warmup):
        trainer.train_step()
    synchronize()
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    synchronize()
    elapsed = time.perf_counter() - start
    if trainer.device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "recipe": str(path),
        "overrides": overrides,
        "compiled": recipe.train.compile,
        "model": recipe.model.type,
        "task": recipe.task.type,
        "level": trainer.curriculum.level,
        "batch_size": recipe.train.batch_size,
        "steps_per_s": round(steps / elapsed, 2),
        "sequences_per_s": round(steps * recipe.train.batch_size / elapsed, 1),
        "peak_memory_mib": round(peak_mib, 1),
        "device": device_name(trainer.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = []
    for path in args.recipes:
        result = measure(path, args.device, args.steps, args.warmup, args.set)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        saved = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "results": results,
        }
        args.out.write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    main()
