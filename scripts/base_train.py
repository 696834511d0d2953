"""Pretrain the base GPT on a tp x pp x dp grid under DeepSpeed.

    deepspeed --num_gpus N scripts/base_train.py --data PREFIX --val-data PREFIX --tokenizer DIR --depth D \
        --tp T --pp P --zero Z --max-seq-len S --device-batch-size B --total-batch-size TOKENS \
        --num-iterations K --out RUN_DIR

The same command runs on CPU (N gloo processes) and on GPU nodes (add --hostfile). RUN_DIR gets config.json,
metrics.jsonl, tensorboard/ and checkpoints/; --resume continues from checkpoints/latest exactly.
"""
import argparse
import os

import torch
import torch.distributed as dist

from megachat.fileio import atomic_write_json
from megachat.monitor import Monitor
from megachat.parallel import init_distributed
from megachat.trainer import TrainConfig, build_trainer, model_flops_per_token, num_params


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, nargs="+", help="training data prefix(es) (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--data-weights", type=float, nargs="+", default=None, help="blend weights, one per --data")
    p.add_argument("--val-data", default=None, help="held-out prefix for val bpb (omit: no evaluation)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (gives the vocab size)")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--n-kv-head", type=int, default=None, help="GQA: key/value heads (default: n_head)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage 0-3 (bf16 needs >= 1; pp > 1 allows 0/1)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    p.add_argument("--num-iterations", type=int, default=-1, help="explicit horizon (wins over the others)")
    p.add_argument("--target-flops", type=float, default=-1.0, help="horizon from a compute budget")
    p.add_argument("--target-param-data-ratio", type=float, default=20.0, help="horizon: tokens = ratio * params")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (and at start and end)")
    p.add_argument("--eval-tokens", type=int, default=10 * 524288)
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (always at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="keep the newest K checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/latest")
    p.add_argument("--sample-prompt", default="The capital of France is")
    p.add_argument("--sample-tokens", type=int, default=32)
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON instead of configs/ds/zero{Z}_{dtype}.json")
    p.add_argument("--out", required=True, help="RUN_DIR")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    return p.parse_args(argv)


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
    from megachat.data import GPTDataset, check_tokenizer
    from megachat.evaluation.loss_eval import val_batches, val_dataset
    from megachat.evaluation.model_eval import greedy_samples
    from megachat.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer)
    for prefix in [*args.data, *([args.val_data] if args.val_data else [])]:
        check_tokenizer(prefix, tokenizer)
    init_distributed()
    rank = dist.get_rank()
    cfg = TrainConfig(depth=args.depth, vocab_size=tokenizer.vocab_size, seq_len=args.max_seq_len,
                      device_batch_size=args.device_batch_size, total_batch_size=args.total_batch_size,
                      num_iterations=1, tp=args.tp, pp=args.pp, zero=args.zero, dtype=args.dtype, seed=args.seed,
                      n_kv_head=args.n_kv_head, ds_config=args.ds_config)
    cfg.num_iterations = horizon(args, num_params(cfg), model_flops_per_token(cfg))
    trainer = build_trainer(cfg, args.out, resume=args.resume)
    grid, start = trainer.grid, trainer.step
    train = GPTDataset(args.data, args.data_weights, seq_len=cfg.seq_len, seed=cfg.seed)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        atomic_write_json(os.path.join(args.out, "config.json"),
                          {"train": cfg.to_json(), "model": vars(cfg.model_config()), "dp": grid.dp,
                           "world": grid.world, "tokenizer": os.path.abspath(args.tokenizer), "data": args.data,
                           "val_data": args.val_data, "num_params": num_params(cfg),
                           "flops_per_token": trainer.flops_per_token})
        print(f"megachat base_train: depth {cfg.depth}, {num_params(cfg):,} params, tp {cfg.tp} x pp {cfg.pp} x dp "
              f"{grid.dp}, ZeRO-{cfg.zero}, {cfg.dtype}, {cfg.num_iterations} steps of {cfg.total_batch_size:,} "
              f"tokens (grad accum {trainer.grad_accum}), start at step {start}", flush=True)
    monitor = Monitor(args.out, enabled=rank == 0, resume_step=start if args.resume else None)
    val = val_dataset(args.val_data, cfg.seq_len) if args.val_data else None  # base_eval's order, whatever --seed
    token_bytes = torch.as_tensor(tokenizer.token_bytes, dtype=torch.int64)

    def evaluate(step):
        if val is not None:
            bpb = trainer.evaluate_bpb(val_batches(val, args.eval_tokens, cfg.device_batch_size, grid), token_bytes)
            monitor.log(step, val_bpb=bpb)
            if rank == 0:
                print(f"step {step:6d} | val bpb {bpb:.4f}", flush=True)

    if start == 0:
        evaluate(0)
    for step in range(start + 1, cfg.num_iterations + 1):  # global batch step-1; after it, `step` steps are done
        rec = trainer.train_step(train.micro_batches(step - 1, cfg.global_batch, cfg.device_batch_size,
                                                     grid.dp_rank, grid.dp))
        monitor.log(step, **rec)
        if rank == 0:
            print(f"step {step:6d}/{cfg.num_iterations} | loss {rec['loss']:.6f} | grad norm {rec['grad_norm']:.3f} "
                  f"| lrm {rec['lrm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s | {rec['step_time_s'] * 1000:.0f} ms",
                  flush=True)
        if step != cfg.num_iterations and args.eval_every > 0 and step % args.eval_every == 0:
            evaluate(step)
        if step != cfg.num_iterations and args.save_every > 0 and step % args.save_every == 0:
            trainer.save(step, keep=args.keep_checkpoints)
    if start < cfg.num_iterations:
        evaluate(cfg.num_iterations)
        trainer.save(cfg.num_iterations, keep=args.keep_checkpoints)

    state_dict = trainer.full_state_dict()
    if rank == 0:
        from megachat.checkpoint import save_weights
        save_weights(os.path.join(args.out, "model.pt"), state_dict)
    if args.sample_tokens > 0:
        for prompt, text in greedy_samples(trainer.model, grid, tokenizer, [args.sample_prompt], args.sample_tokens):
            if rank == 0:
                print(f"sample | {prompt!r} -> {text!r}", flush=True)
    monitor.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from megachat import cli

    cli.run(main)
