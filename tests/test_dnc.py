"""The DNC: its reference memory maths (``addressing.py``) against float64 numpy
references written with explicit loops over batch, head and slot (the Methods section's
equations read literally), special cases (ties, a fully used memory, the link's
diagonal), gradchecks of the maths and of a whole step, state handling, the trace and a
learning smoke test. The fused implementation's tests are in ``test_dnc_fused.py``, the
backend choice's in ``test_dnc_backend.py``."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

from memctl.errors import UserError
from memctl.models import addressing, detach_state
from memctl.models.addressing import EPSILON
from memctl.models.dnc import DNCConfig, DNCModel, fused
from memctl.recipe import validate_recipe
from memctl.tasks.copy import CopyConfig, CopyTask

BATCH, READS, WRITES, SLOTS = 2, 3, 2, 6


def np_usage(usage, write_weights, free_gates, read_weights):
    out = np.zeros_like(usage)
    for b in range(usage.shape[0]):
        for i in range(usage.shape[1]):
            not_written = 1.0
            for h in range(write_weights.shape[1]):
                not_written *= 1 - write_weights[b, h, i]
            written = 1 - not_written
            retention = 1.0
            for r in range(read_weights.shape[1]):
                retention *= 1 - free_gates[b, r] * read_weights[b, r, i]
            u = usage[b, i]
            out[b, i] = (u + written - u * written) * retention
    return out


def np_allocation(usage):
    """Sorted ascending, ties in slot order (a stable sort), as Methods' free list."""
    out = np.zeros_like(usage)
    for b in range(usage.shape[0]):
        u = [EPSILON + (1 - EPSILON) * x for x in usage[b]]
        free_list = sorted(range(len(u)), key=lambda i, u=u: (u[i], i))
        product = 1.0
        for j in free_list:
            out[b, j] = (1 - u[j]) * product
            product *= u[j]
    return out


def np_write_allocation(usage, gates):
    batch, heads = gates.shape
    out = np.zeros((batch, heads, usage.shape[1]))
    usage = usage.copy()
    for h in range(heads):
        out[:, h] = np_allocation(usage)
        for b in range(batch):
            for i in range(usage.shape[1]):
                usage[b, i] += (1 - usage[b, i]) * gates[b, h] * out[b, h, i]
    return out


def np_precedence(precedence, write_weights):
    out = np.zeros_like(precedence)
    for b in range(precedence.shape[0]):
        for h in range(precedence.shape[1]):
            total = sum(write_weights[b, h])
            for i in range(precedence.shape[2]):
                out[b, h, i] = (1 - total) * precedence[b, h, i] + write_weights[b, h, i]
    return out


def np_link(link, write_weights, precedence):
    out = np.zeros_like(link)
    batch, heads, slots = write_weights.shape
    for b in range(batch):
        for h in range(heads):
            w, p = write_weights[b, h], precedence[b, h]
            for i in range(slots):
                for j in range(slots):
                    if i != j:
                        out[b, h, i, j] = (1 - w[i] - w[j]) * link[b, h, i, j] + w[i] * p[j]
    return out


def np_directional(link, read_weights):
    batch, heads, slots = link.shape[0], link.shape[1], link.shape[2]
    reads = read_weights.shape[1]
    forward = np.zeros((batch, reads, heads, slots))
    backward = np.zeros((batch, reads, heads, slots))
    for b in range(batch):
        for r in range(reads):
            for h in range(heads):
                for i in range(slots):
                    for j in range(slots):
                        forward[b, r, h, i] += link[b, h, i, j] * read_weights[b, r, j]
                        backward[b, r, h, j] += link[b, h, i, j] * read_weights[b, r, i]
    return forward, backward


def np_read_weighting(content, forward, backward, modes):
    batch, reads, heads, slots = forward.shape
    out = np.zeros_like(content)
    for b in range(batch):
        for r in range(reads):
            for i in range(slots):
                total = modes[b, r, 2 * heads] * content[b, r, i]
                for h in range(heads):
                    total += modes[b, r, h] * backward[b, r, h, i]
                    total += modes[b, r, heads + h] * forward[b, r, h, i]
                out[b, r, i] = total
    return out


def simplex(generator, *shape, total=1.0):
    """Random weightings summing to ``total`` over the last dimension."""
    logits = 2 * torch.randn(*shape, generator=generator, dtype=torch.float64)
    return total * torch.softmax(logits, -1)


def random_link(generator, batch, heads, slots):
    link = 0.2 * torch.rand(batch, heads, slots, slots, generator=generator, dtype=torch.float64)
    return link * (1 - torch.eye(slots, dtype=torch.float64))


