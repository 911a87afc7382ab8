"""The faiss search of the sparse memories: its candidates, rescored exactly, against a
brute-force top-k over the live memory."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from memctl.models.addressing import cosine_similarity
from memctl.models.sparse.faiss_index import (
    FAISS_MIN_ROWS,
    AutoIndex,
    FaissIndex,
    choose_index,
    list_count,
    probe_count,
    unit_rows,
)
from memctl.models.sparse.index import ExactIndex


def rescored_top(memory, keys, candidates, k):
    """The caller's side: cosine similarity on the candidates' live rows, top k."""
    batch, heads, width = candidates.shape
    rows = memory[torch.arange(batch)[:, None], candidates.reshape(batch, -1)]
    rows = rows.reshape(batch, heads, width, -1)
    scores = torch.stack(
        [
            torch.stack(
                [
                    cosine_similarity(rows[b, h][None], keys[b, h][None, None])[0, 0]
                    for h in range(heads)
                ]
            )
            for b in range(batch)
        ]
    )
    top = scores.topk(k, dim=-1)
    return top.values, candidates.gather(-1, top.indices)


def brute_top(memory, keys, k):
    return cosine_similarity(memory, keys).topk(k, dim=-1)


def reader(memory):
    """The memory's ``peek``: the current contents of slots ``[B, J]``."""
    return lambda rows: memory[torch.arange(memory.shape[0])[:, None], rows]


def write(index, memory, rows, values):
    memory[torch.arange(memory.shape[0])[:, None], rows] = values
    index.update(rows, values)


def test_rescored_candidates_equal_brute_force_on_small_memory():
    generator = torch.Generator().manual_seed(0)
    batch, slots, word, heads, k = 3, 200, 8, 2, 4
    memory = torch.zeros(batch, slots, word, dtype=torch.float64)
    index = FaissIndex(reader(memory), rebuild_every=5)
    index.reset(batch, slots, word)
    for step in range(40):
        rows = torch.randint(0, slots, (batch, 3), generator=generator)
        write(index, memory, rows, torch.randn(batch, 3, word, generator=generator).double())
        keys = torch.randn(batch, heads, word, generator=generator, dtype=torch.float64)
        candidates = index.candidates(keys, k)
        assert candidates.shape == (batch, heads, 6 * k)
        assert all(len(set(c.tolist())) == 6 * k for c in candidates.reshape(-1, 6 * k))
        values, chosen = rescored_top(memory, keys, candidates, k)
        expected = brute_top(memory, keys, k)
        # Unwritten rows all score 0, so compare scores, and slots where they are nonzero.
        torch.testing.assert_close(values, expected.values, rtol=0, atol=1e-12)
        nonzero = expected.values != 0
        assert torch.equal(chosen[nonzero], expected.indices[nonzero]), step
    assert index.indices[0] is not None  # the rebuilt faiss index served the later steps


def test_unwritten_rows_beat_rows_against_the_key():
    """Rows never written are zero and score 0, above every row opposite the key."""
    generator = torch.Generator().manual_seed(3)
    slots, word, k = 50, 8, 4
    direction = torch.nn.functional.normalize(torch.randn(word, generator=generator), dim=0)
    rows = direction + 0.1 * torch.randn(24, word, generator=generator, dtype=torch.float64)
    memory = torch.zeros(1, slots, word, dtype=torch.float64)
    index = FaissIndex(reader(memory), rebuild_every=3)
    index.reset(1, slots, word)
    for step in range(4):  # before and after a rebuild
        write(
            index,
            memory,
            torch.arange(6 * step, 6 * step + 6)[None],
            rows[None, 6 * step : 6 * step + 6],
        )
    keys = -direction.double().expand(1, 1, word)
    values, chosen = rescored_top(memory, keys, index.candidates(keys, k), k)
    assert torch.equal(values, torch.zeros(1, 1, k, dtype=torch.float64))
    assert chosen.min() >= 24


def test_rebuild_trains_when_one_element_holds_most_rows():
    batch, slots, word = 40, 3_000, 8
    rows = torch.zeros(batch, slots, dtype=torch.long)
    rows[0] = torch.arange(slots)
    memory = torch.zeros(batch, slots, word)
    index = FaissIndex(reader(memory), rebuild_every=1)
    index.reset(batch, slots, word)
    write(index, memory, rows, torch.randn(batch, slots, word))
    assert index.indices[0].nlist == list_count(slots) > 1
    assert [index.indices[b].ntotal for b in (0, 1)] == [slots, 1]


