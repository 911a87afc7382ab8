"""Training throughput of whole recipes: steps and sequences per second, peak memory.

Builds each recipe's trainer exactly as ``memctl train`` does (at the curriculum's top
level, so every batch is as long as training ever gets), runs warm-up steps, then times
``--steps`` training steps (sample, forward, loss, backward, clip, optimizer step).

    python benchmarks/throughput.py recipes/copy_lstm.yaml recipes/ntm_copy.yaml \
        --device cuda --out benchmarks/throughput_cuda.json

``--vary KEY=V1,V2,...`` measures each recipe at each value of one field, each point in
its own process (so each peak memory is its own), ``--rounds`` times in alternation (on
a shared machine only ratios within one round compare):

    python benchmarks/throughput.py recipes/sam_copy.yaml --device cpu \
        --vary model.memory_size=1024,262144 --rounds 3 --out benchmarks/sam_copy_slots.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from pathlib import Path

import torch
from machine import cpu_name, describe_machine, synchronizer

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
    parser.add_argument("--vary", metavar="KEY=V1,V2,...", help="one field's values")
    parser.add_argument("--rounds", type=int, default=1, help="with --vary: alternations")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.vary is None:
        points = [(path, args.set) for path in args.recipes]
    else:
        key, _, values = args.vary.partition("=")
        points = [
            (path, [*args.set, f"{key}={value}"])
            for _ in range(args.rounds)
            for path in args.recipes
            for value in values.split(",")
        ]
    results = []
    spawn = multiprocessing.get_context("spawn")
    for path, overrides in points:
        point = (path, args.device, args.steps, args.warmup, overrides)
        if args.vary is None:
            result = measure(*point)
        else:
            with spawn.Pool(1) as pool:
                result = pool.apply(measure, point)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        saved = {
            "machine": describe_machine(torch.get_num_threads()),
            "torch": torch.__version__,
            "results": results,
        }
        args.out.write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    main()
