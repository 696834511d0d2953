"""megachat.trainer: one trainer for every phase (base, mid, SFT, RL): the GPT under DeepSpeed on the tp x pp x dp
grid, its train step, evaluation, checkpoints and resume.

- `TrainConfig`: what a run computes (saved in RUN_DIR/config.json and in every checkpoint).
- `build_trainer(cfg, run_dir, resume)`: checks the layout before any process group work, builds the grid, the
  model (`model.build_model`, from the init, from `weights`, or from a checkpoint saved under another layout), the
  optimizer (`optim.HybridOptimizer`) and DeepSpeed's engine: pp > 1 -> `pipeline.pipeline_module` under the
  PipelineEngine (ZeRO-0/1); pp = 1 -> the plain engine with `mpu=grid` (ZeRO-0..3). With resume each rank
  reads its slices of the checkpoint's layout-free state (megachat.sharded), whatever layout saved it.
- `Trainer.train_step(micro_batches)`: one optimizer step over this rank's micro-batches (x, y) [B, T], y = -1
  where a token is not trained; returns the loss averaged over the whole global batch (the same on every rank),
  the gradient norm, the schedule and the throughput.
- `Trainer.evaluate_bpb(batches, token_bytes)`: bits per byte through evaluation's forward (GridForward).
- `Trainer.save(step)`, `Trainer.save_weights(run_dir)`: checkpoints (megachat.checkpoint; background=True: written
  by a thread from a host copy while training goes on) and the final weights (RUN_DIR/model/), every rank writing
  its own slices; `Trainer.full_state_dict()` gathers the weights on rank 0
  (tests, small models).

DeepSpeed's public API is used here and in megachat/pipeline.py; its internals only in megachat/deepspeed_internals.py.
deepspeed is imported in the functions that use it: importing it takes seconds, which the planner and the tools
that only read TrainConfig should not pay.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megachat import checkpoint, deepspeed_internals, sharded
from megachat.evaluation.loss_eval import evaluate_bpb
from megachat.evaluation.model_eval import GridForward
from megachat.fileio import atomic_write_json
from megachat.model import GPT, Block, GPTConfig, build_model, flops_per_token, full_state_dict, nanochat_shapes
from megachat.model import num_params as model_num_params
from megachat.monitor import memory_gib, peak_flops
from megachat.optim import LEARNING_RATES, HybridOptimizer, learning_rates, lr_multiplier, muon_momentum, optimizer_stats
from megachat.parallel import Grid, check_layout, device, init_grid
from megachat.pipeline import pipeline_module, stage_layers
from megachat.tensor_parallel import FP8_INSTALL, padded_vocab_size, use_fp8
from megachat.watchdog import Watchdog

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "ds"


@dataclass
class TrainConfig:
    """Everything that decides what a run computes (saved as RUN_DIR/config.json, rebuilds the model)."""
    depth: int
    vocab_size: int
    seq_len: int
    device_batch_size: int
    total_batch_size: int  # tokens per optimizer step, over the whole grid
    num_iterations: int  # the schedule's horizon (warmdown is the last warmdown_ratio of it)
    tp: int = 1
    pp: int = 1
    zero: int = 1
    dtype: str = "bf16"  # "bf16" or "fp32"
    seed: int = 42
    n_kv_head: int | None = None
    grad_clip: float = 1.0
    warmdown_ratio: float = 0.2
    lr_scale: float = 1.0  # every base learning rate times this (nanochat's init_lr_frac: SFT 0.02, RL 0.05)
    activation_checkpointing: str = "none"  # "full" or "selective" recomputation (GPT.set_activation_checkpointing)
    compile: bool = False  # torch.compile each block (as nanochat compiles its model); eager under ZeRO-3
    ns_dtype: str = "bf16"  # Muon's Newton-Schulz compute dtype: bf16 as nanochat, whatever dtype; "fp32" on request
    sequence_parallel: bool = False  # Megatron's: norms and residual stream hold T / tp positions (tp > 1)
    fp8: bool = False  # the tp linears' GEMMs in fp8 through Transformer Engine (tensor_parallel.use_fp8)
    ds_config: str | None = None  # a DeepSpeed JSON to use instead of configs/ds/zero{Z}_{dtype}.json

    def model_config(self) -> GPTConfig:
        return GPTConfig.from_depth(self.depth, self.vocab_size, self.seq_len, n_kv_head=self.n_kv_head)

    @property
    def global_batch(self) -> int:
        """Samples (sequences) per optimizer step."""
        return self.total_batch_size // self.seq_len

    def to_json(self) -> dict:
        return asdict(self)


def add_trainer_args(p, device_batch_size: int = 32, eval_every: int = 250) -> None:
    """The flags every training script shares (layout, precision, seed, evaluation and checkpoint cadence, run
    directory, resume) on argparse parser `p`."""
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage 0-3 (bf16 needs >= 1; pp > 1 allows 0/1)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device-batch-size", type=int, default=device_batch_size, help="sequences per rank per micro-step")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-every", type=int, default=eval_every, help="evaluate every N steps (and at start and end)")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (always at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="keep the newest K checkpoints")
    p.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background: a copy of the state in host memory, written while "
                        "training goes on; `latest` switches once every rank's files are on disk")
    p.add_argument("--resume", nargs="?", const="always", choices=["always", "auto"], default=None,
                   help="continue from RUN_DIR/checkpoints/latest; 'auto': when there is one, else start fresh "
                        "(a requeue loop needs no logic)")
    p.add_argument("--activation-checkpointing", choices=["none", "full", "selective"], default="none",
                   help="recompute activations in backward: every block's (full) or the attention core's (selective)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="split the sequence over the tp ranks outside attention and MLP (Megatron's sequence "
                        "parallelism: tp x less activation memory there, same communication volume); needs --tp > 1")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block (eager under ZeRO-3)")
    p.add_argument("--fp8", action="store_true",
                   help="the tensor-parallel linears' GEMMs in fp8 (NVIDIA Transformer Engine, delayed scaling; GPU)")
    p.add_argument("--ns-dtype", choices=["bf16", "fp32"], default="bf16",
                   help="Muon's Newton-Schulz compute dtype: bf16 as nanochat whatever --dtype is; fp32 for exact "
                        "arithmetic (the layout-equivalence tests)")
    p.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many steps in a row with a non-finite loss or gradient (each is skipped)")
    p.add_argument("--collective-timeout", type=float, default=None,
                   help="seconds a step (or any collective) may wait for a lost rank before the job ends naming it "
                        "(default: max(60, 10 x the slowest step), 600 for the first steps, evaluations and saves; "
                        "megachat/watchdog.py)")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON instead of configs/ds/zero{Z}_{dtype}.json")
    p.add_argument("--out", required=True, help="RUN_DIR")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher adds it


def config_options(args) -> dict:
    """The TrainConfig fields that add_trainer_args' flags give: layout, precision, seed, DeepSpeed JSON and the
    memory and speed switches (every phase passes them through unchanged)."""
    return dict(tp=args.tp, pp=args.pp, zero=args.zero, dtype=args.dtype, seed=args.seed, ds_config=args.ds_config,
                activation_checkpointing=args.activation_checkpointing, compile=args.compile,
                sequence_parallel=args.sequence_parallel, ns_dtype=args.ns_dtype, fp8=args.fp8)


def loop_options(args) -> dict:
    """Trainer.fit's cadence and limits from add_trainer_args' flags."""
    return dict(eval_every=args.eval_every, save_every=args.save_every, keep=args.keep_checkpoints,
                max_bad_steps=args.max_bad_steps, collective_timeout=args.collective_timeout,
                async_save=args.async_save)


def config_from_run(run_cfg: dict, **settings) -> TrainConfig:
    """A TrainConfig that continues the model of a finished run (its config.json as a dict: "model" gives depth,
    vocabulary and KV heads); `settings` give the rest (seq_len, batch, layout, schedule, ...)."""
    model = run_cfg["model"]
    cfg = TrainConfig(depth=model["n_layer"], vocab_size=model["vocab_size"], n_kv_head=model["n_kv_head"],
                      **settings)
    want = {**model, "sequence_len": cfg.seq_len}
    if vars(cfg.model_config()) != want:
        raise ValueError(f"the run's model {model} is not nanochat's sizing for depth {model['n_layer']} "
                         f"({vars(cfg.model_config())}): megachat trains depth-sized models only")
    return cfg


def check_config(cfg: TrainConfig, world: int) -> int:
    """Every layout and setting error, raised as ValueError before any process group work; returns dp."""
    if cfg.dtype not in ("bf16", "fp32"):
        raise ValueError(f"--dtype {cfg.dtype!r} is not supported: use bf16 or fp32")
    if cfg.zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero {cfg.zero} is not a ZeRO stage: use 0, 1, 2 or 3")
    if cfg.dtype == "bf16" and cfg.zero == 0:
        raise ValueError("--dtype bf16 needs --zero >= 1: DeepSpeed keeps fp32 master weights and fp32 gradient "
                         "accumulation for bf16 only in its ZeRO optimizers (ZeRO-1 on one data-parallel rank "
                         "shards nothing, so it costs what ZeRO-0 would); use --zero 1, or --dtype fp32")
    if cfg.activation_checkpointing not in ("none", "full", "selective"):
        raise ValueError(f"--activation-checkpointing {cfg.activation_checkpointing!r}: use none, full or selective")
    if cfg.ns_dtype not in ("bf16", "fp32"):
        raise ValueError(f"ns_dtype {cfg.ns_dtype!r} is not a Newton-Schulz compute dtype: use bf16 (nanochat's, "
                         f"the default) or fp32 (--ns-dtype fp32)")
    if cfg.fp8:
        if cfg.dtype != "bf16" or cfg.sequence_parallel or cfg.activation_checkpointing != "none":
            raise ValueError("--fp8 runs the tensor-parallel linears' GEMMs in fp8 around bf16 weights: use it with "
                             "--dtype bf16, without --sequence-parallel and --activation-checkpointing")
        if importlib.util.find_spec("transformer_engine") is None:
            raise ValueError(FP8_INSTALL)
    if cfg.sequence_parallel and cfg.tp == 1:
        raise ValueError("--sequence-parallel splits the sequence over tensor-parallel ranks: it needs --tp > 1")
    if cfg.sequence_parallel and cfg.seq_len % cfg.tp:
        raise ValueError(f"--sequence-parallel splits the {cfg.seq_len} positions of a sequence over --tp {cfg.tp} "
                         f"ranks: use a --max-seq-len divisible by {cfg.tp}")
    if cfg.total_batch_size % cfg.seq_len:
        raise ValueError(f"--total-batch-size {cfg.total_batch_size} is not a multiple of --max-seq-len "
                         f"{cfg.seq_len}: the global batch is a whole number of sequences")
    mc = cfg.model_config()
    return check_layout(world, cfg.tp, cfg.pp, zero_stage=cfg.zero, n_layer=mc.n_layer, n_head=mc.n_head,
                        n_kv_head=mc.n_kv_head, vocab_size=padded_vocab_size(mc.vocab_size, cfg.tp),
                        total_batch_size=cfg.total_batch_size, device_batch_size=cfg.device_batch_size,
                        seq_len=cfg.seq_len)


def check_ds_config(conf: dict, cfg: TrainConfig, path) -> None:
    """What a user's DeepSpeed JSON must leave to megachat: the optimizer and schedule (Muon + AdamW is passed to
    DeepSpeed as a client optimizer), gradient clipping (megachat clips by the true global norm over tp / pp / dp:
    TrainConfig.grad_clip) and the precision, which --dtype sets (the model is built in it)."""
    for key in ("optimizer", "scheduler"):
        if key in conf:
            raise ValueError(f"DeepSpeed config {path} sets {key!r}, but megachat passes its own optimizer and "
                             f"schedule (Muon + AdamW); remove the {key!r} section")
    if "gradient_clipping" in conf:
        raise ValueError(f"DeepSpeed config {path} sets gradient_clipping {conf['gradient_clipping']}, but megachat "
                         f"clips by the global gradient norm over the whole grid itself (grad_clip "
                         f"{cfg.grad_clip} in this run's TrainConfig); remove gradient_clipping from the file")
    if conf.get("fp16", {}).get("enabled"):
        raise ValueError(f"DeepSpeed config {path} enables fp16, which megachat does not train in; remove the fp16 "
                         f"section and use --dtype bf16 or fp32")
    if bool(conf.get("bf16", {}).get("enabled")) != (cfg.dtype == "bf16"):
        raise ValueError(f"DeepSpeed config {path} {'enables' if cfg.dtype != 'bf16' else 'does not enable'} bf16 "
                         f"but --dtype is {cfg.dtype}; make them agree (bf16: {{\"bf16\": {{\"enabled\": true}}}})")


def ds_config(cfg: TrainConfig, dp: int) -> dict:
    """The DeepSpeed config: configs/ds/zero{Z}_{dtype}.json (or cfg.ds_config) with the batch filled in."""
    path = Path(cfg.ds_config) if cfg.ds_config else CONFIG_DIR / f"zero{cfg.zero}_{cfg.dtype}.json"
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} not found: pass --ds-config PATH or restore configs/ds/")
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON ({e}); fix the file") from None
    check_ds_config(conf, cfg, path)
    conf.update(train_batch_size=cfg.global_batch, train_micro_batch_size_per_gpu=cfg.device_batch_size,
                gradient_accumulation_steps=cfg.global_batch // (cfg.device_batch_size * dp),
                gradient_clipping=0.0)  # DeepSpeed's own clipping off: megachat's step clips (check_ds_config)
    zero = conf.setdefault("zero_optimization", {})
    zero["stage"] = cfg.zero
    if cfg.sequence_parallel:  # each tp rank sends its own sequence shard: not the same tensor split tp ways
        conf["pipeline"] = {**conf.get("pipeline", {}), "pipe_partitioned": False, "grad_partitioned": False}
    n = num_params(cfg)
    if cfg.zero == 3:  # Muon steps every parameter of a stage at once: one ZeRO-3 sub group must hold them all
        zero["sub_group_size"] = max(int(zero.get("sub_group_size", 1e9)), n + 1)
    if cfg.zero >= 1:
        for key, value in zero_buckets(cfg.zero, n, largest_layer(cfg)).items():
            zero.setdefault(key, value)  # what the JSON sets wins
    return conf


def zero_buckets(zero: int, model_numel: int, layer_numel: int) -> dict:
    """DeepSpeed's gradient bucket and ZeRO-3 gathering limits (elements) sized from the model: what ds_config fills
    in where the JSON leaves them out, and what megachat.planner plans with. DeepSpeed's defaults (reduce_bucket_size
    5e8, stage3_max_live_parameters and stage3_max_reuse_distance 1e9) suit models of billions of parameters; below
    that one bucket stages every gradient of a backward at once and ZeRO-3 keeps every weight it gathered for forward
    until its backward, so ZeRO-2 and ZeRO-3 held more than ZeRO-1 (docs/scaling.md, "ZeRO memory, measured").
    ZeRO-1 keeps whole gradients anyway: a bucket of at most the model. ZeRO-2/3 stage one layer (the largest of
    GPT.layers()) at a time; ZeRO-3 prefetches one layer, keeps at most two gathered, and keeps a gathered weight
    only when it is used again within one layer (the LM head, whose backward follows its forward)."""
    if zero == 1:
        return {"reduce_bucket_size": min(500_000_000, model_numel)}
    out = {"reduce_bucket_size": min(500_000_000, layer_numel)}
    if zero == 3:
        out.update(stage3_prefetch_bucket_size=layer_numel, stage3_max_live_parameters=2 * layer_numel,
                   stage3_max_reuse_distance=layer_numel)
    return out


def largest_layer(cfg: TrainConfig) -> int:
    """Elements of the largest entry of GPT.layers() (embedding, a block or the LM head) of the unsharded model."""
    with torch.device("meta"):
        return max(sum(p.numel() for p in layer.parameters())
                   for layer in GPT(cfg.model_config(), grid=Grid()).layers())


def newton_schulz_dtype(cfg: TrainConfig) -> torch.dtype:
    """Muon's Newton-Schulz compute dtype: bf16 for every run, as nanochat (whose Muon always runs it in bf16), unless
    cfg.ns_dtype is "fp32" (what the layout-equivalence tests compare exactly; 3.5x the optimizer's time on a CPU)."""
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.ns_dtype]