def test_a_rebuild_read_in_blocks_indexes_each_written_row_once_at_its_value(monkeypatch):
    """Reading the memory a few slots at a time builds the index a single read builds:
    every written slot once, scored on its current row."""
    from memctl.models.sparse import faiss_index

    generator = torch.Generator().manual_seed(9)
    batch, slots, word = 3, 400, 6
    memory = torch.zeros(batch, slots, word)
    built = []
    for chunk in (slots, 7):
        monkeypatch.setattr(faiss_index, "READ_CHUNK", chunk)
        index = FaissIndex(reader(memory), rebuild_every=10**6)
        index.reset(batch, slots, word)
        generator.manual_seed(9)
        for _ in range(30):
            rows = torch.randint(0, slots, (batch, 5), generator=generator)
            write(index, memory, rows, torch.randn(batch, 5, word, generator=generator))
        index.rebuild()
        built.append(index)
    keys = unit_rows(torch.randn(batch, 2, word, generator=generator))
    for b in range(batch):
        whole, blocks = (index.indices[b] for index in built)
        assert whole.ntotal == blocks.ntotal == built[0].written[b].sum()
        whole.nprobe = blocks.nprobe = whole.nlist
        found = [index.search(keys[b], whole.ntotal) for index in (whole, blocks)]
        assert sorted(found[1][1][0]) == np.flatnonzero(built[0].written[b]).tolist()
        np.testing.assert_array_equal(found[0][0], found[1][0])
        np.testing.assert_array_equal(found[0][1], found[1][1])


def test_rebuild_before_any_write_builds_nothing():
    index = FaissIndex(reader(torch.zeros(2, 100, 4)), rebuild_every=1)
    index.reset(2, 100, 4)
    index.rebuild()
    assert index.indices == [None, None]
    assert index.candidates(torch.randn(2, 1, 4), 4).shape == (2, 1, 24)


def test_fewer_slots_than_candidates():
    memory = torch.zeros(1, 5, 4)
    index = FaissIndex(reader(memory), rebuild_every=1)
    index.reset(1, 5, 4)
    write(index, memory, torch.tensor([[0, 3]]), torch.randn(1, 2, 4))
    candidates = index.candidates(torch.randn(1, 2, 4), 4)
    assert candidates.shape == (1, 2, 5)
    assert sorted(candidates[0, 0].tolist()) == [0, 1, 2, 3, 4]


def test_recall_on_random_unit_rows():
    generator = torch.Generator().manual_seed(1)
    batch, slots, word, k = 2, 20_000, 32, 4
    memory = torch.nn.functional.normalize(
        torch.randn(batch, slots, word, generator=generator), dim=-1
    )
    index = FaissIndex(reader(memory), rebuild_every=10)
    index.reset(batch, slots, word)
    for rows in torch.arange(slots).reshape(10, -1):
        index.update(rows.expand(batch, -1), memory[:, rows])
    assert index.recent_count.max() == 0  # all served by the rebuilt faiss index
    assert probe_count(list_count(slots)) < list_count(slots)  # and not exhaustively
    keys = torch.randn(batch, 64, word, generator=generator)
    _, chosen = rescored_top(memory.double(), keys.double(), index.candidates(keys, k), k)
    expected = brute_top(memory, keys, k).indices
    pairs = zip(chosen.reshape(-1, k).tolist(), expected.reshape(-1, k).tolist(), strict=True)
    hits = sum(len(set(a) & set(e)) for a, e in pairs)
    assert hits / expected.numel() >= 0.8


def test_updates_after_rebuild_are_seen():
    generator = torch.Generator().manual_seed(2)
    batch, slots, word = 2, 5_000, 16
    memory = torch.randn(batch, slots, word, generator=generator)
    index = FaissIndex(reader(memory), rebuild_every=2)
    index.reset(batch, slots, word)
    index.update(torch.arange(slots).expand(batch, -1), memory)
    index.update(torch.arange(slots).expand(batch, -1), memory)  # the rebuild
    rows = torch.randint(0, slots, (batch, 50), generator=generator)
    old = memory[torch.arange(batch)[:, None], rows]
    new = torch.randn(batch, 50, word, generator=generator)
    write(index, memory, rows, new)
    assert [index.indices[b].ntotal for b in range(batch)] == [slots] * batch  # a snapshot
    for _ in range(2):  # before and after the next rebuild
        _, chosen = rescored_top(memory, new, index.candidates(new, 1), 1)
        assert torch.equal(chosen[..., 0], rows)
        _, chosen = rescored_top(memory, old, index.candidates(old, 1), 1)
        assert not torch.equal(chosen[..., 0], rows)  # old contents are gone
        index.update(rows[:, :1], new[:, :1])
    assert index.recent_count.max() == 1


