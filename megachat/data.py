"""Token shards and training samples: Megatron's MMIDIDX .bin/.idx files, packed into exactly resumable batches.

- IndexedDataset(prefix): zero-copy memmap reader of PREFIX.bin + PREFIX.idx, the format of Megatron-LM's
  `IndexedDataset` (magic, version 1, dtype code, int32 lengths, int64 byte pointers, int64 document indices).
  It reads files Megatron wrote, and Megatron reads the files IndexedDatasetWriter writes.
- IndexedDatasetWriter(prefix, dtype): streams documents to temp files (lengths go to a temp file too, so
  memory stays flat for any number of documents); finalize() fsyncs and renames .bin then .idx, so a present
  .idx always means a complete pair.
- GPTDataset(prefixes, weights, seq_len, seed): every dataset's token stream (documents in file order, each
  starting with <|bos|>) is cut into samples of seq_len + 1 tokens that overlap by one token; sample order is
  a seeded permutation per dataset and epoch, cached as .npy next to the data (one rank builds, the others
  wait); datasets are blended by weight in a fixed interleaving block. Sample number i -> tokens is a pure
  function of (files, weights, seq_len, seed, i), so a batch is addressed by its global sample numbers and
  resume is exact for any data-parallel size.
- check_shards(run_dir, prefixes, ...): RUN_DIR/data.json, the shards' fingerprints at the start of a run; a resume
  whose shards changed since (it would read other tokens) is refused before the first step.
torch is imported only inside the functions that need it: the preprocessing tools import this module.
"""
import fcntl
import hashlib
import json
import os
import struct
import sys

import numpy as np

from megachat.fileio import atomic_write_json, replace_durably

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# Megatron's DType codes; 6 and 7 are floats, which are not token ids.
CODE_TO_DTYPE = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
DTYPE_TO_CODE = {np.dtype(v): k for k, v in CODE_TO_DTYPE.items()}
MAX_DOC_TOKENS = 2**31 - 1  # the .idx stores each length as int32
CHUNK = 1 << 22  # elements per step when streaming index arrays
BLEND_BLOCK = 1 << 16  # blending interleaves datasets in blocks of this many samples: weights exact to 1/65536
CACHE_VERSION = 1
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK_BYTES = 64, 1 << 16  # the .bin blocks a fingerprint reads: at most 4 MiB


