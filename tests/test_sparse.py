"""The sparse memories (``memctl/models/sparse/``): SAM's read, write with the erase of the
least recently used row, and usage against float64 numpy references written with
explicit loops over batch, head and slot on a dense memory; the exact search against
the top K over all N; SAM's read at K = N against the dense content read
(``addressing.py``); gradcheck of SAM steps; gradients of the in-place memory over ten
steps against a plain-autograd out-of-place memory; what autograd keeps at N = 65,536;
the errors for a memory that has moved on; trace; a learning test."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from memctl.errors import UserError
from memctl.models import addressing, detach_state
from memctl.models.addressing import EPSILON
from memctl.models.sparse.access import MemoryMovedOn, SparseMemory, zeros
from memctl.models.sparse.faiss_index import AutoIndex, FaissIndex
from memctl.models.sparse.index import ExactIndex
from memctl.models.sparse.sam import (
    SAMConfig,
    SAMCore,
    SAMModel,
    SparseAccess,
    SparseAccessState,
    sparse_read,
)
from memctl.models.sparse.usage import DELTA, NEVER, LeastRecentlyUsed
from memctl.recipe import validate_recipe
from memctl.tasks.copy import CopyConfig, CopyTask

BATCH, SLOTS, WORD, HEADS, READS = 2, 10, 4, 2, 3
INTERFACE = (HEADS + 1) * WORD + HEADS + 2


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def np_cosine(key, row):
    dot = sum(k * r for k, r in zip(key, row, strict=True))
    key_norm = math.sqrt(sum(k * k for k in key) + EPSILON)
    row_norm = math.sqrt(sum(r * r for r in row) + EPSILON)
    return dot / (key_norm * row_norm)


def np_least_recent(last):
    """argmax of the usage t - last: the lowest last access, ties to the lowest slot."""
    return min(range(len(last)), key=lambda i: (last[i], i))


def np_access_step(memory, last, read_rows, read_weights, interface, step):
    """SAM's step on a dense memory ``[B, N, M]`` (a copy is returned), section 3 read
    literally: the write over every slot, the top K over every slot, usage over every slot.
    ``interface [B, RM + M + R + 2]`` is the access's interface vector."""
    memory, last = memory.copy(), last.copy()
    batch, slots, word = memory.shape
    heads, k = read_rows.shape[1:]
    new_rows = np.zeros(read_rows.shape, dtype=np.int64)
    new_weights = np.zeros(read_weights.shape)
    reads = np.zeros((batch, heads, word))
    erased = []
    for b in range(batch):
        v = interface[b]
        keys = v[: heads * word].reshape(heads, word)
        add = v[heads * word : (heads + 1) * word]
        strengths = [1 + math.log1p(math.exp(x)) for x in v[(heads + 1) * word : -2]]
        alpha, gamma = sigmoid(v[-2]), sigmoid(v[-1])
        least = np_least_recent(last[b])
        erased.append(least)
        write = [0.0] * slots
        for h in range(heads):
            for j in range(k):
                write[read_rows[b, h, j]] += alpha * gamma * read_weights[b, h, j] / heads
        write[least] += alpha * (1 - gamma)
        for i in range(slots):
            for m in range(word):
                kept = 0.0 if i == least else memory[b, i, m]
                memory[b, i, m] = kept + write[i] * add[m]
        total = write[:]
        for h in range(heads):
            similarity = [np_cosine(keys[h], memory[b, i]) for i in range(slots)]
            top = sorted(range(slots), key=lambda i, s=similarity: -s[i])[:k]
            exps = [math.exp(strengths[h] * similarity[i]) for i in top]
            for j, i in enumerate(top):
                new_rows[b, h, j] = i
                new_weights[b, h, j] = exps[j] / sum(exps)
                total[i] += new_weights[b, h, j]
                for m in range(word):
                    reads[b, h, m] += new_weights[b, h, j] * memory[b, i, m]
        for i in range(slots):
            if total[i] > DELTA:
                last[b, i] = step
    return memory, last, new_rows, new_weights, reads, erased


