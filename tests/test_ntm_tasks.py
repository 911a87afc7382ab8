"""The four NTM tasks beyond copy: invariants of their generators, and the N-gram floor.

Targets are checked by re-deriving them from the inputs sequence by sequence with plain
Python (the tasks themselves never loop over the batch).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from memctl.models.lstm import LSTM, LSTMConfig
from memctl.recipe import load_recipe
from memctl.registry import MODELS
from memctl.registry import TASKS as TASK_REGISTRY
from memctl.tasks.associative_recall import AssociativeRecallConfig, AssociativeRecallTask
from memctl.tasks.ngrams import NGramsConfig, NGramsTask, bayes_predictions, draw_tables
from memctl.tasks.priority_sort import PrioritySortConfig, PrioritySortTask
from memctl.tasks.repeat_copy import RepeatCopyConfig, RepeatCopyTask, repeat_normalisation

TASKS = {
    "repeat_copy": lambda: RepeatCopyTask(RepeatCopyConfig()),
    "associative_recall": lambda: AssociativeRecallTask(AssociativeRecallConfig()),
    "ngrams": lambda: NGramsTask(NGramsConfig(length=40, min_length=20)),
    "priority_sort": lambda: PrioritySortTask(PrioritySortConfig(min_items=5)),
}


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scored_steps(mask: torch.Tensor, b: int) -> list[int]:
    return torch.nonzero(mask[:, b]).flatten().tolist()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shapes_dtypes_and_determinism(name: str) -> None:
    task = TASKS[name]()
    batch = task.sample(16, generator(3), max_level=task.level, min_level=task.min_level)
    steps, batch_size = batch.mask.shape
    assert batch_size == 16
    assert batch.inputs.shape == (steps, 16, task.input_size)
    assert batch.targets.shape == (steps, 16, task.output_size)
    assert all(t.dtype == torch.float32 for t in batch)
    assert set(batch.mask.unique().tolist()) <= {0.0, 1.0}
    assert (batch.mask.sum(0) > 0).all()
    assert set(batch.targets.unique().tolist()) <= {0.0, 1.0}
    # Every sequence's padding, after its last scored step, is blank.
    for b in range(16):
        last = scored_steps(batch.mask, b)[-1]
        assert batch.inputs[last + 1 :, b].abs().sum() == 0
        assert batch.targets[last + 1 :, b].abs().sum() == 0
    again = task.sample(16, generator(3), max_level=task.level, min_level=task.min_level)
    assert all(torch.equal(a, b) for a, b in zip(batch, again, strict=True))
    other = task.sample(16, generator(4), max_level=task.level, min_level=task.min_level)
    assert not torch.equal(batch.inputs, other.inputs) or batch.inputs.shape != other.inputs.shape


@pytest.mark.parametrize("name", sorted(TASKS))
def test_metrics_are_listed_scalars(name: str) -> None:
    task = TASKS[name]()
    batch = task.sample(8, generator(), max_level=task.level, min_level=task.min_level)
    metrics = task.metrics(torch.zeros_like(batch.targets), batch)
    assert tuple(metrics) == task.metric_names
    assert task.primary_metric in metrics
    assert all(value.dim() == 0 and torch.isfinite(value) for value in metrics.values())
    # Zero logits are p = 1/2: one bit per scored target bit, per sequence.
    per_sequence_bits = batch.mask.sum() * task.output_size / 8
    assert metrics["cost_bits"].item() == pytest.approx(per_sequence_bits.item(), rel=1e-5)


# Repeat copy


def test_repeat_copy_target_is_the_input_repeated_then_the_end_marker() -> None:
    task = RepeatCopyTask(RepeatCopyConfig(width=5, max_length=6, max_repeats=4))
    batch = task.sample(32, generator(1), max_level=6, min_level=1)
    width = 5
    mean, std = repeat_normalisation(1, 4)
    lengths, repeats = set(), set()
    for b in range(32):
        delimiter = torch.nonzero(batch.inputs[:, b, width]).flatten().tolist()
        assert len(delimiter) == 1
        length = delimiter[0]
        count = round(batch.inputs[length, b, width + 1].item() * std + mean)
        lengths.add(length)
        repeats.add(count)
        sequence = batch.inputs[:length, b, :width]
        copies = batch.targets[length + 1 : length + 1 + count * length, b, :width]
        assert torch.equal(copies, sequence.repeat(count, 1))
        end = length + 1 + count * length
        assert batch.targets[end, b, width] == 1
        assert batch.targets[:, b, width].sum() == 1
        assert batch.targets[end, b, :width].sum() == 0
        assert scored_steps(batch.mask, b) == list(range(length + 1, end + 1))
        # The count channel is set on the delimiter step only.
        assert torch.count_nonzero(batch.inputs[:, b, width + 1]) <= 1
        assert batch.inputs[end:, b].abs().sum() == 0
    assert lengths == set(range(1, 7))
    assert repeats == set(range(1, 5))


def test_repeat_channel_has_mean_zero_and_variance_one_over_the_training_range() -> None:
    task = RepeatCopyTask(RepeatCopyConfig())  # repeats 1..10, the paper's range
    values = task.normalise_repeats(torch.arange(1, 11)).double()
    assert values.mean().item() == pytest.approx(0, abs=1e-12)
    assert values.var(unbiased=False).item() == pytest.approx(1, abs=1e-6)
    assert task.repeat_mean == 5.5
    assert task.repeat_std == pytest.approx(math.sqrt(99 / 12))
    # And empirically, on what the network sees.
    batch = task.sample(4000, generator(2), max_level=3, min_level=1)
    seen = batch.inputs[:, :, task.width + 1].sum(0).double()
    assert seen.mean().item() == pytest.approx(0, abs=0.06)
    assert seen.var(unbiased=False).item() == pytest.approx(1, abs=0.06)


def test_repeat_copy_single_count_range_is_not_a_division_by_zero() -> None:
    assert repeat_normalisation(3, 3) == (3.0, 1.0)
    with pytest.raises(ValueError, match="min_repeats"):
        RepeatCopyConfig(min_repeats=5, max_repeats=2)


# Associative recall


def test_recall_target_is_the_item_after_the_query() -> None:
    config = AssociativeRecallConfig(width=3, item_length=2, max_items=5)
    task = AssociativeRecallTask(config)
    batch = task.sample(64, generator(5), max_level=5, min_level=2)
    width, vectors = 3, 2
    counts, query_positions = set(), set()
    for b in range(64):
        starts = torch.nonzero(batch.inputs[:, b, width]).flatten().tolist()
        items = [batch.inputs[s + 1 : s + 1 + vectors, b, :width] for s in starts]
        query_delimiters = torch.nonzero(batch.inputs[:, b, width + 1]).flatten().tolist()
        assert len(query_delimiters) == 2
        first, second = query_delimiters
        assert first == len(items) * (vectors + 1)
        assert second == first + vectors + 1
        query = batch.inputs[first + 1 : second, b, :width]
        matches = [i for i, item in enumerate(items) if torch.equal(item, query)]
        assert matches and matches[0] < len(items) - 1
        answer = scored_steps(batch.mask, b)
        assert answer == list(range(second + 1, second + 1 + vectors))
        assert torch.equal(batch.targets[answer, b], items[matches[0] + 1])
        assert batch.inputs[second + 1 :, b].abs().sum() == 0
        counts.add(len(items))
        query_positions.add(matches[0])
    assert counts == set(range(2, 6))
    assert query_positions == set(range(4))


def test_recall_default_sizes_follow_the_paper() -> None:
    task = AssociativeRecallTask(AssociativeRecallConfig())
    batch = task.sample(4, generator(), max_level=6, min_level=6)
    assert (task.input_size, task.output_size) == (8, 6)
    # 6 items of delimiter + 3 vectors, query between 2 delimiters, 3 answer steps.
    assert batch.inputs.shape[0] == 6 * 4 + 5 + 3
    with pytest.raises(ValueError, match="at least 2"):
        task.sample(4, generator(), max_level=3, min_level=1)


# Priority sort


def test_sort_target_is_the_top_vectors_by_decreasing_priority() -> None:
    task = PrioritySortTask(PrioritySortConfig(width=4, max_items=20, min_items=5))
    batch = task.sample(64, generator(6), max_level=20, min_level=5)
    width = 4
    for b in range(64):
        count = int(torch.nonzero(batch.inputs[:, b, width + 1]).flatten().item())
        vectors = batch.inputs[:count, b, :width]
        priority = batch.inputs[:count, b, width]
        assert (priority.abs() <= 1).all()
        keep = max(1, math.floor(count * 0.8 + 0.5))
        steps = scored_steps(batch.mask, b)
        assert steps == list(range(count + 1, count + 1 + keep))
        ranked = sorted(range(count), key=lambda i: -priority[i].item())[:keep]
        assert torch.equal(batch.targets[steps, b], vectors[ranked])
    full = PrioritySortTask(PrioritySortConfig())
    assert full.output_count(torch.tensor([20])).item() == 16  # the paper's 16 of 20
    assert full.min_level == 20


def test_priorities_are_uniform_on_minus_one_to_one() -> None:
    task = PrioritySortTask(PrioritySortConfig())
    batch = task.sample(500, generator(7), max_level=20, min_level=20)
    priority = batch.inputs[:20, :, task.width].flatten()
    assert priority.min() >= -1 and priority.max() <= 1
    assert priority.mean().item() == pytest.approx(0, abs=0.03)
    assert priority.var().item() == pytest.approx(1 / 3, abs=0.02)


# Dynamic N-grams


def bayes_reference(bits: np.ndarray, lengths: list[int], order: int) -> np.ndarray:
    """Bayes-optimal P(next = 1) at each scored step, explicit loops, float64.

    bits: ``[L, B]``. Returns ``[L - 1, B]`` with NaN where a step is not scored.
    """
    steps, batch_size = bits.shape
    context_bits = order - 1
    out = np.full((steps - 1, batch_size), np.nan)
    for b in range(batch_size):
        ones: dict[tuple, int] = {}
        zeros: dict[tuple, int] = {}
        for t in range(context_bits - 1, lengths[b] - 1):
            context = tuple(int(x) for x in bits[t - context_bits + 1 : t + 1, b])
            n1, n0 = ones.get(context, 0), zeros.get(context, 0)
            out[t, b] = (n1 + 0.5) / (n1 + n0 + 1.0)
            if bits[t + 1, b] == 1:
                ones[context] = n1 + 1
            else:
                zeros[context] = n0 + 1
    return out


@pytest.mark.parametrize("order", [2, 3, 6])
def test_bayes_estimator_matches_an_explicit_loop_reference(order: int) -> None:
    task = NGramsTask(NGramsConfig(order=order, length=60, min_length=order + 2))
    batch = task.sample(6, generator(order), max_level=60, min_level=order + 2)
    lengths = (batch.mask.sum(0) + order - 1).long().tolist()
    bits = torch.cat([batch.inputs[:1, :, 0], batch.targets[:, :, 0]]).double()
    reference = bayes_reference(bits.numpy(), lengths, order)
    ours = bayes_predictions(
        batch.inputs[..., 0].double(),
        batch.targets[..., 0].double(),
        batch.mask.double(),
        order - 1,
    )
    scored = batch.mask.bool().numpy()
    assert np.array_equal(~np.isnan(reference), scored)
    np.testing.assert_allclose(ours.numpy()[scored], reference[scored], rtol=1e-12)
    cost = -np.nansum(
        np.where(bits.numpy()[1:] == 1, np.log2(reference), np.log2(1 - reference)), 0
    )
    np.testing.assert_allclose(task.bayes_cost(batch).numpy(), cost, rtol=1e-5)


def test_ngram_layout_targets_are_the_next_bit() -> None:
    task = NGramsTask(NGramsConfig(length=50, min_length=10))
    batch = task.sample(32, generator(8), max_level=50, min_level=10)
    lengths = []
    for b in range(32):
        steps = scored_steps(batch.mask, b)
        length = steps[-1] + 2
        lengths.append(length)
        assert steps == list(range(4, length - 1))  # 6-grams: L - 5 predictions
        assert torch.equal(batch.inputs[1 : length - 1, b], batch.targets[: length - 2, b])
        assert batch.inputs[length - 1 :, b].abs().sum() == 0
    assert batch.inputs.shape == (max(lengths) - 1, 32, 1)
    assert min(lengths) < 20 and max(lengths) > 40
    with pytest.raises(ValueError, match="at least 6"):
        NGramsConfig(length=200, min_length=5)


def test_ngram_tables_are_beta_half_half() -> None:
    table = draw_tables(1000, 32, generator(9)).double()
    # Beta(1/2, 1/2): mean 1/2, variance 1/8, P(p < 0.1) = (2 / pi) asin(sqrt(0.1)).
    assert table.mean().item() == pytest.approx(0.5, abs=0.01)
    assert table.var().item() == pytest.approx(1 / 8, abs=0.005)
    below = (table < 0.1).double().mean().item()
    assert below == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.1)), abs=0.01)


def test_ngram_bits_follow_their_table_and_the_bayes_cost_is_the_floor() -> None:
    task = NGramsTask(NGramsConfig())
    batch = task.sample(64, generator(10), max_level=200, min_level=200)
    metrics = task.metrics(torch.zeros_like(batch.targets), batch)
    # Skewed per-context probabilities make the bits predictable well below 1 bit each;
    # i.i.d. fair bits would cost the Bayes estimator more than 1 bit each.
    per_prediction = metrics["bayes_cost_bits"].item() / 195
    assert 0.5 < per_prediction < 0.75
    # Predicting exactly the Bayes probabilities costs exactly the floor.
    p_one = bayes_predictions(batch.inputs[..., 0], batch.targets[..., 0], batch.mask, 5)
    exact = task.metrics(torch.logit(p_one).unsqueeze(-1), batch)
    assert exact["excess_cost_bits"].item() == pytest.approx(0, abs=1e-3)
    assert metrics["excess_cost_bits"] > 0


@pytest.mark.slow
def test_ngram_floor_is_below_a_trained_lstm() -> None:
    torch.manual_seed(0)
    task = NGramsTask(NGramsConfig(length=100))
    model = LSTM(LSTMConfig(hidden=32), task.input_size, task.output_size)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = generator(11)
    for _ in range(100):
        batch = task.sample(16, data, max_level=100, min_level=100)
        loss = task.loss(model(batch.inputs)[0], batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        batch = task.sample(256, generator(12), max_level=100, min_level=100)
        metrics = task.metrics(model(batch.inputs)[0], batch)
    untrained = 95.0  # 95 scored predictions at p = 1/2
    assert metrics["cost_bits"] < 0.97 * untrained  # it learned something
    assert metrics["bayes_cost_bits"] < metrics["cost_bits"]


# Recipes

RECIPES = sorted(
    f"{prefix}_{task}{suffix}.yaml"
    for task in ("repeat_copy", "associative_recall", "ngrams", "priority_sort")
    for prefix, suffix in (("ntm", ""), ("ntm", "_small"), ("lstm", ""))
)


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_build_and_run_one_batch(name: str) -> None:
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / name)
    task = TASK_REGISTRY.get(recipe.task.type).cls(recipe.task)
    model = MODELS.get(recipe.model.type).cls(recipe.model, task.input_size, task.output_size)
    batch = task.sample(2, generator(), max_level=task.min_level, min_level=task.min_level)
    with torch.no_grad():
        outputs, _ = model(batch.inputs)
    assert outputs.shape == batch.targets.shape
    assert recipe.train.optimizer.name == "adam" and recipe.train.clip.norm == 50
    if recipe.model.type == "ntm" and "_small" not in name:
        assert (recipe.model.memory_size, recipe.model.word_size) == (128, 20)
