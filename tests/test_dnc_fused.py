"""The DNC's fused implementation (``dnc/fused.py``, the hand-written backwards): the
same numbers as the reference maths of ``addressing.py`` and the numpy loops of
``test_dnc.py`` in float64, gradchecks through every path of the backwards, and the link
workspace's shared buffers and recomputation changing no number."""

from __future__ import annotations

import pytest
import torch

from memctl.models import addressing
from memctl.models.dnc import DNCCore, DNCModel, fused
from tests.test_dnc import (
    BATCH,
    LINK_STEP,
    READS,
    SLOTS,
    WRITES,
    heads_of,
    make_inputs,
    simplex,
)


@pytest.fixture
def inputs():
    return make_inputs()


@pytest.mark.parametrize("writes", [1, WRITES])
def test_link_step_gradcheck(inputs, writes):
    x = heads_of(inputs, writes)
    args = tuple(x[n].clone().requires_grad_() for n in LINK_STEP)
    assert torch.autograd.gradcheck(fused.link_step, args)


def content_inputs(generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Memory with a zero row (norm sqrt(EPSILON)), keys, strengths with a zero."""
    memory = torch.randn(BATCH, SLOTS, 4, dtype=torch.float64, generator=generator)
    memory[0, 1] = 0
    keys = torch.randn(BATCH, READS, 4, dtype=torch.float64, generator=generator)
    strengths = 3 * torch.rand(BATCH, READS, dtype=torch.float64, generator=generator)
    strengths[1, 0] = 0
    return memory, keys, strengths


def test_fused_content_weights_equal_content_weights():
    memory, keys, strengths = content_inputs(torch.Generator().manual_seed(2))
    weights = fused.content_weights(memory, keys, strengths)
    torch.testing.assert_close(
        weights, addressing.content_weights(memory, keys, strengths), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("needs_grad", [(True, True, True), (False, True, False)])
def test_fused_content_weights_gradcheck(needs_grad):
    tensors = content_inputs(torch.Generator().manual_seed(3))
    args = tuple(t.requires_grad_(n) for t, n in zip(tensors, needs_grad, strict=True))
    assert torch.autograd.gradcheck(fused.content_weights, args)


@pytest.mark.parametrize("outputs", [(0,), (1, 2), (0, 2)])
@pytest.mark.parametrize("needs_grad", [(True,) * 4, (False, True, False, True)])
def test_link_step_gradcheck_through_the_diagonal_and_unused_outputs(inputs, outputs, needs_grad):
    # A link with a nonzero diagonal: the update zeroes it, so no gradient may pass there.
    # Outputs left unused get no gradient (None, not zeros), and inputs without
    # requires_grad are skipped: both are paths of the hand-written backward.
    x = {**inputs, "link": inputs["link"] + torch.eye(SLOTS, dtype=torch.float64)}
    args = tuple(x[n].clone().requires_grad_(g) for n, g in zip(LINK_STEP, needs_grad, strict=True))

    def used(*args):
        results = fused.link_step(*args)
        return tuple(results[i] for i in outputs)

    assert torch.autograd.gradcheck(used, args)


def sequence_gradients(model: DNCModel, inputs: torch.Tensor, chunks: int):
    """Outputs and gradients (parameters, inputs) of a loss on every output and the final
    link, the inputs run in ``chunks`` calls carrying the state (not detached)."""
    model.zero_grad()
    inputs = inputs.clone().requires_grad_()
    state, outputs = None, []
    for part in inputs.chunk(chunks):
        output, state = model(part, state)
        outputs.append(output)
    outputs = torch.cat(outputs)
    (outputs.sin().sum() + state.access[0].link.square().sum()).backward()
    return [outputs.detach(), inputs.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("writes", "layers", "shared"), [(1, 1, True), (2, 1, True), (1, 2, True), (1, 2, False)]
)
@pytest.mark.parametrize("chunks", [1, 2])
def test_link_workspace_and_recomputation_change_no_number(
    monkeypatch, writes, layers, shared, chunks
):
    # Eager runs share buffers across a sequence's link steps and, for large memories,
    # keep every k-th link matrix and recompute the rest backward. Forced on at this size
    # (k = 3, 8 steps: a stretch cut short at the end), against steps that keep every
    # matrix and allocate their own (the step function called without workspaces). Two
    # layers sharing one memory make two link steps a time step in one workspace.
    monkeypatch.setattr(fused, "CHECKPOINT_MIN_ELEMENTS", 0)
    monkeypatch.setattr(fused, "CHECKPOINT_EVERY", 3)
    monkeypatch.setenv("MEMCTL_NATIVE", "0")  # the workspaces are the PyTorch path's
    torch.manual_seed(0)
    model = DNCCore(
        3,
        2,
        hidden_size=5,
        memory_size=4,
        word_size=3,
        read_heads=2,
        write_heads=writes,
        num_layers=layers,
        share_memory=shared,
    ).double()
    inputs = torch.randn(8, 2, 3, dtype=torch.float64)
    shared = sequence_gradients(model, inputs, chunks)
    model._step = lambda projected, state: model.step(projected, state)
    plain = sequence_gradients(model, inputs, chunks)
    for a, b in zip(shared, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # evaluation: every link matrix into the alternating buffers
        model._step = model.step
        torch.testing.assert_close(model(inputs)[0], shared[0], rtol=1e-12, atol=1e-12)


def test_link_workspace_starts_a_chain_from_a_buffer_it_will_overwrite():
    # Steps without autograd write into the workspace's two alternating buffers; a step
    # with autograd after them must keep its own copy of its input for the recomputation.
    generator = torch.Generator().manual_seed(4)
    steps = [
        (simplex(generator, 2, 1, SLOTS, total=0.9), torch.rand(2, 1, SLOTS, dtype=torch.float64))
        for _ in range(7)
    ]
    reads = simplex(generator, 2, READS, SLOTS)

    def run(workspace):
        link = torch.zeros(2, 1, SLOTS, SLOTS, dtype=torch.float64)
        weights = [w.clone().requires_grad_() for w, _ in steps]
        total = 0
        for index, ((_, precedence), w) in enumerate(zip(steps, weights, strict=True)):
            with torch.set_grad_enabled(index >= 2):
                link, forward, backward = fused.link_step(link, w, precedence, reads, workspace)
            total = total + forward.sin().sum() + backward.square().sum()
        total.backward()
        return [w.grad for w in weights[2:]]

    shared = run(fused.LinkWorkspace(checkpoint_every=3, min_elements=0))
    for a, b in zip(shared, run(None), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
