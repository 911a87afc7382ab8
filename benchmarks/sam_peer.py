"""pytorch-dnc 1.1.0's SAM (the published peer) beside memctl's, side by side: how the
peer fails as packaged, then one forward+backward's time against N with its two fixes.

Both are built with the same pytorch-dnc constructor arguments (``SAM(input_size=16,
hidden_size=64, num_hidden_layers=1, nr_cells=N, cell_size=32, read_heads=4,
sparse_reads=4)``, one LSTM layer of 64, batch first) and run the same pass: batch 8,
T = 100 random inputs from a new episode (``reset_experience=True``), the mean squared
output backpropagated. The peer runs with the Python of its own virtual environment
(``--peer-venv``, made with ``pip install torch==2.13.0 dnc==1.1.0``; never memctl's),
each stage and point in its own process:

``packaged``  the peer as pip installs it, from a directory without libflann
``flann``     the first fix: libflann 1.9 from Debian (``apt-get install libflann1.9``)
              where pyflann looks for it: ``linux/libflann.so`` relative to the working
              directory, a link to ``--libflann``
``fixed``     both fixes: libflann, and a copy of the peer's package whose four in-place
              ``scatter_`` in ``sparse_memory.py`` (memory, write weights, usage, read
              weights) are made out of place, first on the peer's PYTHONPATH; the
              installed package is not changed

``memctl`` is ``memctl.models.SAM`` with this Python. ``fixed`` and ``memctl`` alternate
at each N = ``--slots``: one untimed pass, then ``--repeats`` timed ones, the median as
``seconds``; ``grads_finite`` whether every parameter's gradient (of the last pass) is
finite, ``non_finite_parameters`` how many are not; ``peak_rss_mb`` the process's peak
resident memory. A stage that fails records where (``import``, ``forward`` or
``backward``) and the error's last line. Results are saved as JSON with the machine.

    OMP_NUM_THREADS=1 python benchmarks/sam_peer.py --peer-venv /work/pdnc-venv \\
        --out benchmarks/sam_peer.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, STEPS, FEATURES = 8, 100, 16
ARGUMENTS = dict(
    input_size=FEATURES,
    hidden_size=64,
    rnn_type="lstm",
    num_layers=1,
    num_hidden_layers=1,
    cell_size=32,
    read_heads=4,
    sparse_reads=4,
    batch_first=True,
    gpu_id=-1,
)
# The four in-place scatters of pytorch-dnc 1.1.0's sparse_memory.py and their
# out-of-place forms.
OUT_OF_PLACE = [
    (
        "hidden['memory'].scatter_(1, positions.unsqueeze(2).expand(b, self.c, w), visible_memory)",
        "hidden['memory'] = hidden['memory'].scatter(1, positions.unsqueeze(2)"
        ".expand(b, self.c, w), visible_memory)",
    ),
    (
        "hidden['write_weights'].scatter_(1, hidden['read_positions'], write_weights)",
        "hidden['write_weights'] = hidden['write_weights'].scatter(1, "
        "hidden['read_positions'], write_weights)",
    ),
    (
        "usage.scatter_(1, read_positions, relevant_usages)",
        "usage = usage.scatter(1, read_positions, relevant_usages)",
    ),
    (
        "hidden['read_weights'].scatter_(1, positions, read_weights)",
        "hidden['read_weights'].scatter(1, positions, read_weights)",
    ),
]


def failure(where: str, error: BaseException) -> dict:
    message = f"{type(error).__name__}: {error}".strip().splitlines()
    return {"failed_in": where, "error": message[0][:300] if message else type(error).__name__}


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    try:
        if spec["stage"] == "memctl":
            from memctl.models import SAM
        else:
            from dnc import SAM
    except Exception as error:  # the peer's import, as packaged
        return failure("import", error)
    torch.manual_seed(0)
    rnn = SAM(**ARGUMENTS, nr_cells=spec["slots"])
    x = torch.randn(BATCH, STEPS, FEATURES)
    index: list[str] = []

    def forward_backward() -> None:
        rnn.zero_grad()
        output, (_, memory, _) = rnn(x, (None, None, None), reset_experience=True)
        if isinstance(memory, dict) and "indexes" in memory:
            index[:] = [type(memory["indexes"][0]).__name__]
        try:
            output.square().mean().backward()
        except Exception as error:
            raise BackwardFailed from error

    try:
        forward_backward()
    except BackwardFailed as failed:
        assert failed.__cause__ is not None
        return {**failure("backward", failed.__cause__), "index": index[0] if index else None}
    except Exception as error:
        return failure("forward", error)
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        forward_backward()
        times.append(time.perf_counter() - start)
    grads = [p.grad for p in rnn.parameters()]
    non_finite = sum(1 for g in grads if g is None or not bool(torch.isfinite(g).all()))
    result = {
        "seconds": round(statistics.median(times), 4),
        "times": [round(t, 4) for t in times],
        "grads_finite": non_finite == 0,
        "non_finite_parameters": non_finite,
        "parameters": sum(p.numel() for p in rnn.parameters()),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if spec["stage"] == "memctl":
        result["backend"] = rnn.describe_backend(BATCH)
    else:
        result["index"] = index[0] if index else None
    return result


class BackwardFailed(Exception):
    """The pass failed in its backward (the cause is the error)."""


def run_point(python: str, spec: dict, cwd: Path, pythonpath: str | None, timeout: float):
    """One stage or point in a fresh process; a failure is a result too."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    command = [python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
        )
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["exit " + str(done.returncode)])[-1]
        return {**spec, "failed_in": "process", "error": last[-300:]}
    return {**spec, **json.loads(lines[-1])}


