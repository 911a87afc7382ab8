"""Hard HAM's tree with an O(log n) backward per access: the ``path`` backend.

The reference (``ham.py``: ``hard_path`` and ``hard_write`` on the heap tensor
``[B, 2N-1, d]``) is plain autograd, and the backward of every row read and in-place row
write of that tensor builds a heap-sized gradient, so a training access costs
O(N log N). Here the heap's values live in one buffer updated in place, its gradient
``G`` in one buffer that the backward pass updates in place, row by row, and every
access touches only the rows of its path and their siblings:

    read rows R          forward: copies of h_R      backward: G_R += dL/d(read)
    write h_R <- v       forward: h_R = v            backward: dL/dv = G_R, then G_R = 0
                                                     (the old h_R reached nothing after)

``G`` holds dL/d(tree) for the tree as it was right after an operation when that
operation's backward runs, so the operations on one tree must run their backwards in
exactly the reverse order of their forwards. They form a chain for that: each takes an
empty *token* tensor from the one before and hands a new one to the next, so autograd
reaches an operation only after the one that followed it. An operation whose token has
no gradient is the last one whose results reached the loss: it starts a zero ``G``
(so a second backward through a retained graph starts afresh). The chain opens with the
heap tensor the tree came from (its gradient is ``G`` at the end of the backward, one
O(N) tensor per sequence) and closes with ``finish``, a copy of the final heap.

Sampling, SEARCH, WRITE and JOIN are the reference's: ``ham.py`` calls ``read`` where the
reference indexes the heap and ``write_path`` where it calls ``hard_write``.
``tests/test_ham_tree.py`` checks values and gradients against the reference in float64
for the same sampled paths, with ``torch.autograd.gradcheck``, and that no tree-sized
tensor is built per access.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable


class HardTree:
    """A heap ``[B, 2N-1, d]`` in place, read and written row by row with the O(log N)
    backward above. ``tree`` is the heap it starts from (it may require grad); use the
    result of ``finish`` as the final heap."""

    def __init__(self, tree: torch.Tensor) -> None:
        self.values = tree.detach().clone()
        self.grad: torch.Tensor | None = None
        self.batch = torch.arange(tree.shape[0], device=tree.device).unsqueeze(1)  # [B, 1]
        self.token: torch.Tensor | None = _Open.apply(tree, self)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """Heap rows ``[B, K]`` -> their values ``[B, K, d]``."""
        values, self.token = _Read.apply(self.token, rows, self)
        return values

    def write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """``h_R <- values``: rows ``[B, K]`` (distinct within a batch element), values
        ``[B, K, d]``."""
        self.token = _Write.apply(self.token, values, rows, self)

    def write_path(self, leaf: torch.Tensor, value: torch.Tensor, join: nn.Module) -> None:
        """``hard_write`` of ``ham.py``: ``h_a <- value``, then ``h_e <- JOIN(h_l(e),
        h_r(e))`` up the path from leaf ``a`` ``[B]`` to the root; value ``[B, d]``.

        The siblings of the path are off it, so one read gets them all before the
        write; each parent is JOIN of the new child and its sibling, the left one first.
        log2 N JOIN calls on B nodes, one read of log2 N rows, one write of log2 N + 1.
        """
        node = leaf + self.shape[1] // 2  # heap row of the leaf
        path = [node]
        for _ in range((self.shape[1] + 1).bit_length() - 2):
            path.append((path[-1] - 1) // 2)
        nodes = torch.stack(path, dim=1)  # [B, log2 N + 1], leaf first
        below_root = nodes[:, :-1]
        is_left = below_root % 2 == 1  # left children have odd heap rows
        values = [value]
        if below_root.shape[1]:
            siblings = self.read(torch.where(is_left, below_root + 1, below_root - 1))
            for level in range(below_root.shape[1]):
                left = is_left[:, level].unsqueeze(1)
                child, sibling = values[-1], siblings[:, level]
                pair = torch.cat(
                    (torch.where(left, child, sibling), torch.where(left, sibling, child)), -1
                )
                values.append(join(pair))
        self.write(nodes, torch.stack(values, dim=1))

    def finish(self) -> torch.Tensor:
        """The final heap ``[B, 2N-1, d]`` (a copy); closes the chain."""
        tree = _Finish.apply(self.token, self)
        self.token = None  # no reference from the tree to its own graph
        return tree


def _token_grad(tape: HardTree) -> torch.Tensor:
    return tape.values.new_empty(0)


class _Open(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tree: torch.Tensor, tape: HardTree) -> torch.Tensor:
        ctx.tape = tape
        ctx.set_materialize_grads(False)
        return tree.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_token):
        if grad_token is None:
            return None, None
        grad, ctx.tape.grad = ctx.tape.grad, None
        return grad, None


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token: torch.Tensor, rows: torch.Tensor, tape: HardTree):
        ctx.tape, ctx.rows = tape, rows
        ctx.set_materialize_grads(False)
        return tape.values[tape.batch, rows], token.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values, grad_token):
        tape = ctx.tape
        if grad_token is None:
            if grad_values is None:
                return None, None, None
            tape.grad = torch.zeros_like(tape.values)
        if grad_values is not None:
            tape.grad.index_put_((tape.batch, ctx.rows), grad_values, accumulate=True)
        return _token_grad(tape), None, None


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, tape):
        ctx.tape, ctx.rows = tape, rows
        ctx.set_materialize_grads(False)
        tape.values[tape.batch, rows] = values
        return token.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_token):
        if grad_token is None:  # nothing after this write reached the loss
            return None, None, None, None
        tape = ctx.tape
        grad_values = tape.grad[tape.batch, ctx.rows]
        tape.grad[tape.batch, ctx.rows] = 0
        return _token_grad(tape), grad_values, None, None


class _Finish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token: torch.Tensor, tape: HardTree) -> torch.Tensor:
        ctx.tape = tape
        ctx.set_materialize_grads(False)
        return tape.values.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_tree):
        if grad_tree is None:
            return None, None
        ctx.tape.grad = grad_tree.clone(memory_format=torch.contiguous_format)
        return _token_grad(ctx.tape), None
