"""The sparse memories' storage: one memory buffer ``[B, N, M]`` changed in place, whose
steps touch only the rows they read or write, forward and backward.

A dense memory model keeps a new ``[B, N, M]`` memory for every step, for backward (at
N = 2^20, batch 8 and words of 32 a step's copy is a gigabyte). Here a sequence changes
one buffer in place, and autograd sees two operations on it, each a
``torch.autograd.Function`` of one step:

- ``gather(rows)``: the current contents of ``rows`` ``[B, J]``, as an ordinary tensor
  ``[B, J, M]`` that the model's maths (cosine similarity, softmax, weighted sums, erase
  and add) uses in plain autograd; what that maths keeps for backward is O(J) a step.
- ``assign(rows, values)``: overwrite ``rows`` with ``values`` ``[B, J, M]`` (computed in
  plain autograd from gathered rows).

Backward never reads the buffer. It keeps a gradient buffer of the rows the segment's
tracked operations touched (``[U, M]``, found with a sorted list of those rows): ``dL/dM``
for the memory as it stood at the point backward has reached, on those rows (every other
row's is zero), and the operations' backwards run in reverse time order. ``gather``'s adds
its rows' gradients into it; ``assign``'s takes its rows' gradients out (they are
``dL/d values``) and sets those rows to zero (their earlier contents reach the loss only
through the gathers before the assignment, whose backwards run next). A token, a 0-d
tensor that every operation takes and returns, chains the operations in their forward
order, so autograd runs their backwards in exactly the reverse order. The gathered rows
that autograd keeps are the journal of old values, and the assigned rows (kept here) the
journal of writes: so nothing is restored, the buffer holds the sequence's end state
through and after backward (truncated backpropagation carries it on), and nothing of N
rows is saved for backward or allocated by it.

Bookkeeping, all O(rows touched):

- ``reset`` zeroes the rows assigned since the last reset (an episode starts from an
  empty memory); the buffer is allocated only when the batch size, device or dtype
  changes (on the CPU as lazily zeroed 4 KiB pages, ``zeros``, so untouched rows take
  no RAM).
- ``version`` counts assignments and resets. A model's state carries the version it was
  made at and the token; a step from a state whose version is not the memory's (the
  buffer has moved on) is an error. A state detached from the graph (truncated
  backpropagation) starts a new *segment*; so does a reset.
- Each backward pass makes a fresh gradient buffer over the rows touched so far (passes
  are told apart by the operations' order) and drops it when it reaches the segment's
  first operation that autograd tracks (the last whose backward runs), so the next
  forward holds none of it. Backward through a segment after the memory has moved on to
  a new one (a reset, a detached state) raises ``MemoryMovedOn``: the gradient buffer
  then belongs to the new segment.
"""

from __future__ import annotations

import math
import mmap
from typing import Any

import torch

# Whether ``zeros`` can map lazily zeroed pages (not on Windows).
LAZY_ZEROS = hasattr(mmap, "MAP_PRIVATE")
# Lists of rows (assigned since the reset, touched in the segment) after which they are
# merged into one of distinct rows.
COMPACT_EVERY = 1024


class MemoryMovedOn(RuntimeError):
    """Backward through steps of a sparse memory that has since moved on to a new segment,
    or a step from a state the memory has moved on from."""


def zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor; on the CPU in an anonymous mapping of its own, whose 4 KiB pages the
    kernel zeroes on first write, so that it takes RAM only where written.

    Transparent huge pages are refused for the mapping (``MADV_NOHUGEPAGE``): with them
    (numpy asks for them on arrays of 4 MiB or more, and a kernel set to ``always`` uses
    them anyway) one written row costs 2 MiB, so a sparse buffer of N rows takes 2 MiB
    per touched region instead of a page.
    """
    size = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or size == 0 or not LAZY_ZEROS:
        return torch.zeros(shape, device=device, dtype=dtype)
    pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(pages, dtype=dtype).view(shape)  # the tensor keeps the mapping


def sorted_runs(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows`` ``[B, J]`` sorted in each batch element (stably) -> (the sorted values,
    their positions in ``rows``, whether each sorted value is its value's first), ``[B, J]``."""
    ordered, order = rows.sort(stable=True, dim=1)
    first = torch.ones_like(rows, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return ordered, order, first


def first_copies(rows: torch.Tensor) -> torch.Tensor:
    """Whether each of ``rows`` ``[B, J]`` is its value's first copy in its batch element
    -> bool ``[B, J]`` (a sort, not a ``[B, J, J]`` comparison)."""
    _, order, first = sorted_runs(rows)
    return torch.empty_like(first).scatter_(1, order, first)


class SparseMemory:
    """A memory of ``num_slots`` rows of ``word_size`` per batch element, changed in place.

    Not an ``nn.Module`` and not in any ``state_dict``: the model that owns it allocates it
    at ``reset`` on the device and dtype of its inputs.
    """

    def __init__(self, num_slots: int, word_size: int) -> None:
        self.num_slots, self.word_size = num_slots, word_size
        self.buffer: torch.Tensor | None = None  # [B, N, M]
        self.version = 0
        self.segment = 0
        self._grad: torch.Tensor | None = None  # [U, M], dL/dM of touched rows in backward
        self._grad_rows: torch.Tensor | None = None  # [U], the flat rows it holds, sorted
        self._assigned: list[torch.Tensor] = []  # flat rows assigned since reset
        self._touched: list[torch.Tensor] = []  # flat rows of the segment's tracked operations
        self._token: torch.Tensor | None = None
        self._operations = 0
        self._last_backward: int | None = None
        self._first_tracked: int | None = None  # the segment's first operation with a backward

    @property
    def batch_size(self) -> int:
        assert self.buffer is not None
        return self.buffer.shape[0]

    def reset(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Empty the memory for a new episode; returns its first token."""
        shape = (batch_size, self.num_slots, self.word_size)
        buffer = self.buffer
        if (
            buffer is None
            or buffer.shape != shape
            or buffer.device != device
            or buffer.dtype != dtype
        ):
            self.buffer = zeros(shape, device, dtype)
        elif self._assigned:
            self._rows(self.buffer).index_fill_(0, torch.cat(self._assigned), 0)
        self._assigned = []
        self.version += 1
        self._new_segment()
        self._token = torch.zeros((), device=device, dtype=dtype)
        return self._token

    def check(self, token: torch.Tensor, version: int) -> None:
        """Refuse a step from a state made at another version; a detached state of the
        current version starts a new segment."""
        if version != self.version:
            raise MemoryMovedOn(
                f"sparse memory: this state was made at version {version} but the memory is "
                f"at version {self.version} (it was reset or stepped on since); continue from "
                "the latest state or start a new sequence"
            )
        if token is not self._token:
            self._new_segment()
            self._token = token

    def _new_segment(self) -> None:
        self.segment += 1
        self._first_tracked = None
        self._touched = []
        self._drop_grad()

    def _drop_grad(self) -> None:
        self._grad, self._grad_rows, self._last_backward = None, None, None

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(-1, self.word_size)

    def flat(self, rows: torch.Tensor) -> torch.Tensor:
        """Slot indices ``[B, J]`` -> row indices of the ``[B N, M]`` view ``[B J]``."""
        offsets = torch.arange(rows.shape[0], device=rows.device) * self.num_slots
        return (rows + offsets.unsqueeze(1)).flatten()

    def peek(self, rows: torch.Tensor) -> torch.Tensor:
        """The current contents of ``rows`` ``[B, J]`` -> ``[B, J, M]``, outside autograd."""
        assert self.buffer is not None
        values = self._rows(self.buffer).index_select(0, self.flat(rows))
        return values.view(*rows.shape, self.word_size)

    def gather(self, token: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(contents of ``rows`` ``[B, J]`` -> ``[B, J, M]``, the next token)."""
        values, token = _Gather.apply(token, self, rows)
        self._token = token
        return values, token

    def assign(self, token: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Overwrite ``rows`` ``[B, J]`` with ``values`` ``[B, J, M]``; returns the next
        token. A row may repeat within a batch element only with equal values (the first
        occurrence's gets the gradient)."""
        token = _Assign.apply(token, self, rows, values)
        self._token = token
        return token

    def _record_assigned(self, flat: torch.Tensor) -> None:
        """Remember rows assigned for ``reset``."""
        _remember(self._assigned, flat)

    def _operation(self, tracked: bool, flat: torch.Tensor) -> tuple[int, int]:
        """(segment, number) of a new operation on the flat rows ``flat``; ``tracked``:
        autograd will run its backward."""
        self._operations += 1
        if tracked:
            if self._first_tracked is None:
                self._first_tracked = self._operations
            _remember(self._touched, flat)
        return self.segment, self._operations

    def _begin_backward(
        self, segment: int, operation: int, flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the gradient buffer, clean for a new backward pass, and the positions of the
        flat rows ``flat`` in it)."""
        if segment != self.segment:
            raise MemoryMovedOn(
                "sparse memory: backward through steps the memory has moved on from (it was "
                "reset, or continued from a detached state, since); call backward before the "
                "next sequence or chunk"
            )
        # The buffer and its rows are made and dropped together with _last_backward.
        if self._last_backward is None or operation >= self._last_backward:
            assert self.buffer is not None
            rows = torch.cat(self._touched).unique()
            self._touched, self._grad_rows = [rows], rows
            self._grad = self.buffer.new_zeros(len(rows), self.word_size)
        self._last_backward = operation
        assert self._grad is not None and self._grad_rows is not None
        return self._grad, torch.searchsorted(self._grad_rows, flat)

    def _end_backward(self, operation: int) -> None:
        """After ``operation``'s backward: where the pass has reached the segment's first
        tracked operation, drop the gradient buffer (the next pass makes a fresh one)."""
        if operation == self._first_tracked:
            self._drop_grad()


def _remember(lists: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Append ``flat`` rows to ``lists``; every ``COMPACT_EVERY`` lists they are
    merged into one of distinct rows, so a long episode keeps at most the rows it touched
    (not one list a step)."""
    lists.append(flat)
    if len(lists) >= COMPACT_EVERY:
        lists[:] = [torch.cat(lists).unique()]


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, token: torch.Tensor, memory: SparseMemory, rows: torch.Tensor) -> Any:
        ctx.memory, ctx.flat, ctx.shape = memory, memory.flat(rows), rows.shape
        ctx.segment, ctx.operation = memory._operation(ctx.needs_input_grad[0], ctx.flat)
        values = memory._rows(memory.buffer).index_select(0, ctx.flat)
        return values.view(*rows.shape, memory.word_size), torch.zeros_like(token)

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor, grad_token: torch.Tensor) -> Any:
        memory: SparseMemory = ctx.memory
        grad, positions = memory._begin_backward(ctx.segment, ctx.operation, ctx.flat)
        grad.index_add_(0, positions, grad_values.reshape(-1, memory.word_size))
        memory._end_backward(ctx.operation)
        return torch.zeros_like(grad_token), None, None


class _Assign(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        token: torch.Tensor,
        memory: SparseMemory,
        rows: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        ctx.memory, ctx.flat, ctx.shape = memory, memory.flat(rows), values.shape
        ctx.segment, ctx.operation = memory._operation(any(ctx.needs_input_grad), ctx.flat)
        ctx.first = first_copies(rows).unsqueeze(2)  # [B, J, 1]
        memory._rows(memory.buffer).index_copy_(0, ctx.flat, values.reshape(-1, memory.word_size))
        memory._record_assigned(ctx.flat)
        memory.version += 1
        return torch.zeros_like(token)

    @staticmethod
    def backward(ctx: Any, grad_token: torch.Tensor) -> Any:
        memory: SparseMemory = ctx.memory
        grad, positions = memory._begin_backward(ctx.segment, ctx.operation, ctx.flat)
        grad_values = grad.index_select(0, positions).view(ctx.shape) * ctx.first
        grad.index_fill_(0, positions, 0)
        memory._end_backward(ctx.operation)
        return torch.zeros_like(grad_token), None, None, grad_values
