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
