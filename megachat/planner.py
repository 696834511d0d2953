"""megachat.planner: which tp x pp x dp x ZeRO layout fits in GPU memory and how fast it trains, predicted from
megachat's own implementation; tools/plan.py is its command line, docs/scaling.md states the model, its sources
and the measurement that checks it (megachat.measure, tests/test_planner.py).

Validity is megachat's own: a layout is valid exactly when `train_config.check_config` accepts it (heads, KV heads,
padded vocab, layers, batch, ZeRO-2/3 with pp > 1, bf16 at ZeRO-0), plus the planner's one rule of its own, that
tp stays inside a node. Everything below is per GPU, for the pipeline stage and data-parallel rank that need the
most.

Memory (bytes), following what megachat and DeepSpeed 0.19 allocate (`predict_memory`):
- weights: the model dtype (bf16: 2 bytes) of this rank's tp shards of its stage's parameters; ZeRO-3 keeps 1/dp of
  each (plus whole copies of parameters below stage3_param_persistence_threshold).
- gradients: bf16 ZeRO-1 is DeepSpeed's BF16_Optimizer: a full fp32 accumulation buffer (configs/ds/*_bf16.json
  set grad_accum_dtype fp32) and the bf16 .grad of every parameter, kept until the next backward; fp32 ZeRO-0/1:
  full fp32 .grad; ZeRO-2/3: the fp32 partition of 1/dp.
- optimizer: DeepSpeed's fp32 master partition (ZeRO >= 1, bf16; fp32 shares the weights'), Muon's momentum
  (4 bytes per block-matrix element) and AdamW's two moments (8 bytes per wte / lm_head element), of exactly the
  elements this dp rank holds in DeepSpeed's flat partition (ZeRO-1/2: contiguous 1/dp of the flattened stage, so
  the rank holding wte or lm_head holds more Adam state; ZeRO-3: 1/dp of every parameter).
- activations: what autograd saves in one micro-batch's forward (`activation_bytes`, counted kernel by kernel from
  megachat.model and megachat.kernels), times the micro-batches in flight on the stage (DeepSpeed's 1F1B
  TrainSchedule: min(pp - stage, micro-batches)), plus the pipe engine's received input and kept output of each.
  Layout.sequence_parallel: the norms, the residual stream and the column-parallel inputs keep T / tp positions.
  Job.fused_head_loss: the LM head fused with the loss (no [tokens, vocab / tp] logits saved, one chunk of them
  in the workspace) or not (the logits saved); the default is what megachat's training forward does
  (FUSED_HEAD_LOSS_DEFAULT). Layout.checkpointing: "full" keeps only each block's input and recomputes the block
  in backward; "selective" recomputes the attention core, which saves only its softmax statistics (c_proj keeps
  the attention output as its input).
- workspace: DeepSpeed's gradient buckets (reduce_bucket_size elements: fp32 ZeRO-1, ZeRO-2 and ZeRO-3; bf16 ZeRO-1
  flattens its all-reduce into one of up to that size instead), ZeRO-3's gathered
  parameters during forward/backward, the RoPE tables, a fixed runtime reserve (CUDA context, NCCL, cuBLAS), and
  the larger of the backward's transient gradients (the logits' gradient, one block's activation gradients) and
  the optimizer step's transients (Muon's whole matrices at their owners and its packed fp32 buffers).

Time per optimizer step (`predict_time`), m micro-batches per rank, p = pp:
- compute: the stage's model FLOPs (6 x its matrix parameters + 12 x layers x heads x head_dim x T per token, the
  model's estimate_flops split by stage) / tp at `matmul_efficiency` x the peak, plus what checkpointing
  recomputes (full: each block's forward, a third of its FLOPs; selective: the attention core's forward);
- tp: 2 all-reduces forward and 2 backward per block of [tokens, n_embd] activations (+ embedding and head), over
  NVLink at NCCL's bus bandwidth, t = 2 (tp-1)/tp x bytes / busbw, not overlapped (megachat has no tp overlap);
  sequence parallelism replaces each all-reduce by an all-gather and a reduce-scatter (the same bytes) and adds
  one all-gather per block's column-parallel input in backward (the re-gather of what it kept as a shard): 5
  all-reduce equivalents per block instead of 4;
- pp: the bubble, step = (m + p - 1) x the slowest stage's micro-batch (fraction (p-1)/(m+p-1) idle), and one
  send of [tokens, n_embd] forward and one backward per micro-batch and stage boundary (1/tp from each tp rank,
  then an all-gather inside the tp group, as DeepSpeed partitions pipe activations; under sequence parallelism
  each tp rank's own T / tp shard and no all-gather), over InfiniBand when the neighbouring stage is on another
  node;
- dp: ZeRO-0/1 (BF16_Optimizer) all-reduce the fp32 gradients once per step and (ZeRO >= 1) all-gather the
  updated weights; ZeRO-2 reduce-scatters bf16 gradients every micro-batch; ZeRO-3 all-gathers the weights for
  forward (and what it released for backward) and reduce-scatters every micro-batch; NVLink inside a node,
  InfiniBand (per-GPU NIC) across nodes; not overlapped;
- Muon: each matrix's gradient to one owner and its update back (two all_to_alls over the stage's tp*dp ranks, 4
  bytes per element), Newton-Schulz (5 steps, ~(4 m^2 n + 2 m^3) FLOPs each) at the owners, and the elementwise
  AdamW/momentum passes over HBM.
MFU = model FLOPs per token x tokens per step / (step time x world x peak), as megachat.trainer reports it.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from megachat.build import CONFIG_DIR, zero_buckets
from megachat.model import GPT, GPTConfig, flops_per_token, nanochat_shapes
from megachat.optim import param_kind
from megachat.parallel import Grid
from megachat.pipeline import stage_bounds
from megachat.tensor_parallel import loss_chunk_tokens, padded_vocab_size
from megachat.train_config import TrainConfig, check_config

GiB = 2 ** 30
NS_STEPS = 5  # Newton-Schulz iterations (megachat.optim's default)
OPTIMIZER_BYTES_PER_ELEMENT = 32  # HBM traffic of the elementwise update per held element (grad, state, master r/w)
CHECKPOINTING = ("none", "selective", "full")  # --activation-checkpointing, in order of preference
PICK_TIME_SLACK = 0.02  # Plan.pick: step times within 2 % of the fastest count as equally fast
PICK_MEMORY_HEADROOM = 0.10  # Plan.pick: leave 10 % of the GPU's memory free
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
# what megachat's training forward does: GPT.head_loss (the LM head fused with the loss) when the model has it
FUSED_HEAD_LOSS_DEFAULT = hasattr(GPT, "head_loss")


@dataclass(frozen=True)
class Hardware:
    """One GPU type and its node's network; defaults: H100 SXM in 8-GPU nodes with one 400 Gb/s NIC per GPU."""
    name: str = "H100 SXM"
    peak_flops: float = 989e12  # dense bf16 tensor-core peak (megachat.monitor.PEAK_FLOPS_BF16)
    matmul_efficiency: float = 0.53  # achieved fraction of the peak on the model's FLOPs (see docs/scaling.md)
    hbm_bandwidth: float = 3.35e12  # bytes/s
    nvlink_busbw: float = 370e9  # NCCL bus bandwidth over NVLink (450 GB/s per direction minus ~20 % protocol)
    ib_busbw_per_gpu: float = 40e9  # one 400 Gb/s (50 GB/s) NIC per GPU at 80 %
    gpus_per_node: int = 8
    memory: float = 80 * GiB
    runtime_reserve: float = 2 * GiB  # CUDA context, NCCL and cuBLAS workspaces, allocator slack


