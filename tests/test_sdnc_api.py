"""memctl.models.SDNC as a drop-in for pytorch-dnc's SDNC (PyPI ``dnc`` 1.1.0): parameter
counts, the call and what it returns, the link and precedence views, carrying and
resetting the memory, debug views, finite gradients, the OMP_WAIT_POLICY warning, and
example scripts written from pytorch-dnc's README usage."""

from __future__ import annotations

import inspect
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch

from memctl.models import SAM, SDNC
from memctl.models.sparse import compat
from memctl.models.sparse.access import MemoryMovedOn

EXAMPLES = Path(__file__).parent / "sdnc_examples"

# (arguments, memctl's parameter count, pytorch-dnc 1.1.0's). pytorch-dnc's measured by
# constructing its SDNC from dnc==1.1.0 with torch 2.13.0 in a venv of their own. They
# differ by design in the interface only: memctl has one read strength per head, one
# interpolation gate and 3 read modes per head (the paper's and the DNC's), pytorch-dnc no
# strengths or modes and one interpolation gate per visible row (R K + 2 K_L + 1), so
# pytorch-dnc's has R K + 2 K_L - 4 R more outputs, each with hidden_size + 1 parameters,
# per memory (fewer where that is negative).
PARAMETERS = [
    (
        dict(
            input_size=64,
            hidden_size=128,
            rnn_type="lstm",
            num_layers=4,
            nr_cells=100,
            cell_size=32,
            read_heads=4,
            sparse_reads=4,
            batch_first=True,
            gpu_id=-1,
        ),
        1_325_554,
        1_326_586,
    ),
    (dict(input_size=6, hidden_size=64, nr_cells=100, cell_size=10, read_heads=4), 67_002, 67_522),
    (
        dict(
            input_size=8,
            hidden_size=32,
            rnn_type="gru",
            num_layers=2,
            nr_cells=50,
            cell_size=8,
            read_heads=2,
            sparse_reads=3,
            temporal_reads=2,
            share_memory=False,
        ),
        28_748,
        28_880,
    ),
    (
        dict(
            input_size=8,
            hidden_size=32,
            rnn_type="rnn",
            num_layers=1,
            num_hidden_layers=3,
            nr_cells=16,
            cell_size=8,
            read_heads=1,
            bias=False,
        ),
        6_686,
        6_950,
    ),
    (
        dict(
            input_size=6,
            hidden_size=64,
            independent_linears=True,
            nr_cells=100,
            cell_size=10,
            read_heads=4,
        ),
        67_002,
        67_522,
    ),
    (
        dict(
            input_size=6,
            hidden_size=32,
            nr_cells=100,
            cell_size=10,
            read_heads=1,
            sparse_reads=10,
            temporal_reads=4,
        ),
        15_964,
        16_426,
    ),
    (dict(input_size=5, hidden_size=10), 4_163, 4_251),
]


@pytest.mark.parametrize(("kwargs", "ours", "peer"), PARAMETERS)
def test_parameter_count_is_pinned_against_pytorch_dnc(kwargs, ours, peer):
    assert sum(p.numel() for p in SDNC(**kwargs).parameters()) == ours
    heads = kwargs.get("read_heads", 4)
    reads, temporal = kwargs.get("sparse_reads", 4), kwargs.get("temporal_reads", 4)
    memories = 1 if kwargs.get("share_memory", True) else kwargs["num_layers"]
    outputs = heads * reads + 2 * temporal - 4 * heads
    assert peer - ours == outputs * (kwargs["hidden_size"] + 1) * memories


def test_constructor_takes_pytorch_dnc_arguments_in_order():
    # pytorch-dnc 1.1.0's SDNC: SAM's arguments with temporal_reads after sparse_reads.
    names = list(inspect.signature(SDNC).parameters)
    sam = [n for n in inspect.signature(SAM).parameters if n != "core_options"]
    assert names[: len(sam) + 1] == [*sam[:11], "temporal_reads", *sam[11:]]
    rnn = SDNC(5, 8, "lstm", 1, 2, True, True, 0, False, 12, 3, 2, 1, 4)
    memory = rnn.memories[0]
    assert (memory.memory_size, memory.sparse_reads, memory.temporal_reads) == (12, 3, 2)
    assert (memory.read_heads, memory.word_size) == (1, 4)


def test_reads_are_clamped_to_the_memory_size_as_pytorch_dnc_does():
    memory = SDNC(input_size=3, hidden_size=4, nr_cells=3, sparse_reads=5, temporal_reads=6)
    assert (memory.memories[0].sparse_reads, memory.memories[0].temporal_reads) == (3, 3)


