"""The sparse memories' forward+backward against the memory size N, beside the dense DNC.

Batch 8, T = 100 steps, words of 32, 4 read heads, K = 4, N = 2^10 .. 2^20, each point
in its own process:

``memory``  the episodic sparse memory alone: ``sam.SparseAccess`` (its interface
            layer, the in-place memory, the slot search and the usage) stepped on a
            fixed random controller output of 64 numbers a step
``sam``     the recipe model ``model.type: sam`` (one LSTM layer of 64, input and
            output 16)
``sdnc``    the same with ``model.type: sdnc`` (``temporal_reads`` 4), where that model
            is registered
``dnc``     the dense DNC (``memctl.models.DNC``, as ``dnc_speed.py``'s
            forward_backward case) at the ``--dense-slots`` given

Each point: one untimed forward+backward, then ``--repeats`` timed ones (a new episode
each), the median reported as ``seconds`` and ``step_ms`` (seconds / T). Memory:
``rss_before_mb`` the process's resident memory once the model is built, before any
pass, ``peak_rss_mb`` its peak, ``peak_above_before_mb`` the difference (what the passes
needed, the touched pages of the N-sized buffers included). The N-sized buffers are the
arrays with a dimension of N slots that the sparse models keep between steps: the memory
``[B, N, 32]`` float32 (its gradient in backward covers the touched rows only), the usage
stamps ``[B, N]`` int32, the search's ``[B, N]`` flags (and faiss's ``[B, N]`` int32
written slots and positions of recent rows), and for the SDNC the link's values and their
gradient ``[B, N, 8]`` and its entries ``[B, N, 8]``
int64. They are allocated as lazily zeroed 4 KiB pages without transparent huge pages
(``access.zeros``), so only the pages holding a touched slot take memory.
``n_buffers_mb`` is their full size, ``n_buffers_resident_mb`` the pages of theirs
resident after the last pass (``mincore``; they only grow during a run), by buffer in
``n_buffers``, and ``peak_above_buffers_mb`` the peak above the start less those pages.
Results are saved as JSON with the machine and its load.

    OMP_NUM_THREADS=1 python benchmarks/sparse_speed.py --threads 1 \
        --out benchmarks/sparse_speed.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import time
from pathlib import Path

from machine import describe_machine, run_in_process

BATCH, STEPS, WORD, HEADS, K, CONTROLLER, FEATURES = 8, 100, 32, 4, 4, 64, 16
CASES = ("memory", "sam", "sdnc")
LABELS = {"memory": "memory alone", "sam": "SAM", "sdnc": "SDNC"}


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def resident_bytes(address: int, size: int) -> int:
    """Bytes of the memory ``[address, address + size)`` resident in RAM (``mincore``)."""
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    start = address - address % page
    pages = -(-(address + size - start) // page)
    vector = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vector):
        raise OSError(ctypes.get_errno(), "mincore")
    return int((np.frombuffer(vector, dtype=np.uint8) & 1).sum()) * page


def n_sized_buffers(module, slots: int) -> dict[str, tuple[int, int]]:
    """The arrays with a dimension of ``slots`` that the sparse memories in ``module``
    hold: name -> (bytes, resident bytes)."""
    import numpy as np
    import torch

    found = {}
    for name, part in module.named_modules():
        holders = {
            f"{name}.{key}".lstrip("."): getattr(part, key, None)
            for key in ("memory", "usage", "index", "link")
        }
        link = holders.get(f"{name}.link".lstrip("."))
        if link is not None:
            holders[f"{name}.link.values".lstrip(".")] = link.values
        for holder_name, holder in holders.items():
            if holder is None or isinstance(holder, torch.nn.Module):
                continue
            for key, value in vars(holder).items():
                if isinstance(value, torch.Tensor) and slots in value.shape[1:2]:
                    size = value.numel() * value.element_size()
                    found[f"{holder_name}.{key}"] = (size, resident_bytes(value.data_ptr(), size))
                elif isinstance(value, np.ndarray) and slots in value.shape[1:2]:
                    found[f"{holder_name}.{key}"] = (
                        value.nbytes,
                        resident_bytes(value.ctypes.data, value.nbytes),
                    )
    return found


def search(slots: int) -> str:
    """``model.index`` at N: exact below ``FAISS_MIN_ROWS`` slots, faiss from there, so
    the large memories are measured on the approximate search (``auto`` would stay exact
    here: an episode of T steps writes far fewer rows than its switch needs)."""
    from memctl.models.sparse.faiss_index import FAISS_MIN_ROWS

    return "faiss" if slots >= FAISS_MIN_ROWS else "exact"


def build(case: str, slots: int):
    """-> (a function running one forward+backward from a new episode, a description, the
    module holding the sparse memories or None)."""
    import torch

    from memctl.registry import MODELS

    torch.manual_seed(0)
    if case == "dnc":
        from memctl.models import DNC

        rnn = DNC(
            input_size=FEATURES,
            hidden_size=CONTROLLER,
            num_hidden_layers=1,
            nr_cells=slots,
            cell_size=WORD,
            read_heads=HEADS,
            batch_first=True,
        )
        x = torch.randn(BATCH, STEPS, FEATURES)

        def dense() -> None:
            output, _ = rnn(x, (None, None, None), reset_experience=True)
            output.square().mean().backward()

        return dense, rnn.describe_backend(BATCH), None
    if case == "memory":
        from memctl.models.sparse.sam import SparseAccess

        access = SparseAccess(CONTROLLER, slots, WORD, HEADS, K, search(slots))
        controller = torch.randn(STEPS, BATCH, CONTROLLER, requires_grad=True)

        def episodic() -> None:
            state = access.initial_state(BATCH, controller.device, controller.dtype)
            reads = []
            for output in controller.unbind(0):
                read, state, _ = access.step(output, state)
                reads.append(read)
            torch.stack(reads).square().mean().backward()

        return episodic, f"sparse access in place, {type(access.index).__name__}", access
    entry = MODELS.get(case)
    fields = dict(
        controller_size=CONTROLLER,
        memory_size=slots,
        word_size=WORD,
        read_heads=HEADS,
        sparse_reads=K,
        index=search(slots),
    )
    if case == "sdnc":
        fields["temporal_reads"] = K
    model = entry.cls(entry.config(**fields), FEATURES, FEATURES)
    x = torch.randn(STEPS, BATCH, FEATURES)

    def sparse() -> None:
        output, _ = model(x)
        output.square().mean().backward()

    index = type(model.memories[0].index).__name__
    return sparse, f"{model.describe_backend(BATCH)}; {index}", model


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    run, backend, holder = build(spec["case"], spec["slots"])
    before = resident_mb()
    run()
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "backend": backend,
        "seconds": round(seconds, 4),
        "step_ms": round(1000 * seconds / STEPS, 3),
        "rss_before_mb": round(before),
        "peak_rss_mb": round(peak),
        "peak_above_before_mb": round(peak - before),
    }
    if holder is not None:
        buffers = n_sized_buffers(holder, spec["slots"])
        resident = sum(pages for _, pages in buffers.values()) / 2**20
        result["n_buffers_mb"] = round(sum(size for size, _ in buffers.values()) / 2**20, 1)
        result["n_buffers_resident_mb"] = round(resident, 1)
        result["peak_above_buffers_mb"] = round(peak - before - resident, 1)
        result["n_buffers"] = {
            name: {"mb": round(size / 2**20, 1), "resident_mb": round(pages / 2**20, 1)}
            for name, (size, pages) in buffers.items()
        }
    return result


def registered(case: str) -> bool:
    if case == "memory":
        return True
    import memctl.models  # noqa: F401  (registers the models)
    from memctl.registry import MODELS

    return case in MODELS.names()


def megabytes(value: float) -> str:
    """A size in MB as the docs print it: 3 significant figures below 100, whole above."""
    return f"{value:,.0f} MB" if value >= 100 else f"{value:.2g} MB"


def markdown(report: dict, dense: dict | None = None) -> str:
    """The docs' table of a saved run: a row per N, the sparse cases' step time and peak
    above the N-sized buffers, the buffers' size and resident pages, then the ratios
    between the largest and smallest N and against the dense DNC (this run's, and the
    forward + backward points of ``dense``, a saved ``dnc_speed.py`` run)."""
    rows = {(row["case"], row["slots"]): row for row in report["results"] if "error" not in row}
    cases = [case for case in CASES if any(case == c for c, _ in rows)]
    sizes = sorted({slots for case, slots in rows if case in cases})
    header = ["N", "search"]
    header += [f"{LABELS[case]}: {what}" for case in cases for what in ("step", "above buffers")]
    header += [
        f"{LABELS[case]}'s N-sized buffers: size / resident" for case in cases if case != "memory"
    ]
    lines = ["| " + " | ".join(header) + " |", "|---:|---|" + "---:|" * (len(header) - 2)]
    for slots in sizes:
        cells, buffers = [f"2^{slots.bit_length() - 1}", search(slots)], []
        for case in cases:
            row = rows.get((case, slots), {})
            cells += (
                [f"{row['step_ms']:.3g} ms", megabytes(row["peak_above_buffers_mb"])]
                if row
                else ["", ""]
            )
            if case != "memory":
                sizes_mb = (row["n_buffers_mb"], row["n_buffers_resident_mb"]) if row else ()
                buffers.append(" / ".join(map(megabytes, sizes_mb)))
        cells += buffers
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    low, high = sizes[0], sizes[-1]
    for case in cases:
        if (case, low) in rows and (case, high) in rows:
            first, last = rows[(case, low)], rows[(case, high)]
            above = [rows[(case, n)]["peak_above_buffers_mb"] for n in sizes if (case, n) in rows]
            ratio = last["step_ms"] / first["step_ms"]
            lines.append(
                f"- {LABELS[case]}: a step at N = {high:,} took {ratio:.2f} times that at {low:,};"
                f" peak above the buffers {min(above):.0f} to"
                f" {max(above):.0f} MB; buffers resident at {high:,}:"
                f" {megabytes(last['n_buffers_resident_mb'])} of {megabytes(last['n_buffers_mb'])}"
            )
    points = [("this run's dense DNC", row) for (case, _), row in rows.items() if case == "dnc"]
    points += [
        (f"the dense DNC of the saved run ({row['threads']} threads)", row)
        for row in (dense or {}).get("results", [])
        if row.get("case") == "forward_backward" and "seconds" in row
    ]
    for where, point in sorted(points, key=lambda item: item[1]["slots"]):
        for sparse in cases:
            row = rows.get((sparse, point["slots"]))
            if row:
                lines.append(
                    f"- {where} at N = {point['slots']:,}: {point['seconds']:.3g} s and"
                    f" {point['peak_rss_mb']:,} MB peak; {LABELS[sparse]}: {row['seconds']:.3g} s"
                    f" ({point['seconds'] / row['seconds']:.0f} times faster) and"
                    f" {row['peak_rss_mb']:,} MB ({point['peak_rss_mb'] / row['peak_rss_mb']:.0f}"
                    " times less)"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--log2-slots", default="10-20", help="N = 2^a .. 2^b")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--dense-slots", default="1024", help="the dense DNC's N, comma list")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per point")
    parser.add_argument("--out", type=Path, default=None, help="save results as JSON")
    parser.add_argument(
        "--markdown", type=Path, metavar="JSON", help="print the docs' table of a saved run"
    )
    parser.add_argument(
        "--dense", type=Path, metavar="JSON", help="with --markdown: a saved dnc_speed.py run"
    )
    args = parser.parse_args()
    if args.markdown:
        dense = json.loads(args.dense.read_text()) if args.dense else None
        print(markdown(json.loads(args.markdown.read_text()), dense))
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    low, high = (int(n) for n in args.log2_slots.split("-"))
    cases = [case for case in args.cases.split(",") if registered(case)]
    points = [(case, 2**exponent) for case in cases for exponent in range(low, high + 1)]
    points += [("dnc", int(n)) for n in args.dense_slots.split(",") if n]
    load_before = os.getloadavg()
    results = []
    for case, slots in points:
        spec = dict(case=case, slots=slots, batch=BATCH, steps=STEPS, word=WORD)
        spec.update(read_heads=HEADS, sparse_reads=K, threads=args.threads)
        spec.update(repeats=1 if case == "dnc" else args.repeats)
        row = run_in_process(__file__, spec, 1800)
        row["load_average"] = os.getloadavg()
        print(json.dumps(row), flush=True)
        results.append(row)
    report = {
        "benchmark": "sparse_speed",
        "machine": {
            **describe_machine(args.threads),
            "load_average_at_start": load_before,
            "load_average_at_end": os.getloadavg(),
        },
        "skipped_cases": sorted(set(args.cases.split(",")) - set(cases)),
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
