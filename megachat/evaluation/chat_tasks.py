"""ChatCORE: a chat model on the six tasks of megachat.tasks, scored as nanochat's chat_eval does, split over dp.

- Categorical (ARC-Easy, ARC-Challenge, MMLU): one forward of the prompt (the chat up to <|assistant_start|>);
  the logits of the option letters at its last position pick the answer (model_eval.GridForward.letter_logits,
  tp-sharded). Conversations are split round-robin over dp ranks.
- Generative (GSM8K, HumanEval, SpellingBee): the inference engine (megachat.engine, KV cache, calculator tool)
  completes `batch_size` prompts per request (a rank's requests all at once, in its continuous batch), sampled as a
  megachat.engine.Sampling says (DEFAULT_SAMPLING: nanochat's chat_eval settings); a problem passes when any of its
  num_samples completions scores (task.score). Batches are cut from the task's example order and dealt round-robin
  to dp ranks, and batch b samples with sampling.seed + b, so every batch is the same under any dp (and greedy
  results equal one process).
- ChatCORE = the mean over the six tasks of (accuracy - b) / (1 - b), b = 0.25 for the four-option tasks and 0
  for the generative ones; only computed when all six ran.
Counts are all-reduced over the world with one contribution per dp slice (`scores` is True on one rank of each).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace

import torch

from megachat.engine import Sampling
from megachat.evaluation.loss_eval import all_reduce_sum
from megachat.tasks import Task
from megachat.tasks.gsm8k import load_gsm8k
from megachat.tasks.humaneval import load_humaneval
from megachat.tasks.multiple_choice import load_arc, load_mmlu
from megachat.tasks.spelling import spelling_bee

CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
# ChatCORE's random baselines: multiple choice with 4 options, 0 for the generative tasks.
CHAT_BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
                  "SpellingBee": 0.0}
SPELLING_BEE_SIZE = 256  # test examples, as nanochat
# how the generative tasks sample: nanochat's chat_eval defaults (-n 1 -m 512 -t 0 -k 50 -b 8)
DEFAULT_SAMPLING = Sampling(num_samples=1, max_tokens=512, temperature=0.0, top_k=50, seed=42)
BATCH_SIZE = 8  # prompts per engine call (left-padded by the engine)


def load_chat_task(name: str, data_dir=None) -> Task:
    """One ChatCORE task by name (CHATCORE_TASKS), on its evaluation split."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        return load_arc(name, data_dir)
    if name == "SpellingBee":
        return spelling_bee(SPELLING_BEE_SIZE, "test", data_dir)
    loaders = {"MMLU": load_mmlu, "GSM8K": load_gsm8k, "HumanEval": load_humaneval}
    if name not in loaders:
        raise ValueError(f"unknown ChatCORE task {name!r}; choose from {', '.join(CHATCORE_TASKS)}")
    return loaders[name](data_dir)


def eval_indices(size: int, max_per_task: int = -1) -> list[int]:
    """Which examples to evaluate: all of them in order, or (max_per_task > 0) the first max_per_task of a fixed
    Random(42) permutation, so a smoke run samples the whole task (MMLU's first rows are one subject)."""
    if max_per_task <= 0 or max_per_task >= size:
        return list(range(size))
    order = list(range(size))
    random.Random(42).shuffle(order)
    return order[:max_per_task]


def letter_token_ids(tokenizer, letters) -> list[int]:
    """The single token of each option letter (nanochat scores the letter right after <|assistant_start|>)."""
    ids = []
    for letter in letters:
        enc = tokenizer.encode(letter)
        if len(enc) != 1:
            raise ValueError(f"option letter {letter!r} is {len(enc)} tokens with this tokenizer; categorical "
                             f"scoring needs each letter to be one token")
        ids.append(enc[0])
    return ids


def _reduce_accuracy(counts: torch.Tensor, n: int) -> float:
    """counts float64 [correct, counted] of this rank -> accuracy over the world, checking each example counted
    exactly once."""
    all_reduce_sum(counts)
    if counts[1].item() != n:
        raise RuntimeError(f"{int(counts[1].item())} of {n} examples were scored; exactly one rank per dp slice "
                           f"must pass scores=True")
    return counts[0].item() / n if n else 0.0


@torch.no_grad()
def evaluate_categorical(conversations, tokenizer, letter_logits, *, dp_rank=0, dp_size=1, scores=True,
                         device="cpu") -> float:
    """Accuracy of multiple-choice conversations scored categorically, split over dp ranks.

    letter_logits(ids LongTensor [1, T], token_ids list[int]) -> logits [len(token_ids)] at the last position,
    or None on a rank that holds no logits (model_eval.GridForward.letter_logits). The prompt is
    tokenizer.render_for_completion(conversation): the chat up to <|assistant_start|>."""
    counts = torch.zeros(2, dtype=torch.float64)  # [correct, counted]
    for idx in range(dp_rank, len(conversations), dp_size):
        conv = conversations[idx]
        ids = torch.tensor([tokenizer.render_for_completion(conv)], dtype=torch.long, device=device)
        logits = letter_logits(ids, letter_token_ids(tokenizer, conv["letters"]))
        if scores and logits is not None:
            gold = conv["letters"].index(conv["messages"][-1]["content"])
            counts += torch.tensor([float(int(torch.argmax(logits).item()) == gold), 1.0], dtype=torch.float64)
    return _reduce_accuracy(counts, len(conversations))