@dataclass(frozen=True)
class Job:
    """What is trained: the model, the batch and the precision."""
    config: GPTConfig
    total_batch_size: int  # tokens per optimizer step
    dtype: str = "bf16"
    fused_head_loss: bool = FUSED_HEAD_LOSS_DEFAULT  # LM head + softcap CE fused in chunks: no logits saved

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.total_batch_size // self.config.sequence_len


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int
    micro_batch: int  # sequences per rank per micro-step (--device-batch-size)
    checkpointing: str = "none"  # --activation-checkpointing: "none", "selective" or "full"
    sequence_parallel: bool = False  # --sequence-parallel (tp > 1)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def flags(self) -> str:
        return (f"--tp {self.tp} --pp {self.pp} --zero {self.zero} --device-batch-size {self.micro_batch}"
                + (f" --activation-checkpointing {self.checkpointing}" if self.checkpointing != "none" else "")
                + (" --sequence-parallel" if self.sequence_parallel else ""))


@dataclass
class Memory:
    """Bytes on one GPU."""
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    workspace: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.workspace


@dataclass
class StepTime:
    """Seconds per optimizer step, by cause (bubble: the pipeline's idle part of compute + tp + pp)."""
    compute: float = 0.0
    tp_comm: float = 0.0
    pp_comm: float = 0.0
    bubble: float = 0.0
    dp_comm: float = 0.0
    muon: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.pp_comm + self.bubble + self.dp_comm + self.muon


@dataclass
class Prediction:
    layout: Layout
    memory: Memory  # of the stage and dp rank that need the most
    stage: int  # that stage
    time: StepTime
    mfu: float
    tokens_per_s: float
    micro_batches: int  # per rank per step (gradient accumulation)

    def fits(self, hw: Hardware) -> bool:
        return self.memory.total <= hw.memory

    def to_json(self) -> dict:
        memory = {**asdict(self.memory), "total": self.memory.total}
        return {"layout": asdict(self.layout), "memory_gib": {k: round(v / GiB, 2) for k, v in memory.items()},
                "step_time_s": round(self.time.total, 4),
                "time_split_s": {k: round(v, 4) for k, v in asdict(self.time).items()}, "mfu": round(self.mfu, 4),
                "tokens_per_s": round(self.tokens_per_s), "micro_batches": self.micro_batches}


# --- the model as the planner sees it: per-layer parameters of one tp rank ---------------------------------------

@dataclass(frozen=True)
class LayerParams:
    """One entry of GPT.layers() on one tp rank: its parameters in DeepSpeed's flattening order."""
    kind: str  # "embedding", "block" or "head"
    numels: tuple[int, ...]  # this rank's (tp shard) element count per parameter
    full_numels: tuple[int, ...]  # the unsharded element count per parameter
    optim_kinds: tuple[str, ...]  # megachat.optim.param_kind per parameter: "matrix", "embedding", "lm_head"
    full_shapes: tuple[tuple[int, int], ...]
    buffer_bytes: int  # non-persistent buffers (the RoPE tables) on the GPU


