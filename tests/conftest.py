"""Fixtures shared by the test files."""
import json
import os
import subprocess
import sys

import pytest

# --- the demo corpus sample and a tokenizer trained on it (test_tokenizer.py, test_tools.py) ---
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS_SAMPLE = os.path.join(ROOT, "tests", "fixtures", "demo_corpus_sample.jsonl")


@pytest.fixture(scope="session")
def texts():
    """The 75 documents of tests/fixtures/demo_corpus_sample.jsonl, in file order (shared: do not mutate)."""
    with open(CORPUS_SAMPLE, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def tok(texts):
    """A 512-id Tokenizer trained in memory on `texts` (Tokenizer.train)."""
    from megachat.tokenizer import Tokenizer
    return Tokenizer.train(iter(texts), vocab_size=512)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """Directory of the same 512-id tokenizer, written by the user's command, tools/train_tokenizer.py."""
    out = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", CORPUS_SAMPLE,
                    "--vocab-size", "512", "--output", out], check=True, timeout=120)
    return out


# `make test` runs the files on two workers (pytest-xdist, --dist loadfile: a file stays on one worker, so its module
# fixtures run once), each taking the next file in collection order when it runs low. The longest files (seconds on
# the 2-core box, `pytest --durations`) go first, so that no long file starts last and runs alone at the end.
LONGEST_FIRST = ["test_train.py", "test_failures.py", "test_train_resume.py", "test_chat_phases.py",
                 "test_zero_memory.py", "test_hf.py", "test_planner.py", "test_failures_jobs.py",
                 "test_optim_distributed.py", "test_chat_web.py", "test_multinode.py", "test_chat_rl.py",
                 "test_disk_full.py", "test_kernels_interpreter.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest keep their order
