"""Training mixtures of tasks: a deterministic order of conversations, addressed by global example number.

- `TaskMixture(tasks, seed)`: every conversation of every task, each task repeated `repeats` times (nanochat
  oversamples identity and spelling this way) or capped at `limit`, shuffled once by seed. Example i is the same
  conversation for any dp size, any restart: resume is exact.
- `TaskSequence(tasks)`: the tasks one after another (a curriculum).
- `render_batch(conversations, tokenizer, seq_len)`: SFT's padded micro-batch: x, y long [B, seq_len], targets -1
  where the assistant did not write the token (nanochat's mask) and on the padding.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Part:
    """One task in a mixture: its conversations, how many times over, and at most how many of them (None: all)."""
    name: str
    conversations: Sequence[dict]
    repeats: int = 1
    limit: int | None = None

    def __post_init__(self):
        if self.repeats < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"mixture part {self.name}: repeats {self.repeats} and limit {self.limit} must be >= 1")


class TaskMixture(Sequence):
    """The conversations of all parts, shuffled by seed; mixture[i] -> conversation; name_of(i) -> its task."""

    def __init__(self, parts: list[Part], seed: int = 42):
        if not parts:
            raise ValueError("an empty task mixture: give at least one task")
        self.parts = parts
        index = [(p, i) for p, part in enumerate(parts)
                 for _ in range(part.repeats) for i in range(min(len(part.conversations), part.limit or 1 << 62))]
        if not index:
            raise ValueError(f"task mixture of {[p.name for p in parts]} holds no conversation")
        random.Random(seed).shuffle(index)
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        p, j = self.index[i]
        return self.parts[p].conversations[j]

    def name_of(self, i: int) -> str:
        return self.parts[self.index[i][0]].name

    def counts(self) -> dict[str, int]:
        """{task name: conversations in the mixture}, in the parts' order."""
        out = {p.name: 0 for p in self.parts}
        for p, _ in self.index:
            out[self.parts[p].name] += 1
        return out


class TaskSequence(Sequence):
    """The parts' conversations one after the other, in order."""

    def __init__(self, parts: list[Part]):
        self.parts = parts
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + part.repeats * min(len(part.conversations), part.limit or 1 << 62))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of a sequence of {len(self)}")
        p = next(k for k in range(len(self.parts)) if i < self.starts[k + 1])
        part = self.parts[p]
        return part.conversations[(i - self.starts[p]) % min(len(part.conversations), part.limit or 1 << 62)]


def render_batch(conversations, tokenizer, seq_len: int):
    """(x, y) long [len(conversations), seq_len]: each conversation rendered (cut at seq_len + 1 tokens), x its
    tokens but the last and y its tokens but the first, where y = -1 on the tokens the assistant did not write
    (the prompt, tool output: nanochat's mask) and on the padding after the conversation (x pads with <|bos|>).
    Padding to one fixed length keeps every micro-batch's shape the same in every layout (the pipeline engine
    needs it)."""
    x = torch.full((len(conversations), seq_len), tokenizer.bos_id, dtype=torch.long)
    y = torch.full((len(conversations), seq_len), -1, dtype=torch.long)
    for row, conversation in enumerate(conversations):
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=seq_len + 1)
        n = len(ids) - 1
        x[row, :n] = torch.tensor(ids[:-1])
        y[row, :n] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    return x, y
