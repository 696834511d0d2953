"""Supervised fine-tuning: teach the midtrained model to answer (nanochat's SFT phase), on any tp x pp x dp grid.

    deepspeed --num_gpus N scripts/chat_sft.py --init-from MID_RUN --out RUN_DIR [--chat-data DIR] \
        [--tp T --pp P --zero Z --dtype bf16] [--examples-per-step 32 --device-batch-size 4] [--resume]

The mixture (megachat.tasks.recipes.sft_mixture: ARC train, GSM8K train, SmolTalk from --chat-data; identity,
SimpleSpelling, SpellingBee always) in a fixed shuffled order; each conversation is one row padded to
--max-seq-len, trained only on the tokens the assistant writes (targets -1 elsewhere: nanochat's mask). The loss is
normalised over the trained tokens of the whole step, across micro-batches and dp ranks, exactly as one process
would (megachat.trainer.Trainer.train_step). One epoch by default; rates x --lr-scale 0.02 decaying linearly to 0.
Every --eval-every steps: val bpb of the assistant's tokens on held-out conversations and, every --acc-every steps,
categorical accuracy on MMLU and ARC-Easy (at most --acc-examples each).
"""
import argparse
import os

import torch
import torch.distributed as dist

from megachat import cli
from megachat.build import build_trainer
from megachat.checkpoint import load_parent
from megachat.data import batch_indices
from megachat.evaluation.chat_tasks import eval_indices, evaluate_categorical, load_chat_task
from megachat.evaluation.model_eval import GridForward
from megachat.monitor import Monitor
from megachat.parallel import init_distributed
from megachat.tasks.mixture import render_batch
from megachat.tasks.recipes import sft_mixture
from megachat.train_config import add_trainer_args, config_from_run, config_options, loop_options


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-from", required=True, help="the mid run directory (or any megachat / nanochat run)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the parent run's)")
    p.add_argument("--chat-data", default=None, help="directory of tools/fetch_data.py chat (ARC, GSM8K, SmolTalk)")
    p.add_argument("--identity", default=None, help="jsonl of identity conversations (default: built-in ones)")
    p.add_argument("--mixture-scale", type=float, default=1.0, help="x every task's count (smoke runs: 0.01)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="every row is padded (or cut) to this length")
    p.add_argument("--examples-per-step", type=int, default=32, help="conversations per optimizer step")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (default: one epoch of the mixture)")
    p.add_argument("--lr-scale", type=float, default=0.02, help="x every base learning rate (nanochat's init_lr_frac)")
    p.add_argument("--eval-examples", type=int, default=400, help="held-out conversations per val evaluation")
    p.add_argument("--acc-every", type=int, default=200, help="MMLU / ARC-Easy accuracy every N steps (0: never)")
    p.add_argument("--acc-examples", type=int, default=1024, help="examples per accuracy task")
    p.add_argument("--data-dir", default=None, help="evaluation package cache (default ~/.cache/megachat/eval)")
    add_trainer_args(p, device_batch_size=4, eval_every=100)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    weights, parent, tokenizer, tokenizer_dir = load_parent(args.init_from, args.tokenizer)
    train, val, left_out = sft_mixture(args.chat_data, args.identity, args.mixture_scale, args.seed)
    init_distributed(timeout_s=args.collective_timeout)
    rank = dist.get_rank()
    G, T = args.examples_per_step, args.max_seq_len
    cfg = config_from_run(parent, seq_len=T, device_batch_size=args.device_batch_size, total_batch_size=G * T,
                          num_iterations=args.num_iterations if args.num_iterations > 0 else max(1, len(train) // G),
                          warmdown_ratio=1.0, lr_scale=args.lr_scale, **config_options(args))
    trainer = build_trainer(cfg, args.out, resume=args.resume, weights=None if args.resume else weights)
    grid = trainer.grid
    trainer.write_run_config(args.out, phase="sft", parent=os.path.abspath(args.init_from),
                             tokenizer=tokenizer_dir, mixture=train.counts(), left_out=left_out)
    if rank == 0:
        for name, why in left_out.items():
            print(f"chat_sft: {name} left out: {why}", flush=True)
        counts = ", ".join(f"{k} {v:,}" for k, v in train.counts().items())
        print(f"megachat chat_sft: {len(train):,} conversations ({counts}), "
              f"tp {cfg.tp} x pp {cfg.pp} x dp {grid.dp}, {cfg.num_iterations} steps of {G} conversations, start at "
              f"step {trainer.step}", flush=True)
    monitor = Monitor(args.out, enabled=rank == 0, resume_step=trainer.step if args.resume else None)

    def batches(i):
        """This rank's micro-batches of step i: conversations i*G .. i*G+G-1 of the mixture (wrapping around)."""
        rows = [train[int(j) % len(train)] for j in batch_indices(i, G, grid.dp_rank, grid.dp)]
        x, y = render_batch(rows, tokenizer, T)
        return list(zip(x.split(cfg.device_batch_size), y.split(cfg.device_batch_size)))

    token_bytes = torch.as_tensor(tokenizer.token_bytes, dtype=torch.int64)
    n_val = min(len(val), args.eval_examples) // (cfg.device_batch_size * grid.dp) * (cfg.device_batch_size * grid.dp)
    acc_tasks = {}
    if args.acc_every > 0:
        for name in ("MMLU", "ARC-Easy"):
            task = load_chat_task(name, args.data_dir)
            acc_tasks[name] = [task[i] for i in eval_indices(len(task), args.acc_examples)]

    def evaluate(step):
        metrics = {}
        if n_val:
            mine = [val[int(j)] for j in batch_indices(0, n_val, grid.dp_rank, grid.dp)]  # this rank's share
            rows = [mine[k:k + cfg.device_batch_size] for k in range(0, len(mine), cfg.device_batch_size)]
            metrics["val_bpb"] = trainer.evaluate_bpb((render_batch(r, tokenizer, T) for r in rows), token_bytes)
        if acc_tasks and (step % args.acc_every == 0 or step == cfg.num_iterations):
            fwd = GridForward(trainer.model, grid)
            for name, conversations in acc_tasks.items():
                metrics[f"{name.lower().replace('-', '_')}_acc"] = evaluate_categorical(
                    conversations, tokenizer, fwd.letter_logits, dp_rank=grid.dp_rank, dp_size=grid.dp,
                    scores=fwd.reports, device=trainer.device)
        return metrics

    trainer.fit(batches, evaluate, monitor=monitor, **loop_options(args))
    trainer.finish(args.out, monitor)


if __name__ == "__main__":
    cli.run(main)
