"""The DCLM CORE metric (nanochat's core_eval): few-shot prompts, scoring, centering, the mean.

A task is scored with a `forward` function, so the same code serves one process, tensor, pipeline and data
parallelism (see model_eval.py):

    forward(input_ids LongTensor [B, T]) -> (losses fp32 [B, T], predictions int64 [B, T]) or None

where losses[b, t] is the cross-entropy of token input_ids[b, t+1] (the last column is unused) and
predictions[b, t] the argmax after position t. `None` means "this rank holds no logits" (a pipeline stage
before the last, or a tp rank other than 0): it takes part in the forward but not in the scoring.

Multiple choice and schema pick the option with the lowest mean continuation loss; language modelling needs
the greedy argmax to reproduce the continuation exactly. Examples are split over dp ranks round-robin and the
correct counts summed with one all-reduce. Centered = (acc - b) / (1 - b) with b the random baseline; CORE is
the mean over the tasks that were evaluated, always reported with their count.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .core_tasks import CORE_LABELS, CoreTaskSet, CoreTaskSpec
from .loss_eval import all_reduce_sum

# ----------------------------------------------------------------------------------------------------------
# prompts (the templates of nanochat's core_eval, written without jinja)


def render_prompts_mc(item, delimiter, fewshot):
    """One full prompt per choice; the choices differ only at the end."""
    prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, delimiter, fewshot):
    """One full prompt per context option; they share the continuation at the end."""
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{prefix}{ctx}{delimiter}{item['continuation']}" for ctx in item["context_options"]]


def render_prompts_lm(item, delimiter, fewshot):
    """[prompt without the continuation (stripped), prompt with it]."""
    prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    base = f"{prefix}{item['context'].strip()}{delimiter}"
    # stripped so trailing whitespace cannot merge into the first continuation token (nanochat does the same)
    return [base.strip(), base + item["continuation"]]


def common_length(seqs, direction="left"):
    """Length of the common prefix ('left') or suffix ('right') of token lists."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        idx = i if direction == "left" else -1 - i
        if any(s[idx] != seqs[0][idx] for s in seqs):
            return i
    return n


def tokenize_example(item, spec: CoreTaskSpec, fewshot, encode):
    """(token lists, start indices, end indices) of the scored spans; encode(str) -> ids with BOS first."""
    if spec.task_type == "multiple_choice":
        tokens = [encode(p) for p in render_prompts_mc(item, spec.continuation_delimiter, fewshot)]
        start = common_length(tokens, "left")
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if spec.task_type == "schema":
        tokens = [encode(p) for p in render_prompts_schema(item, spec.continuation_delimiter, fewshot)]
        suffix = common_length(tokens, "right")
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    if spec.task_type == "language_modeling":
        without, with_ = (encode(p) for p in render_prompts_lm(item, spec.continuation_delimiter, fewshot))
        if not (len(without) < len(with_) and with_[:len(without)] == without):
            raise ValueError(f"{spec.label}: the tokenized prompt without the continuation is not a prefix of the "
                             f"prompt with it ({item['context'][-40:]!r} + {item['continuation'][:40]!r})")
        return [with_], [len(without)], [len(with_)]
    raise ValueError(f"{spec.label}: unknown task type {spec.task_type!r}; expected multiple_choice, schema or "
                     f"language_modeling")


def fewshot_examples(data, idx, num_fewshot):
    """nanochat's choice: a seeded sample of the other examples (seed 1234 + idx). nanochat samples from the
    examples left after --max-per-task; we sample from the whole task (the same for full runs)."""
    if num_fewshot == 0:
        return []
    rng = random.Random(1234 + idx)
    return [data[i] for i in rng.sample([i for i in range(len(data)) if i != idx], num_fewshot)]


def crop(tokens, starts, ends, max_seq_len):
    """Keep the last max_seq_len tokens of each sequence (shifting the spans); a span cut off raises."""
    if max_seq_len is None:
        return tokens, starts, ends
    cuts = [max(0, len(t) - max_seq_len) for t in tokens]
    for s, e, cut in zip(starts, ends, cuts):
        if s - cut < 1:  # the token before the continuation must stay: it predicts the continuation's first
            raise ValueError(f"a continuation of {e - s} tokens does not fit in max_seq_len={max_seq_len}")
    return ([t[c:] for t, c in zip(tokens, cuts)], [s - c for s, c in zip(starts, cuts)],
            [e - c for e, c in zip(ends, cuts)])


