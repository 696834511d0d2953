"""Model-state bytes per rank under each ZeRO stage, counted tensor by tensor, beside the planner's formula.

    deepspeed --num_gpus 4 scripts/bench_memory.py --depth 12 --vocab-size 4096 --zero 1 2 3 --dtype fp32

For every (dtype, ZeRO stage): builds the trainer (megachat.build.build_trainer, DeepSpeed's real optimizers),
takes one step on synthetic tokens, then counts during a second step the most each rank holds
(megachat.measure.measure_model_states: weights, gradients, optimizer state, DeepSpeed's gradient buckets, ZeRO-3's
gathered parameters, and every other tensor the garbage collector reaches) and prints the largest over ranks as a
markdown table, with megachat.planner.model_state_bytes' prediction for the same rank (MB = 1e6 bytes). Last, each
rank's peak RSS over the whole launch (the process: Python, torch, DeepSpeed and every trainer built), min-max over
ranks: run one --zero stage per launch to compare stages by it.
"""
import argparse
import resource

import torch
import torch.distributed as dist

from megachat.build import build_trainer
from megachat.measure import live_storages, measure_model_states
from megachat.parallel import init_distributed
from megachat.planner import Job, job_zero_settings, layer_params, model_state_bytes, predict_gathered_bytes
from megachat.train_config import TrainConfig

KINDS = ("weights", "grads", "optimizer", "buffers", "gathered", "other")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--device-batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per rank per step")
    p.add_argument("--zero", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    init_distributed()
    dp, talk = dist.get_world_size(), dist.get_rank() == 0
    g = torch.Generator().manual_seed(dist.get_rank())
    shape = (args.device_batch_size, args.max_seq_len)
    batches = [(torch.randint(0, args.vocab_size, shape, generator=g), torch.randint(0, args.vocab_size, shape,
                                                                                     generator=g))
               for _ in range(args.grad_accum)]
    if talk:
        print(f"depth {args.depth}, vocab {args.vocab_size}, dp {dp}, {args.grad_accum} micro-batches of "
              f"{args.device_batch_size} x {args.max_seq_len}; MB per rank, measured (planned)\n")
        print("| ZeRO | dtype | " + " | ".join(KINDS) + " | model states |")
        print("| --- | --- |" + " ---: |" * (len(KINDS) + 1))
    for dtype in args.dtype:
        for zero in args.zero:
            cfg = TrainConfig(depth=args.depth, vocab_size=args.vocab_size, seq_len=args.max_seq_len,
                              device_batch_size=args.device_batch_size,
                              total_batch_size=args.device_batch_size * args.max_seq_len * dp * args.grad_accum,
                              num_iterations=10, zero=zero, dtype=dtype)
            before = live_storages()  # what earlier trainers of this process left behind
            trainer = build_trainer(cfg)
            trainer.train_step(batches)
            got = measure_model_states(trainer, batches, exclude=before)
            job = Job(cfg.model_config(), cfg.total_batch_size, dtype)
            layers, settings = layer_params(job.config, 1), job_zero_settings(job, zero)
            planned = model_state_bytes(layers, dp, zero, dtype, settings, dp_rank=trainer.grid.dp_rank,
                                        micro_batches=args.grad_accum)
            planned["gathered"] = predict_gathered_bytes(layers, zero, dtype, settings)
            values = torch.tensor([float(got[k]) for k in KINDS] + [float(planned.get(k, 0)) for k in KINDS],
                                  dtype=torch.float64)
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
            measured, plan = dict(zip(KINDS, values[:len(KINDS)].tolist())), dict(zip(KINDS, values[len(KINDS):]
                                                                                     .tolist()))
            if talk:
                states = sum(measured[k] for k in ("weights", "grads", "optimizer"))
                planned_states = sum(plan[k] for k in ("weights", "grads", "optimizer"))
                cells = [f"{measured[k] / 1e6:.1f}" + (f" ({plan[k] / 1e6:.1f})" if k != "other" else "")
                         for k in KINDS]
                print(f"| {zero} | {dtype} | " + " | ".join(cells) + f" | {states / 1e6:.1f} ({planned_states / 1e6:.1f}) |",
                      flush=True)
            del trainer
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0], dtype=torch.float64)  # KiB
    low, high = rss.clone(), rss.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if talk:
        print(f"\npeak RSS per rank over the launch: {low.item() / 1e9:.2f}-{high.item() / 1e9:.2f} GB")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
