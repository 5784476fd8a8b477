import functools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ipu_app.data.corpus import CorpusError
from ipu_app.data.batches import BatchIterator, collate, validation_batches
from ipu_app.data.sampling import MaskingConfig, PretrainingDataset


@pytest.fixture(scope="module")
def dataset(data_dir):
    return PretrainingDataset(data_dir, "train", MaskingConfig(), seed=3)


def test_sequence_layout(dataset):
    s = dataset.sample(0, 0)
    ids, types, attention = s["input_ids"], s["token_type_ids"], s["attention_mask"]
    n = int(attention.sum())
    labels = s["mlm_labels"]
    original = np.where(labels != -100, labels, ids)
    assert original[0] == dataset.cls_id and original[n - 1] == dataset.sep_id
    seps = np.flatnonzero(original[:n] == dataset.sep_id)
    assert len(seps) == 2 and n <= 128
    assert types[: seps[0] + 1].sum() == 0 and types[seps[0] + 1 : n].all() and not types[n:].any()
    assert (ids[n:] == dataset.pad_id).all()


def test_masking_statistics_and_whole_words(dataset):
    masked = mask_token = random = kept = candidates = 0
    for i in range(len(dataset)):
        s = dataset.sample(0, i)
        ids, labels = s["input_ids"], s["mlm_labels"]
        n = int(s["attention_mask"].sum())
        positions = np.flatnonzero(labels != -100)
        assert len(positions) <= 20
        original = np.where(labels != -100, labels, ids)
        assert not np.isin(original[positions], dataset.special_ids).any()
        # whole words only: a labelled token's continuation pieces are labelled too, and vice versa
        for p in range(1, n):
            if dataset.is_continuation[original[p]] and not np.isin(original[p - 1], dataset.special_ids):
                assert (labels[p] == -100) == (labels[p - 1] == -100)
        masked += len(positions)
        candidates += n - 3
        mask_token += int((ids[positions] == dataset.mask_id).sum())
        kept += int((ids[positions] == labels[positions]).sum())
        random += int(((ids[positions] != dataset.mask_id) & (ids[positions] != labels[positions])).sum())
    assert 0.13 < masked / candidates < 0.16
    assert mask_token / masked == pytest.approx(0.8, abs=0.03)
    assert random / masked == pytest.approx(0.1, abs=0.02)
    assert kept / masked == pytest.approx(0.1, abs=0.02)


def test_max_predictions_cap(data_dir):
    capped = PretrainingDataset(data_dir, "train", MaskingConfig(max_predictions=5), seed=0)
    counts = [(capped.sample(0, i)["mlm_labels"] != -100).sum() for i in range(100)]
    assert max(counts) <= 5 and np.mean(counts) > 4


def test_nsp_balance_and_pairs_from_other_documents(dataset):
    rows = np.array([dataset.instance(0, i) for i in range(len(dataset))])
    labels = rows[:, 6]
    assert labels.mean() == pytest.approx(0.5, abs=0.06)
    corpus = dataset.corpus
    # every document's token range, to find the document a token position lies in
    starts = {}
    for index, (shard, first, end) in enumerate(corpus.documents):
        offsets = corpus.sentence_offsets[shard]
        starts.setdefault(int(shard), []).append((int(offsets[first]), int(offsets[end]), index))

    def document(shard, position):
        (found,) = [i for lo, hi, i in starts[int(shard)] if lo <= position < hi]
        return found

    for a_shard, a0, a1, b_shard, b0, b1, label in rows:
        doc_a, doc_b = document(a_shard, a0), document(b_shard, b0)
        assert document(a_shard, a1 - 1) == doc_a and document(b_shard, b1 - 1) == doc_b  # no pair crosses documents
        if label:  # random next: B comes from another document
            assert doc_b != doc_a
        else:  # the true continuation: B follows A in the same document
            assert doc_b == doc_a and b0 >= a1


def test_determinism(data_dir, dataset):
    twin = PretrainingDataset(data_dir, "train", MaskingConfig(), seed=3)
    for i in (0, 5, 17):
        a, b = dataset.sample(1, i), twin.sample(1, i)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    other_epoch = [dataset.sample(2, i)["input_ids"] for i in range(5)]
    assert any(not np.array_equal(x, dataset.sample(1, i)["input_ids"]) for i, x in enumerate(other_epoch))


