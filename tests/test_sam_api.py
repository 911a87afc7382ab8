"""memctl.models.SAM as a drop-in for pytorch-dnc's SAM (PyPI ``dnc`` 1.1.0): parameter
counts, the call and what it returns, carrying and resetting the memory, debug views, the
OMP_WAIT_POLICY warning, and example scripts written from pytorch-dnc's README usage."""

from __future__ import annotations

import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch

from memctl.models import SAM
from memctl.models.sparse import compat
from memctl.models.sparse.access import MemoryMovedOn

EXAMPLES = Path(__file__).parent / "sam_examples"

# (arguments, memctl's parameter count, pytorch-dnc 1.1.0's). pytorch-dnc's measured by
# constructing its SAM from the unpacked wheel (pip download dnc==1.1.0 --no-deps) with
# torch 2.13.0. They differ by design in the interface only: memctl has one read strength
# per head and one interpolation gate (the paper's), pytorch-dnc one interpolation gate
# per visible row and no strengths, so memctl's has R (K - 1) fewer outputs, each with
# hidden_size + 1 parameters, per memory.
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
        1_324_006,
        1_325_554,
    ),
    (dict(input_size=6, hidden_size=64, nr_cells=100, cell_size=10, read_heads=4), 66_222, 67_002),
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
            share_memory=False,
        ),
        28_352,
        28_616,
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
        6_587,
        6_686,
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
        66_222,
        67_002,
    ),
    (dict(input_size=5, hidden_size=10), 4_031, 4_163),
]


@pytest.mark.parametrize(("kwargs", "ours", "peer"), PARAMETERS)
def test_parameter_count_is_pinned_against_pytorch_dnc(kwargs, ours, peer):
    assert sum(p.numel() for p in SAM(**kwargs).parameters()) == ours
    heads, reads = kwargs.get("read_heads", 4), kwargs.get("sparse_reads", 4)
    memories = 1 if kwargs.get("share_memory", True) else kwargs["num_layers"]
    assert peer - ours == heads * (reads - 1) * (kwargs["hidden_size"] + 1) * memories


def small_sam(**kwargs) -> SAM:
    torch.manual_seed(0)
    defaults = dict(input_size=5, hidden_size=8, nr_cells=12, cell_size=4, read_heads=2)
    defaults["sparse_reads"] = 3
    return SAM(**{**defaults, **kwargs})


KEYS = {
    # key: shape for batch 3, N = 12, W = 4, R = 2, K = 3 (C = 7)
    "memory": (3, 12, 4),
    "visible_memory": (3, 7, 4),
    "read_weights": (3, 12),
    "write_weights": (3, 12),
    "read_vectors": (3, 2, 4),
    "least_used_mem": (3, 1),
    "usage": (3, 12),
    "read_positions": (3, 7),
    "sparse_read_weights": (3, 2, 3),
    "token": (),
    "version": (),
}


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_call_returns_pytorch_dnc_structures(rnn_type, batch_first):
    rnn = small_sam(rnn_type=rnn_type, num_layers=2, batch_first=batch_first)
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


def test_memory_dict_views_agree_with_the_memory():
    rnn = small_sam().double()
    _, (_, memory, read_vectors) = rnn(torch.randn(3, 9, 5, dtype=torch.float64))
    positions = memory["read_positions"]
    rows = memory["memory"].gather(1, positions.unsqueeze(2).expand(-1, -1, 4))
    torch.testing.assert_close(memory["visible_memory"], rows)
    torch.testing.assert_close(memory["read_vectors"].flatten(1), read_vectors.detach())
    assert torch.equal(positions[:, -1:], memory["least_used_mem"])
    # The least used slot has the largest usage, the lowest such slot on ties.
    usage = memory["usage"]
    largest = usage == usage.max(1, keepdim=True).values
    assert torch.equal(largest.long().argmax(1, keepdim=True), memory["least_used_mem"])
    # Read weights: the heads' mean, so they sum to 1; write weights sum to the gate < 1.
    torch.testing.assert_close(memory["read_weights"].sum(1), torch.ones(3, dtype=torch.float64))
    assert bool((memory["write_weights"].sum(1) < 1).all())
    assert not memory["read_weights"].requires_grad
    assert memory["sparse_read_weights"].requires_grad


def test_separate_memories_come_back_as_a_list():
    rnn = small_sam(num_layers=3, share_memory=False)
    _, (_, memory, _) = rnn(torch.randn(2, 4, 5))
    assert isinstance(memory, list) and len(memory) == 3
    assert not torch.equal(memory[0]["memory"], memory[1]["memory"])


@pytest.mark.parametrize("share_memory", [True, False])
def test_carrying_the_hidden_state_equals_one_long_call(share_memory):
    rnn = small_sam(num_layers=2, share_memory=share_memory).double()
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    whole, (_, memory, _) = rnn(x)
    # The dict's memory is the live buffer: copied to keep what the long call left.
    whole_memories = [m["memory"].clone() for m in ([memory] if share_memory else memory)]
    first, hidden = rnn(x[:, :4])
    second, (_, memory, _) = rnn(x[:, 4:], hidden)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    for carried, expected in zip([memory] if share_memory else memory, whole_memories, strict=True):
        torch.testing.assert_close(carried["memory"], expected)
    # One backward through both calls reaches the first call's steps.
    (first.sum() + second.sum()).backward()
    assert all(p.grad is not None for p in rnn.parameters())


