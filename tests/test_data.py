"""megachat.data: the MMIDIDX reader/writer (and Megatron interop both ways), GPTDataset packing, blending,
caching, exact resume by global sample number across data-parallel sizes, and the bad-input errors."""
import os
import shutil
import struct
import warnings

import numpy as np
import pytest
import torch
from _dist import run_gloo

from megachat.data import (BLEND_BLOCK, GPTDataset, IndexedDataset, IndexedDatasetWriter, batch_indices,
                           dtype_for_vocab)


def write_docs(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def random_docs(n, seed, lo=0, hi=500, max_len=300):
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, size=rng.integers(1, max_len)) for _ in range(n)]


@pytest.fixture
def shard(tmp_path):
    docs = random_docs(60, seed=0)
    return write_docs(tmp_path / "shard", docs), docs


@pytest.fixture(scope="module")
def megatron_indexed():
    try:
        with warnings.catch_warnings():  # it warns that Transformer Engine and Apex are absent: irrelevant here
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
    except Exception as e:  # megatron-core is a test-only dependency
        pytest.skip(f"megatron-core not importable ({type(e).__name__}: {e}); pip install megatron-core==0.16.1")
    return indexed_dataset


# ---- reader / writer ----
def test_written_documents_read_back_as_zero_copy_views(shard):
    prefix, docs = shard
    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs) and ds.dtype == np.uint16
    assert ds.sizes.tolist() == [len(d) for d in docs] and ds.doc_idx.tolist() == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d)
    assert np.shares_memory(ds[3], ds._bin)
    assert ds.num_tokens == sum(map(len, docs)) == os.path.getsize(prefix + ".bin") // 2


def test_dtype_is_uint16_when_the_vocab_fits_else_int32():
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.int32


def test_int32_shards_hold_ids_above_uint16(tmp_path):
    ds = IndexedDataset(write_docs(tmp_path / "big", [np.array([0, 70000, 2**31 - 1])], np.int32))
    assert ds.dtype == np.int32 and ds[0].tolist() == [0, 70000, 2**31 - 1]


def test_megatron_reads_files_we_write(shard, megatron_indexed):
    prefix, docs = shard
    theirs = megatron_indexed.IndexedDataset(prefix)
    assert len(theirs) == len(docs)
    assert theirs.sequence_lengths.tolist() == [len(d) for d in docs]
    assert theirs.document_indices.tolist() == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        assert np.array_equal(theirs[i], d)


def test_we_read_files_megatron_writes(tmp_path, megatron_indexed):
    prefix = str(tmp_path / "mega")
    builder = megatron_indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    docs = random_docs(20, seed=1, hi=100000)
    for d in docs[:10]:  # one sequence per document
        builder.add_document(torch.from_numpy(d.astype(np.int32)), [len(d)])
    for a, b in zip(docs[10::2], docs[11::2]):  # two sentences per document, as --split-sentences writes
        builder.add_item(torch.from_numpy(a.astype(np.int32)))
        builder.add_item(torch.from_numpy(b.astype(np.int32)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix)
    assert ours.dtype == np.int32 and len(ours) == 20
    assert ours.doc_idx.tolist() == list(range(11)) + [12, 14, 16, 18, 20]
    for i, d in enumerate(docs):
        assert np.array_equal(ours[i], d)
    assert np.array_equal(ours.token_stream(), np.concatenate(docs))


def test_writer_that_fails_leaves_existing_files_untouched(shard):
    prefix, _ = shard
    before = {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")}
    with pytest.raises(ValueError, match=r"token id 70000 does not fit uint16.*int32"):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([1, 2, 3])
            w.add_document([5, 70000])
    assert {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")} == before
    assert sorted(os.listdir(os.path.dirname(prefix))) == ["shard.bin", "shard.idx"]


def test_resumed_writer_drops_what_came_after_its_checkpoint(tmp_path):
    a, junk, c = random_docs(5, seed=4), random_docs(3, seed=5), random_docs(4, seed=6)
    w = IndexedDatasetWriter(tmp_path / "r", np.uint16, resumable=True)
    for d in a:
        w.add_document(d)
    point = w.checkpoint()
    for d in junk:  # written after the checkpoint, then the process dies
        w.add_document(d)
    w.close()
    with IndexedDatasetWriter(tmp_path / "r", np.uint16, resume=point) as w:
        for d in c:
            w.add_document(d)
    ds = IndexedDataset(tmp_path / "r")
    assert len(ds) == 9 and all(np.array_equal(ds[i], d) for i, d in enumerate(a + c))
    assert sorted(os.listdir(tmp_path)) == ["r.bin", "r.idx"]


def test_missing_shard_names_the_file(tmp_path, shard):
    prefix, _ = shard
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=r"shard\.bin not found.*preprocess_data"):
        IndexedDataset(prefix)


def test_truncated_bin_names_the_file(shard):
    prefix, _ = shard
    os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 2)
    with pytest.raises(ValueError, match=r"shard\.bin has \d+ bytes but .*truncated"):
        IndexedDataset(prefix)


def test_truncated_idx_names_the_file(shard):
    prefix, _ = shard
    os.truncate(prefix + ".idx", os.path.getsize(prefix + ".idx") - 8)
    with pytest.raises(ValueError, match=r"shard\.idx has \d+ bytes but its header describes"):
        IndexedDataset(prefix)


def test_wrong_magic_names_the_file(shard):
    prefix, _ = shard
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"NOTANIDX")
    with pytest.raises(ValueError, match=r"shard\.idx: not a Megatron MMIDIDX index"):
        IndexedDataset(prefix)


