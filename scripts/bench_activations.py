"""Bytes saved for backward in one micro-batch's training forward (embedding, blocks, LM head fused with the loss),
measured with torch.autograd.graph.saved_tensors_hooks (each storage once, parameters and buffers left out) and
planned by megachat.planner.activation_bytes, for every activation-checkpointing mode, with and without sequence
parallelism when tp > 1. One table per launch, printed by rank 0 (tp = the launch's world size):

    python scripts/bench_activations.py --depth 12 --seq-len 512                               # tp 1
    torchrun --nproc_per_node 2 scripts/bench_activations.py --depth 12 --seq-len 512          # tp 2

What is counted is the GPU path's: the Triton kernels (on a CPU in Triton's interpreter, set here unless the
environment says otherwise; slow, about 2 minutes for the tp 2 example). The torch reference kernels save fp32
temporaries besides (MEGACHAT_TRITON=0 shows how much).
"""
import argparse
import os

import torch

if not torch.cuda.is_available():  # before megachat.kernels imports triton
    os.environ.setdefault("MEGACHAT_TRITON", "1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.distributed as dist  # noqa: E402

from megachat.measure import model_storages, saved_tensor_bytes
from megachat.model import GPTConfig, build_model
from megachat.parallel import Grid, init_distributed, init_grid
from megachat.planner import CHECKPOINTING, activation_bytes

MiB = 2 ** 20


def measure(model, x, y, w):
    with saved_tensor_bytes(model_storages(model)) as got:
        model(x, (y, w))
    return got["bytes"]


def planned(config, tp, micro_batch, dtype, checkpointing, sp):
    per = activation_bytes(config, tp, micro_batch, dtype, fused_head_loss=True, checkpointing=checkpointing,
                           sequence_parallel=sp)
    return per["embedding"] + config.n_layer * per["block"] + per["head"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    args = p.parse_args()
    torch.set_num_threads(1)
    init_distributed()
    tp = dist.get_world_size()
    grid = init_grid(tp=tp) if tp > 1 else Grid()
    config = GPTConfig.from_depth(args.depth, args.vocab_size, args.seq_len)
    model = build_model(config, grid, dtype=torch.bfloat16 if args.dtype == "bf16" else None)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len), generator=g)
    y = torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len), generator=g)
    w = torch.ones(args.micro_batch, args.seq_len)
    rows = []
    for sp in ([False, True] if tp > 1 else [False]):
        model.set_sequence_parallel(sp)
        for mode in CHECKPOINTING:
            model.set_activation_checkpointing(mode)
            rows.append((sp, mode, measure(model, x, y, w), planned(config, tp, args.micro_batch, args.dtype, mode, sp)))
    if dist.get_rank() == 0:
        print(f"d{args.depth} ({config.n_embd} wide), T {args.seq_len}, micro-batch {args.micro_batch}, vocab "
              f"{args.vocab_size:,}, {args.dtype}, tp {tp}: saved for backward per micro-batch on one rank\n")
        print("| tp | sequence parallel | checkpointing | measured MiB | planned MiB | planned / measured | vs none, no SP |")
        print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
        base = rows[0][2]
        for sp, mode, got, want in rows:
            print(f"| {tp} | {'yes' if sp else 'no'} | {mode} | {got / MiB:,.2f} | {want / MiB:,.2f} | "
                  f"{want / got:.3f} | {got / base:.2f}x |")


if __name__ == "__main__":
    main()