def patched_copy(peer_python: str, into: Path) -> Path:
    """A copy of the peer's installed ``dnc`` package with ``OUT_OF_PLACE`` applied."""
    found = subprocess.run(
        [peer_python, "-c", "import dnc, os; print(os.path.dirname(dnc.__file__))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=into,
    )
    package = into / "patched" / "dnc"
    shutil.copytree(found.stdout.strip(), package, ignore=shutil.ignore_patterns("__pycache__"))
    source = package / "sparse_memory.py"
    text = source.read_text()
    for old, new in OUT_OF_PLACE:
        if text.count(old) != 1:
            raise SystemExit(f"sam_peer: {source} is not pytorch-dnc 1.1.0's (no {old!r})")
        text = text.replace(old, new)
    source.write_text(text)
    return package.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--peer-venv", type=Path, default=Path("/work/pdnc-venv"))
    parser.add_argument(
        "--libflann", type=Path, default=Path("/usr/lib/x86_64-linux-gnu/libflann.so.1.9")
    )
    parser.add_argument("--slots", default="1024,16384,65536", help="N, comma list")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per point")
    parser.add_argument("--out", type=Path, default=None, help="save results as JSON")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    from machine import describe_machine

    peer_python = args.peer_venv / "bin" / "python"
    if not peer_python.exists():
        print(f"sam_peer: no Python at {peer_python} (--peer-venv)", file=sys.stderr)
        raise SystemExit(2)
    slots = [int(n) for n in args.slots.split(",") if n]
    load_before = os.getloadavg()
    results = []

    def record(row: dict) -> None:
        row["load_average"] = os.getloadavg()
        print(json.dumps(row), flush=True)
        results.append(row)

    with tempfile.TemporaryDirectory(prefix="sam_peer_") as scratch:
        work = Path(scratch)
        packaged_dir, flann_dir = work / "packaged", work / "flann"
        packaged_dir.mkdir()
        base = dict(threads=args.threads, batch=BATCH, steps=STEPS, slots=slots[0], repeats=0)
        record(run_point(str(peer_python), {**base, "stage": "packaged"}, packaged_dir, None, 600))
        libflann = args.libflann.exists()
        if libflann:
            (flann_dir / "linux").mkdir(parents=True)
            (flann_dir / "linux" / "libflann.so").symlink_to(args.libflann)
            record(run_point(str(peer_python), {**base, "stage": "flann"}, flann_dir, None, 600))
            patched = str(patched_copy(str(peer_python), work))
        here = str(Path(__file__).resolve().parent.parent)
        for n in slots:
            spec = dict(base, slots=n, repeats=args.repeats)
            if libflann:
                record(
                    run_point(
                        str(peer_python), {**spec, "stage": "fixed"}, flann_dir, patched, 3600
                    )
                )
            record(run_point(sys.executable, {**spec, "stage": "memctl"}, work, here, 3600))
    speedups = {}
    for n in slots:
        times = {r["stage"]: r.get("seconds") for r in results if r["slots"] == n and r["repeats"]}
        if times.get("fixed") and times.get("memctl"):
            speedups[str(n)] = round(times["fixed"] / times["memctl"], 1)
    report = {
        "benchmark": "sam_peer",
        "machine": {
            **describe_machine(args.threads),
            "load_average_at_start": load_before,
            "load_average_at_end": os.getloadavg(),
        },
        "arguments": ARGUMENTS,
        "peer": "dnc 1.1.0 (pytorch-dnc) with torch 2.13.0, in " + str(args.peer_venv),
        "libflann": str(args.libflann) if libflann else f"not found at {args.libflann}",
        "out_of_place": [old for old, _ in OUT_OF_PLACE],
        "speedup_memctl_over_fixed_peer": speedups,
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