@torch.no_grad()
def score_example(item, spec, fewshot, encode, forward, pad_id, max_seq_len=None, device="cpu"):
    """True/False whether the model gets `item` right, or None on a rank without logits."""
    tokens, starts, ends = crop(*tokenize_example(item, spec, fewshot, encode), max_seq_len)
    width = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    out = forward(ids.to(device))
    if out is None:
        return None
    losses, predictions = out
    if spec.task_type == "language_modeling":
        s, e = starts[0], ends[0]
        # predictions[t] is the guess for token t+1
        return bool(torch.equal(predictions[0, s - 1:e - 1].cpu(), ids[0, s:e]))
    means = [losses[i, s - 1:e - 1].float().mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    return means.index(min(means)) == item["gold"]


def shuffled(examples, max_per_task=-1):
    """nanochat's order: shuffled with seed 1337, then the first max_per_task (-1 = all)."""
    data = list(examples)
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def evaluate_task(examples, spec, encode, forward, pad_id, *, fewshot_pool=None, dp_rank=0, dp_size=1,
                  scores=True, max_seq_len=None, device="cpu"):
    """Accuracy of one task. Example i is scored by dp rank i % dp_size; `scores` = this rank's results count
    (exactly one rank per dp slice: tp rank 0 of the last pipeline stage). With torch.distributed initialized
    the counts are summed over the whole world, so every rank returns the same accuracy.
    fewshot_pool: the list `examples` is a prefix of (default: examples itself); few-shot examples are drawn
    from it, so --max-per-task 5 still finds 10 shots."""
    pool = examples if fewshot_pool is None else fewshot_pool
    if pool[:len(examples)] != examples:
        raise ValueError(f"{spec.label}: the evaluated examples must be a prefix of the few-shot pool")
    if spec.num_fewshot >= len(pool):
        raise ValueError(f"{spec.label}: {spec.num_fewshot}-shot needs more than {len(pool)} examples")
    correct = torch.zeros(2, dtype=torch.float64)  # [correct, counted]
    # a bar of this rank's examples on global rank 0 only, and only when stderr is a terminal (disable=None)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    for idx in tqdm(range(dp_rank, len(examples), dp_size), desc=spec.label, unit="ex", leave=False,
                    disable=None if rank0 else True):
        ok = score_example(examples[idx], spec, fewshot_examples(pool, idx, spec.num_fewshot), encode,
                           forward, pad_id, max_seq_len, device)
        if scores and ok is not None:
            correct += torch.tensor([float(ok), 1.0], dtype=torch.float64)
    all_reduce_sum(correct)
    if correct[1].item() != len(examples):
        raise RuntimeError(f"{spec.label}: {int(correct[1].item())} of {len(examples)} examples were scored; "
                           f"exactly one rank per dp slice must pass scores=True")
    return correct[0].item() / len(examples)


def centered(accuracy, random_baseline_percent):
    b = 0.01 * random_baseline_percent
    return (accuracy - b) / (1.0 - b)


@dataclass
class CoreResult:
    accuracy: dict[str, float] = field(default_factory=dict)
    centered: dict[str, float] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def core(self) -> float:
        """Mean centered accuracy over the evaluated tasks (nan when none)."""
        return sum(self.centered.values()) / len(self.centered) if self.centered else float("nan")

    @property
    def num_tasks(self) -> int:
        return len(self.centered)

    def summary(self) -> str:
        """'CORE 0.1234 over 20/22 tasks (missing: winograd, agi_eval_lsat_ar)' - never without the count."""
        line = f"CORE {self.core:.4f} over {self.num_tasks}/{len(CORE_LABELS)} tasks"
        if self.missing:
            line += f" (missing: {', '.join(self.missing)})"
        return line


def evaluate_core(task_set: CoreTaskSet, encode, forward, pad_id, *, max_per_task=-1, dp_rank=0, dp_size=1,
                  scores=True, max_seq_len=None, device="cpu", log=print) -> CoreResult:
    """Evaluate every loaded task of `task_set`; the tasks it lacks are carried into the result as missing."""
    result = CoreResult(missing=dict(task_set.missing))
    for label, task in task_set.tasks.items():
        pool = shuffled(task.examples)
        data = pool[:max_per_task] if max_per_task > 0 else pool
        acc = evaluate_task(data, task.spec, encode, forward, pad_id, fewshot_pool=pool, dp_rank=dp_rank,
                            dp_size=dp_size, scores=scores, max_seq_len=max_seq_len, device=device)
        result.accuracy[label] = acc
        result.centered[label] = centered(acc, task.spec.random_baseline)
        result.examples[label] = len(data)
        result.sources[label] = task.source
        if log:
            log(f"{label:34s} {task.spec.num_fewshot:2d}-shot {len(data):6d} ex  accuracy {acc:.4f}  "
                f"centered {result.centered[label]:+.4f}")
    for label, why in result.missing.items():
        if log:
            log(f"{label:34s} MISSING: {why}")
    if log:
        log(result.summary())
    return result
