"""The hard HAM ``path`` backend (``memctl/models/ham_tree.py``) against the reference (plain
autograd on the heap tensor): the same values and gradients in float64 for the same
sampled paths, gradcheck, and no tree-sized tensor built per training access."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import memctl.tasks  # noqa: F401  (registers the tasks)
from memctl.models.ham import HAM, MLP, HAMConfig, build_tree, hard_write
from memctl.models.ham_tree import HardTree
from memctl.registry import TASKS

WIDTH = 3


def model_pair(controller: str) -> tuple[HAM, HAM]:
    """The same weights, hard mode, one per backend."""
    models = []
    for backend in ("reference", "path"):
        torch.manual_seed(0)
        config = HAMConfig(
            mode="hard",
            controller=controller,
            tree_size=WIDTH,
            controller_size=2,
            mlp_hidden=4,
            backend=backend,
        )
        models.append(HAM(config, input_size=6, output_size=2).double())
    return models[0], models[1]


def sort_batch(n: int, batch: int = 4):
    entry = TASKS.get("sort")
    task = entry.cls(entry.config(key_bits=2, value_bits=2, n=n, min_n=1))
    sample = task.sample(batch, torch.Generator().manual_seed(0), max_level=n, min_level=2)
    return task, sample.to(torch.float64)


def training_step(model: HAM, task, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sampled paths from seed 7: task loss plus REINFORCE, backward; outputs and grads."""
    torch.manual_seed(7)
    outputs, state = model(batch.inputs)
    loss = task.loss(outputs, batch) + model.auxiliary_loss(
        task.sequence_losses(outputs, batch).detach()
    )
    (loss + state.tree.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return torch.cat((outputs.flatten(), state.tree.flatten())), grads


@pytest.mark.parametrize("controller", ["none", "lstm"])
def test_path_backend_matches_the_reference_values_and_gradients(controller):
    reference, path = model_pair(controller)
    task, batch = sort_batch(n=7)
    expected, expected_grads = training_step(reference, task, batch)
    actual, grads = training_step(path, task, batch)
    assert torch.equal(reference.paths.log_prob, path.paths.log_prob)  # same sampled paths
    np.testing.assert_allclose(actual.detach().numpy(), expected.detach().numpy(), atol=1e-12)
    for name, grad in expected_grads.items():
        np.testing.assert_allclose(grads[name].numpy(), grad.numpy(), atol=1e-10, err_msg=name)
        assert name == "empty_leaf" or grad.abs().sum() > 0, name


def test_path_backend_matches_the_reference_in_eval_and_when_continued():
    reference, path = model_pair("lstm")
    _, batch = sort_batch(n=5)
    with torch.no_grad():
        first = [model.eval()(batch.inputs[:7]) for model in (reference, path)]
        rest = [
            model(batch.inputs[7:], state)[0]
            for model, (_, state) in zip((reference, path), first, strict=True)
        ]
    np.testing.assert_allclose(first[1][0].numpy(), first[0][0].numpy(), atol=1e-12)
    np.testing.assert_allclose(rest[1].numpy(), rest[0].numpy(), atol=1e-12)


def parts() -> tuple[MLP, MLP]:
    torch.manual_seed(0)
    join = MLP(2 * WIDTH, 4, WIDTH, squash=True).double()
    write = MLP(2 * WIDTH, 4, WIDTH, squash=True).double()
    return join, write


def accesses(leaves: torch.Tensor, path_backend: bool) -> torch.Tensor:
    """Three fixed accesses (read a leaf, write WRITE(read, leaf 0), JOIN up); every read
    and the final heap, flattened."""
    join, write = parts()
    tree = build_tree(leaves, join)
    tree = HardTree(tree) if path_backend else tree.clone()
    batch = torch.arange(leaves.shape[0])
    reads = []
    for leaf in ([1, 3], [3, 3], [0, 2]):
        leaf = torch.tensor(leaf)
        rows = (leaf + leaves.shape[1] - 1).unsqueeze(1)
        read = tree.read(rows).squeeze(1) if path_backend else tree[batch, rows.squeeze(1)]
        other = tree.read(rows * 0 + 3).squeeze(1) if path_backend else tree[batch, 3]
        value = write(torch.cat((read, other), -1))
        if path_backend:
            tree.write_path(leaf, value, join)
        else:
            hard_write(tree, leaf, value, join)
        reads.append(read)
    final = tree.finish() if path_backend else tree
    return torch.cat([*reads, final.flatten(1)], -1)


def test_path_accesses_pass_gradcheck_and_match_the_reference():
    leaves = torch.randn(2, 4, WIDTH, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: accesses(x, True), (leaves,))
    np.testing.assert_allclose(
        accesses(leaves, True).detach().numpy(),
        accesses(leaves, False).detach().numpy(),
        atol=1e-12,
    )


def test_a_second_backward_through_a_retained_graph_starts_from_zero():
    leaves = torch.randn(2, 4, WIDTH, dtype=torch.float64, requires_grad=True)
    output = accesses(leaves, True).sum()
    (first,) = torch.autograd.grad(output, leaves, retain_graph=True)
    (second,) = torch.autograd.grad(output, leaves)
    assert torch.equal(first, second)


class LargeTensors(TorchDispatchMode):
    """Counts the operations (forward and backward) that build a new tensor of ``size`` or
    more elements (not in-place updates or views of their inputs)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.count = size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [*args, *(kwargs or {}).values()]
        storages = {a.untyped_storage().data_ptr() for a in inputs if isinstance(a, torch.Tensor)}
        results = out if isinstance(out, (tuple, list)) else (out,)
        self.count += any(
            isinstance(r, torch.Tensor)
            and r.numel() >= self.size
            and r.untyped_storage().data_ptr() not in storages
            for r in results
        )
        return out


def large_tensors_of_training(backend: str, accesses: int, count: int = 256) -> int:
    config = HAMConfig(mode="hard", tree_size=4, controller_size=3, mlp_hidden=5, backend=backend)
    model = HAM(config, input_size=5, output_size=2)
    data = torch.zeros(count, 2, 5)
    data[:, :, -2] = 1
    with torch.no_grad():
        tree = model.initial_state(data).tree
    state = model.initial_state(data[:0])._replace(tree=tree.requires_grad_(True))
    state = state._replace(read=tree.new_zeros(2, 4))
    go = torch.zeros(accesses, 2, 5)
    go[:, :, -1] = 1
    with LargeTensors(size=count) as counter:
        outputs, _ = model(go, state)
        (outputs.sum() + model.auxiliary_loss(torch.zeros(2))).backward()
    return counter.count


def test_path_backend_builds_no_tree_sized_tensor_per_access():
    path = [large_tensors_of_training("path", accesses) for accesses in (1, 6)]
    reference = [large_tensors_of_training("reference", accesses) for accesses in (1, 6)]
    assert path[0] == path[1]  # a constant per sequence: the copy, the final heap, G
    assert reference[1] > reference[0] + 5  # the reference builds several per access


def test_describe_backend_names_the_choice():
    reference, path = model_pair("none")
    assert path.describe_backend(8).startswith("path")
    assert reference.describe_backend(8).startswith("reference")
    soft = HAM(HAMConfig(mode="soft"), input_size=6, output_size=2)
    assert soft.describe_backend(8).startswith("reference")
