"""The HAM tasks add, stack, queue and priority_queue: every target against a plain-Python
replay of the inputs (the sum is right, pops are LIFO / FIFO / by priority), the layout,
masking of padded sequences and determinism."""

from __future__ import annotations

import heapq
from collections import deque

import pytest
import torch

import memctl.tasks  # noqa: F401  (registers the tasks)
from memctl.registry import TASKS


def make(name: str, **settings):
    entry = TASKS.get(name)
    return entry.cls(entry.config(**settings))


def decode(bits) -> int:
    return sum(int(bit) << i for i, bit in enumerate(bits))


@pytest.mark.parametrize("n", [1, 5, 100])
def test_add_targets_are_the_sum_of_the_two_numbers(n):
    task = make("add", n=n, min_n=1)
    inputs, targets, mask = task.sample(
        64, torch.Generator().manual_seed(n), max_level=n, min_level=1
    )
    assert inputs.shape[-1] == task.input_size == 6 and targets.shape[-1] == task.output_size == 1
    data_steps = 2 * n + 2
    for b in range(64):
        symbols = [
            row[:4].index(1.0) if row[4] else None for row in inputs[:data_steps, b].tolist()
        ]
        plus, equals = symbols.index(2), symbols.index(3)
        bits = plus  # this sequence's n
        assert 1 <= bits <= n and equals == 2 * bits + 1
        assert all(s is None for s in symbols[equals + 1 :])
        a, b_number = decode(symbols[:plus]), decode(symbols[plus + 1 : equals])
        assert all(s in (0, 1) for s in symbols[:plus] + symbols[plus + 1 : equals])
        go = inputs[:, b, 5].nonzero().flatten().tolist()
        assert go == list(range(data_steps, data_steps + bits + 1))
        assert mask[:, b].nonzero().flatten().tolist() == go
        assert decode(targets[go, b, 0].tolist()) == a + b_number  # c_1 .. c_(n+1), LSB first
        assert targets[:, b][mask[:, b] == 0].abs().sum() == 0


def test_add_covers_carries_out():
    task = make("add", n=3)
    _, targets, mask = task.sample(256, torch.Generator().manual_seed(0), max_level=3, min_level=3)
    carry_out = targets[-1, :, 0]
    assert 0 < float(carry_out.mean()) < 1 and torch.equal(mask[-1], torch.ones(256))


def replay(name: str, task, inputs: torch.Tensor) -> tuple[list, list[int], int]:
    """Plain-Python replay of one sequence ``[T, I]``: the popped values in order, the
    pop steps, and the number of pushes."""
    key_bits = getattr(task.config, "key_bits", 0)
    width = key_bits + task.config.value_bits
    structure: list = []
    queue: deque = deque()
    answers, pops, pushes = [], [], 0
    for t, row in enumerate(inputs.tolist()):
        assert not (row[width] and row[width + 1])
        if row[width]:
            value = tuple(row[key_bits:width])
            if name == "stack":
                structure.append(value)
            elif name == "queue":
                queue.append(value)
            else:
                priority = decode(row[:key_bits])
                order = -priority if task.config.priority == "max" else priority
                heapq.heappush(structure, (order, pushes, value))
            pushes += 1
        elif row[width + 1]:
            assert structure or queue, "a pop of an empty structure"
            if name == "stack":
                answers.append(structure.pop())
            elif name == "queue":
                answers.append(queue.popleft())
            else:
                answers.append(heapq.heappop(structure)[2])
            pops.append(t)
        else:
            assert not any(row), "a padding step after the operations"
    assert not structure and not queue, "the sequence ends empty"
    return answers, pops, pushes


CASES = [
    ("stack", {}),
    ("queue", {}),
    ("priority_queue", {"key_bits": 2}),
    ("priority_queue", {"key_bits": 2, "priority": "min"}),
]


