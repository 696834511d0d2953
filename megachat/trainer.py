"""megachat.trainer: one trainer for every phase (base, mid, SFT, RL): the GPT under DeepSpeed on the tp x pp x dp
grid, its train step, evaluation, checkpoints and resume.

- `TrainConfig`: what a run computes (saved in RUN_DIR/config.json and in every checkpoint).
- `build_trainer(cfg, run_dir, resume)`: checks the layout before any process group work, builds the grid, the
  model (`model.build_model`, from the init, from `weights`, or from a checkpoint saved under another layout), the
  optimizer (`optim.HybridOptimizer`) and DeepSpeed's engine: pp > 1 -> `pipeline.pipeline_module` under the
  PipelineEngine (ZeRO-0/1); pp = 1 -> the plain engine with `mpu=grid` (ZeRO-0..3). With resume it decides
  how to continue: same layout -> DeepSpeed's own files; another layout -> the layout-free full state.
- `Trainer.train_step(micro_batches)`: one optimizer step over this rank's micro-batches (x, y) [B, T], y = -1
  where a token is not trained; returns the loss averaged over the whole global batch (the same on every rank),
  the gradient norm, the schedule and the throughput.
- `Trainer.evaluate_bpb(batches, token_bytes)`: bits per byte through evaluation's forward (GridForward).
- `Trainer.save(step)`, `Trainer.full_state_dict()`: checkpoints (megachat.checkpoint) and the final weights.

DeepSpeed is imported here and in megachat/pipeline.py only.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megachat import checkpoint
from megachat.model import GPT, GPTConfig, build_model, full_state_dict
from megachat.monitor import memory_gib, peak_flops
from megachat.parallel import Grid, check_layout, device, init_grid, without_deepspeed_shm_allreduce

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
    ds_config: str | None = None  # a DeepSpeed JSON to use instead of configs/ds/zero{Z}_{dtype}.json

    def model_config(self) -> GPTConfig:
        return GPTConfig.from_depth(self.depth, self.vocab_size, self.seq_len, n_kv_head=self.n_kv_head)

    @property
    def global_batch(self) -> int:
        """Samples (sequences) per optimizer step."""
        return self.total_batch_size // self.seq_len

    def to_json(self) -> dict:
        return asdict(self)


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
    if cfg.total_batch_size % cfg.seq_len:
        raise ValueError(f"--total-batch-size {cfg.total_batch_size} is not a multiple of --max-seq-len "
                         f"{cfg.seq_len}: the global batch is a whole number of sequences")
    from megachat.tensor_parallel import padded_vocab_size
    mc = cfg.model_config()
    return check_layout(world, cfg.tp, cfg.pp, zero_stage=cfg.zero, n_layer=mc.n_layer, n_head=mc.n_head,
                        n_kv_head=mc.n_kv_head, vocab_size=padded_vocab_size(mc.vocab_size, cfg.tp),
                        total_batch_size=cfg.total_batch_size, device_batch_size=cfg.device_batch_size,
                        seq_len=cfg.seq_len)


def check_ds_config(conf: dict, cfg: TrainConfig, path) -> None:
    """What a user's DeepSpeed JSON must leave to megachat: the optimizer and schedule (Muon + AdamW is passed to
    DeepSpeed as a client optimizer) and the precision, which --dtype sets (the model is built in it)."""
    for key in ("optimizer", "scheduler"):
        if key in conf:
            raise ValueError(f"DeepSpeed config {path} sets {key!r}, but megachat passes its own optimizer and "
                             f"schedule (Muon + AdamW); remove the {key!r} section")
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
                gradient_clipping=0.0)  # HybridOptimizer clips inside its step by the true global norm
    conf.setdefault("zero_optimization", {})["stage"] = cfg.zero
    return conf


def model_flops_per_token(cfg: TrainConfig) -> float:
    """Model FLOPs per token of the whole (unsharded) model: 6 * (params - embedding) + attention."""
    with torch.device("meta"):
        return float(GPT(cfg.model_config(), grid=Grid()).estimate_flops())


def num_params(cfg: TrainConfig) -> int:
    with torch.device("meta"):
        return GPT(cfg.model_config(), grid=Grid()).num_params()


@dataclass
class Trainer:
    cfg: TrainConfig
    grid: Grid
    model: torch.nn.Module  # the GPT (with pp > 1 only this stage's layers are materialized, the rest is meta)
    ds_engine: object  # DeepSpeed's DeepSpeedEngine or PipelineEngine (not megachat's inference engine)
    device: torch.device
    ckpt_dir: str | None = None
    step: int = 0  # optimizer steps taken (after a resume: the checkpoint's)
    flops_per_token: float = 0.0  # model_flops_per_token(cfg)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.cfg.global_batch // (self.cfg.device_batch_size * self.grid.dp)

    @property
    def layout(self) -> dict:
        return {"tp": self.cfg.tp, "pp": self.cfg.pp, "dp": self.grid.dp, "zero": self.cfg.zero}

    def train_step(self, micro_batches) -> dict:
        """One optimizer step over this rank's `grad_accum` micro-batches (x, y) long [B, T] (y = -1: not
        trained). Returns loss (mean over the global batch, the same on every rank), grad_norm (before
        clipping), lrm (the schedule's multiplier this step), lr (the block matrices' lr) and the throughput.
        A non-finite loss raises FloatingPointError naming the checkpoint still in charge."""
        from megachat.optim import learning_rates, lr_multiplier, optimizer_stats
        t0 = time.perf_counter()
        batches = ((x.to(self.device), y.to(self.device)) for x, y in micro_batches)
        if self.cfg.pp > 1:
            loss = self.ds_engine.train_batch(data_iter=batches).detach().float()
        else:
            loss = torch.zeros((), device=self.device)
            for x, y in batches:
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
        lrm = lr_multiplier(self.step, self.cfg.num_iterations, warmdown_ratio=self.cfg.warmdown_ratio)
        self.step += 1
        if not math.isfinite(loss):
            last = checkpoint.latest_tag(self.ckpt_dir) if self.ckpt_dir and os.path.isdir(self.ckpt_dir) else None
            raise FloatingPointError(
                f"loss is {loss} at step {self.step}: training diverged; no checkpoint was written for it "
                f"(latest intact checkpoint: {os.path.join(self.ckpt_dir, last) if last else 'none'}); lower the "
                f"learning rate or check the data, then --resume")
        stats = optimizer_stats(self.ds_engine)
        tokens_per_s = self.cfg.total_batch_size / dt
        flops_per_s = self.flops_per_token * tokens_per_s
        rec = {"loss": loss, "lr": learning_rates(self.cfg.model_config().n_embd)["matrix"] * lrm, "lrm": lrm,
               "grad_norm": stats["grad_norm"], "tokens_per_s": tokens_per_s, "model_flops_per_s": flops_per_s,
               "step_time_s": dt, "memory_gib": memory_gib()}
        peak = peak_flops(self.cfg.dtype)
        if peak:
            rec["mfu"] = flops_per_s / (peak * self.grid.world)
        return rec

    def evaluate_bpb(self, batches, token_bytes: torch.Tensor) -> float:
        """Bits per byte over this rank's evaluation batches (x, y), summed over the grid: the same forward and
        formula as base_eval (evaluation.model_eval.GridForward, evaluation.loss_eval.evaluate_bpb)."""
        from megachat.evaluation.loss_eval import evaluate_bpb
        from megachat.evaluation.model_eval import GridForward
        fwd = GridForward(self.model, self.grid)
        return evaluate_bpb(fwd.token_loss, ((x.to(self.device), y.to(self.device)) for x, y in batches),
                            token_bytes)

    def save(self, step: int, keep: int = 3) -> str:
        """Checkpoint the state after `step` optimizer steps into ckpt_dir (collective): DeepSpeed's files for a
        resume under this layout, and the layout-free full state (full_state.pt) for any other."""
        return checkpoint.save(self.ds_engine, self.ckpt_dir, step, keep=keep, full_state=self.gather_full_state(),
                               client_state={"step": step, "consumed_samples": step * self.cfg.global_batch,
                                             "layout": self.layout, "config": self.cfg.to_json()})

    def gather_full_state(self) -> dict | None:
        """Layout-free training state on rank 0 (None elsewhere; collective over the world):
        {"model": full weights, "optimizer": megachat.optim.full_optimizer_state merged over the stages}."""
        from megachat.optim import full_optimizer_state
        weights = self.full_state_dict()
        state = full_optimizer_state(self.ds_engine)  # every rank of a stage gets its stage's full state
        params = _gather_on_rank0(state["params"] if self.grid.tp_rank == 0 and self.grid.dp_rank == 0 else {})
        return None if params is None else {"model": weights, "optimizer": {"step": state["step"], "params": params}}

    def full_state_dict(self) -> dict | None:
        """Unsharded fp32 weights under nanochat's names on rank 0 (None elsewhere); collective over the world."""
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