def test_carrying_a_detached_memory_dict_as_the_copy_task_does():
    rnn = small_sam().double()
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
    rnn = small_sam()
    x = torch.randn(2, 4, 5)
    _, (_, old, _) = rnn(x)
    rnn(x)
    with pytest.raises(MemoryMovedOn, match="version"):
        rnn(x, (None, old, None))
    rnn(x, (None, old, None), reset_experience=True)  # a reset needs no carried state


def test_reset_experience_empties_the_memory_only():
    rnn = small_sam().double()
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    fresh, (controller_hidden, memory, read_vectors) = rnn(x)
    kept, _ = rnn(x, (None, memory, None), reset_experience=False)
    assert not torch.allclose(kept, fresh)
    _, (_, memory, _) = rnn(x)
    reset, _ = rnn(x, (None, memory, None), reset_experience=True)
    torch.testing.assert_close(reset, fresh)
    _, (_, memory, _) = rnn(x)
    with_controller, _ = rnn(x, (controller_hidden, memory, read_vectors), reset_experience=True)
    assert not torch.allclose(with_controller, reset)


def test_same_input_same_output():
    rnn = small_sam()
    x = torch.randn(2, 5, 5)
    torch.testing.assert_close(rnn(x)[0], rnn(x)[0])


@pytest.mark.parametrize("share_memory", [True, False])
def test_debug_views_replay_the_memory(share_memory):
    rnn = small_sam(num_layers=2, share_memory=share_memory, debug=True).double()
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    _, (_, memory, _), views = rnn(x[:, :2])
    _, (_, memory, _), views = rnn(x[:, 2:], (None, memory, None))  # carried on
    assert {key: value.shape for key, value in views.items()} == {
        "memory": (8, 48),
        "visible_memory": (8, 28),
        "read_weights": (8, 12),
        "write_weights": (8, 12),
        "read_vectors": (8, 8),
        "least_used_mem": (8, 1),
        "usage": (8, 12),
        "read_positions": (8, 7),
    }
    # The last row of each layer's memory is batch element 0 of that memory's dict.
    memories = [memory, memory] if share_memory else memory
    last_rows = {1: memories[1]} if share_memory else {0: memories[0], 1: memories[1]}
    for layer, hidden in last_rows.items():
        row = 6 + layer
        for key in views:
            expected = hidden[key][0].flatten().numpy()
            assert views[key][row] == pytest.approx(expected, abs=1e-12), key


def test_the_wait_policy_warning_comes_once(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(compat, "_wait_policy_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small_sam()
        small_sam()
    assert [str(w.message).split(":")[0] for w in caught] == ["SAM"]
    assert "OMP_WAIT_POLICY=PASSIVE" in str(caught[0].message)
    monkeypatch.setattr(compat, "_wait_policy_warned", False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small_sam()
    assert caught == []


def test_unsupported_arguments_are_refused():
    with pytest.raises(ValueError, match="bidirectional"):
        SAM(input_size=3, hidden_size=4, bidirectional=True)
    with pytest.raises(ValueError, match="rnn_type"):
        SAM(input_size=3, hidden_size=4, rnn_type="transformer")
    with pytest.raises(ValueError, match="pass_through_memory"):
        small_sam()(torch.randn(2, 3, 5), pass_through_memory=False)
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(3, 5)])
    with pytest.raises(TypeError, match="PackedSequence"):
        small_sam()(packed)


def run_example(name: str, capsys, monkeypatch, *args: str) -> str:
    """Run an example script as ``__main__`` in this process (no second torch import)."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_readme_usage_example(capsys, monkeypatch):
    # The shapes pytorch-dnc 1.1.0's SAM returns for this call (sparse_memory.py's reset,
    # write and read: C = R K + 1 = 17 visible rows).
    assert run_example("readme_usage.py", capsys, monkeypatch).splitlines() == [
        "output (10, 4, 64)",
        "controller_hidden 4 (2, 10, 128)",
        "memory (10, 100, 32)",
        "visible_memory (10, 17, 32)",
        "read_weights (10, 100)",
        "write_weights (10, 100)",
        "read_vectors (10, 4, 32)",
        "least_used_mem (10, 1)",
        "usage (10, 100)",
        "read_positions (10, 17)",
        "read_vectors (10, 128)",
    ]


def test_readme_debug_example(capsys, monkeypatch):
    # pytorch-dnc 1.1.0's sam.py _debug: 4 steps x 4 layers rows, batch element 0.
    assert run_example("readme_debug.py", capsys, monkeypatch).splitlines() == [
        "least_used_mem ndarray (16, 1)",
        "memory ndarray (16, 3200)",
        "read_positions ndarray (16, 17)",
        "read_vectors ndarray (16, 128)",
        "read_weights ndarray (16, 100)",
        "usage ndarray (16, 100)",
        "visible_memory ndarray (16, 544)",
        "write_weights ndarray (16, 100)",
    ]


@pytest.mark.slow
def test_copy_training_script(capsys, monkeypatch):
    output = run_example("copy_training.py", capsys, monkeypatch, "60")
    first, last = (float(value) for value in output.split()[4::5])
    assert last < 0.8 * first


def test_memctl_options_reach_the_core():
    # Arguments pytorch-dnc does not have go to SAMCore (so SDNC can add its own).
    assert type(SAM(input_size=3, hidden_size=4, nr_cells=2**17).memories[0].index).__name__ == (
        "AutoIndex"
    )
    exact = SAM(input_size=3, hidden_size=4, nr_cells=2**17, index="exact")
    assert type(exact.memories[0].index).__name__ == "ExactIndex"
    with pytest.raises(TypeError, match="temporal_reads"):
        SAM(input_size=3, hidden_size=4, temporal_reads=4)