def test_the_recent_buffer_is_reserved_once_for_a_snapshot_interval():
    """The first update reserves the rows ``rebuild_every`` steps can write (at most N);
    no later step copies the buffer to grow it."""
    generator = torch.Generator().manual_seed(5)
    batch, slots, word, written = 2, 1_000, 8, 3
    memory = torch.randn(batch, slots, word, generator=generator)
    index = FaissIndex(reader(memory), rebuild_every=50)
    index.reset(batch, slots, word)
    buffers = []
    for _ in range(49):
        rows = torch.randint(0, slots, (batch, written), generator=generator)
        write(index, memory, rows, torch.randn(batch, written, word, generator=generator))
        buffers.append((index.recent_rows, index.recent_slots))
    assert all(rows is buffers[0][0] and slots_ is buffers[0][1] for rows, slots_ in buffers)
    assert index.recent_rows.shape == (batch, 50 * written, word)
    assert index.recent_count.max() > 0
    index = FaissIndex(reader(memory), rebuild_every=10**6)
    index.reset(batch, slots, word)
    write(index, memory, torch.arange(written).expand(batch, -1), memory[:, :written])
    assert index.recent_slots.shape == (batch, slots)


def test_snapshot_entries_written_since_are_left_to_the_recent_search():
    """The faiss snapshot still finds a rewritten slot by its old row; the candidates
    leave it out there, so it is found only where its current row ranks it."""
    generator = torch.Generator().manual_seed(4)
    slots, word, k = 2_000, 16, 1
    memory = torch.randn(1, slots, word, generator=generator)
    index = FaissIndex(reader(memory), rebuild_every=1)
    index.reset(1, slots, word)
    index.update(torch.arange(slots)[None], memory)  # the snapshot
    index.rebuild_every = 10**9
    rows = torch.arange(1000, 1020)[None]
    old = memory[:, 1000:1020].clone()
    write(index, memory, rows, torch.randn(1, 20, word, generator=generator))
    keys = old[:, :1]  # slot 1000's old row

    assert index.indices[0].search(unit_rows(keys[0]), 1)[1][0, 0] == 1000
    assert index._recent_top(unit_rows(keys), k)[0, 0, 0] != 1000  # ranked lower now
    assert 1000 not in index.candidates(keys, k)[0, 0].tolist()


def test_choose_index():
    def peek(rows):
        raise AssertionError("peek is only for a rebuild")

    assert isinstance(choose_index("exact", 2**20, peek), ExactIndex)
    assert isinstance(choose_index("faiss", 64, peek), FaissIndex)
    assert isinstance(choose_index("auto", FAISS_MIN_ROWS - 1, peek), ExactIndex)
    chosen = choose_index("auto", FAISS_MIN_ROWS, peek, rebuild_every=7)
    assert isinstance(chosen, AutoIndex) and chosen.faiss.rebuild_every == 7
    assert chosen.threshold == FAISS_MIN_ROWS
    with pytest.raises(ValueError, match="auto, exact or faiss"):
        choose_index("flann", 64, peek)


def test_auto_index_is_exact_until_the_threshold_then_faiss_from_the_live_rows():
    """Exact (the same candidates as ExactIndex) while every element has written fewer
    than `threshold` rows; at the update that reaches it, a faiss index of the written
    rows at their current values, whose rescored candidates are the brute-force top k;
    a reset goes back to exact."""
    generator = torch.Generator().manual_seed(3)
    batch, slots, word, heads, k, threshold = 2, 400, 6, 2, 3, 90
    memory = torch.zeros(batch, slots, word, dtype=torch.float64)

    def peek(rows):
        return memory[torch.arange(batch)[:, None], rows]

    auto, exact = AutoIndex(peek, rebuild_every=5, threshold=threshold), ExactIndex()
    for _ in range(2):
        memory.zero_()
        auto.reset(batch, slots, word)
        exact.reset(batch, slots, word)
        for _ in range(40):
            rows = torch.randint(0, slots, (batch, 4), generator=generator)
            values = torch.randn(batch, 4, word, generator=generator, dtype=torch.float64)
            write(auto, memory, rows, values)
            exact.update(rows, values)
            keys = torch.randn(batch, heads, word, generator=generator, dtype=torch.float64)
            candidates = auto.candidates(keys, k)
            if exact.most_written() < threshold:
                assert auto.active is auto.exact
                assert torch.equal(candidates, exact.candidates(keys, k))
            else:
                assert auto.active is auto.faiss
                assert auto.describe() == "exact search, faiss from 90 rows written"
                expected = brute_top(memory, keys, k)
                found, _ = rescored_top(memory, keys, candidates, k)
                torch.testing.assert_close(found, expected.values)
        assert auto.active is auto.faiss  # 40 steps of 4 rows pass 90 distinct rows


