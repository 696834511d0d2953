"""Evaluate a chat model on ChatCORE's tasks on a tp x dp grid (pp = 1): ARC-E/C and MMLU categorically, GSM8K,
HumanEval and SpellingBee by generating with the inference engine.

    deepspeed --num_gpus N scripts/chat_eval.py --run RUN_DIR [--tp T] \
        [--tasks ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,SpellingBee] [--max-per-task K] [--num-samples 1] \
        [--max-tokens 512] [--temperature 0] [--top-k 50] [--batch-size 8] [--data-dir CACHE]

dp = N / T: each dp slice of T ranks runs its own model shards and engine on its share of the examples. Weights: the
run's RUN_DIR/model/ or --checkpoint PATH (checkpoint.load_weights); the model settings and tokenizer come from
RUN_DIR/config.json. Writes RUN_DIR/chat_eval.md and chat_eval.csv (rank 0) and TensorBoard scalars chat_eval/*
under RUN_DIR/tensorboard. ChatCORE is computed only when all six tasks ran; otherwise the line says which are
missing. `python scripts/chat_eval.py ...` (no launcher) is a single process.
"""
import argparse
import csv
import io
import os
from dataclasses import replace

import torch
import torch.distributed as dist

from megachat import cli, watchdog
from megachat.checkpoint import load_run, read_run_config
from megachat.engine import Engine
from megachat.evaluation.chat_tasks import (BATCH_SIZE, CHATCORE_TASKS, DEFAULT_SAMPLING, centered, evaluate_chatcore,
                                            load_chat_task)
from megachat.evaluation.model_eval import GridForward
from megachat.fileio import atomic_write
from megachat.monitor import write_scalars
from megachat.parallel import device, init_distributed, init_grid

TASKS = "ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,SpellingBee"


def parse_args(argv=None):
    d = DEFAULT_SAMPLING  # nanochat's chat_eval settings
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="RUN_DIR of a training run (config.json, model/)")
    p.add_argument("--checkpoint", default=None,
                   help="weights (default RUN_DIR/model/): a checkpoint RUN_DIR/checkpoints/step_NNNNNN, a "
                        ".safetensors file or a state dict file")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: config.json's)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--tasks", default=TASKS, help=f"comma list of {TASKS}")
    p.add_argument("--max-per-task", type=int, default=-1, help="examples per task (-1 = all)")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="samples per problem; passes if any is right")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens generated per sample at most")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-k", type=int, default=d.top_k, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="prompts per engine call")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed of the first batch (batch b: seed + b)")
    p.add_argument("--data-dir", default=None, help="evaluation cache (default ~/.cache/megachat/eval)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--collective-timeout", type=float, default=None,
                   help="seconds a collective waits for a lost rank before every rank stops, naming it (default 600)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    args = p.parse_args(argv)
    args.task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.task_names if t not in CHATCORE_TASKS]
    if unknown or not args.task_names:
        p.error(f"--tasks {args.tasks}: unknown {unknown}; use a comma list of {TASKS}")
    if args.num_samples < 1 or args.max_tokens < 1 or args.batch_size < 1 or args.temperature < 0:
        p.error("--num-samples, --max-tokens and --batch-size must be >= 1 and --temperature >= 0")
    args.sampling = replace(d, num_samples=args.num_samples, max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k or None, seed=args.seed)
    return args


def write_report(run_dir, result, settings):
    """chat_eval.csv (metric,value) and chat_eval.md, each written to a temp file, fsynced, then renamed."""
    rows = [(f"chat/{k}", f"{v:.6f}") for k, v in result.accuracy.items()]
    rows += [("chatcore", f"{result.chatcore:.6f}" if result.chatcore is not None else "-"),
             ("chatcore_tasks", f"{len(result.accuracy)}/{len(CHATCORE_TASKS)}"),
             ("chatcore_missing", " ".join(result.missing) or "-")]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["metric", "value"])
    w.writerows(rows)
    md = ["# Chat model evaluation", "", f"**{result.summary()}**", "", f"Settings: {settings}", "",
          "| task | type | examples | accuracy | centered |", "| --- | --- | --- | --- | --- |"]
    md += [f"| {k} | {result.kind[k]} | {result.examples[k]} | {a:.4f} | {centered(k, a):.4f} |"
           for k, a in result.accuracy.items()]
    md += [f"| {k} | - | - | not run | - |" for k in result.missing]
    for name, text in (("chat_eval.csv", buf.getvalue()), ("chat_eval.md", "\n".join(md) + "\n")):
        atomic_write(os.path.join(run_dir, name), text)
    return rows


def main(argv=None):
    args = parse_args(argv)
    read_run_config(args.run)  # a wrong --run fails before any process group
    tasks = [load_chat_task(name, args.data_dir) for name in args.task_names]  # missing data fails before the model
    # a plain `python` run evaluates without a process group
    init_distributed(world_of_one=False, timeout_s=args.collective_timeout, grace=False)
    with watchdog.for_job(args.run, "chat_eval"):  # a lost rank ends every rank in --collective-timeout, named
        grid = init_grid(args.tp, 1)
        rank = dist.get_rank() if dist.is_initialized() else 0
        dev = device()
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        model, tokenizer, _ = load_run(args.run, grid, dev, dtype, weights_path=args.checkpoint,
                                       tokenizer_dir=args.tokenizer)
        fwd = GridForward(model, grid)
        generation = f"{args.sampling}, batch_size {args.batch_size}"
        log = print if rank == 0 else None
        if log:
            log(f"chat_eval: tp {grid.tp} x dp {grid.dp}, tasks {', '.join(args.task_names)}, {generation}")
        # the running batch holds a request at least
        engine = Engine(model, tokenizer, max_batch=max(32, args.batch_size * args.sampling.num_samples))
        result = evaluate_chatcore(tasks, tokenizer, fwd.letter_logits, engine, args.sampling,
                                   batch_size=args.batch_size, max_per_task=args.max_per_task, dp_rank=grid.dp_rank,
                                   dp_size=grid.dp, scores=fwd.reports, device=dev, log=log)
        if rank == 0:
            rows = write_report(args.run, result, f"tp {grid.tp} x dp {grid.dp}, max_per_task {args.max_per_task}, "
                                                  f"{generation}")
            print(f"| {'task':14s} | examples | accuracy | centered |")
            for k, a in result.accuracy.items():
                print(f"| {k:14s} | {result.examples[k]:8d} | {a:8.4f} | {centered(k, a):8.4f} |")
            print(result.summary(), flush=True)
            write_scalars(args.run, "chat_eval", rows)
            print(f"wrote {os.path.join(args.run, 'chat_eval.csv')} and chat_eval.md", flush=True)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    cli.run(main)
