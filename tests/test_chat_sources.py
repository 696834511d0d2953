"""The chat training sources end to end: tools/fetch_data.py chat downloads tiny parquet files written in each
dataset's real schema from a local HTTP server laid out like the Hugging Face hub (the same URLs, another host),
then the loaders of megachat.tasks read them into conversations that the tokenizer renders."""
import http.server
import importlib.util
import os
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megachat.tasks.gsm8k import gsm8k_train
from megachat.tasks.mixture import Part, TaskMixture
from megachat.tasks.multiple_choice import arc_train, mmlu_auxiliary_train
from megachat.tasks.smoltalk import ParquetConversations, smoltalk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FETCH = os.path.join(ROOT, "tools", "fetch_data.py")
spec = importlib.util.spec_from_file_location("megachat_tool_fetch_data", FETCH)
fetch_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch_data)


def chat(user, *turns, system=None):
    messages = [{"content": system, "role": "system"}] if system else []
    messages.append({"content": user, "role": "user"})
    messages += [{"content": t, "role": "assistant" if i % 2 == 0 else "user"} for i, t in enumerate(turns)]
    return messages


SMOLTALK_TRAIN = [  # 4 files, as the repo has
    [chat("Hi!", "Hello! How can I help?")],
    [chat("Name a color.", "Blue.", "Another?", "Green."), chat("Thanks", "You're welcome.", system="Be brief.")],
    [chat("What is 2+2?", "4.")],
    [chat("Say yes.", "Yes.")],
]
SMOLTALK_TEST = [chat("Bye.", "Goodbye!")]
MMLU_AUX = [  # the auxiliary_train config nests each row in a `train` struct; its subject is empty
    {"answer": 2, "choices": ["red", "green", "blue", "black"], "question": "The sky on a clear day is", "subject": ""},
    {"answer": 0, "choices": ["yes", "no", "maybe", "never"], "question": "Is water wet?", "subject": ""},
]
GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many does he have?",
     "answer": "He has 3+4=<<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 1,000 pens; 2 boxes?", "answer": "2*1000=<<2*1000=2000>>2000\n#### 2,000"},
]
ARC_EASY = [
    {"id": "Mercury_1", "question": "Which is a mammal?", "answerKey": "B",
     "choices": {"text": ["shark", "whale", "trout", "eel"], "label": ["A", "B", "C", "D"]}},
    {"id": "NYSEDREGENTS_2", "question": "Which is a gas at room temperature?", "answerKey": "3",
     "choices": {"text": ["iron", "water", "oxygen"], "label": ["1", "2", "3"]}},
]
ARC_CHALLENGE = [
    {"id": "Mercury_3", "question": "What makes a shadow?", "answerKey": "E",
     "choices": {"text": ["heat", "sound", "wind", "rain", "blocked light"], "label": list("ABCDE")}},
]


def parquet_bytes(tmp, name, columns):
    path = tmp / name
    pq.write_table(pa.table(columns), path)
    return path.read_bytes()