def small_sdnc(**kwargs) -> SDNC:
    torch.manual_seed(0)
    defaults = dict(input_size=5, hidden_size=8, nr_cells=12, cell_size=4, read_heads=2)
    defaults.update(sparse_reads=3, temporal_reads=2)
    return SDNC(**{**defaults, **kwargs})


KEYS = {
    # key: shape for batch 3, N = 12, W = 4, R = 2, K = 3, K_L = 2 (S = 7, C = 15)
    "memory": (3, 12, 4),
    "visible_memory": (3, 15, 4),
    "read_weights": (3, 12),
    "write_weights": (3, 12),
    "read_vectors": (3, 2, 4),
    "least_used_mem": (3, 1),
    "usage": (3, 12),
    "read_positions": (3, 15),
    "link_matrix": (3, 12, 2),
    "link_positions": (3, 12, 2),
    "rev_link_matrix": (3, 12, 2),
    "rev_link_positions": (3, 12, 2),
    "precedence": (3, 12),
    "sparse_read_weights": (3, 2, 7),
    "token": (),
    "version": (),
    "link_token": (),
    "link_version": (),
    "precedence_positions": (3, 2),
    "sparse_precedence": (3, 2),
}


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_call_returns_pytorch_dnc_structures(rnn_type, batch_first):
    rnn = small_sdnc(rnn_type=rnn_type, num_layers=2, batch_first=batch_first)
    batch, steps = 3, 7
    x = torch.randn(batch, steps, 5) if batch_first else torch.randn(steps, batch, 5)
    output, (controller_hidden, memory, read_vectors) = rnn(
        x, (None, None, None), reset_experience=True
    )
    assert output.shape == x.shape
    assert len(controller_hidden) == 2
    for layer in controller_hidden:
        parts = layer if rnn_type == "lstm" else (layer,)
        assert all(part.shape == (2, batch, 8) for part in parts)
    assert {key: tuple(value.shape) for key, value in memory.items()} == KEYS
    assert read_vectors.shape == (batch, 8)


def dense_from_entries(values, positions, slots):
    """``[B, N, K_L]`` entries naming slots (N: none) -> dense ``[B, N, N]``."""
    dense = torch.zeros(values.shape[0], slots, slots + 1, dtype=values.dtype)
    return dense.scatter_add_(2, positions, values)[..., :slots]


def test_memory_dict_views_agree_with_the_memory_and_the_link():
    rnn = small_sdnc().double()
    _, (_, memory, read_vectors) = rnn(torch.randn(3, 9, 5, dtype=torch.float64))
    positions = memory["read_positions"]
    rows = memory["memory"].gather(1, positions.unsqueeze(2).expand(-1, -1, 4))
    torch.testing.assert_close(memory["visible_memory"], rows)
    torch.testing.assert_close(memory["read_vectors"].flatten(1), read_vectors.detach())
    assert torch.equal(positions[:, -1:], memory["least_used_mem"])
    # Read weights: the heads' mean of each head's weights over its S rows.
    weights = memory["sparse_read_weights"].detach()
    expected = torch.zeros(3, 12, dtype=torch.float64)
    expected.scatter_add_(1, positions[:, :-1], weights.flatten(1) / 2)
    torch.testing.assert_close(memory["read_weights"], expected)
    assert bool((memory["write_weights"].sum(1) < 1).all())
    # The link's rows and columns are both views of the link SparseLink holds.
    by_rows, by_columns = rnn.memories[0].link.dense()
    link = dense_from_entries(memory["link_matrix"], memory["link_positions"], 12)
    reverse = dense_from_entries(memory["rev_link_matrix"], memory["rev_link_positions"], 12)
    torch.testing.assert_close(link, by_rows)
    torch.testing.assert_close(reverse.transpose(1, 2), by_columns)
    torch.testing.assert_close(reverse.transpose(1, 2), link)
    assert bool((link > 0).any()), "nine steps leave links"
    assert int((link > 0).sum(2).max()) <= 2 and int((link > 0).sum(1).max()) <= 2
    precedence = torch.zeros(3, 13, dtype=torch.float64)
    precedence.scatter_add_(1, memory["precedence_positions"], memory["sparse_precedence"].detach())
    torch.testing.assert_close(memory["precedence"], precedence[:, :12])
    assert not memory["precedence"].requires_grad and not memory["link_matrix"].requires_grad
    assert memory["sparse_precedence"].requires_grad


