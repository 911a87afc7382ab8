"""HAM memory maths against float64 numpy references with explicit loops over batch and
nodes, gradient checks, the hard mode's O(log n) access, REINFORCE and the model contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import memctl.tasks  # noqa: F401  (registers the tasks)
from memctl.models.ham import (
    HAM,
    MLP,
    HAMConfig,
    Search,
    build_tree,
    hard_path,
    hard_write,
    soft_attention,
    soft_read,
    soft_write,
)
from memctl.registry import TASKS

WIDTH, SIGNAL, HIDDEN = 3, 2, 4


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Not torch.testing.assert_close: its first call imports torch.distributed (~10 s).
    np.testing.assert_allclose(actual.detach().numpy(), expected.detach().numpy(), atol=1e-10)


def numpy_mlp(mlp: MLP, x: np.ndarray) -> np.ndarray:
    """One vector through the MLP, in float64 numpy."""
    w1, b1 = mlp.hidden.weight.detach().double().numpy(), mlp.hidden.bias.detach().double().numpy()
    w2, b2 = mlp.out.weight.detach().double().numpy(), mlp.out.bias.detach().double().numpy()
    y = w2 @ np.maximum(w1 @ x + b1, 0) + b2
    return np.tanh(y) if mlp.squash else y


def numpy_search(search: Search, node: np.ndarray, signal: np.ndarray) -> float:
    return float(numpy_mlp(search.mlp, np.concatenate([node, signal]))[0])


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def numpy_tree(leaves: np.ndarray, join: MLP) -> np.ndarray:
    """Heap of every batch element: node e = JOIN(node 2e+1, node 2e+2), one node at a time."""
    batch, count, width = leaves.shape
    tree = np.zeros((batch, 2 * count - 1, width))
    for b in range(batch):
        for i in range(count):
            tree[b, count - 1 + i] = leaves[b, i]
        for e in reversed(range(count - 1)):
            tree[b, e] = numpy_mlp(join, np.concatenate([tree[b, 2 * e + 1], tree[b, 2 * e + 2]]))
    return tree


def numpy_leaf_attention(tree: np.ndarray, signal: np.ndarray, search: Search) -> np.ndarray:
    """a_i = product over the path to leaf i of p_e (right turns) or 1 - p_e (left turns)."""
    batch, nodes, _ = tree.shape
    count = (nodes + 1) // 2
    depth = count.bit_length() - 1
    attention = np.zeros((batch, count))
    for b in range(batch):
        for i in range(count):
            weight, node = 1.0, 0
            for level in reversed(range(depth)):
                p_right = sigmoid(numpy_search(search, tree[b, node], signal[b]))
                right = (i >> level) & 1
                weight *= p_right if right else 1 - p_right
                node = 2 * node + 1 + right
            attention[b, i] = weight
    return attention


@pytest.fixture
def parts() -> tuple[MLP, Search, MLP]:
    torch.manual_seed(0)
    join = MLP(2 * WIDTH, HIDDEN, WIDTH, squash=True).double()
    search = Search(WIDTH, SIGNAL, HIDDEN).double()
    write = MLP(WIDTH + SIGNAL, HIDDEN, WIDTH, squash=True).double()
    return join, search, write


@pytest.mark.parametrize("count", [1, 2, 8])
def test_build_tree_matches_loop_over_nodes(parts, count):
    join, _, _ = parts
    leaves = torch.randn(3, count, WIDTH, dtype=torch.float64)
    tree = build_tree(leaves, join)
    assert tree.shape == (3, 2 * count - 1, WIDTH)
    np.testing.assert_allclose(tree.detach().numpy(), numpy_tree(leaves.numpy(), join), atol=1e-12)


def test_soft_attention_matches_path_products_and_sums_to_one(parts):
    join, search, _ = parts
    tree = build_tree(torch.randn(2, 8, WIDTH, dtype=torch.float64), join)
    signal = torch.randn(2, SIGNAL, dtype=torch.float64)
    attention = soft_attention(tree, signal, search)
    expected = numpy_leaf_attention(tree.detach().numpy(), signal.numpy(), search)
    np.testing.assert_allclose(attention.detach().numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(attention.sum(1).detach().numpy(), 1.0, atol=1e-12)


def test_soft_read_and_write_match_loops():
    leaves = np.random.default_rng(0).normal(size=(2, 4, WIDTH))
    new = np.random.default_rng(1).normal(size=(2, 4, WIDTH))
    attention = np.random.default_rng(2).dirichlet(np.ones(4), size=2)
    read = soft_read(torch.from_numpy(leaves), torch.from_numpy(attention)).numpy()
    written = soft_write(*(torch.from_numpy(a) for a in (leaves, attention, new))).numpy()
    for b in range(2):
        expected_read = sum(attention[b, i] * leaves[b, i] for i in range(4))
        np.testing.assert_allclose(read[b], expected_read, atol=1e-12)
        for i in range(4):
            mixed = (1 - attention[b, i]) * leaves[b, i] + attention[b, i] * new[b, i]
            np.testing.assert_allclose(written[b, i], mixed, atol=1e-12)


def test_hard_path_greedy_follows_the_larger_probability(parts):
    join, search, _ = parts
    tree = build_tree(torch.randn(4, 8, WIDTH, dtype=torch.float64), join)
    signal = torch.randn(4, SIGNAL, dtype=torch.float64)
    leaf, log_prob, entropy = hard_path(tree, signal, search, greedy=True)
    tree_np = tree.detach().numpy()
    for b in range(4):
        node, expected_log_prob, expected_entropy = 0, 0.0, 0.0
        for _ in range(3):
            p = sigmoid(numpy_search(search, tree_np[b, node], signal[b].numpy()))
            right = p > 0.5
            expected_log_prob += math.log(p if right else 1 - p)
            expected_entropy -= p * math.log(p) + (1 - p) * math.log(1 - p)
            node = 2 * node + 1 + right
        assert int(leaf[b]) == node - 7
        assert float(log_prob[b].detach()) == pytest.approx(expected_log_prob, abs=1e-12)
        assert float(entropy[b].detach()) == pytest.approx(expected_entropy, abs=1e-12)


def test_hard_path_samples_with_the_search_probabilities(parts):
    """A one-level tree: the right-turn frequency matches sigma(SEARCH(root, s))."""
    join, search, _ = parts
    tree = build_tree(torch.randn(1, 2, WIDTH, dtype=torch.float64), join).expand(4000, -1, -1)
    signal = torch.randn(1, SIGNAL, dtype=torch.float64).expand(4000, -1)
    torch.manual_seed(1)
    leaf, log_prob, _ = hard_path(tree, signal, search, greedy=False)
    p = sigmoid(numpy_search(search, tree[0, 0].detach().numpy(), signal[0].numpy()))
    assert float(leaf.double().mean()) == pytest.approx(p, abs=0.03)
    expected = torch.where(leaf == 1, math.log(p), math.log(1 - p))
    assert_close(log_prob.detach(), expected.double())


def test_hard_write_recomputes_exactly_the_path(parts):
    join, _, _ = parts
    leaves = torch.randn(3, 8, WIDTH, dtype=torch.float64)
    tree = build_tree(leaves, join).detach()
    before = tree.clone()
    leaf = torch.tensor([0, 5, 7])
    value = torch.randn(3, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        hard_write(tree, leaf, value, join)
    changed = leaves.clone()
    changed[torch.arange(3), leaf] = value
    np.testing.assert_allclose(tree.numpy(), numpy_tree(changed.numpy(), join), atol=1e-12)
    for b in range(3):
        path, node = set(), 7 + int(leaf[b])
        while True:
            path.add(node)
            if node == 0:
                break
            node = (node - 1) // 2
        untouched = [e for e in range(15) if e not in path]
        assert torch.equal(tree[b, untouched], before[b, untouched])


@pytest.mark.parametrize("count", [2, 16, 1024])
def test_hard_access_calls_search_and_join_log2_n_times_on_b_nodes(count):
    config = HAMConfig(mode="hard", tree_size=4, controller_size=3, mlp_hidden=5)
    model = HAM(config, input_size=5, output_size=2)
    batch = 3
    data = torch.zeros(count, batch, 5)
    data[:, :, -2] = 1
    state = model.initial_state(data)
    calls = {"search": [], "join": []}
    model.search.register_forward_hook(lambda m, args, out: calls["search"].append(out.numel()))
    model.join.register_forward_hook(lambda m, args, out: calls["join"].append(out.shape[0]))
    go = torch.zeros(1, batch, 5)
    go[:, :, -1] = 1
    model(go, state)
    depth = int(math.log2(count))
    assert calls["search"] == [batch] * depth
    assert calls["join"] == [batch] * depth


def small_model(mode: str, controller: str = "none") -> HAM:
    torch.manual_seed(0)
    config = HAMConfig(
        mode=mode, controller=controller, tree_size=WIDTH, controller_size=SIGNAL, mlp_hidden=HIDDEN
    )
    return HAM(config, input_size=6, output_size=2).double()


def min_batch(n: int, batch: int = 2, seed: int = 0):
    entry = TASKS.get("min")
    task = entry.cls(entry.config(key_bits=2, value_bits=2, n=n, min_n=1))
    return task, task.sample(batch, torch.Generator().manual_seed(seed), max_level=n, min_level=n)


@pytest.mark.parametrize("controller", ["none", "lstm"])
def test_soft_mode_gradcheck_on_a_tiny_tree(controller):
    model = small_model("soft", controller)
    _, batch = min_batch(n=4)
    inputs = batch.inputs.double()
    items = inputs[:, :, :4].clone().requires_grad_(True)

    def run(items: torch.Tensor) -> torch.Tensor:
        return model(torch.cat((items, inputs[:, :, 4:]), -1))[0]

    assert torch.autograd.gradcheck(run, (items,))


def test_hard_mode_gradcheck_of_read_and_write_through_a_fixed_path(parts):
    join, search, write = parts
    leaves = torch.randn(2, 4, WIDTH, dtype=torch.float64, requires_grad=True)
    signal = torch.randn(2, SIGNAL, dtype=torch.float64)

    def access(leaves: torch.Tensor) -> torch.Tensor:
        tree = build_tree(leaves, join)
        leaf, _, _ = hard_path(tree, signal, search, greedy=True)
        read = tree[torch.arange(2), leaf + 3]
        hard_write(tree, leaf, write(torch.cat((read, signal), -1)), join)
        return torch.cat((read, tree.flatten(1)), -1)

    assert torch.autograd.gradcheck(access, (leaves,))


def test_data_steps_are_leaves_and_padding_is_the_empty_leaf():
    model = small_model("soft")
    _, batch = min_batch(n=3)
    state = model.initial_state(batch.inputs[:3].double())
    assert state.tree.shape == (2, 7, WIDTH)  # 3 items -> 4 leaves
    leaves = state.tree[:, 3:]
    embedded = model.embed(batch.inputs[:3, :, :4].double().transpose(0, 1))
    assert_close(leaves[:, :3], embedded)
    assert_close(leaves[:, 3], model.empty_leaf.expand(2, -1))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_min_leaves_gives_empty_leaves_beyond_the_data_steps(mode):
    torch.manual_seed(0)
    config = HAMConfig(
        mode=mode, tree_size=WIDTH, controller_size=SIGNAL, mlp_hidden=HIDDEN, min_leaves=5
    )
    model = HAM(config, input_size=6, output_size=2).double()
    _, batch = min_batch(n=3)
    state = model.initial_state(batch.inputs[:3].double())
    assert state.tree.shape == (2, 15, WIDTH)  # at least 5 leaves -> 8
    embedded = model.embed(batch.inputs[:3, :, :4].double().transpose(0, 1))
    assert_close(state.tree[:, 7:10], embedded)
    assert_close(state.tree[:, 10:], model.empty_leaf.expand(2, 5, -1))
    assert model.initial_state(batch.inputs[:0].double()).tree.shape == (2, 15, WIDTH)
    stack = TASKS.get("stack")
    task = stack.cls(stack.config(value_bits=4, n=6))
    pushes = task.sample(2, torch.Generator().manual_seed(0), max_level=6, min_level=6)
    outputs, state = model(pushes.inputs.double())
    assert outputs.shape == (12, 2, 2) and state.tree.shape[1] >= 15


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_outputs_are_zero_on_data_steps_and_sequences_are_independent(mode):
    model = small_model(mode).eval()
    _, batch = min_batch(n=4, batch=3)
    inputs = batch.inputs.double()
    outputs, state = model(inputs)
    assert outputs.shape == (5, 3, 2)
    assert torch.equal(outputs[:4], torch.zeros(4, 3, 2, dtype=torch.float64))
    alone, _ = model(inputs[:, 1:2])
    assert_close(alone[:, 0], outputs[:, 1])
    assert state.tree.shape == (3, 7, WIDTH)


@pytest.mark.parametrize("controller", ["none", "lstm"])
def test_state_continues_the_access_phase(controller):
    model = small_model("soft", controller)
    task = TASKS.get("sort").cls(TASKS.get("sort").config(key_bits=2, value_bits=2, n=4))
    batch = task.sample(2, torch.Generator().manual_seed(0), max_level=4, min_level=4)
    inputs = batch.inputs.double()
    whole, _ = model(inputs)
    first, state = model(inputs[:6])
    rest, _ = model(inputs[6:], state)
    assert_close(torch.cat((first, rest)), whole)


def test_hard_mode_trains_every_part_by_task_loss_plus_reinforce():
    model = small_model("hard", "lstm")
    task = TASKS.get("sort").cls(TASKS.get("sort").config(key_bits=2, value_bits=2, n=4))
    batch = task.sample(5, torch.Generator().manual_seed(0), max_level=4, min_level=4)
    outputs, _ = model(batch.inputs.double())
    loss = task.loss(outputs, batch.to(torch.float64))
    sequence_losses = task.sequence_losses(outputs, batch).detach()
    (loss + model.auxiliary_loss(sequence_losses)).backward()
    for name, parameter in model.named_parameters():
        if name != "empty_leaf":
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_auxiliary_loss_is_reinforce_with_baseline_and_entropy():
    model = small_model("hard")
    model.config = model.config.model_copy(update={"entropy_bonus": 0.5, "baseline_weight": 2.0})
    _, batch = min_batch(n=4, batch=3)
    model(batch.inputs.double())
    log_prob, entropy, baseline = (t.detach().numpy() for t in model.paths)
    assert log_prob.shape == (1, 3)
    losses = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    expected = 0.0
    for b in range(3):
        reward = -float(losses[b])
        advantage = reward - baseline[0, b]
        expected += -advantage * log_prob[0, b] - 0.5 * entropy[0, b]
        expected += 2.0 * (baseline[0, b] - reward) ** 2
    assert float(model.auxiliary_loss(losses).detach()) == pytest.approx(expected / 3, abs=1e-12)


def test_auxiliary_loss_is_zero_in_soft_mode_and_in_eval():
    losses = torch.ones(2, dtype=torch.float64)
    _, batch = min_batch(n=4)
    soft = small_model("soft")
    soft(batch.inputs.double())
    assert float(soft.auxiliary_loss(losses)) == 0.0
    hard = small_model("hard").eval()
    first, _ = hard(batch.inputs.double())
    second, _ = hard(batch.inputs.double())
    assert float(hard.auxiliary_loss(losses)) == 0.0
    assert torch.equal(first, second)  # greedy paths in eval mode


@pytest.mark.slow
def test_raw_soft_ham_learns_min():
    torch.manual_seed(0)
    entry = TASKS.get("min")
    task = entry.cls(entry.config(n=8))
    model = HAM(HAMConfig(), task.input_size, task.output_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(400):
        batch = task.sample(50, generator, max_level=8, min_level=8)
        loss = task.loss(model(batch.inputs)[0], batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-50:]) < np.mean(losses[:10]) / 4