class FakeHub(http.server.BaseHTTPRequestHandler):
    files, requests = {}, []

    def do_GET(self):
        FakeHub.requests.append(self.path)
        body = FakeHub.files.get(self.path)
        if body is None:
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """http://127.0.0.1:PORT serving /datasets/<repo>/resolve/main/<path>: the real repos' file paths."""
    tmp = tmp_path_factory.mktemp("hub")
    files = {}  # (repo, path in it) -> columns
    for i, convs in enumerate(SMOLTALK_TRAIN):
        files["HuggingFaceTB/smol-smoltalk", f"data/train-{i:05d}-of-00004.parquet"] = {
            "messages": convs, "source": ["smol-magpie-ultra"] * len(convs)}
    files["HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet"] = {
        "messages": SMOLTALK_TEST, "source": ["everyday-conversations"]}
    files["cais/mmlu", "auxiliary_train/train-00000-of-00001.parquet"] = {"train": MMLU_AUX}
    files["openai/gsm8k", "main/train-00000-of-00001.parquet"] = {k: [r[k] for r in GSM8K] for k in GSM8K[0]}
    for subset, rows in (("ARC-Easy", ARC_EASY), ("ARC-Challenge", ARC_CHALLENGE)):
        files["allenai/ai2_arc", f"{subset}/train-00000-of-00001.parquet"] = {
            k: [r[k] for r in rows] for k in ("id", "question", "choices", "answerKey")}
    FakeHub.files = {f"/datasets/{repo}/resolve/main/{path}": parquet_bytes(tmp, f"{n}.parquet", columns)
                     for n, ((repo, path), columns) in enumerate(files.items())}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def chat_dir(hub, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat")
    fetch_data.fetch_chat([], out, base_url=hub, retries=1)
    return out


# ---- the download ----
def test_chat_fetch_puts_each_sources_hub_files_in_its_folder_and_skips_complete_ones(hub, tmp_path):
    FakeHub.requests = []
    paths = fetch_data.fetch_chat([], tmp_path, base_url=hub, retries=1)
    assert sorted(FakeHub.requests) == sorted(FakeHub.files)  # every file of the five sources, once
    assert {name: sorted(os.path.basename(p) for p in ps) for name, ps in paths.items()} == {
        "smoltalk": ["test-00000-of-00001.parquet"] + [f"train-{i:05d}-of-00004.parquet" for i in range(4)],
        "mmlu-auxiliary-train": ["train-00000-of-00001.parquet"],
        "gsm8k": ["train-00000-of-00001.parquet"],
        "arc-easy": ["train-00000-of-00001.parquet"],
        "arc-challenge": ["train-00000-of-00001.parquet"]}
    assert open(paths["gsm8k"][0], "rb").read() == FakeHub.files[
        "/datasets/openai/gsm8k/resolve/main/main/train-00000-of-00001.parquet"]
    FakeHub.requests = []
    fetch_data.fetch_chat(["gsm8k", "smoltalk"], tmp_path, base_url=hub)
    assert FakeHub.requests == []


def test_chat_cli_takes_hf_endpoint_and_never_imports_torch(hub, tmp_path):
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code, FETCH, "chat", "gsm8k", "arc-easy", "--output", str(tmp_path),
                          "--retries", "1"], env={**os.environ, "HF_ENDPOINT": hub}, check=True, timeout=60,
                         capture_output=True, text=True).stdout
    assert "gsm8k: 1 file(s)" in out and sorted(os.listdir(tmp_path)) == ["arc-easy", "gsm8k"]


def test_unknown_source_and_missing_file_fail_with_the_name(hub, tmp_path):
    with pytest.raises(ValueError, match=r"unknown chat source\(s\) \['mmlu'\]; pick from \['smoltalk'"):
        fetch_data.fetch_chat(["mmlu"], tmp_path, base_url=hub)
    with pytest.raises(RuntimeError, match=r"1 of 1 files failed.*nowhere/datasets/openai/gsm8k/resolve/main/main/"):
        fetch_data.fetch_chat(["gsm8k"], tmp_path, base_url=hub + "/nowhere", retries=1)
    assert os.listdir(tmp_path / "gsm8k") == []


# ---- the loaders ----
def test_smoltalk_is_lazy_in_nanochats_order_and_renders(chat_dir, tok):
    task = smoltalk(chat_dir, "train")
    rows = [c for convs in SMOLTALK_TRAIN for c in convs]  # the files in name order
    assert isinstance(task.conversations, ParquetConversations) and len(task) == len(rows) == 5
    order = np.random.default_rng(42).permutation(5)  # datasets.Dataset.shuffle(seed=42), as nanochat loads it
    assert [c["messages"] for c in task] == [rows[j] for j in order]
    assert [c["messages"] for c in smoltalk(chat_dir, "train", seed=None)] == rows
    assert task[-1] == task[4] and task[1:3] == [task[1], task[2]]
    with pytest.raises(IndexError):
        task[5]
    system = smoltalk(chat_dir, "train", seed=None)[2]
    ids, mask = tok.render_conversation(system)
    assert "Be brief.\n\nThanks" in tok.decode(ids)  # the system message is merged into the first user turn
    assert all(len(tok.render_conversation(c)[0]) > 4 for c in task)
    assert [c["messages"] for c in smoltalk(chat_dir, "test")] == SMOLTALK_TEST