def make_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    return {
        "usage": rand(BATCH, SLOTS),
        "write_weights": simplex(generator, BATCH, WRITES, SLOTS, total=0.9),
        "read_weights": simplex(generator, BATCH, READS, SLOTS),
        "free_gates": rand(BATCH, READS),
        "gates": rand(BATCH, WRITES),
        "precedence": simplex(generator, BATCH, WRITES, SLOTS, total=0.8),
        "link": random_link(generator, BATCH, WRITES, SLOTS),
        "content": simplex(generator, BATCH, READS, SLOTS),
        "modes": simplex(generator, BATCH, READS, 2 * WRITES + 1),
    }


@pytest.fixture
def inputs():
    return make_inputs()


def close(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def numpy(x, *names):
    return (x[n].numpy() for n in names)


@pytest.mark.parametrize("writes", [1, WRITES])
def test_usage_update_matches_loops(inputs, writes):
    x = {**inputs, "write_weights": inputs["write_weights"][:, :writes]}
    names = ("usage", "write_weights", "free_gates", "read_weights")
    close(addressing.usage_update(*(x[n] for n in names)), np_usage(*numpy(x, *names)))


def test_allocation_matches_loops(inputs):
    usage = inputs["usage"]
    close(addressing.allocation(usage), np_allocation(usage.numpy()))


def test_allocation_breaks_ties_by_slot_index():
    usage = torch.tensor([[0.5, 0.2, 0.5, 0.2, 0.9, 0.2]], dtype=torch.float64)
    allocation = addressing.allocation(usage)
    close(allocation, np_allocation(usage.numpy()))
    # Equal usage, equal need: the lower index comes first in the free list and gets more.
    assert allocation[0, 1] > allocation[0, 3] > allocation[0, 5] > allocation[0, 0]
    assert allocation[0, 0] > allocation[0, 2] > allocation[0, 4]
    # The same in every batch row, whatever the other rows hold.
    batch = torch.cat([usage, torch.rand(3, 6, dtype=torch.float64)])
    torch.testing.assert_close(addressing.allocation(batch)[:1], allocation)


def test_allocation_of_an_empty_and_a_fully_used_memory():
    empty = addressing.allocation(torch.zeros(1, 4, dtype=torch.float64))
    assert empty[0, 0].item() == pytest.approx(1 - EPSILON)  # slot 0 first among equals
    assert (empty[0, 1:] < 1e-5).all()
    full = torch.ones(2, 4, dtype=torch.float64, requires_grad=True)
    allocation = addressing.allocation(full)
    assert (allocation == 0).all()
    allocation.sum().backward()
    assert torch.isfinite(full.grad).all()
    partly = torch.tensor([[1.0, 1.0, 0.25, 1.0]], dtype=torch.float64)
    close(addressing.allocation(partly), np_allocation(partly.numpy()))
    assert addressing.allocation(partly).argmax() == 2


def test_write_allocation_matches_loops(inputs):
    x = inputs
    expected = np_write_allocation(x["usage"].numpy(), x["gates"].numpy())
    close(addressing.write_allocation(x["usage"], x["gates"]), expected)


def test_two_write_heads_allocate_different_slots():
    usage = torch.tensor([[0.9, 0.0, 0.9, 0.0]], dtype=torch.float64)
    allocation = addressing.write_allocation(usage, torch.ones(1, 2, dtype=torch.float64))
    assert allocation[0, 0].argmax() == 1 and allocation[0, 1].argmax() == 3


def test_precedence_matches_loops(inputs):
    names = ("precedence", "write_weights")
    close(
        addressing.precedence_update(*(inputs[n] for n in names)),
        np_precedence(*numpy(inputs, *names)),
    )


LINK_STEP = ("link", "write_weights", "precedence", "read_weights")


def link_step(link, write_weights, precedence, read_weights):
    """The reference link update and the reads through it (what ``fused.link_step`` is
    one autograd node of)."""
    link = addressing.link_update(link, write_weights, precedence)
    return (link, *addressing.directional_weightings(link, read_weights))


def heads_of(inputs, writes):
    """The inputs with only the first ``writes`` write heads."""
    heads = {"write_weights", "gates", "precedence", "link"}
    return {n: (v[:, :writes] if n in heads else v) for n, v in inputs.items()}


@pytest.mark.parametrize("implementation", ["reference", "fused"])
@pytest.mark.parametrize("writes", [1, WRITES])
def test_link_step_matches_loops_and_keeps_the_diagonal_zero(inputs, writes, implementation):
    step = link_step if implementation == "reference" else fused.link_step
    x = heads_of(inputs, writes)
    link = x["link"] + torch.eye(SLOTS, dtype=torch.float64)  # even from a nonzero one
    updated, forward, backward = step(link, *(x[n] for n in LINK_STEP[1:]))
    expected = np_link(link.numpy(), *numpy(x, "write_weights", "precedence"))
    close(updated, expected)
    assert (updated.diagonal(dim1=-2, dim2=-1) == 0).all()
    expected_forward, expected_backward = np_directional(expected, x["read_weights"].numpy())
    close(forward, expected_forward)
    close(backward, expected_backward)


def test_link_records_the_order_of_writes():
    slots = 4
    link = torch.zeros(1, 1, slots, slots, dtype=torch.float64)
    precedence = torch.zeros(1, 1, slots, dtype=torch.float64)
    focus = torch.zeros(1, 1, slots, dtype=torch.float64)
    focus[0, 0, 0] = 1
    for slot in (2, 0, 3):
        weights = torch.zeros(1, 1, slots, dtype=torch.float64)
        weights[0, 0, slot] = 1
        link, forward, backward = link_step(link, weights, precedence, focus)
        precedence = addressing.precedence_update(precedence, weights)
    expected = torch.zeros(slots, slots, dtype=torch.float64)
    expected[0, 2] = expected[3, 0] = 1  # 0 written after 2, 3 after 0
    torch.testing.assert_close(link[0, 0], expected)
    assert forward[0, 0, 0].argmax() == 3 and backward[0, 0, 0].argmax() == 2


def test_read_weighting_matches_loops(inputs):
    _, forward, backward = link_step(*(inputs[n] for n in LINK_STEP))
    content, modes = inputs["content"], inputs["modes"]
    expected = np_read_weighting(content.numpy(), forward.numpy(), backward.numpy(), modes.numpy())
    close(addressing.read_weighting(content, forward, backward, modes), expected)


@pytest.mark.parametrize(
    ("function", "names"),
    [
        (addressing.usage_update, ("usage", "write_weights", "free_gates", "read_weights")),
        (addressing.allocation, ("usage",)),
        (addressing.write_allocation, ("usage", "gates")),
        (addressing.precedence_update, ("precedence", "write_weights")),
        (link_step, LINK_STEP),
    ],
)
@pytest.mark.parametrize("writes", [1, WRITES])
def test_gradcheck(inputs, function, names, writes):
    # One write head takes shortcuts (no product over heads).
    x = heads_of(inputs, writes)
    args = tuple(x[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(function, args)


TINY = {"controller_size": 5, "memory_size": 4, "word_size": 3, "read_heads": 2}


def tiny_dnc(input_size=3, output_size=2, **overrides) -> DNCModel:
    torch.manual_seed(0)
    return DNCModel(DNCConfig(**{**TINY, **overrides}), input_size, output_size).double()


def random_state(model: DNCModel, batch: int, generator: torch.Generator):
    """A state from running a few random steps: nonzero usage, link and weights."""
    inputs = torch.randn(4, batch, 3, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        _, state = model(inputs)
    return state


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"controller": "gru", "controller_layers": 2, "write_heads": 2, "layer_norm": True},
        {"controller": "rnn", "nonlinearity": "relu", "controller_clip": 0.5},
    ],
)
def test_gradcheck_of_a_whole_step(overrides):
    model = tiny_dnc(**overrides)
    generator = torch.Generator().manual_seed(1)
    batch = 2
    state = random_state(model, batch, generator)
    names = [name for name, _ in model.named_parameters()]
    state_leaves, spec = pytree.tree_flatten(state)
    projected = torch.randn(
        batch, model.controllers[0].weight_ih[0].shape[0], dtype=torch.float64, generator=generator
    )

    def step(projected, *tensors):
        params = dict(zip(names, tensors[: len(names)], strict=True))
        step_state = pytree.tree_unflatten(list(tensors[len(names) :]), spec)
        output, new_state, _ = torch.func.functional_call(model, params, (projected, step_state))
        # (The trail's allocation weightings are for traces; the native kernel does not
        # differentiate them.)
        return (output, *pytree.tree_leaves(new_state))

    model.forward = model.step  # functional_call calls forward
    args = (projected, *model.parameters(), *state_leaves)
    args = tuple(a.detach().clone().requires_grad_() for a in args)
    # fast_mode checks random projections of the Jacobian: full Jacobians of a whole step
    # take minutes; every piece of the maths has its full gradcheck above.
    assert torch.autograd.gradcheck(step, args, fast_mode=True)


def test_output_and_state_shapes():
    config = DNCConfig(controller_size=6, controller_layers=2, memory_size=9, word_size=5)
    model = DNCModel(config.model_copy(update={"read_heads": 3, "write_heads": 2}), 4, 7)
    logits, state = model(torch.randn(6, 3, 4))
    assert logits.shape == (6, 3, 7)
    (controller,), (access,) = state.controller, state.access
    assert controller.hidden.shape == controller.cell.shape == (2, 3, 6)
    assert access.memory.shape == (3, 9, 5)
    assert access.read_weights.shape == (3, 3, 9)
    assert access.write_weights.shape == (3, 2, 9)
    assert access.usage.shape == (3, 9)
    assert access.link.shape == (3, 2, 9, 9)
    assert access.precedence.shape == (3, 2, 9)
    assert state.reads.shape == (3, 3, 5)
    # Weightings are convex or less; usage stays in [0, 1].
    assert (access.read_weights.sum(-1) <= 1 + 1e-5).all()
    assert (access.write_weights.sum(-1) <= 1 + 1e-5).all()
    assert ((access.usage >= 0) & (access.usage <= 1)).all()


def test_carrying_the_state_equals_one_long_sequence():
    model = tiny_dnc(controller_layers=2)
    inputs = torch.randn(7, 2, 3, dtype=torch.float64)
    whole, whole_state = model(inputs)
    first, state = model(inputs[:3])
    second, last_state = model(inputs[3:], detach_state(state))
    torch.testing.assert_close(torch.cat([first, second]), whole)
    for a, b in zip(pytree.tree_leaves(last_state), pytree.tree_leaves(whole_state), strict=True):
        torch.testing.assert_close(a, b)
    assert not any(t.requires_grad for t in pytree.tree_leaves(detach_state(state)))


def test_episodes_start_from_an_empty_memory():
    model = tiny_dnc()
    inputs = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(model(inputs)[0], model(inputs)[0])
    state = model.initial_state(2, torch.device("cpu"), torch.float64)
    assert all((t == 0).all() for t in pytree.tree_leaves(state))


@pytest.mark.parametrize("writes", [1, 2])
def test_trace_records_every_step_with_the_forward_pass(writes):
    model = tiny_dnc(write_heads=writes)
    inputs = torch.randn(5, 2, 3, dtype=torch.float64)
    logits, trace = model.trace(inputs)
    torch.testing.assert_close(logits, model(inputs)[0])
    steps, batch, slots, reads = 5, 2, 4, 2
    head = (writes,) if writes > 1 else ()
    assert trace["read_weights"].shape == (steps, batch, reads, slots)
    assert trace["write_weights"].shape == (steps, batch, writes, slots)
    assert trace["memory"].shape == (steps + 1, batch, slots, 3)
    assert trace["usage"].shape == (steps, batch, slots)
    assert trace["allocation"].shape == (steps, batch, writes, slots)
    assert trace["link"].shape == (steps, batch, *head, slots, slots)
    assert trace["precedence"].shape == (steps, batch, *head, slots)
    _, state = model(inputs)
    (access,) = state.access
    torch.testing.assert_close(trace["memory"][-1], access.memory)
    torch.testing.assert_close(trace["usage"][-1], access.usage)
    assert (trace["memory"][0] == 0).all()


def test_recipe_validation_names_the_field():
    data = {"name": "x", "model": {"type": "dnc", "read_heads": 0}, "task": {"type": "copy"}}
    with pytest.raises(UserError, match="read_heads"):
        validate_recipe(data, "r.yaml")
    data["model"]["read_heads"] = 2
    assert validate_recipe(data, "r.yaml").model.read_heads == 2


@pytest.mark.slow
def test_copy_loss_falls_fast():
    """A small DNC on copies of lengths 1..4: the loss falls by a large factor in 350
    steps (about 40 s on the loaded 2-core machine; it reaches 0 bit errors there)."""
    torch.manual_seed(0)
    task = CopyTask(CopyConfig(width=4, max_length=4))
    config = DNCConfig(controller_size=32, memory_size=8, word_size=8, read_heads=1)
    model = DNCModel(config, task.input_size, task.output_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    test = task.sample(64, torch.Generator().manual_seed(1), max_level=4, min_level=1)

    def test_loss() -> float:
        with torch.no_grad():
            return task.loss(model(test.inputs)[0], test).item()

    before, start = test_loss(), time.monotonic()
    for _ in range(350):
        batch = task.sample(32, generator, max_level=4, min_level=1)
        loss = task.loss(model(batch.inputs)[0], batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
    after = test_loss()
    assert after < before / 20, (before, after, time.monotonic() - start)
