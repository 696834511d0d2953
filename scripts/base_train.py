"""Pretrain the base GPT on a tp x pp x dp grid under DeepSpeed.

    deepspeed --num_gpus N scripts/base_train.py --data PREFIX --val-data PREFIX --tokenizer DIR --depth D \
        --tp T --pp P --zero Z --max-seq-len S --device-batch-size B --total-batch-size TOKENS \
        --num-iterations K --out RUN_DIR

The same command runs on CPU (N gloo processes) and on GPU nodes (add --hostfile). RUN_DIR gets config.json,
metrics.jsonl, tensorboard/ and checkpoints/; --resume continues from checkpoints/latest exactly.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from megachat import checkpoint
from megachat.engine import TrainConfig, build_trainer, init_distributed, model_flops_per_token, num_params
from megachat.monitor import Monitor, memory_gib, peak_flops
from megachat.fileio import atomic_write_json


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
    p.add_argument("--optimizer", choices=["muon", "adamw"], default="muon",
                   help="muon: nanochat's Muon + AdamW; adamw: AdamW on every group (a baseline)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (and at start and end)")
    p.add_argument("--eval-tokens", type=int, default=10 * 524288)
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (always at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="keep the newest K checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/latest")
    p.add_argument("--sample-prompt", default="The capital of France is")
    p.add_argument("--sample-tokens", type=int, default=32)
    p.add_argument("--activation-checkpoint-interval", type=int, default=0, help="pp > 1: checkpoint every k layers")
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


@torch.no_grad()
def greedy_sample(cfg, state_dict, tokenizer, prompt: str, n_tokens: int) -> str:
    """Greedy continuation of `prompt` by the unsharded model (rank 0, full weights, fp32 on CPU)."""
    from megachat.model import GPT, load_nanochat_state_dict
    with torch.device("meta"):
        model = GPT(cfg.model_config())
    model.to_empty(device="cpu")
    model.init_weights(cfg.seed)  # buffers (RoPE tables); the weights are replaced next
    load_nanochat_state_dict(model, state_dict)
    model.eval()
    ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
    prompt_len = len(ids)
    for _ in range(n_tokens):
        x = torch.tensor([ids[-cfg.seq_len:]], dtype=torch.long)
        ids.append(int(model(x)[0, -1].argmax()))
    return tokenizer.decode(ids[prompt_len:])


def main(argv=None):
    args = parse_args(argv)
    from megachat.data import GPTDataset, check_tokenizer
    from megachat.evaluation.loss_eval import val_dataset
    from megachat.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer)
    for prefix in [*args.data, *([args.val_data] if args.val_data else [])]:
        check_tokenizer(prefix, tokenizer)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg0 = TrainConfig(depth=args.depth, vocab_size=tokenizer.vocab_size, seq_len=args.max_seq_len,
                       device_batch_size=args.device_batch_size, total_batch_size=args.total_batch_size,
                       num_iterations=1, tp=args.tp, pp=args.pp, zero=args.zero, dtype=args.dtype, seed=args.seed,
                       optimizer=args.optimizer, n_kv_head=args.n_kv_head, ds_config=args.ds_config,
                       activation_checkpoint_interval=args.activation_checkpoint_interval)
    flops_per_token = model_flops_per_token(cfg0)
    params = num_params(cfg0)
    cfg = TrainConfig(**{**cfg0.to_json(), "num_iterations": horizon(args, params, flops_per_token)})

    train = GPTDataset(args.data, args.data_weights, seq_len=cfg.seq_len, seed=cfg.seed)
    ckpt_dir = os.path.join(args.out, "checkpoints")
    layout = {"tp": cfg.tp, "pp": cfg.pp, "dp": world // (cfg.tp * cfg.pp), "zero": cfg.zero}
    start, universal = 0, None
    earlier = [f for f in ("checkpoints/latest", "model.pt") if os.path.exists(os.path.join(args.out, f))]
    if earlier and not args.resume:  # a fresh start would prune its checkpoints and overwrite its weights
        raise FileExistsError(f"{args.out} already holds a run ({', '.join(earlier)}): pass --resume to continue it, "
                              f"or choose another --out (delete the directory to start over)")
    if args.resume:
        tag = checkpoint.latest_tag(ckpt_dir)
        if tag is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {ckpt_dir} (no 'latest' file); run "
                                    f"without --resume to start fresh")
        checkpoint.verify(ckpt_dir, tag)
        meta = checkpoint.read_meta(ckpt_dir, tag)
        start = meta["step"]
        if meta["consumed_samples"] != start * cfg.global_batch:
            raise ValueError(f"checkpoint consumed {meta['consumed_samples']} samples in {start} steps, but this "
                             f"run's global batch is {cfg.global_batch} samples: resume with the same "
                             f"--total-batch-size and --max-seq-len")
        if meta["layout"] != layout:  # another grid: rebuild from the layout-independent state
            universal = checkpoint.load_universal(ckpt_dir, tag)
    trainer = build_trainer(cfg, train, weights=universal["model"] if universal else None)
    grid = trainer.grid
    if universal is not None:
        from megachat.optim import load_full_optimizer_state
        load_full_optimizer_state(trainer.engine, universal["optimizer"])
        if rank == 0:
            print(f"resumed step {start} saved under {meta['layout']} in layout {layout}", flush=True)
    elif args.resume:
        checkpoint.load(trainer.engine, ckpt_dir, layout)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        atomic_write_json(os.path.join(args.out, "config.json"),
                          {"train": cfg.to_json(), "model": vars(cfg.model_config()), "dp": grid.dp, "world": world,
                           "tokenizer": os.path.abspath(args.tokenizer), "data": args.data, "val_data": args.val_data,
                           "num_params": params, "flops_per_token": flops_per_token})
        print(f"megachat base_train: depth {cfg.depth}, {params:,} params, tp {cfg.tp} x pp {cfg.pp} x dp {grid.dp}, "
              f"ZeRO-{cfg.zero}, {cfg.dtype}, {cfg.num_iterations} steps of {cfg.total_batch_size:,} tokens "
              f"(grad accum {trainer.grad_accum}), start at step {start}", flush=True)
    monitor = Monitor(args.out, enabled=rank == 0, resume_step=start if args.resume else None)

    val, token_bytes, eval_samples = None, None, 0
    if args.val_data:
        val = val_dataset(args.val_data, cfg.seq_len)  # the order base_eval's bpb reads, whatever --seed
        per_round = cfg.device_batch_size * grid.dp
        eval_samples = max(per_round, args.eval_tokens // cfg.seq_len // per_round * per_round)
        token_bytes = torch.as_tensor(tokenizer.token_bytes, dtype=torch.int64)

    def evaluate(step):
        if val is None:
            return
        bpb = trainer.evaluate_bpb(val, token_bytes, eval_samples)
        monitor.log(step, val_bpb=bpb)
        if rank == 0:
            print(f"step {step:6d} | val bpb {bpb:.4f}", flush=True)

    def save(step):
        checkpoint.save(trainer.engine, ckpt_dir, step, keep=args.keep_checkpoints,
                        universal=trainer.gather_universal_state(),
                        client_state={"step": step, "consumed_samples": step * cfg.global_batch, "layout": layout,
                                      "config": cfg.to_json()})

    peak = peak_flops(cfg.dtype)
    if start == 0:
        evaluate(0)
    for step in range(start + 1, cfg.num_iterations + 1):
        t0 = time.perf_counter()
        out = trainer.train_step(step - 1)  # global batch number step-1 -> after it, `step` steps are done
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if not math.isfinite(out["loss"]):
            last = checkpoint.latest_tag(ckpt_dir) if os.path.isdir(ckpt_dir) else None
            raise FloatingPointError(
                f"loss is {out['loss']} at step {step}: training diverged; no checkpoint was written for it "
                f"(latest intact checkpoint: {os.path.join(ckpt_dir, last) if last else 'none'}); lower the "
                f"learning rate or check the data, then --resume")
        tokens_per_s = cfg.total_batch_size / dt
        flops_per_s = flops_per_token * tokens_per_s
        rec = {"loss": out["loss"], "lr": out["lr"], "lrm": out["lrm"], "grad_norm": out["grad_norm"],
               "tokens_per_s": tokens_per_s, "model_flops_per_s": flops_per_s, "step_time_s": dt,
               "memory_gib": memory_gib()}
        if peak:
            rec["mfu"] = flops_per_s / (peak * world)
        monitor.log(step, **rec)
        if rank == 0:
            gn = f"{out['grad_norm']:.3f}" if out["grad_norm"] is not None else "n/a"
            print(f"step {step:6d}/{cfg.num_iterations} | loss {out['loss']:.6f} | grad norm {gn} | lrm "
                  f"{out['lrm']:.3f} | {tokens_per_s:,.0f} tok/s | {dt * 1000:.0f} ms", flush=True)
        if args.eval_every > 0 and step % args.eval_every == 0 and step != cfg.num_iterations:
            evaluate(step)
        if args.save_every > 0 and step % args.save_every == 0 and step != cfg.num_iterations:
            save(step)
    if start < cfg.num_iterations:
        evaluate(cfg.num_iterations)
        save(cfg.num_iterations)

    state_dict = trainer.gather_full_state_dict()
    if rank == 0:
        checkpoint.save_weights(os.path.join(args.out, "model.pt"), state_dict)
    if rank == 0 and args.sample_tokens > 0:
        text = greedy_sample(cfg, state_dict, tokenizer, args.sample_prompt, args.sample_tokens)
        print(f"sample | {args.sample_prompt!r} -> {text!r}", flush=True)
    monitor.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