@pytest.mark.parametrize(("name", "settings"), CASES)
def test_pops_return_what_the_structure_holds(name, settings):
    task = make(name, n=7, min_n=2, value_bits=3, **settings)
    inputs, targets, mask = task.sample(
        64, torch.Generator().manual_seed(1), max_level=7, min_level=2
    )
    assert inputs.shape == (14, 64, task.input_size) and targets.shape == (14, 64, 3)
    for b in range(64):
        answers, pops, pushes = replay(name, task, inputs[:, b])
        assert 2 <= pushes <= 7 and len(pops) == pushes
        assert mask[:, b].nonzero().flatten().tolist() == pops
        assert [tuple(targets[t, b].tolist()) for t in pops] == answers
        assert targets[:, b][mask[:, b] == 0].abs().sum() == 0


def test_priority_ties_go_to_the_earliest_push():
    task = make("priority_queue", n=6, key_bits=1, value_bits=4, push_probability=0.9)
    inputs, targets, _ = task.sample(32, torch.Generator().manual_seed(2), max_level=6, min_level=6)
    for b in range(32):
        answers, pops, _ = replay("priority_queue", task, inputs[:, b])  # heap order breaks ties
        assert [tuple(targets[t, b].tolist()) for t in pops] == answers


def test_interleavings_vary_and_pushes_come_first_where_forced():
    task = make("stack", n=5)
    inputs, _, mask = task.sample(256, torch.Generator().manual_seed(3), max_level=5, min_level=5)
    width = task.config.value_bits
    assert torch.equal(inputs[0, :, width], torch.ones(256))  # nothing to pop at the start
    assert torch.equal(mask[-1], torch.ones(256))  # nothing left to push at the end
    assert len({tuple(mask[:, b].tolist()) for b in range(256)}) > 10


@pytest.mark.parametrize("name", ["add", "stack", "queue", "priority_queue"])
def test_sampling_is_deterministic_for_a_generator(name):
    task = make(name, n=6)
    first = task.sample(8, torch.Generator().manual_seed(5), max_level=6, min_level=1)
    again = task.sample(8, torch.Generator().manual_seed(5), max_level=6, min_level=1)
    other = task.sample(8, torch.Generator().manual_seed(6), max_level=6, min_level=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first.inputs, other.inputs)
    assert task.level_field == "n" and task.primary_metric == "accuracy"


@pytest.mark.parametrize("n", [1, 5, 100])
def test_add_in_columns_gives_bit_i_of_both_numbers_on_step_i(n):
    task = make("add", n=n, min_n=1, layout="columns")
    inputs, targets, mask = task.sample(
        64, torch.Generator().manual_seed(n), max_level=n, min_level=1
    )
    assert inputs.shape == (2 * n + 1, 64, task.input_size) and task.input_size == 4
    for b in range(64):
        data = inputs[:n, b, 2].nonzero().flatten().tolist()
        bits = len(data)  # this sequence's n
        assert 1 <= bits <= n and data == list(range(bits))
        assert inputs[bits:n, b].abs().sum() == 0  # padding after the data
        a, b_number = decode(inputs[:bits, b, 0].tolist()), decode(inputs[:bits, b, 1].tolist())
        go = inputs[:, b, 3].nonzero().flatten().tolist()
        assert go == list(range(n, n + bits + 1)) and mask[:, b].nonzero().flatten().tolist() == go
        assert decode(targets[go, b, 0].tolist()) == a + b_number
        assert targets[:, b][mask[:, b] == 0].abs().sum() == 0


def test_add_in_columns_has_the_same_numbers_as_in_symbols():
    sampled = {
        layout: make("add", n=7, layout=layout).sample(
            32, torch.Generator().manual_seed(2), max_level=7, min_level=1
        )
        for layout in ("symbols", "columns")
    }
    answers = {layout: batch.targets[batch.mask > 0] for layout, batch in sampled.items()}
    assert torch.equal(answers["symbols"], answers["columns"])
