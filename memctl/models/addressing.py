"""Memory addressing maths shared by the memory-augmented models.

One small function per operation, in the style of deepmind/dnc's ``addressing.py``: each
docstring gives the paper's equation and the shape of every tensor. Heads are a tensor
dimension, never a Python loop, so a model addresses all of its heads in one call.

References: Graves, Wayne & Danihelka 2014, "Neural Turing Machines" (arXiv 1410.5401),
section 3 (equations numbered as there).

Shapes: ``B`` batch, ``N`` memory slots, ``M`` word size, ``H`` heads, ``S`` shift
offsets (``2 * max_shift + 1``).
"""

from __future__ import annotations

import weakref

import torch

# Keeps two possibly-zero quantities finite: squared norms of keys and memory rows in the
# cosine similarity (zero rows are common: memory starts near 0, and the norm's
# gradient is infinite at 0), and weights that underflow to 0 before sharpening takes
# their logarithm (d/dgamma w^gamma = w^gamma ln w).
EPSILON = 1e-6


def inverse_norms(vectors: torch.Tensor) -> torch.Tensor:
    """``1 / sqrt(sum_j v_j^2 + EPSILON)``: inverse Euclidean norms, finite at zero.

    vectors: ``[..., M]`` -> ``[...]``
    """
    return torch.rsqrt(torch.linalg.vecdot(vectors, vectors) + EPSILON)


