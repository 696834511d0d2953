"""Which tp x pp x dp x ZeRO layout and micro-batch to train with, before renting the GPUs: every layout megachat
accepts, with its predicted per-GPU memory (weights, gradients, optimizer state, activations, workspace) and step
time / MFU, ranked, and the reason each other layout fails. The model behind the numbers is megachat/planner.py's
docstring; docs/scaling.md states it with its sources and its check against measurement. No GPU needed.

    python tools/plan.py --depth 20 --nodes 1                      # nanochat's d20 on one 8 x H100 node
    python tools/plan.py --depth 32 --nodes 2 --tp 2 --zero 1      # fix parts of the layout
    python tools/plan.py --config runs/d20/config.json --nodes 4   # a run's model
    python tools/plan.py --depth 20 --nodes 1 --preset-out configs/presets/d20.json   # write the pick
"""
import argparse
import json
import os

from megachat import cli
from megachat.fileio import atomic_write_json
from megachat.model import GPTConfig
from megachat.planner import (FUSED_HEAD_LOSS_DEFAULT, PICK_MEMORY_HEADROOM, PICK_TIME_SLACK, Hardware, Job,
                              memory_reason, plan)
from megachat.train_config import TrainConfig, model_flops_per_token, num_params

GiB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--depth", type=int, help="nanochat's sizing: n_layer = depth, n_embd = 64 * depth")
    model.add_argument("--config", help="a run's config.json (its \"model\": depth, vocabulary, KV heads)")
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--n-kv-head", type=int, default=None, help="GQA: key/value heads (default: n_head)")
    p.add_argument("--seq-len", "--max-seq-len", type=int, default=None, help="tokens per sequence (default 2048, "
                                                                                "or the run's)")
    p.add_argument("--global-batch", "--total-batch-size", type=int, default=524288, help="tokens per step")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--tp", type=int, default=None)
    p.add_argument("--pp", type=int, default=None)
    p.add_argument("--dp", type=int, default=None)
    p.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3])
    p.add_argument("--micro-batch", "--device-batch-size", type=int, default=None, help="sequences per GPU per "
                                                                                         "micro-step")
    p.add_argument("--checkpointing", "--activation-checkpointing", choices=["none", "selective", "full"],
                   default=None, help="fix the activation checkpointing (default: plan all three)")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="fix sequence parallelism on or off (default: plan both where tp > 1)")
    p.add_argument("--fused-head-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="plan the LM head fused with the loss (no [tokens x vocab/tp] logits saved) or not; default: "
                        "what megachat's training forward does")
    p.add_argument("--ds-config", default=None, help="the DeepSpeed JSON the run will use (default "
                                                     "configs/ds/zero{Z}_{dtype}.json)")
    p.add_argument("--matmul-efficiency", type=float, default=None, help="fraction of the 989 TFLOP/s peak reached "
                                                                         "on the model's FLOPs (default 0.53)")
    p.add_argument("--nvlink-gbps", type=float, default=None, help="NCCL bus bandwidth inside a node, GB/s (370)")
    p.add_argument("--ib-gbps", type=float, default=None, help="NCCL bus bandwidth per GPU across nodes, GB/s (40)")
    p.add_argument("--top", type=int, default=10, help="fitting layouts shown (0: all)")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.add_argument("--preset-out", default=None, help="write the best layout as a preset JSON (configs/presets/)")
    p.add_argument("--target-param-data-ratio", type=float, default=20.0, help="the preset's horizon: tokens = "
                                                                               "ratio x params (nanochat's 20)")
    return p.parse_args(argv)


def job_from_args(args):
    if args.config:
        with open(args.config) as f:
            model = json.load(f).get("model")
        if not model:
            raise ValueError(f"{args.config} has no \"model\" section: pass a run's config.json (RUN_DIR/config.json)")
        config = GPTConfig(**{**model, "sequence_len": args.seq_len or model["sequence_len"]})
    else:
        config = GPTConfig.from_depth(args.depth, args.vocab_size, args.seq_len or 2048, n_kv_head=args.n_kv_head)
    if args.global_batch % config.sequence_len:
        raise ValueError(f"--global-batch {args.global_batch} is not a multiple of --seq-len {config.sequence_len}: "
                         f"the global batch is a whole number of sequences")
    fused = FUSED_HEAD_LOSS_DEFAULT if args.fused_head_loss is None else args.fused_head_loss
    return Job(config, total_batch_size=args.global_batch, dtype=args.dtype, fused_head_loss=fused)


