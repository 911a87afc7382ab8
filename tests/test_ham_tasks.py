"""HAM key-value tasks: every target against a plain-Python answer decoded from the
inputs, the layout, determinism, and the min task's squared-error scoring."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import memctl.tasks  # noqa: F401  (registers the tasks)
from memctl.registry import TASKS

KEY_BITS, VALUE_BITS = 3, 2


def make(name: str, n: int = 6, min_n: int = 1):
    entry = TASKS.get(name)
    return entry.cls(entry.config(key_bits=KEY_BITS, value_bits=VALUE_BITS, n=n, min_n=min_n))


def decode(bits) -> int:
    return sum(int(bit) << i for i, bit in enumerate(bits))


def expected_answers(name: str, items: list[tuple[int, tuple]], query: int) -> list[tuple]:
    """The task's answer values, in plain Python (``sorted`` is stable)."""
    by_key = [value for _, value in sorted(items, key=lambda item: item[0])]
    if name == "min":
        return by_key[:1]
    if name in ("sort", "merge"):
        return by_key
    if name == "reverse":
        return [value for _, value in reversed(items)]
    return [next(value for key, value in items if key == query)]


@pytest.mark.parametrize("name", ["min", "sort", "reverse", "search", "merge"])
def test_targets_match_a_plain_python_answer(name):
    task = make(name)
    batch = task.sample(64, torch.Generator().manual_seed(3), max_level=6, min_level=2)
    inputs, targets, mask = batch
    most = int((inputs[..., -2].sum(0)).max())
    width = KEY_BITS + VALUE_BITS
    assert inputs.shape[-1] == task.input_size == width + 2
    for b in range(64):
        column = inputs[:, b].tolist()
        items = [
            (decode(row[:KEY_BITS]), tuple(row[KEY_BITS:width])) for row in column if row[width]
        ]
        n = len(items)
        assert 2 <= n <= 6
        assert all(row[width] == 1 for row in column[:n])
        assert all(not any(row) for row in column[n:most])
        query = decode(column[most][:KEY_BITS])
        answers = expected_answers(name, items, query)
        go = [t for t, row in enumerate(column) if row[width + 1]]
        assert go == list(range(most, most + len(answers)))
        assert mask[:, b].nonzero().flatten().tolist() == go
        assert [tuple(targets[t, b].tolist()) for t in go] == answers
        assert targets[:, b][mask[:, b] == 0].abs().sum() == 0
        if name == "search":
            assert query in [key for key, _ in items]
        if name == "merge":
            keys = [key for key, _ in items]
            half = (n + 1) // 2
            assert keys[:half] == sorted(keys[:half]) and keys[half:] == sorted(keys[half:])


@pytest.mark.parametrize("name", ["min", "sort"])
def test_sampling_is_deterministic_for_a_generator(name):
    task = make(name)
    first = task.sample(8, torch.Generator().manual_seed(5), max_level=6, min_level=1)
    again = task.sample(8, torch.Generator().manual_seed(5), max_level=6, min_level=1)
    other = task.sample(8, torch.Generator().manual_seed(6), max_level=6, min_level=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first.inputs, other.inputs)


def test_level_sets_every_n_and_lengths_follow_it():
    task = make("sort", n=8, min_n=2)
    assert task.level_field == "n" and task.level == 8 and task.min_level == 2
    batch = task.sample(16, torch.Generator().manual_seed(0), max_level=5, min_level=5)
    assert batch.inputs.shape[:2] == (10, 16)
    assert torch.equal(batch.inputs[:5, :, -2], torch.ones(5, 16))
    assert torch.equal(batch.mask.sum(0), torch.full((16,), 5.0))


def test_min_ties_go_to_the_earlier_item():
    task = make("min", n=16)
    inputs, targets, _ = task.sample(
        256, torch.Generator().manual_seed(0), max_level=16, min_level=16
    )
    keys = sum(inputs[:16, :, i].long() << i for i in range(KEY_BITS))  # [16, B]
    first_min = (keys == keys.min(0).values).long().argmax(0)
    values = inputs[first_min, torch.arange(256), KEY_BITS : KEY_BITS + VALUE_BITS]
    assert torch.equal(targets[16], values)


def test_config_rejects_min_n_above_n():
    with pytest.raises(ValidationError, match="min_n"):
        TASKS.get("min").config(n=4, min_n=5)


def test_min_scores_squared_error_and_exact_match_after_rounding():
    task = make("min", n=4)
    batch = task.sample(4, torch.Generator().manual_seed(0), max_level=4, min_level=4)
    assert task.primary_metric == "accuracy" and task.higher_is_better
    assert task.metric_names == ("squared_error", "bit_errors", "accuracy")
    outputs = batch.targets + 0.4 * (1 - 2 * batch.targets) * batch.mask.unsqueeze(-1)
    outputs[:4] = 7.0  # unscored data steps do not count
    metrics = task.metrics(outputs, batch)
    assert float(metrics["accuracy"]) == 1.0 and float(metrics["bit_errors"]) == 0.0
    assert float(metrics["squared_error"]) == pytest.approx(0.16 * VALUE_BITS)
    assert float(task.loss(outputs, batch)) == pytest.approx(0.16)
    losses = task.sequence_losses(outputs, batch)
    assert torch.allclose(losses, torch.full((4,), 0.16 * VALUE_BITS))

    outputs[4, 0, 0] = 1 - batch.targets[4, 0, 0]  # one wrong bit in one sequence
    metrics = task.metrics(outputs, batch)
    assert float(metrics["accuracy"]) == 0.75
    assert float(metrics["bit_errors"]) == 0.25


@pytest.mark.parametrize("name", ["sort", "merge"])
def test_sorted_targets_are_the_items_in_nondecreasing_key_order(name):
    entry = TASKS.get(name)
    task = entry.cls(entry.config(key_bits=3, value_bits=12, n=8))
    inputs, targets, mask = task.sample(
        64, torch.Generator().manual_seed(4), max_level=8, min_level=8
    )
    for b in range(64):
        items = {tuple(row[3:15]): decode(row[:3]) for row in inputs[:8, b].tolist()}
        if len(items) < 8:  # two items share a value: skip the ambiguous sequence
            continue
        answers = [tuple(targets[t, b].tolist()) for t in mask[:, b].nonzero().flatten()]
        assert sorted(answers) == sorted(items)  # every item once
        keys = [items[value] for value in answers]
        assert keys == sorted(keys)
