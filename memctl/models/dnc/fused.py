"""The DNC's memory access with hand-written backwards: the ``fused`` backend.

``addressing.py`` is the reference (plain autograd); this module computes the same maths
in fewer autograd nodes and fewer ``[N, N]`` buffers, and is tested against it in float64
(``tests/test_dnc_fused.py``). A DNC step on small tensors is bound by the number of ops
and autograd nodes, a large one by the passes over and allocations of ``[B, W, N, N]``
link matrices: ``content_weights`` is the content lookup as one node (a DNC looks up
contents twice a step), ``link_step`` the link update and the reads through it as one
node whose backward updates one gradient buffer in place, and ``LinkWorkspace`` shares
buffers across a sequence's link steps and, for large N, recomputes link matrices
backward instead of keeping them.
"""

from __future__ import annotations

import weakref

import torch

from memctl.models.addressing import inverse_norms, link_update


class _ContentWeights(torch.autograd.Function):
    """``addressing.content_weights`` with a hand-written backward: the softmax, the two inverse
    norms and the batched products, in about half the ops that autograd records for the
    composition (a DNC looks up contents twice a step)."""

    @staticmethod
    def forward(ctx, memory, keys, strengths):
        key_inverse, memory_inverse = inverse_norms(keys), inverse_norms(memory)
        scale = strengths * key_inverse  # [B, H]: beta / ||k||
        dots = torch.bmm(keys, memory.transpose(1, 2))
        logits = dots * scale.unsqueeze(-1) * memory_inverse.unsqueeze(1)
        weights = torch.softmax(logits, dim=-1)
        ctx.save_for_backward(memory, keys, strengths, key_inverse, memory_inverse, dots, weights)
        return weights

    @staticmethod
    def backward(ctx, grad):
        memory, keys, strengths, key_inverse, memory_inverse, dots, weights = ctx.saved_tensors
        weighted = grad * weights
        grad_logits = torch.addcmul(weighted, weights, weighted.sum(-1, keepdim=True), value=-1)
        scale = strengths * key_inverse
        # logits = dots * scale[h] * memory_inverse[n]
        grad_dots = grad_logits * scale.unsqueeze(-1) * memory_inverse.unsqueeze(1)
        grad_by_dots = grad_logits * dots
        grad_scale = torch.bmm(grad_by_dots, memory_inverse.unsqueeze(-1)).squeeze(-1)
        grad_memory = grad_keys = grad_strengths = None
        if ctx.needs_input_grad[0]:
            # d/dv (||v||^2 + EPSILON)^(-1/2) = -(inverse norm)^3 v
            grad_memory_inverse = torch.bmm(scale.unsqueeze(1), grad_by_dots).squeeze(1)
            grad_memory = torch.bmm(grad_dots.transpose(1, 2), keys).addcmul_(
                memory, (grad_memory_inverse * memory_inverse.pow(3)).unsqueeze(-1), value=-1
            )
        if ctx.needs_input_grad[1]:
            grad_key_inverse = grad_scale * strengths
            grad_keys = torch.bmm(grad_dots, memory).addcmul_(
                keys, (grad_key_inverse * key_inverse.pow(3)).unsqueeze(-1), value=-1
            )
        if ctx.needs_input_grad[2]:
            grad_strengths = grad_scale * key_inverse
        return grad_memory, grad_keys, grad_strengths


def content_weights(
    memory: torch.Tensor, keys: torch.Tensor, strengths: torch.Tensor
) -> torch.Tensor:
    """``addressing.content_weights`` (eq. (5) of the NTM paper, the DNC's content lookup
    ``C(M, k, beta)``) computed as one autograd node.

    memory: ``[B, N, M]``, keys: ``[B, H, M]``, strengths (beta >= 0): ``[B, H]``
    -> ``[B, H, N]``
    """
    return _ContentWeights.apply(memory, keys, strengths)