def test_validation_set_is_fixed_across_runs(data_dir):
    a, b = validation_batches(data_dir, 8), validation_batches(data_dir, 8)
    assert len(a) == len(b) > 0
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert len(validation_batches(data_dir, 8, max_batches=1)) == 1


def test_resume_exact_position(dataset):
    it = BatchIterator(dataset, 4)
    for _ in range(3):
        next(it)
    state = it.state_dict()
    expected = [next(it) for _ in range(3)]
    resumed = BatchIterator(dataset, 4)
    resumed.load_state_dict(state)
    for batch, want in zip((next(resumed) for _ in range(3)), expected):
        assert all(torch.equal(batch[k], want[k]) for k in want)
    with pytest.raises(CorpusError, match="world size 1"):
        BatchIterator(dataset, 4, rank=0, world_size=2).load_state_dict(state)


def test_ranks_split_the_global_batch(dataset):
    single = BatchIterator(dataset, 8)
    ranks = [BatchIterator(dataset, 4, rank=r, world_size=2) for r in range(2)]
    for _ in range(2):
        whole = next(single)["input_ids"]
        parts = torch.cat([next(r)["input_ids"] for r in ranks])
        assert torch.equal(whole, parts)


def test_epochs_roll_over(dataset):
    it = BatchIterator(dataset, 64)
    n = len(dataset) // 64
    for _ in range(n + 1):
        next(it)
    assert it.epoch == 1 and it.position == 64


def test_bad_loader_settings(dataset):
    with pytest.raises(CorpusError, match="mask_prob"):
        MaskingConfig(mask_prob=0).validate()
    with pytest.raises(CorpusError, match="rank 2"):
        BatchIterator(dataset, 4, rank=2, world_size=2)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefetcher_hands_out_the_iterators_batches_and_resumes_where_it_handed_out(dataset):
    from ipu_app.data.ahead import Prefetcher
    from ipu_app.data.batches import static_batch

    plain = BatchIterator(dataset, 4)
    expected = [next(plain) for _ in range(12)]
    ahead = Prefetcher(BatchIterator(dataset, 4), depth=3)
    got = [next(ahead) for _ in range(5)]
    assert all(_same(g, e) for g, e in zip(got, expected))
    state = ahead.state_dict()  # 5 handed out, up to 3 more already built by the thread
    assert state["position"] == 5 * 4
    resumed = Prefetcher(BatchIterator(dataset, 4), depth=2)
    resumed.load_state_dict(state)
    assert all(_same(next(resumed), e) for e in expected[5:9])
    ahead.load_state_dict(state)  # rewinding a running prefetcher drops what it built ahead
    assert _same(next(ahead), expected[5])
    ahead.close()
    assert _same(next(ahead), expected[6])  # close() leaves it at the last batch handed out; next() restarts
    transformed = Prefetcher(BatchIterator(dataset, 4), depth=1, transform=lambda b: static_batch(b, 20))
    assert _same(next(transformed), static_batch(expected[0], 20))
    for p in (ahead, resumed, transformed):
        p.close()


def test_prefetcher_raises_the_iterators_error_in_the_consumer(dataset):
    from ipu_app.data.ahead import Prefetcher

    def broken(batch):
        raise CorpusError("shard 3 is damaged")

    ahead = Prefetcher(BatchIterator(dataset, 4), depth=2, transform=broken)
    with pytest.raises(CorpusError, match="shard 3 is damaged"):
        next(ahead)
    with pytest.raises(ValueError, match="prefetch depth must be >= 1"):
        Prefetcher(BatchIterator(dataset, 4), depth=0)


def test_worker_loader_gives_the_same_batches_for_any_number_of_workers_and_resumes(dataset):
    from ipu_app.data.ahead import WorkerLoader
    from ipu_app.data.batches import static_batch

    plain = BatchIterator(dataset, 4)
    expected = [next(plain) for _ in range(10)]
    for workers in (1, 2):
        loader = WorkerLoader(BatchIterator(dataset, 4), workers, prefetch=2)
        got = [next(loader) for _ in range(4)]
        assert all(_same(g, e) for g, e in zip(got, expected))
        state = loader.state_dict()  # 4 handed out; the workers have built more ahead
        assert state["position"] == 4 * 4
        loader.close()
        assert _same(next(loader), expected[4])  # close() leaves it at the last batch handed out
        resumed = WorkerLoader(BatchIterator(dataset, 4), workers)
        resumed.load_state_dict(state)
        assert all(_same(next(resumed), e) for e in expected[4:7])
        for x in (loader, resumed):
            x.close()
    transformed = WorkerLoader(BatchIterator(dataset, 4), 2, transform=functools.partial(static_batch,
                                                                                          max_predictions=20))
    assert _same(next(transformed), static_batch(expected[0], 20))
    transformed.close()
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        WorkerLoader(BatchIterator(dataset, 4), 0)


