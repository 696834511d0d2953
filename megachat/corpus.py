"""Raw text -> documents -> token shards: the engine of tools/preprocess_data.py and tools/train_tokenizer.py.

Inputs are files or globs: `.parquet` (one document per row of --text-column, read one row group at a time),
`.jsonl` (one JSON object per line, document under --json-key, read in byte ranges aligned to lines) and
`.txt` (the whole file is one document). Work is split into tasks (row groups, byte ranges) that worker
processes read and encode themselves, so the parent only writes tokens. Every document is <|bos|> + ids.

Tokens go straight into PREFIX.bin.partial (and PREFIX_val.bin.partial); after each input file they are
fsynced and PREFIX.progress.json records the resume point, so an interrupted run is continued by the next run
from the first unfinished file; only a complete job renames the files to PREFIX.bin/.idx.
`--val-fraction` sends a document to validation when a hash of its text falls below the fraction:
deterministic, independent of chunking and workers, and exact duplicates land on the same side.
This module must not import torch (workers start faster without it).
"""
import collections
import glob
import hashlib
import json
import multiprocessing as mp
import os
import signal
import time
from json.scanner import make_scanner

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from megachat.data import MAX_DOC_TOKENS, IndexedDataset, IndexedDatasetWriter, dtype_for_vocab
from megachat.tokenizer import Tokenizer
from megachat.fileio import atomic_write_json

KINDS = {".parquet": "parquet", ".jsonl": "jsonl", ".txt": "txt"}
JSONL_CHUNK_BYTES = 1 << 20  # ~300 K tokens a task: small enough to balance 2..64 workers


