"""Associative retrieval (Ba et al. 2016, section 4.1): generator invariants, loss, metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memctl.recipe import load_recipe
from memctl.registry import TASKS
from memctl.tasks.associative_retrieval import (
    DIGITS,
    LETTERS,
    VOCABULARY,
    AssociativeRetrievalConfig,
    AssociativeRetrievalTask,
    decode,
)

RECIPES = sorted(Path(__file__).parent.parent.glob("recipes/fw_assoc*.yaml"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # torch.testing.assert_close would import torch.distributed (slow); this is enough here.
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6), (actual, expected)


def make_task(**kwargs) -> AssociativeRetrievalTask:
    return AssociativeRetrievalTask(AssociativeRetrievalConfig(**kwargs))


def sample(batch_size: int, max_pairs: int, min_pairs: int, seed: int = 0):
    task = make_task(pairs=max_pairs)
    generator = torch.Generator().manual_seed(seed)
    return task, task.sample(batch_size, generator, max_level=max_pairs, min_level=min_pairs)


def parse(text: str) -> tuple[dict[str, int], str]:
    """'c9k8j3f1??c' -> ({'c': 9, 'k': 8, 'j': 3, 'f': 1}, 'c'), checking the layout."""
    pairs_text, query = text[:-3], text[-1]
    assert text[-3:-1] == "??"
    assert len(pairs_text) % 2 == 0
    keys, values = pairs_text[0::2], pairs_text[1::2]
    assert all(k.isalpha() for k in keys) and all(v.isdigit() for v in values)
    assert len(set(keys)) == len(keys), f"repeated key in {text}"
    return {k: int(v) for k, v in zip(keys, values, strict=True)}, query


def test_registered_with_widths_and_level():
    entry = TASKS.get("associative_retrieval")
    task = entry.cls(entry.config())
    assert (task.input_size, task.output_size) == (VOCABULARY, DIGITS) == (37, 10)
    assert task.level == 4 and task.min_level == 1
    assert task.primary_metric == "error" and not task.higher_is_better
    assert task.metric_names == ("cost_bits", "error", "accuracy")


def test_target_is_always_the_value_paired_with_the_query_key():
    _, batch = sample(2000, 8, 1, seed=1)
    texts = decode(batch.inputs)
    answer_step = batch.mask.argmax(0)
    answers = batch.targets[answer_step, torch.arange(2000)].argmax(-1)
    for text, answer in zip(texts, answers.tolist(), strict=True):
        table, query = parse(text)
        assert query in table
        assert answer == table[query]


def test_layout_lengths_mask_and_padding():
    _, batch = sample(500, 6, 2, seed=2)
    steps = batch.inputs.shape[0]
    assert steps == 2 * 6 + 3
    lengths = batch.inputs.sum(-1).sum(0)  # one symbol per non-padding step
    pairs = (lengths - 3) / 2
    assert set(pairs.long().tolist()) == set(range(2, 7))
    # One scored step per sequence: its last symbol, the query.
    assert torch.equal(batch.mask.sum(0), torch.ones(500))
    assert torch.equal(batch.mask.argmax(0), lengths.long() - 1)
    # Everything after the query is blank input, unscored, with zero targets.
    after = torch.arange(steps).unsqueeze(1) >= lengths
    assert batch.inputs[after].abs().sum() == 0
    assert batch.targets[after].abs().sum() == 0
    assert torch.equal(batch.targets.sum(-1), batch.mask)
    assert set(batch.inputs.sum(-1).unique().tolist()) <= {0.0, 1.0}


def test_fixed_level_has_no_padding_and_paper_example_shape():
    _, batch = sample(64, 4, 4, seed=3)
    assert batch.inputs.shape == (11, 64, VOCABULARY)  # e.g. c9k8j3f1??c
    assert torch.equal(batch.inputs.sum(-1), torch.ones(11, 64))
    assert torch.equal(batch.mask[-1], torch.ones(64)) and batch.mask[:-1].sum() == 0


def test_keys_values_and_queries_cover_their_ranges():
    _, batch = sample(4000, 4, 4, seed=4)
    texts = decode(batch.inputs)
    letters = {c for t in texts for c in t[:-3:2]}
    digits = {c for t in texts for c in t[1:-3:2]}
    assert len(letters) == LETTERS and len(digits) == DIGITS
    positions = torch.tensor([t[:-3:2].index(t[-1]) for t in texts])
    counts = torch.bincount(positions, minlength=4).float()
    assert counts.min() > 0.2 * 4000  # uniform query position: about 1000 each


def test_deterministic_for_a_generator_and_seeds_differ():
    a = sample(32, 5, 1, seed=7)[1]
    b = sample(32, 5, 1, seed=7)[1]
    c = sample(32, 5, 1, seed=8)[1]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.inputs, c.inputs)


def test_loss_and_metrics_against_reference():
    task, batch = sample(300, 4, 2, seed=5)
    outputs = torch.randn(batch.targets.shape, generator=torch.Generator().manual_seed(0))
    rows = torch.arange(300)
    answer_step = batch.mask.argmax(0)
    logits = outputs[answer_step, rows]  # [B, 10]
    labels = batch.targets[answer_step, rows].argmax(-1)
    expected = F.cross_entropy(logits, labels, reduction="none")
    assert_close(task.loss(outputs, batch), expected.mean())
    assert_close(task.sequence_losses(outputs, batch), expected)
    metrics = task.metrics(outputs, batch)
    assert list(metrics) == list(task.metric_names)
    assert all(v.dim() == 0 for v in metrics.values())
    assert_close(metrics["cost_bits"], expected.mean() / math.log(2))
    error = (logits.argmax(-1) != labels).float().mean()
    assert_close(metrics["error"], error)
    assert_close(metrics["accuracy"], 1 - error)


def test_perfect_and_uniform_predictions():
    task, batch = sample(100, 4, 1, seed=6)
    perfect = task.metrics(20 * batch.targets, batch)
    assert perfect["error"] == 0 and perfect["accuracy"] == 1
    assert perfect["cost_bits"] < 1e-6
    uniform = task.metrics(torch.zeros_like(batch.targets), batch)
    assert_close(uniform["cost_bits"], torch.tensor(math.log2(DIGITS)))


def test_config_rejects_bad_pair_counts():
    with pytest.raises(ValueError, match="min_pairs"):
        AssociativeRetrievalConfig(pairs=2, min_pairs=3)
    with pytest.raises(ValueError):
        AssociativeRetrievalConfig(pairs=LETTERS + 1)


def test_all_twenty_six_pairs_use_every_letter_once():
    _, batch = sample(20, LETTERS, LETTERS, seed=9)
    for text in decode(batch.inputs):
        table, _ = parse(text)
        assert sorted(table) == [chr(ord("a") + i) for i in range(LETTERS)]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_load_with_a_ten_thousand_sequence_test_set(path):
    recipe = load_recipe(path)
    assert recipe.task.type == "associative_retrieval" and recipe.task.pairs == 4
    assert recipe.eval.batches * recipe.eval.batch_size == 10_000
    assert recipe.eval.seed != recipe.seed
    assert recipe.curriculum.mix == "level" and recipe.curriculum.max == 4


def test_every_model_has_a_recipe():
    models = {load_recipe(path).model.type for path in RECIPES}
    assert models == {"rnn_ln_fw", "rnn_ln", "control", "gru_ln", "lstm", "lstm_ar"}
