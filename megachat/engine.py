"""megachat.engine: the GPT under DeepSpeed on the tp x pp x dp grid, and one train step for every layout.

- `init_distributed()` joins the launcher's world (gloo on CPU, nccl on CUDA: one switch); base_train and
  base_eval both call it.
- `build_trainer(cfg)` checks the layout before any process group is created, builds the grid, builds the
  model on the meta device, materializes and initializes it (every tp shard is the slice of the same full
  init), and wraps it: pp > 1 -> DeepSpeed `PipelineModule` (embedding stage, blocks split evenly, head+loss)
  under the `PipelineEngine` (ZeRO-0/1); pp = 1 -> the plain DeepSpeed engine with `mpu=grid` (ZeRO-0..3).
- `Trainer.train_step(step)` runs global batch `step` (gradient accumulation inside), clips, steps the
  optimizer and the schedule, and returns the loss averaged over the whole global batch, identical on all
  ranks. `Trainer.evaluate_bpb(...)` computes bits per byte across the grid; `Trainer.gather_full_state_dict()`
  brings the unsharded weights (nanochat names) to rank 0 for sampling or export, and
  `Trainer.gather_universal_state()` adds the unsharded optimizer state (a resume under another layout).

The data path is deterministic from the global sample number (megachat.data.batch_indices), so every layout
with the same total batch sees the same samples at the same step, and a resume continues the same stream.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megachat.evaluation.loss_eval import bpb_from_sums
from megachat.parallel import Grid, check_layout, init_grid, without_deepspeed_shm_allreduce

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
    optimizer: str = "muon"  # "muon" (Muon + AdamW, nanochat's) or "adamw" (AdamW everywhere, a baseline)
    seed: int = 42
    n_kv_head: int | None = None
    grad_clip: float = 1.0
    warmdown_ratio: float = 0.2
    activation_checkpoint_interval: int = 0  # pp > 1 only: checkpoint every k pipeline layers (0 = off)
    ds_config: str | None = None  # a DeepSpeed JSON to use instead of configs/ds/zero{Z}_{dtype}.json

    def model_config(self):
        from megachat.model import GPTConfig
        return GPTConfig.from_depth(self.depth, self.vocab_size, self.seq_len, n_kv_head=self.n_kv_head)

    @property
    def global_batch(self) -> int:
        """Samples (sequences) per optimizer step."""
        return self.total_batch_size // self.seq_len

    def to_json(self) -> dict:
        return asdict(self)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(world_of_one: bool = True, timeout_minutes: float = 30) -> None:
    """Join the world the launcher (deepspeed / torchrun) describes in the environment; nccl on CUDA, gloo on
    CPU. A plain `python` run (no RANK in the environment) becomes a world of one (the DeepSpeed engine needs
    a process group), or with world_of_one=False stays without one and leaves os.environ alone (base_eval,
    whose code runs with or without a group and is also called in-process by the tests)."""
    if "RANK" not in os.environ and not world_of_one:
        return
    import deepspeed
    if "RANK" not in os.environ:  # plain `python script.py`: one process, no MPI discovery
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    without_deepspeed_shm_allreduce()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=timedelta(minutes=timeout_minutes))


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def check_config(cfg: TrainConfig, world: int) -> int:
    """Every layout error the issue lists, raised as ValueError before any process group work; returns dp."""
    if cfg.dtype not in ("bf16", "fp32"):
        raise ValueError(f"--dtype {cfg.dtype!r} is not supported: use bf16 or fp32")
    if cfg.zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero {cfg.zero} is not a ZeRO stage: use 0, 1, 2 or 3")
    if cfg.dtype == "bf16" and cfg.zero == 0:
        raise ValueError("--dtype bf16 needs --zero >= 1: DeepSpeed keeps fp32 master weights and fp32 gradient "
                         "accumulation for bf16 only in its ZeRO optimizers (ZeRO-1 on one data-parallel rank "
                         "shards nothing, so it costs what ZeRO-0 would); use --zero 1, or --dtype fp32")
    if cfg.optimizer not in ("muon", "adamw"):
        raise ValueError(f"--optimizer {cfg.optimizer!r} is not supported: use muon or adamw")
    if cfg.total_batch_size % cfg.seq_len:
        raise ValueError(f"--total-batch-size {cfg.total_batch_size} is not a multiple of --max-seq-len "
                         f"{cfg.seq_len}: the global batch is a whole number of sequences")
    from megachat.model import check_tp
    from megachat.tensor_parallel import padded_vocab_size
    mc = cfg.model_config()
    dp = check_layout(world, cfg.tp, cfg.pp, zero_stage=cfg.zero, n_layer=mc.n_layer, n_head=mc.n_head,
                      vocab_size=padded_vocab_size(mc.vocab_size, cfg.tp), total_batch_size=cfg.total_batch_size,
                      device_batch_size=cfg.device_batch_size, seq_len=cfg.seq_len)
    check_tp(mc, Grid(tp=cfg.tp, pp=cfg.pp, dp=dp))  # KV heads: split over tp or replicated tp / n_kv_head times
    return dp


def check_ds_config(conf: dict, cfg: TrainConfig, path) -> None:
    """What a user's DeepSpeed JSON must leave to megachat: the optimizer and schedule (Muon + AdamW is passed to
    DeepSpeed as a client optimizer) and the precision, which --dtype sets (the model is built in it)."""
    for key in ("optimizer", "scheduler"):
        if key in conf:
            raise ValueError(f"DeepSpeed config {path} sets {key!r}, but megachat passes its own optimizer and "
                             f"schedule (--optimizer {cfg.optimizer}); remove the {key!r} section")
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
                # HybridOptimizer clips inside its step by the true global norm; AdamW leaves it to DeepSpeed
                gradient_clipping=0.0 if cfg.optimizer == "muon" else cfg.grad_clip)
    conf.setdefault("zero_optimization", {})["stage"] = cfg.zero
    return conf


def build_optimizer(model, grid: Grid, cfg: TrainConfig):
    """The optimizer of this rank's parameters (with pp > 1: this stage's; named as in nanochat) and its
    schedule. "muon": megachat.optim.HybridOptimizer (Muon for block matrices, AdamW for wte / lm_head, the
    schedule, momentum warm-up and global-norm clipping inside its step). "adamw": AdamW on every group with
    nanochat's AdamW rates (wte 0.2, lm_head 0.004, both x (n_embd/768)^-0.5) and the lm_head rate for the block
    matrices too (Muon's 0.02 is far too large for AdamW's per-element steps: the loss diverges), under the same
    schedule, DeepSpeed clipping."""
    from megachat.optim import HybridOptimizer, lr_multiplier
    named = [(n, p) for n, p in model.named_parameters() if not p.is_meta]
    n_embd = cfg.model_config().n_embd
    if cfg.optimizer == "muon":
        return HybridOptimizer(named, grid, n_embd=n_embd, num_iterations=cfg.num_iterations,
                               warmdown_ratio=cfg.warmdown_ratio, max_grad_norm=cfg.grad_clip,
                               ns_dtype=torch.bfloat16 if cfg.dtype == "bf16" else torch.float32), None
    scale = (n_embd / 768) ** -0.5
    lrs = {"embedding": 0.2 * scale, "lm_head": 0.004 * scale, "matrix": 0.004 * scale}
    groups = {k: [] for k in lrs}
    for name, p in named:
        groups["embedding" if "wte" in name else "lm_head" if "lm_head" in name else "matrix"].append(p)
    opt = torch.optim.AdamW([dict(params=ps, lr=lrs[k], name=k) for k, ps in groups.items() if ps],
                            betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, cfg.num_iterations, warmdown_ratio=cfg.warmdown_ratio))
    return opt, schedule


def build_model(cfg: TrainConfig, grid: Grid, dev: torch.device, weights: dict | None = None):
    """The GPT built on the meta device (no memory), materialized on `dev` (with pp > 1 only this stage's
    layers; the others stay on meta) and initialized from cfg.seed (each shard the slice of the full init),
    or from `weights` (full weights under nanochat's names) when given."""
    from megachat.model import GPT, load_nanochat_state_dict, materialize
    with torch.device("meta"):
        model = GPT(cfg.model_config(), grid=grid)
    materialize(model, dev)
    model.init_weights(cfg.seed)
    if weights is not None:
        load_nanochat_state_dict(model, weights)
    return model


def model_flops_per_token(cfg: TrainConfig) -> float:
    """Model FLOPs per token of the whole (unsharded) model: 6 * (params - embedding) + attention."""
    from megachat.model import GPT
    with torch.device("meta"):
        return float(GPT(cfg.model_config(), grid=Grid()).estimate_flops())


def num_params(cfg: TrainConfig) -> int:
    from megachat.model import GPT
    with torch.device("meta"):
        return GPT(cfg.model_config(), grid=Grid()).num_params()


@dataclass
class Trainer:
    cfg: TrainConfig
    grid: Grid
    model: torch.nn.Module  # the GPT (with pp > 1 only this stage's layers are materialized, the rest is meta)
    engine: object  # deepspeed DeepSpeedEngine or PipelineEngine
    dataset: object  # train samples: dataset[global_sample] -> int64 [seq_len + 1]
    device: torch.device

    @property
    def is_pipe(self) -> bool:
        return self.cfg.pp > 1

    @property
    def grad_accum(self) -> int:
        return self.cfg.global_batch // (self.cfg.device_batch_size * self.grid.dp)

    def micro_batches(self, dataset, step: int, global_batch: int, count: int):
        """This rank's `count` micro-batches (x, y) torch.long [B, T] of global batch `step`."""
        from megachat.data import batch_indices
        idx = batch_indices(step, global_batch, self.grid.dp_rank, self.grid.dp)
        B = self.cfg.device_batch_size
        for m in range(count):
            rows = np.stack([np.asarray(dataset[int(i)], dtype=np.int64) for i in idx[m * B:(m + 1) * B]])
            yield (torch.from_numpy(rows[:, :-1].copy()).to(self.device),
                   torch.from_numpy(rows[:, 1:].copy()).to(self.device))

    def train_step(self, step: int) -> dict:
        """One optimizer step on global batch `step` (0-based); returns loss (mean over the global batch),
        grad_norm (before clipping), lrm (the schedule's multiplier on every group's base lr) and lr (the block
        matrices' lr this step), the same on every rank."""
        batches = self.micro_batches(self.dataset, step, self.cfg.global_batch, self.grad_accum)
        if self.is_pipe:
            loss = self.engine.train_batch(data_iter=batches).detach().float()
        else:
            total = torch.zeros((), device=self.device)
            for x, y in batches:
                loss = self.engine(x, y)
                self.engine.backward(loss)
                self.engine.step()
                total += loss.detach().float()
            loss = total / self.grad_accum
            dist.all_reduce(loss, group=self.grid.dp_group)
            loss /= self.grid.dp
        if self.cfg.optimizer == "muon":
            from megachat.optim import optimizer_stats
            grad_norm = optimizer_stats(self.engine.optimizer)["grad_norm"]
        else:  # DeepSpeed's clipping norm (None for fp32 ZeRO-0, where DeepSpeed does not keep it)
            grad_norm = self.engine.get_global_grad_norm()
            grad_norm = grad_norm.item() if torch.is_tensor(grad_norm) else grad_norm
        from megachat.optim import lr_multiplier
        lrm = lr_multiplier(step, self.cfg.num_iterations, warmdown_ratio=self.cfg.warmdown_ratio)
        matrix_lr = 0.02 if self.cfg.optimizer == "muon" else 0.004 * (self.cfg.model_config().n_embd / 768) ** -0.5
        return {"loss": loss.item(), "grad_norm": grad_norm, "lrm": lrm, "lr": matrix_lr * lrm}

    @torch.no_grad()
    def evaluate_bpb(self, dataset, token_bytes: torch.Tensor, num_samples: int) -> float:
        """Bits per byte over samples 0..num_samples-1 of `dataset`, split over dp ranks and computed through
        the same engine (tp and pp included), special tokens (0 bytes) excluded; the formula is
        loss_eval.bpb_from_sums, as in base_eval. num_samples must be a multiple of device_batch_size * dp."""
        B, dp = self.cfg.device_batch_size, self.grid.dp
        if num_samples % (B * dp) or num_samples == 0:
            raise ValueError(f"eval samples {num_samples} must be a positive multiple of device_batch_size * dp "
                             f"= {B * dp}")
        count = num_samples // (B * dp)
        token_bytes = token_bytes.to(self.device)
        batches, n_valid, n_bytes = [], [], torch.zeros((), dtype=torch.float64, device=self.device)
        for x, y in self.micro_batches(dataset, 0, num_samples, count):
            nb = token_bytes[y]
            y = torch.where(nb > 0, y, torch.full_like(y, -1))  # specials count 0 bytes: excluded
            batches.append((x, y))
            n_valid.append(int((y >= 0).sum()))
            n_bytes += nb.sum()
        nats = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.is_pipe:
            losses = self.engine.eval_batch(iter(batches), reduce_output=None, bcast_loss=False,
                                            num_micro_batches=count)
            # only the last stage holds losses; count them once per tp group
            if self.engine.is_last_stage() and self.grid.tp_rank == 0:
                for loss, n in zip(losses, n_valid):
                    nats += loss.double() * n if n else 0.0
            else:
                n_bytes.zero_()
            self.engine.module.train()
            dist.all_reduce(nats)
            dist.all_reduce(n_bytes)
        else:
            self.engine.eval()
            for (x, y), n in zip(batches, n_valid):
                if n:
                    nats += self.engine(x, y).double() * n
            self.engine.train()
            # each dp rank has its own samples; tp ranks of one dp rank hold the same numbers
            dist.all_reduce(nats, group=self.grid.dp_group)
            dist.all_reduce(n_bytes, group=self.grid.dp_group)
        return bpb_from_sums(nats.item(), n_bytes.item())

    def gather_universal_state(self) -> dict | None:
        """Layout-independent training state on rank 0 (None elsewhere; collective over the world):
        {"model": full weights, "optimizer": megachat.optim.full_optimizer_state merged over the stages}.
        None everywhere with --optimizer adamw (its state lives in DeepSpeed's sharded files only)."""
        if self.cfg.optimizer != "muon":
            return None
        from megachat.optim import full_optimizer_state
        weights = self.gather_full_state_dict()
        state = full_optimizer_state(self.engine)  # every rank of a stage gets its stage's full state
        mine = state["params"] if self.grid.tp_rank == 0 and self.grid.dp_rank == 0 else {}
        out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, out, dst=0)
        if dist.get_rank() != 0:
            return None
        params = {}
        for part in out:
            params.update(part)
        return {"model": weights, "optimizer": {"step": state["step"], "params": params}}

    def gather_full_state_dict(self) -> dict | None:
        """Unsharded weights under nanochat's names on rank 0 (None elsewhere); collective over the world."""
        import deepspeed
        from megachat.model import full_state_dict
        params = list(self.model.parameters())
        if self.cfg.zero == 3:
            with deepspeed.zero.GatheredParameters(params):
                sd = full_state_dict(self.model)
        else:
            sd = full_state_dict(self.model)
        # with pp > 1 each stage holds its own layers (the rest of the GPT is on meta): one rank per stage sends
        mine = {k: v.float().cpu() for k, v in sd.items()} if self.grid.tp_rank == 0 and self.grid.dp_rank == 0 else {}
        out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, out, dst=0)
        if dist.get_rank() != 0:
            return None
        full = {}
        for part in out:
            full.update(part)
        return full


