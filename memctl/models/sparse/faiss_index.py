"""The approximate nearest-neighbour search of the sparse memories: faiss, one index per
batch element.

Rae et al. 2016, "Scaling Memory-Augmented Neural Networks with Sparse Reads and Writes"
(arXiv 1610.09027), section 3.5: the K rows a head reads are the K nearest its key, found
in an approximate index that is rebuilt from scratch periodically. Here the index is
faiss's inverted file with rows stored as 8-bit codes (``IndexIVFScalarQuantizer``,
``QT_8bit``) under the inner product of unit rows, so its ranking is, to the codes'
precision, the cosine similarity of ``addressing.cosine_similarity`` (rows are scaled by
the same ``inverse_norms``, with its epsilon). The caller rescores the candidates exactly
on the live memory and takes the top k, so the index only has to bring the right slots
among its candidates.

The faiss index is a snapshot: built from the live memory every ``rebuild_every`` steps
and not changed between rebuilds. What each part of the candidates covers, for batch
element b and head h:

- ``4 k`` slots from the faiss index, through ``nprobe`` of its ``nlist`` inverted
  lists (approximate, and ranked by the codes: the caller's exact rescoring of four
  times k puts the right k first unless codes and rows disagree by more than the gap
  down to the 4 k-th), less those written since the snapshot (their stored rows are
  stale: the next part scores them);
- the exact top ``k`` of the rows written since the snapshot, kept here at their
  current values as a buffer of at most ``rebuild_every * J`` unit rows (J distinct rows
  written a step), so nothing written since is missed or scored on an old value;
- ``k`` slots never written since ``reset``: they are zero and score exactly 0, so
  any k of them stand for all of them (found by a cursor that passes each slot once,
  O(1) a step amortised).

So a step's update touches no faiss structure (O(J) numpy), and the index holds one
byte per number of every row (a quarter of a float32 copy) with no map from slot to
entry. Every ``rebuild_every`` steps the snapshot takes in the rows written since: it
is either refreshed or rebuilt, and the buffer of recent rows empties.

- A refresh removes those slots' entries and adds their current rows (the buffer's) under
  the lists and codes' ranges trained before: O(rows written since) a batch element
  plus one pass over its inverted lists' ids.
- A rebuild trains the inverted lists' centroids and the codes' ranges again (spherical
  k-means on a sample pooled over the batch, shared by the batch's indices) and assigns
  every written row again at its current value, read from the memory in chunks. It
  happens at the first snapshot, once an element's rows have doubled since the last
  training (so the number of lists follows a filling memory), and once as many rows as
  that training saw have been refreshed in since (so the lists follow a full memory as
  its contents change).

faiss is imported on first use, so ``import memctl`` does not import it. faiss and torch
each bring an OpenMP runtime; the ``memctl`` command sets ``OMP_WAIT_POLICY=PASSIVE``
so that they do not spin against each other (see docs/benchmarks.md).

Shapes: ``B`` batch, ``N`` slots, ``M`` word size, ``H`` heads, ``J`` rows written a
step, ``C`` candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from memctl.models.addressing import inverse_norms
from memctl.models.sparse.access import zeros
from memctl.models.sparse.index import ExactIndex, SlotIndex

# Inverted lists for an index of n rows: 4 sqrt(n), and at least 39 rows a list (the
# fewest faiss advises for training k-means), so an index under 78 rows is one list,
# searched exhaustively.
LISTS_PER_SQRT_ROW = 4
MIN_ROWS_PER_LIST = 39
# Lists searched per query: at least 256, and 1/16 of them on large indices. On random
# unit rows of 32 numbers (the hard case: no clusters) recall@4 was 0.90 to 1.0 from
# 2^10 rows to 2^20 (benchmarks/sparse_index.json); fewer lists are faster and miss more.
MIN_PROBES = 256
PROBE_FRACTION = 1 / 16
# k-means sample per list and iterations of each rebuild's training.
TRAIN_ROWS_PER_LIST = 16
TRAIN_ITERATIONS = 10
# The 8-bit codes span each number's range over the training sample widened by this
# fraction of it on each side, so that rows outside the sample are rarely clipped.
CODE_RANGE_MARGIN = 0.2
# Slots an element a rebuild reads from the memory at a time (the rows of 8 elements, 4 MB
# at words of 32, where the whole memory may be gigabytes; a rebuild may run while a
# chunk's graph is alive, so its transients add to the peak).
READ_CHUNK = 4096

# Written rows from which `model.index: auto` switches from the exact search to faiss: from
# 2^17 rows of a full memory of random unit rows (word 32, 4 heads), the faiss index's
# query, update and rebuild (amortised over 1,000 steps) took at most 0.53 times the time
# of torch.topk over every row, at batch 1 and 8, with recall@4 >= 0.95; at 2^16 it was
# slower at batch 1 (benchmarks/sparse_index.json).
FAISS_MIN_ROWS = 2**17


def unit_rows(values: Tensor) -> np.ndarray:
    """Rows scaled as ``addressing.cosine_similarity`` scales them, as float32 numpy.

    values: ``[..., M]`` -> ``[..., M]``
    """
    values = values.detach()
    unit = values * inverse_norms(values).unsqueeze(-1)
    return np.ascontiguousarray(unit.to("cpu", torch.float32).numpy())


def list_count(rows: int) -> int:
    """Inverted lists for an index of ``rows`` rows (1 below 78 rows)."""
    return max(1, min(round(LISTS_PER_SQRT_ROW * math.sqrt(rows)), rows // MIN_ROWS_PER_LIST))


def probe_count(lists: int) -> int:
    """Inverted lists searched per query in an index of ``lists`` lists."""
    return min(lists, max(MIN_PROBES, math.ceil(lists * PROBE_FRACTION)))


class FaissIndex:
    """One faiss inverted-file index per batch element, a snapshot of the memory taken at
    every ``rebuild_every``-th step, and the exact search of the rows written since (see
    the module docstring). ``peek``: the memory's current contents of slots ``[B, J]`` ->
    ``[B, J, M]``, from which each rebuild reads every written row.

    Candidates are distinct slots within each ``[b, h]``: ``C = 6 k``, or all N slots
    where N <= 6 k.
    """

    def __init__(self, peek: Callable[[Tensor], Tensor], rebuild_every: int = 1000) -> None:
        if rebuild_every < 1:
            raise ValueError(f"rebuild_every must be >= 1, got {rebuild_every}")
        self.peek, self.rebuild_every = peek, rebuild_every
        self.written: np.ndarray | None = None  # [B, N] bool

    def describe(self) -> str:
        return "faiss search"

    def reset(self, batch_size: int, num_slots: int, word_size: int) -> None:
        """Empty the index. The three ``[B, N]`` arrays are allocated as lazily zeroed
        pages (``access.zeros``) when the sizes change, else cleared at the slots written
        since the last reset (listed in ``written_slots``)."""
        shape = (batch_size, num_slots)
        if self.written is None or self.written.shape != shape:
            cpu = torch.device("cpu")
            self.written = zeros(shape, cpu, torch.bool).numpy()
            # The slots written since the reset, each once, in the order first written.
            self.written_slots = zeros(shape, cpu, torch.int32).numpy()
            # Rows written since the last rebuild: 1 + buffer position of each slot (0: none).
            self.recent_position = zeros(shape, cpu, torch.int32).numpy()
        else:
            for b in range(self.batch_size):
                self.written[b, self.written_slots[b, : self.written_count[b]]] = False
                self.recent_position[b, self.recent_slots[b, : self.recent_count[b]]] = 0
        self.batch_size, self.num_slots, self.word_size = batch_size, num_slots, word_size
        self.indices: list[Any] = [None] * batch_size
        self.written_count = np.zeros(batch_size, dtype=np.int64)
        # Every slot below the cursor is written or in the pool of unwritten slots.
        self.cursor = np.zeros(batch_size, dtype=np.int64)
        self.pool: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * batch_size
        self.recent_slots = np.zeros((batch_size, 0), dtype=np.int64)
        self.recent_rows = np.zeros((batch_size, 0, word_size), dtype=np.float32)
        self.recent_count = np.zeros(batch_size, dtype=np.int64)
        self._scores = torch.empty(0, dtype=torch.float32)  # [B * H * capacity], _recent_top
        self.steps = 0
        # Rows an element held at the last training, and rows refreshed in since then.
        self.trained_rows, self.refreshed = 0, 0

    def update(self, rows: Tensor, values: Tensor) -> None:
        slots = rows.detach().to("cpu", torch.int64).numpy()
        unit = unit_rows(values)
        order = np.arange(slots.shape[1])[::-1]  # the last of repeated slots is the new value
        self._reserve(self.rebuild_every * slots.shape[1])
        for b in range(self.batch_size):
            batch_slots, first = np.unique(slots[b, order], return_index=True)
            self._remember(b, batch_slots, unit[b, order[first]])
            self._mark_written(b, batch_slots)
        self.steps += 1
        if self.steps % self.rebuild_every == 0:
            self.take_in()

    def take_in(self) -> None:
        """Bring the rows written since the snapshot into it: a rebuild when there is no
        snapshot yet, when an element's snapshot and recent rows together reach twice the
        rows of the last training, or when the rows refreshed in since it reach that
        number (the module docstring); else a refresh."""
        if self.indices[0] is None:
            self.rebuild()
            return
        held = max(self.indices[b].ntotal + self.recent_count[b] for b in range(self.batch_size))
        turned_over = self.refreshed + int(self.recent_count.max()) >= self.trained_rows
        if held >= 2 * self.trained_rows or turned_over:
            self.rebuild()
        else:
            self.refresh()

    def refresh(self) -> None:
        """Move the rows written since the snapshot into it: their old entries removed,
        their current rows added under the trained lists and ranges; the buffer of recent
        rows empties."""
        for b in range(self.batch_size):
            count = self.recent_count[b]
            slots = np.ascontiguousarray(self.recent_slots[b, :count])
            self.indices[b].remove_ids(slots)
            self.indices[b].add_with_ids(np.ascontiguousarray(self.recent_rows[b, :count]), slots)
        self.refreshed += int(self.recent_count.max())
        self._empty_recent()

    def adopt(self, written: Tensor) -> None:
        """Index a memory written without this index (``written`` ``[B, N]`` bool: the
        slots written since the reset): a rebuild from those slots' live rows."""
        written = written.to("cpu").numpy()
        for b in range(self.batch_size):
            self._mark_written(b, np.flatnonzero(written[b]))
        self.rebuild()

    def _mark_written(self, b: int, slots: np.ndarray) -> None:
        """Flag element b's ``slots`` (distinct) written, listing those written first now."""
        new = slots[~self.written[b, slots]]
        count = self.written_count[b]
        self.written_slots[b, count : count + len(new)] = new
        self.written_count[b] = count + len(new)
        self.written[b, new] = True

    def candidates(self, keys: Tensor, k: int) -> Tensor:
        batch, heads, _ = keys.shape
        if self.num_slots <= 6 * k:
            return torch.arange(self.num_slots, device=keys.device).expand(batch, heads, -1)
        unit_keys = unit_rows(keys)
        parts = [self._recent_top(unit_keys, k)]
        unwritten = np.stack([self._unwritten(b, k) for b in range(batch)])
        parts.append(unwritten[:, None].repeat(heads, 1))
        if self.indices[0] is None:
            parts.append(np.full((batch, heads, 4 * k), -1, dtype=np.int64))
        else:
            found = np.stack([self.indices[b].search(unit_keys[b], 4 * k)[1] for b in range(batch)])
            # Slots written since the snapshot: their current rows are the recent buffer's.
            stale = np.take_along_axis(
                self.recent_position[:, None, :], np.maximum(found, 0).reshape(batch, 1, -1), 2
            ).reshape(found.shape)
            parts.append(np.where(stale > 0, -1, found))
        return torch.from_numpy(self._distinct(np.concatenate(parts, axis=2))).to(keys.device)

    def rebuild(self) -> None:
        """Build every element's index again from the rows it holds (their current
        values, read from the memory), with newly trained lists; the buffer of recent
        rows empties."""
        import faiss

        slots = [self.written_slots[b, :count] for b, count in enumerate(self.written_count)]
        if not self.written_count.any():
            return  # nothing written yet: nothing to index
        lists = list_count(int(self.written_count.max()))
        self.indices = [None] * self.batch_size  # the old indices freed before the new built
        template = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(self.word_size),
            self.word_size,
            lists,
            faiss.ScalarQuantizer.QT_8bit,
            faiss.METRIC_INNER_PRODUCT,
        )
        template.sq.rangestat = faiss.ScalarQuantizer.RS_minmax
        template.sq.rangestat_arg = CODE_RANGE_MARGIN
        template.cp.spherical = True
        template.cp.niter = TRAIN_ITERATIONS
        template.cp.min_points_per_centroid = 1
        template.cp.max_points_per_centroid = TRAIN_ROWS_PER_LIST
        template.cp.seed = self.steps
        template.cp.verbose = False
        # Every stride-th row of every element: at least lists * TRAIN_ROWS_PER_LIST rows.
        stride = max(1, int(self.written_count.sum()) // (lists * TRAIN_ROWS_PER_LIST))
        sampled = [s[::stride] for s in slots]
        template.train(np.concatenate([r for _, r in self._contents(sampled)]))
        template.nprobe = probe_count(lists)
        self.indices = [faiss.clone_index(template) for _ in range(self.batch_size)]
        for (b, start), rows in self._contents(slots, READ_CHUNK):
            self.indices[b].add_with_ids(rows, slots[b][start : start + len(rows)].astype(np.int64))
        self.trained_rows, self.refreshed = int(self.written_count.max()), 0
        self._empty_recent()

    def _empty_recent(self) -> None:
        """Empty the buffer of rows written since the snapshot (now in it)."""
        for b in range(self.batch_size):
            self.recent_position[b, self.recent_slots[b, : self.recent_count[b]]] = 0
        self.recent_count[:] = 0

    def _contents(
        self, slots: list[np.ndarray], chunk: int | None = None
    ) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """The current unit rows of each element's ``slots``, read from the memory
        ``chunk`` slots an element at a time: ((element, first position), rows)."""
        most = max(map(len, slots))
        chunk = chunk or max(most, 1)
        for start in range(0, most, chunk):
            block = np.zeros((self.batch_size, min(chunk, most - start)), dtype=np.int64)
            for b, s in enumerate(slots):
                part = s[start : start + chunk]
                block[b, : len(part)] = part
            rows = unit_rows(self.peek(torch.from_numpy(block)))
            for b, s in enumerate(slots):
                if start < len(s):
                    yield (b, start), rows[b, : len(s) - start]

    def _reserve(self, rows: int) -> None:
        """Room in the recent buffer for ``rows`` rows an element (at most N). ``update``
        reserves the rows a snapshot interval can write, ``rebuild_every * J``, at the first
        step, in lazily zeroed pages (``access.zeros``): the buffer takes RAM only for the
        rows written, and a long episode never copies it to grow it, nor leaves its old
        copies' gaps in the heap."""
        capacity, old = min(self.num_slots, rows), self.recent_rows.shape[1]
        if capacity <= old:
            return
        cpu, shape = torch.device("cpu"), (self.batch_size, capacity)
        rows_grown = zeros((*shape, self.word_size), cpu, torch.float32).numpy()
        slots_grown = zeros(shape, cpu, torch.int64).numpy()
        rows_grown[:, :old], slots_grown[:, :old] = self.recent_rows, self.recent_slots
        self.recent_rows, self.recent_slots = rows_grown, slots_grown

    def _remember(self, b: int, slots: np.ndarray, rows: np.ndarray) -> None:
        """Put element b's rows of ``slots`` in the recent buffer."""
        position = self.recent_position[b, slots] - 1
        new = position < 0
        count = self.recent_count[b]
        needed = count + new.sum()
        self._reserve(needed)
        fresh = np.arange(count, needed)
        position[new] = fresh
        self.recent_position[b, slots[new]] = fresh + 1
        self.recent_slots[b, fresh] = slots[new]
        self.recent_rows[b, position] = rows
        self.recent_count[b] = needed

    def _recent_top(self, unit_keys: np.ndarray, k: int) -> np.ndarray:
        """The exact top k (or all) of the rows written since the last rebuild, ``[B, H,
        k]``, -1 where an element has fewer. The scores go to a buffer kept at the recent
        buffer's capacity, so a step allocates nothing of the buffer's size (transients of
        a size that changes every step would fragment the heap of a long episode)."""
        batch, heads, _ = unit_keys.shape
        count = int(self.recent_count.max())
        if count == 0:
            return np.full((batch, heads, k), -1, dtype=np.int64)
        size = batch * heads * self.recent_rows.shape[1]
        if self._scores.numel() < size:
            self._scores = zeros((size,), torch.device("cpu"), torch.float32)
        scores = self._scores[: batch * heads * count].view(batch, heads, count)
        rows = torch.from_numpy(self.recent_rows)[:, :count]
        torch.bmm(torch.from_numpy(unit_keys), rows.transpose(1, 2), out=scores)
        for b in np.flatnonzero(self.recent_count < count):
            scores[b, :, self.recent_count[b] :] = -math.inf
        top = torch.topk(scores, min(k, count), dim=-1)
        position = top.indices.numpy()
        slots = np.take_along_axis(self.recent_slots[:, None, :count], position, axis=2)
        slots[np.isneginf(top.values.numpy())] = -1
        if slots.shape[2] < k:
            pad = np.full((batch, heads, k - slots.shape[2]), -1, dtype=np.int64)
            slots = np.concatenate([slots, pad], axis=2)
        return slots

    def _unwritten(self, b: int, k: int) -> np.ndarray:
        """Up to k slots never written since reset (the pool, topped up from the cursor)."""
        pool = self.pool[b]
        pool = pool[~self.written[b, pool]]
        cursor = self.cursor[b]
        while len(pool) < k and cursor < self.num_slots:
            window = self.written[b, cursor : cursor + 4 * k]
            free = cursor + np.flatnonzero(~window)[: k - len(pool)]
            pool = np.concatenate([pool, free])
            cursor = free[-1] + 1 if len(pool) == k else cursor + len(window)
        self.pool[b], self.cursor[b] = pool, cursor
        return np.pad(pool, (0, k - len(pool)), constant_values=-1)

    def _distinct(self, found: np.ndarray) -> np.ndarray:
        """The slots found ``[B, H, C]``, each -1 and each repeat within a ``[b, h]``
        replaced by another slot (the caller rescores every candidate, so a spare costs
        time, never a wrong read)."""
        found = np.sort(found, axis=-1)
        spare = found[..., 1:] == found[..., :-1]
        spare = np.concatenate([found[..., :1] < 0, spare | (found[..., 1:] < 0)], axis=-1)
        fillers = np.arange(min(self.num_slots, 2 * found.shape[-1]))
        free = ~(fillers[:, None] == found[..., None, :]).any(-1)
        free_first = fillers[np.argsort(~free, axis=-1, kind="stable")]
        rank = np.maximum(np.cumsum(spare, axis=-1) - 1, 0)
        return np.where(spare, np.take_along_axis(free_first, rank, axis=-1), found)


class AutoIndex:
    """``model.index: auto``: the exact search (``ExactIndex``, whose cost grows with the
    rows written) until some batch element has written ``threshold`` rows since the reset,
    then a ``FaissIndex`` built from the rows written so far at their current values
    (read with ``peek``) and rebuilt every ``rebuild_every`` steps from there. Each reset starts
    exact again, so an episode that writes fewer rows never pays for faiss."""

    def __init__(
        self,
        peek: Callable[[Tensor], Tensor],
        rebuild_every: int = 1000,
        threshold: int = FAISS_MIN_ROWS,
    ) -> None:
        self.exact, self.threshold = ExactIndex(), threshold
        self.faiss = FaissIndex(peek, rebuild_every)
        self.active: SlotIndex = self.exact

    def describe(self) -> str:
        return f"exact search, faiss from {self.threshold:,} rows written"

    def reset(self, batch_size: int, num_slots: int, word_size: int) -> None:
        if self.active is self.faiss:
            self.faiss.reset(batch_size, num_slots, word_size)
        self.exact.reset(batch_size, num_slots, word_size)
        self.active = self.exact
        self.sizes = (batch_size, num_slots, word_size)

    def update(self, rows: Tensor, values: Tensor) -> None:
        self.active.update(rows, values)
        if self.active is self.exact and self.exact.most_written() >= self.threshold:
            self.faiss.reset(*self.sizes)
            self.faiss.adopt(self.exact.written)
            self.active = self.faiss

    def candidates(self, keys: Tensor, k: int) -> Tensor:
        return self.active.candidates(keys, k)


def choose_index(
    kind: str, memory_size: int, peek: Callable[[Tensor], Tensor], rebuild_every: int = 1000
) -> SlotIndex:
    """The search for ``model.index``: ``exact`` (``ExactIndex``), ``faiss``
    (``FaissIndex``), or ``auto``: ``AutoIndex`` for a memory of
    ``FAISS_MIN_ROWS`` slots or more, else exact (a smaller memory never writes enough
    rows to switch)."""
    if kind not in ("auto", "exact", "faiss"):
        raise ValueError(f"index must be auto, exact or faiss, got {kind!r}")
    if kind == "exact" or (kind == "auto" and memory_size < FAISS_MIN_ROWS):
        return ExactIndex()
    if kind == "auto":
        return AutoIndex(peek, rebuild_every)
    return FaissIndex(peek, rebuild_every)
