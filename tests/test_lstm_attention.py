"""The LSTM encoder-decoder with attention (the HAM paper's baseline): the additive
attention against a float64 numpy loop, the two phases, masking, state continuation, and
that a tiny one learns reverse."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import memctl.tasks  # noqa: F401  (registers the tasks)
from memctl.models import MODELS
from memctl.models.lstm_attention import LSTMAttention, LSTMAttentionConfig, additive_attention
from memctl.registry import TASKS


def numpy_attention(keys, query, scale, attendable) -> np.ndarray:
    steps, batch, _ = keys.shape
    weights = np.zeros((steps, batch))
    for b in range(batch):
        scores = {
            s: float(scale @ np.tanh(keys[s, b] + query[b]))
            for s in range(steps)
            if attendable[s, b]
        }
        total = sum(math.exp(score) for score in scores.values())
        for s, score in scores.items():
            weights[s, b] = math.exp(score) / total
    return weights


def test_additive_attention_matches_a_loop_and_masks():
    rng = np.random.default_rng(0)
    keys, query, scale = rng.normal(size=(5, 3, 4)), rng.normal(size=(3, 4)), rng.normal(size=4)
    attendable = np.array(
        [[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=bool
    )  # batch element 2 has nothing to attend to
    weights = additive_attention(*(torch.from_numpy(a) for a in (keys, query, scale, attendable)))
    np.testing.assert_allclose(
        weights.numpy(), numpy_attention(keys, query, scale, attendable), atol=1e-12
    )
    np.testing.assert_allclose(weights.sum(0).numpy(), [1, 1, 0], atol=1e-12)


def small_model() -> LSTMAttention:
    torch.manual_seed(0)
    config = LSTMAttentionConfig(hidden=6, attention_size=5)
    return LSTMAttention(config, input_size=6, output_size=2).double()


def sort_batch(batch: int = 4, min_n: int = 2):
    entry = TASKS.get("sort")
    task = entry.cls(entry.config(key_bits=2, value_bits=2, n=5))
    sample = task.sample(batch, torch.Generator().manual_seed(0), max_level=5, min_level=min_n)
    return sample.to(torch.float64)


def test_registered_with_its_config():
    entry = MODELS.get("lstm_attention")
    assert entry.cls is LSTMAttention and entry.config is LSTMAttentionConfig


def test_outputs_are_zero_in_the_input_phase_and_attention_only_reaches_seen_items():
    model = small_model().eval()
    batch = sort_batch()
    with torch.no_grad():
        outputs, quantities = model.trace(batch.inputs)
        plain, _ = model(batch.inputs)
    weights = quantities["read_weights"]  # [T, B, 1, T]
    steps = batch.inputs.shape[0]
    assert outputs.shape == (steps, 4, 2) and weights.shape == (steps, 4, 1, steps)
    np.testing.assert_allclose(outputs.numpy(), plain.numpy(), atol=1e-12)
    assert torch.equal(outputs[:5], torch.zeros(5, 4, 2, dtype=torch.float64))
    is_data = batch.inputs[:, :, -2] > 0  # [T, B]
    go = batch.inputs[:, :, -1] > 0
    for t in range(steps):
        for b in range(4):
            row = weights[t, b, 0]
            assert row[~is_data[:, b]].abs().sum() == 0  # padding and answers are not attended
            assert row[t + 1 :].abs().sum() == 0
            if go[t, b]:
                assert float(row.sum()) == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(weights[:5], torch.zeros_like(weights[:5]))


def test_sequences_are_independent():
    model = small_model()
    batch = sort_batch()
    whole, _ = model(batch.inputs)
    alone, _ = model(batch.inputs[:, 2:3])
    np.testing.assert_allclose(
        alone[:, 0].detach().numpy(), whole[:, 2].detach().numpy(), atol=1e-12
    )


def test_state_continues_the_decoder_phase():
    model = small_model()
    batch = sort_batch(min_n=5)
    whole, _ = model(batch.inputs)
    first, state = model(batch.inputs[:7])
    rest, _ = model(batch.inputs[7:], state)
    np.testing.assert_allclose(
        torch.cat((first, rest)).detach().numpy(), whole.detach().numpy(), atol=1e-12
    )


def test_rejects_inputs_without_the_phase_channels():
    with pytest.raises(ValueError, match="is_data and is_go"):
        LSTMAttention(LSTMAttentionConfig(), input_size=2, output_size=1)


@pytest.mark.slow
def test_a_tiny_one_learns_reverse():
    torch.manual_seed(0)
    entry = TASKS.get("reverse")
    task = entry.cls(entry.config(key_bits=2, value_bits=3, n=4, min_n=4))
    config = LSTMAttentionConfig(hidden=32, attention_size=16)
    model = LSTMAttention(config, task.input_size, task.output_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(250):
        batch = task.sample(32, generator, max_level=4, min_level=4)
        loss = task.loss(model(batch.inputs)[0], batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    batch = task.sample(200, generator, max_level=4, min_level=4)
    with torch.no_grad():
        accuracy = float(task.metrics(model.eval()(batch.inputs)[0], batch)["accuracy"])
    assert accuracy > 0.9
