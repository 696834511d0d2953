"""Checkpoint size, memory and speed: a checkpoint (trainer.save: every rank writes its own slices of the layout-free
state, megachat.sharded) against the state's own size and each rank's training-step peak, and its resume under the
same layout and under another.

    python scripts/bench_checkpoint.py --nprocs 4 --depth 12 --load-tp 2 --out /tmp/bench_ckpt

Three launches of `deepspeed --num_gpus NPROCS` on synthetic token ids (fp32, ZeRO-1, seq_len --seq-len, one
sequence per rank and step): (1) dp NPROCS: --steps training steps, then a checkpoint; (2) dp NPROCS resuming it;
(3) tp LOAD_TP x dp NPROCS/LOAD_TP resuming it through build_trainer (each rank reads its slices), then --steps
training steps. Peak RSS per rank and phase is VmHWM, reset through /proc/self/clear_refs
at the start of the phase. Prints a markdown table; each launch's per-rank numbers are in --out.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megachat import cli, sharded
from megachat.build import build_trainer
from megachat.model import GPTConfig, nanochat_shapes
from megachat.optim import _STATE_KEYS, param_kind
from megachat.parallel import free_port, init_distributed
from megachat.train_config import TrainConfig

GB = 1e9


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", type=int, default=4)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--load-tp", type=int, default=2, help="tp of the resuming launch (dp = nprocs / tp)")
    p.add_argument("--out", required=True)
    p.add_argument("--phase", choices=["save", "resume", "load"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config(args, tp: int):
    return TrainConfig(depth=args.depth, vocab_size=args.vocab_size, seq_len=args.seq_len, device_batch_size=1,
                       total_batch_size=args.seq_len * args.nprocs, num_iterations=1000, tp=tp, zero=1,
                       dtype="fp32")


def train(trainer, steps: int, args) -> int:
    """Peak RSS of `steps` training steps on random ids."""
    reset_peak()
    for _ in range(steps):
        g = torch.Generator().manual_seed(trainer.step)
        rows = torch.randint(0, args.vocab_size, (trainer.cfg.global_batch, args.seq_len + 1), generator=g)
        mine = rows.chunk(trainer.grid.dp)[trainer.grid.dp_rank]
        trainer.train_step([(mb[:, :-1], mb[:, 1:]) for mb in mine.split(1)])
    return peak_rss()


def save_phase(args) -> dict:
    run = os.path.join(args.out, "run")
    trainer = build_trainer(config(args, tp=1), run)
    rec = {"train_peak": train(trainer, args.steps, args)}
    dist.barrier()
    reset_peak()
    t0 = time.perf_counter()
    tag = trainer.save(trainer.step)  # the checkpoint the load phases resume
    rec.update(checkpoint_seconds=time.perf_counter() - t0, save_peak=peak_rss())
    state = Path(run, "checkpoints", tag, "state")
    rec["rank_bytes"] = (state / f"rank-{dist.get_rank():05d}.safetensors").stat().st_size
    rec["checkpoint_bytes"] = sum(f.stat().st_size for f in state.parent.rglob("*") if f.is_file())
    # an asynchronous save: the staging copy, then training steps while the writer thread writes, against steps
    # without a save
    trainer.enable_async_save()
    rec["plain_step"] = min(step_seconds(trainer, args) for _ in range(3))
    dist.barrier()
    t0 = time.perf_counter()
    trainer.save(trainer.step, background=True)
    rec.update(stage_seconds=time.perf_counter() - t0, staged_bytes=trainer.staged_bytes)
    during = []
    while trainer._writer is not None and trainer._writer.is_alive():
        during.append(step_seconds(trainer, args))
    rec["steps_during_save"], rec["step_during_save"] = len(during), max(during, default=0.0)
    trainer.wait_for_save()
    return rec


def step_seconds(trainer, args) -> float:
    """Wall time of one training step on random ids."""
    g = torch.Generator().manual_seed(trainer.step)
    rows = torch.randint(0, args.vocab_size, (trainer.cfg.global_batch, args.seq_len + 1), generator=g)
    mine = rows.chunk(trainer.grid.dp)[trainer.grid.dp_rank]
    t0 = time.perf_counter()
    trainer.train_step([(mb[:, :-1], mb[:, 1:]) for mb in mine.split(1)])
    return time.perf_counter() - t0


def resume_phase(args) -> dict:
    """build_trainer's resume under the layout the checkpoint was saved with (dp NPROCS): its wall time."""
    dist.barrier()
    t0 = time.perf_counter()
    build_trainer(config(args, tp=1), os.path.join(args.out, "run"), resume=True)
    return {"resume_seconds": time.perf_counter() - t0}


def load_phase(args) -> dict:
    rec = {"load_peak": 0, "load_seconds": 0.0}

    def measured(method):  # the reading inside build_trainer's resume: its peak RSS and time
        def run(self, *a):
            reset_peak()
            t0 = time.perf_counter()
            method(self, *a)
            rec["load_seconds"] += time.perf_counter() - t0
            rec["load_peak"] = max(rec["load_peak"], peak_rss())
        return run
    sharded.ShardedState.load_model = measured(sharded.ShardedState.load_model)
    sharded.ShardedState.load_optimizer = measured(sharded.ShardedState.load_optimizer)
    reset_peak()
    t0 = time.perf_counter()
    trainer = build_trainer(config(args, tp=args.load_tp), os.path.join(args.out, "run"), resume=True)
    rec.update(resume_seconds=time.perf_counter() - t0, resume_peak=peak_rss())
    rec["train_peak"] = train(trainer, args.steps, args)
    return rec


