"""The GPT of nanochat@885a4f2 (its gpt.py), built from tensor-parallel layers.

- token embedding -> RMSNorm -> blocks -> RMSNorm -> LM head (untied), no biases, param-free RMSNorm
- block: x = x + attn(norm(x)); x = x + mlp(norm(x))
- attention: separate q, k, v, proj; RoPE (half-split, base 10000, bf16 cos/sin for 10 x sequence_len), then
  QK-norm; causal attention with GQA (n_kv_head < n_head) through megachat.kernels.attention
- MLP: c_fc d -> 4d, relu(x)^2, c_proj 4d -> d
- logits: 15 * tanh(logits / 15); loss: cross-entropy with ignore_index -1, computed on the vocab shard; with
  targets the LM head and the loss run fused, a chunk of tokens at a time (`GPT.head_loss`): no logits tensor
- init: linear N(0, 1/sqrt(fan_in) * min(1, sqrt(fan_out / fan_in))), embedding N(0, 1), lm_head and both c_proj 0

Tensor parallelism (megachat/tensor_parallel.py) splits heads, the MLP width and the vocab over `grid.tp`
ranks, and with `set_sequence_parallel` the sequence outside them while training; with tp = 1 the model is exactly the plain one (same shapes and math as nanochat). Parameter names are
nanochat's, so nanochat checkpoints load with `load_nanochat_state_dict` and `full_state_dict` writes them.
Built on the meta device, then only this rank's part is allocated: `build_model(config, grid, device,
weights=... | seed=...)` is the one way every entry point (training, evaluation, sampling) gets a model.
`GPT.layers()` is the model as a sequence of stages, [EmbeddingStage, Block x n_layer, HeadStage];
`GPT.forward` is the loop over them, and megachat/pipeline.py splits the same list over pipeline stages. For a
loss, `layers(fused_loss=True)` ends in the normalised hidden state and `GPT.head_loss` is the head and loss.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megachat import kernels
from megachat.parallel import Grid, check_layout
from megachat.pipeline import stage_layers
from megachat.tensor_parallel import (ColumnParallelLinear, HeadReplicatedLinear, RowParallelLinear,
                                      VocabParallelEmbedding, VocabParallelLMHead, enter_tp_region,
                                      SequenceShard, gather_tensor, gather_vocab_logits, padded_vocab_size,
                                      sequence_parallel_now, shard_tensor, tp_group_of, vocab_parallel_loss)

SOFTCAP = 15.0
ROPE_BASE = 10000


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10  # query heads
    n_kv_head: int = 10  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 1280

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd = {self.n_embd} is not divisible by n_head = {self.n_head}: pick n_head so "
                             f"that head_dim = n_embd / n_head is a whole number")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head = {self.n_head} is not a multiple of n_kv_head = {self.n_kv_head}: GQA "
                             f"shares each KV head among n_head / n_kv_head query heads")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head_dim = {self.n_embd // self.n_head} is odd: RoPE rotates pairs of channels, "
                             f"so n_embd / n_head must be even")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth, vocab_size, sequence_len, n_kv_head=None):
        """nanochat's sizing: n_layer = depth, n_embd = 64 * depth, n_head = ceil(n_embd / 128)."""
        if depth < 1:
            raise ValueError(f"--depth {depth} must be >= 1")
        n_embd = 64 * depth
        n_head = -(-n_embd // 128)
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                   n_kv_head=n_head if n_kv_head is None else n_kv_head, n_embd=n_embd)


