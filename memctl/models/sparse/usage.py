"""SAM's usage and least recently used slot (Rae et al. 2016, section 3.3 and
Supplementary D), in O(1) amortised work a step.

Usage is the time since a slot's last non-negligible access, the paper's second form:

    U_t(i) = t - max{ tau <= t : w^W_tau(i) + w^R_tau(i) > delta }

with ``w^R`` the read weights of all heads together; a slot never accessed counts as last
accessed just before the episode (``t + 1`` for steps numbered from 0). The least
recently used slot ``argmax_i U_t(i)`` (ties: the lowest slot index) is where SAM erases
and writes next. Its search touches no O(N) tensor a step:

- ``stamps`` ``[B, N]`` int32: one more than the step of each slot's last access, 0 for never
  (so the tensor starts as lazily zeroed pages, ``access.zeros``).
- While some slot was never accessed, the least recently used is the lowest such slot: a
  pointer that only moves forward past accessed slots (all slots below it are accessed).
- After that, an access queue: every step appends its accessed slots, in ascending slot
  order, each with its step; an entry is current while its slot's last access is its
  step. The first current entry from the head is the least recently used slot; the head
  moves only past stale entries, each once.

Both searches look at ``window`` entries at a time, so a step costs a few batched ops.
The queue holds two int32 numbers an entry. When it is full its stale entries are
dropped in place (each accessed slot keeps exactly one current entry, so at most N are
left; ``block`` entries are looked at a time, so no transient is the queue's size), and
it doubles only when that leaves it over three quarters full: at most about 8 N / 3
entries an element however long the episode, O(1) amortised a step (a compaction of C
entries comes after at least C / 4 appended). ``reset`` clears only the
slots it names.
"""

from __future__ import annotations

import torch

from memctl.models.sparse.access import zeros

# delta: an access counts when a slot's read and write weights of a step sum above this
# (pytorch-dnc's 0.005): weights below it are numerical leftovers of a softmax over K.
DELTA = 0.005
NEVER = -1


