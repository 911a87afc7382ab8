"""Write a small sequence dataset for ``task.type: sequences``: a noisy delayed copy.

Each sequence is a run of random binary vectors, seen through Gaussian noise; the target
at step t is the clean vector of step t - DELAY (the first DELAY steps are not scored).
Lengths vary, so the arrays are ragged (``lengths``), and each sequence's ``level`` is
its length, for a curriculum from short sequences to long ones.

    python examples/make_sequences.py data

writes data/train.npz and data/eval.npz (np.savez: uncompressed, so they are mapped).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

WIDTH = 4
DELAY = 2
NOISE = 0.2


def delayed_copy(count: int, min_length: int, max_length: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` padded sequences of lengths in [min_length, max_length]: the arrays of
    one file (inputs, targets, mask, lengths, level)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_length, max_length + 1, count)
    bits = rng.integers(0, 2, (count, max_length, WIDTH)).astype(np.float32)
    steps = np.arange(max_length)
    inside = steps < lengths[:, None]
    bits *= inside[..., None]
    inputs = bits + NOISE * rng.standard_normal(bits.shape).astype(np.float32)
    inputs *= inside[..., None]
    targets = np.zeros_like(bits)
    targets[:, DELAY:] = bits[:, :-DELAY]
    mask = (steps >= DELAY).astype(np.float32)[None].repeat(count, 0)
    return {
        "inputs": inputs,
        "targets": targets,
        "mask": mask,
        "lengths": lengths,
        "level": lengths.copy(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where train.npz and eval.npz go")
    parser.add_argument("--train", type=int, default=2000, help="training sequences")
    parser.add_argument("--eval", type=int, default=500, help="evaluation sequences")
    parser.add_argument("--min-length", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=12)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train", args.train, 0), ("eval", args.eval, 1)):
        arrays = delayed_copy(count, args.min_length, args.max_length, seed)
        np.savez(args.folder / f"{name}.npz", **arrays)
        print(f"{args.folder / name}.npz: {count} sequences")


if __name__ == "__main__":
    main()
