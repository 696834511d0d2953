"""Training throughput of one layout: tokens/s, achieved model FLOP/s, and a step split into forward, backward,
optimizer and communication (DeepSpeed's wall-clock-breakdown timers, max over ranks).

    deepspeed --num_gpus N scripts/bench_train.py --depth 4 --tp 1 --pp 2 --zero 1 --dtype fp32

Synthetic token ids (no data files needed). On CPU it also times a plain fp32 matmul in the same process and
prints the ratio of the model's achieved FLOP/s to it; on GPU, MFU against 989 TFLOP/s (H100 SXM, dense bf16).
What the columns hold: fwd = forward micro-steps (tp all-reduces inside them included); bwd = backward compute
(tp all-reduces included); optim = the optimizer step (ZeRO gathers and Muon's all_to_alls included; the global
gradient norm, which the train step computes before it, is not: --vs-nanochat counts it in "other", where nanochat's
clip_grad_norm_ is in its "optim");
comm = data-parallel gradient reduction + pipeline send/recv (which includes waiting for the other stage). With
pp > 1 the time of each pipeline instruction is measured by wrapping the engine's instruction table, because
DeepSpeed 0.19.8's PipelineEngine fails with wall_clock_breakdown on ("bwd_microstep timer has already been
started"). Each part is the max over ranks (on each rank its parts add up to about the step time).
The CPU ratio compares the whole run's model FLOP/s with ONE process's fp32 matmul FLOP/s.

Side by side with nanochat (one process, fp32, one thread unless --threads):

    python scripts/bench_train.py --vs-nanochat --compile --depth 4 --max-seq-len 256 --device-batch-size 4

builds nanochat's own GPT, its setup_optimizers() (Muon + AdamW) and torch.compile(model, dynamic=False) as its
base_train does, next to megachat's trainer at the same depth, sequence length, batch and vocabulary, and alternates
their steps (the order flips every round, so load on the box hits both alike). Prints the median of each part over
the timed rounds with the min-max spread, and megachat's tokens/s over nanochat's. nanochat is an optional
dependency (`import nanochat.gpt`: a checkout of github.com/karpathy/nanochat on PYTHONPATH); without it its column
reads "absent". (PyPI's `nanochat` 0.1.2 is not it: that sdist holds only the rustbpe tokenizer crate and the README.)
Both run Muon's Newton-Schulz in bf16, as nanochat always does (megachat's default, TrainConfig.ns_dtype).
"""
import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from megachat.build import CONFIG_DIR, build_trainer
from megachat.deepspeed_internals import time_pipeline_instructions
from megachat.monitor import peak_flops
from megachat.optim import lr_multiplier, muon_momentum, optimizer_stats
from megachat.parallel import init_distributed
from megachat.train_config import TrainConfig, model_flops_per_token

TIMERS = {"fwd": ["fwd_microstep"], "bwd": ["bwd_inner_microstep"], "optim": ["step_microstep"],
          "comm": ["bwd_allreduce_microstep", "pipe_send_output", "pipe_recv_input", "pipe_send_grad",
                   "pipe_recv_grad"]}


class SyntheticTokens:
    """Uniform random ids, sample i drawn from a generator seeded by i: int64 [seq_len + 1]."""

    def __init__(self, vocab_size: int, seq_len: int):
        self.vocab_size, self.seq_len = vocab_size, seq_len

    def __getitem__(self, i):
        return np.random.default_rng(i).integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64)

    def micro_batches(self, step, global_batch, micro_batch, dp_rank, dp):
        """This rank's micro-batches (x, y) of global batch `step`, as GPTDataset.micro_batches gives them."""
        per_rank = global_batch // dp
        first = step * global_batch + dp_rank * per_rank
        rows = torch.from_numpy(np.stack([self[i] for i in range(first, first + per_rank)]))
        return list(zip(rows[:, :-1].split(micro_batch), rows[:, 1:].split(micro_batch)))