@torch.no_grad()
def evaluate_generative(conversations, score, engine, sampling: Sampling = DEFAULT_SAMPLING, *,
                        batch_size: int = BATCH_SIZE, dp_rank=0, dp_size=1, scores=True) -> float:
    """Fraction of conversations for which any of sampling.num_samples completions passes score(conversation,
    completion text), batch_size prompts per engine request (all at once: engine.generate_many), batch b sampled
    with seed sampling.seed + b, split over dp by batches. Every tp rank of a dp slice calls this with the same
    arguments (the engine's forwards are collective over tp); only ranks with scores=True decode and score. A prompt
    longer than the engine's maximum length minus max_tokens counts as failed."""
    tok, n = engine.tokenizer, sampling.num_samples
    counts = torch.zeros(2, dtype=torch.float64)  # [passed, counted]
    n_batches = -(-len(conversations) // batch_size)
    batches, calls = [], []  # this rank's batches, and the engine request of each that has prompts that fit
    for b in range(dp_rank, n_batches, dp_size):
        batch = conversations[b * batch_size:(b + 1) * batch_size]
        prompts = [tok.render_for_completion(conv) for conv in batch]
        # a prompt the engine cannot hold with max_tokens after it counts as failed (the model cannot answer it)
        fits = [len(p) + sampling.max_tokens <= engine.max_len for p in prompts]
        kept = [p for p, f in zip(prompts, fits) if f]
        if kept:
            calls.append((kept, replace(sampling, seed=sampling.seed + b)))
        batches.append((batch, fits))
    results = iter(engine.generate_many(calls))  # every batch in the engine's running batch at once
    for batch, fits in batches:
        rows = next(results)[0] if any(fits) else []
        if not scores:
            continue
        k = 0
        for conv, fit in zip(batch, fits):
            samples = rows[k * n:(k + 1) * n] if fit else []
            k += fit
            passed = any(score(conv, tok.decode(tokens)) for tokens in samples)
            counts += torch.tensor([float(passed), 1.0], dtype=torch.float64)
    return _reduce_accuracy(counts, len(conversations))


def centered(name: str, accuracy: float) -> float:
    """(accuracy - b) / (1 - b) with the task's ChatCORE baseline b."""
    b = CHAT_BASELINES[name]
    return (accuracy - b) / (1 - b)


def chatcore(accuracies: dict[str, float]) -> float:
    """Mean centered accuracy over the given ChatCORE tasks (centered by CHAT_BASELINES)."""
    if not accuracies:
        raise ValueError("ChatCORE of no tasks")
    return sum(centered(k, a) for k, a in accuracies.items()) / len(accuracies)


@dataclass
class ChatCoreResult:
    accuracy: dict[str, float] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    kind: dict[str, str] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return [name for name in CHATCORE_TASKS if name not in self.accuracy]

    @property
    def chatcore(self) -> float | None:
        """ChatCORE over the six tasks; None unless all six ran."""
        return None if self.missing else chatcore({k: self.accuracy[k] for k in CHATCORE_TASKS})

    def summary(self) -> str:
        """'ChatCORE 0.1234 over 6/6 tasks', or which tasks are missing when it is not computed."""
        ran = len(CHATCORE_TASKS) - len(self.missing)
        if self.chatcore is not None:
            return f"ChatCORE {self.chatcore:.4f} over {ran}/{len(CHATCORE_TASKS)} tasks"
        return (f"ChatCORE not computed: {ran}/{len(CHATCORE_TASKS)} tasks ran (missing: "
                f"{', '.join(self.missing)})")


def evaluate_chatcore(tasks: list[Task], tokenizer, letter_logits, engine, sampling: Sampling = DEFAULT_SAMPLING, *,
                      batch_size: int = BATCH_SIZE, max_per_task=-1, dp_rank=0, dp_size=1, scores=True, device="cpu",
                      log=None) -> ChatCoreResult:
    """Each task categorically (letter_logits) or generatively (engine, sampling, batch_size), on
    eval_indices(len, max_per_task)."""
    result = ChatCoreResult()
    for task in tasks:
        t0 = time.time()
        conversations = [task[i] for i in eval_indices(len(task), max_per_task)]
        if task.kind == "categorical":
            acc = evaluate_categorical(conversations, tokenizer, letter_logits, dp_rank=dp_rank, dp_size=dp_size,
                                       scores=scores, device=device)
        else:
            acc = evaluate_generative(conversations, task.score, engine, sampling, batch_size=batch_size,
                                      dp_rank=dp_rank, dp_size=dp_size, scores=scores)
        result.accuracy[task.name], result.examples[task.name] = acc, len(conversations)
        result.kind[task.name] = task.kind
        if log:
            log(f"{task.name:14s} accuracy {acc:.4f} ({len(conversations)} examples, {task.kind}, "
                f"{time.time() - t0:.1f} s)")
    return result
