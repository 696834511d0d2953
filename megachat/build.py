"""megachat.build: a Trainer for this process from a TrainConfig.

- `build_trainer(cfg, run_dir, resume)`: checks the layout before any process group work, builds the grid, the
  model (`model.build_model`, from the init, from `weights`, or from a checkpoint saved under another layout), the
  optimizer (`optim.HybridOptimizer`) and DeepSpeed's engine: pp > 1 -> `pipeline.pipeline_module` under the
  PipelineEngine (ZeRO-0/1); pp = 1 -> the plain engine with `mpu=grid` (ZeRO-0..3). With resume each rank
  reads its slices of the checkpoint's layout-free state (megachat.sharded), whatever layout saved it.
- `ds_config(cfg, dp)`: the DeepSpeed config, configs/ds/zero{Z}_{dtype}.json (or the user's) with the batch and
  the buckets (`zero_buckets`, sized from the model) filled in.

DeepSpeed's public API is used here, in megachat/trainer.py and megachat/pipeline.py; its internals only in
megachat/deepspeed_internals.py. deepspeed is imported in the function that uses it: importing it takes seconds,
which the planner and the tools that only read a config should not pay.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from megachat import checkpoint, deepspeed_internals
from megachat.model import Block, build_model, nanochat_shapes
from megachat.optim import LEARNING_RATES, HybridOptimizer
from megachat.parallel import device, init_grid
from megachat.pipeline import pipeline_module, stage_layers
from megachat.tensor_parallel import use_fp8
from megachat.train_config import (TrainConfig, check_config, check_ds_config, model_flops_per_token,
                                   newton_schulz_dtype, num_params)
from megachat.trainer import Trainer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "ds"


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
    """Elements of the largest entry of GPT.layers() (the embedding, a block or the LM head) of the unsharded model,
    from its parameter shapes (the norms have no parameters)."""
    shapes = nanochat_shapes(cfg.model_config())
    block = sum(math.prod(shape) for name, shape in shapes.items() if name.startswith("transformer.h.0."))
    return max(math.prod(shapes["transformer.wte.weight"]), block, math.prod(shapes["lm_head.weight"]))


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
    ns_dtype = newton_schulz_dtype(cfg)
    # --compile also compiles bf16 Newton-Schulz (as nanochat compiles its zeropower); fp32, the exact arithmetic
    # the layout-equivalence tests compare with the eager single process, stays eager
    optimizer = HybridOptimizer(named, grid, n_embd=cfg.model_config().n_embd, **rates,
                                ns_dtype=ns_dtype, compile_newton_schulz=cfg.compile and ns_dtype == torch.bfloat16)
    deepspeed_internals.without_shm_allreduce()
    deepspeed_internals.quiet_deprecated_all_gather()
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