def timed_ds_config(zero: int, dtype: str) -> str:
    """configs/ds/zero{Z}_{dtype}.json with DeepSpeed's wall-clock-breakdown timers on, as a temp file."""
    conf = json.loads((CONFIG_DIR / f"zero{zero}_{dtype}.json").read_text())
    conf["wall_clock_breakdown"] = True
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(conf, f)
    return path


def matmul_flops_per_s(n: int = 1024, repeats: int = 10) -> float:
    """Achieved FLOP/s of a plain fp32 [n, n] @ [n, n] on this process's device."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    a @ b
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def sync() -> None:
    """Wait for queued device work, so a timer reads the work itself (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def nanochat_step(cfg: TrainConfig):
    """nanochat's own training step at cfg's depth / sequence length / batch / vocabulary, one process, fp32: its
    GPT and init_weights(), its setup_optimizers() (Muon + fused AdamW) and torch.compile(model, dynamic=False) as its
    base_train; the schedule (lr warmdown, Muon momentum warmup) and gradient clipping at 1.0 as base_train sets them.
    Returns step(x, y) -> {fwd, bwd, optim} in ms, or None when nanochat cannot be imported. Call it before
    init_distributed: nanochat picks its distributed optimizers whenever RANK is set."""
    try:
        from nanochat.gpt import GPT, GPTConfig
    except ImportError:
        return None
    mc = cfg.model_config()
    model = GPT(GPTConfig(sequence_len=mc.sequence_len, vocab_size=mc.vocab_size, n_layer=mc.n_layer,
                          n_head=mc.n_head, n_kv_head=mc.n_kv_head, n_embd=mc.n_embd))
    model.init_weights()
    model.transformer.wte.float()  # nanochat keeps wte in bf16 for CUDA autocast; fp32 here, as every other weight
    optimizers = model.setup_optimizers()
    adamw, muon = optimizers
    compiled = torch.compile(model, dynamic=False)
    it = 0

    def step(x, y):
        nonlocal it
        t0 = time.perf_counter()
        loss = compiled(x, y)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lrm = lr_multiplier(it, cfg.num_iterations, cfg.warmdown_ratio)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(it)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        sync()
        it += 1
        return {"fwd": (t1 - t0) * 1000, "bwd": (t2 - t1) * 1000, "optim": (time.perf_counter() - t2) * 1000}
    return step


def attention_path(dtype: str) -> str:
    """Which attention kernels.attention runs for this run's training forward."""
    if not torch.cuda.is_available() or dtype != "bf16" or os.environ.get("MEGACHAT_ATTENTION") == "sdpa":
        return "sdpa"
    return "flash-attn" if importlib.util.find_spec("flash_attn") else "sdpa (flash-attn not installed)"


def side_by_side(args) -> None:
    """--vs-nanochat: nanochat's step and megachat's, alternating in one process; prints the markdown table."""
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ValueError("--vs-nanochat compares one process with one process: run it with plain `python`, not a "
                         "launcher with several ranks")
    torch.set_num_threads(args.threads)
    total = args.device_batch_size * args.max_seq_len
    cfg = TrainConfig(depth=args.depth, vocab_size=args.vocab_size, seq_len=args.max_seq_len,
                      device_batch_size=args.device_batch_size, total_batch_size=total,
                      num_iterations=args.warmup + args.steps, zero=args.zero, dtype="fp32", compile=args.compile,
                      ds_config=timed_ds_config(args.zero, "fp32"))
    rank = os.environ.pop("RANK", None)  # nanochat builds its single-process optimizers only without RANK
    nano = nanochat_step(cfg)
    if rank is not None:
        os.environ["RANK"] = rank
    init_distributed()
    trainer = build_trainer(cfg)
    os.unlink(cfg.ds_config)
    data = SyntheticTokens(args.vocab_size, args.max_seq_len)

    def megachat(x, y):
        t0 = time.perf_counter()
        trainer.train_step([(x, y)])
        sync()
        step = (time.perf_counter() - t0) * 1000
        timers = trainer.ds_engine.get_wall_clock_timers()
        parts = {"fwd": timers["fwd_microstep"], "bwd": timers["bwd_microstep"], "optim": timers["step_microstep"]}
        return {**parts, "other": step - sum(parts.values()), "step": step}

    def timed_nanochat(x, y):
        t0 = time.perf_counter()
        parts = nano(x, y)
        step = (time.perf_counter() - t0) * 1000
        return {**parts, "other": step - sum(parts.values()), "step": step}

    runs = {"megachat": megachat, **({"nanochat": timed_nanochat} if nano else {})}
    rows = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        (x, y), = data.micro_batches(i, args.device_batch_size, args.device_batch_size, 0, 1)
        x, y = x.contiguous(), y.contiguous()  # as nanochat's loader hands them (its loss views targets flat)
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            rec = runs[name](x, y)
            if i >= args.warmup:
                rows[name].append(rec)

    cols = ["fwd", "bwd", "optim", "other", "step"]

    def cell(recs, k):
        v = [r[k] for r in recs]
        return f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})"

    def tokens_per_s(recs):
        return total / statistics.median(r["step"] for r in recs) * 1000

    print(f"\nd{args.depth}, T {args.max_seq_len}, batch {args.device_batch_size}, vocab {args.vocab_size}, fp32, "
          f"{args.threads} thread(s), Newton-Schulz in bf16 in both, megachat ZeRO-{args.zero} with compile "
          f"{'on' if args.compile else 'off'}; {args.steps} timed steps each after {args.warmup} warm-up, "
          f"alternating; ms: median (min-max)\n")
    print("| | fwd ms | bwd ms | optim ms | other ms | step ms | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in ("nanochat", "megachat"):
        if name not in rows:
            print("| nanochat | absent | absent | absent | absent | absent | absent |")
            continue
        print(f"| {name} | " + " | ".join(cell(rows[name], k) for k in cols) + f" | {tokens_per_s(rows[name]):,.0f} |")
    if "nanochat" in rows:
        best = min(r["step"] for r in rows["nanochat"]) / min(r["step"] for r in rows["megachat"])
        print(f"\nmegachat / nanochat tokens/s: {tokens_per_s(rows['megachat']) / tokens_per_s(rows['nanochat']):.2f}x "
              f"(of the median steps; of the fastest steps, the least disturbed by other load: {best:.2f}x)",
              flush=True)
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step (pp > 1 only: the pipeline fills with them; pp = 1 times one)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile megachat's blocks (TrainConfig.compile)")
    p.add_argument("--sdpa", action="store_true", help="torch SDPA attention even where flash-attn is installed")
    p.add_argument("--fp8", action="store_true", help="the tp linears in fp8 through Transformer Engine (TrainConfig.fp8)")
    p.add_argument("--vs-nanochat", action="store_true",
                   help="one process, fp32: nanochat's step and megachat's side by side (see above)")
    p.add_argument("--threads", type=int, default=1, help="--vs-nanochat: torch.set_num_threads")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sdpa:
        os.environ["MEGACHAT_ATTENTION"] = "sdpa"
    if args.vs_nanochat:
        return side_by_side(args)

    init_distributed()
    world = dist.get_world_size()
    dp = world // (args.tp * args.pp) if world % (args.tp * args.pp) == 0 else 1
    if args.pp == 1 and args.grad_accum != 1:
        raise ValueError("--grad-accum > 1 needs --pp > 1: with pp = 1 DeepSpeed resets its timers every micro-step, "
                         "so the split would cover only the last one")
    total = args.device_batch_size * args.max_seq_len * dp * args.grad_accum
    cfg = TrainConfig(depth=args.depth, vocab_size=args.vocab_size, seq_len=args.max_seq_len,
                      device_batch_size=args.device_batch_size, total_batch_size=total,
                      num_iterations=args.warmup + args.steps, tp=args.tp, pp=args.pp, zero=args.zero,
                      dtype=args.dtype, compile=args.compile, fp8=args.fp8,
                      ds_config=timed_ds_config(args.zero, args.dtype) if args.pp == 1 else None)
    trainer = build_trainer(cfg)
    if cfg.ds_config:
        os.unlink(cfg.ds_config)
    data = SyntheticTokens(args.vocab_size, args.max_seq_len)

    def batches(step):
        return data.micro_batches(step, cfg.global_batch, cfg.device_batch_size, trainer.grid.dp_rank, trainer.grid.dp)
    pipe_parts = {k: 0.0 for k in TIMERS}
    if cfg.pp > 1:
        time_pipeline_instructions(trainer.ds_engine, pipe_parts,
                                   torch.cuda.synchronize if torch.cuda.is_available() else lambda: None)

    def read_timers():
        """ms per part of the last step. pp = 1: DeepSpeed snapshots and resets its timers at every engine.step()
        (get_wall_clock_timers); pp > 1: our instruction timers, read and reset."""
        if cfg.pp == 1:
            cache = trainer.ds_engine.get_wall_clock_timers()
            return {col: sum(cache.get(n, 0.0) for n in names) for col, names in TIMERS.items()}
        out = dict(pipe_parts)
        pipe_parts.update({k: 0.0 for k in pipe_parts})
        return out

    for step in range(args.warmup):
        trainer.train_step(batches(step))
    read_timers()
    parts = {k: 0.0 for k in TIMERS}
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        rec = trainer.train_step(batches(step))
        for k, v in read_timers().items():
            parts[k] += v
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()
    elapsed = time.perf_counter() - t0
    # the slowest rank decides the step: take the max over ranks of each part
    t = torch.tensor([parts[k] for k in TIMERS], dtype=torch.float64, device=trainer.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    parts = {k: v / args.steps for k, v in zip(TIMERS, t.tolist())}
    ref = matmul_flops_per_s() if dist.get_rank() == 0 and not torch.cuda.is_available() else None
    st = optimizer_stats(trainer.ds_engine)  # Muon's exchange: bytes this rank sent vs the scheme's minimum
    o = torch.tensor([st["step_seconds"] * 1000, st["bytes_sent"], st["bytes_min"]], dtype=torch.float64,
                     device=trainer.device)
    dist.all_reduce(o, op=dist.ReduceOp.MAX)
    opt_row = o.tolist()

    if dist.get_rank() == 0:
        tokens_per_s = total * args.steps / elapsed
        flops = model_flops_per_token(cfg) * tokens_per_s
        layout = f"d{cfg.depth} tp{cfg.tp} pp{cfg.pp} dp{trainer.grid.dp} zero{cfg.zero} {cfg.dtype}"
        step_ms = elapsed / args.steps * 1000
        print(f"| layout | tokens/step | step ms | tokens/s | model TFLOP/s | fwd ms | bwd ms | optim ms | comm ms | "
              f"{'vs 1-process fp32 matmul' if ref else 'MFU'} |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        peak = peak_flops(cfg.dtype)
        last = (f"{flops / ref:.3f} (matmul {ref / 1e9:.1f} GFLOP/s)" if ref else
                f"{flops / (peak * world):.1%}" if peak else "n/a (peak unknown)")
        print(f"| {layout} | {total} | {step_ms:.1f} | {tokens_per_s:,.0f} | {flops / 1e12:.4f} | {parts['fwd']:.1f} | "
              f"{parts['bwd']:.1f} | {parts['optim']:.1f} | {parts['comm']:.1f} | {last} |", flush=True)
        print(f"\nMuon step (max over ranks): {opt_row[0]:.1f} ms inside the optimizer, {opt_row[1] / 1e6:.3f} MB "
              f"sent by the busiest rank, minimum for the scheme {opt_row[2] / 1e6:.3f} MB per rank", flush=True)
        # read by scripts/gpu_check.py
        print(f"last step loss: {rec['loss']:.6f}; attention: {attention_path(cfg.dtype)}", flush=True)
        if torch.cuda.is_available():
            print(f"peak memory (rank 0, torch.cuda.max_memory_allocated): "
                  f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