def cosine_similarity(memory: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Eq. (6): ``K[u, v] = u . v / (||u|| ||v||)``, between every key and every row,
    with both norms taken as ``sqrt(||.||^2 + EPSILON)``.

    memory: ``[B, N, M]``, keys: ``[B, H, M]`` -> ``[B, H, N]``
    """
    unit_keys = keys * inverse_norms(keys).unsqueeze(-1)
    return torch.bmm(unit_keys, memory.transpose(1, 2)) * inverse_norms(memory).unsqueeze(1)


def content_weights(
    memory: torch.Tensor, keys: torch.Tensor, strengths: torch.Tensor
) -> torch.Tensor:
    """Eq. (5): ``w^c(i) = exp(beta K[k, M(i)]) / sum_j exp(beta K[k, M(j)])``.

    memory: ``[B, N, M]``, keys: ``[B, H, M]``, strengths (beta >= 0): ``[B, H]``
    -> ``[B, H, N]``
    """
    similarity = cosine_similarity(memory, keys)
    return torch.softmax(strengths.unsqueeze(-1) * similarity, dim=-1)


def interpolate(content: torch.Tensor, previous: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Eq. (7): ``w^g = g w^c + (1 - g) w_{t-1}``.

    content, previous: ``[B, H, N]``, gates (g in [0, 1]): ``[B, H]`` -> ``[B, H, N]``
    """
    return torch.lerp(previous, content, gates.unsqueeze(-1))


def shift(weights: torch.Tensor, shift_weights: torch.Tensor) -> torch.Tensor:
    """Eq. (8), circular convolution: ``w~(i) = sum_k w^g(i - k) s(k)``, indices mod N.

    ``shift_weights[..., j]`` is the weight of offset ``k = j - max_shift``, offsets
    ``-max_shift .. max_shift``: offset +1 moves the focus one slot forward.

    weights: ``[B, H, N]``, shift_weights: ``[B, H, S]`` with ``S = 2 max_shift + 1 <= N``
    -> ``[B, H, N]``
    """
    offsets = shift_weights.shape[-1]
    max_shift, slots = (offsets - 1) // 2, weights.shape[-1]
    # padded[..., i + m] = w((i + m - max_shift) mod N): the window at i holds
    # w(i - k) for k = max_shift - m, so it meets the offsets in reverse order.
    wrap = torch.arange(-max_shift, slots + max_shift, device=weights.device) % slots
    padded = weights.index_select(-1, wrap)
    windows = padded.unfold(-1, offsets, 1)  # [B, H, N, S]
    return (windows * shift_weights.flip(-1).unsqueeze(-2)).sum(dim=-1)


def sharpen(weights: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """Eq. (9): ``w(i) = w~(i)^gamma / sum_j w~(j)^gamma``, as
    ``softmax(gamma log(w~ + EPSILON))``: no underflow to 0 / 0 when gamma is large.

    weights: ``[B, H, N]``, gammas (gamma >= 1): ``[B, H]`` -> ``[B, H, N]``
    """
    return torch.softmax(gammas.unsqueeze(-1) * torch.log(weights + EPSILON), dim=-1)


def address(
    memory: torch.Tensor,
    previous: torch.Tensor,
    keys: torch.Tensor,
    strengths: torch.Tensor,
    gates: torch.Tensor,
    shift_weights: torch.Tensor,
    gammas: torch.Tensor,
) -> torch.Tensor:
    """The NTM's addressing pipeline (Figure 2): content, interpolate, shift, sharpen.

    memory: ``[B, N, M]``, previous weights: ``[B, H, N]``, keys: ``[B, H, M]``,
    strengths, gates, gammas: ``[B, H]``, shift_weights: ``[B, H, S]`` -> ``[B, H, N]``
    """
    content = content_weights(memory, keys, strengths)
    return sharpen(shift(interpolate(content, previous, gates), shift_weights), gammas)


def read(memory: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. (2): ``r = sum_i w(i) M(i)``.

    memory: ``[B, N, M]``, weights: ``[B, R, N]`` -> read vectors ``[B, R, M]``
    """
    return torch.bmm(weights, memory)


def write(
    memory: torch.Tensor, weights: torch.Tensor, erase: torch.Tensor, add: torch.Tensor
) -> torch.Tensor:
    """Eqs. (3)-(4), erase then add, for W write heads at once:
    ``M~(i) = M(i) prod_h (1 - w_h(i) e_h)``, ``M'(i) = M~(i) + sum_h w_h(i) a_h``.

    The erase factors multiply, so the heads' order does not matter (section 3.2).

    memory: ``[B, N, M]``, weights: ``[B, W, N]``, erase (in [0, 1]), add: ``[B, W, M]``
    -> ``[B, N, M]``
    """
    slot_weights = weights.transpose(1, 2)  # [B, N, W]
    if weights.shape[1] == 1:
        # M (1 - w e) + w a = M + w (a - M e): broadcasts, cheaper than batched matrix
        # products with an inner dimension of 1 on a CPU.
        return torch.addcmul(memory, slot_weights, add - memory * erase)
    keep = (1 - slot_weights.unsqueeze(-1) * erase.unsqueeze(1)).prod(dim=2)
    return torch.baddbmm(memory * keep, slot_weights, add)


# -- Differentiable Neural Computer ------------------------------------------------------
#
# Graves et al. 2016, "Hybrid computing using a neural network with dynamic external
# memory" (Nature 538), Methods, "Dynamic memory allocation" and "Temporal memory
# linkage"; deepmind/dnc's addressing.py for several write heads. Content lookup, reading
# and erase-then-add writing are the NTM functions above. Extra shapes: ``R`` read heads,
# ``W`` write heads.


class _ContentWeights(torch.autograd.Function):
    """``content_weights`` with a hand-written backward: the softmax, the two inverse
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


def fused_content_weights(
    memory: torch.Tensor, keys: torch.Tensor, strengths: torch.Tensor
) -> torch.Tensor:
    """``content_weights`` (eq. (5) of the NTM paper, the DNC's content lookup
    ``C(M, k, beta)``) computed as one autograd node.

    memory: ``[B, N, M]``, keys: ``[B, H, M]``, strengths (beta >= 0): ``[B, H]``
    -> ``[B, H, N]``
    """
    return _ContentWeights.apply(memory, keys, strengths)


def usage_update(
    usage: torch.Tensor,
    write_weights: torch.Tensor,
    free_gates: torch.Tensor,
    read_weights: torch.Tensor,
) -> torch.Tensor:
    """``u_t = (u_{t-1} + w - u_{t-1} w) psi_t`` with ``psi_t = prod_r (1 - f^r w^r_{t-1})``.

    ``w`` combines the previous step's write heads as ``1 - prod_h (1 - w^w_h)`` (one head:
    ``w^w_{t-1}`` itself); ``psi`` is the retention vector of the free gates.

    usage: ``[B, N]``, write_weights: ``[B, W, N]`` and read_weights: ``[B, R, N]`` (both
    of the previous step), free_gates (in [0, 1]): ``[B, R]`` -> ``[B, N]``
    """
    if write_weights.shape[1] == 1:
        written = write_weights[:, 0]
    else:
        written = 1 - _product(1 - write_weights)
    retention = _product(1 - free_gates.unsqueeze(-1) * read_weights)
    return torch.addcmul(usage, 1 - usage, written) * retention


def _product(factors: torch.Tensor) -> torch.Tensor:
    """``prod_h factors[:, h]`` as a chain of multiplications: over a DNC's few heads that
    is cheaper than ``torch.prod``, whose backward first looks for factors equal to 0.

    factors: ``[B, H, N]`` -> ``[B, N]``
    """
    product, *others = factors.unbind(1)
    for other in others:
        product = product * other
    return product


def allocation(usage: torch.Tensor) -> torch.Tensor:
    """``a_t[phi_j] = (1 - u_t[phi_j]) prod_{i<j} u_t[phi_i]``, ``phi`` the slots sorted by
    ascending usage: the least used slot gets most of the allocation.

    Usage is first mapped to ``EPSILON + (1 - EPSILON) u`` (as deepmind/dnc), so the
    products' gradients stay finite where usage is 0. The sort is stable, so slots of equal
    usage are taken in index order. One batched ``torch.sort``; the exclusive products
    ``prod_{i<j}`` are ``exp(cumsum(log u) - log u)`` (finite: u >= EPSILON), whose
    backward is a few elementwise ops where ``cumprod``'s looks for zeros and flips; a
    scatter puts the allocation back in slot order.

    usage (in [0, 1]): ``[..., N]`` -> ``[..., N]``
    """
    usage = usage.mul(1 - EPSILON).add_(EPSILON)
    sorted_usage, order = torch.sort(usage, dim=-1, stable=True)
    log_usage = sorted_usage.log()
    exclusive_products = torch.exp(log_usage.cumsum(-1) - log_usage)
    sorted_allocation = (1 - sorted_usage) * exclusive_products
    # order is a permutation: the scatter writes every element of the empty tensor.
    return torch.empty_like(sorted_allocation).scatter_(-1, order, sorted_allocation)


def write_allocation(usage: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Allocation weightings of W write heads, in turn: head ``h`` allocates from the usage
    left by heads ``< h``, each of which raises it by ``u += (1 - u) g_h a_h`` (deepmind/dnc;
    the heads' order matters, so this is a loop over write heads, of one pass for W = 1).

    usage: ``[B, N]``, gates (``g^a g^w`` of each head, in [0, 1]): ``[B, W]``
    -> ``[B, W, N]``
    """
    heads = gates.shape[1]
    if heads == 1:
        return allocation(usage).unsqueeze(1)
    allocations = []
    for head in range(heads):
        allocations.append(allocation(usage))
        if head + 1 < heads:
            usage = torch.addcmul(usage, 1 - usage, gates[:, head : head + 1] * allocations[-1])
    return torch.stack(allocations, dim=1)


def write_weighting(
    content: torch.Tensor,
    allocation_weights: torch.Tensor,
    allocation_gates: torch.Tensor,
    write_gates: torch.Tensor,
) -> torch.Tensor:
    """``w^w = g^w (g^a a + (1 - g^a) c^w)``.

    content, allocation_weights: ``[B, W, N]``, allocation_gates, write_gates (in [0, 1]):
    ``[B, W]`` -> ``[B, W, N]``
    """
    mixed = torch.lerp(content, allocation_weights, allocation_gates.unsqueeze(-1))
    return write_gates.unsqueeze(-1) * mixed


def precedence_update(precedence: torch.Tensor, write_weights: torch.Tensor) -> torch.Tensor:
    """``p_t = (1 - sum_i w^w_t[i]) p_{t-1} + w^w_t``, one precedence per write head.

    precedence: ``[B, W, N]`` (previous step), write_weights: ``[B, W, N]`` (this step)
    -> ``[B, W, N]``
    """
    return torch.addcmul(write_weights, 1 - write_weights.sum(-1, keepdim=True), precedence)


# Link steps recompute instead of keep (see LinkWorkspace) where one link matrix has at
# least this many numbers (1 MiB in float32: N >= 182 at batch 8), keeping one in this many.
CHECKPOINT_MIN_ELEMENTS = 1 << 18
CHECKPOINT_EVERY = 10


def _update_link(
    out: torch.Tensor, link: torch.Tensor, write_weights: torch.Tensor, precedence: torch.Tensor
) -> torch.Tensor:
    """``L_t = (1 - w[i] - w[j]) L + w[i] p[j]`` with a zero diagonal, into ``out``,
    without an ``[N, N]`` temporary (the factor is written into ``out`` first)."""
    rows, columns = write_weights.unsqueeze(-1), write_weights.unsqueeze(-2)
    torch.sub(1 - rows, columns, out=out).mul_(link)
    out.addcmul_(rows, precedence.unsqueeze(-2))
    out.diagonal(dim1=-2, dim2=-1).zero_()
    return out


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
            return _update_link(buffer, link, write_weights, precedence).view_as(link), None, 0
        if not chained or self.chain is None:
            # A chain starts from a matrix that stays: not one the ring will overwrite.
            self.chain = _Chain(link.clone() if any(in_ring) else link)
        chain = self.chain
        chain.updates.append((write_weights.detach(), precedence.detach()))
        step = len(chain.updates)
        if step % self.checkpoint_every == 0:
            updated = _update_link(torch.empty_like(link), link, write_weights, precedence)
            chain.checkpoints[step] = updated
            return updated, chain, step
        buffer = self._buffer(self.ring, ring, link)
        return _update_link(buffer, link, write_weights, precedence).view_as(link), chain, step

    def links_around(self, chain: _Chain, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_{t-1}, L_t)`` of step ``t`` of ``chain``, recomputing its stretch of
        ``checkpoint_every`` steps from the kept matrix unless it is already there."""
        every = self.checkpoint_every
        start = (step - 1) // every * every
        if self.segment is None or self.segment[0] is not chain or self.segment[1] != start:
            previous = chain.checkpoints[start]
            for index in range(start + 1, min(start + every, len(chain.updates) + 1)):
                buffer = self._buffer(self.segment_links, index - start - 1, previous)
                previous = _update_link(buffer, previous, *chain.updates[index - 1])
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
            updated = _update_link(torch.empty_like(link), link, write_weights, precedence)
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
    """The temporal link matrix's update and the reads through it.

    Update: ``L_t[i, j] = (1 - w[i] - w[j]) L_{t-1}[i, j] + w[i] p_{t-1}[j]``,
    ``L_t[i, i] = 0``: how much slot ``i`` was written right after slot ``j``, one matrix
    per write head. Reads: forward ``f^r = L_t w^r_{t-1}`` and backward
    ``b^r = L_t^T w^r_{t-1}`` weightings of every read head through every write head's
    link matrix. Pass one ``LinkWorkspace`` to every step of a sequence (not under
    ``torch.compile``) to share its buffers and, for large N, recompute link matrices
    backward instead of keeping them.

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


def read_weighting(
    content: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, modes: torch.Tensor
) -> torch.Tensor:
    """``w^r = sum_h pi[h] b_h + sum_h pi[W + h] f_h + pi[2W] c^r``: the read modes mix the
    backward, forward (per write head ``h``) and content weightings.

    content: ``[B, R, N]``, forward, backward: ``[B, R, W, N]``, modes (a softmax over
    ``2W + 1``: backward, forward, content): ``[B, R, 2W + 1]`` -> ``[B, R, N]``
    """
    weightings = torch.cat([backward, forward, content.unsqueeze(2)], dim=2)
    # Broadcast and sum: one matrix product per batch element and head would be 1 x (2W+1).
    return (modes.unsqueeze(-1) * weightings).sum(2)
