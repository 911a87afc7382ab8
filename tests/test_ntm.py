"""The NTM model: a float64 numpy reference of whole steps (explicit loops over batch and
head), gradcheck of a step, state handling, config checks and a learning smoke test."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from memctl.errors import UserError
from memctl.models.ntm import NTM, NTMConfig, NTMState
from memctl.recipe import load_recipe, validate_recipe
from memctl.tasks.copy import CopyTask
from tests.test_addressing import np_address, np_read, np_write

SMOKE_STEPS = 400  # of recipes/ntm_copy_small.yaml
TINY = {"controller_size": 3, "memory_size": 5, "word_size": 4, "max_shift": 1}


def tiny_ntm(input_size=3, output_size=2, **overrides) -> NTM:
    torch.manual_seed(0)
    model = NTM(NTMConfig(**{**TINY, **overrides}), input_size, output_size).double()
    with torch.no_grad():  # larger weights than the default init: sharper addressing
        for parameter in model.parameters():
            parameter.mul_(3)
    return model


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def np_ntm(model: NTM, inputs: np.ndarray) -> np.ndarray:
    """The NTM of section 3 with one LSTM layer, read straight off the paper: each
    sequence and each head on its own."""
    config = model.config
    p = {name: value.detach().numpy() for name, value in model.named_parameters()}
    steps, batch, _ = inputs.shape
    size, word, slots = config.controller_size, config.word_size, config.memory_size
    reads_count, writes = config.read_heads, config.write_heads
    heads, shifts = reads_count + writes, 2 * config.max_shift + 1
    clip = config.controller_clip
    logits = np.zeros((steps, batch, model.readout.out_features))
    initial_weights = np.exp(p["initial_weight_logits"])
    initial_weights /= initial_weights.sum(-1, keepdims=True)
    for b in range(batch):
        memory = np.full((1, slots, word), config.memory_init_value)
        reads = p["initial_reads"].copy()
        weights = initial_weights.copy()
        hidden, cell = np.zeros(size), np.zeros(size)
        for t in range(steps):
            gates = (
                p["input_projection.weight"] @ inputs[t, b]
                + p["input_projection.bias"]
                + p["recurrent.0.weight"] @ np.concatenate([reads.reshape(-1), hidden])
            )
            # torch.nn.LSTM's gate order: input, forget, candidate, output.
            i, f, g, o = (gates[k * size : (k + 1) * size] for k in range(4))
            i, f, o = sigmoid(i), sigmoid(f), sigmoid(o)
            cell = f * cell + i * np.tanh(g)
            hidden = o * np.tanh(cell)
            params = np.clip(p["heads.weight"] @ hidden + p["heads.bias"], -clip, clip)
            at = 0

            def take(count, params=params):
                nonlocal at
                at += count
                return params[at - count : at]

            keys = np.tanh(take(heads * word)).reshape(heads, word)
            add = np.tanh(take(writes * word)).reshape(writes, word)
            gate = sigmoid(take(heads))
            erase = sigmoid(take(writes * word)).reshape(writes, word)
            strengths = softplus(take(heads))
            gammas = 1 + softplus(take(heads))
            shift_weights = np.exp(take(heads * shifts)).reshape(heads, shifts)
            shift_weights /= shift_weights.sum(-1, keepdims=True)
            new_weights = np.zeros_like(weights)
            for h in range(heads):
                new_weights[h] = np_address(
                    memory,
                    weights[None, h : h + 1],
                    keys[None, h : h + 1],
                    strengths[None, h : h + 1],
                    gate[None, h : h + 1],
                    shift_weights[None, h : h + 1],
                    gammas[None, h : h + 1],
                )[0, 0]
            weights = new_weights
            reads = np_read(memory, weights[None, :reads_count])[0]
            memory = np_write(memory, weights[None, reads_count:], erase[None], add[None])
            features = np.concatenate([hidden, reads.reshape(-1)])
            out = p["readout.weight"] @ features + p["readout.bias"]
            logits[t, b] = np.clip(out, -config.output_clip, config.output_clip)
    return logits


@pytest.mark.parametrize(("read_heads", "write_heads"), [(1, 1), (2, 3)])
def test_forward_matches_numpy_reference(read_heads, write_heads):
    model = tiny_ntm(read_heads=read_heads, write_heads=write_heads, controller_clip=2.0)
    inputs = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    logits, _ = model(inputs)
    np.testing.assert_allclose(logits.detach().numpy(), np_ntm(model, inputs.numpy()), rtol=1e-9)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"controller": "feedforward", "controller_layers": 2, "read_heads": 2},
        {"controller_layers": 2, "write_heads": 2, "max_shift": 2},
    ],
)
def test_gradcheck_of_a_whole_step(overrides):
    model = tiny_ntm(**overrides)
    names = [name for name, _ in model.named_parameters()]
    generator = torch.Generator().manual_seed(2)
    batch = 2
    state = model.initial_state(batch, torch.device("cpu"), torch.float64)
    state = NTMState(
        memory=torch.randn(batch, 5, 4, dtype=torch.float64, generator=generator),
        reads=state.reads.detach().clone(),
        weights=state.weights.detach().clone(),
        hidden=torch.randn(state.hidden.shape, dtype=torch.float64, generator=generator),
        cell=torch.randn(state.cell.shape, dtype=torch.float64, generator=generator),
    )
    projected = torch.randn(batch, model.input_projection.out_features, dtype=torch.float64)

    def step(projected, *tensors):
        params = dict(zip(names, tensors[: len(names)], strict=True))
        step_state = NTMState(*tensors[len(names) :])
        output, new_state = torch.func.functional_call(model, params, (projected, step_state))
        return (output, *new_state)

    model.forward = model.step  # functional_call calls forward
    args = (projected, *model.parameters(), *state)
    args = tuple(a.detach().clone().requires_grad_() for a in args)
    assert torch.autograd.gradcheck(step, args)


def test_output_and_state_shapes():
    config = NTMConfig(controller_size=6, controller_layers=2, memory_size=9, word_size=5)
    model = NTM(config.model_copy(update={"read_heads": 2, "write_heads": 3}), 4, 7)
    logits, state = model(torch.randn(6, 3, 4))
    assert logits.shape == (6, 3, 7)
    assert state.memory.shape == (3, 9, 5)
    assert state.reads.shape == (3, 2, 5)
    assert state.weights.shape == (3, 5, 9)
    assert state.hidden.shape == state.cell.shape == (2, 3, 6)
    torch.testing.assert_close(state.weights.sum(-1), torch.ones(3, 5))


def test_carrying_the_state_equals_one_long_sequence():
    model = tiny_ntm(controller_layers=2)
    inputs = torch.randn(7, 2, 3, dtype=torch.float64)
    whole, whole_state = model(inputs)
    first, state = model(inputs[:3])
    second, last_state = model(inputs[3:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole)
    for a, b in zip(last_state, whole_state, strict=True):
        torch.testing.assert_close(a, b)


def test_episodes_start_from_the_same_state():
    model = tiny_ntm()
    inputs = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(model(inputs)[0], model(inputs)[0])
    state = model.initial_state(2, torch.device("cpu"), torch.float64)
    assert (state.memory == 1e-6).all() and (state.hidden == 0).all()


def test_memory_initialisations():
    learned = tiny_ntm(memory_init="learned")
    learned(torch.randn(3, 2, 3, dtype=torch.float64))[0].sum().backward()
    assert learned.initial_memory.grad.abs().sum() > 0
    random = tiny_ntm(memory_init="random")
    first = random.initial_state(2, torch.device("cpu"), torch.float64).memory
    second = random.initial_state(2, torch.device("cpu"), torch.float64).memory
    assert not torch.equal(first, second)


def test_initial_reads_and_weightings_are_learned():
    model = tiny_ntm()
    model(torch.randn(3, 2, 3, dtype=torch.float64))[0].sum().backward()
    assert model.initial_reads.grad.abs().sum() > 0
    assert model.initial_weight_logits.grad.abs().sum() > 0


def test_clipping_bounds_logits_and_keeps_huge_head_parameters_finite():
    model = tiny_ntm(output_clip=5.0)
    with torch.no_grad():
        model.readout.bias.fill_(100)
        model.heads.bias.fill_(1e4)
    logits, state = model(torch.randn(4, 2, 3, dtype=torch.float64))
    assert (logits == 5).all()
    assert all(torch.isfinite(t).all() for t in state)


def test_recipe_validation_names_the_field():
    data = {
        "name": "x",
        "model": {"type": "ntm", "memory_size": 4, "max_shift": 2},
        "task": {"type": "copy"},
    }
    with pytest.raises(UserError, match="max_shift"):
        validate_recipe(data, "r.yaml")
    data["model"]["max_shift"] = 1
    assert validate_recipe(data, "r.yaml").model.memory_size == 4


@pytest.mark.slow
def test_small_copy_recipe_learns():
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "ntm_copy_small.yaml")
    torch.manual_seed(recipe.seed)
    task = CopyTask(recipe.task)
    model = NTM(recipe.model, task.input_size, task.output_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.train.optimizer.lr)
    generator = torch.Generator().manual_seed(recipe.seed)
    length = recipe.task.max_length
    test = task.sample(64, torch.Generator().manual_seed(1), max_level=length, min_level=length)

    def bit_errors() -> float:
        with torch.no_grad():
            return task.metrics(model(test.inputs)[0], test)["bit_errors"].item()

    before, start = bit_errors(), time.monotonic()
    for _ in range(SMOKE_STEPS):
        batch = task.sample(recipe.train.batch_size, generator, max_level=length, min_level=1)
        loss = task.loss(model(batch.inputs)[0], batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.clip.norm)
        optimizer.step()
    after = bit_errors()
    assert before > length * task.width / 4
    assert after < before / 10, (before, after, time.monotonic() - start)