def build_trainer(cfg: TrainConfig, run_dir: str | None = None, resume: bool = False,
                  weights: dict | None = None) -> Trainer:
    """Check the layout, build the grid, the model, the optimizer and DeepSpeed's engine for this process.
    run_dir: where checkpoints go (RUN_DIR/checkpoints). resume: continue from its newest complete checkpoint
    (refused when there is none); without it, a run_dir that already holds a run is refused (a fresh start would
    prune its checkpoints and overwrite its weights). weights: full weights (nanochat names) to start from."""
    import deepspeed

    from megachat.optim import HybridOptimizer
    from megachat.pipeline import pipeline_module
    world = dist.get_world_size() if dist.is_initialized() else 1
    dp = check_config(cfg, world)  # before any process-group work
    ckpt_dir = os.path.join(run_dir, "checkpoints") if run_dir else None
    layout = {"tp": cfg.tp, "pp": cfg.pp, "dp": dp, "zero": cfg.zero}
    start, full_state = 0, None
    if run_dir and not resume:
        earlier = [f for f in ("checkpoints/latest", "model.pt") if os.path.exists(os.path.join(run_dir, f))]
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
        if meta["layout"] != layout:  # another grid: rebuild from the layout-free state
            full_state = checkpoint.load_full_state(ckpt_dir, tag)
            weights = full_state["model"]
    grid = init_grid(cfg.tp, cfg.pp)
    dev = device()
    model = build_model(cfg.model_config(), grid, dev, weights=weights, seed=cfg.seed)
    named = [(n, p) for n, p in model.named_parameters() if not p.is_meta]
    optimizer = HybridOptimizer(named, grid, n_embd=cfg.model_config().n_embd, num_iterations=cfg.num_iterations,
                                warmdown_ratio=cfg.warmdown_ratio, max_grad_norm=cfg.grad_clip,
                                ns_dtype=torch.bfloat16 if cfg.dtype == "bf16" else torch.float32)
    without_deepspeed_shm_allreduce()
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts init_distributed's process group
    engine, _, _, _ = deepspeed.initialize(model=pipeline_module(model, grid) if cfg.pp > 1 else model,
                                           optimizer=optimizer, config=ds_config(cfg, dp),
                                           mpu=None if cfg.pp > 1 else grid)
    trainer = Trainer(cfg=cfg, grid=grid, model=model, ds_engine=engine, device=dev, ckpt_dir=ckpt_dir,
                      step=start, flops_per_token=model_flops_per_token(cfg))
    if full_state is not None:
        from megachat.optim import load_full_optimizer_state
        load_full_optimizer_state(engine, full_state["optimizer"])
        if dist.get_rank() == 0:
            print(f"resumed step {start} saved under {meta['layout']} in layout {layout}", flush=True)
    elif resume:
        checkpoint.load(engine, ckpt_dir, tag)
    return trainer