def layer_params(config: GPTConfig, tp: int) -> tuple[LayerParams, ...]:
    """GPT.layers() of tp rank 0 (every tp rank holds equal shapes), built on the meta device: exact shapes,
    vocab padding and replicated KV heads come from megachat.model itself."""
    return _layer_params(tuple(vars(config).items()), tp)


@lru_cache(maxsize=64)
def _layer_params(fields: tuple, tp: int) -> tuple[LayerParams, ...]:
    config = GPTConfig(**dict(fields))
    with torch.device("meta"):
        model = GPT(config, grid=Grid(tp=tp))
    names = {id(p): n for n, p in model.named_parameters()}
    shapes = nanochat_shapes(config)
    out = []
    for i, layer in enumerate(model.layers()):
        kind = "embedding" if i == 0 else "head" if i == config.n_layer + 1 else "block"
        params = list(layer.parameters())
        full = tuple(tuple(shapes[names[id(p)]]) for p in params)
        out.append(LayerParams(kind=kind, numels=tuple(p.numel() for p in params),
                               full_numels=tuple(math.prod(s) for s in full),
                               optim_kinds=tuple(param_kind(names[id(p)], p) for p in params), full_shapes=full,
                               buffer_bytes=sum(b.numel() * b.element_size() for b in layer.buffers())))
    return tuple(out)


def stage_layers(config: GPTConfig, tp: int, pp: int, stage: int) -> tuple[LayerParams, ...]:
    bounds = stage_bounds(config.n_layer, pp)
    return layer_params(config, tp)[bounds[stage]:bounds[stage + 1]]


# --- activations ------------------------------------------------------------------------------------------------