def hardware_from_args(args):
    given = {"matmul_efficiency": args.matmul_efficiency, "nvlink_busbw": args.nvlink_gbps and args.nvlink_gbps * 1e9,
             "ib_busbw_per_gpu": args.ib_gbps and args.ib_gbps * 1e9}
    return Hardware(gpus_per_node=args.gpus_per_node, memory=args.gpu_memory * GiB,
                    **{k: v for k, v in given.items() if v})


def row(rank, pred):
    lay, m, t = pred.layout, pred.memory, pred.time
    return (f"{rank:>4} {lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.zero:>5} {lay.micro_batch:>4} {pred.micro_batches:>5} "
            f"{lay.checkpointing[:4]:>5} {'sp' if lay.sequence_parallel else '':>2} "
            f"{m.total / GiB:7.1f} = {m.weights / GiB:5.1f} {m.grads / GiB:5.1f} {m.optimizer / GiB:5.1f} "
            f"{m.activations / GiB:6.1f} {m.workspace / GiB:5.1f} {t.total:8.3f} {pred.tokens_per_s / 1e3:9,.0f}k "
            f"{100 * pred.mfu:5.1f}%  {t.compute:.3f}/{t.tp_comm:.3f}/{t.pp_comm + t.bubble:.3f}/{t.dp_comm:.3f}/"
            f"{t.muon:.3f}")


HEADER = ("rank  tp  pp   dp  zero   mb accum  ckpt sp  memory GiB = weights grads optim  activ works   step s   "
          "tokens/s    MFU  compute/tp/pp+bubble/dp/muon s")


def preset(args, job, hw, pred) -> dict:
    """A preset: the layout, batch, micro-batch and horizon the planner picks, with its predicted memory and MFU."""
    lay, c = pred.layout, job.config
    cfg = TrainConfig(depth=c.n_layer, vocab_size=c.vocab_size, seq_len=c.sequence_len,
                      device_batch_size=lay.micro_batch, total_batch_size=job.total_batch_size, num_iterations=1,
                      n_kv_head=c.n_kv_head)
    params = num_params(cfg)
    steps = max(1, round(args.target_param_data_ratio * params / job.total_batch_size))
    flags = (f"--depth {c.n_layer} {lay.flags()} --dtype {job.dtype} --max-seq-len {c.sequence_len} "
             f"--total-batch-size {job.total_batch_size} --target-param-data-ratio {args.target_param_data_ratio:g}")
    return {
        "name": f"d{c.n_layer}",
        "model": {"depth": c.n_layer, "vocab_size": c.vocab_size, "n_kv_head": c.n_kv_head,
                  "seq_len": c.sequence_len, "params": params},
        "hardware": {"nodes": args.nodes, "gpus_per_node": hw.gpus_per_node, "gpu": hw.name,
                     "gpu_memory_gib": round(hw.memory / GiB, 1)},
        "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero": lay.zero, "dtype": job.dtype,
                   "sequence_parallel": lay.sequence_parallel},
        "batch": {"total_batch_size": job.total_batch_size, "device_batch_size": lay.micro_batch,
                  "grad_accum": pred.micro_batches},
        "horizon": {"target_param_data_ratio": args.target_param_data_ratio, "num_iterations": steps,
                    "tokens": steps * job.total_batch_size},
        "activation_checkpointing": lay.checkpointing,
        "fused_head_loss": job.fused_head_loss,
        "predicted": {**pred.to_json(), "training_hours": round(steps * pred.time.total / 3600, 1)},
        "base_train_flags": flags,
        "printed_by": "python tools/plan.py " + " ".join(_plan_flags(args)),
        "note": "scripts/base_train.py --preset PATH takes these as defaults (flags still win); or pass "
                "base_train_flags (with --data, --tokenizer, --out, ...) under the deepspeed launcher on nodes x "
                "gpus_per_node GPUs",
    }


def _plan_flags(args) -> list[str]:
    out = [f"--config {args.config}" if args.config else f"--depth {args.depth}", f"--nodes {args.nodes}"]
    defaults = vars(parse_args(["--depth", "1"]))
    for key in ("vocab_size", "n_kv_head", "seq_len", "global_batch", "gpus_per_node", "gpu_memory", "dtype",
                "tp", "pp", "dp", "zero", "micro_batch", "checkpointing", "ds_config", "matmul_efficiency",
                "nvlink_gbps", "ib_gbps", "target_param_data_ratio"):
        if getattr(args, key) != defaults[key]:
            out.append(f"--{key.replace('_', '-')} {getattr(args, key):g}" if isinstance(getattr(args, key), float)
                       else f"--{key.replace('_', '-')} {getattr(args, key)}")
    if args.sequence_parallel is not None:
        out.append("--sequence-parallel" if args.sequence_parallel else "--no-sequence-parallel")
    if args.fused_head_loss is not None:
        out.append("--fused-head-loss" if args.fused_head_loss else "--no-fused-head-loss")
    if args.preset_out:
        out.append(f"--preset-out {args.preset_out}")
    return out


