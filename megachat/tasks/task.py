"""A task: an indexable collection of conversations plus the rule that scores a model's answer to one.

A conversation is nanochat's {"messages": [{"role": "user", "content": str}, {"role": "assistant", "content":
str | [parts]}], ...task fields}; an assistant part is {"type": "text" | "python" | "python_output", "text": str}
(a calculator call and its result). The last assistant message is the reference answer: training renders it
(tokenizer.render_conversation), evaluation prompts with everything before it (tokenizer.render_for_completion)
and scores what the model writes instead.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Task:
    """name; conversations (any Sequence: a list, or examples generated on demand); kind "categorical" (the answer
    is one of conversation["letters"], scorable from the letters' logits) or "generative"; score(conversation,
    completion text) -> whether the completion is a correct answer."""
    name: str
    conversations: Sequence[dict]
    kind: str
    score: Callable[[dict, str], bool]

    def __post_init__(self):
        if self.kind not in ("categorical", "generative"):
            raise ValueError(f"task {self.name}: kind {self.kind!r} must be 'categorical' or 'generative'")

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index):
        return self.conversations[index]

    def __iter__(self):
        return (self.conversations[i] for i in range(len(self)))