def build_trainer(cfg: TrainConfig, dataset, ds_overrides: dict | None = None, weights: dict | None = None) -> Trainer:
    """Check the layout, build the grid, the model and the DeepSpeed engine for this process.
    ds_overrides: top-level DeepSpeed config keys to set (e.g. {"wall_clock_breakdown": True} for timing).
    weights: full weights (nanochat names) to start from instead of the init (a resume under another layout;
    they must be in the model before DeepSpeed copies it into its fp32 master weights)."""
    import deepspeed
    world = dist.get_world_size() if dist.is_initialized() else 1
    dp = check_config(cfg, world)  # before any process-group work
    grid = init_grid(cfg.tp, cfg.pp)
    dev = device()
    model = build_model(cfg, grid, dev, weights)
    conf = {**ds_config(cfg, dp), **(ds_overrides or {})}
    if cfg.pp > 1:
        from deepspeed.pipe import PipelineModule
        from megachat.model import pipeline_layers, pipeline_loss_fn, pipeline_stage_bounds
        module = PipelineModule(layers=pipeline_layers(model), loss_fn=pipeline_loss_fn(model),
                                topology=grid.topology(), partition_method="type:Block",
                                activation_checkpoint_interval=cfg.activation_checkpoint_interval)
        expected = pipeline_stage_bounds(model, cfg.pp)
        if module.parts != expected:  # build_model materialized exactly these layers
            raise RuntimeError(f"DeepSpeed split the pipeline as {module.parts}, megachat expected {expected}; "
                               f"the deepspeed version changed its partitioning")
    else:
        module = model
    optimizer, schedule = build_optimizer(model, grid, cfg)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule, config=conf,
                                           mpu=None if cfg.pp > 1 else grid)
    return Trainer(cfg=cfg, grid=grid, model=model, engine=engine, dataset=dataset, device=dev)