def main(argv=None):
    args = parse_args(argv)
    # the planner computes on the CPU: DeepSpeed (imported for its pipeline partitioning) need not probe for a GPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    job = job_from_args(args)
    hw = hardware_from_args(args)
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ValueError(f"--nodes {args.nodes} and --gpus-per-node {args.gpus_per_node} must be >= 1")
    result = plan(job, args.nodes, hw, tp=args.tp, pp=args.pp, dp=args.dp, zero=args.zero,
                  micro_batch=args.micro_batch, checkpointing=args.checkpointing,
                  sequence_parallel=args.sequence_parallel, ds_config=args.ds_config)
    pick = result.pick(hw)
    if args.json:
        print(json.dumps({"pick": pick.to_json() if pick else None,
                          "fits": [p.to_json() for p in result.fits],
                          "too_big": [{**p.to_json(), "reason": memory_reason(p, hw)} for p in result.too_big],
                          "rejected": [{"layout": r.layout, "reason": r.reason} for r in result.rejected]}, indent=1))
    else:
        c = job.config
        cfg = TrainConfig(depth=c.n_layer, vocab_size=c.vocab_size, seq_len=c.sequence_len, device_batch_size=1,
                          total_batch_size=job.total_batch_size, num_iterations=1, n_kv_head=c.n_kv_head)
        print(f"model d{c.n_layer}: {num_params(cfg):,} params, n_embd {c.n_embd}, {c.n_head} heads "
              f"({c.n_kv_head} KV), vocab {c.vocab_size:,}, seq {c.sequence_len}, "
              f"{model_flops_per_token(cfg):.3e} FLOPs/token; {job.total_batch_size:,} tokens/step "
              f"({job.global_batch} sequences), {job.dtype}, "
              f"{'LM head fused with the loss' if job.fused_head_loss else 'logits materialized'}")
        print(f"hardware: {args.nodes} x {hw.gpus_per_node} {hw.name}, {hw.memory / GiB:.0f} GiB, "
              f"{hw.peak_flops / 1e12:.0f} TFLOP/s x {hw.matmul_efficiency} efficiency, NVLink "
              f"{hw.nvlink_busbw / 1e9:.0f} GB/s, IB {hw.ib_busbw_per_gpu / 1e9:.0f} GB/s per GPU")
        print(f"\n{len(result.fits)} layouts fit, {len(result.too_big)} exceed {hw.memory / GiB:.0f} GiB, "
              f"{len(result.rejected)} rejected\n")
        print(HEADER)
        shown = result.fits[:args.top] if args.top > 0 else result.fits
        for i, pred in enumerate(shown, 1):
            print(row(i, pred) + ("  <- pick" if pred is pick else ""))
        if pick is not None and pick not in shown:
            print(row(result.fits.index(pick) + 1, pick) + "  <- pick")
        if pick is not None:
            print(f"\npick: {pick.layout.flags()} (dp {pick.layout.dp}) -- among the layouts within "
                  f"{PICK_TIME_SLACK:.0%} of the fastest that leave {PICK_MEMORY_HEADROOM:.0%} of the memory free: no "
                  f"recomputation first, then the lowest ZeRO stage, the fewest tp x pp ranks, the largest "
                  f"micro-batch (else the fastest leaving it)")
        if result.too_big:
            print("\nexceed the memory (smallest first):")
            for pred in result.too_big[:max(3, args.top // 3)] if args.top > 0 else result.too_big:
                print(f"  {pred.layout.flags()}: {memory_reason(pred, hw)}")
        if result.rejected:
            print("\nrejected, by reason:")
            by_reason = {}
            for r in result.rejected:
                by_reason.setdefault(r.reason, []).append(" ".join(f"{k} {v}" for k, v in r.layout.items()))
            for reason, layouts in by_reason.items():
                print(f"  {reason}\n    {'; '.join(layouts)}")
    if args.preset_out:
        if not result.fits:
            raise ValueError(f"no layout fits in {hw.memory / GiB:.0f} GiB: nothing to write to {args.preset_out}; "
                             f"use more GPUs, a smaller --micro-batch or --fused-head-loss")
        os.makedirs(os.path.dirname(os.path.abspath(args.preset_out)), exist_ok=True)
        atomic_write_json(args.preset_out, preset(args, job, hw, pick))
        if not args.json:
            print(f"\nwrote {args.preset_out}")


if __name__ == "__main__":
    cli.run(main)