def test_separate_memories_come_back_as_a_list():
    rnn = small_sdnc(num_layers=3, share_memory=False)
    _, (_, memory, _) = rnn(torch.randn(2, 4, 5))
    assert isinstance(memory, list) and len(memory) == 3
    assert set(memory[0]) == set(KEYS)
    assert not torch.equal(memory[0]["link_matrix"], memory[1]["link_matrix"])


@pytest.mark.parametrize("share_memory", [True, False])
def test_carrying_the_hidden_state_equals_one_long_call(share_memory):
    rnn = small_sdnc(num_layers=2, share_memory=share_memory).double()
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    whole, (_, memory, _) = rnn(x)
    kept = ("memory", "link_matrix", "link_positions", "precedence")
    whole_memories = [
        {key: m[key].clone() for key in kept} for m in ([memory] if share_memory else memory)
    ]
    first, hidden = rnn(x[:, :4])
    second, (_, memory, _) = rnn(x[:, 4:], hidden)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    for carried, expected in zip([memory] if share_memory else memory, whole_memories, strict=True):
        for key in kept:
            torch.testing.assert_close(carried[key], expected[key])
    # One backward through both calls reaches the first call's steps.
    (first.sum() + second.sum()).backward()
    assert all(p.grad is not None for p in rnn.parameters())


def test_carrying_a_detached_memory_dict_as_the_copy_task_does():
    rnn = small_sdnc().double()
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    whole, _ = rnn(x)
    first, (controller_hidden, memory, read_vectors) = rnn(x[:, :4])
    first.sum().backward()
    detached = {key: value.detach() for key, value in memory.items()}
    controller_hidden = [tuple(part.detach() for part in layer) for layer in controller_hidden]
    carried = (controller_hidden, detached, read_vectors.detach())
    second, _ = rnn(x[:, 4:], carried)
    torch.testing.assert_close(second, whole[:, 4:])
    second.sum().backward()  # a new chunk: its own backward, after the first's


def test_a_memory_dict_the_memory_moved_on_from_is_refused():
    rnn = small_sdnc()
    x = torch.randn(2, 4, 5)
    _, (_, old, _) = rnn(x)
    rnn(x)
    with pytest.raises(MemoryMovedOn, match="version"):
        rnn(x, (None, old, None))
    rnn(x, (None, old, None), reset_experience=True)  # a reset needs no carried state


def test_a_memory_dict_of_another_batch_size_is_refused():
    rnn = small_sdnc()
    _, (_, memory, _) = rnn(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="SDNC: the memory carried on from has another batch"):
        rnn(torch.randn(3, 4, 5), (None, memory, None))


def test_reset_experience_empties_the_memory_and_the_link():
    rnn = small_sdnc().double()
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    fresh, (controller_hidden, memory, read_vectors) = rnn(x)
    fresh_link = memory["link_matrix"]
    kept, _ = rnn(x, (None, memory, None), reset_experience=False)
    assert not torch.allclose(kept, fresh)
    _, (_, memory, _) = rnn(x)
    reset, (_, memory, _) = rnn(x, (None, memory, None), reset_experience=True)
    torch.testing.assert_close(reset, fresh)
    torch.testing.assert_close(memory["link_matrix"], fresh_link)
    _, (_, memory, _) = rnn(x)
    with_controller, _ = rnn(x, (controller_hidden, memory, read_vectors), reset_experience=True)
    assert not torch.allclose(with_controller, reset)


@pytest.mark.parametrize("share_memory", [True, False])
def test_debug_views_follow_the_memory(share_memory):
    rnn = small_sdnc(num_layers=2, share_memory=share_memory, debug=True).double()
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    _, (_, memory, _), views = rnn(x[:, :2])
    _, (_, memory, _), views = rnn(x[:, 2:], (None, memory, None))  # carried on
    assert {key: value.shape for key, value in views.items()} == {
        "memory": (8, 48),
        "visible_memory": (8, 60),
        "read_weights": (8, 12),
        "write_weights": (8, 12),
        "read_vectors": (8, 8),
        "least_used_mem": (8, 1),
        "usage": (8, 12),
        "read_positions": (8, 15),
        "link_matrix": (8, 24),
        "link_positions": (8, 24),
        "rev_link_matrix": (8, 24),
        "rev_link_positions": (8, 24),
        "precedence": (8, 12),
    }
    # The last row of each layer's memory is batch element 0 of that memory's dict.
    memories = [memory, memory] if share_memory else memory
    last_rows = {1: memories[1]} if share_memory else {0: memories[0], 1: memories[1]}
    for layer, hidden in last_rows.items():
        row = 6 + layer
        for key in views:
            expected = hidden[key][0].flatten().numpy()
            assert views[key][row] == pytest.approx(expected, abs=1e-12), key
    # Rows change as the link fills: an earlier row is not the last one.
    assert views["link_matrix"][0] != pytest.approx(views["link_matrix"][-1])
    # Without debug no views are kept.
    assert all(m.views is None for m in rnn.memories)