def test_a_dataset_pickles_without_its_memory_maps(dataset):
    import pickle

    blob = pickle.dumps(dataset)
    assert len(blob) < 200_000  # the token arrays are reopened, not copied
    again = pickle.loads(blob)
    assert _same(collate([again.sample(2, 7)]), collate([dataset.sample(2, 7)]))


def test_chunks_pack_each_documents_sentences_in_order_and_are_cached(data_dir, dataset, monkeypatch):
    corpus, target = dataset.corpus, dataset.masking.seq_len - 3
    chunks = np.asarray(dataset.chunks)
    for doc, (shard, first, end) in enumerate(corpus.documents):
        mine = chunks[chunks[:, 0] == doc]
        offsets = corpus.sentence_offsets[shard]
        # the reference: a sequential greedy packing of this document's sentences
        expected, start = [], first
        while start < end:
            i = start + 1
            while i < end and offsets[i] - offsets[start] < target:
                i += 1
            if offsets[i] - offsets[start] >= 2:
                expected.append((start, i))
            start = i
        assert [tuple(r) for r in mine[:, 1:]] == expected
    cached = sorted((data_dir / "index").glob("train-chunks-125-*.npy"))
    assert len(cached) == 1 and np.array_equal(np.load(cached[0]), chunks)
    # the cached index is read back (memory-mapped), not rebuilt
    from ipu_app.data.sampling import ShardedSplit

    monkeypatch.setattr(ShardedSplit, "_build_chunks", lambda self, target: pytest.fail("rebuilt"))
    again = PretrainingDataset(data_dir, "train", MaskingConfig(), seed=0).chunks
    assert not again.flags.writeable and np.array_equal(again, chunks)


def test_the_chunk_index_is_computed_in_memory_when_it_cannot_be_written(tmp_path, data_dir):
    import shutil

    copy = tmp_path / "ro"
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("index"))
    (copy / "index").write_text("a file where the index folder would go")  # writing fails, as when read-only
    fresh = PretrainingDataset(copy, "train", MaskingConfig(seq_len=64), seed=0)
    reference = PretrainingDataset(data_dir, "train", MaskingConfig(seq_len=64), seed=0)
    assert fresh.chunks.flags.writeable and np.array_equal(fresh.chunks, reference.chunks)


@given(st.integers(0, 200), st.integers(1, 200), st.integers(1, 200), st.integers(2, 300))
def test_truncation_in_closed_form_is_the_token_by_token_trim(a0, la, lb, target):
    from ipu_app.data.sampling import _truncate_pair

    a1, b0 = a0 + la, a0 + la + 7
    b1 = b0 + lb
    x0, x1, y0, y1 = a0, a1, b0, b1
    while (x1 - x0) + (y1 - y0) > target:  # the definition
        if x1 - x0 >= y1 - y0:
            x1 -= 1
        else:
            y1 -= 1
    assert _truncate_pair(a0, a1, b0, b1, target) == (x0, x1, y0, y1)


def test_a_validation_subset_is_a_fixed_random_sample(data_dir):
    """``max_sequences`` takes a seeded random subset (the same for every run), not the first N in
    corpus order; each sequence is the one the whole set holds at that index."""
    from ipu_app.data.batches import validation_indices

    picked = validation_indices(1000, 64)
    assert len(set(picked.tolist())) == 64 and np.all(np.diff(picked) > 0)
    assert np.array_equal(picked, validation_indices(1000, 64))  # fixed
    assert not np.array_equal(picked, np.arange(64)) and picked.max() > 500  # spread over the split
    assert np.array_equal(validation_indices(10, None), np.arange(10))
    assert np.array_equal(validation_indices(10, 25), np.arange(10))
    whole = validation_batches(data_dir, 1)
    available = len(whole)
    subset = validation_batches(data_dir, 1, max_sequences=available - 2)
    expected = validation_indices(available, available - 2)
    assert len(subset) == available - 2 >= 2
    for batch, index in zip(subset, expected):
        assert torch.equal(batch["input_ids"], whole[index]["input_ids"])
        assert torch.equal(batch["mlm_labels"], whole[index]["mlm_labels"])
