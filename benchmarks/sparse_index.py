"""The sparse memories' nearest-neighbour search on a full memory: exact ``torch.topk``,
faiss's exact flat index and memctl's approximate index (``FaissIndex``), against N.

Every one of the N rows of each batch element is written (random unit rows of ``--word``
numbers); each step queries 4 heads' keys for their 4 nearest rows (cosine) and writes
17 rows (what a SAM with 4 read heads and K = 4 writes: the 16 rows read, the least
used one). For each search, in its own process per (N, batch):

``build_s``      building the search over the full memory: nothing for topk; adding the
                 N rows for faiss flat; one ``FaissIndex.rebuild`` (training its lists
                 and adding every row) for the approximate index
``query_ms``     one step's search: topk over the cosine similarity of every row; faiss
                 flat's search of each element; ``FaissIndex.candidates`` and the
                 caller's exact rescoring of the candidates on the live memory
``update_ms``    one step's write of 17 rows into the search (topk: none, it reads the
                 memory; faiss flat: overwriting its stored rows; the approximate index:
                 ``FaissIndex.update``, its buffer of recent rows, without its periodic
                 rebuild)
``query_ms_before_rebuild``  the approximate index's query just before its next
                 snapshot update, when its exact search over the rows written since the
                 last one is largest (``recent_rows_before_rebuild`` rows an element)
``refresh_s``    the approximate index's snapshot update then (``FaissIndex.refresh``:
                 those rows' entries replaced under the trained lists)
``step_ms``      query + update + build amortised over ``--rebuild-every`` steps (a
                 rebuild at every update)
``step_ms_refreshed``  the approximate index's query + update + refresh amortised over
                 ``--rebuild-every`` steps + build amortised over the steps until as
                 many rows as it holds have been refreshed in (when it trains again)
``recall_at_4``  the fraction of the exact top 4 found, over every query timed

Timings are medians of ``--steps`` steps after 2 untimed ones. Results are saved as JSON
with the machine. The ``memctl`` command sets ``OMP_WAIT_POLICY=PASSIVE`` (faiss and
torch each bring an OpenMP runtime), and so does this script for its processes.

    python benchmarks/sparse_index.py --threads 2 --out benchmarks/sparse_index.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

from machine import describe_machine, run_in_process

HEADS, K, WRITES = 4, 4, 17
METHODS = ("topk", "faiss_flat", "approximate")


def worker(spec: dict) -> dict:
    import faiss
    import numpy as np
    import torch

    from memctl.models.addressing import cosine_similarity
    from memctl.models.sparse.faiss_index import FaissIndex, list_count, probe_count

    torch.set_num_threads(spec["threads"])
    faiss.omp_set_num_threads(spec["threads"])
    generator = torch.Generator().manual_seed(0)
    batch, slots, word, steps = spec["batch"], spec["slots"], spec["word"], spec["steps"]
    memory = torch.nn.functional.normalize(
        torch.randn(batch, slots, word, generator=generator), dim=-1
    )
    keys = torch.randn(steps + 2, batch, HEADS, word, generator=generator)
    rows = torch.randint(0, slots, (steps + 2, batch, WRITES), generator=generator)
    values = torch.nn.functional.normalize(
        torch.randn(steps + 2, batch, WRITES, word, generator=generator), dim=-1
    )
    lanes = torch.arange(batch)[:, None]
    method = spec["method"]
    start = time.perf_counter()
    if method == "faiss_flat":
        flats = []
        for b in range(batch):
            flat = faiss.IndexFlatIP(word)
            flat.add(memory[b].numpy())
            flats.append(flat)
        stored = [faiss.rev_swig_ptr(f.get_xb(), slots * word) for f in flats]
        stored = [np.asarray(s).reshape(slots, word) for s in stored]
    elif method == "approximate":
        index = FaissIndex(lambda wanted: memory[lanes, wanted], spec["rebuild_every"])
        index.reset(batch, slots, word)
        start = time.perf_counter()
        index.adopt(torch.ones(batch, slots, dtype=torch.bool))  # a rebuild from every row
    build_s = time.perf_counter() - start

    def query(step: int) -> torch.Tensor:
        if method == "topk":
            return cosine_similarity(memory, keys[step]).topk(K, dim=-1).indices
        if method == "faiss_flat":
            found = [flats[b].search(keys[step, b].numpy(), K)[1] for b in range(batch)]
            return torch.from_numpy(np.stack(found))
        candidates = index.candidates(keys[step], K)
        live = memory[lanes, candidates.reshape(batch, -1)].reshape(*candidates.shape, word)
        scores = torch.einsum("bhcm,bhm->bhc", live, keys[step])
        return candidates.gather(-1, scores.topk(K, dim=-1).indices)

    def update(step: int) -> None:
        memory[lanes, rows[step]] = values[step]
        if method == "faiss_flat":
            for b in range(batch):
                stored[b][rows[step, b].numpy()] = values[step, b].numpy()
        elif method == "approximate":
            index.update(rows[step], values[step])

    query_times, update_times, hits = [], [], 0
    for step in range(steps + 2):
        begin = time.perf_counter()
        found = query(step)
        query_seconds = time.perf_counter() - begin
        exact = cosine_similarity(memory, keys[step]).topk(K, dim=-1).indices
        begin = time.perf_counter()
        update(step)
        update_seconds = time.perf_counter() - begin
        if step >= 2:
            query_times.append(query_seconds)
            update_times.append(update_seconds)
            pairs = zip(found.reshape(-1, K).tolist(), exact.reshape(-1, K).tolist(), strict=True)
            hits += sum(len(set(f) & set(e)) for f, e in pairs)
    query_ms = 1000 * statistics.median(query_times)
    update_ms = 1000 * statistics.median(update_times)
    result = {
        "build_s": round(build_s, 4),
        "query_ms": round(query_ms, 4),
        "update_ms": round(update_ms, 4),
        "step_ms": round(query_ms + update_ms + 1000 * build_s / spec["rebuild_every"], 4),
        "recall_at_4": round(hits / (steps * batch * HEADS * K), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if method == "approximate":
        lists = list_count(slots)
        result.update(lists=lists, probes=probe_count(lists))
        # The same query just before the next rebuild, its buffer of recent rows full.
        for _ in range(index.steps, spec["rebuild_every"] - 1):
            written = torch.randint(0, slots, (batch, WRITES), generator=generator)
            index.update(written, memory[lanes, written])
        full = []
        for step in range(steps):
            begin = time.perf_counter()
            query(step)
            full.append(time.perf_counter() - begin)
        result["query_ms_before_rebuild"] = round(1000 * statistics.median(full), 4)
        recent = int(index.recent_count.max())
        result["recent_rows_before_rebuild"] = recent
        begin = time.perf_counter()
        index.refresh()
        refresh_s = time.perf_counter() - begin
        turnover_steps = spec["rebuild_every"] * slots / recent
        result["refresh_s"] = round(refresh_s, 4)
        result["step_ms_refreshed"] = round(
            query_ms
            + update_ms
            + 1000 * refresh_s / spec["rebuild_every"]
            + 1000 * build_s / turnover_steps,
            4,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    parser.add_argument("--log2-slots", default="10-20", help="N = 2^a .. 2^b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--word", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per point")
    parser.add_argument("--rebuild-every", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="save results as JSON")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(
            f"--methods: unknown {', '.join(sorted(unknown))} (known: {', '.join(METHODS)})"
        )
    low, high = (int(n) for n in args.log2_slots.split("-"))
    load_before = os.getloadavg()
    results = []
    for exponent in range(low, high + 1):
        for batch in (int(b) for b in args.batches.split(",")):
            for method in args.methods.split(","):
                spec = dict(method=method, slots=2**exponent, batch=batch, word=args.word)
                spec.update(steps=args.steps, threads=args.threads)
                spec.update(rebuild_every=args.rebuild_every)
                row = run_in_process(__file__, spec, 1800)
                print(json.dumps(row), flush=True)
                results.append(row)
    report = {
        "benchmark": "sparse_index",
        "machine": {
            **describe_machine(args.threads),
            "load_average_at_start": load_before,
            "load_average_at_end": os.getloadavg(),
        },
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
