"""Midtraining: continue a base model on a mixture of conversations (nanochat's mid phase), on any tp x pp x dp grid.

    deepspeed --num_gpus N scripts/mid_train.py --init-from BASE_RUN --out RUN_DIR [--chat-data DIR] \
        [--tp T --pp P --zero Z --dtype bf16] [--device-batch-size 32 --total-batch-size 524288] [--resume]

The mixture (megachat.tasks.recipes.mid_mixture: SmolTalk, MMLU auxiliary_train, GSM8K train from --chat-data;
identity, SimpleSpelling, SpellingBee always) is rendered in nanochat's chat format, one conversation per
document, into RUN_DIR/data/mid.bin/.idx (and mid_val for validation) and packed into --max-seq-len samples like
pretraining text: loss on every token, as nanochat's mid phase. One epoch by default; the schedule holds the rate
and decays it over the last 20 %. Same trainer, checkpoints, exact resume, metrics and TensorBoard as base_train.
"""
import argparse
import os

import torch
import torch.distributed as dist

from megachat import cli
from megachat.build import build_trainer
from megachat.checkpoint import load_parent
from megachat.data import GPTDataset, check_tokenizer, write_conversations
from megachat.evaluation.loss_eval import val_batches, val_dataset
from megachat.monitor import Monitor
from megachat.parallel import init_distributed
from megachat.tasks.recipes import mid_mixture
from megachat.train_config import add_trainer_args, config_from_run, config_options, loop_options


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-from", required=True, help="the base run directory (or a nanochat checkpoint directory)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the base run's)")
    p.add_argument("--chat-data", default=None, help="directory of tools/fetch_data.py chat (SmolTalk, MMLU, GSM8K)")
    p.add_argument("--identity", default=None, help="jsonl of identity conversations (default: built-in ones)")
    p.add_argument("--mixture-scale", type=float, default=1.0, help="x every task's count (smoke runs: 0.01)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (default: one epoch of the mixture)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation")
    add_trainer_args(p, eval_every=150)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    weights, parent, tokenizer, tokenizer_dir = load_parent(args.init_from, args.tokenizer)
    init_distributed(timeout_s=args.collective_timeout)
    rank = dist.get_rank()
    data_dir = os.path.join(args.out, "data")
    train_prefix, val_prefix = os.path.join(data_dir, "mid"), os.path.join(data_dir, "mid_val")
    if rank == 0 and not (args.resume and os.path.exists(train_prefix + ".meta.json")):
        train, val, left_out = mid_mixture(args.chat_data, args.identity, args.mixture_scale, args.seed)
        for name, why in left_out.items():
            print(f"mid_train: {name} left out: {why}", flush=True)
        counts = ", ".join(f"{k} {v:,}" for k, v in train.counts().items())
        tokens = write_conversations(train_prefix, train, tokenizer)
        write_conversations(val_prefix, val, tokenizer)
        print(f"mid_train: {len(train):,} conversations ({counts}), {tokens:,} tokens -> {train_prefix}", flush=True)
    dist.barrier()
    for prefix in (train_prefix, val_prefix):
        check_tokenizer(prefix, tokenizer)
    train = GPTDataset([train_prefix], None, seq_len=args.max_seq_len, seed=args.seed)
    global_batch = args.total_batch_size // args.max_seq_len
    epoch = max(1, sum(train.samples_per_epoch) // max(1, global_batch))
    cfg = config_from_run(parent, seq_len=args.max_seq_len, device_batch_size=args.device_batch_size,
                          total_batch_size=args.total_batch_size,
                          num_iterations=args.num_iterations if args.num_iterations > 0 else epoch,
                          **config_options(args))
    trainer = build_trainer(cfg, args.out, resume=args.resume, weights=None if args.resume else weights)
    grid = trainer.grid
    trainer.write_run_config(args.out, phase="mid", parent=os.path.abspath(args.init_from),
                             tokenizer=tokenizer_dir, data=[train_prefix], val_data=val_prefix)
    if rank == 0:
        print(f"megachat mid_train: depth {cfg.depth}, tp {cfg.tp} x pp {cfg.pp} x dp {grid.dp}, ZeRO-{cfg.zero}, "
              f"{cfg.dtype}, {cfg.num_iterations} steps of {cfg.total_batch_size:,} tokens, start at step "
              f"{trainer.step}", flush=True)
    monitor = Monitor(args.out, enabled=rank == 0, resume_step=trainer.step if args.resume else None)
    val = val_dataset(val_prefix, cfg.seq_len)
    token_bytes = torch.as_tensor(tokenizer.token_bytes, dtype=torch.int64)

    def evaluate(step):
        return {"val_bpb": trainer.evaluate_bpb(val_batches(val, args.eval_tokens, cfg.device_batch_size, grid),
                                                token_bytes)}

    trainer.fit(lambda i: train.micro_batches(i, cfg.global_batch, cfg.device_batch_size, grid.dp_rank, grid.dp),
                evaluate, monitor=monitor, **loop_options(args))
    trainer.finish(args.out, monitor)


if __name__ == "__main__":
    cli.run(main)
