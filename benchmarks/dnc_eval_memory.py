"""Peak memory of one DNC forward pass with and without gradients, against the length.

With gradients the native sequence keeps every step's state for backward (link matrices
included); without (evaluation, ``torch.no_grad()``) it keeps two states taking turns.
Each case runs in its own process and reports its peak resident set:

    python benchmarks/dnc_eval_memory.py --lengths 100,400 --out benchmarks/dnc_eval_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from machine import describe_machine


def worker(spec: dict) -> None:
    import torch

    from memctl.models import DNC

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    rnn = DNC(16, 64, nr_cells=spec["slots"], cell_size=32, read_heads=4)
    inputs = torch.randn(8, spec["length"], 16)
    start = time.perf_counter()
    with torch.set_grad_enabled(spec["grad"]):
        rnn(inputs, (None, None, None), reset_experience=True)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(json.dumps({**spec, "seconds": round(seconds, 3), "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=256, help="memory size N")
    parser.add_argument("--lengths", default="100,400", help="sequence lengths T")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="save results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    results = []
    for length in (int(n) for n in args.lengths.split(",")):
        for grad in (True, False):
            spec = {"slots": args.slots, "length": length, "grad": grad, "threads": args.threads}
            done = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(json.loads(done.stdout))
            print(done.stdout.strip(), flush=True)
    if args.out:
        record = {"machine": describe_machine(args.threads), "results": results}
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1)


if __name__ == "__main__":
    main()