def test_gradients_are_finite_over_a_hundred_steps():
    torch.manual_seed(1)
    rnn = SDNC(input_size=9, hidden_size=32, nr_cells=256, cell_size=16, read_heads=2)
    x = torch.randn(4, 100, 9)
    hidden = (None, None, None)
    for _ in range(2):
        output, (_, memory, _) = rnn(x, hidden, reset_experience=True)
        (output**2).mean().backward()
        hidden = (None, {k: v.detach() for k, v in memory.items()}, None)
    grads = [p.grad for p in rnn.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_the_wait_policy_warning_comes_once(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(compat, "_wait_policy_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small_sdnc()
        small_sdnc()
        SAM(input_size=3, hidden_size=4)
    assert [str(w.message).split(":")[0] for w in caught] == ["SDNC"]
    assert "OMP_WAIT_POLICY=PASSIVE" in str(caught[0].message)
    monkeypatch.setattr(compat, "_wait_policy_warned", False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small_sdnc()
    assert caught == []


def test_unsupported_arguments_are_refused():
    with pytest.raises(ValueError, match="bidirectional"):
        SDNC(input_size=3, hidden_size=4, bidirectional=True)
    with pytest.raises(ValueError, match="rnn_type"):
        SDNC(input_size=3, hidden_size=4, rnn_type="transformer")
    with pytest.raises(ValueError, match="pass_through_memory"):
        small_sdnc()(torch.randn(2, 3, 5), pass_through_memory=False)
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(3, 5)])
    with pytest.raises(TypeError, match="PackedSequence"):
        small_sdnc()(packed)


def test_memctl_options_reach_the_memories():
    big = SDNC(input_size=3, hidden_size=4, nr_cells=2**17)
    assert type(big.memories[0].index).__name__ == "AutoIndex"
    exact = SDNC(input_size=3, hidden_size=4, nr_cells=2**17, index="exact")
    assert type(exact.memories[0].index).__name__ == "ExactIndex"


def run_example(name: str, capsys, monkeypatch, *args: str) -> str:
    """Run an example script as ``__main__`` in this process (no second torch import)."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_readme_usage_example(capsys, monkeypatch):
    # pytorch-dnc 1.1.0's keys (sparse_temporal_memory.py's reset); the shapes memctl's:
    # C = R (K + 2 K_L) + 1 = 49 visible rows (pytorch-dnc's R K + 2 K_L + 1 = 25), the link
    # as K_L = 4 entries per row (pytorch-dnc's [B, N, 2 K_L]), the precedence over N
    # slots (pytorch-dnc's over its 2 K_L temporal rows).
    assert run_example("readme_usage.py", capsys, monkeypatch).splitlines() == [
        "output (10, 4, 64)",
        "controller_hidden 4 (2, 10, 128)",
        "memory (10, 100, 32)",
        "visible_memory (10, 49, 32)",
        "link_matrix (10, 100, 4)",
        "rev_link_matrix (10, 100, 4)",
        "precedence (10, 100)",
        "read_weights (10, 100)",
        "write_weights (10, 100)",
        "read_vectors (10, 4, 32)",
        "least_used_mem (10, 1)",
        "usage (10, 100)",
        "read_positions (10, 49)",
        "read_vectors (10, 128)",
    ]


def test_readme_debug_example(capsys, monkeypatch):
    # pytorch-dnc 1.1.0's sdnc.py _debug keys (4 steps x 4 layers rows, batch element 0)
    # and the link's positions.
    assert run_example("readme_debug.py", capsys, monkeypatch).splitlines() == [
        "least_used_mem ndarray (16, 1)",
        "link_matrix ndarray (16, 400)",
        "link_positions ndarray (16, 400)",
        "memory ndarray (16, 3200)",
        "precedence ndarray (16, 100)",
        "read_positions ndarray (16, 49)",
        "read_vectors ndarray (16, 128)",
        "read_weights ndarray (16, 100)",
        "rev_link_matrix ndarray (16, 400)",
        "rev_link_positions ndarray (16, 400)",
        "usage ndarray (16, 100)",
        "visible_memory ndarray (16, 1568)",
        "write_weights ndarray (16, 100)",
    ]


@pytest.mark.slow
def test_copy_training_script(capsys, monkeypatch):
    output = run_example("copy_training.py", capsys, monkeypatch, "60")
    first, last = (float(value) for value in output.split()[4::5])
    assert last < 0.8 * first
