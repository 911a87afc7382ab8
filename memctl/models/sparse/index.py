"""The slot search of the sparse memories: which slots a read head may attend to.

A search index proposes candidate slots for each key; the caller rescores them exactly
(cosine similarity, as ``addressing.py``) on the live memory and keeps the top K. So an
index only has to propose a superset of the true top K (exact) or most of it
(approximate); it never decides weights or gradients.

``ExactIndex``: rows never written since the reset are zero, and a zero row's cosine
similarity with any key is exactly 0, so the top K over all N slots is the top K over the
rows written since the reset plus K never-written ones (any K: they all score 0). It
proposes those, at a cost that grows with the rows written and not with N.

``build_index`` maps ``model.index`` to an index: ``exact`` to ``ExactIndex``; ``faiss``
to the faiss index of ``memctl.models.sparse.faiss_index``; ``auto`` to the exact search
until an episode has written as many rows as make faiss the faster, then faiss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from memctl.errors import UserError
from memctl.models.sparse.access import zeros


class SlotIndex(Protocol):
    def describe(self) -> str:
        """The search in a few words, for ``describe_backend``."""

    def reset(self, batch_size: int, num_slots: int, word_size: int) -> None: ...

    def update(self, rows: Tensor, values: Tensor) -> None:
        """rows ``[B, J]`` long: slots written this step; values ``[B, J, M]``: their new
        contents."""

    def candidates(self, keys: Tensor, k: int) -> Tensor:
        """keys ``[B, H, M]`` -> long ``[B, H, C]``, ``C >= k``: slots the caller rescores
        exactly (cosine, as ``addressing.py``) on the live memory and takes the top k of."""


class ExactIndex:
    """The rows written since the reset plus enough never-written rows: the exact top k.

    Kept per batch element: ``written`` ``[B, N]`` bool, and the written rows in order of
    first write; never-written rows are the lowest ones, found from a pointer that only
    moves past written rows. Candidates are the same for every head (an expanded view).
    Allocated on the device of the first rows or keys after a reset that changes the
    sizes; a reset of the same sizes clears only the rows written.
    """

    def __init__(self, window: int = 64) -> None:
        self.window = window
        self.written: torch.Tensor | None = None  # [B, N] bool
        self._log: torch.Tensor | None = None  # [B, capacity + 1] long; the last column a sink
        self._counts: torch.Tensor | None = None  # [B]
        self._pointer: torch.Tensor | None = None  # [B], every row below it written
        self._shape = (0, 0)

    def reset(self, batch_size: int, num_slots: int, word_size: int) -> None:
        if self.written is not None and self.written.shape == (batch_size, num_slots):
            assert self._log is not None and self._counts is not None
            if self.most_written():
                self.written.scatter_(1, self.written_slots(), False)
            self._counts.zero_()
            self._pointer.zero_()
        else:
            self.written = None
        self._shape = (batch_size, num_slots)

    def _allocate(self, device: torch.device) -> None:
        if self.written is None or self.written.device != device:
            batch, slots = self._shape
            self.written = zeros((batch, slots), device, torch.bool)
            self._log = torch.zeros(batch, 1025, dtype=torch.long, device=device)
            self._counts = torch.zeros(batch, dtype=torch.long, device=device)
            self._pointer = torch.zeros(batch, dtype=torch.long, device=device)

    def update(self, rows: Tensor, values: Tensor) -> None:
        self._allocate(rows.device)
        written, log, counts = self.written, self._log, self._counts
        assert written is not None and log is not None and counts is not None
        ordered = rows.sort(1).values
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        new = first & ~written.gather(1, ordered)
        fresh = new.sum(1)
        capacity = log.shape[1] - 1
        needed = int((counts + fresh).max())
        if needed > capacity:
            grown = log.new_zeros(log.shape[0], max(2 * capacity, needed) + 1)
            grown[:, :capacity] = log[:, :capacity]
            self._log = log = grown
            capacity = log.shape[1] - 1
        positions = counts.unsqueeze(1) + new.long().cumsum(1) - 1
        log.scatter_(1, torch.where(new, positions, capacity), ordered)
        written.scatter_(1, ordered, True)
        counts += fresh

    def describe(self) -> str:
        return "exact search"

    def most_written(self) -> int:
        """The most rows any batch element has written since the reset."""
        return 0 if self._counts is None else int(self._counts.max())

    def written_slots(self) -> Tensor:
        """The slots each element has written since the reset, ``[B, most_written()]``
        long, an element with fewer padded with its first slot."""
        assert self._log is not None and self._counts is not None
        most = self.most_written()
        logged = self._log[:, :most]
        positions = torch.arange(most, device=logged.device)
        return torch.where(positions < self._counts.unsqueeze(1), logged, logged[:, :1])

    def candidates(self, keys: Tensor, k: int) -> Tensor:
        self._allocate(keys.device)
        written, log, counts, pointer = self.written, self._log, self._counts, self._pointer
        assert written is not None and log is not None and counts is not None
        assert pointer is not None
        batch, heads = keys.shape[:2]
        slots = written.shape[1]
        most = int(counts.max())
        width = min(slots, most + k)
        if width == slots:
            return torch.arange(slots, device=keys.device).expand(batch, heads, slots)
        # The lowest never-written row (there is one: fewer than N are written), looked
        # for `window` rows at a time from the pointer, which only moves past written rows.
        offsets = torch.arange(self.window, device=keys.device)
        while True:
            ahead = pointer.unsqueeze(1) + offsets
            free = (ahead < slots) & ~written.gather(1, ahead.clamp(max=slots - 1))
            found = free.any(1)
            searching = ~found & (pointer + self.window < slots)
            if not bool(searching.any()):
                break
            pointer = torch.where(searching, pointer + self.window, pointer)
        pointer = ahead.gather(1, free.long().argmax(1, keepdim=True)).squeeze(1)
        self._pointer = pointer
        # A window of `width` rows from there holds at least `width - count` unwritten
        # ones (at most `count` are written); near the end it is moved back inside.
        start = torch.minimum(pointer, torch.full_like(pointer, slots - width))
        window = start.unsqueeze(1) + torch.arange(width, device=keys.device)
        unwritten = ~written.gather(1, window)
        needed = (width - counts).unsqueeze(1)
        unwritten &= unwritten.long().cumsum(1) <= needed
        logged = torch.arange(most, device=keys.device) < counts.unsqueeze(1)
        pool = torch.cat([log[:, :most], window], 1)
        keep = torch.cat([logged, unwritten], 1)
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]
        return pool.gather(1, order).unsqueeze(1).expand(batch, heads, width)


def build_index(
    kind: str, memory_size: int, peek: Callable[[Tensor], Tensor], rebuild_every: int = 1000
) -> SlotIndex:
    """``model.index`` -> a fresh index: ``exact``: ``ExactIndex``; ``faiss``:
    ``faiss_index.FaissIndex`` (rebuilt every ``rebuild_every`` steps); ``auto``:
    ``faiss_index.AutoIndex``, exact until an episode has written
    ``faiss_index.FAISS_MIN_ROWS`` rows, where faiss starts to beat the exact search,
    then faiss; plain exact for a memory of fewer slots. ``peek``: the memory's current
    contents of slots ``[B, J]`` -> ``[B, J, M]``, from which the switch builds faiss."""
    if kind in ("auto", "exact", "faiss"):
        from memctl.models.sparse import faiss_index  # faiss itself loads on first use

        return faiss_index.choose_index(kind, memory_size, peek, rebuild_every)
    raise UserError(f"model.index: {kind!r} is not one of auto, exact, faiss")
