"""Memory addressing maths shared by the memory-augmented models: the reference.

One small function per operation, in the style of deepmind/dnc's ``addressing.py``: each
docstring gives the paper's equation and the shape of every tensor. Heads are a tensor
dimension, never a Python loop, so a model addresses all of its heads in one call. Every
function is plain autograd; the DNC's faster implementations (hand-written backwards in
``dnc/fused.py``, the C++ kernel in ``dnc/native.py``) compute the same maths and are
tested against these functions in float64.

References: Graves, Wayne & Danihelka 2014, "Neural Turing Machines" (arXiv 1410.5401),
section 3 (equations numbered as there).

Shapes: ``B`` batch, ``N`` memory slots, ``M`` word size, ``H`` heads, ``S`` shift
offsets (``2 * max_shift + 1``).
"""

from __future__ import annotations

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


def link_update(
    link: torch.Tensor,
    write_weights: torch.Tensor,
    precedence: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``L_t[i, j] = (1 - w[i] - w[j]) L_{t-1}[i, j] + w[i] p_{t-1}[j]``, ``L_t[i, i] = 0``:
    how much slot ``i`` was written right after slot ``j``, one matrix per write head.

    The factor ``1 - w[i] - w[j]`` is the only ``[N, N]`` temporary, updated in place;
    with ``out`` (no autograd: ``dnc/fused.py``'s buffers) it is written there instead.

    link: ``[B, W, N, N]``, write_weights: ``[B, W, N]`` (this step's ``w^w_t``),
    precedence: ``[B, W, N]`` (the previous step's) -> ``[B, W, N, N]``
    """
    rows, columns = write_weights.unsqueeze(-1), write_weights.unsqueeze(-2)
    updated = (1 - rows) - columns if out is None else torch.sub(1 - rows, columns, out=out)
    updated.mul_(link).addcmul_(rows, precedence.unsqueeze(-2))
    updated.diagonal(dim1=-2, dim2=-1).zero_()
    return updated


def directional_weightings(
    link: torch.Tensor, read_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``f^r = L_t w^r_{t-1}`` and backward ``b^r = L_t^T w^r_{t-1}`` weightings of
    every read head through every write head's link matrix.

    link: ``[B, W, N, N]`` (this step's), read_weights: ``[B, R, N]`` (the previous step's)
    -> (forward, backward), each ``[B, R, W, N]``
    """
    heads = read_weights.unsqueeze(1)  # [B, 1, R, N]
    forward = torch.matmul(heads, link.transpose(-1, -2))  # sum_j L[i, j] w[j]
    backward = torch.matmul(heads, link)  # sum_i w[i] L[i, j]
    return forward.transpose(1, 2), backward.transpose(1, 2)


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
