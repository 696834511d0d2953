"""Evaluate a base model on any tp x pp x dp grid: bits per byte, CORE, greedy samples.

    deepspeed --num_gpus N scripts/base_eval.py --run RUN_DIR [--tp T --pp P] --eval bpb,core,sample \
        [--max-per-task K] [--eval-bundle DIR|ZIP|URL] [--data-dir CACHE]

Weights (layout-free, so a model trained on one layout is evaluated on any other): the run's RUN_DIR/model/, or
--checkpoint PATH: a training checkpoint RUN_DIR/checkpoints/step_NNNNNN, an exported .safetensors file or a
`torch.save` state dict under nanochat's names (checkpoint.load_weights). Model settings come from RUN_DIR/config.json ("model"), the tokenizer from its
"tokenizer" entry or --tokenizer, the validation data from "val_data" or --val-data.
Writes RUN_DIR/base_eval.csv and RUN_DIR/base_eval.md (rank 0) and TensorBoard scalars under
RUN_DIR/tensorboard. CORE is always printed with its task count and the tasks it could not load.
"""
import argparse
import csv
import io
import os

import torch
import torch.distributed as dist

from megachat import cli, watchdog
from megachat.checkpoint import load_run, read_run_config
from megachat.data import check_tokenizer
from megachat.evaluation.core_eval import evaluate_core
from megachat.evaluation.core_tasks import load_core_tasks
from megachat.evaluation.loss_eval import evaluate_bpb, val_batches, val_dataset
from megachat.evaluation.model_eval import GridForward, greedy_samples
from megachat.fileio import atomic_write
from megachat.monitor import write_scalars
from megachat.parallel import device, init_distributed, init_grid

PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
           "The opposite of hot is", "The planets of the solar system are:"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="RUN_DIR of base_train.py (config.json, model/)")
    p.add_argument("--checkpoint", default=None,
                   help="weights (default RUN_DIR/model/): a checkpoint RUN_DIR/checkpoints/step_NNNNNN, a "
                        ".safetensors file or a state dict file")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: config.json's)")
    p.add_argument("--val-data", default=None, help="validation data prefix for bpb (default: config.json's)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--eval", default="bpb,core,sample", help="comma list of bpb, core, sample")
    p.add_argument("--eval-tokens", type=int, default=10 * 524288, help="tokens of validation data for bpb")
    p.add_argument("--device-batch-size", type=int, default=8, help="sequences per rank per bpb step")
    p.add_argument("--max-per-task", type=int, default=-1, help="examples per CORE task (-1 = all)")
    p.add_argument("--eval-bundle", default=None, help="DCLM eval_bundle dir, zip or URL (default: offline packages)")
    p.add_argument("--data-dir", default=None, help="evaluation cache (default ~/.cache/megachat/eval)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--collective-timeout", type=float, default=None,
                   help="seconds a collective waits for a lost rank before every rank stops, naming it (default 600)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    args = p.parse_args(argv)
    args.evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    unknown = set(args.evals) - {"bpb", "core", "sample"}
    if unknown:
        p.error(f"--eval {args.eval}: unknown {sorted(unknown)}; use a comma list of bpb, core, sample")
    return args


def write_report(run_dir, rows, core_result, samples):
    """base_eval.csv (metric,value) and base_eval.md, each written to a temp file, fsynced, then renamed."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["metric", "value"])
    w.writerows(rows)
    md = ["# Base model evaluation", "", "| metric | value |", "| --- | --- |"]
    md += [f"| {k} | {v} |" for k, v in rows]
    if core_result is not None:
        md += ["", f"**{core_result.summary()}**", "", "| task | examples | accuracy | centered | source |",
               "| --- | --- | --- | --- | --- |"]
        md += [f"| {k} | {core_result.examples[k]} | {core_result.accuracy[k]:.4f} | {core_result.centered[k]:.4f} "
               f"| {core_result.sources[k]} |" for k in core_result.accuracy]
        md += [f"| {k} | - | missing | - | {why} |" for k, why in core_result.missing.items()]
    if samples:
        md += ["", "## Samples", ""] + [f"- `{p}` -> `{s}`" for p, s in samples]
    for name, text in (("base_eval.csv", buf.getvalue()), ("base_eval.md", "\n".join(md) + "\n")):
        atomic_write(os.path.join(run_dir, name), text)


def main(argv=None):
    args = parse_args(argv)
    read_run_config(args.run)  # a wrong --run fails before any process group
    # a plain `python` run evaluates without a process group
    init_distributed(world_of_one=False, timeout_s=args.collective_timeout, grace=False)
    with watchdog.for_job(args.run, "base_eval"):  # a lost rank ends every rank in --collective-timeout, named
        grid = init_grid(args.tp, args.pp)
        rank = dist.get_rank() if dist.is_initialized() else 0
        dev = device()
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        model, tokenizer, run_cfg = load_run(args.run, grid, dev, dtype, weights_path=args.checkpoint,
                                            tokenizer_dir=args.tokenizer)
        fwd = GridForward(model, grid)
        log = print if rank == 0 else None
        rows, core_result, samples = [], None, []

        if "bpb" in args.evals:
            val = args.val_data or run_cfg.get("val_data")
            if not val:
                raise ValueError("--eval bpb needs validation data: pass --val-data PREFIX (config.json has none)")
            check_tokenizer(val, tokenizer)
            token_bytes = torch.as_tensor(tokenizer.token_bytes, dtype=torch.int64)
            batches = val_batches(val_dataset(val, model.config.sequence_len), args.eval_tokens, args.device_batch_size,
                                  grid)
            bpb = evaluate_bpb(fwd.token_loss, ((x.to(dev), y.to(dev)) for x, y in batches), token_bytes)
            rows.append(("val_bpb", f"{bpb:.6f}"))
            if log:
                log(f"val bpb: {bpb:.6f}")
        if "core" in args.evals:
            tasks = load_core_tasks(args.eval_bundle, args.data_dir)
            # Prompts are not cut to the training length (nanochat does not cut them either); only the RoPE
            # tables' 10 x sequence_len rows bound them.
            encode = lambda text: tokenizer.encode(text, prepend=tokenizer.bos_id)  # noqa: E731
            core_result = evaluate_core(tasks, encode, fwd.core_forward, tokenizer.bos_id,
                                        max_per_task=args.max_per_task, dp_rank=grid.dp_rank, dp_size=grid.dp,
                                        scores=fwd.reports,
                                        max_seq_len=10 * model.config.sequence_len, device=dev, log=log)
            rows += [("core", f"{core_result.core:.6f}"), ("core_tasks", f"{core_result.num_tasks}/22"),
                     ("core_missing", " ".join(core_result.missing) or "-")]
            rows += [(f"core/{k}", f"{v:.6f}") for k, v in core_result.centered.items()]
        if "sample" in args.evals:
            samples = greedy_samples(model, grid, tokenizer, PROMPTS)
            if log:
                for prompt, text in samples:
                    log(f"sample | {prompt!r} -> {text!r}")
        if rank == 0:
            write_report(args.run, rows, core_result, samples)
            write_scalars(args.run, "base_eval", rows)
            print(f"wrote {os.path.join(args.run, 'base_eval.csv')} and base_eval.md", flush=True)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    cli.run(main)
