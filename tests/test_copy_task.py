import torch

from memctl.tasks.copy import CopyConfig, CopyTask


def make(**kw) -> CopyTask:
    return CopyTask(CopyConfig(**kw))


def test_targets_reproduce_inputs_after_the_delimiter():
    task = make(width=5, min_length=1, max_length=7)
    batch = task.sample(16, torch.Generator().manual_seed(0), max_level=7, min_level=1)
    steps, batch_size, _ = batch.inputs.shape
    for b in range(batch_size):
        delimiter = int(batch.inputs[:, b, 5].nonzero().item())
        length = delimiter
        assert torch.equal(batch.inputs[length + 1 :, b], torch.zeros(steps - length - 1, 6))
        seq = batch.inputs[:length, b, :5]
        assert torch.equal(batch.targets[length + 1 : 2 * length + 1, b], seq)
        expected_mask = torch.zeros(steps)
        expected_mask[length + 1 : 2 * length + 1] = 1
        assert torch.equal(batch.mask[:, b], expected_mask)
        assert batch.targets[:, b][expected_mask == 0].abs().sum() == 0
        assert batch.inputs[:length, b, 5].sum() == 0


def test_lengths_mix_within_bounds_and_fixed_level_is_exact():
    task = make(width=3, min_length=2, max_length=9)
    gen = torch.Generator().manual_seed(1)
    lengths = task.sample(256, gen, max_level=6, min_level=2).mask.sum(0)
    assert lengths.min() == 2 and lengths.max() == 6
    exact = task.sample(32, gen, max_level=9, min_level=9)
    assert torch.all(exact.mask.sum(0) == 9)
    assert exact.inputs.shape == (19, 32, 4)


def test_same_generator_state_gives_same_batch():
    task = make()
    a = task.sample(4, torch.Generator().manual_seed(7), max_level=10, min_level=1)
    b = task.sample(4, torch.Generator().manual_seed(7), max_level=10, min_level=1)
    c = task.sample(4, torch.Generator().manual_seed(8), max_level=10, min_level=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.inputs, c.inputs) or a.inputs.shape != c.inputs.shape


def test_metrics_count_wrong_bits_per_sequence():
    task = make(width=2, min_length=2, max_length=2)
    batch = task.sample(2, torch.Generator().manual_seed(0), max_level=2, min_level=2)
    logits = (batch.targets * 2 - 1) * 10  # perfectly confident and right
    perfect = task.metrics(logits, batch)
    assert perfect["bit_errors"] == 0 and perfect["accuracy"] == 1
    logits[3, 0, 0] = -logits[3, 0, 0]  # one wrong bit in sequence 0 (recall step 3)
    one_wrong = task.metrics(logits, batch)
    assert one_wrong["bit_errors"] == 0.5
    assert one_wrong["accuracy"] == 0.5