def worker(args) -> None:
    init_distributed()
    rec = {"save": save_phase, "resume": resume_phase, "load": load_phase}[args.phase](args)
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, rec)
    if dist.get_rank() == 0:
        Path(args.out, f"{args.phase}.json").write_text(json.dumps(ranks, indent=1))


def launch(args, phase: str) -> list[dict]:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.nprocs), "--master_port",
           str(port), __file__, "--phase", phase, "--nprocs", str(args.nprocs), "--depth", str(args.depth),
           "--vocab-size", str(args.vocab_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--load-tp", str(args.load_tp), "--out", args.out]
    if subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL).returncode:
        raise RuntimeError(f"the {phase} launch failed (its output is above): {' '.join(cmd)}")
    return json.loads(Path(args.out, f"{phase}.json").read_text())


def state_bytes(config) -> int:
    """The training state's own size: fp32 weights plus their optimizer state (Muon one buffer, AdamW two)."""
    return sum(r * c * 4 * (1 + len(_STATE_KEYS[param_kind(name, torch.empty(r, c, device="meta"))]))
               for name, (r, c) in nanochat_shapes(config).items())


def checkpoint_table(args, save: list[dict], resume: list[dict], load: list[dict]) -> str:
    """One checkpoint's bytes against the state's own size, its save time, and the resume times."""
    own = state_bytes(GPTConfig.from_depth(args.depth, args.vocab_size, args.seq_len))
    written = save[0]["checkpoint_bytes"]
    n = args.nprocs
    return "\n".join([
        f"| checkpoint of d{args.depth} dp{n} | bytes written | / state's own size | save | resume dp{n} | "
        f"resume tp{args.load_tp} dp{n // args.load_tp} |", "| --- | --- | --- | --- | --- | --- |",
        f"| trainer.save | {written / GB:.3f} GB | {written / own:.2f} ({own / GB:.3f} GB) | "
        f"{max(s['checkpoint_seconds'] for s in save):.1f} s | {max(r['resume_seconds'] for r in resume):.1f} s | "
        f"{max(lo['resume_seconds'] for lo in load):.1f} s |", "",
        f"--async-save: staging copy {max(s['stage_seconds'] for s in save):.2f} s, "
        f"{max(s['staged_bytes'] for s in save) / GB:.3f} GB of host memory on the rank that holds the most; "
        f"training step while the save is written {max(s['step_during_save'] for s in save):.2f} s (slowest of "
        f"{min(s['steps_during_save'] for s in save)}), without a save {max(s['plain_step'] for s in save):.2f} s "
        f"(fastest of 3)"])


def table(args, save: list[dict], load: list[dict]) -> str:
    shapes = nanochat_shapes(GPTConfig.from_depth(args.depth, args.vocab_size, args.seq_len))
    largest = max(r * c for r, c in shapes.values()) * 4
    n = args.nprocs
    lines = [f"d{args.depth} ({sum(r * c for r, c in shapes.values()) / 1e6:.0f} M params, vocab {args.vocab_size}), "
             f"fp32, ZeRO-1, seq_len {args.seq_len}; largest tensor {largest / GB:.2f} GB. Peak RSS in GB "
             f"(x the rank's training-step peak).", "",
             f"| rank | train dp{n} | save | written | load as tp{args.load_tp} dp{n // args.load_tp} | "
             f"train tp{args.load_tp} dp{n // args.load_tp} |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r, (s, lo) in enumerate(zip(save, load)):
        lines.append(f"| {r} | {s['train_peak'] / GB:.2f} | {s['save_peak'] / GB:.2f} "
                     f"({s['save_peak'] / s['train_peak']:.2f}x) | {s['rank_bytes'] / GB:.3f} GB | "
                     f"{lo['load_peak'] / GB:.2f} ({lo['load_peak'] / lo['train_peak']:.2f}x) | "
                     f"{lo['train_peak'] / GB:.2f} |")
    written = [s["rank_bytes"] for s in save]
    lines += ["", f"Bytes written per rank, max / mean: {max(written) / (sum(written) / n):.2f}. Load (reading the "
                  f"slices, inside build_trainer's resume of {max(lo['resume_seconds'] for lo in load):.1f} s): "
                  f"{max(lo['load_seconds'] for lo in load):.1f} s."]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.phase:
        return worker(args)
    if args.nprocs % args.load_tp:
        raise ValueError(f"--load-tp {args.load_tp} does not divide --nprocs {args.nprocs}")
    os.makedirs(args.out, exist_ok=True)
    if os.listdir(args.out):
        raise FileExistsError(f"--out {args.out} is not empty: give a new directory")
    save = launch(args, "save")
    resume = launch(args, "resume")
    load = launch(args, "load")
    print(table(args, save, load))
    print()
    print(checkpoint_table(args, save, resume, load))


if __name__ == "__main__":
    cli.run(main)