def access_module(slots=SLOTS, reads=READS, seed=0) -> SparseAccess:
    """A SparseAccess whose interface layer is the identity: its input is the interface
    vector itself."""
    torch.manual_seed(seed)
    access = SparseAccess(INTERFACE, slots, WORD, HEADS, reads).double()
    with torch.no_grad():
        access.interface.weight.copy_(torch.eye(INTERFACE))
        access.interface.bias.zero_()
    return access


def filled_state(access: SparseAccess, rows: torch.Tensor) -> SparseAccessState:
    """A new episode whose memory holds ``rows`` ``[B, N, M]`` (a differentiable input),
    every row written and none accessed yet."""
    batch, slots = rows.shape[:2]
    state = access.initial_state(batch, torch.device("cpu"), rows.dtype)
    everything = torch.arange(slots).expand(batch, slots)
    token = access.memory.assign(state.memory, everything, rows)
    access.index.update(everything, rows.detach())
    return state._replace(memory=token, version=torch.tensor(access.memory.version))


def dense(access: SparseAccess) -> torch.Tensor:
    return access.memory.buffer.clone()


def test_access_steps_match_the_dense_loop_reference():
    access = access_module()
    generator = torch.Generator().manual_seed(1)
    initial = torch.randn(BATCH, SLOTS, WORD, generator=generator, dtype=torch.float64)
    state = filled_state(access, initial)
    memory = initial.numpy().copy()
    last = np.full((BATCH, SLOTS), NEVER)
    rows, weights = state.read_rows.numpy(), state.read_weights.numpy()
    for step in range(8):
        interface = torch.randn(BATCH, INTERFACE, generator=generator, dtype=torch.float64)
        erased = access.usage.least_recent().tolist()
        reads, state, _ = access.step(interface, state)
        memory, last, rows, weights, np_reads, np_erased = np_access_step(
            memory, last, rows, weights, interface.numpy(), step
        )
        assert erased == np_erased
        np.testing.assert_allclose(dense(access).numpy(), memory, rtol=0, atol=1e-10)
        np.testing.assert_array_equal(state.read_rows.numpy(), rows)
        np.testing.assert_allclose(state.read_weights.detach().numpy(), weights, atol=1e-10)
        np.testing.assert_allclose(reads.detach().numpy(), np_reads, rtol=0, atol=1e-10)
        np.testing.assert_array_equal(access.usage.last_access.numpy(), last)
    assert (last >= 0).all()  # every slot accessed: the queue found the least used