def test_importing_memctl_does_not_import_faiss():
    code = (
        "import sys, memctl, memctl.cli, memctl.models, memctl.models.sparse.faiss_index\n"
        "assert 'faiss' not in sys.modules, 'faiss imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reset_clears_what_the_episode_wrote_and_searches_as_a_new_index():
    """A reset of the same sizes clears only the written slots' flags and recent
    positions (the arrays are reused, the written slots listed once each), and the next
    episode's candidates are a fresh index's."""
    generator = torch.Generator().manual_seed(5)
    batch, slots, word, heads, k = 2, 300, 6, 2, 3
    memories = [torch.zeros(batch, slots, word, dtype=torch.float64) for _ in range(2)]
    used, fresh = (FaissIndex(reader(memory), rebuild_every=4) for memory in memories)
    used.reset(batch, slots, word)
    first = memories[0]
    for _ in range(10):
        rows = torch.randint(0, slots, (batch, 4), generator=generator)
        write(used, first, rows, torch.randn(batch, 4, word, generator=generator).double())
    arrays = used.written, used.recent_position, used.written_slots
    assert used.written.any() and used.recent_position.any()
    for b in range(batch):
        listed = used.written_slots[b, : used.written_count[b]]
        assert sorted(listed) == np.flatnonzero(used.written[b]).tolist()
    used.reset(batch, slots, word)
    fresh.reset(batch, slots, word)
    assert used.written is arrays[0] and used.recent_position is arrays[1]
    assert used.written_slots is arrays[2] and not used.written_count.any()
    assert not used.written.any() and not used.recent_position.any()
    first.zero_()
    second = memories
    for _ in range(9):
        rows = torch.randint(0, slots, (batch, 4), generator=generator)
        values = torch.randn(batch, 4, word, generator=generator).double()
        for index, memory in zip((used, fresh), second, strict=True):
            write(index, memory, rows, values)
        keys = torch.randn(batch, heads, word, generator=generator, dtype=torch.float64)
        assert torch.equal(used.candidates(keys, k), fresh.candidates(keys, k))


def test_snapshot_refreshes_and_trains_again_as_the_memory_fills_and_turns_over():
    """Every rebuild_every steps the rows written since replace their snapshot entries
    under the lists trained before (a refresh: the faiss index finds a rewritten slot at
    its new row and not at its old one), and the lists are trained again once an
    element's rows have doubled since the last training, or as many rows as it saw have
    been refreshed in since."""
    generator = torch.Generator().manual_seed(6)
    slots, word, written = 4_000, 16, 400
    memory = torch.zeros(1, slots, word)
    index = FaissIndex(reader(memory), rebuild_every=1)
    index.reset(1, slots, word)
    first = torch.arange(written)[None]
    write(index, memory, first, torch.randn(1, written, word, generator=generator))
    assert index.trained_rows == written and index.indices[0].nlist == list_count(written)
    trained = index.indices[0]

    rows = torch.arange(0, 100)[None]  # rewritten: a refresh
    old = memory[:, :100].clone()
    write(index, memory, rows, torch.randn(1, 100, word, generator=generator))
    assert index.indices[0] is trained and index.indices[0].ntotal == written
    assert index.recent_count.max() == 0
    found = index.indices[0].search(unit_rows(memory[0, :100]), 1)[1][:, 0]
    assert (found == rows[0].numpy()).mean() >= 0.9
    stale = index.indices[0].search(unit_rows(old[0]), 1)[1][:, 0] == rows[0].numpy()
    assert stale.mean() <= 0.1  # the old rows' entries are gone (before: all found there)

    rows = torch.arange(100, 300)[None]  # 300 of the 400 rows refreshed in: no training yet
    write(index, memory, rows, torch.randn(1, 200, word, generator=generator))
    assert index.indices[0] is trained
    rows = torch.arange(300, 400)[None]  # 400: the memory turned over once
    write(index, memory, rows, torch.randn(1, 100, word, generator=generator))
    assert index.indices[0] is not trained and index.trained_rows == written
    trained = index.indices[0]

    rows = torch.arange(written, 2 * written)[None]  # new rows: 800, twice the training's
    write(index, memory, rows, torch.randn(1, written, word, generator=generator))
    assert index.indices[0] is not trained and index.trained_rows == 2 * written
    assert index.indices[0].nlist == list_count(2 * written) > list_count(written)