# Link steps recompute instead of keep (see LinkWorkspace) where one link matrix has at
# least this many numbers (1 MiB in float32: N >= 182 at batch 8), keeping one in this many.
CHECKPOINT_MIN_ELEMENTS = 1 << 18
CHECKPOINT_EVERY = 10


class _Chain:
    """An unbroken run of link steps (each one's link input is the previous one's output):
    every step's ``(w_t, p_{t-1})``, and the link matrices kept, by step (0: the input of
    the first step)."""

    __slots__ = ("checkpoints", "updates")

    def __init__(self, first: torch.Tensor) -> None:
        self.updates: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.checkpoints = {0: first}


class LinkWorkspace:
    """What the link steps of one sequence share, so that for large N they neither keep
    nor allocate a ``[B, W, N, N]`` matrix per step. Fresh buffers of that size cost more
    than the arithmetic in them (page faults on first touch), and keeping one per step
    sets the memory of a long sequence.

    Backward, one gradient buffer is handed from step to step and updated in place, with
    one scratch buffer beside it. A step uses the buffer in place only when its incoming
    gradient is that very tensor (the next step's, handed on by autograd untouched), and
    hands it on only to a step whose link input is the previous step's output; anything
    else (a link from outside the sequence, a gradient summed with another) gets fresh
    tensors.

    With ``checkpoint_every = k`` and link matrices of at least ``min_elements`` numbers,
    the forward pass keeps only every k-th step's link matrix and writes the others into
    two alternating buffers; backward, each stretch of k steps is recomputed from its
    kept matrix (one elementwise pass a step) into k - 1 reused buffers. Memory: T / k + k
    + 4 link matrices for T steps instead of T. The outputs written into the alternating
    buffers are overwritten two steps later, so they must feed only the next step
    (``DNCCore.run`` uses ``checkpoint_every=None``, keeping every matrix, when it records
    the states). Without autograd (evaluation) every step writes into those buffers.
    """

    __slots__ = (
        "chain",
        "checkpoint_every",
        "grad",
        "min_elements",
        "output",
        "ring",
        "scratch",
        "segment",
        "segment_links",
    )

    def __init__(
        self, checkpoint_every: int | None = None, min_elements: int | None = None
    ) -> None:
        self.checkpoint_every = checkpoint_every
        self.min_elements = CHECKPOINT_MIN_ELEMENTS if min_elements is None else min_elements
        self.output: weakref.ref[torch.Tensor] | None = None
        self.grad: torch.Tensor | None = None
        self.scratch: list[torch.Tensor] = []
        self.chain: _Chain | None = None
        self.ring: list[torch.Tensor] = []
        self.segment: tuple[_Chain, int] | None = None
        self.segment_links: list[torch.Tensor] = []

    @staticmethod
    def _buffer(pool: list[torch.Tensor], index: int, like: torch.Tensor) -> torch.Tensor:
        while len(pool) <= index:
            pool.append(torch.empty_like(like))
        if pool[index].shape != like.shape or pool[index].dtype != like.dtype:
            pool[index] = torch.empty_like(like)
        return pool[index]

    def scratch_like(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._buffer(self.scratch, 0, tensor)

    def follows(self, link: torch.Tensor) -> bool:
        """Whether ``link`` is the last step's output: the same tensor, not a copy."""
        return self.output is not None and self.output() is link

    def segmented(self, link: torch.Tensor) -> bool:
        return self.checkpoint_every is not None and link.numel() >= self.min_elements

    def forward_output(
        self, link: torch.Tensor, chained: bool, write_weights, precedence, grad_needed: bool
    ) -> tuple[torch.Tensor, _Chain | None, int]:
        """The new link matrix, written where this step's matrix goes (see the class),
        with its chain and step number when it is to be recomputed backward."""
        # The alternating buffer that does not hold the input.
        in_ring = [link.data_ptr() == buffer.data_ptr() for buffer in self.ring]
        ring = int(bool(in_ring) and in_ring[0])
        if not grad_needed:
            self.chain = None
            buffer = self._buffer(self.ring, ring, link)
            return link_update(link, write_weights, precedence, out=buffer).view_as(link), None, 0
        if not chained or self.chain is None:
            # A chain starts from a matrix that stays: not one the ring will overwrite.
            self.chain = _Chain(link.clone() if any(in_ring) else link)
        chain = self.chain
        chain.updates.append((write_weights.detach(), precedence.detach()))
        step = len(chain.updates)
        if step % self.checkpoint_every == 0:
            updated = link_update(link, write_weights, precedence, out=torch.empty_like(link))
            chain.checkpoints[step] = updated
            return updated, chain, step
        buffer = self._buffer(self.ring, ring, link)
        return link_update(link, write_weights, precedence, out=buffer).view_as(link), chain, step

    def links_around(self, chain: _Chain, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_{t-1}, L_t)`` of step ``t`` of ``chain``, recomputing its stretch of
        ``checkpoint_every`` steps from the kept matrix unless it is already there."""
        every = self.checkpoint_every
        start = (step - 1) // every * every
        if self.segment is None or self.segment[0] is not chain or self.segment[1] != start:
            previous = chain.checkpoints[start]
            for index in range(start + 1, min(start + every, len(chain.updates) + 1)):
                buffer = self._buffer(self.segment_links, index - start - 1, previous)
                previous = link_update(previous, *chain.updates[index - 1], out=buffer)
            self.segment = (chain, start)

        def link_at(index: int) -> torch.Tensor:
            if index in chain.checkpoints:
                return chain.checkpoints[index]
            return self.segment_links[index - start - 1]

        return link_at(step - 1), link_at(step)


class _LinkStep(torch.autograd.Function):
    """``link_step``'s maths as one autograd node with a hand-written backward. Large
    memories are bound by the passes over ``[B, W, N, N]`` matrices and by allocating
    them, and plain autograd of the update and the two reads makes about fifteen passes
    per step backward, with several fresh ``[N, N]`` buffers (the factor
    ``1 - w[i] - w[j]``, one gradient per read, their sum, zero-filled gradients of
    views). This node keeps the previous and the new link matrix (the steps' states), or
    recomputes them (see ``LinkWorkspace``), builds the new link's whole gradient (the
    next step's and the two reads') in one batched product, and turns it into the
    previous link's gradient in place."""

    @staticmethod
    def forward(ctx, link, write_weights, precedence, read_weights, workspace, grad_needed):
        ctx.set_materialize_grads(False)
        ctx.workspace, ctx.chain, ctx.step = workspace, None, 0
        ctx.chained = workspace is not None and workspace.follows(link)
        if workspace is not None and workspace.segmented(link):
            updated, ctx.chain, ctx.step = workspace.forward_output(
                link, ctx.chained, write_weights, precedence, grad_needed
            )
            ctx.save_for_backward(write_weights, precedence, read_weights)
        else:
            updated = link_update(link, write_weights, precedence, out=torch.empty_like(link))
            ctx.save_for_backward(write_weights, precedence, read_weights, link, updated)
        if workspace is not None:
            workspace.output = weakref.ref(updated)
        # (Orientations chosen for speed: on CPU, [N, N] @ [N, R] is faster than
        # [R, N] @ [N, N]^T, and [1, N] @ [N, N]^T than [N, N] @ [N, 1].)
        heads = read_weights.unsqueeze(1)  # [B, 1, R, N]
        forward = torch.matmul(updated, heads.transpose(-1, -2)).transpose(-1, -2)
        backward = torch.matmul(heads, updated)  # sum_i w[i] L[i, j]
        return updated, forward, backward

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_updated, grad_forward, grad_backward):
        write_weights, precedence, read_weights, *links = ctx.saved_tensors
        workspace = ctx.workspace
        if ctx.chain is not None:
            links = workspace.links_around(ctx.chain, ctx.step)
        link, updated = links
        batch, writes, slots = write_weights.shape
        heads = read_weights.unsqueeze(1).expand(batch, writes, *read_weights.shape[1:])
        grad_forward = torch.zeros_like(heads) if grad_forward is None else grad_forward
        grad_backward = torch.zeros_like(heads) if grad_backward is None else grad_backward
        # The new link's whole gradient G: the next step's, plus sum_r gf[r, i] w[r, j]
        # (forward reads) plus sum_r w[r, i] gb[r, j] (backward reads), in one product.
        left = torch.cat([grad_forward, heads], dim=-2).transpose(-1, -2)  # [B, W, N, 2R]
        right = torch.cat([heads, grad_backward], dim=-2)  # [B, W, 2R, N]
        left, right = left.reshape(batch * writes, slots, -1), right.flatten(0, 1)
        if grad_updated is None:
            grad = torch.bmm(left, right)
        elif workspace is not None and grad_updated is workspace.grad:
            grad = grad_updated.view(batch * writes, slots, slots).baddbmm_(left, right)
        else:
            grad = torch.baddbmm(grad_updated.reshape(batch * writes, slots, slots), left, right)
        grad = grad.view(batch, writes, slots, slots)
        # The diagonal is set to 0, so its gradient reaches no input.
        grad.diagonal(dim1=-2, dim2=-1).zero_()
        grad_link = grad_weights = grad_precedence = grad_reads = None
        if ctx.needs_input_grad[3]:
            grad_reads = (
                torch.matmul(grad_forward, updated)
                + torch.matmul(updated, grad_backward.transpose(-1, -2)).transpose(-1, -2)
            ).sum(1)
        scratch = workspace.scratch_like(grad) if workspace is not None else torch.empty_like(grad)
        if ctx.needs_input_grad[1]:
            # d/dw[k]: sum_j G[k, j] (p[j] - L[k, j]) - sum_i G[i, k] L[i, k]
            weighted = torch.mul(grad, link, out=scratch)
            ones = torch.ones_like(precedence).unsqueeze(-2)
            grad_weights = (
                torch.matmul(precedence.unsqueeze(-2), grad.transpose(-1, -2)).squeeze(-2)
                - weighted.sum(-1)
                - torch.matmul(ones, weighted).squeeze(-2)
            )
        if ctx.needs_input_grad[2]:
            # d/dp[j]: sum_i w[i] G[i, j]
            grad_precedence = torch.matmul(write_weights.unsqueeze(-2), grad).squeeze(-2)
        if ctx.needs_input_grad[0]:
            # G (1 - w[i] - w[j]), in place
            rows, columns = write_weights.unsqueeze(-1), write_weights.unsqueeze(-2)
            grad_link = grad.addcmul_(grad, torch.add(rows, columns, out=scratch), value=-1)
            if workspace is not None:
                # Hand the buffer on only to the previous step: a link from outside the
                # sequence keeps it, and the workspace lets go of it.
                workspace.grad = grad_link if ctx.chained else None
        return grad_link, grad_weights, grad_precedence, grad_reads, None, None


def link_step(
    link: torch.Tensor,
    write_weights: torch.Tensor,
    precedence: torch.Tensor,
    read_weights: torch.Tensor,
    workspace: LinkWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``addressing.link_update`` and ``addressing.directional_weightings`` of its result,
    as one autograd node with a hand-written backward. Pass one ``LinkWorkspace`` to
    every step of a sequence (not under ``torch.compile``) to share its buffers and, for
    large N, recompute link matrices backward instead of keeping them.

    link: ``[B, W, N, N]``, write_weights: ``[B, W, N]`` (this step's ``w^w_t``),
    precedence: ``[B, W, N]`` (the previous step's), read_weights: ``[B, R, N]`` (the
    previous step's) -> (``L_t`` ``[B, W, N, N]``, forward, backward ``[B, R, W, N]``)
    """
    grad_needed = torch.is_grad_enabled() and any(
        t.requires_grad for t in (link, write_weights, precedence, read_weights)
    )
    updated, forward, backward = _LinkStep.apply(
        link, write_weights, precedence, read_weights, workspace, grad_needed
    )
    return updated, forward.transpose(1, 2), backward.transpose(1, 2)
