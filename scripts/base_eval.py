"""Evaluate a base model on any tp x pp x dp grid: bits per byte, CORE, greedy samples.

    deepspeed --num_gpus N scripts/base_eval.py --run RUN_DIR [--tp T --pp P] --eval bpb,core,sample \
        [--max-per-task K] [--eval-bundle DIR|ZIP|URL] [--data-dir CACHE]

Weights: a full (layout-free) state dict under nanochat's names, --checkpoint FILE or RUN_DIR/model.pt (a
`torch.save` of a state dict, or of {"state_dict": ..., "config": ...}), or a Muon run's checkpoint
RUN_DIR/checkpoints/TAG/universal.pt (its "model" entry), so a model trained on one layout is
evaluated on any other. Model settings come from RUN_DIR/config.json ("model"), the tokenizer from its
"tokenizer" entry or --tokenizer, the validation data from "val_data" or --val-data.
Writes RUN_DIR/base_eval.csv and RUN_DIR/base_eval.md (rank 0) and TensorBoard scalars under
RUN_DIR/tensorboard. CORE is always printed with its task count and the tasks it could not load.
"""
import argparse
import csv
import io
import json
import os
import sys

import torch
import torch.distributed as dist

from megachat.fileio import atomic_write

PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
           "The opposite of hot is", "The planets of the solar system are:"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="RUN_DIR of base_train.py (config.json, model.pt)")
    p.add_argument("--checkpoint", default=None,
                   help="full state dict file (default RUN_DIR/model.pt), or RUN_DIR/checkpoints/TAG/universal.pt")
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
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    args = p.parse_args(argv)
    args.evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    unknown = set(args.evals) - {"bpb", "core", "sample"}
    if unknown:
        p.error(f"--eval {args.eval}: unknown {sorted(unknown)}; use a comma list of bpb, core, sample")
    return args


def load_state_dict(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights at {path}: pass --checkpoint FILE (a full state dict under nanochat's "
                                f"names) or write RUN_DIR/model.pt at the end of training")
    from megachat.checkpoint import archive_damage
    damage = archive_damage(path)  # torch.load would read flipped bits as weights without a word
    if damage:
        raise RuntimeError(f"{damage}; the weights are damaged: point --checkpoint at another copy (an earlier "
                           f"RUN_DIR/checkpoints/step_*/universal.pt holds the weights of that step)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # a {"state_dict": ...} file, or a checkpoint's universal.pt
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def build_model(model_cfg: dict, state_dict, grid, device, dtype):
    """GPT on `grid` with only this pipeline stage's layers materialized, weights from the full state dict."""
    from megachat.model import GPT, GPTConfig, load_nanochat_state_dict, materialize
    with torch.device("meta"):
        model = GPT(GPTConfig(**model_cfg), grid=grid)
    materialize(model, device)
    model.init_weights(0)  # RoPE buffers; every weight is replaced next
    load_nanochat_state_dict(model, state_dict)
    return model.to(dtype).eval()


@torch.no_grad()
def greedy_samples(fwd, tokenizer, grid, device, n_tokens=16):
    """Greedy continuations of PROMPTS; the token comes from dp slice 0's reporting rank, broadcast to all."""
    src = (grid.pp - 1) * grid.tp * grid.dp  # tp rank 0, dp rank 0, last stage
    out = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
        start = len(ids)
        for _ in range(n_tokens):
            res = fwd.core_forward(torch.tensor([ids[-fwd.model.config.sequence_len:]], device=device))
            nxt = torch.tensor([res[1][0, -1].item() if res is not None else 0], device=device)
            if dist.is_initialized():
                dist.broadcast(nxt, src=src)
            ids.append(int(nxt.item()))
        out.append((prompt, tokenizer.decode(ids[start:])))
    return out


def val_batches(val_prefix, seq_len, eval_tokens, device_batch_size, grid, device):
    """This rank's share of the first eval_tokens tokens of the validation data, as (x, y) batches."""
    from megachat.evaluation.loss_eval import val_dataset
    ds = val_dataset(val_prefix, seq_len)  # the order base_train's val bpb reads
    global_batch = device_batch_size * grid.dp
    steps = max(1, eval_tokens // (seq_len * global_batch))
    for step in range(steps):
        x, y = ds.get_batch(step, global_batch, grid.dp_rank, grid.dp)
        yield x.to(device), y.to(device)


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
    from megachat.data import check_tokenizer
    from megachat.engine import init_distributed
    from megachat.evaluation.core_eval import evaluate_core
    from megachat.evaluation.core_tasks import load_core_tasks
    from megachat.evaluation.loss_eval import evaluate_bpb
    from megachat.evaluation.model_eval import GridForward
    from megachat.parallel import init_grid
    from megachat.tokenizer import Tokenizer

    cfg_path = os.path.join(args.run, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: --run must be a base_train.py output directory")
    with open(cfg_path) as f:
        run_cfg = json.load(f)
    tokenizer = Tokenizer.load(args.tokenizer or run_cfg["tokenizer"])
    init_distributed(world_of_one=False)  # a plain `python` run evaluates without a process group
    grid = init_grid(args.tp, args.pp)
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = build_model(run_cfg["model"], load_state_dict(args.checkpoint or os.path.join(args.run, "model.pt")),
                        grid, device, dtype)
    fwd = GridForward(model, grid)
    log = print if rank == 0 else None
    rows, core_result, samples = [], None, []

    if "bpb" in args.evals:
        val = args.val_data or run_cfg.get("val_data")
        if not val:
            raise ValueError("--eval bpb needs validation data: pass --val-data PREFIX (config.json has none)")
        check_tokenizer(val, tokenizer)
        token_bytes = torch.as_tensor(tokenizer.token_bytes, dtype=torch.int64)
        bpb = evaluate_bpb(fwd.token_loss, val_batches(val, model.config.sequence_len, args.eval_tokens,
                                                       args.device_batch_size, grid, device), token_bytes)
        rows.append(("val_bpb", f"{bpb:.6f}"))
        if log:
            log(f"val bpb: {bpb:.6f}")
    if "core" in args.evals:
        tasks = load_core_tasks(args.eval_bundle, args.data_dir)
        # Prompts are not cut to the training length (nanochat does not cut them either); only the RoPE
        # tables' 10 x sequence_len rows bound them.
        encode = lambda text: tokenizer.encode(text, prepend=tokenizer.bos_id)  # noqa: E731
        core_result = evaluate_core(tasks, encode, fwd.core_forward, tokenizer.bos_id, max_per_task=args.max_per_task,
                                    dp_rank=grid.dp_rank, dp_size=grid.dp, scores=fwd.reports,
                                    max_seq_len=10 * model.config.sequence_len, device=device, log=log)
        rows += [("core", f"{core_result.core:.6f}"), ("core_tasks", f"{core_result.num_tasks}/22"),
                 ("core_missing", " ".join(core_result.missing) or "-")]
        rows += [(f"core/{k}", f"{v:.6f}") for k, v in core_result.centered.items()]
    if "sample" in args.evals:
        samples = greedy_samples(fwd, tokenizer, grid, device)
        if log:
            for prompt, text in samples:
                log(f"sample | {prompt!r} -> {text!r}")
    if rank == 0:
        write_report(args.run, rows, core_result, samples)
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(os.path.join(args.run, "tensorboard"))
        for k, v in rows:
            try:
                tb.add_scalar(f"base_eval/{k}", float(v))
            except ValueError:
                pass  # the text rows (task count, missing tasks) are in the CSV and markdown
        tb.close()
        print(f"wrote {os.path.join(args.run, 'base_eval.csv')} and base_eval.md", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