def test_gsm8k_train_has_the_calculator_parts_and_the_answer(chat_dir, tok):
    task = gsm8k_train(chat_dir, seed=None)
    assert task.kind == "generative" and len(task) == 2
    first = task[0]
    assert first["messages"][0] == {"role": "user", "content": GSM8K[0]["question"]}
    assert first["messages"][1]["content"] == [
        {"type": "text", "text": "He has 3+4="}, {"type": "python", "text": "3+4"},
        {"type": "python_output", "text": "7"}, {"type": "text", "text": "7 apples.\n#### 7"}]
    assert [c["answer"] for c in task] == ["7", "2000"]
    assert task.score(first, "so #### 7") and not task.score(first, "#### 7.0")
    ids, mask = tok.render_conversation(first)
    python_output = ids.index(tok.encode_special("<|output_start|>"))
    assert mask[python_output] == 0 and mask[ids.index(tok.encode_special("<|python_start|>"))] == 1


def test_mmlu_auxiliary_train_unwraps_its_rows_into_lettered_questions(chat_dir, tok):
    task = mmlu_auxiliary_train(chat_dir, seed=None)
    assert task.kind == "categorical" and len(task) == 2
    conv = task[0]
    assert conv["letters"] == list("ABCD") and conv["messages"][1] == {"role": "assistant", "content": "C"}
    assert conv["messages"][0]["content"].startswith("Multiple Choice question: The sky on a clear day is\n- red=A\n")
    assert task[1]["messages"][1]["content"] == "A"
    assert all(tok.render_conversation(c) for c in task)


def test_arc_train_letters_its_options_whatever_the_dataset_labels(chat_dir, tok):
    easy = arc_train(chat_dir, "ARC-Easy", seed=None)
    assert [(c["id"], c["letters"], c["messages"][1]["content"]) for c in easy] == [
        ("Mercury_1", list("ABCD"), "B"), ("NYSEDREGENTS_2", list("ABC"), "C")]  # label "3" of 1-3 -> C
    assert "- oxygen=C\n" in easy[1]["messages"][0]["content"]
    challenge = arc_train(chat_dir, "ARC-Challenge")
    assert challenge.name == "ARC-Challenge-train" and challenge[0]["messages"][1]["content"] == "E"
    with pytest.raises(ValueError, match="use 'ARC-Easy' or 'ARC-Challenge'"):
        arc_train(chat_dir, "ARC")


def test_the_sources_mix_and_render_as_one_batch(chat_dir, tok):
    parts = [Part("smoltalk", smoltalk(chat_dir).conversations), Part("mmlu", mmlu_auxiliary_train(chat_dir)),
             Part("gsm8k", gsm8k_train(chat_dir)), Part("arc", arc_train(chat_dir, "ARC-Easy"), repeats=2)]
    mixture = TaskMixture(parts)
    assert mixture.counts() == {"smoltalk": 5, "mmlu": 2, "gsm8k": 2, "arc": 4}
    from megachat.tasks.mixture import render_batch
    x, y = render_batch([mixture[i] for i in range(len(mixture))], tok, seq_len=96)
    assert x.shape == (13, 96) and (y != -1).any(dim=1).all()  # every conversation has trained tokens


def test_a_missing_download_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"smoltalk: no train-\*\.parquet files; download them with "
                                                rf"`python tools/fetch_data.py chat smoltalk --output {tmp_path}`"):
        smoltalk(tmp_path, "train")
    for load, name in ((gsm8k_train, "gsm8k"), (mmlu_auxiliary_train, "mmlu-auxiliary-train"),
                       (lambda d: arc_train(d, "ARC-Challenge"), "arc-challenge")):
        with pytest.raises(FileNotFoundError, match=f"chat {name} --output"):
            load(tmp_path)


def test_a_file_of_another_schema_is_refused(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    pq.write_table(pa.table({"problem": ["1+1?"], "solution": ["2"]}), tmp_path / "gsm8k" / "train-0.parquet")
    with pytest.raises(ValueError, match=r"train-0\.parquet: no column\(s\) \['question', 'answer'\].*download it"):
        gsm8k_train(tmp_path)
