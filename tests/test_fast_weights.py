"""Fast weights (Ba et al. 2016) and the recurrent baselines: float64 numpy references
with explicit loops, gradcheck, the efficient vs explicit fast-weight forms, and a
learning smoke test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memctl.models.base import detach_state
from memctl.models.fast_weights import (
    ControlRNN,
    FastWeightsConfig,
    FastWeightsRNN,
    GRULNConfig,
    LayerNormGRU,
    LayerNormRNN,
    fast_weight_apply,
    fast_weight_attend,
    fast_weight_update,
)
from memctl.registry import MODELS
from memctl.tasks.associative_retrieval import AssociativeRetrievalConfig, AssociativeRetrievalTask

DECAY, FAST_LR = 0.9, 0.7


def assert_close(actual, expected, tolerance: float = 1e-10) -> None:
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else actual
    assert np.allclose(actual, expected, rtol=tolerance, atol=tolerance), (actual, expected)


def random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def build(name: str, hidden: int = 3, input_size: int = 5, output_size: int = 2, **config):
    entry = MODELS.get(name)
    torch.manual_seed(0)
    model = entry.cls(entry.config(hidden=hidden, **config), input_size, output_size).double()
    with torch.no_grad():  # move LN gains/biases off 1/0 so a reference that drops them fails
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


# -- numpy references, one explicit loop per index ---------------------------------------


def np_layer_norm(x, gain, bias, eps):
    size = len(x)
    mean = sum(x[i] for i in range(size)) / size
    variance = sum((x[i] - mean) ** 2 for i in range(size)) / size
    return np.array(
        [gain[i] * (x[i] - mean) / np.sqrt(variance + eps) + bias[i] for i in range(size)]
    )


def np_relu(x):
    return np.array([max(v, 0.0) for v in x])


def np_matvec(matrix, vector):
    rows, cols = matrix.shape
    return np.array([sum(matrix[i, j] * vector[j] for j in range(cols)) for i in range(rows)])


def np_input(p, x):
    """C x + b, or C (E x) + b with an embedding (``input.0`` = E, ``input.1`` = C, b)."""
    if "input.weight" in p:
        return np_matvec(p["input.weight"], x) + p["input.bias"]
    return np_matvec(p["input.1.weight"], np_matvec(p["input.0.weight"], x)) + p["input.1.bias"]


def np_readout(p, h):
    """U h + c, or U_2 ReLU(U_1 h + c_1) + c_2 with a read-out layer."""
    if "readout.weight" in p:
        return np_matvec(p["readout.weight"], h) + p["readout.bias"]
    middle = np_relu(np_matvec(p["readout.0.weight"], h) + p["readout.0.bias"])
    return np_matvec(p["readout.2.weight"], middle) + p["readout.2.bias"]


def np_fast_weights_rnn(model: FastWeightsRNN, inputs: np.ndarray) -> np.ndarray:
    """Logits [T, B, O], eqs. 1-2 with A(t) built entry by entry."""
    config = model.config
    p = {k: v.detach().numpy() for k, v in model.named_parameters()}
    steps, batch, _ = inputs.shape
    size = config.hidden
    logits = np.zeros((steps, batch, model.readout(torch.zeros(size).double()).shape[0]))
    for b in range(batch):
        hidden = np.zeros(size)
        fast = np.zeros((size, size))
        for t in range(steps):
            previous = fast.copy()  # A(t-1)
            for i in range(size):
                for j in range(size):
                    fast[i, j] = config.decay * fast[i, j] + config.fast_lr * hidden[i] * hidden[j]
            attended = fast if config.attend_current else previous
            boundary = np_matvec(p["recurrent"], hidden) + np_input(p, inputs[t, b])
            norm = (p["norm.weight"], p["norm.bias"], config.ln_eps)
            inner = np_relu(np_layer_norm(boundary, *norm))
            for _ in range(config.inner_steps):
                inner = np_relu(np_layer_norm(boundary + np_matvec(attended, inner), *norm))
            hidden = inner
            logits[t, b] = np_readout(p, hidden)
    return logits


def np_attend(history, query, decay, fast_lr):
    """eta sum_tau lambda^(t - tau) h(tau) (h(tau)^T h), looping over batch, slot, unit."""
    batch, slots, size = history.shape
    out = np.zeros((batch, size))
    for b in range(batch):
        for tau in range(slots):
            dot = sum(history[b, tau, k] * query[b, k] for k in range(size))
            for i in range(size):
                out[b, i] += fast_lr * decay ** (slots - 1 - tau) * history[b, tau, i] * dot
    return out


# -- the fast-weight maths ------------------------------------------------------------------


def test_attend_matches_numpy_loops():
    history, query = random(2, 4, 3, seed=1), random(2, 3, seed=2)
    expected = np_attend(history.numpy(), query.numpy(), DECAY, FAST_LR)
    assert_close(fast_weight_attend(history, query, DECAY, FAST_LR), expected)


def test_attend_with_empty_history_is_zero():
    assert_close(
        fast_weight_attend(random(2, 0, 3), random(2, 3), DECAY, FAST_LR), np.zeros((2, 3))
    )


def test_explicit_matrix_matches_numpy_loops_and_attend():
    history, query = random(2, 4, 3, seed=3), random(2, 3, seed=4)
    fast = torch.zeros(2, 3, 3, dtype=torch.float64)
    for step in range(4):
        fast = fast_weight_update(fast, history[:, step], DECAY, FAST_LR)
    expected = np.zeros((2, 3, 3))
    for b in range(2):
        for tau in range(4):
            for i in range(3):
                for j in range(3):
                    h = history.numpy()[b, tau]
                    expected[b, i, j] += FAST_LR * DECAY ** (3 - tau) * h[i] * h[j]
    assert_close(fast, expected)
    assert_close(
        fast_weight_apply(fast, query), np_attend(history.numpy(), query.numpy(), DECAY, FAST_LR)
    )


def test_fast_weight_functions_pass_gradcheck():
    history = random(2, 3, 4, seed=5).requires_grad_()
    query = random(2, 4, seed=6).requires_grad_()
    fast = random(2, 4, 4, seed=7).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, q: fast_weight_attend(h, q, DECAY, FAST_LR), (history, query)
    )
    assert torch.autograd.gradcheck(
        lambda a, h: fast_weight_update(a, h, DECAY, FAST_LR), (fast, query)
    )
    assert torch.autograd.gradcheck(fast_weight_apply, (fast, query))


# -- rnn_ln_fw -------------------------------------------------------------------------------


ENCODER_READOUT = [{}, {"embedding": 4, "readout_hidden": 6}]


@pytest.mark.parametrize("encoder_readout", ENCODER_READOUT)
@pytest.mark.parametrize("attend_current", [True, False])
@pytest.mark.parametrize("inner_steps", [1, 3])
@pytest.mark.parametrize("explicit", [False, True])
def test_fast_weights_rnn_matches_numpy_loops(
    explicit, inner_steps, attend_current, encoder_readout
):
    model = build(
        "rnn_ln_fw",
        decay=DECAY,
        fast_lr=FAST_LR,
        inner_steps=inner_steps,
        explicit=explicit,
        attend_current=attend_current,
        **encoder_readout,
    )
    inputs = random(5, 2, 5, seed=8)
    outputs, _ = model(inputs)
    assert_close(outputs, np_fast_weights_rnn(model, inputs.numpy()), 1e-9)


@pytest.mark.parametrize("attend_current", [True, False])
def test_efficient_and_explicit_forms_agree_to_1e_6(attend_current):
    sizes = {"hidden": 16, "input_size": 37, "output_size": 10, "inner_steps": 2}
    efficient = build("rnn_ln_fw", **sizes, attend_current=attend_current)
    explicit = build("rnn_ln_fw", **sizes, attend_current=attend_current, explicit=True)
    explicit.load_state_dict(efficient.state_dict())
    inputs = random(11, 4, 37, seed=9)
    out_efficient, state_efficient = efficient(inputs)
    out_explicit, state_explicit = explicit(inputs)
    assert (out_efficient - out_explicit).abs().max() < 1e-6
    inputs.requires_grad_()
    grad_efficient = torch.autograd.grad(efficient(inputs)[0].square().sum(), inputs)[0]
    grad_explicit = torch.autograd.grad(explicit(inputs)[0].square().sum(), inputs)[0]
    assert (grad_efficient - grad_explicit).abs().max() < 1e-6
    # The history state rebuilds the matrix state: A = eta sum lambda^age h h^T.
    history = state_efficient.history
    ages = torch.arange(history.shape[1] - 1, -1, -1, dtype=torch.float64)
    rebuilt = torch.einsum("t,bti,btj->bij", 0.5 * 0.95**ages, history, history)
    assert_close(rebuilt, state_explicit.fast_weights.detach().numpy(), 1e-9)


@pytest.mark.parametrize("encoder_readout", ENCODER_READOUT)
def test_fast_weights_rnn_passes_gradcheck(encoder_readout):
    for explicit in (False, True):
        model = build(
            "rnn_ln_fw", hidden=3, input_size=2, output_size=2, explicit=explicit, **encoder_readout
        )
        inputs = random(3, 2, 2, seed=10).requires_grad_()
        assert torch.autograd.gradcheck(lambda x, m=model: m(x)[0], (inputs,))


def test_encoder_and_readout_layers_default_off_and_shape_up():
    plain = FastWeightsRNN(FastWeightsConfig(hidden=6), 37, 10)
    assert isinstance(plain.input, torch.nn.Linear) and isinstance(plain.readout, torch.nn.Linear)
    wide = FastWeightsRNN(FastWeightsConfig(hidden=6, embedding=100, readout_hidden=100), 37, 10)
    assert wide.input[0].weight.shape == (100, 37) and wide.input[0].bias is None
    assert wide.input[1].weight.shape == (6, 100)
    assert wide.readout[0].weight.shape == (100, 6) and wide.readout[2].weight.shape == (10, 100)
    gru = LayerNormGRU(GRULNConfig(hidden=6, embedding=8, readout_hidden=5), 37, 10)
    assert gru.input[1].weight.shape == (18, 8) and gru.readout[2].weight.shape == (10, 5)


def test_initial_weights_follow_the_paper():
    model = FastWeightsRNN(FastWeightsConfig(hidden=6), 37, 10)
    assert torch.equal(model.recurrent, 0.05 * torch.eye(6))
    assert model.config.decay == 0.95 and model.config.fast_lr == 0.5
    assert model.config.inner_steps == 1
    assert torch.equal(model.norm.weight, torch.ones(6)) and torch.equal(
        model.norm.bias, torch.zeros(6)
    )


# -- baselines -------------------------------------------------------------------------------


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_baseline(model, inputs: np.ndarray) -> np.ndarray:
    """Logits of rnn_ln, control or gru_ln with per-sequence, per-step loops."""
    p = {k: v.detach().numpy() for k, v in model.named_parameters()}
    steps, batch, _ = inputs.shape
    size = model.config.hidden
    logits = np.zeros((steps, batch, model.readout(torch.zeros(size).double()).shape[0]))
    for b in range(batch):
        hidden = np.zeros(size)
        for t in range(steps):
            driven = np_input(p, inputs[t, b])
            if isinstance(model, LayerNormGRU):
                eps = model.config.ln_eps
                rec = np_matvec(p["recurrent.weight"], hidden)
                gate = [slice(g * size, (g + 1) * size) for g in range(3)]
                reset = np_sigmoid(
                    np_layer_norm(
                        driven[gate[0]] + rec[gate[0]],
                        p["norm_reset.weight"],
                        p["norm_reset.bias"],
                        eps,
                    )
                )
                update = np_sigmoid(
                    np_layer_norm(
                        driven[gate[1]] + rec[gate[1]],
                        p["norm_update.weight"],
                        p["norm_update.bias"],
                        eps,
                    )
                )
                candidate = np.tanh(
                    np_layer_norm(
                        driven[gate[2]] + reset * rec[gate[2]],
                        p["norm_candidate.weight"],
                        p["norm_candidate.bias"],
                        eps,
                    )
                )
                hidden = (1 - update) * candidate + update * hidden
            else:
                boundary = np_matvec(p["recurrent"], hidden) + driven
                if isinstance(model, LayerNormRNN):
                    boundary = np_layer_norm(
                        boundary, p["norm.weight"], p["norm.bias"], model.config.ln_eps
                    )
                hidden = np_relu(boundary)
            logits[t, b] = np_readout(p, hidden)
    return logits


@pytest.mark.parametrize("encoder_readout", ENCODER_READOUT)
@pytest.mark.parametrize("name", ["rnn_ln", "control", "gru_ln"])
def test_baselines_match_numpy_loops(name, encoder_readout):
    model = build(name, hidden=4, **encoder_readout)
    inputs = random(4, 2, 5, seed=11)
    assert_close(model(inputs)[0], np_baseline(model, inputs.numpy()), 1e-9)


def test_control_is_an_irnn_and_rnn_ln_starts_like_the_fast_weights_model():
    assert torch.equal(
        ControlRNN(MODELS.get("control").config(hidden=3), 2, 2).recurrent, torch.eye(3)
    )
    rnn_ln = LayerNormRNN(MODELS.get("rnn_ln").config(hidden=3), 2, 2)
    assert torch.equal(rnn_ln.recurrent, 0.05 * torch.eye(3))
    assert not hasattr(ControlRNN(MODELS.get("control").config(hidden=3), 2, 2), "norm")


def test_gru_ln_passes_gradcheck():
    model = LayerNormGRU(GRULNConfig(hidden=3), 2, 2).double()
    inputs = random(3, 2, 2, seed=12).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: model(x)[0], (inputs,))


# -- contract shared by every model ----------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"type": "rnn_ln_fw"},
        {"type": "rnn_ln_fw", "explicit": True},
        {"type": "rnn_ln"},
        {"type": "control"},
        {"type": "gru_ln"},
        {"type": "lstm_ar", "embedding": 4, "readout_hidden": 5},
    ],
)
def test_state_carries_over_between_calls(config):
    name = config.pop("type")
    model = build(name, hidden=6, input_size=5, output_size=3, **config)
    inputs = random(7, 3, 5, seed=13)
    whole, whole_state = model(inputs)
    first, state = model(inputs[:3])
    second, last_state = model(inputs[3:], detach_state(state))
    assert whole.shape == (7, 3, 3)
    assert_close(torch.cat([first, second]), whole.detach().numpy(), 1e-12)
    for part, expected in zip(last_state, whole_state, strict=True):
        assert_close(part, expected.detach().numpy(), 1e-12)


def test_no_python_loop_over_batch_outputs_are_independent_per_sequence():
    model = build("rnn_ln_fw", hidden=5, input_size=5, output_size=3)
    inputs = random(6, 4, 5, seed=14)
    together, _ = model(inputs)
    alone, _ = model(inputs[:, 2:3])
    assert_close(together[:, 2:3], alone.detach().numpy(), 1e-12)


# -- learning -------------------------------------------------------------------------------


@pytest.mark.slow
def test_fast_weights_learn_associative_retrieval_quickly():
    """Smoke test: on K = 2 pairs the loss falls from chance (ln 10 = 2.30) to near ln 2
    (the answer is one of the two values) in a few hundred steps."""
    torch.manual_seed(0)
    task = AssociativeRetrievalTask(AssociativeRetrievalConfig(pairs=2))
    config = FastWeightsConfig(hidden=32, attend_current=False)
    model = FastWeightsRNN(config, task.input_size, task.output_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        batch = task.sample(64, generator, max_level=2, min_level=2)
        loss = task.loss(model(batch.inputs)[0], batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[:10]) > 2.0
    assert np.mean(losses[-20:]) < 0.4 * np.mean(losses[:10])


# -- lstm_ar: the LSTM baseline with the same encoder and read-out --------------------------


def test_lstm_ar_without_options_is_the_lstm_baseline():
    from memctl.models.lstm import LSTM, LSTMConfig

    lstm = LSTM(LSTMConfig(hidden=4), 5, 3).double()
    lstm_ar = build("lstm_ar", hidden=4, input_size=5, output_size=3)
    lstm_ar.load_state_dict(lstm.state_dict())
    inputs = random(6, 2, 5, seed=15)
    assert_close(lstm_ar(inputs)[0], lstm(inputs)[0].detach().numpy(), 1e-12)


def test_lstm_ar_embeds_then_reads_out_through_the_relu_layer():
    model = build("lstm_ar", hidden=4, input_size=5, output_size=3, embedding=6, readout_hidden=7)
    p = {k: v.detach().numpy() for k, v in model.named_parameters()}
    inputs = random(6, 2, 5, seed=16)
    embedded = torch.from_numpy(
        np.stack([[np_matvec(p["embed.weight"], x) for x in step] for step in inputs.numpy()])
    )
    core, _ = model.rnn(embedded)
    expected = np.stack([[np_readout(p, h) for h in step] for step in core.detach().numpy()])
    assert_close(model(inputs)[0], expected, 1e-10)