def model_flops_per_token(cfg: TrainConfig) -> float:
    """Model FLOPs per token of the whole (unsharded) model (model.flops_per_token)."""
    return float(flops_per_token(cfg.model_config()))


def num_params(cfg: TrainConfig) -> int:
    """Parameters of the whole (unsharded) model."""
    return model_num_params(cfg.model_config())


@dataclass
class Trainer:
    cfg: TrainConfig
    grid: Grid
    model: torch.nn.Module  # the GPT (with pp > 1 only this stage's layers are materialized, the rest is meta)
    ds_engine: object  # DeepSpeed's DeepSpeedEngine or PipelineEngine (not megachat's inference engine)
    device: torch.device
    ckpt_dir: str | None = None
    step: int = 0  # optimizer steps taken (after a resume: the checkpoint's): the one step counter
    flops_per_token: float = 0.0  # model_flops_per_token(cfg)
    optimizer: object = None  # the HybridOptimizer DeepSpeed steps (megachat.optim), which train_step schedules
    save_group: object = None  # the process group of asynchronous saves (enable_async_save)
    _writer: threading.Thread | None = None  # the asynchronous save being written
    _writer_error: list = field(default_factory=list)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.cfg.global_batch // (self.cfg.device_batch_size * self.grid.dp)

    @property
    def layout(self) -> dict:
        return {"tp": self.cfg.tp, "pp": self.cfg.pp, "dp": self.grid.dp, "zero": self.cfg.zero}

    def train_step(self, micro_batches) -> dict:
        """One optimizer step over this rank's `grad_accum` micro-batches: (x, y) long [B, T] with y = -1 where a
        token is not trained, or (x, y, w) with per-token weights w fp32 [B, T] (RL's advantages). The loss is
        sum(w * cross-entropy) / (trained tokens of the whole global batch): every trained token weighs the same
        across micro-batches and dp ranks, exactly as one process holding the global batch would weigh it (for
        packed pretraining data, the mean of the micro-batch means). Returns loss (the same on every rank),
        grad_norm (before clipping), lrm (the schedule's multiplier this step), lr (the block matrices' lr) and
        the throughput. In order: this step's schedule onto the optimizer; forward and backward over the
        micro-batches, DeepSpeed reducing the gradients over dp and, after the last micro-batch, running the optimizer
        step (HybridOptimizer.step: the global gradient norm over tp / pp / dp and clipping, then Muon and AdamW);
        then the schedule's step (self.step + 1)."""
        t0 = time.perf_counter()
        lrm = lr_multiplier(self.step, self.cfg.num_iterations, warmdown_ratio=self.cfg.warmdown_ratio)
        self.optimizer.set_schedule(self.step, lrm, muon_momentum(self.step))
        batches = [tuple(t.to(self.device) for t in mb) for mb in micro_batches]
        if len(batches) != self.grad_accum:
            raise ValueError(f"train_step got {len(batches)} micro-batches, the config needs {self.grad_accum} "
                             f"(global batch / (device batch x dp))")
        trained = torch.stack([(mb[1] >= 0).sum() for mb in batches]).sum().float()
        dist.all_reduce(trained, group=self.grid.dp_group)  # every pipeline stage counts the same samples
        if trained.item() == 0:
            raise ValueError("a global batch without a single trained token (every target is -1): check the "
                             "data's masks")
        scale = self.grad_accum * self.grid.dp / trained  # DeepSpeed averages over micro-batches and dp ranks
        weighted = [(x, (y, (y >= 0).float() * scale * (rest[0] if rest else 1.0))) for x, y, *rest in batches]
        if self.cfg.pp > 1:
            loss = self.ds_engine.train_batch(data_iter=iter(weighted)).detach().float()
        else:
            loss = torch.zeros((), device=self.device)
            for x, y in weighted:
                micro_loss = self.ds_engine(x, y)
                self.ds_engine.backward(micro_loss)
                self.ds_engine.step()
                loss += micro_loss.detach().float()
            loss /= self.grad_accum
            dist.all_reduce(loss, group=self.grid.dp_group)
            loss /= self.grid.dp
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        loss = loss.item()
        self.step += 1  # the schedule's step
        stats = optimizer_stats(self.ds_engine)
        tokens_per_s = self.cfg.total_batch_size / dt
        flops_per_s = self.flops_per_token * tokens_per_s
        rec = {"loss": loss, "lr": learning_rates(self.cfg.model_config().n_embd)["matrix"] * self.cfg.lr_scale * lrm,
               "lrm": lrm,
               "grad_norm": stats["grad_norm"], "tokens_per_s": tokens_per_s, "model_flops_per_s": flops_per_s,
               "step_time_s": dt, "memory_gib": memory_gib()}
        if stats["skipped"] or not math.isfinite(loss):
            rec["skipped"] = 1  # a non-finite loss or gradient norm: HybridOptimizer changed nothing
        peak = peak_flops(self.cfg.dtype)
        if peak:
            rec["mfu"] = flops_per_s / (peak * self.grid.world)
        return rec

    def fit(self, batches, evaluate=None, *, monitor=None, eval_every: int = 0, save_every: int = 0,
            keep: int = 3, max_bad_steps: int = 10, spike_factor: float = 5.0,
            collective_timeout: float | None = None, async_save: bool = False) -> None:
        """The loop of every phase, from self.step to cfg.num_iterations. batches(i): this rank's micro-batches of
        global batch i (0-based; a pure function of i, so a resume continues the same stream). evaluate(step):
        a dict of metrics, run at step 0 of a fresh start, every eval_every steps and at the end. A checkpoint
        every save_every steps and at the end. Every record goes to `monitor` (megachat.monitor.Monitor) and a line
        to stdout on rank 0. What clusters do to runs:
        - SIGTERM / SIGUSR1 (a scheduler's notice before the kill): every rank finishes its step, the step is
          checkpointed, and the process exits 0 (SystemExit); `--resume auto` continues it.
        - A bad step (non-finite loss or gradient norm) changes nothing and is logged; max_bad_steps of them in a
          row stop the run naming the last good checkpoint.
        - A loss above spike_factor x the median of the last 50 is logged with the global sample numbers of its
          batch (samples (step - 1) * global_batch ... step * global_batch - 1), to look at with
          tools/inspect_data.py.
        - A lost rank (dead or stalled): megachat.watchdog ends every rank within collective_timeout (None: sized
          from the measured steps), naming the rank, the step and the checkpoint to resume from."""
        talk = dist.get_rank() == 0
        stop = []
        handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                    for sig in (signal.SIGTERM, signal.SIGUSR1)}

        def run_eval(step):
            if evaluate is not None:
                metrics = evaluate(step)
                if monitor is not None:
                    monitor.log(step, **metrics)
                if talk and metrics:
                    print(f"step {step:6d} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)

        if async_save:
            self.enable_async_save()
        last, bad, recent = self.cfg.num_iterations, 0, []
        dog = Watchdog(os.path.dirname(self.ckpt_dir) if self.ckpt_dir else None, dist.get_rank(),
                       dist.get_world_size(), collective_timeout)
        dog.start()
        start = self.step
        try:
            if self.step == 0:
                dog.beat(0, slow=True)
                run_eval(0)
            for step in range(start + 1, last + 1):  # global batch step-1; after it, `step` steps are done
                dog.beat(step)
                rec = self.train_step(batches(step - 1))
                bad = bad + 1 if rec.get("skipped") else 0
                median = sorted(recent)[len(recent) // 2] if len(recent) >= 10 else None
                if not bad and median is not None and rec["loss"] > spike_factor * median:
                    rec["spike"] = 1
                    if talk:
                        G = self.cfg.global_batch
                        print(f"step {step}: loss spike {rec['loss']:.4f} > {spike_factor} x median {median:.4f}; the "
                              f"batch is global samples {(step - 1) * G}..{step * G - 1}", flush=True)
                if not bad:
                    recent = (recent + [rec["loss"]])[-50:]
                if monitor is not None:
                    monitor.log(step, **rec)
                if talk:
                    print(f"step {step:6d}/{last} | loss {rec['loss']:.6f} | grad norm {rec['grad_norm']:.3f} | "
                          f"lrm {rec['lrm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s | {rec['step_time_s'] * 1000:.0f} "
                          f"ms" + (" | skipped: non-finite loss or gradient" if bad else ""), flush=True)
                if bad >= max_bad_steps:
                    latest = checkpoint.latest_tag(self.ckpt_dir) if self.ckpt_dir and os.path.isdir(self.ckpt_dir) \
                        else None
                    raise FloatingPointError(
                        f"loss is {rec['loss']} at step {step}: {bad} bad step(s) in a row, each skipped "
                        f"(--max-bad-steps {max_bad_steps}): training diverged; no checkpoint was written for it (latest intact "
                        f"checkpoint: {os.path.join(self.ckpt_dir, latest) if latest else 'none'}); lower the "
                        f"learning rate or check the data, then --resume")
                if step != last and eval_every > 0 and step % eval_every == 0:
                    dog.beat(step, slow=True)
                    run_eval(step)
                if step != last and save_every > 0 and step % save_every == 0 and not bad:
                    dog.beat(step, slow=True)
                    # not during a run of bad steps: the last good one stays in charge
                    self.save(step, keep=keep, background=async_save)
                if step != last and self._stop_requested(stop):
                    self.save(step, keep=keep)
                    if talk:
                        print(f"step {step}: stopping on a signal; checkpoint saved, continue with --resume auto",
                              flush=True)
                    dist.barrier()
                    raise SystemExit(0)
            if start < last:
                dog.beat(last, slow=True)
                run_eval(last)
                self.save(last, keep=keep)
        except BaseException as error:
            dog.failed(error)  # a collective failed because a rank was lost: reports it and exits
            raise
        finally:
            dog.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _stop_requested(self, stop: list) -> bool:
        """Whether any rank got a stop signal (all ranks agree: one tiny all-reduce per step)."""
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def write_run_config(self, run_dir: str, **extra) -> None:
        """RUN_DIR/config.json (rank 0): the training config, the model's, the grid, and `extra` (phase, tokenizer,
        data, parent run, ...), which scripts/report.py and the chat scripts read; RUN_DIR/env.json: where it ran."""
        if dist.get_rank() != 0:
            return
        import deepspeed

        os.makedirs(run_dir, exist_ok=True)
        atomic_write_json(os.path.join(run_dir, "config.json"),
                          {"train": self.cfg.to_json(), "model": vars(self.cfg.model_config()), "dp": self.grid.dp,
                           "world": self.grid.world, "num_params": num_params(self.cfg),
                           "flops_per_token": self.flops_per_token, **extra})
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        atomic_write_json(os.path.join(run_dir, "env.json"),
                          {"hostname": socket.gethostname(), "platform": platform.platform(),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "deepspeed": deepspeed.__version__, "cuda": torch.version.cuda, "gpus": gpus,
                           "cpu_count": os.cpu_count(), "world": self.grid.world})

    def finish(self, run_dir: str, monitor=None) -> None:
        """The end of every phase: the final weights into RUN_DIR/model/, the monitor closed, the process group
        left together (collective)."""
        self.wait_for_save()
        self.save_weights(run_dir)
        if monitor is not None:
            monitor.close()
        dist.barrier()
        dist.destroy_process_group()

    def save_weights(self, run_dir: str) -> None:
        """RUN_DIR/model/: the final fp32 weights under nanochat's names, every rank writing its own slices in
        parallel (megachat.sharded; collective). checkpoint.load_weights reads them, tools/export_checkpoint.py
        turns them into one safetensors file or a nanochat checkpoint."""
        sharded.save(os.path.join(run_dir, checkpoint.WEIGHTS_DIR), self.ds_engine, self.cfg.model_config(),
                     self.step, self.layout, optimizer=False)

    def evaluate_bpb(self, batches, token_bytes: torch.Tensor) -> float:
        """Bits per byte over this rank's evaluation batches (x, y), summed over the grid: the same forward and
        formula as base_eval (evaluation.model_eval.GridForward, evaluation.loss_eval.evaluate_bpb)."""
        fwd = GridForward(self.model, self.grid)
        return evaluate_bpb(fwd.token_loss, ((x.to(self.device), y.to(self.device)) for x, y in batches),
                            token_bytes)

    def save(self, step: int, keep: int = 3, background: bool = False) -> str:
        """Checkpoint the state after `step` optimizer steps into ckpt_dir (collective): the layout-free state
        (step_NNNNNN/state/, each rank writing its own slices), which a resume under any layout reads. background
        (after enable_async_save): copy this rank's state into host memory and return; a thread writes and fsyncs
        it and switches `latest` last, on a process group of its own, while training goes on (wait_for_save)."""
        self.wait_for_save()  # one save at a time, in order
        meta = {"step": step, "consumed_samples": step * self.cfg.global_batch, "layout": self.layout,
                "config": self.cfg.to_json()}
        if not background:
            return checkpoint.save(self.ds_engine, self.ckpt_dir, step, meta, self.cfg.model_config(), keep=keep)
        staged = sharded.stage(self.ds_engine, nanochat_shapes(self.cfg.model_config()), optimizer=True, copy=True)
        self.staged_bytes = sum(v.numel() * v.element_size() for *_, v in staged.values())

        def write():
            try:
                checkpoint.save(self.ds_engine, self.ckpt_dir, step, meta, self.cfg.model_config(), keep=keep,
                                staged=staged, group=self.save_group)
            except BaseException as e:  # raised in the training thread by wait_for_save
                self._writer_error.append(e)
        self._writer = threading.Thread(target=write, name=f"save-{step}", daemon=True)
        self._writer.start()
        return checkpoint.tag_for(step)

    def enable_async_save(self) -> None:
        """Create the process group asynchronous saves communicate on (collective: every rank calls it), so that
        their collectives never interleave with training's."""
        if self.save_group is None:
            self.save_group = dist.new_group(backend="gloo")

    def wait_for_save(self) -> None:
        """Wait until the asynchronous save in flight (if any) is on disk and `latest` names it; raise its error."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._writer_error:
            raise self._writer_error.pop()

    def full_state_dict(self) -> dict | None:
        """Unsharded weights (the model's, as fp32) under nanochat's names on rank 0 (None elsewhere); collective
        over the world. The whole model goes to rank 0: for tests and small models; checkpoints and the final
        weights are written by every rank without it (save, save_weights)."""
        import deepspeed
        if self.cfg.zero == 3:
            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                sd = full_state_dict(self.model)
        else:
            sd = full_state_dict(self.model)
        # with pp > 1 each stage holds its own layers (the rest of the GPT is on meta): one rank per stage sends
        first_of_stage = self.grid.tp_rank == 0 and self.grid.dp_rank == 0
        return _gather_on_rank0({k: v.float().cpu() for k, v in sd.items()} if first_of_stage else {})


def _gather_on_rank0(part: dict) -> dict | None:
    """The union of every rank's dict on rank 0, None elsewhere."""
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(part, out, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for p in out:
        merged.update(p)
    return merged


def build_trainer(cfg: TrainConfig, run_dir: str | None = None, resume: bool | str = False,
                  weights: dict | None = None) -> Trainer:
    """Check the layout, build the grid, the model, the optimizer and DeepSpeed's engine for this process.
    run_dir: where checkpoints go (RUN_DIR/checkpoints). resume: continue from its newest complete checkpoint
    (refused when there is none; "auto": when there is one, else start fresh); without it, a run_dir that already holds a run is refused (a fresh start would
    prune its checkpoints and overwrite its weights). weights: full weights (nanochat names) to start from."""
    import deepspeed
    world = dist.get_world_size() if dist.is_initialized() else 1
    dp = check_config(cfg, world)  # before any process-group work
    ckpt_dir = os.path.join(run_dir, "checkpoints") if run_dir else None
    layout = {"tp": cfg.tp, "pp": cfg.pp, "dp": dp, "zero": cfg.zero}
    start, state = 0, None
    if resume == "auto":  # resume when there is something to resume, else a fresh start
        resume = bool(ckpt_dir and os.path.isdir(ckpt_dir) and checkpoint.latest_tag(ckpt_dir))
    if run_dir and not resume:
        earlier = [f for f in ("checkpoints/latest", "model/index.json")
                   if os.path.exists(os.path.join(run_dir, f))]
        if earlier:
            raise FileExistsError(f"{run_dir} already holds a run ({', '.join(earlier)}): pass --resume to continue "
                                  f"it, or choose another --out (delete the directory to start over)")
    if resume:
        tag = checkpoint.latest_tag(ckpt_dir) if ckpt_dir else None
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
        state = checkpoint.layout_free_state(ckpt_dir, tag)
    grid = init_grid(cfg.tp, cfg.pp)
    dev = device()
    model = build_model(cfg.model_config(), grid, dev, weights=weights, seed=cfg.seed,
                        dtype=torch.bfloat16 if cfg.dtype == "bf16" else None)  # DeepSpeed would cast it anyway
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    model.set_sequence_parallel(cfg.sequence_parallel)
    if cfg.fp8:
        use_fp8(model, grid)
    if cfg.compile and cfg.zero == 3:  # ZeRO-3 gathers each weight in hooks around every module's forward
        if dist.get_rank() == 0:
            print("--compile: ZeRO-3 fetches weights in module hooks that torch.compile cannot trace; running eager",
                  flush=True)
    elif cfg.compile:
        for layer in stage_layers(model, grid):  # this stage's blocks, compiled in place (same parameters)
            if isinstance(layer, Block):
                layer.compile(dynamic=False)
    if state is not None:
        state.load_model(model)  # this rank's tp shards, fp32, before DeepSpeed casts and partitions them
    named = [(n, p) for n, p in model.named_parameters() if not p.is_meta]
    rates = {f"{kind}_lr": lr * cfg.lr_scale for kind, lr in LEARNING_RATES.items()}
    optimizer = HybridOptimizer(named, grid, n_embd=cfg.model_config().n_embd, **rates, max_grad_norm=cfg.grad_clip,
                                ns_dtype=newton_schulz_dtype(cfg))
    deepspeed_internals.without_shm_allreduce()
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts init_distributed's process group
    engine, _, _, _ = deepspeed.initialize(model=pipeline_module(model, grid) if cfg.pp > 1 else model,
                                           optimizer=optimizer, config=ds_config(cfg, dp),
                                           mpu=None if cfg.pp > 1 else grid)
    if world == 1 and cfg.zero == 0:
        deepspeed_internals.skip_single_rank_allreduce(engine)
    if cfg.dtype == "fp32" and cfg.zero >= 1:
        deepspeed_internals.share_fp32_master(engine.optimizer)
    trainer = Trainer(cfg=cfg, grid=grid, model=model, ds_engine=engine, optimizer=optimizer, device=dev,
                      ckpt_dir=ckpt_dir, step=start, flops_per_token=model_flops_per_token(cfg))
    if state is not None:
        state.load_optimizer(engine)  # this rank's pieces of the fp32 master weights and optimizer state
        if dist.get_rank() == 0 and meta["layout"] != layout:
            print(f"resumed step {start} saved under {meta['layout']} in layout {layout}", flush=True)
    return trainer