def activation_bytes(config: GPTConfig, tp: int, micro_batch: int, dtype: str = "bf16",
                     fused_head_loss: bool = FUSED_HEAD_LOSS_DEFAULT, checkpointing: str = "none",
                     sequence_parallel: bool = False) -> dict[str, int]:
    """Bytes autograd saves for backward in one micro-batch's forward, per GPT.layers() kind ("embedding", "block"
    (one block), "head"), on one tp rank; parameters and buffers excluded (they are model states).

    Counted from what each op of megachat.model saves on the GPU path (Triton kernels, flash-attn or SDPA):
    block: rmsnorm saves its input x and 1/rms (fp32 per row); q, k, v share one saved input (the normed x); RoPE
    saves only its tables; QK-norm saves the roped q and k and their 1/rms; attention saves q, k (normed), v, its
    output and the log-sum-exp (fp32 per head and token), and the output is also c_proj's input; the second
    rmsnorm saves the residual x and 1/rms, c_fc its normed input; relu^2 saves only its output (kernels.ReLU2),
    which is c_proj's input. tp splits heads and the MLP width, not the residual stream (no sequence parallelism).
    embedding: the token ids (int64; at tp > 1 the shard-local ids) and, at tp > 1, the out-of-shard mask; the rows
    (rmsnorm's input) and 1/rms. head: the final rmsnorm's input and 1/rms, the LM head's input, then either the
    raw logits [tokens, vocab / tp] (the softcap cross-entropy saves them), the targets (int64), the
    log-sum-exp and the trainer's per-token loss weights (fp32); or, with fused_head_loss
    (tensor_parallel.vocab_parallel_linear_loss, which forms the gradients in forward), d hidden [tokens, C] in
    place of the LM head's input and the fp32 weight gradient [vocab / tp, C], nothing of tokens x vocabulary. checkpointing "full": a block saves only its
    input; "selective": a block saves all but the attention's log-sum-exp. sequence_parallel: every rmsnorm's
    input and 1/rms hold T / tp positions (so does a fully recomputed block's input), and so does the normed x
    the column-parallel layers share (kept as this rank's shard and all-gathered again in backward); the LM
    head's input is kept whole (once per micro-batch, not per layer)."""
    a = DTYPE_BYTES[dtype]
    n = micro_batch * config.sequence_len  # tokens
    C, D = config.n_embd, config.head_dim
    h = config.n_head // tp
    kv = config.n_kv_head // tp if config.n_kv_head % tp == 0 else 1
    v_local = min(padded_vocab_size(config.vocab_size, tp) // tp, config.vocab_size)
    s = tp if sequence_parallel and tp > 1 else 1  # the residual stream's positions are split s ways
    # both rmsnorms' inputs and 1/rms, and the normed x that q, k, v and c_fc share (their saved input)
    sequence = 2 * (2 * n * a * C + n * 4) // s
    block = sequence + n * a * (3 * h * D + 3 * kv * D + 4 * C // tp) + n * 4 * (2 * h + kv)
    if checkpointing == "full":
        block = n * a * C // s
    elif checkpointing == "selective":
        block -= n * 4 * h
    embedding = n * 8 + (n if tp > 1 else 0) + (n * a * C + n * 4) // s
    if fused_head_loss:  # the gradients formed in forward: d hidden [n, C] (in place of the LM head's input), fp32 d W
        head = (n * a * C + n * 4) // s + n * a * C + 4 * v_local * C
    else:  # the LM head's input, the targets, log-sum-exp and loss weights, and the logits
        head = (n * a * C + n * 4) // s + n * a * C + n * (8 + 4 + 4) + n * a * v_local
    return {"embedding": embedding, "block": block, "head": head}


def stage_activation_bytes(job: Job, layout: Layout, stage: int) -> int:
    """Saved bytes of one micro-batch's forward through one pipeline stage's layers."""
    per = activation_bytes(job.config, layout.tp, layout.micro_batch, job.dtype, job.fused_head_loss,
                           layout.checkpointing, layout.sequence_parallel)
    return sum(per[layer.kind] for layer in stage_layers(job.config, layout.tp, layout.pp, stage))


def head_chunk_tokens(v_local: int, dtype: str) -> int:
    """Tokens per chunk of the fused LM head + loss: megachat.tensor_parallel.loss_chunk_tokens (a chunk's logits
    within LOSS_CHUNK_BYTES)."""
    return loss_chunk_tokens(v_local, torch.bfloat16 if dtype == "bf16" else torch.float32)


def in_flight(pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations a stage holds at once under DeepSpeed's 1F1B TrainSchedule."""
    return min(pp - stage, micro_batches)


# --- model states -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed settings the memory model reads (configs/ds/zero{Z}_{dtype}.json, DeepSpeed's defaults)."""
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    prefetch_bucket_size: int = 50_000_000
    max_reuse_distance: int = 1_000_000_000
    max_live_parameters: int = 1_000_000_000
    param_persistence_threshold: int = 100_000


@lru_cache(maxsize=32)
def zero_settings(zero: int, dtype: str, ds_config: str | None = None, model_numel: int | None = None,
                  layer_numel: int | None = None) -> ZeroSettings:
    """Read the DeepSpeed JSON the trainer would use and fill in what megachat.build.ds_config sizes from the model
    (build.zero_buckets, given the unsharded model's and its largest layer's elements), then DeepSpeed's defaults."""
    path = Path(ds_config) if ds_config else CONFIG_DIR / f"zero{zero}_{dtype}.json"
    z = json.loads(path.read_text()).get("zero_optimization", {})
    if zero >= 1 and model_numel is not None:
        z = {**zero_buckets(zero, model_numel, layer_numel), **z}
    d = ZeroSettings()
    return ZeroSettings(reduce_bucket_size=int(z.get("reduce_bucket_size", d.reduce_bucket_size)),
                        overlap_comm=bool(z.get("overlap_comm", zero == 3)),
                        prefetch_bucket_size=int(z.get("stage3_prefetch_bucket_size", d.prefetch_bucket_size)),
                        max_reuse_distance=int(z.get("stage3_max_reuse_distance", d.max_reuse_distance)),
                        max_live_parameters=int(z.get("stage3_max_live_parameters", d.max_live_parameters)),
                        param_persistence_threshold=int(z.get("stage3_param_persistence_threshold",
                                                              d.param_persistence_threshold)))


def job_zero_settings(job: Job, zero: int, ds_config: str | None = None) -> ZeroSettings:
    """zero_settings for this job's model, as megachat.build.ds_config sizes them."""
    layers = layer_params(job.config, 1)
    return zero_settings(zero, job.dtype, ds_config, sum(sum(layer.numels) for layer in layers),
                         max(sum(layer.numels) for layer in layers))


def held_elements(layers, dp: int, zero: int) -> list[dict[str, int]]:
    """Per dp rank: the elements of each optimizer kind ("matrix" for Muon, "adam") it holds of this stage.

    ZeRO-0: everything; ZeRO-1/2: rank d holds [d*P, (d+1)*P) of the flattened stage (P = ceil(N / dp)), in
    parameter order; ZeRO-3: ceil(n / dp) of every parameter."""
    params = [(n, "matrix" if k == "matrix" else "adam") for layer in layers
              for n, k in zip(layer.numels, layer.optim_kinds)]
    if zero == 0 or dp == 1:
        total = {"matrix": 0, "adam": 0}
        for n, k in params:
            total[k] += n
        return [total] * dp
    out = [{"matrix": 0, "adam": 0} for _ in range(dp)]
    if zero == 3:
        for n, k in params:
            for d in range(dp):
                ps = -(-n // dp)
                out[d][k] += max(0, min(n, (d + 1) * ps) - d * ps)
        return out
    size = -(-sum(n for n, _ in params) // dp)
    offset = 0
    for n, k in params:
        for d in range(dp):
            out[d][k] += max(0, min(offset + n, (d + 1) * size) - max(offset, d * size))
        offset += n
    return out


def model_state_bytes(layers, dp: int, zero: int, dtype: str, settings: ZeroSettings,
                      dp_rank: int | None = None, micro_batches: int = 1) -> dict[str, float]:
    """weights, grads, optimizer (fp32 master + Muon momentum + AdamW moments) and buffers (DeepSpeed's gradient
    buckets; ZeRO-3's persistent whole parameters go to weights) of one dp rank of a stage (None: the rank holding
    the most), at their most during a step of `micro_batches` micro-batches per rank."""
    w = DTYPE_BYTES[dtype]
    numels = [n for layer in layers for n in layer.numels]
    N = sum(numels)
    held = held_elements(layers, dp, zero)
    ranks = range(dp) if dp_rank is None else [dp_rank]
    state = max(4 * held[d]["matrix"] + 8 * held[d]["adam"] for d in ranks)
    part = max(held[d]["matrix"] + held[d]["adam"] for d in ranks)
    out = {"weights": 0.0, "grads": 0.0, "optimizer": float(state), "buffers": 0.0}
    if zero == 0:  # fp32 only (check_config refuses bf16 at ZeRO-0): the engine's .grad and the client optimizer
        out.update(weights=w * N, grads=4 * N)
        return out
    # DeepSpeed's fp32 master partition; in fp32 it is the weights' own (deepspeed_internals.share_fp32_master)
    if dtype != "fp32":
        out["optimizer"] += 4 * part
    if zero == 3:
        persistent = sum(n for n in numels if n < settings.param_persistence_threshold)
        out.update(weights=w * part + w * persistent, grads=4 * part,
                   buffers=w * settings.reduce_bucket_size)  # stage 3's ipg bucket, in the parameters' dtype
        return out
    out["weights"] = w * N
    if zero == 1 and dtype == "bf16":  # BF16_Optimizer: full fp32 accumulation + bf16 .grad until next backward
        out["grads"] = 4 * N + w * N
        return out
    # DeepSpeedZeroOptimizer: ZeRO-1 keeps the full fp32 .grad between micro-batches and stages fp32 in its bucket;
    # ZeRO-2 keeps only the fp32 partition and stages each backward's gradients in the model dtype
    out["grads"] = 4 * N if zero == 1 else 4 * part
    if zero == 2 and dtype == "fp32" and micro_batches > 1:
        # DeepSpeed 0.19's fp32 path keeps the partition accumulated so far beside the one each further backward
        # reduces into, and adds them at its end (bf16 accumulates into one fp32 partition)
        out["grads"] = 8 * part
    out["buffers"] = (4 if zero == 1 else w) * settings.reduce_bucket_size * (2 if settings.overlap_comm else 1)
    return out


def predict_gathered_bytes(layers, zero: int, dtype: str, settings: ZeroSettings) -> float:
    """ZeRO-3's whole copies of partitioned parameters (those not below stage3_param_persistence_threshold) alive at
    once during forward and backward: DeepSpeed prefetches while fewer than stage3_max_live_parameters are gathered,
    always fetches the module it runs (at most the largest layer); what it keeps for reuse within
    stage3_max_reuse_distance counts among the live ones. With DeepSpeed's defaults (1e9 live) the whole stage."""
    if zero != 3:
        return 0.0
    sizes = [[n for n in layer.numels if n >= settings.param_persistence_threshold] for layer in layers]
    total = sum(sum(s) for s in sizes)
    largest = max(sum(s) for s in sizes)
    return DTYPE_BYTES[dtype] * min(total, settings.max_live_parameters + largest)


# --- one layout -------------------------------------------------------------------------------------------------

def _layer_flops(config: GPTConfig, layers, checkpointing: str = "none") -> float:
    """FLOPs per token of some layers: the model's (GPT.estimate_flops split by layer; the embedding lookup is
    free), plus what checkpointing recomputes in backward (full: the block's forward, a third; selective: the
    attention core's forward, a third of its 12 x heads x head_dim x T)."""
    attention = 12 * config.n_head * config.head_dim * config.sequence_len
    recompute = {"none": 0.0, "selective": 1 / 3, "full": 1 / 3}[checkpointing]
    total = 0.0
    for layer in layers:
        if layer.kind == "block":
            block = 6 * sum(layer.full_numels) + attention
            total += block + recompute * (block if checkpointing == "full" else attention)
        elif layer.kind == "head":
            total += 6 * sum(layer.full_numels)
    return total


def _ns_flops(shape) -> float:
    m, n = sorted(shape)
    return NS_STEPS * (4 * m * m * n + 2 * m ** 3)


def _spans_nodes(ranks_from: int, ranks_count: int, stride: int, hw: Hardware) -> int:
    """How many nodes a group of ranks (ranks_from + stride * i, i < ranks_count) spans."""
    return len({(ranks_from + stride * i) // hw.gpus_per_node for i in range(ranks_count)})


def _group_busbw(members: int, nodes: int, hw: Hardware) -> float:
    """NCCL bus bandwidth of a collective over `members` ranks on `nodes` nodes: NVLink inside one node; across
    nodes the NICs of the group's members on a node (and of the concurrent groups beside it) carry it."""
    if nodes <= 1:
        return hw.nvlink_busbw
    return min(hw.nvlink_busbw, members / nodes * hw.ib_busbw_per_gpu)


def predict_memory(job: Job, layout: Layout, hw: Hardware, settings: ZeroSettings, stage: int) -> Memory:
    """Peak bytes of the stage's most loaded dp rank (see the module docstring)."""
    c, a = job.config, DTYPE_BYTES[job.dtype]
    layers = stage_layers(c, layout.tp, layout.pp, stage)
    m = job.global_batch // (layout.micro_batch * layout.dp)
    states = model_state_bytes(layers, layout.dp, layout.zero, job.dtype, settings, micro_batches=m)
    n = layout.micro_batch * c.sequence_len
    flight = in_flight(layout.pp, stage, m)
    acts = stage_activation_bytes(job, layout, stage) * flight
    if layout.pp > 1:  # the pipe engine's buffers per micro-batch in flight: the received input (all but the first
        # stage) and the output kept for its backward (all but the last; DeepSpeed empties it when tp > 1 and it
        # partitions the message; under sequence parallelism each tp rank sends and keeps its own T / tp shard)
        sp = layout.sequence_parallel
        acts += flight * n * c.n_embd * a * ((stage > 0) + (stage < layout.pp - 1 and (layout.tp == 1 or sp))) \
            // (layout.tp if sp else 1)
    # backward transients: the logits' gradient (or one fused chunk) on the head stage; one block's activation
    # gradients ([tokens, 4C/tp] twice, [tokens, C] twice) anywhere
    v_local = padded_vocab_size(c.vocab_size, layout.tp) // layout.tp
    head = any(layer.kind == "head" for layer in layers)
    if not head:
        logits_grad = 0
    elif job.fused_head_loss:  # one chunk's logits and their gradient (at the end of forward, beside d hidden and d W,
        # which the activations count); backward scales those in place and casts d W to the weights' dtype
        logits_grad = max(2 * min(n, head_chunk_tokens(v_local, job.dtype)) * v_local * a,
                          v_local * c.n_embd * a if a != 4 else 0)
    else:  # the logits' gradient
        logits_grad = n * v_local * a
    backward = max(logits_grad, n * a * (2 * 4 * c.n_embd // layout.tp + 2 * c.n_embd))
    if layout.checkpointing == "full":  # the block being recomputed holds its activations again
        backward += activation_bytes(c, layout.tp, layout.micro_batch, job.dtype)["block"]
    N = sum(sum(layer.numels) for layer in layers)
    if layout.zero == 3:  # gathered parameters
        backward += predict_gathered_bytes(layers, layout.zero, job.dtype, settings)
    elif layout.zero == 1 and job.dtype == "bf16" and layout.dp > 1:  # the engine's flattened all-reduce bucket
        backward += 4 * min(N, settings.reduce_bucket_size)
    # optimizer-step transients: Muon's packed fp32 g/update (x3) and whole matrices at their owners (gathered,
    # orthogonalized, scattered: x3), in fp32
    held = held_elements(layers, layout.dp, layout.zero)
    matrix_held = max(h["matrix"] for h in held)
    stage_ranks = layout.tp * layout.dp
    matrices_full = sum(f for layer in layers for f, k in zip(layer.full_numels, layer.optim_kinds) if k == "matrix")
    biggest = max((f for layer in layers for f, k in zip(layer.full_numels, layer.optim_kinds) if k == "matrix"),
                  default=0)
    optimizer = 4 * 3 * matrix_held + 4 * 3 * max(matrices_full / stage_ranks, biggest)
    rope = sum(layer.buffer_bytes for layer in layers)  # bf16 cos/sin of 10 x sequence_len rows per block
    workspace = states["buffers"] + rope + hw.runtime_reserve + max(backward, optimizer)
    return Memory(weights=states["weights"], grads=states["grads"], optimizer=states["optimizer"],
                  activations=acts, workspace=workspace)


def predict_time(job: Job, layout: Layout, hw: Hardware, settings: ZeroSettings) -> StepTime:
    """Seconds per optimizer step (see the module docstring)."""
    c, a = job.config, DTYPE_BYTES[job.dtype]
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    m = job.global_batch // (layout.micro_batch * dp)
    n = layout.micro_batch * c.sequence_len
    flops_rate = hw.peak_flops * hw.matmul_efficiency
    act = n * c.n_embd * a
    tp_nodes = _spans_nodes(0, tp, 1, hw)
    tp_ar = 2 * (tp - 1) / tp * act / _group_busbw(tp, tp_nodes, hw) if tp > 1 else 0.0
    # a block's tp collectives in all-reduce equivalents: 2 forward, 2 backward; under sequence parallelism an
    # all-gather + reduce-scatter pair replaces each all-reduce, plus the 2 re-gathers of the column inputs
    per_block = 5 if layout.sequence_parallel else 4
    stage_ranks = tp * dp
    crosses = pp > 1 and _spans_nodes(0, 2, stage_ranks, hw) > 1
    # DeepSpeed sends 1/tp of the activation from each tp rank and all-gathers it inside the tp group; under
    # sequence parallelism each tp rank sends its own 1/tp and nothing is gathered
    p2p = 2 * (act / tp / (hw.ib_busbw_per_gpu if crosses else hw.nvlink_busbw)
               + (0 if layout.sequence_parallel else (tp - 1) / tp * act / hw.nvlink_busbw)) if pp > 1 else 0.0
    dp_nodes = _spans_nodes(0, dp, tp, hw)
    dp_bw = _group_busbw(dp, dp_nodes, hw)
    w = DTYPE_BYTES[job.dtype]
    stages = []
    for s in range(pp):
        layers = stage_layers(c, tp, pp, s)
        N = sum(sum(layer.numels) for layer in layers)
        f = (dp - 1) / dp
        if layout.zero == 3:  # per micro-batch: gather for forward, re-gather what was released, reduce-scatter
            released = max(0, N - settings.max_reuse_distance // 2 - settings.prefetch_bucket_size)
            dp_micro, dp_step = f * (w * N + w * released + w * N) / dp_bw, 0.0
        elif layout.zero == 2:  # reduce-scatter every micro-batch, all-gather the weights once
            dp_micro, dp_step = f * w * N / dp_bw, f * w * N / dp_bw
        else:  # all-reduce the fp32 gradients once, then (ZeRO-1) all-gather the weights
            dp_micro, dp_step = 0.0, 2 * f * 4 * N / dp_bw + (f * w * N / dp_bw if layout.zero == 1 else 0.0)
        # Muon: two all_to_alls of each matrix's fp32 elements (to its owner, back to its holders)
        shapes = [shape for layer in layers for shape, k in zip(layer.full_shapes, layer.optim_kinds)
                  if k == "matrix"]
        m_full = sum(math.prod(shape) for shape in shapes)
        back = m_full / tp if layout.zero == 0 else m_full / stage_ranks  # ZeRO-0: every dp replica gets it back
        stage_nodes = _spans_nodes(s * stage_ranks, stage_ranks, 1, hw)
        a2a_bw = hw.nvlink_busbw if stage_nodes <= 1 else hw.ib_busbw_per_gpu / (1 - 1 / stage_nodes)
        exchange = 4 * (m_full / stage_ranks + back) * (stage_ranks - 1) / stage_ranks / a2a_bw
        ns = max(sum(_ns_flops(shape) for shape in shapes) / stage_ranks,
                 max((_ns_flops(shape) for shape in shapes), default=0.0)) / flops_rate
        held = max(h["matrix"] + h["adam"] for h in held_elements(layers, dp, layout.zero))
        stages.append(_StageTime(
            compute=_layer_flops(c, layers, layout.checkpointing) * n / tp / flops_rate,
            tp_comm=sum(per_block if layer.kind == "block" else 1 for layer in layers) * tp_ar,  # embedding, head: 1
            pp_comm=p2p, dp_micro=dp_micro, dp_step=dp_step,
            optimizer=exchange + ns + OPTIMIZER_BYTES_PER_ELEMENT * held / hw.hbm_bandwidth))
    slowest = max(stages, key=lambda t: t.micro)
    return StepTime(compute=m * slowest.compute, tp_comm=m * slowest.tp_comm, pp_comm=m * slowest.pp_comm,
                    bubble=(pp - 1) * slowest.micro, dp_comm=m * slowest.dp_micro + max(t.dp_step for t in stages),
                    muon=max(t.optimizer for t in stages))


@dataclass
class _StageTime:
    """One pipeline stage's seconds: per micro-batch (compute, tp, pp, dp_micro) and per step (dp_step, optimizer)."""
    compute: float
    tp_comm: float
    pp_comm: float
    dp_micro: float
    dp_step: float
    optimizer: float

    @property
    def micro(self) -> float:
        return self.compute + self.tp_comm + self.pp_comm + self.dp_micro


def predict(job: Job, layout: Layout, hw: Hardware = Hardware(), ds_config: str | None = None) -> Prediction:
    """Memory (the stage that needs the most) and step time of one layout; no validity check (see plan)."""
    settings = job_zero_settings(job, layout.zero, ds_config)
    memories = [predict_memory(job, layout, hw, settings, s) for s in range(layout.pp)]
    stage = max(range(layout.pp), key=lambda s: memories[s].total)
    time = predict_time(job, layout, hw, settings)
    flops = flops_per_token(job.config)
    tokens_per_s = job.total_batch_size / time.total
    return Prediction(layout=layout, memory=memories[stage], stage=stage, time=time,
                      mfu=flops * tokens_per_s / (layout.world * hw.peak_flops), tokens_per_s=tokens_per_s,
                      micro_batches=job.global_batch // (layout.micro_batch * layout.dp))


# --- every layout ------------------------------------------------------------------------------------------------

@dataclass
class Rejection:
    layout: dict  # the layout's fixed parts (tp, pp, dp, zero, and micro_batch where it matters)
    reason: str


@dataclass
class Plan:
    fits: list[Prediction] = field(default_factory=list)  # fastest first
    too_big: list[Prediction] = field(default_factory=list)  # valid for megachat, over the memory
    rejected: list[Rejection] = field(default_factory=list)

    def pick(self, hw: Hardware) -> Prediction | None:
        """The layout to train with, chosen as by hand: among those within PICK_TIME_SLACK of the fastest step
        (the time model is not more precise than that) that leave PICK_MEMORY_HEADROOM of the GPU free, no
        recomputation before selective before full, then the lowest ZeRO stage (the least communication), then
        the fewest model-parallel ranks (tp x pp), then the largest
        micro-batch (the time model does not see that small micro-batches run less efficient matmuls), then the
        least memory. When none of the near-fastest leaves the headroom: the fastest that does, else the fastest."""
        if not self.fits:
            return None
        roomy = [p for p in self.fits if p.memory.total <= (1 - PICK_MEMORY_HEADROOM) * hw.memory]
        near = [p for p in roomy if p.time.total <= (1 + PICK_TIME_SLACK) * self.fits[0].time.total]
        if not near:
            return (roomy or self.fits)[0]
        return min(near, key=lambda p: (CHECKPOINTING.index(p.layout.checkpointing), p.layout.zero,
                                        p.layout.tp * p.layout.pp, -p.layout.micro_batch, p.memory.total))


def layout_error(job: Job, layout: Layout, hw: Hardware, world: int | None = None) -> str | None:
    """Why megachat would refuse this layout on `world` GPUs (default layout.world): train_config.check_config's
    message, or the planner's own rule that tp stays inside a node; None when it is valid."""
    if layout.tp > hw.gpus_per_node or hw.gpus_per_node % layout.tp:
        return (f"--tp {layout.tp} does not fit in a node of {hw.gpus_per_node} GPUs: tensor parallelism all-reduces "
                f"every layer's activations and must stay on one node's NVLink; use a tp dividing "
                f"{hw.gpus_per_node}")
    cfg = TrainConfig(depth=job.config.n_layer, vocab_size=job.config.vocab_size, seq_len=job.config.sequence_len,
                      device_batch_size=layout.micro_batch, total_batch_size=job.total_batch_size,
                      num_iterations=1, tp=layout.tp, pp=layout.pp, zero=layout.zero, dtype=job.dtype,
                      n_kv_head=job.config.n_kv_head,
                      sequence_parallel=layout.sequence_parallel,
                      **({"activation_checkpointing": layout.checkpointing} if layout.checkpointing != "none" else {}))
    if vars(cfg.model_config()) != vars(job.config):
        return f"the model {job.config} is not nanochat's sizing for depth {job.config.n_layer}: megachat trains " \
               f"depth-sized models only"
    try:
        check_config(cfg, layout.world if world is None else world)
    except ValueError as e:
        return str(e)
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(job: Job, nodes: int, hw: Hardware = Hardware(), *, tp: int | None = None, pp: int | None = None,
         dp: int | None = None, zero: int | None = None, micro_batch: int | None = None,
         checkpointing: str | None = None, sequence_parallel: bool | None = None, ds_config: str | None = None) -> Plan:
    """Every layout of nodes x hw.gpus_per_node GPUs (fixed parts as given), predicted and ranked: those that fit
    by step time (Plan.pick chooses among them), those over the memory by their total, and the rejected ones with
    megachat's reason (each reason once per tp, pp, dp, ZeRO stage, and per micro-batch where it depends on it)."""
    world = nodes * hw.gpus_per_node
    out = Plan()
    if dp and world % dp:
        out.rejected.append(Rejection({"dp": dp}, f"--dp {dp} does not divide the {nodes} x {hw.gpus_per_node} = "
                                                  f"{world} GPUs (world = tp x pp x dp); use a dp dividing {world}"))
        return out
    for t in [tp] if tp else [t for t in _divisors(world) if t <= hw.gpus_per_node]:
        for p in [pp] if pp else _divisors(world // t) if world % t == 0 else [1]:
            d = world // (t * p) if world % (t * p) == 0 else None
            if dp and d is not None and d != dp:
                if tp and pp:
                    out.rejected.append(Rejection({"tp": t, "pp": p, "dp": dp}, f"tp x pp x dp = {t * p * dp} GPUs, "
                                                  f"but {world} are planned: with tp {t} and pp {p}, dp is {d}"))
                continue
            for z in [zero] if zero is not None else [0, 1, 2, 3]:
                valid_batch = d is not None and job.global_batch % d == 0
                batches = [micro_batch] if micro_batch else _divisors(job.global_batch // d) if valid_batch else [1]
                sps = [sequence_parallel] if sequence_parallel is not None else [False, True] if t > 1 else [False]
                for b, ck, sp in itertools.product(batches, [checkpointing] if checkpointing else CHECKPOINTING, sps):
                    layout = Layout(tp=t, pp=p, dp=d or 1, zero=z, micro_batch=b, checkpointing=ck,
                                    sequence_parallel=sp)
                    err = layout_error(job, layout, hw, world)
                    if err:
                        keys = {"tp": t, "pp": p, **({"dp": d} if d else {}), "zero": z,
                                **({"checkpointing": ck} if checkpointing else {})}
                        if micro_batch or "batch" in err:
                            keys["micro_batch"] = b
                        if not any(r.layout == keys for r in out.rejected):
                            out.rejected.append(Rejection(keys, err))
                        continue
                    pred = predict(job, layout, hw, ds_config)
                    (out.fits if pred.fits(hw) else out.too_big).append(pred)
    out.fits.sort(key=lambda p: (p.time.total, p.memory.total))
    out.too_big.sort(key=lambda p: p.memory.total)
    return out


def memory_reason(pred: Prediction, hw: Hardware) -> str:
    m = pred.memory
    return (f"needs {m.total / GiB:.1f} GiB > {hw.memory / GiB:.0f} GiB on stage {pred.stage} (weights "
            f"{m.weights / GiB:.1f}, grads {m.grads / GiB:.1f}, optimizer {m.optimizer / GiB:.1f}, activations "
            f"{m.activations / GiB:.1f}, workspace {m.workspace / GiB:.1f})")
