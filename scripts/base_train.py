"""Pretrain the base GPT on a tp x pp x dp grid under DeepSpeed.

    deepspeed --num_gpus N scripts/base_train.py --data PREFIX --val-data PREFIX --tokenizer DIR --depth D \
        --tp T --pp P --zero Z --max-seq-len S --device-batch-size B --total-batch-size TOKENS \
        --num-iterations K --out RUN_DIR

The same command runs on CPU (N gloo processes) and on GPU nodes (add --hostfile). RUN_DIR gets config.json,
metrics.jsonl, tensorboard/ and checkpoints/; --resume continues from checkpoints/latest exactly.
--init-from PARENT continues pretraining from another model's weights (a megachat run, an exported .safetensors, a
nanochat or Hugging Face checkpoint directory such as a NanoChat model from the Hub): the model and the tokenizer are
the parent's (--depth and --n-kv-head are not used; the data must be tokenized with the parent's tokenizer).
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

from megachat import cli
from megachat.build import build_trainer
from megachat.checkpoint import load_parent
from megachat.data import GPTDataset, check_shards, check_tokenizer
from megachat.evaluation.loss_eval import val_batches, val_dataset
from megachat.evaluation.model_eval import greedy_samples
from megachat.monitor import Monitor
from megachat.parallel import init_distributed
from megachat.tokenizer import Tokenizer
from megachat.train_config import (TrainConfig, add_trainer_args, config_from_run, config_options, loop_options,
                                   model_flops_per_token, num_params)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, nargs="+", help="training data prefix(es) (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--data-weights", type=float, nargs="+", default=None, help="blend weights, one per --data")
    p.add_argument("--val-data", default=None, help="held-out prefix for val bpb (omit: no evaluation)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (gives the vocab size; with --init-from "
                                                     "the parent's by default)")
    p.add_argument("--init-from", default=None, help="continue from this model's weights (see the docstring)")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--n-kv-head", type=int, default=None, help="GQA: key/value heads (default: n_head)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    p.add_argument("--num-iterations", type=int, default=-1, help="explicit horizon (wins over the others)")
    p.add_argument("--target-flops", type=float, default=-1.0, help="horizon from a compute budget")
    p.add_argument("--target-param-data-ratio", type=float, default=20.0, help="horizon: tokens = ratio * params")
    p.add_argument("--eval-tokens", type=int, default=10 * 524288)
    p.add_argument("--sample-prompt", default="The capital of France is")
    p.add_argument("--sample-tokens", type=int, default=32)
    p.add_argument("--preset", default=None, help="configs/presets/dD.json (tools/plan.py's pick): its model, layout, "
                                                   "batch, horizon and recomputation become the defaults")
    add_trainer_args(p)
    known, _ = p.parse_known_args(argv)
    if known.preset:
        p.set_defaults(**preset_defaults(known.preset))
    args = p.parse_args(argv)
    if not args.tokenizer and not args.init_from:
        p.error("--tokenizer DIR is required (or --init-from PARENT, whose tokenizer is used)")
    return args


def preset_defaults(path) -> dict:
    """argparse defaults from a preset that tools/plan.py wrote; flags given on the command line still win."""
    try:
        with open(path) as f:
            preset = json.load(f)
        model, layout, batch = preset["model"], preset["layout"], preset["batch"]
        return dict(depth=model["depth"], n_kv_head=model["n_kv_head"], max_seq_len=model["seq_len"],
                    tp=layout["tp"], pp=layout["pp"], zero=layout["zero"], dtype=layout["dtype"],
                    total_batch_size=batch["total_batch_size"], device_batch_size=batch["device_batch_size"],
                    target_param_data_ratio=preset["horizon"]["target_param_data_ratio"],
                    activation_checkpointing=preset["activation_checkpointing"],
                    sequence_parallel=layout.get("sequence_parallel", False))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"--preset {path}: not a preset tools/plan.py writes ({type(e).__name__}: {e}); make one "
                         f"with python tools/plan.py --preset-out PATH") from None


def horizon(args, params: int, flops_per_token: float) -> int:
    """Number of optimizer steps: --num-iterations, else --target-flops, else --target-param-data-ratio."""
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (flops_per_token * args.total_batch_size)))
    if args.target_param_data_ratio > 0:
        return max(1, round(args.target_param_data_ratio * params / args.total_batch_size))
    raise ValueError("no horizon: give --num-iterations, --target-flops or --target-param-data-ratio (> 0)")


def main(argv=None):
    args = parse_args(argv)
    weights = parent = None
    if args.init_from:
        weights, parent, tokenizer, tokenizer_dir = load_parent(args.init_from, args.tokenizer)
    else:
        tokenizer, tokenizer_dir = Tokenizer.load(args.tokenizer), os.path.abspath(args.tokenizer)
    shards = [*args.data, *([args.val_data] if args.val_data else [])]
    for prefix in shards:
        check_tokenizer(prefix, tokenizer)
    # damaged shards, or shards that changed since the run started, are refused before any process group; a run
    # that has checkpoints keeps the fingerprints of its start (without --resume, build_trainer refuses it)
    has_checkpoint = os.path.isfile(os.path.join(args.out, "checkpoints", "latest"))
    check_shards(args.out, shards, resumed=has_checkpoint and bool(args.resume), vocab_size=tokenizer.vocab_size,
                 record=os.environ.get("RANK", "0") == "0" and not has_checkpoint)
    init_distributed(timeout_s=args.collective_timeout)
    rank = dist.get_rank()
    settings = dict(seq_len=args.max_seq_len, device_batch_size=args.device_batch_size,
                    total_batch_size=args.total_batch_size, num_iterations=1, **config_options(args))
    cfg = (config_from_run(parent, **settings) if parent else
           TrainConfig(depth=args.depth, vocab_size=tokenizer.vocab_size, n_kv_head=args.n_kv_head, **settings))
    cfg.num_iterations = horizon(args, num_params(cfg), model_flops_per_token(cfg))
    trainer = build_trainer(cfg, args.out, resume=args.resume, weights=None if args.resume else weights)
    grid = trainer.grid
    train = GPTDataset(args.data, args.data_weights, seq_len=cfg.seq_len, seed=cfg.seed)
    trainer.write_run_config(args.out, phase="base", tokenizer=tokenizer_dir, data=args.data, val_data=args.val_data,
                             **({"parent": os.path.abspath(args.init_from)} if args.init_from else {}))
    if rank == 0:
        print(f"megachat base_train: depth {cfg.depth}, {num_params(cfg):,} params, tp {cfg.tp} x pp {cfg.pp} x dp "
              f"{grid.dp}, ZeRO-{cfg.zero}, {cfg.dtype}, {cfg.num_iterations} steps of {cfg.total_batch_size:,} "
              f"tokens (grad accum {trainer.grad_accum}), start at step {trainer.step}", flush=True)
    monitor = Monitor(args.out, enabled=rank == 0, resume_step=trainer.step if args.resume else None)
    val = val_dataset(args.val_data, cfg.seq_len) if args.val_data else None  # base_eval's order, whatever --seed
    token_bytes = torch.as_tensor(tokenizer.token_bytes, dtype=torch.int64)

    def evaluate(step):
        return {"val_bpb": trainer.evaluate_bpb(val_batches(val, args.eval_tokens, cfg.device_batch_size, grid),
                                                token_bytes)}

    trainer.fit(lambda i: train.micro_batches(i, cfg.global_batch, cfg.device_batch_size, grid.dp_rank, grid.dp),
                evaluate if val is not None else None, monitor=monitor, **loop_options(args))
    if args.sample_tokens > 0:
        for prompt, text in greedy_samples(trainer.model, grid, tokenizer, [args.sample_prompt], args.sample_tokens):
            if rank == 0:
                print(f"sample | {prompt!r} -> {text!r}", flush=True)
    trainer.finish(args.out, monitor)


if __name__ == "__main__":
    cli.run(main)
