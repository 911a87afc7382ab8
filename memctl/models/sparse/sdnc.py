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
(written rows, the precedence's slots, and the slots their entries name: ``O(J K_L)``),
updates a dense block over them (``O((J K_L)^2)`` numbers, whatever N) and assigns them
back; so gradients flow through the touched rows only and nothing of N rows is saved for
backward. Empty entries name
slot N and hold 0.

Departures from the paper: the order of the prunes (written rows, then the precedence's
columns) is ours; the forward and backward weightings are pruned to K_L so a head's
support stays fixed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from memctl.models.sparse.access import SparseMemory, zeros
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
    same = rows.unsqueeze(-1) == rows.unsqueeze(-2)  # [..., C, C]
    total = (same.to(values.dtype) @ values.unsqueeze(-1)).squeeze(-1)
    present = ~same.tril(-1).any(-1) & (rows != empty)
    score = torch.where(present, total.detach(), -1.0)
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


def _contains(values: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Whether each of ``values`` ``[B, ...]`` is one of ``members`` ``[B, L]`` -> bool."""
    flat = values.reshape(values.shape[0], -1, 1)
    return (flat == members.unsqueeze(1)).any(-1).view(values.shape)


def _positions(sorted_slots: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Position of each of ``slots`` ``[B, ...]`` in ``sorted_slots`` ``[B, L]`` (its first
    copy; only meaningful where the slot is there)."""
    found = torch.searchsorted(sorted_slots, slots.reshape(slots.shape[0], -1))
    return found.clamp_(max=sorted_slots.shape[1] - 1).view(slots.shape)


def _gather2(block: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``block[b, rows[b, ...], columns[b, ...]]``: block ``[B, R, C]``, positions alike."""
    width = block.shape[2]
    flat = (rows * width + columns).reshape(rows.shape[0], -1)
    return block.flatten(1).gather(1, flat).view(rows.shape)


def _top_entries(
    scores: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, k: int, empty: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each line: scores, values ``[B, L, C]`` (score < 0: no entry), slots
    of the C positions ``[B, C]`` -> (slots, values) ``[B, L, k]``."""
    if scores.shape[-1] < k:
        pad = k - scores.shape[-1]
        scores = F.pad(scores, (0, pad), value=-1.0)
        values = F.pad(values, (0, pad))
        slots = F.pad(slots, (0, pad), value=empty)
    top = scores.topk(k, dim=-1).indices
    kept = scores.gather(-1, top) >= 0
    named = slots.unsqueeze(1).expand(-1, top.shape[1], -1).gather(2, top)
    return torch.where(kept, named, empty), values.gather(-1, top) * kept


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

    def reset(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Empty the link (O(slots touched since the last reset)); returns its token."""
        token = self.values.reset(batch, device, dtype)
        shape = (batch, self.num_slots, 2 * self.keep)
        entries = self._entries
        if entries is None or entries.shape != shape or entries.device != device:
            self._entries = zeros(shape, device, torch.int64)
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
        batch, writes = write_rows.shape
        owned = torch.cat([write_rows, precedence_rows], 1)  # columns known in full
        owned_slots = torch.where(owned == empty, -1, owned)  # empty entries own nothing
        safe_owned = torch.where(owned == empty, 0, owned)
        row_columns = self.entries_of(write_rows)[..., :keep]  # [B, J, K_L]
        column_rows = self.entries_of(safe_owned)[..., keep:]  # [B, J + K_L, K_L]
        local_rows = torch.cat([write_rows, column_rows.flatten(1)], 1).sort(1).values
        local_columns = torch.cat([owned, row_columns.flatten(1)], 1).sort(1).values
        touched = torch.cat([owned, column_rows.flatten(1), row_columns.flatten(1)], 1)
        touched = torch.where(touched == empty, 0, touched)
        values, entries, token = self._load(token, touched)

        # The block of L over the local rows and columns, from the written rows' entries
        # and the owned columns' entries of other rows.
        height, width = local_rows.shape[1], local_columns.shape[1]
        first_write = ~(write_rows.unsqueeze(2) == write_rows.unsqueeze(1)).tril(-1).any(-1)
        first_owned = ~(owned.unsqueeze(2) == owned.unsqueeze(1)).tril(-1).any(-1)
        first_owned = first_owned & (owned != empty)
        row_values = values[:, :writes, :keep] * first_write.unsqueeze(2)
        column_values = values[:, : owned.shape[1], keep:] * first_owned.unsqueeze(2)
        column_values = column_values * ~_contains(column_rows, write_rows)
        at_rows = torch.cat(
            [
                _positions(local_rows, write_rows).unsqueeze(2).expand(-1, -1, keep),
                _positions(local_rows, column_rows),
            ],
            1,
        )
        at_columns = torch.cat(
            [
                _positions(local_columns, row_columns),
                _positions(local_columns, owned).unsqueeze(2).expand(-1, -1, keep),
            ],
            1,
        )
        block = torch.zeros(batch, height * width, dtype=values.dtype, device=values.device)
        block = block.scatter_add(
            1,
            (at_rows * width + at_columns).flatten(1),
            torch.cat([row_values, column_values], 1).flatten(1),
        )
        block = block.view(batch, height, width)

        def weights_at(local, slots, amounts, size):
            out = torch.zeros(batch, size, dtype=values.dtype, device=values.device)
            return out.scatter_add(1, _positions(local, slots), amounts)

        row_writes = weights_at(local_rows, write_rows, write_weights, height)
        column_writes = weights_at(local_columns, write_rows, write_weights, width)
        column_precedence = weights_at(local_columns, precedence_rows, precedence, width)
        valid_rows = _first(local_rows) & (local_rows != empty)
        valid_columns = _first(local_columns) & (local_columns != empty)
        valid = valid_rows.unsqueeze(2) & valid_columns.unsqueeze(1)
        valid = valid & (local_rows.unsqueeze(2) != local_columns.unsqueeze(1))
        with torch.no_grad():
            updated = _block_update(block, row_writes, column_writes, column_precedence, valid)

        # Prune the written rows, then the precedence's columns, to K_L entries each: the
        # choice on the values, the mask applied in one differentiable update.
        batch_index = torch.arange(batch, device=block.device).unsqueeze(1)
        write_at = _positions(local_rows, write_rows)  # [B, J]
        written_rows = valid_rows & _contains(local_rows, write_rows)
        mask = valid
        if width > keep:
            top = updated[batch_index, write_at].topk(keep, dim=2).indices
            kept = torch.zeros(batch, writes, width, dtype=torch.bool, device=block.device)
            kept = kept.scatter_(2, top, True)
            kept = torch.zeros_like(valid).scatter_(1, write_at.unsqueeze(2).expand_as(kept), kept)
            mask = mask & (kept | ~written_rows.unsqueeze(2))
            updated = updated * mask
        precedence_at = _positions(local_columns, precedence_rows)  # [B, K_L]
        gained_columns = valid_columns & _contains(local_columns, precedence_rows)
        if height > keep:
            gained = updated.gather(2, precedence_at.unsqueeze(1).expand(-1, height, -1))
            top = gained.topk(keep, dim=1).indices
            kept = torch.zeros_like(gained, dtype=torch.bool).scatter_(1, top, True)
            kept = torch.zeros_like(valid).scatter_(
                2, precedence_at.unsqueeze(1).expand_as(kept), kept
            )
            mask = mask & (kept | ~gained_columns.unsqueeze(1))
        block = _BlockUpdate.apply(block, row_writes, column_writes, column_precedence, mask)

        # The written rows and the owned columns anew (their K_L largest entries), then
        # every touched slot's row and column of L.
        row_block = block[batch_index, write_at]  # [B, J, C]
        row_valid = mask[batch_index, write_at]
        fresh_row_slots, fresh_row_values = _top_entries(
            torch.where(row_valid, row_block.detach(), -1.0), row_block, local_columns, keep, empty
        )
        owned_at = _positions(local_columns, owned)  # [B, J + K_L]
        column_block = block.transpose(1, 2)[batch_index, owned_at]  # [B, J + K_L, R]
        column_valid = mask.transpose(1, 2)[batch_index, owned_at]
        fresh_column_slots, fresh_column_values = _top_entries(
            torch.where(column_valid, column_block.detach(), -1.0),
            column_block,
            local_rows,
            keep,
            empty,
        )

        row_at = _positions(local_rows, touched)
        row_here = local_rows.gather(1, row_at) == touched
        column_at = _positions(local_columns, touched)
        column_here = local_columns.gather(1, column_at) == touched
        as_written = touched.unsqueeze(2) == write_rows.unsqueeze(1)  # [B, U, J]
        is_written = as_written.any(2)
        as_owned = touched.unsqueeze(2) == owned_slots.unsqueeze(1)  # [B, U, J + K_L]
        is_owned = as_owned.any(2)
        which = as_written.byte().argmax(2, keepdim=True).expand(-1, -1, keep)
        new_row_slots = fresh_row_slots.gather(1, which)
        new_row_values = fresh_row_values.gather(1, which)
        which = as_owned.byte().argmax(2, keepdim=True).expand(-1, -1, keep)
        new_column_slots = fresh_column_slots.gather(1, which)
        new_column_values = fresh_column_values.gather(1, which)

        old_row_slots, old_row_values = entries[..., :keep], values[..., :keep]
        entry_column = _positions(local_columns, old_row_slots)
        update = (
            row_here.unsqueeze(2)
            & _contains(old_row_slots, owned_slots)
            & (
                local_columns.gather(1, entry_column.flatten(1)).view_as(old_row_slots)
                == old_row_slots
            )
        )
        decayed = _gather2(block, row_at.unsqueeze(2).expand_as(entry_column), entry_column)
        kept_row_values = torch.where(update, decayed, old_row_values)
        row_slots = torch.where(is_written.unsqueeze(2), new_row_slots, old_row_slots)
        row_values = torch.where(is_written.unsqueeze(2), new_row_values, kept_row_values)

        old_column_slots, old_column_values = entries[..., keep:], values[..., keep:]
        entry_row = _positions(local_rows, old_column_slots)
        update = (
            column_here.unsqueeze(2)
            & _contains(old_column_slots, write_rows)
            & (
                local_rows.gather(1, entry_row.flatten(1)).view_as(old_column_slots)
                == old_column_slots
            )
        )
        decayed = _gather2(block, entry_row, column_at.unsqueeze(2).expand_as(entry_row))
        kept_column_values = torch.where(update, decayed, old_column_values)
        column_slots = torch.where(is_owned.unsqueeze(2), new_column_slots, old_column_slots)
        column_values = torch.where(is_owned.unsqueeze(2), new_column_values, kept_column_values)

        token = self.values.assign(token, touched, torch.cat([row_values, column_values], 2))
        flat = self.values.flat(touched)
        assert self._entries is not None
        self._entries.view(-1, 2 * keep)[flat] = empty - torch.cat(
            [row_slots, column_slots], 2
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


def _block_update(
    block: torch.Tensor,
    row_writes: torch.Tensor,
    column_writes: torch.Tensor,
    column_precedence: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The link update on a block: ``((1 - w[i] - w[j]) L[i, j] + w[i] p[j]) mask[i, j]``.

    block, mask: ``[B, R, C]``, row_writes ``[B, R]``, column_writes, column_precedence
    ``[B, C]`` -> ``[B, R, C]``
    """
    rows = row_writes.unsqueeze(2)
    decay = (1 - rows) - column_writes.unsqueeze(1)
    return torch.addcmul(decay * block, rows, column_precedence.unsqueeze(1)) * mask


class _BlockUpdate(torch.autograd.Function):
    """``_block_update`` keeping only the block and the mask for backward (plain autograd
    keeps several block-sized temporaries a step)."""

    @staticmethod
    def forward(ctx, block, row_writes, column_writes, column_precedence, mask):
        ctx.save_for_backward(block, row_writes, column_writes, column_precedence, mask)
        return _block_update(block, row_writes, column_writes, column_precedence, mask)

    @staticmethod
    def backward(ctx, grad):
        block, row_writes, column_writes, column_precedence, mask = ctx.saved_tensors
        grad = grad * mask
        decay = (1 - row_writes.unsqueeze(2)) - column_writes.unsqueeze(1)
        grad_block = grad * decay
        grad_rows = (grad * (column_precedence.unsqueeze(1) - block)).sum(2)
        grad_columns = -(grad * block).sum(1)
        grad_precedence = (grad * row_writes.unsqueeze(2)).sum(1)
        return grad_block, grad_rows, grad_columns, grad_precedence, None


def _first(sorted_slots: torch.Tensor) -> torch.Tensor:
    """Whether each position of ``sorted_slots`` ``[B, L]`` is its slot's first copy."""
    first = torch.ones_like(sorted_slots, dtype=torch.bool)
    first[:, 1:] = sorted_slots[:, 1:] != sorted_slots[:, :-1]
    return first


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