def test_wrong_version_names_the_file(shard):
    prefix, _ = shard
    with open(prefix + ".idx", "r+b") as f:
        f.seek(9)
        f.write(struct.pack("<Q", 2))
    with pytest.raises(ValueError, match=r"shard\.idx: index version 2"):
        IndexedDataset(prefix)


# ---- GPTDataset ----
@pytest.fixture
def two_shards(tmp_path):
    a = write_docs(tmp_path / "a", random_docs(80, seed=2, lo=0, hi=100))  # ids < 100
    b = write_docs(tmp_path / "b", random_docs(40, seed=3, lo=100, hi=200))  # ids >= 100
    return a, b


def test_samples_are_windows_of_the_token_stream_and_cover_each_epoch_once(shard):
    prefix, docs = shard
    stream = np.concatenate(docs)
    ds = GPTDataset([prefix], None, seq_len=32, seed=7)
    n = ds.samples_per_epoch[0]
    assert n == (len(stream) - 1) // 32
    starts = []
    for i in range(n):
        sample = ds[i]
        assert sample.dtype == np.int64 and sample.shape == (33,)
        start = int(ds._perm(0, 0)[i]) * 32
        assert np.array_equal(sample, stream[start:start + 33])
        starts.append(start)
    assert sorted(starts) == list(range(0, n * 32, 32))
    epoch1 = [int(ds._perm(0, 1)[i]) for i in range(n)]
    assert sorted(epoch1) == list(range(n)) and epoch1 != [s // 32 for s in starts]
    assert np.array_equal(ds[n + 5], stream[epoch1[5] * 32:epoch1[5] * 32 + 33])


def test_same_inputs_give_the_same_samples_and_another_seed_another_order(shard, tmp_path):
    prefix, _ = shard
    a = GPTDataset([prefix], None, 16, seed=1, cache_dir=tmp_path / "c1")
    b = GPTDataset([prefix], None, 16, seed=1, cache_dir=tmp_path / "c2")
    c = GPTDataset([prefix], None, 16, seed=2, cache_dir=tmp_path / "c1")
    idx = range(0, 3 * a.samples_per_epoch[0], 7)
    assert all(np.array_equal(a[i], b[i]) for i in idx)
    assert not all(np.array_equal(a[i], c[i]) for i in idx)


def test_index_is_cached_next_to_the_data_and_reused(shard):
    prefix, _ = shard
    GPTDataset([prefix], None, 16, seed=1)
    cache = os.path.join(os.path.dirname(prefix), "index_cache")
    files = [f for f in os.listdir(cache) if f.endswith(".npy")]
    assert len(files) == 1 and files[0].startswith("shard_") and files[0].endswith("_epoch0.npy")
    stamp = os.stat(os.path.join(cache, files[0])).st_mtime_ns
    GPTDataset([prefix], None, 16, seed=1)
    assert os.stat(os.path.join(cache, files[0])).st_mtime_ns == stamp
    GPTDataset([prefix], None, 24, seed=1)  # another seq_len is another key
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 2


def test_blend_follows_the_weights_evenly(two_shards, tmp_path):
    ds = GPTDataset(list(two_shards), [3, 1], seq_len=8, seed=0, cache_dir=tmp_path / "c")
    first = [int(ds[i][0] >= 100) for i in range(400)]  # 1 = from dataset b
    assert sum(first) == 100
    assert all(sum(first[k:k + 8]) == 2 for k in range(0, 400, 8))
    assert ds.block_counts.tolist() == [BLEND_BLOCK * 3 // 4, BLEND_BLOCK // 4]


def test_default_weights_are_proportional_to_size(two_shards, tmp_path):
    ds = GPTDataset(list(two_shards), None, seq_len=8, seed=0, cache_dir=tmp_path / "c")
    n_a, n_b = ds.samples_per_epoch
    assert abs(ds.weights[0] - n_a / (n_a + n_b)) < 1e-12


def test_unwritable_cache_dir_says_to_pass_cache_dir(shard, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="pass cache_dir= a writable directory"):
        GPTDataset([shard[0]], None, 16, 0, cache_dir=tmp_path / "file" / "cache")


def test_bad_weights_raise(two_shards, tmp_path):
    with pytest.raises(ValueError, match="must be 2 positive numbers"):
        GPTDataset(list(two_shards), [1, 0], 8, 0, cache_dir=tmp_path)


def test_seq_len_larger_than_the_data_names_the_file(shard, tmp_path):
    prefix, docs = shard
    total = sum(map(len, docs))
    with pytest.raises(ValueError, match=rf"shard: {total} tokens, fewer than seq_len \+ 1.*smaller seq_len"):
        GPTDataset([prefix], None, seq_len=total, seed=0, cache_dir=tmp_path)


def test_batch_indices_slice_the_global_batch_by_rank():
    assert batch_indices(3, 8, 0, 1).tolist() == list(range(24, 32))
    assert batch_indices(3, 8, 1, 2).tolist() == [28, 29, 30, 31]
    with pytest.raises(ValueError, match="not divisible"):
        batch_indices(0, 6, 0, 4)


def test_get_batch_returns_inputs_and_shifted_targets(shard):
    ds = GPTDataset([shard[0]], None, 16, seed=0)
    x, y = ds.get_batch(2, 4)
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(torch.cat([x, y[:, -1:]], 1), torch.from_numpy(np.stack([ds[i] for i in range(8, 12)])))


def run_steps(ds, steps, global_batch, dp_size):
    """Global batches `steps` as every dp rank sees them, concatenated in rank order."""
    return [torch.cat([ds.get_batch(s, global_batch, r, dp_size)[0] for r in range(dp_size)]) for s in steps]


@pytest.mark.parametrize("dp_before, dp_after", [(1, 1), (2, 1), (1, 2), (2, 4)])
def test_resume_at_step_k_continues_exactly_for_any_dp_size(two_shards, tmp_path, dp_before, dp_after):
    make = lambda: GPTDataset(list(two_shards), [0.6, 0.4], seq_len=16, seed=5, cache_dir=tmp_path / "c")
    uninterrupted = run_steps(make(), range(12), 8, 1)
    before = run_steps(make(), range(5), 8, dp_before)
    after = run_steps(make(), range(5, 12), 8, dp_after)  # a fresh process: nothing carried over but the step
    assert all(torch.equal(a, b) for a, b in zip(before + after, uninterrupted))


def _dist_worker(rank, prefixes, cache):
    ds = GPTDataset(prefixes, [1, 1], seq_len=16, seed=9, cache_dir=cache)
    return [ds.get_batch(s, 4, rank, torch.distributed.get_world_size())[0] for s in range(3)]


@pytest.mark.timeout(120)
def test_two_ranks_share_one_cached_index_and_split_each_batch(two_shards, tmp_path):
    cache = str(tmp_path / "cache")
    ranks = run_gloo(_dist_worker, 2, list(two_shards), cache)
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 2  # one file per dataset, not per rank
    shutil.rmtree(cache)
    single = run_steps(GPTDataset(list(two_shards), [1, 1], 16, 9, cache_dir=cache), range(3), 4, 1)
    assert all(torch.equal(torch.cat([ranks[0][s], ranks[1][s]]), single[s]) for s in range(3))
