"""megachat.train_config: what a run computes and every check of it, before any process group work.

- `TrainConfig`: the model's size, the batch, the schedule, the layout and the precision (saved in
  RUN_DIR/config.json and in every checkpoint); `config_from_run` continues the model of a finished run.
- `check_config(cfg, world)`: every layout and setting error as a ValueError; `check_ds_config`: what a user's
  DeepSpeed JSON must leave to megachat (optimizer, schedule, clipping, precision).
- `add_trainer_args`, `config_options`, `loop_options`: the command-line flags every phase shares and what they give
  TrainConfig and Trainer.fit.
- `newton_schulz_dtype`, `model_flops_per_token`, `num_params`: what follows from a config alone.
"""
from __future__ import annotations

import argparse
import importlib.util
from dataclasses import asdict, dataclass

import torch

from megachat.model import GPTConfig, flops_per_token
from megachat.model import num_params as model_num_params
from megachat.parallel import check_layout
from megachat.tensor_parallel import FP8_INSTALL, padded_vocab_size


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
