"""memctl.models.DNC as a drop-in for pytorch-dnc's DNC (PyPI ``dnc`` 1.1.0): parameter
counts, the call and what it returns, carrying and resetting the memory, debug views, and
example scripts written from pytorch-dnc's README usage."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

from memctl.models import DNC, detach_state

EXAMPLES = Path(__file__).parent / "dnc_examples"

# Parameter counts of pytorch-dnc 1.1.0's DNC for the same arguments, measured with
#   python -m venv /tmp/dncpeer && /tmp/dncpeer/bin/pip install torch==2.13.0 dnc==1.1.0
#   /tmp/dncpeer/bin/python -c "from dnc import DNC; \
#       print(sum(p.numel() for p in DNC(**kwargs).parameters()))"
PEER_PARAMETERS = [
    (
        dict(
            input_size=10,
            hidden_size=64,
            rnn_type="lstm",
            num_layers=1,
            num_hidden_layers=1,
            nr_cells=32,
            cell_size=16,
            read_heads=4,
            batch_first=True,
            gpu_id=-1,
        ),
        45_905,
    ),
    (dict(input_size=6, hidden_size=64, nr_cells=32, cell_size=20, read_heads=4), 83_657),
    (
        dict(
            input_size=64,
            hidden_size=128,
            rnn_type="lstm",
            num_layers=4,
            nr_cells=100,
            cell_size=32,
            read_heads=4,
        ),
        1_334_455,
    ),
    (
        dict(
            input_size=8,
            hidden_size=32,
            rnn_type="gru",
            num_layers=2,
            num_hidden_layers=2,
            nr_cells=16,
            cell_size=8,
            read_heads=2,
            share_memory=False,
        ),
        30_002,
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
        7_280,
    ),
    (
        dict(
            input_size=6,
            hidden_size=64,
            independent_linears=True,
            nr_cells=16,
            cell_size=20,
            read_heads=4,
        ),
        83_657,
    ),
    (dict(input_size=5, hidden_size=10), 3_208),
]


@pytest.mark.parametrize(("kwargs", "expected"), PEER_PARAMETERS)
def test_parameter_count_equals_pytorch_dnc(kwargs, expected):
    assert sum(p.numel() for p in DNC(**kwargs).parameters()) == expected


def small_dnc(**kwargs) -> DNC:
    torch.manual_seed(0)
    defaults = dict(input_size=5, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2)
    return DNC(**{**defaults, **kwargs})


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_call_returns_pytorch_dnc_structures(rnn_type, batch_first):
    rnn = small_dnc(rnn_type=rnn_type, num_layers=2, batch_first=batch_first)
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
    assert {key: tuple(value.shape) for key, value in memory.items()} == {
        "memory": (batch, 6, 4),
        "link_matrix": (batch, 1, 6, 6),
        "precedence": (batch, 1, 6),
        "read_weights": (batch, 2, 6),
        "write_weights": (batch, 1, 6),
        "usage_vector": (batch, 6),
    }
    assert read_vectors.shape == (batch, 8)


def test_separate_memories_come_back_as_a_list():
    rnn = small_dnc(num_layers=3, share_memory=False)
    _, (_, memory, _) = rnn(torch.randn(2, 4, 5))
    assert isinstance(memory, list) and len(memory) == 3
    assert not torch.equal(memory[0]["memory"], memory[1]["memory"])


def test_carrying_the_hidden_state_equals_one_long_call():
    rnn = small_dnc(num_layers=2).double()
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    whole, (_, whole_memory, _) = rnn(x)
    first, hidden = rnn(x[:, :4])
    second, (_, memory, _) = rnn(x[:, 4:], hidden)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    torch.testing.assert_close(memory["link_matrix"], whole_memory["link_matrix"])
    # Detached (truncated backpropagation) the state still continues the same way.
    second_detached, _ = rnn(x[:, 4:], detach_state(hidden))
    torch.testing.assert_close(second_detached, second)


def test_reset_experience_empties_the_memory_only():
    rnn = small_dnc().double()
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    _, (controller_hidden, memory, read_vectors) = rnn(x)
    reset, _ = rnn(x, (None, memory, None), reset_experience=True)
    torch.testing.assert_close(reset, rnn(x)[0])
    kept, _ = rnn(x, (None, memory, None), reset_experience=False)
    assert not torch.allclose(kept, reset)
    with_controller, _ = rnn(x, (controller_hidden, memory, read_vectors), reset_experience=True)
    assert not torch.allclose(with_controller, reset)


def test_same_input_same_output():
    # pytorch-dnc redraws the controller's initial state on every call; this one does not.
    rnn = small_dnc()
    x = torch.randn(2, 5, 5)
    torch.testing.assert_close(rnn(x)[0], rnn(x)[0])


def test_debug_views_have_one_row_per_step_and_layer():
    rnn = small_dnc(num_layers=2, debug=True)
    _, _, views = rnn(torch.randn(3, 4, 5))
    assert {key: value.shape for key, value in views.items()} == {
        "memory": (8, 24),
        "link_matrix": (8, 36),
        "precedence": (8, 6),
        "read_weights": (8, 12),
        "write_weights": (8, 6),
        "usage_vector": (8, 6),
    }


def test_unsupported_arguments_are_refused():
    with pytest.raises(ValueError, match="bidirectional"):
        DNC(input_size=3, hidden_size=4, bidirectional=True)
    with pytest.raises(ValueError, match="rnn_type"):
        DNC(input_size=3, hidden_size=4, rnn_type="transformer")
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(3, 5)])
    with pytest.raises(TypeError, match="PackedSequence"):
        small_dnc()(packed)


def run_example(name: str, capsys, monkeypatch, *args: str) -> str:
    """Run an example script as ``__main__`` in this process (no second torch import)."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_readme_usage_example(capsys, monkeypatch):
    # The same lines as pytorch-dnc 1.1.0 prints for this script with `from dnc import DNC`.
    assert run_example("readme_usage.py", capsys, monkeypatch).splitlines() == [
        "output (10, 4, 64)",
        "controller_hidden 4 (2, 10, 128)",
        "memory {'memory': (10, 100, 32), 'link_matrix': (10, 1, 100, 100), "
        "'precedence': (10, 1, 100), 'read_weights': (10, 4, 100), "
        "'write_weights': (10, 1, 100), 'usage_vector': (10, 100)}",
        "read_vectors (10, 128)",
    ]


def test_readme_debug_example(capsys, monkeypatch):
    assert run_example("readme_debug.py", capsys, monkeypatch).splitlines() == [
        "memory ndarray (16, 3200)",
        "link_matrix ndarray (16, 10000)",
        "precedence ndarray (16, 100)",
        "read_weights ndarray (16, 400)",
        "write_weights ndarray (16, 100)",
        "usage_vector ndarray (16, 100)",
    ]


@pytest.mark.slow
def test_copy_training_script(capsys, monkeypatch):
    output = run_example("copy_training.py", capsys, monkeypatch, "40")
    first, last = (float(value) for value in output.split()[4::5])
    assert last < 0.8 * first