def dtype_for_vocab(vocab_size):
    """uint16 when every id fits (vocab <= 65,536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def shard_tokenizer(prefix):
    """{"tokenizer", "tokenizer_sha256", "vocab_size"} as PREFIX.meta.json (tools/preprocess_data.py,
    tools/merge_shards.py) records them, or None for shards without one (Megatron's, or merged from such)."""
    if not os.path.isfile(prefix + ".meta.json"):
        return None
    with open(prefix + ".meta.json") as f:
        meta = json.load(f)
    return {k: meta.get(k) for k in ("tokenizer", "tokenizer_sha256", "vocab_size")}


def check_tokenizer(prefix, tokenizer):
    """Refuse shards made with another tokenizer than `tokenizer`, as far as their meta.json records it."""
    made = shard_tokenizer(prefix)
    if made is None:
        return
    if made["vocab_size"] != tokenizer.vocab_size or (made["tokenizer_sha256"] and tokenizer.fingerprint
                                                      and made["tokenizer_sha256"] != tokenizer.fingerprint):
        raise ValueError(f"{prefix} was tokenized with another tokenizer ({made['tokenizer']}, "
                         f"{made['vocab_size']} ids) than the one given ({tokenizer.vocab_size} ids): pass "
                         f"--tokenizer {made['tokenizer']}, or preprocess the data again with this one")


class IndexedDataset:
    """PREFIX.bin/.idx as numpy views: len(ds) sequences (documents), ds[i] -> 1-D array of token ids."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found: the shard is missing; check the path or make it with "
                                        "tools/preprocess_data.py")
        idx_bytes = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:9] != MAGIC:
            raise ValueError(f"{idx_path}: not a Megatron MMIDIDX index (magic {head[:9]!r}); regenerate it with "
                             "tools/preprocess_data.py")
        version = struct.unpack("<Q", head[9:17])[0]
        if version != 1:
            raise ValueError(f"{idx_path}: index version {version}, only version 1 is known; regenerate it with "
                             "tools/preprocess_data.py")
        code = head[17]
        if code not in CODE_TO_DTYPE:
            raise ValueError(f"{idx_path}: dtype code {code} is not an integer token type "
                             f"(known: {sorted(CODE_TO_DTYPE)}); regenerate it with tools/preprocess_data.py")
        self.dtype = np.dtype(CODE_TO_DTYPE[code])
        n_seq, n_doc1 = struct.unpack("<QQ", head[18:34])
        need = HEADER_BYTES + n_seq * 12 + n_doc1 * 8
        if idx_bytes not in (need, need + n_seq):  # + n_seq: Megatron's multimodal files append int8 modes
            raise ValueError(f"{idx_path} has {idx_bytes} bytes but its header describes {need}: the index is "
                             "truncated or corrupt; copy it again or regenerate it with tools/preprocess_data.py")
        self._idx = np.memmap(idx_path, mode="r")
        self.sizes = np.frombuffer(self._idx, np.int32, n_seq, HEADER_BYTES)
        self.pointers = np.frombuffer(self._idx, np.int64, n_seq, HEADER_BYTES + 4 * n_seq)
        self.doc_idx = np.frombuffer(self._idx, np.int64, n_doc1, HEADER_BYTES + 12 * n_seq)
        bin_bytes = os.path.getsize(bin_path)
        need = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n_seq else 0
        if bin_bytes < need:
            raise ValueError(f"{bin_path} has {bin_bytes} bytes but {idx_path} needs {need}: the .bin is truncated "
                             "(interrupted write or copy); copy it again or rerun tools/preprocess_data.py")
        n_items = bin_bytes // self.dtype.itemsize
        # a plain ndarray view of the memmap: slicing it skips np.memmap's per-slice Python hooks
        self._bin = (np.memmap(bin_path, self.dtype, "r", shape=(n_items,)).view(np.ndarray) if n_items
                     else np.zeros(0, self.dtype))
        self.num_tokens = need // self.dtype.itemsize

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._bin[start:start + int(self.sizes[i])]

    def token_stream(self):
        """All tokens in file order as one zero-copy array; raises if the .bin has gaps between documents."""
        step = self.dtype.itemsize
        for lo in range(0, len(self), CHUNK):  # chunked: a billion documents must not need 16 GB of temporaries
            p, s = self.pointers[lo:lo + CHUNK + 1], self.sizes[lo:lo + CHUNK]
            expect = (int(p[0]) if lo else 0) + np.concatenate(([0], np.cumsum(s[:len(p) - 1], dtype=np.int64) * step))
            if not np.array_equal(p, expect[:len(p)]):
                raise ValueError(f"{self.prefix}.idx: documents are not stored back to back in the .bin; rewrite it "
                                 "with tools/merge_shards.py")
        return self._bin[:self.num_tokens]


def shard_fingerprint(prefix, vocab_size=None):
    """{"idx": {...}, "bin": {...}} of PREFIX: per file its bytes, mtime_ns and a sha256: of the whole .idx (12 bytes
    per document), of FINGERPRINT_BLOCKS evenly spaced blocks of the .bin (a few MiB read, whatever the shard's size).
    Opening the shard checks the .idx's structure and the .bin's length; with vocab_size, the ids in the blocks read
    must be below it (a corrupted .bin). ValueError naming the file otherwise."""
    ds = IndexedDataset(prefix)
    out = {}
    for ext in ("idx", "bin"):
        path = f"{ds.prefix}.{ext}"
        st, h = os.stat(path), hashlib.sha256()
        with open(path, "rb") as f:
            if ext == "idx":
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            else:
                step = ds.dtype.itemsize
                span = max(0, st.st_size - FINGERPRINT_BLOCK_BYTES) // step
                for offset in sorted({span * i // max(1, FINGERPRINT_BLOCKS - 1) * step
                                      for i in range(FINGERPRINT_BLOCKS)}):
                    f.seek(offset)
                    block = f.read(FINGERPRINT_BLOCK_BYTES)
                    h.update(block)
                    ids = np.frombuffer(block[:len(block) // step * step], ds.dtype)
                    if vocab_size is not None and ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
                        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
                        raise ValueError(f"{path}: token id {bad} near byte {offset} is outside the tokenizer's "
                                         f"{vocab_size} ids: the shard is corrupted (or made with another tokenizer); "
                                         f"copy it again or rerun tools/preprocess_data.py")
        out[ext] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    return out


def check_shards(run_dir, prefixes, resumed, vocab_size=None, record=True):
    """Fingerprint the shards of `prefixes` (shard_fingerprint: refuses a damaged one). A fresh run (resumed False)
    records them in RUN_DIR/data.json (when `record`: one rank); a resumed run compares them with it and refuses,
    naming the file, a shard whose size or sampled content changed since the run started (the same sample numbers
    would be other tokens). A changed mtime alone (a copy) is accepted."""
    now = {str(p): shard_fingerprint(str(p), vocab_size) for p in prefixes}
    path = os.path.join(run_dir, "data.json")
    if not resumed or not os.path.isfile(path):  # a resume with no data.json has nothing to compare: record them
        if record:
            os.makedirs(run_dir, exist_ok=True)
            atomic_write_json(path, now)
        return
    with open(path) as f:
        then = json.load(f)
    if list(then) != list(now):
        raise ValueError(f"the run started with data {list(then)}, this resume gives {list(now)}: resume with the "
                         f"same --data/--val-data (or start a new run with --out)")
    for prefix, files in then.items():
        for ext, was in files.items():
            got = now[prefix][ext]
            if (got["bytes"], got["sha256"]) != (was["bytes"], was["sha256"]):
                raise ValueError(f"{prefix}.{ext} changed since the run started ({was['bytes']} -> {got['bytes']} "
                                 f"bytes{'' if got['bytes'] != was['bytes'] else ', other content'}): the resume "
                                 f"would read other tokens; restore the original file, or start a new run with "
                                 f"--out (RUN_DIR/data.json holds the fingerprints)")


class IndexedDatasetWriter:
    """Streams documents into PREFIX.bin/.idx; one sequence per document, as Megatron's preprocessing writes."""

    def __init__(self, prefix, dtype=np.uint16, resumable=False, resume=None):
        """resumable: the temp files get fixed names, PREFIX.bin.partial / PREFIX.lens.partial, so that a later
        process can continue them; resume: a dict from checkpoint() of such a writer: its partial files are cut
        back to that point (dropping whatever was written after it) and writing continues there."""
        self.prefix, self.dtype = str(prefix), np.dtype(dtype)
        if self.dtype not in DTYPE_TO_CODE:
            raise ValueError(f"{self.prefix}: dtype {self.dtype} is not a Megatron token type; use uint16 or int32")
        self._limits = (np.iinfo(self.dtype).min, np.iinfo(self.dtype).max)
        tag = ".partial" if resumable or resume else f".tmp-{os.getpid()}-{id(self):x}"
        self._tmp_bin, self._tmp_idx, self._tmp_lens = (self.prefix + ".bin" + tag, self.prefix + ".idx" + tag,
                                                        self.prefix + ".lens" + tag)
        os.makedirs(os.path.dirname(os.path.abspath(self.prefix)), exist_ok=True)
        self.num_docs = self.num_tokens = 0
        if resume:
            sizes = {self._tmp_bin: resume["tokens"] * self.dtype.itemsize, self._tmp_lens: resume["docs"] * 4}
            for path, size in sizes.items():
                if not os.path.exists(path) or os.path.getsize(path) < size:
                    raise FileNotFoundError(f"{path} is missing or shorter than its checkpoint; delete "
                                            f"{self.prefix}.progress.json and rerun from the start")
                os.truncate(path, size)
            self.num_docs, self.num_tokens = resume["docs"], resume["tokens"]
        mode = "ab" if resume else "wb"
        self._bin, self._lens = open(self._tmp_bin, mode), open(self._tmp_lens, mode)

    def checkpoint(self):
        """Make everything written so far durable; returns the dict that resume= takes."""
        for f in (self._bin, self._lens):
            f.flush()
            os.fsync(f.fileno())
        return {"docs": self.num_docs, "tokens": self.num_tokens}

    def add_document(self, ids):
        ids = np.asarray(ids)
        self.add_documents(ids, np.array([ids.size], dtype=np.int64))

    def add_documents(self, tokens, lengths):
        """tokens: 1-D ids of several documents back to back; lengths: their token counts."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size or (lengths < 0).any():
            raise ValueError(f"{self.prefix}: lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        if lengths.size and int(lengths.max()) > MAX_DOC_TOKENS:
            raise ValueError(f"{self.prefix}: a document of {int(lengths.max())} tokens exceeds the .idx limit of "
                             f"{MAX_DOC_TOKENS} (int32 lengths); split it into smaller documents")
        if tokens.size and tokens.dtype != self.dtype:  # ids already in self.dtype fit it by definition
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < self._limits[0] or hi > self._limits[1]:
                bad = hi if hi > self._limits[1] else lo
                raise ValueError(f"{self.prefix}.bin: token id {bad} does not fit {self.dtype}; write it with "
                                 "dtype int32 (vocabularies above 65,536 ids need int32)")
        self._bin.write(np.ascontiguousarray(tokens, self.dtype).data)
        self._lens.write(lengths.astype(np.int32).data)
        self.num_docs += lengths.size
        self.num_tokens += tokens.size

    def add_index(self, other):
        """Append every document of an IndexedDataset (streamed in chunks: merging needs no memory)."""
        if other.dtype != self.dtype:
            raise ValueError(f"{other.prefix}: dtype {other.dtype} differs from {self.dtype} of {self.prefix}; "
                             "merge only shards made with the same tokenizer")
        stream = other.token_stream()  # also checks that the .bin has no gaps, so a byte copy is exact
        left = len(stream) * self.dtype.itemsize
        with open(other.prefix + ".bin", "rb") as f:  # plain reads: copying through the memmap would grow RSS
            while left and (chunk := f.read(min(left, 8 << 20))):
                self._bin.write(chunk)
                left -= len(chunk)
        for lo in range(0, len(other), CHUNK):
            self._lens.write(np.ascontiguousarray(other.sizes[lo:lo + CHUNK]).tobytes())
        self.num_docs += len(other)
        self.num_tokens += len(stream)

    def finalize(self):
        """Write the .idx, fsync both files, then rename .bin and finally .idx into place."""
        self._bin.close()
        self._lens.close()
        n, step = self.num_docs, self.dtype.itemsize
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_TO_CODE[self.dtype]))
            f.write(struct.pack("<QQ", n, n + 1))
            with open(self._tmp_lens, "rb") as lens:
                while chunk := lens.read(CHUNK * 4):
                    f.write(chunk)
            with open(self._tmp_lens, "rb") as lens:
                pointer = 0
                while chunk := lens.read(CHUNK * 4):
                    sizes = np.frombuffer(chunk, np.int32).astype(np.int64) * step
                    ends = pointer + np.cumsum(sizes)
                    f.write((ends - sizes).tobytes())
                    pointer = int(ends[-1])
            for lo in range(0, n + 1, CHUNK):
                f.write(np.arange(lo, min(n + 1, lo + CHUNK), dtype=np.int64).tobytes())
        replace_durably(self._tmp_bin, self.prefix + ".bin")
        replace_durably(self._tmp_idx, self.prefix + ".idx")
        os.remove(self._tmp_lens)

    def close(self):
        """Close without finishing; the temp files stay (a resumable writer's partial files are continued later)."""
        for f in (self._bin, self._lens):
            f.close()

    def abort(self):
        """Drop the temp files; whatever PREFIX.bin/.idx existed before stays untouched."""
        self.close()
        for path in (self._tmp_bin, self._tmp_idx, self._tmp_lens):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort() if exc_type else self.finalize()


def write_conversations(prefix, conversations, tokenizer):
    """Render every conversation (tokenizer.render_conversation, <|bos|> first, untruncated) as one document of
    PREFIX.bin/.idx, and PREFIX.meta.json naming the tokenizer (megachat.data.check_tokenizer reads it): the
    midtraining stream, packed into samples by GPTDataset like pretraining text. Returns the token count."""
    with IndexedDatasetWriter(prefix, dtype_for_vocab(tokenizer.vocab_size)) as writer:
        for conversation in conversations:
            writer.add_document(tokenizer.render_conversation(conversation, max_tokens=1 << 62)[0])
    atomic_write_json(prefix + ".meta.json", {"tokenizer_sha256": tokenizer.fingerprint,
                                              "vocab_size": tokenizer.vocab_size, "tokenizer": None,
                                              "documents": writer.num_docs, "tokens": writer.num_tokens})
    return writer.num_tokens


def batch_indices(step, global_batch_size, dp_rank=0, dp_size=1):
    """Global sample numbers of rank dp_rank's contiguous slice of global batch `step` (int64 [G // dp_size])."""
    if global_batch_size % dp_size:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by data-parallel size {dp_size}")
    per_rank = global_batch_size // dp_size
    start = step * global_batch_size + dp_rank * per_rank
    return np.arange(start, start + per_rank, dtype=np.int64)


def _file_lock(path):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path + ".lock", "a+")
    except OSError as e:
        raise PermissionError(f"cannot write the sample index cache in {os.path.dirname(path)} ({e.strerror}); "
                              "pass cache_dir= a writable directory") from None
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


class GPTDataset:
    """Weighted blend of token shards as an endless, deterministic sequence of (seq_len + 1)-token samples.

    With torch.distributed initialized the constructor is collective (a barrier): every rank constructs it.
    The index cache goes to cache_dir, by default `index_cache/` beside the first prefix.
    """

    def __init__(self, prefixes, weights=None, seq_len=2048, seed=1234, cache_dir=None):
        prefixes = [prefixes] if isinstance(prefixes, (str, os.PathLike)) else list(prefixes)
        if not prefixes:
            raise ValueError("GPTDataset needs at least one data prefix")
        self.seq_len, self.seed = int(seq_len), int(seed)
        if self.seq_len < 1 or self.seed < 0:
            raise ValueError(f"seq_len {seq_len} must be >= 1 and seed {seed} >= 0")
        self.datasets = [IndexedDataset(p) for p in prefixes]
        self.streams = [ds.token_stream() for ds in self.datasets]
        # Samples overlap by one token (the last target is the next sample's first input), as Megatron's do.
        self.samples_per_epoch = [(len(s) - 1) // self.seq_len for s in self.streams]
        for ds, n in zip(self.datasets, self.samples_per_epoch):
            if n < 1:
                raise ValueError(f"{ds.prefix}: {ds.num_tokens} tokens, fewer than seq_len + 1 = {self.seq_len + 1}; "
                                 "use a smaller seq_len or more data")
        if weights is None:
            weights = self.samples_per_epoch
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(prefixes),) or not np.isfinite(weights).all() or (weights <= 0).any():
            raise ValueError(f"weights {weights.tolist()} must be {len(prefixes)} positive numbers, one per prefix")
        self.weights = weights / weights.sum()
        self._build_blend()
        self.cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index_cache")
        self._keys = [self._cache_key(d) for d in range(len(self.datasets))]
        self._perms = {}
        self._prebuild_first_epoch()

    def _build_blend(self):
        # Largest-remainder counts per block, then each dataset's samples spread evenly over the block.
        exact = self.weights * BLEND_BLOCK
        counts = np.floor(exact).astype(np.int64)
        counts[np.argsort(-(exact - counts), kind="stable")[:BLEND_BLOCK - counts.sum()]] += 1
        if (counts == 0).any():
            raise ValueError(f"weight {self.weights[counts == 0][0]:.2e} is below 1/{BLEND_BLOCK}; raise it or drop "
                             "that dataset")
        self.block_counts = counts
        ds = np.concatenate([np.full(c, d, dtype=np.int64) for d, c in enumerate(counts)])
        j = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
        order = np.argsort((j + 0.5) / counts[ds], kind="stable")
        self.block_dataset, self.block_sample = ds[order], j[order]

    def _cache_key(self, d):
        ds = self.datasets[d]
        ident = {"v": CACHE_VERSION, "name": os.path.basename(ds.prefix), "docs": len(ds), "tokens": ds.num_tokens,
                 "sizes": hashlib.sha256(ds.sizes[:1 << 20].tobytes()).hexdigest(), "seq_len": self.seq_len,
                 "seed": self.seed, "position": d, "samples": self.samples_per_epoch[d]}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def _perm_path(self, d, epoch):
        return os.path.join(self.cache_dir, f"{os.path.basename(self.datasets[d].prefix)}_{self._keys[d]}_"
                                            f"epoch{epoch}.npy")

    def _build_perm(self, d, epoch):
        path = self._perm_path(d, epoch)
        if os.path.exists(path):
            return
        n = self.samples_per_epoch[d]
        perm = np.random.default_rng([self.seed, d, epoch]).permutation(n)
        perm = perm.astype(np.int32 if n < 2**31 else np.int64)
        tmp = f"{path[:-4]}.tmp-{os.getpid()}.npy"
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            np.save(tmp, perm)
        except OSError as e:
            raise PermissionError(f"cannot write the sample index cache {tmp} ({e.strerror}); pass cache_dir= a "
                                  "writable directory") from None
        replace_durably(tmp, path)

    def _prebuild_first_epoch(self):
        # With torch.distributed up, rank 0 builds while the others wait at a barrier; without it a file lock
        # serializes processes that share the cache. A rank that still sees no file (cache not on a shared
        # file system) builds its own copy under the lock.
        torch = sys.modules.get("torch")  # no torch import here: if torch is not loaded, no group exists
        dist = torch.distributed if torch is not None and torch.distributed.is_available() else None
        if dist is not None and dist.is_initialized():
            if dist.get_rank() == 0:
                for d in range(len(self.datasets)):
                    self._build_perm(d, 0)
            dist.barrier()
        for d in range(len(self.datasets)):
            self._perm(d, 0)

    def _perm(self, d, epoch):
        key = (d, epoch)
        if key not in self._perms:
            path = self._perm_path(d, epoch)
            if not os.path.exists(path):
                lock = _file_lock(path)
                try:
                    self._build_perm(d, epoch)
                finally:
                    lock.close()
            if len(self._perms) >= 256:  # memmaps cost a file handle each, no memory; bound the handles
                self._perms.pop(next(iter(self._perms)))
            # plain ndarray view: np.memmap's per-index Python hooks would cost more than the sample copy
            self._perms[key] = np.load(path, mmap_mode="r").view(np.ndarray)
        return self._perms[key]

    def __getitem__(self, i):
        """Global sample i (any i >= 0) -> np.int64 [seq_len + 1]."""
        block, r = divmod(int(i), BLEND_BLOCK)
        d = int(self.block_dataset[r])
        epoch, pos = divmod(block * int(self.block_counts[d]) + int(self.block_sample[r]), self.samples_per_epoch[d])
        start = int(self._perm(d, epoch)[pos]) * self.seq_len
        return self.streams[d][start:start + self.seq_len + 1].astype(np.int64)

    def get_batch(self, step, global_batch_size, dp_rank=0, dp_size=1):
        """(x, y) torch.long [G // dp_size, seq_len]: this rank's slice of global batch `step`, y = x shifted by one."""
        import torch

        rows = np.stack([self[i] for i in batch_indices(step, global_batch_size, dp_rank, dp_size)])
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def micro_batches(self, step, global_batch_size, micro_batch_size, dp_rank=0, dp_size=1):
        """This rank's slice of global batch `step` as a list of (x, y) micro-batches [micro_batch_size, seq_len]."""
        x, y = self.get_batch(step, global_batch_size, dp_rank, dp_size)
        return list(zip(x.split(micro_batch_size), y.split(micro_batch_size)))