def nanochat_shapes(config):
    """{nanochat parameter name: full (unsharded, unpadded) shape}, in nanochat's parameter order."""
    C, D = config.n_embd, config.head_dim
    shapes = {"transformer.wte.weight": (config.vocab_size, C)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({p + "attn.c_q.weight": (config.n_head * D, C), p + "attn.c_k.weight": (config.n_kv_head * D, C),
                       p + "attn.c_v.weight": (config.n_kv_head * D, C), p + "attn.c_proj.weight": (C, C),
                       p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_proj.weight": (C, 4 * C)})
    shapes["lm_head.weight"] = (config.vocab_size, C)
    return shapes


def check_tp(config, grid):
    """Raise ValueError when tp cannot split this model: query heads must split evenly, and KV heads either split
    evenly or (fewer KV heads than ranks) each be shared by a whole number of ranks."""
    check_layout(grid.world, grid.tp, grid.pp, n_layer=config.n_layer, n_head=config.n_head,
                 n_kv_head=config.n_kv_head, vocab_size=padded_vocab_size(config.vocab_size, grid.tp))


def rotary_tables(seq_len, head_dim, device=None):
    """cos, sin [seq_len, head_dim // 2] in bf16, as nanochat computes them (fp32 math, then cast)."""
    channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (ROPE_BASE ** (channel_range / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos().bfloat16(), freqs.sin().bfloat16()


class CausalSelfAttention(nn.Module):
    def __init__(self, config, grid, layer_idx=0):
        super().__init__()
        C, D, tp = config.n_embd, config.head_dim, grid.tp
        self.layer_idx = layer_idx  # its slot in a KV cache
        self.recompute_core = False  # GPT.set_activation_checkpointing("selective")
        self.sequence_parallel = False  # GPT.set_sequence_parallel: x is this rank's [B, T/tp, C] while training
        self.regather = True  # re-gather the sequence in backward instead of keeping it (off under full recompute)
        self.head_dim = D
        self.n_head = config.n_head // tp  # local query heads
        self.group = tp_group_of(grid)
        self.c_q = ColumnParallelLinear(C, config.n_head * D, grid)
        if config.n_kv_head % tp == 0:
            self.n_kv_head = config.n_kv_head // tp
            self.c_k = ColumnParallelLinear(C, config.n_kv_head * D, grid)
            self.c_v = ColumnParallelLinear(C, config.n_kv_head * D, grid)
        else:  # fewer KV heads than tp ranks: each rank computes the one KV head its query heads share
            self.n_kv_head = 1
            self.c_k = HeadReplicatedLinear(C, config.n_kv_head, D, grid)
            self.c_v = HeadReplicatedLinear(C, config.n_kv_head, D, grid)
        self.c_proj = RowParallelLinear(C, C, grid)
        # Per-block (non-persistent) tables so each pipeline stage is self-contained: DeepSpeed pipes only the
        # hidden state between stages. 10 x sequence_len rows leave room for inference past the training length.
        cos, sin = rotary_tables(10 * config.sequence_len, D)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_rotary(self):
        """Recompute cos/sin on the buffers' device (after to_empty, whose buffers hold garbage)."""
        self.cos, self.sin = rotary_tables(self.cos.size(0), self.head_dim, self.cos.device)

    def forward(self, x, cache=None):
        """x [B, T, C] -> [B, T, C] (under sequence parallelism while training, this rank's [B, T/tp, C] in and out).
        cache: a megachat.engine.KVCache holding the earlier tokens' keys and values (inference): x's tokens come
        after them, at each row's own positions."""
        sp = sequence_parallel_now(self.sequence_parallel)
        full = enter_tp_region(x, self.group, sp)  # one all-reduce (or gather) in backward for q, k and v together
        B, T, _ = full.shape
        shared = SequenceShard(x, self.group, users=3) if sp and self.regather else None
        q = self.c_q(full, shared).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(full, shared).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(full, shared).view(B, T, self.n_kv_head, self.head_dim)
        q, k = kernels.rope_qk(q, k, self.cos, self.sin, 0 if cache is None else cache.positions())
        q, k = kernels.rmsnorm(q), kernels.rmsnorm(k)  # QK-norm, after RoPE as in nanochat
        if cache is None and self.recompute_core and torch.is_grad_enabled():
            # selective recomputation: the attention core's saved output and softmax statistics are recomputed
            # in backward from q, k, v (which the projections' backward needs anyway)
            y = checkpoint(kernels.attention, q, k, v, use_reentrant=False)
        elif cache is None:
            y = kernels.attention(q, k, v, causal=True)
        else:
            k, v, mask = cache.update(self.layer_idx, k, v)
            y = kernels.attention(q, k, v, mask=mask)
        return self.c_proj(y.reshape(B, T, -1), sp)


class MLP(nn.Module):
    def __init__(self, config, grid):
        super().__init__()
        self.group = tp_group_of(grid)
        self.sequence_parallel = False  # GPT.set_sequence_parallel
        self.regather = True  # as CausalSelfAttention.regather
        self.c_fc = ColumnParallelLinear(config.n_embd, 4 * config.n_embd, grid)
        self.c_proj = RowParallelLinear(4 * config.n_embd, config.n_embd, grid)

    def forward(self, x):
        sp = sequence_parallel_now(self.sequence_parallel)
        shared = SequenceShard(x, self.group, users=1) if sp and self.regather else None
        return self.c_proj(kernels.relu2(self.c_fc(enter_tp_region(x, self.group, sp), shared)), sp)


class Block(nn.Module):
    """One transformer block; also one pipeline stage: hidden state [B, T, C] in and out."""

    def __init__(self, config, grid, layer_idx=0):
        super().__init__()
        self.attn = CausalSelfAttention(config, grid, layer_idx)
        self.mlp = MLP(config, grid)
        self.recompute = False  # GPT.set_activation_checkpointing("full"): keep only the block's input

    def forward(self, x, cache=None):
        if self.recompute and cache is None and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x, cache)

    def _forward(self, x, cache=None):
        x = x + self.attn(kernels.rmsnorm(x), cache)
        return x + self.mlp(kernels.rmsnorm(x))


class EmbeddingStage(nn.Module):
    """Pipeline stage 0: idx [B, T] int64 -> norm(wte(idx)) [B, T, C] (under sequence parallelism this rank's
    [B, T/tp, C])."""

    def __init__(self, wte):
        super().__init__()
        self.wte = wte

    def forward(self, idx, cache=None):
        return kernels.rmsnorm(self.wte(idx, sequence_parallel_now(self.wte.sequence_parallel)))


class HeadStage(nn.Module):
    """Last pipeline stage: x [B, T, C] -> raw (un-capped) logits [B, T, V_local] of this rank's vocab shard, or
    with fused_loss the normalised hidden state [B, T, C] in the tp region, for GPT.head_loss (the LM head and the
    loss in one, never holding the logits)."""

    def __init__(self, lm_head, fused_loss=False):
        super().__init__()
        self.lm_head = lm_head
        self.group = lm_head.group
        self.fused_loss = fused_loss

    def forward(self, x, cache=None):
        x = enter_tp_region(kernels.rmsnorm(x), self.group, sequence_parallel_now(self.lm_head.sequence_parallel))
        return x if self.fused_loss else self.lm_head(x)


class GPT(nn.Module):
    def __init__(self, config, grid=None):
        super().__init__()
        grid = Grid() if grid is None else grid
        check_tp(config, grid)
        self.config, self.grid = config, grid
        self.transformer = nn.ModuleDict(dict(
            wte=VocabParallelEmbedding(config.vocab_size, config.n_embd, grid),
            h=nn.ModuleList([Block(config, grid, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = VocabParallelLMHead(config.n_embd, config.vocab_size, grid)

    def set_activation_checkpointing(self, mode: str) -> None:
        """"none"; "full": each block keeps only its input and recomputes the rest in backward; "selective": the
        attention core (output, softmax statistics) is recomputed, the matmul outputs kept (Megatron's selective
        recomputation; the MLP's relu² already keeps only its output, which c_proj needs anyway)."""
        if mode not in ("none", "full", "selective"):
            raise ValueError(f"--activation-checkpointing {mode!r}: use none, full or selective")
        for block in self.transformer.h:
            block.recompute, block.attn.recompute_core = mode == "full", mode == "selective"
            block.attn.regather = block.mlp.regather = mode != "full"

    def set_sequence_parallel(self, enabled: bool) -> None:
        """Megatron's sequence parallelism while training (tp > 1): the embedding, the norms and the residual
        stream hold T / tp positions per tp rank; the tp all-reduces become all-gathers and reduce-scatters (see
        megachat/tensor_parallel.py). The micro-batch's sequence length must divide by tp."""
        if enabled and self.grid.tp == 1:
            raise ValueError("--sequence-parallel splits the sequence over tensor-parallel ranks: it needs --tp > 1")
        self.transformer.wte.sequence_parallel = self.lm_head.sequence_parallel = enabled
        for block in self.transformer.h:
            block.attn.sequence_parallel = block.mlp.sequence_parallel = enabled

    def layers(self, fused_loss=False):
        """The model as a sequence of stages (the same module objects): idx [B, T] -> hidden state [B, T, C] ->
        ... -> raw (un-capped) logits [B, T, V_local], or with fused_loss the last stage's normalised hidden state
        for head_loss. megachat.pipeline splits this list over pipeline stages."""
        return [EmbeddingStage(self.transformer.wte), *self.transformer.h, HeadStage(self.lm_head, fused_loss)]

    def forward(self, idx, targets=None, loss_reduction="mean", cache=None):
        """idx [B, T] int64 -> softcapped logits [B, T, V_local] (this rank's vocab shard; all of it at tp = 1),
        or with targets [B, T] (-1 = ignored) the loss: mean over non-ignored tokens, or fp32 [B, T] for 'none'.
        cache: a megachat.engine.KVCache (inference): idx continues the cached tokens and is cached in turn; the
        logits are then the last position's only, [B, 1, V_local] (the next token's). With targets the logits are
        never materialized: the head and the loss run fused (head_loss)."""
        *layers, head = self.layers(fused_loss=targets is not None)
        x = idx
        for layer in layers:
            x = layer(x, cache)
        if cache is not None:
            cache.advance(idx.size(1))
            x = x[:, -1:]
        x = head(x)
        if targets is None:
            return kernels.softcap(x, SOFTCAP)
        return self.head_loss(x, targets, loss_reduction)

    def loss(self, logits, targets, reduction="mean"):
        """Raw local logits [B, T, V_local], targets [B, T] (-1 = ignored) -> softcapped cross-entropy over the
        vocab-parallel shards: the mean over non-ignored tokens, or fp32 [B, T] per token for 'none'. targets may
        be a pair (targets, weights fp32 [B, T]): then the weighted sum of the per-token losses (the trainer's
        normalisation over a whole global batch, and RL's advantages)."""
        head = self.lm_head
        return _weighted_loss(lambda y, r: vocab_parallel_loss(logits, y, head.vocab_start, head.group, r),
                              targets, reduction)

    def head_loss(self, hidden, targets, reduction="mean"):
        """loss(lm_head(hidden), targets, reduction) without the logits: hidden [B, T, C] is the normalised hidden
        state in the tp region (HeadStage(fused_loss=True)'s output); the LM head's matmul and the loss run fused,
        a chunk of tokens at a time (VocabParallelLMHead.loss). The loss_fn of the pipeline's last stage."""
        if isinstance(targets, (tuple, list)):  # the weights go into the fused loss: its gradient is formed in forward
            targets, weights = targets
            return self.lm_head.loss(hidden, targets, "sum", weights)
        return self.lm_head.loss(hidden, targets, reduction)

    def gather_logits(self, logits):
        """Local softcapped logits [.., V_local] -> full [.., vocab_size] on every tp rank (evaluation/tests only)."""
        return gather_vocab_logits(logits, self.config.vocab_size, self.lm_head.group)

    @torch.no_grad()
    def init_weights(self, seed, params=None):
        """nanochat's init, drawn for each full matrix from a generator seeded by (seed, parameter name) and sliced
        to this rank's shard, so every layout starts from the same weights. params: {name: parameter} to fill
        (default: every one not on the meta device, i.e. not of another pipeline stage's layers, and the RoPE
        tables recomputed)."""
        shapes = nanochat_shapes(self.config)
        for name, p in (self._materialized_parameters() if params is None else params).items():
            p.copy_(shard_tensor(init_full_weight(name, shapes[name], seed), p, self.grid.tp_rank, self.grid.tp))
        if params is None:
            self._reset_rotary()

    def _materialized_parameters(self):
        params = {n: p for n, p in self.named_parameters() if not p.is_meta}
        if not params:
            raise ValueError("every parameter is on the meta device: call model.to_empty(device=...) first")
        return params

    def _reset_rotary(self):
        for block in self.transformer.h:
            if not block.attn.cos.is_meta:
                block.attn.reset_rotary()

    def num_params(self):
        """Parameter count of the full (unsharded, unpadded) model."""
        return num_params(self.config)

    def estimate_flops(self):
        """Model FLOPs per token of the full model (flops_per_token)."""
        return flops_per_token(self.config)


def num_params(config: GPTConfig) -> int:
    """Parameter count of the full (unsharded, unpadded) model of `config`."""
    return sum(math.prod(s) for s in nanochat_shapes(config).values())


def flops_per_token(config: GPTConfig) -> int:
    """Model FLOPs per token of the full model of `config`, the one formula (nanochat's): 6 * (params - embedding
    params) + 12 * L * H * D * T."""
    c = config
    return 6 * (num_params(c) - c.vocab_size * c.n_embd) + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len


def _weighted_loss(loss_fn, targets, reduction):
    """loss_fn(targets, reduction) for targets [B, T]; for a pair (targets, weights fp32 [B, T]) the weighted sum
    of loss_fn's per-token losses."""
    if isinstance(targets, (tuple, list)):
        targets, weights = targets
        return (loss_fn(targets, "none") * weights).sum()
    return loss_fn(targets, reduction)


def init_full_weight(name, shape, seed):
    """nanochat's init of one full weight (fp32, CPU), drawn from a generator seeded by (seed, name).

    Drawing the full matrix on every rank and slicing it is fine at our sizes (d20: the largest is 84 M values);
    at d64 scale one would draw each shard from its own generator instead.
    """
    if name == "lm_head.weight" or name.endswith(".c_proj.weight"):
        return torch.zeros(shape)
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    fan_out, fan_in = shape
    std = 1.0 if name == "transformer.wte.weight" else 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
    return torch.empty(shape).normal_(0.0, std, generator=g)


@torch.no_grad()
def load_nanochat_state_dict(model, state_dict, params=None):
    """Load a nanochat state dict (full weights under nanochat's names; a `_orig_mod.` prefix from torch.compile
    is accepted) into this rank's shards. Parameters on the meta device (other pipeline stages) are skipped.
    params: {name: parameter} to fill (default: all of this rank's, and the RoPE tables recomputed)."""
    sd = state_dict  # a mapping that reads on access (megachat.hf.Weights) is read one tensor at a time below
    if any(k.startswith("_orig_mod.") for k in state_dict):
        sd = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    shapes = nanochat_shapes(model.config)
    missing, unexpected = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"state dict does not fit GPT({model.config}): missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}; load a checkpoint made for this model configuration")
    for name, shape in shapes.items():
        if tuple(sd[name].shape) != shape:
            raise ValueError(f"state dict entry {name} has shape {tuple(sd[name].shape)}, the model expects "
                             f"{shape}; load a checkpoint made for this model configuration")
    for name, p in (model._materialized_parameters() if params is None else params).items():
        p.copy_(shard_tensor(sd[name].to(p.device), p, model.grid.tp_rank, model.grid.tp))
    if params is None:
        model._reset_rotary()


@torch.no_grad()
def full_state_dict(model):
    """{nanochat name: full weight} gathered over the tp group (collective: every tp rank must call it), on the
    parameters' device. With pp > 1 it holds this stage's parameters only."""
    shapes = nanochat_shapes(model.config)
    group = tp_group_of(model.grid)
    return {name: gather_tensor(p.detach(), p, shapes[name], group).clone()
            for name, p in model._materialized_parameters().items()}


def build_model(config, grid=None, device="cpu", *, weights=None, seed=0, dtype=None):
    """The GPT on this rank: built on the meta device (no memory), then only what this rank runs is allocated on
    `device` (with pp > 1 its pipeline stage's layers; the rest stays on meta) and filled from `weights` (full
    weights under nanochat's names) or, without them, nanochat's init drawn from `seed` (each tp shard the slice
    of the same full init, so every layout starts equal). dtype: each layer is cast as soon as it is filled (None
    keeps fp32), so a rank holds one layer in fp32 beside the rest in dtype, not its whole shard in fp32 (d64 at
    tp 1, pp 1: 27 GB of bf16 instead of 54 GB of fp32 for a moment). The values are those of casting the whole
    fp32 model: each weight is filled in fp32, then cast."""
    grid = Grid() if grid is None else grid
    with torch.device("meta"):
        model = GPT(config, grid=grid)
    if weights is not None:
        load_nanochat_state_dict(model, weights, params={})  # the names and shapes checked before any allocation
    for layer in stage_layers(model, grid):
        layer.to_empty(device=device)
        mine = {id(p) for p in layer.parameters()}
        params = {n: p for n, p in model.named_parameters() if id(p) in mine}
        if weights is None:
            model.init_weights(seed, params)
        else:
            load_nanochat_state_dict(model, weights, params)
        if dtype is not None:
            layer.to(dtype)
    model._reset_rotary()
    return model