def drive_least_recently_used(slots, count, batch, steps, window, block, scale, seed):
    """Random accesses of ``count`` rows a step (repeats; weights up to ``scale``, some
    below DELTA) against the loop reference at every step: the least recently used slot
    before the step and every slot's usage after it. Returns the LeastRecentlyUsed."""
    usage = LeastRecentlyUsed(slots, window=window, block=block)
    usage.reset(batch, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    last = np.full((batch, slots), NEVER)
    for step in range(steps):
        expected = [np_least_recent(last[b]) for b in range(batch)]
        assert usage.least_recent().tolist() == expected, step
        rows = torch.randint(0, slots, (batch, count), generator=generator)
        weights = torch.rand(batch, count, generator=generator, dtype=torch.float64) * scale
        usage.update(rows, weights)
        for b in range(batch):
            totals: dict[int, float] = {}
            for j in range(count):
                totals[int(rows[b, j])] = totals.get(int(rows[b, j]), 0.0) + float(weights[b, j])
            for i, total in totals.items():
                if total > DELTA:
                    last[b, i] = step
        assert (
            usage.usage(torch.arange(slots).expand(batch, slots)).tolist() == (step - last).tolist()
        )
    return usage


@pytest.mark.parametrize("steps", [40, 3000])
def test_least_recently_used_matches_the_loop_reference(steps):
    """Random accesses, some below DELTA, repeated rows; a window of 2 makes both searches
    move their window. Over 3,000 steps (12,000 queue entries an element) the queue drops
    its stale entries instead of growing, 7 entries at a time, and a reset still clears
    every slot accessed."""
    usage = drive_least_recently_used(9, 4, 3, steps, window=2, block=7, scale=0.01, seed=2)
    assert usage._queue.shape[1] == 1024
    usage.reset(3, torch.device("cpu"))
    assert (usage.last_access == NEVER).all()


def current_entries(usage):
    """Each batch element's current queue entries, in queue order."""
    length = usage._length
    queue, queue_stamps = usage._queue[:, :length], usage._queue_stamps[:, :length]
    current = usage._current(queue, queue_stamps)
    return [queue[b][current[b]].tolist() for b in range(len(queue))]


def test_dropping_stale_entries_keeps_each_current_one_once_in_order():
    """Element 0 accesses 3 slots over and over (most entries stale), element 1 a new slot
    a step (none stale); compacted 4 entries at a time, each keeps its current entries in
    order at the front, the rest of the kept length holds no entry."""
    usage = LeastRecentlyUsed(40, window=4, block=4)
    usage.reset(2, torch.device("cpu"))
    for step in range(30):
        rows = torch.tensor([[step % 3], [step]])
        usage.update(rows, torch.ones(2, 1, dtype=torch.float64))
    before = current_entries(usage)
    usage._make_room(1)
    after = current_entries(usage)
    assert after == before and after[0] == [0, 1, 2] and after[1] == list(range(30))
    assert usage._length == 30
    assert (usage._queue[0, 3:30] == NEVER).all()


def test_the_access_queue_grows_to_hold_its_current_entries_and_no_further():
    """More slots accessed than three quarters of the first queue (1,024 entries) hold:
    dropping the stale entries is not enough, so the queue grows, keeping the search
    exact; over a long episode it stays within about 8 N / 3 entries, two int32 numbers
    each."""
    slots, count = 1200, 8
    usage = drive_least_recently_used(
        slots, count, 2, 3000, window=64, block=100, scale=0.02, seed=3
    )
    assert 1024 < usage._queue.shape[1] <= 8 * (slots + count) / 3 + count
    assert usage._queue.dtype == usage._queue_stamps.dtype == torch.int32
    usage.reset(2, torch.device("cpu"))
    assert (usage.last_access == NEVER).all()


def test_a_long_episode_keeps_the_assigned_rows_compact_and_reset_clears_them():
    memory = SparseMemory(50, 2)
    token = memory.reset(3, torch.device("cpu"), torch.float64)
    generator = torch.Generator().manual_seed(8)
    for _ in range(3000):
        rows = torch.randint(0, 50, (3, 2), generator=generator)
        token = memory.assign(
            token, rows, torch.rand(3, 2, 2, generator=generator, dtype=torch.float64) + 1
        )
    assert len(memory._assigned) < 1024
    assert sum(map(len, memory._assigned)) <= 3 * 50 + 1024 * 6  # not 3,000 steps of 6
    assert (memory.buffer != 0).any(-1).sum() == 150  # every slot written
    memory.reset(3, torch.device("cpu"), torch.float64)
    assert (memory.buffer == 0).all()


def test_reset_clears_only_what_was_touched():
    model = SAMCore(3, 2, memory_size=300, word_size=4, read_heads=2, sparse_reads=2)
    model(torch.randn(6, 2, 3))
    access = model.memories[0]
    buffer = access.memory.buffer
    assert buffer.abs().sum() > 0 and access.index.written.any()
    model.initial_state(2, torch.device("cpu"), torch.float32)
    assert access.memory.buffer is buffer and buffer.abs().sum() == 0
    assert not access.index.written.any()
    assert (access.usage.last_access == NEVER).all()


def smaps_fields(address):
    """/proc/self/smaps' fields (kB) of the mapping holding ``address``."""
    fields = {}
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and line.endswith(" kB"):
            fields[head[:-1]] = int(line.split()[1])
    return fields


needs_smaps = pytest.mark.skipif(
    not Path("/proc/self/smaps").exists(), reason="needs Linux's smaps"
)


@needs_smaps
def test_zeros_take_ram_only_at_the_pages_written():
    """A 256 MiB buffer of ``access.zeros`` with 16 rows written far apart holds about 16
    pages of 4 KiB (no transparent huge pages), and reading it all adds none."""
    buffer = zeros((8, 2**18, 32), torch.device("cpu"), torch.float32)
    buffer.view(-1, 32)[torch.arange(16) * 2**17] = 1.0
    assert buffer.sum() == 16 * 32
    fields = smaps_fields(buffer.data_ptr())
    assert fields["Size"] >= 2**18 and fields["AnonHugePages"] == 0
    assert fields["Rss"] <= 16 * 4 + 8, fields  # kB


def test_a_backward_pass_keeps_a_gradient_of_the_touched_rows_and_lets_it_go_at_its_end():
    """Each backward pass keeps a gradient buffer of the rows its segment touched (256 of
    2^16 an element), not of the memory, and drops it at its segment's first tracked
    operation, so the next chunk's forward holds none of it; each pass's gradients are
    still whole."""
    memory = SparseMemory(2**16, 32)
    token = memory.reset(2, torch.device("cpu"), torch.float32)
    end_backward = memory._end_backward
    held = []

    def record(operation):
        held.append(tuple(memory._grad.shape))
        end_backward(operation)

    memory._end_backward = record
    for chunk in range(4):
        weight = torch.ones(1, requires_grad=True)
        rows = (torch.arange(256) * 256 + 32 * chunk).expand(2, -1)
        start = token.detach()  # a chunk from the last one's detached state, as a model's
        memory.check(start, memory.version)
        old, token = memory.gather(start, rows)  # untracked
        token = memory.assign(token, rows, old + weight.expand(2, 256, 32))
        values, token = memory.gather(token, rows)
        (values * (chunk + 1)).sum().backward()
        assert memory._grad is None
        assert weight.grad.item() == 2 * 256 * 32 * (chunk + 1)
    assert held == [(2 * 256, 32)] * 8


@pytest.mark.parametrize("seed", range(4))
def test_exact_index_gives_the_top_k_over_all_slots(seed):
    """Written rows scattered over the slots (near the end too), some rows zero, keys
    whose best matches are sometimes unwritten (score 0) rows."""
    generator = torch.Generator().manual_seed(seed)
    slots, batch, k = 40, 3, 4
    access = SparseAccess(8, slots, WORD, HEADS, k).double()
    state = access.initial_state(batch, torch.device("cpu"), torch.float64)
    written = [torch.randperm(slots, generator=generator)[: 5 + 3 * b] for b in range(batch)]
    count = max(len(w) for w in written)
    rows = torch.stack([torch.cat([w, w[:1].repeat(count - len(w))]) for w in written])
    values = torch.randn(batch, count, WORD, generator=generator, dtype=torch.float64)
    values[:, 0] = 0  # a written row that is zero
    access.memory.assign(state.memory, rows, values.gather(1, _first_of(rows, values)))
    access.index.update(rows, values)
    keys = torch.randn(batch, HEADS, WORD, generator=generator, dtype=torch.float64)
    candidates = access.index.candidates(keys, k)
    assert candidates.shape[-1] >= k
    for b in range(batch):
        assert len(set(candidates[b, 0].tolist())) == candidates.shape[-1]
    nearest = access.nearest(keys)
    similarity = addressing.cosine_similarity(access.memory.buffer, keys)  # [B, H, N]
    chosen = similarity.gather(2, nearest).sort(-1, descending=True).values
    expected = similarity.topk(k, dim=-1).values
    torch.testing.assert_close(chosen, expected, rtol=0, atol=1e-12)


def _first_of(rows, values):
    """Gather positions that give every copy of a row its first copy's value."""
    same = rows.unsqueeze(2) == rows.unsqueeze(1)
    first = same.long().argmax(2)  # [B, J]
    return first.unsqueeze(2).expand_as(values)


def test_read_at_k_equals_n_is_the_dense_content_read():
    access = access_module(slots=SLOTS, reads=SLOTS)
    generator = torch.Generator().manual_seed(3)
    state = access.initial_state(BATCH, torch.device("cpu"), torch.float64)
    for _ in range(4):
        interface = torch.randn(BATCH, INTERFACE, generator=generator, dtype=torch.float64)
        reads, state, _ = access.step(interface, state)
        keys = interface[:, : HEADS * WORD].view(BATCH, HEADS, WORD)
        strengths = 1 + torch.nn.functional.softplus(interface[:, (HEADS + 1) * WORD : -2])
        memory = access.memory.buffer
        weights = addressing.content_weights(memory, keys, strengths)
        torch.testing.assert_close(reads, addressing.read(memory, weights), rtol=0, atol=1e-10)


def test_sparse_read_matches_the_loop_reference():
    generator = torch.Generator().manual_seed(4)
    rows = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    keys = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    strengths = torch.rand(2, 3, generator=generator, dtype=torch.float64) * 5
    weights, reads = sparse_read(rows, keys, strengths)
    for b in range(2):
        for h in range(3):
            exps = [
                math.exp(strengths[b, h] * np_cosine(keys[b, h].tolist(), rows[b, h, k].tolist()))
                for k in range(4)
            ]
            for k in range(4):
                assert abs(weights[b, h, k].item() - exps[k] / sum(exps)) < 1e-12
            for m in range(5):
                expected = sum(exps[k] / sum(exps) * rows[b, h, k, m].item() for k in range(4))
                assert abs(reads[b, h, m].item() - expected) < 1e-12


def test_gradcheck_of_sam_steps():
    """Two steps (the second writes to the rows the first read) from a memory that is a
    differentiable input; a fresh copy of the access for every evaluation."""
    template = access_module(slots=7)
    generator = torch.Generator().manual_seed(5)
    initial = torch.randn(BATCH, 7, WORD, generator=generator, dtype=torch.float64)
    interfaces = torch.randn(2, BATCH, INTERFACE, generator=generator, dtype=torch.float64)

    def steps(initial, interfaces):
        access = copy.deepcopy(template)
        state = filled_state(access, initial)
        outputs = []
        for interface in interfaces:
            reads, state, _ = access.step(interface, state)
            outputs.append(reads)
        return torch.stack(outputs)

    assert torch.autograd.gradcheck(
        steps, (initial.requires_grad_(), interfaces.requires_grad_()), eps=1e-6, atol=1e-7
    )


def naive_steps(access: SparseAccess, initial, interfaces):
    """The same steps as SparseAccess.step on an ordinary memory tensor replaced out of
    place at every step (the dense equations: write weights scattered over all N, the
    erase a one-hot row), plain autograd; the same index and usage choose the rows."""
    memory, batch = initial, initial.shape[0]
    state = access.initial_state(batch, torch.device("cpu"), initial.dtype)
    everything = torch.arange(initial.shape[1]).expand(batch, -1)
    access.index.update(everything, initial.detach())
    rows, weights = state.read_rows, state.read_weights
    access.memory.peek = lambda at: memory.detach().gather(1, at.unsqueeze(2).expand(-1, -1, WORD))
    outputs = []
    for interface in interfaces:
        linear, oneplus, gates = access.interface(interface).split(access.sizes, 1)
        keys, add = linear.split([HEADS * WORD, WORD], 1)
        keys = keys.view(batch, HEADS, WORD)
        strengths = 1 + torch.nn.functional.softplus(oneplus)
        alpha, gamma = torch.sigmoid(gates).unbind(1)
        least = access.usage.least_recent()
        write_rows = torch.cat([rows.flatten(1), least[:, None]], 1)
        per_row = torch.cat(
            [(alpha * gamma / HEADS)[:, None] * weights.flatten(1), (alpha * (1 - gamma))[:, None]],
            1,
        )
        write = torch.zeros(batch, initial.shape[1], dtype=initial.dtype)
        write = write.scatter_add(1, write_rows, per_row)
        erase = torch.nn.functional.one_hot(least, initial.shape[1]).to(initial.dtype)
        memory = memory * (1 - erase).unsqueeze(2) + write.unsqueeze(2) * add.unsqueeze(1)
        access.index.update(write_rows, memory.detach())
        with torch.no_grad():
            rows = access.nearest(keys.detach())
        gathered = memory.gather(1, rows.flatten(1).unsqueeze(2).expand(-1, -1, WORD))
        weights, reads = sparse_read(gathered.view(batch, HEADS, -1, WORD), keys, strengths)
        access.usage.update(
            torch.cat([write_rows, rows.flatten(1)], 1),
            torch.cat([per_row, weights.flatten(1)], 1).detach(),
        )
        outputs.append(reads)
    return torch.stack(outputs), memory


def test_ten_steps_give_plain_autograds_gradients_and_keep_the_end_state():
    torch.manual_seed(6)
    access = SparseAccess(12, 20, WORD, HEADS, READS).double()
    naive = copy.deepcopy(access)
    generator = torch.Generator().manual_seed(6)
    initial = torch.randn(BATCH, 20, WORD, generator=generator, dtype=torch.float64)
    interfaces = torch.randn(10, BATCH, 12, generator=generator, dtype=torch.float64)
    target = torch.randn(10, BATCH, HEADS, WORD, generator=generator, dtype=torch.float64)

    def gradients(module, run):
        inputs = (initial.clone().requires_grad_(), interfaces.clone().requires_grad_())
        outputs, memory = run(module, *inputs)
        ((outputs - target) ** 2).sum().backward()
        grads = [inputs[0].grad, inputs[1].grad, *(p.grad for p in module.parameters())]
        return grads, memory.detach()

    def in_place(module, initial, interfaces):
        state = filled_state(module, initial)
        outputs = []
        for interface in interfaces:
            reads, state, _ = module.step(interface, state)
            outputs.append(reads)
        return torch.stack(outputs), module.memory.buffer

    ours, end_state = gradients(access, in_place)
    theirs, naive_end = gradients(naive, naive_steps)
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(end_state, naive_end, rtol=0, atol=1e-12)  # after backward


def test_nothing_saved_for_backward_has_n_rows():
    slots = 65_536
    model = SAMCore(3, 2, memory_size=slots, word_size=8, read_heads=2, sparse_reads=4)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs, _ = model(torch.randn(20, 2, 3))
    outputs.sum().backward()
    assert saved and max(math.prod(shape) for shape in saved) < slots
    assert model.memories[0].interface.weight.grad.abs().sum() > 0


def test_a_second_backward_pass_starts_from_a_clean_gradient_buffer():
    """Rows read before they are written leave their gradient in the buffer at the end of
    a pass; the next pass through the same graph must not see it."""
    model = SAMCore(3, 2, memory_size=30, word_size=4, read_heads=2, sparse_reads=3).double()
    outputs, _ = model(torch.randn(8, 2, 3, dtype=torch.float64))
    loss = (outputs**2).sum()
    parameters = list(model.parameters())
    first = torch.autograd.grad(loss, parameters, retain_graph=True)
    second = torch.autograd.grad(loss, parameters)
    for one, two in zip(first, second, strict=True):
        torch.testing.assert_close(one, two, rtol=0, atol=0)


def test_backward_after_the_memory_moved_on_is_an_error():
    model = SAMCore(3, 2, memory_size=50, word_size=4, read_heads=1, sparse_reads=2)
    inputs = torch.randn(5, 2, 3)
    first, state = model(inputs)
    model(inputs)  # a new episode: the memory is reset
    with pytest.raises(MemoryMovedOn, match="moved on"):
        first.sum().backward()
    with pytest.raises(MemoryMovedOn, match="version"):
        model(inputs, state)


def test_chunks_carry_the_memory_through_backward():
    """Truncated backpropagation: each chunk's backward before the next chunk's forward,
    from the detached state; the memory holds each chunk's end state after its backward."""
    model = SAMCore(3, 2, memory_size=50, word_size=4, read_heads=1, sparse_reads=2)
    inputs = torch.randn(8, 2, 3)
    straight, _ = model(inputs)
    state = None
    chunks = []
    for chunk in inputs.split(4):
        outputs, state = model(chunk, state)
        before = model.memories[0].memory.buffer.clone()
        outputs.sum().backward()
        assert torch.equal(model.memories[0].memory.buffer, before)
        state = detach_state(state)
        chunks.append(outputs.detach())
    torch.testing.assert_close(torch.cat(chunks), straight.detach(), rtol=0, atol=1e-6)


def test_config_errors_name_the_field():
    task = {"type": "copy", "width": 4}
    small = {"type": "sam", "memory_size": 8, "sparse_reads": 9}
    with pytest.raises(UserError, match=r"model: .*sparse_reads \(9\) must be at most"):
        validate_recipe({"model": small, "task": task}, "r.yaml")
    with pytest.raises(UserError, match=r"model\.rebuild_every"):
        validate_recipe({"model": {"type": "sam", "rebuild_every": 0}, "task": task}, "r.yaml")


@pytest.mark.parametrize(
    ("kind", "slots", "chosen", "search"),
    [("exact", 2**17, ExactIndex, "exact search"), ("faiss", 64, FaissIndex, "faiss search"),
     ("auto", 2**17 - 1, ExactIndex, "exact search"),
     ("auto", 2**17, AutoIndex, "exact search, faiss from 131,072 rows written")],
)  # fmt: skip
def test_model_index_chooses_the_search(kind, slots, chosen, search):
    config = SAMConfig(memory_size=slots, word_size=4, read_heads=1, index=kind, rebuild_every=7)
    model = SAMModel(config, 5, 4)
    index = model.memories[0].index
    assert type(index) is chosen
    assert model.describe_backend(8) == f"sparse access in place, {search}"
    if chosen is not ExactIndex:
        assert (index if chosen is FaissIndex else index.faiss).rebuild_every == 7


def test_auto_index_switches_to_faiss_on_the_models_memory():
    """`auto` at 2^17 slots with its threshold lowered to 20 rows: the episode's writes
    pass it, faiss is built from the model's live memory, and the outputs equal the exact
    search's (under 78 rows faiss searches its one list exhaustively)."""
    torch.manual_seed(0)
    config = SAMConfig(memory_size=2**17, word_size=4, read_heads=1, controller_size=8)
    model = SAMModel(config, 5, 4)
    inputs = torch.randn(12, 2, 5)
    exact_outputs, _ = model(inputs)
    auto = model.memories[0].index
    auto.threshold = 20
    outputs, _ = model(inputs)
    assert auto.active is auto.faiss
    torch.testing.assert_close(outputs, exact_outputs)
    model(inputs[:3])  # a new episode starts exact again
    assert auto.active is auto.exact


def test_trace_covers_the_touched_slots_only():
    config = SAMConfig(memory_size=4096, word_size=6, read_heads=2, sparse_reads=3)
    model = SAMModel(config, 5, 4)
    inputs = torch.randn(7, 2, 5)
    with torch.no_grad():
        logits, trace = model.trace(inputs)
    slots = trace["slots"][0, 0]
    width = slots.numel()
    assert width < 100 and torch.equal(slots, slots.unique())
    assert trace["read_weights"].shape == (7, 2, 2, width)
    assert trace["write_weights"].shape == (7, 2, 1, width)
    assert trace["memory"].shape == (8, 2, width, 6)
    assert trace["usage"].shape == (7, 2, width)
    torch.testing.assert_close(trace["read_weights"].sum(-1), torch.ones(7, 2, 2))
    end = model.memories[0].memory.peek(slots.expand(2, width))
    torch.testing.assert_close(trace["memory"][-1], end, rtol=0, atol=0)
    assert (trace["memory"][0] == 0).all()
    torch.testing.assert_close(logits, model(inputs)[0].detach(), rtol=0, atol=0)


@pytest.mark.slow
def test_sam_learns_a_small_copy():
    """Copy of up to 3 vectors of 4 bits with 16 slots: the loss falls more than 5x in
    600 steps (about 30 s on one thread)."""
    torch.manual_seed(0)
    config = SAMConfig(
        memory_size=16, word_size=8, read_heads=1, sparse_reads=2, controller_size=64
    )
    task = CopyTask(CopyConfig(width=4, min_length=1, max_length=3))
    model = SAMModel(config, task.input_size, task.output_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(600):
        batch = task.sample(16, generator, max_level=3, min_level=1)
        logits, _ = model(batch.inputs)
        loss = task.loss(logits, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < first / 5, (first, last)