def expand_inputs(patterns):
    """Files and globs -> sorted, de-duplicated file list; raises on no match, an unknown type or an empty file."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not os.path.isfile(matches[0]):
            raise FileNotFoundError(f"--input {pattern}: no such file; check the path (quote globs)")
        files += [m for m in matches if m not in files]
    for path in files:
        if os.path.splitext(path)[1] not in KINDS:
            raise ValueError(f"{path}: unsupported file type; inputs must end in .parquet, .jsonl or .txt")
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path} is empty (0 bytes); remove it from --input")
    return files


def plan_tasks(path, text_column="text", chunk_bytes=JSONL_CHUNK_BYTES):
    """One file -> list of (path, kind, start, end, weight_bytes) work units."""
    kind = KINDS[os.path.splitext(path)[1]]
    if kind == "parquet":
        meta = pq.ParquetFile(path).metadata
        names = meta.schema.names
        if text_column not in names:
            raise ValueError(f"{path} has no column {text_column!r} (columns: {names}); pass --text-column")
        if meta.num_rows == 0:
            raise ValueError(f"{path} has 0 rows; remove it from --input")
        return [(path, kind, g, g + 1, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]
    size = os.path.getsize(path)
    if kind == "txt":
        return [(path, kind, 0, size, size)]
    return [(path, kind, lo, min(size, lo + chunk_bytes), min(size, lo + chunk_bytes) - lo)
            for lo in range(0, size, chunk_bytes)]


def _decode(raw, path, offset):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 at byte {offset + e.start}; convert the file to UTF-8 "
                         "(e.g. iconv -f latin1 -t utf-8)") from None


def read_task(task, text_column="text", json_key="text"):
    """Yield the non-empty documents (str) of one task."""
    path, kind, start, end, _ = task
    if kind == "parquet":
        column = pq.ParquetFile(path).read_row_group(start, columns=[text_column]).column(0)
        for text in column.to_pylist():
            if isinstance(text, bytes):
                text = _decode(text, path, 0)
            if text:
                yield text
        return
    if kind == "jsonl":
        texts = _read_jsonl_fast(path, start, end, json_key)
        if texts is not None:
            yield from texts
            return
    yield from _read_lines(task, json_key)


_SCAN_JSON = make_scanner(json.JSONDecoder())  # what json.loads runs, minus its per-call wrapper


def _read_jsonl_fast(path, start, end, json_key):
    """The documents of the lines starting in [start, end): the range read in one go, each line parsed with
    json's scanner. None when any line is not a plain `{...}` object with a string json_key, or not UTF-8:
    _read_lines then gives the exact answer (or error) for the task."""
    with open(path, "rb") as f:
        lo = start - 1 if start else 0
        f.seek(lo)
        data = f.read(end - lo)
        if start:  # A line belongs to the range where it starts: skip the partial line we land in.
            cut = data.find(b"\n")
            if cut < 0:
                return []
            data = data[cut + 1:]
        if data and not data.endswith(b"\n"):
            data += f.readline()  # the last line runs past end
    texts = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:  # decoded line by line: one non-ASCII character would make a whole decoded chunk 2-4 bytes a char
            line = line.decode("utf-8")
            obj, stop = _SCAN_JSON(line, 0)
        except (UnicodeDecodeError, StopIteration, ValueError, RecursionError):
            return None
        if stop != len(line) and line[stop:].strip(" \t\r"):  # json.loads allows only whitespace after it
            return None
        text = obj.get(json_key) if type(obj) is dict else None
        if type(text) is not str:
            return None
        if text:
            texts.append(text)
    return texts


def _read_lines(task, json_key):
    """jsonl line by line (the reference for _read_jsonl_fast, and the error messages), or a whole .txt."""
    path, kind, start, end, _ = task
    with open(path, "rb") as f:
        if kind == "txt":
            text = _decode(f.read(), path, 0)
            if text:
                yield text
            return
        # A line belongs to the range where it starts: skip the partial line we land in.
        pos = start
        if start:
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())
        while pos < end:
            line = f.readline()
            if not line:
                break
            where, pos = pos, pos + len(line)
            if not line.strip():
                continue
            try:
                obj = json.loads(_decode(line, path, where))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line at byte {where} is not valid JSON ({e.msg}); fix or drop that "
                                 "line") from None
            text = obj.get(json_key) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}: line at byte {where} has no string field {json_key!r}; pass --json-key")
            if text:
                yield text


def iter_texts(files, text_column="text", json_key="text", max_chars=None, doc_cap=10_000):
    """Documents of the files in order, each cropped to doc_cap chars, stopping after max_chars (tokenizer training)."""
    seen = 0
    for path in files:
        for task in plan_tasks(path, text_column):
            for text in read_task(task, text_column, json_key):
                text = text[:doc_cap] if doc_cap else text
                if max_chars is not None and seen + len(text) > max_chars:
                    yield text[:max_chars - seen]
                    return
                seen += len(text)
                yield text


# ---- worker side ----
_state = {}


def _init_worker(tok, text_column, json_key, val_fraction, max_doc_tokens):
    """Called in the parent before forking: the workers inherit the loaded tokenizer instead of each loading it."""
    _state.update(tok=tok, dtype=dtype_for_vocab(tok.vocab_size), text_column=text_column, json_key=json_key,
                  val_fraction=val_fraction, max_doc_tokens=max_doc_tokens)


def _is_val(text, fraction):
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2.0**64


def _encode_task(job):
    """(task, all_val) -> (train_tokens, train_lengths, val_tokens, val_lengths, n_docs)."""
    task, all_val = job
    s = _state
    # tiktoken's Rust encoder, called as encode_to_numpy calls it (no special tokens: their text stays plain
    # text, = encode_ordinary) minus ~2 µs of Python wrapper a document; the uint32 buffers are joined as bytes.
    encode, no_special = s["tok"].enc._core_bpe.encode_to_tiktoken_buffer, set()
    cap, fraction = s["max_doc_tokens"], s["val_fraction"]
    bos = np.array([s["tok"].bos_id], dtype=np.uint32).tobytes()
    pieces, lengths = {False: [], True: []}, {False: [], True: []}  # per split: bos, ids, bos, ids, ...
    for text in read_task(task, s["text_column"], s["json_key"]):
        ids = encode(text, no_special)
        n = memoryview(ids).nbytes // 4 + 1
        if n > cap:
            raise ValueError(f"{task[0]}: a document of {n} tokens (starting {text[:40]!r}) exceeds "
                             f"--max-doc-tokens {cap}; split it into smaller documents (e.g. jsonl, one per line)")
        split = all_val or _is_val(text, fraction)
        pieces[split] += (bos, ids)
        lengths[split].append(n)
    out = []
    for split in (False, True):
        # ids < vocab_size, so the narrowing cast is exact
        tokens = np.frombuffer(b"".join(pieces[split]), dtype=np.uint32).astype(s["dtype"])
        out += [tokens, np.array(lengths[split], dtype=np.int64)]
    return (*out, len(lengths[False]) + len(lengths[True]))


# ---- parent side ----
def _identity(path):
    """What must not change in a finished input for a resumed run to reuse its tokens."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _finer_tail(tasks, n_workers, parts=4):
    """The last n_workers byte-range tasks cut into `parts` pieces each (the same lines, in the same order): the
    workers then run out of work within a fraction of a task of each other instead of up to a whole task."""
    if n_workers < 2:
        return tasks
    head, tail = tasks[:-n_workers], tasks[-n_workers:]
    for (path, kind, start, end, weight), all_val, i in tail:
        if kind != "jsonl" or end - start < parts:
            head.append(((path, kind, start, end, weight), all_val, i))
            continue
        cuts = [start + (end - start) * k // parts for k in range(parts + 1)]
        head += [((path, kind, lo, hi, hi - lo), all_val, i) for lo, hi in zip(cuts, cuts[1:])]
    return head


def _job_key(files, val_files, tok, **options):
    ident = {"inputs": [os.path.abspath(p) for p in files], "val_inputs": [os.path.abspath(p) for p in val_files],
             "tokenizer": tok.fingerprint, **options}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def preprocess(inputs, tokenizer_dir, output_prefix, workers=None, text_column="text", json_key="text",
               val_fraction=0.0, val_inputs=(), max_doc_tokens=MAX_DOC_TOKENS, progress=True):
    """Tokenize the inputs into OUTPUT_PREFIX.bin/.idx (+ OUTPUT_PREFIX_val.bin/.idx); returns a summary dict.

    Tokens stream straight into OUTPUT_PREFIX.bin.partial (no merge copy afterwards, whatever the number of
    inputs). After each input file the partial files are fsynced and OUTPUT_PREFIX.progress.json records how far
    they are complete; a rerun of the same job cuts them back to that point and continues with the next file.
    """
    files, val_files = expand_inputs(inputs), expand_inputs(val_inputs) if val_inputs else []
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1)")
    tok = Tokenizer.load(tokenizer_dir)
    dtype = dtype_for_vocab(tok.vocab_size)
    has_val = val_fraction > 0 or bool(val_files)
    key = _job_key(files, val_files, tok, text_column=text_column, json_key=json_key,
                   val_fraction=val_fraction, max_doc_tokens=max_doc_tokens)
    sources = [(p, False) for p in files] + [(p, True) for p in val_files]
    identities = [_identity(p) for p, _ in sources]
    outputs = {"train": output_prefix, "val": output_prefix + "_val"} if has_val else {"train": output_prefix}
    meta_path, progress_path = output_prefix + ".meta.json", output_prefix + ".progress.json"
    if os.path.exists(meta_path):
        meta = _read_json(meta_path)
        if meta.get("job") == key and meta.get("inputs") == identities and all(
                os.path.exists(o + ".idx") for o in outputs.values()):
            for o in outputs.values():
                IndexedDataset(o)  # still intact?
            return dict(meta, skipped=True)
    state = None
    if os.path.exists(progress_path):
        state = _read_json(progress_path)
        if state.get("job") != key:
            raise FileExistsError(f"{progress_path} belongs to another job (other inputs, tokenizer or options); "
                                  f"delete it and {output_prefix}*.partial, or choose another --output-prefix")
        for (path, _), then, now in zip(sources, state["done"], identities):
            if then != now:
                raise ValueError(f"{path} changed after it was tokenized by the interrupted run; delete "
                                 f"{progress_path} to start over")
    else:
        for o in outputs.values():
            if os.path.exists(o + ".idx") or os.path.exists(o + ".bin"):
                raise FileExistsError(f"{o}.idx/.bin exist from another run; delete them or choose another "
                                      "--output-prefix")
    first = len(state["done"]) if state else 0
    n_workers = workers or len(os.sched_getaffinity(0))
    total = sum(os.path.getsize(p) for p, _ in sources[first:])
    # Small inputs still get several tasks per worker; large ones stay at JSONL_CHUNK_BYTES per task.
    chunk = max(1 << 16, min(JSONL_CHUNK_BYTES, total // (8 * n_workers) + 1))
    tasks = [(t, all_val, i) for i, (p, all_val) in enumerate(sources) if i >= first
             for t in plan_tasks(p, text_column, chunk)]
    tasks = _finer_tail(tasks, n_workers)
    remaining = collections.Counter(i for _, _, i in tasks)
    _init_worker(tok, text_column, json_key, val_fraction, max_doc_tokens)

    writers = {split: IndexedDatasetWriter(prefix, dtype, resumable=True, resume=state and state[split])
               for split, prefix in outputs.items()}
    docs, n_docs, n_tokens = collections.Counter(), 0, 0
    bar = None
    if progress:
        # updated once per task (~1 MB), never per document; disable=None: no bar when stderr is not a terminal
        bar = tqdm(total=sum(t[4] for t, _, _ in tasks), unit="B", unit_scale=True, desc="preprocess",
                   smoothing=0.1, disable=None)
    t0 = time.time()
    pool = None
    try:
        if n_workers > 1 and len(tasks) > 1:
            # fork: workers start in ~0.1 s instead of ~1.5 s (spawn re-imports everything); they run only
            # tiktoken, numpy and pyarrow, never torch, so forking a parent that holds torch threads is safe.
            # Ctrl-C reaches the whole process group: the workers ignore it, the parent stops them (exit 130)
            pool = mp.get_context("fork").Pool(n_workers, signal.signal, (signal.SIGINT, signal.SIG_IGN))
            results = pool.imap(_encode_task, [(t, all_val) for t, all_val, _ in tasks])
        else:
            results = map(_encode_task, [(t, all_val) for t, all_val, _ in tasks])
        for (task, _, i), (tr, tr_len, va, va_len, nd) in zip(tasks, results):
            writers["train"].add_documents(tr, tr_len)
            if has_val:
                writers["val"].add_documents(va, va_len)
            docs[i] += nd
            n_docs += nd
            n_tokens += len(tr) + len(va)
            remaining[i] -= 1
            if remaining[i] == 0:  # input i is complete (results arrive in input order): a resume point
                if docs[i] == 0:
                    raise ValueError(f"{task[0]} contains no documents (every text is empty); remove it from --input")
                state = {"job": key, "done": identities[:i + 1],
                         **{split: w.checkpoint() for split, w in writers.items()}}
                atomic_write_json(progress_path, state)
            if bar is not None:
                dt = max(time.time() - t0, 1e-9)
                bar.set_postfix_str(f"{n_docs / dt:,.0f} docs/s {n_tokens / dt / 1e6:,.2f} Mtok/s", refresh=False)
                bar.update(task[4])
    except BaseException:
        for w in writers.values():  # keep the partial files only when a resume point refers to them
            w.close() if state else w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _state.clear()
        if bar is not None:
            bar.close()
    elapsed = time.time() - t0
    for w in writers.values():
        w.finalize()
    train = IndexedDataset(output_prefix)
    val = IndexedDataset(outputs["val"]) if has_val else None
    summary = {"job": key, "inputs": identities, "tokenizer": os.path.abspath(tokenizer_dir),
               "tokenizer_sha256": tok.fingerprint, "vocab_size": tok.vocab_size, "dtype": dtype.name,
               "train_documents": len(train),
               "train_tokens": train.num_tokens, "val_documents": len(val) if val else 0,
               "val_tokens": val.num_tokens if val else 0, "seconds_this_run": round(elapsed, 3),
               "tokens_this_run": n_tokens}
    atomic_write_json(meta_path, summary)
    if has_val:  # the val shard names its tokenizer too (megachat.data.check_tokenizer reads PREFIX_val.meta.json)
        atomic_write_json(outputs["val"] + ".meta.json", summary)
    if os.path.exists(progress_path):
        os.remove(progress_path)
    return summary
