"""Sparse Differentiable Neural Computer, SDNC (Rae et al. 2016, arXiv 1610.09027,
Supplementary "SDNC"): SAM's sparse reads and writes (``sam.py``) plus the DNC's temporal
links (Graves et al. 2016, Methods, "Temporal memory linkage"; ``addressing.py``'s
``precedence_update``, ``link_update``, ``directional_weightings``) kept sparse.

With ``w`` this step's sparse write weights (the ``J = R S + 1`` rows SAM writes) and
``K_L = temporal_reads``:

1. the link (``link_update``):
   ``L_t[i, j] = (1 - w[i] - w[j]) L_{t-1}[i, j] + w[i] p_{t-1}[j]``, ``L_t[i, i] = 0``;
   then each written row keeps its K_L largest entries, and then each column that gained
   entries (the columns of ``p_{t-1}``) its K_L largest. Every other row and column only
   decays, so the link never has more than K_L entries in a row or a column;
2. the precedence keeps its K_L largest entries of ``(1 - sum_i w[i]) p_{t-1} + w``;
3. the forward ``f = L_t w^r_{t-1}`` and backward ``b = L_t^T w^r_{t-1}`` weightings of each
   read head keep their K_L largest entries;
4. each read head mixes them with its content weights over its K nearest slots by read
   modes ``pi`` (a softmax over backward, forward, content, the DNC's):
   ``w^r = pi_b b + pi_f f + pi_c c``, over ``S = K + 2 K_L`` rows (a slot may repeat; its
   weights add), and ``r = sum w^r M_t``. The next step writes to these S rows per head.

Storage (``SparseLink``): the link lives in one in-place ``SparseMemory`` (``access.py``)
of N rows of ``2 K_L`` numbers: row ``s`` holds the values of row ``s`` of ``L`` (its
entries' columns in a long buffer beside it) and the values of column ``s`` (their rows
likewise), both views of one matrix. A step gathers the rows of the slots it touches
(the J written rows, the precedence's slots, and the slots their entries name:
``O(J K_L)``, those named deduplicated) and computes only the entries that can change:
a written row's ``2 K_L`` candidates (its entries and the precedence's columns), a
precedence column's ``J K_L + K_L`` (the written rows' kept entries in it and its other
rows' entries), and the other entries of the touched rows and columns, decayed or
dropped by a prune. Which
written row or precedence slot a slot is and its write weight are gathers from tables of
N + 1 entries that a step refills in O(J) (``_SlotTable``); whether an entry outlived a
prune is a binary search in a sorted list (``_Slots``; an entry ``(i, j)`` is the number
``i (N + 1) + j``): ``O(J K_L log(J K_L))`` a step, whatever N. The rows are
assigned back, so gradients flow through the touched rows only and nothing of N rows is
saved for backward. Empty entries name slot N and hold 0.

Departures from the paper: the order of the prunes (written rows, then the precedence's
columns) is ours; the forward and backward weightings are pruned to K_L so a head's
support stays fixed.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from memctl.models.sparse.access import SparseMemory, first_copies, sorted_runs, zeros
from memctl.models.sparse.sam import (
    Index,
    SAMConfig,
    SAMModel,
    SparseAccess,
    StepRecord,
    sparse_read,
)
from memctl.registry import MODELS


def merge_top(
    rows: torch.Tensor, values: torch.Tensor, k: int, empty: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse vector given as entries that may repeat -> its k largest entries.

    The values of a repeated row add; rows equal to ``empty`` are no entry. Fewer than k
    entries are padded with row ``empty`` and value 0.

    rows: long ``[..., C]``, values: ``[..., C]`` -> (rows ``[..., k]``, values ``[..., k]``)
    """
    ordered, order = rows.sort(dim=-1)
    start = torch.ones_like(ordered, dtype=torch.bool)
    start[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    group = start.long().cumsum(-1) - 1  # the distinct rows, numbered in sorted order
    total = torch.zeros_like(values).scatter_add(-1, group, values.gather(-1, order))
    rows = torch.full_like(rows, empty).scatter(-1, group, ordered)
    score = torch.where(rows != empty, total.detach(), -1.0)
    if score.shape[-1] < k:
        pad = k - score.shape[-1]
        score = F.pad(score, (0, pad), value=-1.0)
        rows = F.pad(rows, (0, pad), value=empty)
        total = F.pad(total, (0, pad))
    top = score.topk(k, dim=-1).indices
    kept = score.gather(-1, top) >= 0
    return torch.where(kept, rows.gather(-1, top), empty), total.gather(-1, top) * kept


def precedence_update(
    rows: torch.Tensor,
    precedence: torch.Tensor,
    write_rows: torch.Tensor,
    write_weights: torch.Tensor,
    keep: int,
    empty: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``p_t = (1 - sum_i w[i]) p_{t-1} + w``, its ``keep`` largest entries.

    rows, precedence (``p_{t-1}``): ``[B, K_L]``, write_rows, write_weights: ``[B, J]``
    -> (rows, precedence) ``[B, K_L]``
    """
    decay = 1 - write_weights.sum(1, keepdim=True)
    return merge_top(
        torch.cat([rows, write_rows], 1),
        torch.cat([decay * precedence, write_weights], 1),
        keep,
        empty,
    )


class _Lookups(abc.ABC):
    """Look-ups in a list of slots (or other keys) per batch element, ``[B, L]`` long."""

    @abc.abstractmethod
    def find(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries ``[B, ...]`` -> (the position in the list of each one's first copy,
        whether it is there), both ``[B, ...]``; the position is 0 where it is not."""

    def contains(self, queries: torch.Tensor) -> torch.Tensor:
        """Whether each of ``queries`` ``[B, ...]`` is in the list -> bool ``[B, ...]``."""
        return self.find(queries)[1]

    def take(self, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``values`` ``[B, L]`` of the list's entries at ``queries`` ``[B, ...]``, 0 where
        a query is not in the list."""
        at, found = self.find(queries)
        got = values.gather(1, at.reshape(at.shape[0], -1)).view(at.shape)
        return torch.where(found, got, 0)


class _Slots(_Lookups):
    """A list sorted once, each look-up a binary search."""

    def __init__(self, keys: torch.Tensor) -> None:
        self.sorted, self.order = keys.sort(stable=True, dim=1)

    def find(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = queries.reshape(queries.shape[0], -1).contiguous()
        at = torch.searchsorted(self.sorted, flat).clamp_(max=self.sorted.shape[1] - 1)
        found = self.sorted.gather(1, at) == flat
        position = torch.where(found, self.order.gather(1, at), 0)
        return position.view(queries.shape), found.view(queries.shape)


class _SlotTable(_Lookups):
    """A list of slots in ``[0, N]``, by a table ``[B, N + 1]`` of each slot's first
    position in the list plus one (0: not listed): ``fill`` first empties the previous
    list's entries, so a refill costs O(L) and each look-up is a gather, whatever N."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.slots: torch.Tensor | None = None

    def fill(self, slots: torch.Tensor) -> _SlotTable:
        """Make ``slots`` ``[B, L]`` the list; returns the table."""
        self.empty()
        positions = torch.arange(1, slots.shape[1] + 1, device=slots.device)
        self.table.scatter_reduce_(1, slots, positions.expand_as(slots), "amin", include_self=False)
        self.slots = slots
        return self

    def empty(self) -> None:
        """Clear the list's entries from the table."""
        if self.slots is not None:
            self.table.scatter_(1, self.slots, 0)
            self.slots = None

    def find(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        listed = self.table.gather(1, queries.reshape(queries.shape[0], -1))
        found = listed > 0
        return (listed - 1).clamp_(min=0).view(queries.shape), found.view(queries.shape)


def _distinct(slots: torch.Tensor) -> torch.Tensor:
    """``slots`` ``[B, U]`` -> each batch element's distinct slots, ascending, then
    repeats of its largest, ``[B, U']`` with U' the most distinct slots of an element: the
    same sets in fewer lines (a repeated slot is computed once per line; its first copy
    is assigned)."""
    ordered, _, new = sorted_runs(slots)
    position = new.cumsum(1) - 1
    width = int(position[:, -1].max()) + 1
    distinct = ordered[:, -1:].expand(-1, width).clone()
    return distinct.scatter_(1, position, ordered)


def _take(lists: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Lines ``at`` ``[B, U]`` of ``lists`` ``[B, L, C]`` -> ``[B, U, C]``."""
    return lists.gather(1, at.unsqueeze(2).expand(-1, -1, lists.shape[2]))


def _keep_largest(
    slots: torch.Tensor, values: torch.Tensor, present: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest present entries of each line: slots, values, present ``[B, L, C]``
    (C >= k; no slot twice among a line's present entries) -> (slots, values, whether
    each is a present entry) ``[B, L, k]``."""
    score = torch.where(present, values.detach(), -1.0)
    top = score.topk(k, dim=-1).indices
    return slots.gather(-1, top), values.gather(-1, top), score.gather(-1, top) >= 0


class SparseLink:
    """The sparse temporal link matrix of N slots, K_L entries at most per row and column
    (the module docstring's storage). Not an ``nn.Module``; allocated at ``reset``."""

    def __init__(self, num_slots: int, keep: int) -> None:
        self.num_slots, self.keep = num_slots, keep
        self.values = SparseMemory(num_slots, 2 * keep)  # [row values | column values]
        # long [B, N, 2 K_L]: N minus the slots the entries name (their columns | their
        # rows), so that an empty entry (slot N) is 0 and the buffer lazily zeroed pages.
        self._entries: torch.Tensor | None = None
        self._touched: list[torch.Tensor] = []
        # the written rows' and the precedence's slots, on long [B, N + 1] tables
        self._written: _SlotTable | None = None
        self._preceding: _SlotTable | None = None

    def reset(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Empty the link (O(slots touched since the last reset)); returns its token."""
        token = self.values.reset(batch, device, dtype)
        shape = (batch, self.num_slots, 2 * self.keep)
        entries = self._entries
        if entries is None or entries.shape != shape or entries.device != device:
            self._entries = zeros(shape, device, torch.int64)
            table = (batch, self.num_slots + 1)
            self._written = _SlotTable(zeros(table, device, torch.int64))
            self._preceding = _SlotTable(zeros(table, device, torch.int64))
        elif self._touched:
            entries.view(-1, shape[2]).index_fill_(0, torch.cat(self._touched), 0)
        self._touched = []
        return token

    def _load(self, token: torch.Tensor, slots: torch.Tensor):
        """(values ``[B, J, 2 K_L]``, entries ``[B, J, 2 K_L]``, token) of ``slots`` ``[B, J]``."""
        values, token = self.values.gather(token, slots)
        return values, self.entries_of(slots), token

    def entries_of(self, slots: torch.Tensor) -> torch.Tensor:
        """The entries' slots of ``slots`` ``[B, J]`` -> long ``[B, J, 2 K_L]`` (no autograd)."""
        assert self._entries is not None
        stored = self._entries.view(-1, 2 * self.keep)[self.values.flat(slots)]
        return self.num_slots - stored.view(*slots.shape, 2 * self.keep)

    def _key(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Entry ``(rows, columns)`` of L as one number (``rows (N + 1) + columns``)."""
        return rows * (self.num_slots + 1) + columns

    def update(
        self,
        token: torch.Tensor,
        write_rows: torch.Tensor,
        write_weights: torch.Tensor,
        precedence_rows: torch.Tensor,
        precedence: torch.Tensor,
    ) -> torch.Tensor:
        """Step 1 of the module docstring: write_rows, write_weights (``w_t``) ``[B, J]``,
        precedence_rows, precedence (``p_{t-1}``) ``[B, K_L]`` -> the next token."""
        keep, empty = self.keep, self.num_slots
        writes = write_rows.shape[1]
        owned = torch.cat(
            [write_rows, torch.where(precedence_rows == empty, 0, precedence_rows)], 1
        )
        owned_entries = self.entries_of(owned)
        reached = torch.cat(
            [
                owned_entries[..., keep:].flatten(1),  # the owned columns' rows
                owned_entries[:, :writes, :keep].flatten(1),  # the written rows' columns
            ],
            1,
        )
        # the owned slots first (the lines below slice them by position), then the others
        touched = torch.cat([owned, _distinct(torch.where(reached == empty, 0, reached))], 1)
        values, token = self.values.gather(token, touched)  # [B, U, 2 K_L]
        entries = self.entries_of(touched)
        same = write_rows.unsqueeze(2) == write_rows.unsqueeze(1)  # [B, J, J]
        totals = (same.to(write_weights.dtype) @ write_weights.unsqueeze(2)).squeeze(2)
        first_write = first_copies(write_rows)
        assert self._written is not None and self._preceding is not None
        written, preceding = self._written.fill(write_rows), self._preceding.fill(precedence_rows)
        live_precedence = (precedence_rows != empty).unsqueeze(2)

        # The written rows: their entries and the precedence's columns, updated; each keeps
        # its K_L largest.
        old_columns, old_values = entries[:, :writes, :keep], values[:, :writes, :keep]
        row_weights = totals.unsqueeze(2)  # [B, J, 1]
        decayed = (1 - row_weights - written.take(totals, old_columns)) * old_values
        decayed = decayed + row_weights * preceding.take(precedence, old_columns)
        gained_columns = precedence_rows.unsqueeze(1).expand(-1, writes, -1)
        gained = (
            (gained_columns != empty)
            & (gained_columns != write_rows.unsqueeze(2))
            & ~(gained_columns.unsqueeze(3) == old_columns.unsqueeze(2)).any(3)
        )
        row_slots, row_values, row_kept = _keep_largest(
            torch.cat([old_columns, gained_columns], 2),
            torch.cat([decayed, row_weights * precedence.unsqueeze(1)], 2),
            torch.cat([old_columns != empty, gained], 2),
            keep,
        )

        # The precedence's columns: the written rows' kept entries in them (each written
        # slot once) and the other rows' entries, decayed; each keeps its K_L largest.
        others = entries[:, writes : writes + keep, keep:]  # [B, K_L, K_L]
        other_values = values[:, writes : writes + keep, keep:]
        column_weights = written.take(totals, precedence_rows).unsqueeze(2)
        in_column = row_slots.flatten(1).unsqueeze(1) == precedence_rows.unsqueeze(2)
        in_column = in_column & (row_kept & first_write.unsqueeze(2)).flatten(1).unsqueeze(1)
        column_slots, column_values, column_kept = _keep_largest(
            torch.cat(
                [write_rows.repeat_interleave(keep, 1).unsqueeze(1).expand_as(in_column), others],
                2,
            ),
            torch.cat(
                [
                    row_values.flatten(1).unsqueeze(1).expand_as(in_column),
                    (1 - column_weights) * other_values,
                ],
                2,
            ),
            torch.cat([in_column, (others != empty) & ~written.contains(others)], 2)
            & live_precedence,
            keep,
        )
        column_keys = self._key(column_slots, precedence_rows.unsqueeze(2))
        columns_kept = _Slots(torch.where(column_kept, column_keys, -1).flatten(1))

        def survives(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
            """Whether entries (rows, columns) of L outlive the precedence columns' prune."""
            return ~preceding.contains(columns) | columns_kept.contains(self._key(rows, columns))

        row_kept = row_kept & survives(write_rows.unsqueeze(2), row_slots)
        row_values = row_values * row_kept
        row_slots = torch.where(row_kept, row_slots, empty)
        row_keys = torch.where(row_kept, self._key(write_rows.unsqueeze(2), row_slots), -1)
        rows_kept = _Slots(row_keys.flatten(1))
        column_values = column_values * column_kept
        column_slots = torch.where(column_kept, column_slots, empty)

        # Each touched slot's row of L: a written row's anew, else its entries decayed by
        # their columns' writes, less those the columns' prune dropped; its column of L: a
        # precedence column's anew, else its entries in written rows as those rows kept
        # them, the others decayed by the slot's write.
        slots = touched.unsqueeze(2)
        at, is_written = written.find(touched)
        old_columns, old_values = entries[..., :keep], values[..., :keep]
        kept = (old_columns != empty) & survives(slots, old_columns)
        is_written = is_written.unsqueeze(2)
        new_row_slots = torch.where(
            is_written, _take(row_slots, at), torch.where(kept, old_columns, empty)
        )
        new_row_values = torch.where(
            is_written,
            _take(row_values, at),
            (1 - written.take(totals, old_columns)) * old_values * kept,
        )
        old_rows, old_values = entries[..., keep:], values[..., keep:]
        kept_at, found = rows_kept.find(self._key(old_rows, slots))
        from_written = written.contains(old_rows)
        kept = (old_rows != empty) & (found | ~from_written)
        decayed = torch.where(
            from_written,
            row_values.flatten(1).gather(1, kept_at.flatten(1)).view_as(kept_at),
            (1 - written.take(totals, slots)) * old_values,
        )
        at, is_preceding = preceding.find(touched)
        is_preceding = is_preceding.unsqueeze(2)
        new_column_slots = torch.where(
            is_preceding, _take(column_slots, at), torch.where(kept, old_rows, empty)
        )
        new_column_values = torch.where(is_preceding, _take(column_values, at), decayed * kept)

        token = self.values.assign(
            token, touched, torch.cat([new_row_values, new_column_values], 2)
        )
        flat = self.values.flat(touched)
        assert self._entries is not None
        self._entries.view(-1, 2 * keep)[flat] = empty - torch.cat(
            [new_row_slots, new_column_slots], 2
        ).flatten(0, 1)
        self._touched.append(flat)
        return token

    def directional(
        self, token: torch.Tensor, read_rows: torch.Tensor, read_weights: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Step 3: the previous step's read rows and weights ``[B, R, S]`` -> (token,
        forward (rows, weights) ``[B, R, K_L]``, backward likewise). ``f[i] = sum_j
        L[i, j] w[j]`` from the columns of the rows read, ``b[j] = sum_i w[i] L[i, j]`` from
        their rows; empty entries name slot N."""
        batch, heads, support = read_rows.shape
        keep = self.keep
        values, entries, token = self._load(token, read_rows.flatten(1))
        values = values.view(batch, heads, support, 2 * keep)
        entries = entries.view(batch, heads, support, 2 * keep)
        weights = read_weights.unsqueeze(3)
        forward = merge_top(
            entries[..., keep:].flatten(2),
            (weights * values[..., keep:]).flatten(2),
            keep,
            self.num_slots,
        )
        backward = merge_top(
            entries[..., :keep].flatten(2),
            (weights * values[..., :keep]).flatten(2),
            keep,
            self.num_slots,
        )
        return token, forward, backward

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The link as dense ``[B, N, N]`` matrices from its rows and from its columns, for
        tests (both views of one matrix)."""
        assert self.values.buffer is not None and self._entries is not None
        batch, slots, keep = self.values.buffer.shape[0], self.num_slots, self.keep
        buffer, entries = self.values.buffer, slots - self._entries
        by_rows = torch.zeros(batch, slots, slots + 1, dtype=buffer.dtype)
        by_rows.scatter_add_(2, entries[..., :keep], buffer[..., :keep])
        by_columns = torch.zeros(batch, slots, slots + 1, dtype=buffer.dtype)
        by_columns.scatter_add_(2, entries[..., keep:], buffer[..., keep:])
        return by_rows[..., :slots], by_columns[..., :slots].transpose(1, 2)


class SDNCAccessState(NamedTuple):
    """One SDNC memory's state (its rows and its link are in ``SparseMemory`` buffers).

    memory, version:       the memory's token and version (``SparseAccessState``'s)
    read_rows:             ``[B, R, S]`` long, each head's rows: content, forward, backward
    read_weights:          ``[B, R, S]``, their weights
    link, link_version:    the link's token and version
    precedence_rows:       ``[B, K_L]`` long (slot N: no entry)
    precedence:            ``[B, K_L]``, their precedence weights
    """

    memory: torch.Tensor
    version: torch.Tensor
    read_rows: torch.Tensor
    read_weights: torch.Tensor
    link: torch.Tensor
    link_version: torch.Tensor
    precedence_rows: torch.Tensor
    precedence: torch.Tensor


class SDNCAccess(SparseAccess):
    """SAM's access (``SparseAccess``) with the sparse link and read modes: the interface
    adds ``3 R`` mode logits (softmax per head over backward, forward, content)."""

    def __init__(
        self,
        input_size: int,
        memory_size: int,
        word_size: int,
        read_heads: int,
        sparse_reads: int,
        temporal_reads: int,
        index: Index = "auto",
        rebuild_every: int = 1000,
    ) -> None:
        super().__init__(
            input_size, memory_size, word_size, read_heads, sparse_reads, index, rebuild_every
        )
        if temporal_reads < 1:
            raise ValueError(f"temporal_reads must be at least 1 (got {temporal_reads})")
        self.temporal_reads = temporal_reads
        self.sizes = [*self.sizes, 3 * read_heads]
        self.interface = nn.Linear(input_size, sum(self.sizes))
        self.link = SparseLink(memory_size, temporal_reads)

    @property
    def support(self) -> int:
        """S, the rows a head reads: K content, K_L forward, K_L backward."""
        return self.sparse_reads + 2 * self.temporal_reads

    def initial_state(
        self, batch: int, device: torch.device, dtype: torch.dtype
    ) -> SDNCAccessState:
        """Start an episode: SAM's, and an empty link and precedence."""
        sam = super().initial_state(batch, device, dtype)
        link = self.link.reset(batch, device, dtype)
        shape = (batch, self.read_heads, self.support)
        rows = (torch.arange(self.support, device=device) % self.memory_size).expand(shape)
        keep = (batch, self.temporal_reads)
        return SDNCAccessState(
            sam.memory,
            sam.version,
            rows,
            torch.zeros(shape, device=device, dtype=dtype),
            link,
            torch.tensor(self.link.values.version),
            torch.full(keep, self.memory_size, device=device),
            torch.zeros(keep, device=device, dtype=dtype),
        )

    def step(
        self, controller_output: torch.Tensor, state: SDNCAccessState, record: bool = False
    ) -> tuple[torch.Tensor, SDNCAccessState, StepRecord | None]:
        """controller_output ``[B, H]`` -> (read vectors ``[B, R, M]``, state, with
        ``record`` what the step did)."""
        self.memory.check(state.memory, int(state.version))
        self.link.values.check(state.link, int(state.link_version))
        batch, word, heads = controller_output.shape[0], self.word_size, self.read_heads
        linear, oneplus, gates, modes = self.interface(controller_output).split(self.sizes, 1)
        read_keys, write_vector = linear.split([heads * word, word], 1)
        read_keys = read_keys.view(batch, heads, word)
        read_strengths = 1 + F.softplus(oneplus)
        write_gate, interpolation_gate = torch.sigmoid(gates).unbind(1)
        modes = torch.softmax(modes.view(batch, heads, 3), -1)

        token, write_rows, write_weights, written = self.write(
            state, write_vector, write_gate, interpolation_gate
        )
        link = self.link.update(
            state.link, write_rows, write_weights, state.precedence_rows, state.precedence
        )
        precedence_rows, precedence = precedence_update(
            state.precedence_rows,
            state.precedence,
            write_rows,
            write_weights,
            self.temporal_reads,
            self.memory_size,
        )
        link, forward, backward = self.link.directional(link, state.read_rows, state.read_weights)
        with torch.no_grad():
            content_rows = self.nearest(read_keys.detach())
        empty = self.memory_size
        read_rows = torch.cat([content_rows, forward[0], backward[0]], 2)
        read_rows = torch.where(read_rows == empty, 0, read_rows)  # weight 0 there
        values, token = self.memory.gather(token, read_rows.flatten(1))
        values = values.view(batch, heads, self.support, word)
        content, _ = sparse_read(values[:, :, : self.sparse_reads], read_keys, read_strengths)
        read_weights = torch.cat(
            [
                modes[..., 2:] * content,
                modes[..., 1:2] * forward[1],
                modes[..., :1] * backward[1],
            ],
            2,
        )
        reads = (read_weights.unsqueeze(-2) @ values).squeeze(-2)

        usage_rows = torch.cat([write_rows, read_rows.flatten(1)], 1)
        usage_weights = torch.cat([write_weights, read_weights.flatten(1)], 1).detach()
        accessed = self.usage.update(usage_rows, usage_weights)
        state = SDNCAccessState(
            token,
            torch.tensor(self.memory.version),
            read_rows,
            read_weights,
            link,
            torch.tensor(self.link.values.version),
            precedence_rows,
            precedence,
        )
        trail = None
        if record:
            trail = StepRecord(
                write_rows,
                write_weights.detach(),
                written.detach(),
                read_rows,
                read_weights.detach(),
                usage_rows,
                accessed,
            )
        return reads, state, trail


class SDNCConfig(SAMConfig):
    type: str = "sdnc"
    temporal_reads: int = Field(
        4,
        ge=1,
        description="K_L, entries kept per row and column of the link, in the "
        "precedence and in each forward and backward weighting",
    )

    @model_validator(mode="after")
    def _links_fit(self) -> SDNCConfig:
        if self.temporal_reads > self.memory_size:
            raise ValueError(
                f"temporal_reads ({self.temporal_reads}) must be at most memory_size "
                f"({self.memory_size})"
            )
        return self


@MODELS.register("sdnc", SDNCConfig)
class SDNCModel(SAMModel):
    """The recipe model: SAM's controller stack and layering with SDNC memories."""

    def memory_access(self, config: SDNCConfig) -> Callable[[], SDNCAccess]:
        return functools.partial(
            SDNCAccess,
            config.controller_size,
            config.memory_size,
            config.word_size,
            config.read_heads,
            config.sparse_reads,
            config.temporal_reads,
            config.index,
            config.rebuild_every,
        )
