"""Addressing maths against float64 numpy references written with explicit loops over
batch, head and slot (the NTM paper's equations read literally), plus gradchecks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memctl.models import addressing
from memctl.models.addressing import EPSILON

BATCH, HEADS, SLOTS, WORD = 2, 3, 7, 4


def np_cosine(memory, keys):
    batch, heads, slots = memory.shape[0], keys.shape[1], memory.shape[1]
    out = np.zeros((batch, heads, slots))
    for b in range(batch):
        for h in range(heads):
            key = keys[b, h]
            for i in range(slots):
                row = memory[b, i]
                dot = sum(key[m] * row[m] for m in range(len(key)))
                key_norm = np.sqrt(sum(v * v for v in key) + EPSILON)
                row_norm = np.sqrt(sum(v * v for v in row) + EPSILON)
                out[b, h, i] = dot / (key_norm * row_norm)
    return out


def np_content(memory, keys, strengths):
    similarity = np_cosine(memory, keys)
    out = np.zeros_like(similarity)
    for b in range(similarity.shape[0]):
        for h in range(similarity.shape[1]):
            scores = [np.exp(strengths[b, h] * s) for s in similarity[b, h]]
            total = sum(scores)
            for i, score in enumerate(scores):
                out[b, h, i] = score / total
    return out


def np_interpolate(content, previous, gates):
    out = np.zeros_like(content)
    for b in range(content.shape[0]):
        for h in range(content.shape[1]):
            g = gates[b, h]
            for i in range(content.shape[2]):
                out[b, h, i] = g * content[b, h, i] + (1 - g) * previous[b, h, i]
    return out


def np_shift(weights, shift_weights):
    slots, offsets = weights.shape[2], shift_weights.shape[2]
    max_shift = (offsets - 1) // 2
    out = np.zeros_like(weights)
    for b in range(weights.shape[0]):
        for h in range(weights.shape[1]):
            for i in range(slots):
                for j in range(offsets):
                    k = j - max_shift
                    out[b, h, i] += weights[b, h, (i - k) % slots] * shift_weights[b, h, j]
    return out


def np_sharpen(weights, gammas):
    out = np.zeros_like(weights)
    for b in range(weights.shape[0]):
        for h in range(weights.shape[1]):
            powered = [(w + EPSILON) ** gammas[b, h] for w in weights[b, h]]
            total = sum(powered)
            for i, p in enumerate(powered):
                out[b, h, i] = p / total
    return out


def np_read(memory, weights):
    batch, heads, slots = weights.shape
    out = np.zeros((batch, heads, memory.shape[2]))
    for b in range(batch):
        for h in range(heads):
            for i in range(slots):
                out[b, h] += weights[b, h, i] * memory[b, i]
    return out


def np_write(memory, weights, erase, add):
    batch, heads, slots = weights.shape
    out = memory.copy()
    for b in range(batch):
        for i in range(slots):
            for m in range(memory.shape[2]):
                keep = 1.0
                added = 0.0
                for h in range(heads):
                    keep *= 1 - weights[b, h, i] * erase[b, h, m]
                    added += weights[b, h, i] * add[b, h, m]
                out[b, i, m] = memory[b, i, m] * keep + added
    return out


def np_address(memory, previous, keys, strengths, gates, shift_weights, gammas):
    content = np_content(memory, keys, strengths)
    return np_sharpen(np_shift(np_interpolate(content, previous, gates), shift_weights), gammas)


def simplex(generator, *shape):
    """Random weightings that sum to 1 over the last dimension."""
    return torch.softmax(2 * torch.randn(*shape, generator=generator, dtype=torch.float64), -1)


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return {
        "memory": randn(BATCH, SLOTS, WORD),
        "keys": randn(BATCH, HEADS, WORD),
        "strengths": randn(BATCH, HEADS).exp(),
        "gates": torch.rand(BATCH, HEADS, generator=generator, dtype=torch.float64),
        "previous": simplex(generator, BATCH, HEADS, SLOTS),
        "weights": simplex(generator, BATCH, HEADS, SLOTS),
        "shift_weights": simplex(generator, BATCH, HEADS, 5),
        "gammas": 1 + 3 * torch.rand(BATCH, HEADS, generator=generator, dtype=torch.float64),
        "erase": torch.rand(BATCH, HEADS, WORD, generator=generator, dtype=torch.float64),
        "add": randn(BATCH, HEADS, WORD),
    }


def close(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_cosine_similarity_matches_loops(inputs):
    x = inputs
    close(
        addressing.cosine_similarity(x["memory"], x["keys"]),
        np_cosine(x["memory"].numpy(), x["keys"].numpy()),
    )


def test_content_weights_match_loops(inputs):
    x = inputs
    expected = np_content(x["memory"].numpy(), x["keys"].numpy(), x["strengths"].numpy())
    close(addressing.content_weights(x["memory"], x["keys"], x["strengths"]), expected)


def test_interpolate_matches_loops(inputs):
    x = inputs
    expected = np_interpolate(x["weights"].numpy(), x["previous"].numpy(), x["gates"].numpy())
    close(addressing.interpolate(x["weights"], x["previous"], x["gates"]), expected)


@pytest.mark.parametrize("offsets", [1, 3, 5, 7])
def test_shift_matches_loops(inputs, offsets):
    generator = torch.Generator().manual_seed(offsets)
    shift_weights = simplex(generator, BATCH, HEADS, offsets)
    expected = np_shift(inputs["weights"].numpy(), shift_weights.numpy())
    close(addressing.shift(inputs["weights"], shift_weights), expected)


def test_shift_by_one_moves_the_focus_forward_circularly():
    weights = torch.zeros(1, 1, 5, dtype=torch.float64)
    weights[0, 0, 4] = 1
    forward_one = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)
    backward_one = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=torch.float64)
    assert addressing.shift(weights, forward_one)[0, 0].argmax() == 0
    assert addressing.shift(weights, backward_one)[0, 0].argmax() == 3


def test_shift_keeps_weights_summing_to_one(inputs):
    shifted = addressing.shift(inputs["weights"], inputs["shift_weights"])
    torch.testing.assert_close(shifted.sum(-1), torch.ones(BATCH, HEADS, dtype=torch.float64))


def test_sharpen_matches_loops(inputs):
    x = inputs
    expected = np_sharpen(x["weights"].numpy(), x["gammas"].numpy())
    close(addressing.sharpen(x["weights"], x["gammas"]), expected)


def test_sharpen_is_finite_for_zero_weights_and_huge_gamma():
    weights = torch.zeros(1, 2, 6)
    weights[0, 0, 2] = 1
    gammas = torch.tensor([[1e4, 1e4]], requires_grad=True)
    sharpened = addressing.sharpen(weights, gammas)
    sharpened[:, :, 2].sum().backward()
    assert torch.isfinite(sharpened).all() and torch.isfinite(gammas.grad).all()
    torch.testing.assert_close(sharpened.sum(-1), torch.ones(1, 2))
    assert sharpened[0, 0, 2].item() == pytest.approx(1)
    torch.testing.assert_close(sharpened[0, 1], torch.full((6,), 1 / 6))


def test_read_matches_loops(inputs):
    x = inputs
    close(
        addressing.read(x["memory"], x["weights"]),
        np_read(x["memory"].numpy(), x["weights"].numpy()),
    )


@pytest.mark.parametrize("heads", [1, 3])
def test_write_matches_loops(inputs, heads):
    x = {k: inputs[k][:, :heads] for k in ("weights", "erase", "add")}
    expected = np_write(
        inputs["memory"].numpy(), x["weights"].numpy(), x["erase"].numpy(), x["add"].numpy()
    )
    close(addressing.write(inputs["memory"], x["weights"], x["erase"], x["add"]), expected)


def test_write_with_full_erase_at_a_one_hot_weight_replaces_the_row():
    memory = torch.randn(1, 4, 3, dtype=torch.float64)
    weights = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]], dtype=torch.float64)
    add = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
    written = addressing.write(memory, weights, torch.ones(1, 1, 3, dtype=torch.float64), add)
    torch.testing.assert_close(written[0, 1], add[0, 0])
    torch.testing.assert_close(written[0, [0, 2, 3]], memory[0, [0, 2, 3]])


def test_address_matches_loops(inputs):
    x = inputs
    names = ("memory", "previous", "keys", "strengths", "gates", "shift_weights", "gammas")
    expected = np_address(*(x[n].numpy() for n in names))
    close(addressing.address(*(x[n] for n in names)), expected)


def test_zero_memory_and_keys_give_finite_weights_and_gradients():
    memory = torch.zeros(2, 5, 3, dtype=torch.float64, requires_grad=True)
    keys = torch.zeros(2, 1, 3, dtype=torch.float64, requires_grad=True)
    strengths = torch.ones(2, 1, dtype=torch.float64)
    weights = addressing.content_weights(memory, keys, strengths)
    torch.testing.assert_close(weights, torch.full((2, 1, 5), 0.2, dtype=torch.float64))
    (weights[:, :, 0].sum() + addressing.read(memory, weights).sum()).backward()
    assert torch.isfinite(memory.grad).all() and torch.isfinite(keys.grad).all()


@pytest.mark.parametrize(
    ("function", "names"),
    [
        (addressing.content_weights, ("memory", "keys", "strengths")),
        (addressing.interpolate, ("weights", "previous", "gates")),
        (addressing.shift, ("weights", "shift_weights")),
        (addressing.sharpen, ("weights", "gammas")),
        (addressing.read, ("memory", "weights")),
        (addressing.write, ("memory", "weights", "erase", "add")),
        (
            addressing.address,
            ("memory", "previous", "keys", "strengths", "gates", "shift_weights", "gammas"),
        ),
    ],
)
def test_gradcheck(inputs, function, names):
    args = tuple(inputs[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(function, args)