class LeastRecentlyUsed:
    """Each slot's last access and the least recently used slot of ``num_slots``, per
    batch element."""

    def __init__(self, num_slots: int, window: int = 64, block: int = 16384) -> None:
        self.num_slots, self.window, self.block = num_slots, window, block
        self.stamps: torch.Tensor | None = None  # [B, N] int32, last access + 1
        self.time = 0
        self._pointer: torch.Tensor | None = None  # [B]
        self._head: torch.Tensor | None = None  # [B]
        self._queue: torch.Tensor | None = None  # [B, capacity] int32 slots, NEVER: none
        self._queue_stamps: torch.Tensor | None = None  # [B, capacity] int32, step + 1
        self._length = 0

    def reset(self, batch_size: int, device: torch.device) -> None:
        """A new episode: nothing accessed (O(slots accessed) once allocated)."""
        shape = (batch_size, self.num_slots)
        stamps = self.stamps
        if stamps is None or stamps.shape != shape or stamps.device != device:
            self.stamps = zeros(shape, device, torch.int32)
            self._queue = zeros((batch_size, 1024), device, torch.int32)
            self._queue_stamps = zeros((batch_size, 1024), device, torch.int32)
        elif self._length:
            entries = self._queue[:, : self._length].long()
            stamps.scatter_(1, entries.clamp(min=0), 0)
        self._pointer = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._head = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.time, self._length = 0, 0

    @property
    def last_access(self) -> torch.Tensor:
        """The step of each slot's last access ``[B, N]`` (``NEVER``: none), an O(N) copy."""
        assert self.stamps is not None
        return self.stamps.long() - 1

    def usage(self, rows: torch.Tensor) -> torch.Tensor:
        """``U(i)`` after the last step, for ``rows`` ``[B, J]`` -> long ``[B, J]``."""
        assert self.stamps is not None
        return (self.time - self.stamps.gather(1, rows)).long()

    def least_recent(self) -> torch.Tensor:
        """The least recently used slot of each batch element ``[B]`` (ties: lowest index)."""
        stamps, pointer = self.stamps, self._pointer
        assert stamps is not None and pointer is not None
        slots, offsets = self.num_slots, torch.arange(self.window, device=stamps.device)
        while True:
            candidates = pointer.unsqueeze(1) + offsets
            fresh = (candidates < slots) & (stamps.gather(1, candidates.clamp(max=slots - 1)) == 0)
            found = fresh.any(1)
            searching = ~found & (pointer + self.window < slots)
            if not bool(searching.any()):
                break
            pointer = torch.where(searching, pointer + self.window, pointer)
        first = candidates.gather(1, fresh.long().argmax(1, keepdim=True)).squeeze(1)
        self._pointer = torch.where(found, first, torch.full_like(pointer, slots))
        if bool(found.all()):
            return first
        return torch.where(found, first, self._queue_head(~found))

    def _current(self, entries: torch.Tensor, entry_stamps: torch.Tensor) -> torch.Tensor:
        """Whether each queue entry is its slot's last access, bool of ``entries``' shape."""
        assert self.stamps is not None
        held = self.stamps.gather(1, entries.long().clamp(min=0))
        return (entries >= 0) & (held == entry_stamps)

    def _queue_head(self, exhausted: torch.Tensor) -> torch.Tensor:
        """The first current queue entry of each batch element in ``exhausted`` ``[B]``."""
        head, queue, queue_stamps = self._head, self._queue, self._queue_stamps
        assert head is not None and queue is not None and queue_stamps is not None
        offsets = torch.arange(self.window, device=queue.device)
        while True:
            positions = head.unsqueeze(1) + offsets
            inside = positions < self._length
            positions = positions.clamp(max=queue.shape[1] - 1)
            entries = queue.gather(1, positions)
            current = inside & self._current(entries, queue_stamps.gather(1, positions))
            found = current.any(1)
            searching = exhausted & ~found & (head + self.window < self._length)
            if not bool(searching.any()):
                break
            head = torch.where(searching, head + self.window, head)
        first = current.long().argmax(1, keepdim=True)
        self._head = torch.where(exhausted, head + first.squeeze(1), head)
        return entries.gather(1, first).squeeze(1).long()

    def _make_room(self, count: int) -> None:
        """Room for ``count`` more entries: the stale entries dropped, each element's
        current ones kept in order at the front (every entry before a head is stale, so
        the heads go to 0), and the queue doubled if that leaves it over three quarters
        full.

        The compaction runs in place, ``block`` entries at a time: an entry moves to its
        rank among its element's current ones, never past its own position, so each block
        is read (copied) before anything is written over it. The transients are a block's
        size, not the queue's."""
        queue, queue_stamps = self._queue, self._queue_stamps
        assert queue is not None and queue_stamps is not None
        batch, capacity = queue.shape
        kept = torch.zeros(batch, 1, dtype=torch.long, device=queue.device)
        rows = torch.arange(batch, device=queue.device).unsqueeze(1) * capacity
        for start in range(0, self._length, self.block):
            end = min(start + self.block, self._length)
            entries, entry_stamps = queue[:, start:end].clone(), queue_stamps[:, start:end].clone()
            current = self._current(entries, entry_stamps)
            ranks = kept + current.long().cumsum(1) - 1
            targets = (rows + ranks)[current]
            queue.view(-1)[targets] = entries[current]
            queue_stamps.view(-1)[targets] = entry_stamps[current]
            kept += current.sum(1, keepdim=True)
        length = int(kept.max())
        queue[:, :length].masked_fill_(torch.arange(length, device=queue.device) >= kept, NEVER)
        if 4 * (length + count) > 3 * capacity:
            capacity = 2 * capacity + count
            # Entries from _length on are never read (nor filled): lazily zeroed pages,
            # outside the heap where a chunk's graph is built and freed.
            self._queue = zeros((batch, capacity), queue.device, torch.int32)
            self._queue_stamps = zeros((batch, capacity), queue.device, torch.int32)
            self._queue[:, :length] = queue[:, :length]
            self._queue_stamps[:, :length] = queue_stamps[:, :length]
        self._length = length
        self._head = torch.zeros_like(self._head)

    def update(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Record a step's accesses: ``rows`` ``[B, L]`` (may repeat) with their read or
        write ``weights`` ``[B, L]``; a slot is accessed when its weights sum above DELTA.
        Returns that per entry, bool ``[B, L]``."""
        stamps = self.stamps
        assert stamps is not None
        same = (rows.unsqueeze(2) == rows.unsqueeze(1)).to(weights.dtype)
        accessed = torch.bmm(same, weights.unsqueeze(2)).squeeze(2) > DELTA
        ordered, order = rows.sort(1)
        repeated = torch.zeros_like(accessed)
        repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        entries = torch.where(accessed.gather(1, order) & ~repeated, ordered, NEVER)
        count = rows.shape[1]
        assert self._queue is not None and self._queue_stamps is not None
        if self._length + count > self._queue.shape[1]:
            self._make_room(count)
        end = self._length + count
        self._queue[:, self._length : end] = entries
        self._queue_stamps[:, self._length : end] = self.time + 1
        self._length = end
        stamped = torch.where(accessed, self.time + 1, stamps.gather(1, rows))
        stamps.scatter_(1, rows, stamped)
        self.time += 1
        return accessed
