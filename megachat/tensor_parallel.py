"""Megatron-style tensor-parallel layers, small and plain, and the helpers that move weights in and out of shards.

- `enter_tp_region` / `leave_tp_region`: the autograd functions of Megatron's TP. A block calls
  `enter_tp_region` once on the normed input of its column-parallel layers (identity forward, all-reduce
  backward), and each row-parallel layer ends in `leave_tp_region` (all-reduce forward, identity backward).
- Sequence parallelism (Megatron's, `GPT.set_sequence_parallel`): the residual stream and its norms hold T / tp
  positions on each tp rank; `enter_tp_region` all-gathers the sequence (reduce-scatter in backward) and
  `leave_tp_region` reduce-scatters the row-parallel partial sums (all-gather in backward), in place of the
  all-reduces. The same function, with activations outside the tp region split tp ways. Only while autograd
  records (`sequence_parallel_now`); the norms have no parameters, so no gradient needs an extra all-reduce.
- `ColumnParallelLinear` (output features split, partition_dim 0), `RowParallelLinear` (input features split,
  partition_dim 1), `VocabParallelEmbedding` (rows of the vocab split, masked lookup + all-reduce),
  `VocabParallelLMHead` (column-parallel over the vocab, never gathered: the loss is
  `vocab_parallel_loss`: the kernels' local statistics of each shard, all-reduced over tp in one autograd
  function, as Megatron's `cross_entropy.py`).
- `vocab_parallel_linear_loss` (`VocabParallelLMHead.loss`): the LM head's matmul and that loss fused, a chunk of
  tokens at a time forward and backward (as Liger's fused linear cross-entropy), so the [tokens x vocab shard]
  logits and their gradient never exist at once; what training uses.
- `HeadReplicatedLinear`: key/value projections when there are fewer KV heads than tp ranks (GQA, e.g. the
  golden model's 1 KV head at tp = 2). Every rank keeps the whole weight and uses the KV head its query heads
  share, as vLLM does; the weight gradient is all-reduced over tp inside autograd, so the copies stay equal.

Every sharded weight carries Megatron's attributes `tensor_model_parallel = True` and `partition_dim`; the full
matrix is `torch.cat` of the shards along `partition_dim` in tp-rank order (after dropping vocab padding rows).
Replicated weights carry `tensor_model_parallel = False`. With tp = 1 (group None) no collective runs and every
layer is the plain `nn.Linear` / `nn.Embedding` math.

Weights are allocated with `torch.empty` (meta-device friendly); values come from the model's `init_weights`
or `load_nanochat_state_dict`.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megachat import kernels


def tp_group_of(grid):
    """The group collectives run on: None when tp == 1, so a single tp rank never touches torch.distributed."""
    return grid.tp_group if grid.tp > 1 else None


class _CopyToTPRegion(torch.autograd.Function):
    """Forward identity, backward all-reduce: the input feeds every tp rank's shard of a column-parallel layer."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        # Clone: autograd may hand the same gradient tensor to other consumers (e.g. a residual branch).
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTPRegion(torch.autograd.Function):
    """Forward all-reduce (sum of the partial products of a row-parallel layer), backward identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sequence_parallel_now(enabled):
    """Whether a layer set for sequence parallelism splits the sequence on this call: only while autograd records.
    Sequence parallelism exists to shrink what backward keeps; evaluation and generation (any length, a KV cache)
    take the plain tp path, which computes the same function."""
    return enabled and torch.is_grad_enabled()


def _seq_shard_len(T, tp):
    if T % tp != 0:
        raise ValueError(f"sequence parallelism splits the {T} positions of a micro-batch over tp = {tp} ranks, "
                         f"which does not divide them; use a sequence length divisible by {tp} or drop "
                         f"--sequence-parallel")
    return T // tp


def _all_gather_seq(x, group):
    """[B, T/tp, C] on each tp rank -> [B, T, C] (rank r's shard at positions r*T/tp..), on every rank."""
    tp = dist.get_world_size(group)
    parts = x.new_empty(tp * x.size(0), *x.shape[1:])
    dist.all_gather_single(parts, x.contiguous(), group=group)
    B, t = x.size(0), x.size(1)
    return parts.view(tp, B, t, *x.shape[2:]).transpose(0, 1).reshape(B, tp * t, *x.shape[2:])


def _reduce_scatter_seq(x, group):
    """[B, T, C] partial sums on each tp rank -> this rank's shard [B, T/tp, C] of their sum."""
    tp = dist.get_world_size(group)
    B, t = x.size(0), _seq_shard_len(x.size(1), tp)
    parts = x.reshape(B, tp, t, *x.shape[2:]).transpose(0, 1).contiguous()  # [tp, B, T/tp, C], rank-major
    out = x.new_empty(B, t, *x.shape[2:])
    dist.reduce_scatter_single(out, parts.view(tp * B, *parts.shape[2:]), group=group)
    return out


class _GatherFromSequenceParallel(torch.autograd.Function):
    """Forward all-gather of the sequence shards, backward reduce-scatter (Megatron's sequence parallelism)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    """Forward reduce-scatter of partial sums into sequence shards, backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


class SequenceShard:
    """The all-gathered input `full` [B, T, C] of column-parallel layers under sequence parallelism, kept for their
    backward as this rank's `shard` [B, T/tp, C] only and all-gathered again when the first of its `users` layers
    needs it in backward, once for all of them (Megatron's sequence-parallel linear layers re-gather the same
    way): a block keeps T / tp positions of its column-parallel inputs instead of T, for one more all-gather."""

    def __init__(self, shard, group, users):
        self.shard, self.group, self.users_left, self.full = shard, group, users, None

    def gathered(self, shard):
        if self.full is None:
            self.full = _all_gather_seq(shard, self.group)
        full, self.users_left = self.full, self.users_left - 1
        if self.users_left == 0:  # the last layer holds it now; freed with its backward
            self.full = None
        return full


class _SequenceParallelLinear(torch.autograd.Function):
    """F.linear(full, weight), where full is the all-gather of `shared.shard`: saves the shard, not full."""

    @staticmethod
    def forward(ctx, full, shard, weight, shared):
        ctx.save_for_backward(shard, weight)
        ctx.shared = shared
        return F.linear(full, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        shard, weight = ctx.saved_tensors
        full = ctx.shared.gathered(shard)
        grad_weight = grad.reshape(-1, grad.size(-1)).t() @ full.reshape(-1, full.size(-1))
        return grad @ weight, None, grad_weight, None


def column_linear(x, weight, shared=None):
    """F.linear(x, weight), or with a SequenceShard of x the same product keeping only the shard for backward."""
    return F.linear(x, weight) if shared is None else _SequenceParallelLinear.apply(x, shared.shard, weight, shared)


def enter_tp_region(x, group, sequence_parallel=False):
    """The input of column-parallel layers: x [B, T, C] as is (its gradient all-reduced in backward), or under
    sequence parallelism this rank's shard [B, T/tp, C] all-gathered into [B, T, C] (gradient reduce-scattered)."""
    if group is None:
        return x
    return _GatherFromSequenceParallel.apply(x, group) if sequence_parallel else _CopyToTPRegion.apply(x, group)


def leave_tp_region(x, group, sequence_parallel=False):
    """The output of a row-parallel layer: partial sums [B, T, C] all-reduced, or under sequence parallelism
    reduce-scattered into this rank's shard [B, T/tp, C] of the sequence."""
    if group is None:
        return x
    if sequence_parallel:
        return _ReduceScatterToSequenceParallel.apply(x, group)
    return _ReduceFromTPRegion.apply(x, group)


def _mark(param, partition_dim):
    """Megatron's attributes: the optimizer and checkpoint code read them to rebuild full matrices."""
    param.tensor_model_parallel = partition_dim is not None
    param.partition_dim = partition_dim if partition_dim is not None else -1
    param.partition_stride = 1
    return param


class _TPLayer(nn.Module):
    """A layer with one `weight` whose tp attributes survive device moves.

    Module.to_empty() from the meta device builds new Parameter objects, which drops attributes set on the old
    ones; re-marking after every _apply (to_empty, to, cuda, bfloat16, ...) keeps them.
    """
    partition_dim = None  # 0 / 1 for sharded weights, None for replicated ones
    fp8 = None  # an _FP8Linear sharing the weight (use_fp8), or None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        _mark(self.weight, self.partition_dim)
        return self


def _divide(n, tp, what):
    if n % tp != 0:
        raise ValueError(f"{what} = {n} is not divisible by tp = {tp}; choose a tp that divides {n}")
    return n // tp


FP8_INSTALL = ("--fp8 needs NVIDIA Transformer Engine (CUDA only): pip install 'transformer-engine[pytorch]' "
               "(or pip install -e '.[gpu]')")


class _FP8Linear:
    """A transformer_engine.pytorch.Linear that shares a tp layer's weight, run in fp8 under its own fp8_autocast
    with the delayed-scaling recipe; amaxes are reduced over `group` (the tp group, or this rank alone), never
    over ranks that run other layers (pipeline stages). Not a submodule: the weight keeps its one name."""

    def __init__(self, linear, autocast):
        self.linear, self.autocast = linear, autocast  # autocast: te.fp8_autocast with the recipe and group bound

    def __call__(self, x):
        with self.autocast():
            return self.linear(x)


def use_fp8(model, grid):
    """--fp8: every ColumnParallelLinear and RowParallelLinear of `model` (this stage's) runs its GEMMs through
    transformer_engine.pytorch.Linear in fp8 (E4M3 forward, E5M2 gradients: Format.HYBRID; delayed scaling over
    the last 16 amaxes) while autograd records; evaluation and decoding (no_grad) stay on F.linear in the
    weights' dtype. The LM head and the embedding stay bf16. Collective (a one-rank group per rank at tp = 1)."""
    try:  # an optional GPU package (megachat[gpu])
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import DelayedScaling, Format
    except ImportError as e:
        raise ValueError(FP8_INSTALL) from e
    group = tp_group_of(grid)
    if group is None:
        group = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    recipe = DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=16, amax_compute_algo="max")
    autocast = functools.partial(te.fp8_autocast, enabled=True, fp8_recipe=recipe, fp8_group=group)
    for layer in model.modules():
        if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)) and not layer.weight.is_meta:
            out_features, in_features = layer.weight.shape
            linear = te.Linear(in_features, out_features, bias=False, params_dtype=layer.weight.dtype,
                               device=layer.weight.device)
            linear.weight = layer.weight  # the same Parameter: DeepSpeed's and the optimizer's view stay the one
            object.__setattr__(layer, "fp8", _FP8Linear(linear, autocast))


def _linear(layer, x):
    """F.linear(x, layer.weight), or in fp8 through Transformer Engine after use_fp8 while autograd records."""
    if layer.fp8 is not None and torch.is_grad_enabled():
        return layer.fp8(x)
    return F.linear(x, layer.weight)


class ColumnParallelLinear(_TPLayer):
    """y[..., out/tp] = x @ W_shard.T, W_shard = rows tp_rank*out/tp.. of the full [out, in] weight; no bias.

    The input must already be in the tp region (`enter_tp_region`); a block does that once for q, k and v.
    """

    def __init__(self, in_features, out_features, grid):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        local = _divide(out_features, grid.tp, "out_features")
        self.partition_dim = 0
        self.weight = _mark(nn.Parameter(torch.empty(local, in_features)), 0)

    def forward(self, x, shared=None):
        """shared: a SequenceShard of x (sequence parallelism), so that only its shard is kept for backward."""
        return _linear(self, x) if shared is None else column_linear(x, self.weight, shared)


class RowParallelLinear(_TPLayer):
    """y[..., out] = all-reduce over tp of x[..., in/tp] @ W_shard.T, W_shard = columns of the full [out, in]."""

    def __init__(self, in_features, out_features, grid):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        local = _divide(in_features, grid.tp, "in_features")
        self.partition_dim = 1
        self.weight = _mark(nn.Parameter(torch.empty(out_features, local)), 1)
        self.group = tp_group_of(grid)

    def forward(self, x, sequence_parallel=False):
        return leave_tp_region(_linear(self, x), self.group, sequence_parallel)


class HeadReplicatedLinear(_TPLayer):
    """[.., in] -> [.., head_dim] of the one head (of n_heads < tp) this tp rank's query heads share.

    The whole weight [n_heads*head_dim, in] is kept on every rank (tensor_model_parallel = False); tp must be a
    multiple of n_heads, and ranks tp_rank // (tp // n_heads) share a head. The input must be in the tp region.
    """

    def __init__(self, in_features, n_heads, head_dim, grid):
        super().__init__()
        if grid.tp % n_heads != 0:
            raise ValueError(f"HeadReplicatedLinear: tp = {grid.tp} is not a multiple of n_heads = {n_heads}")
        self.in_features, self.out_features, self.head_dim = in_features, n_heads * head_dim, head_dim
        self.head = grid.tp_rank // (grid.tp // n_heads)
        self.weight = _mark(nn.Parameter(torch.empty(n_heads * head_dim, in_features)), None)
        self.group = tp_group_of(grid)

    def forward(self, x, shared=None):
        # The backward all-reduce sums the rows each rank used into the full gradient, identical on every rank.
        w = enter_tp_region(self.weight, self.group)
        return column_linear(x, w[self.head * self.head_dim:(self.head + 1) * self.head_dim], shared)


def padded_vocab_size(vocab_size, tp):
    """vocab_size rounded up to a multiple of tp.

    Why pad: the embedding and LM head split the vocab into tp equal shards (equal shapes keep all-gathers and
    the optimizer's shard bookkeeping simple). The padding rows are never looked up and the LM head leaves them
    out of the logits, so they get no gradient and do not change the loss; with tp = 1 there is no padding and
    shapes equal nanochat's. (nanochat's 65,536 needs no padding for any power-of-two tp.)
    """
    return -(-vocab_size // tp) * tp


def vocab_shard(vocab_size, grid):
    """(start, stop, n_real) of this rank's vocab shard: global ids start..stop-1 of the padded vocab, of which
    the first n_real are real ids (the rest is padding)."""
    local = padded_vocab_size(vocab_size, grid.tp) // grid.tp
    start = grid.tp_rank * local
    n_real = max(0, min(local, vocab_size - start))
    if vocab_size <= (grid.tp - 1) * local:  # checked on every rank, so no rank goes on alone into a collective
        raise ValueError(f"vocab_size = {vocab_size} is too small for tp = {grid.tp}: the last tp rank's vocab "
                         f"shard would hold only padding; use a smaller tp or a larger vocabulary")
    return start, start + local, n_real


class VocabParallelEmbedding(_TPLayer):
    """idx [..] int64 -> [.., dim]: each rank looks up the ids of its vocab shard (zeros elsewhere), all-reduce."""
    sequence_parallel = False  # read by the model's EmbeddingStage (GPT.set_sequence_parallel)

    def __init__(self, vocab_size, dim, grid):
        super().__init__()
        self.vocab_size, self.dim = vocab_size, dim
        self.vocab_start, self.vocab_stop, _ = vocab_shard(vocab_size, grid)
        self.partition_dim = 0
        self.weight = _mark(nn.Parameter(torch.empty(self.vocab_stop - self.vocab_start, dim)), 0)
        self.group = tp_group_of(grid)

    def forward(self, idx, sequence_parallel=False):
        """Under sequence parallelism the partial sums are reduce-scattered: this rank's [B, T/tp, C] shard."""
        if self.group is None:
            return F.embedding(idx, self.weight)
        outside = (idx < self.vocab_start) | (idx >= self.vocab_stop)
        local = torch.where(outside, torch.zeros_like(idx), idx - self.vocab_start)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tp_region(out, self.group, sequence_parallel)


class VocabParallelLMHead(_TPLayer):
    """x [.., dim] -> raw logits [.., n_real] of this rank's vocab shard (global ids vocab_start..); no gather.

    The input must be in the tp region. Padding rows of the weight are left out of the logits.
    """
    sequence_parallel = False  # read by the model's HeadStage (GPT.set_sequence_parallel)

    def __init__(self, dim, vocab_size, grid):
        super().__init__()
        self.vocab_size, self.dim = vocab_size, dim
        self.vocab_start, stop, self.n_real = vocab_shard(vocab_size, grid)
        self.partition_dim = 0
        self.weight = _mark(nn.Parameter(torch.empty(stop - self.vocab_start, dim)), 0)
        self.group = tp_group_of(grid)

    def real_weight(self):
        """The weight rows of real ids [n_real, dim]: padding rows never reach the logits (or get a gradient)."""
        return self.weight if self.n_real == self.weight.size(0) else self.weight[:self.n_real]

    def forward(self, x):
        return F.linear(x, self.real_weight())

    def loss(self, x, targets, reduction="mean", weights=None):
        """vocab_parallel_loss(self(x), targets, ...) without the logits: vocab_parallel_linear_loss over this
        shard's real rows. x [.., dim] in the tp region, targets [..] global ids (-1 = ignored); weights (with
        reduction 'sum'): fp32 per-token weights like targets."""
        return vocab_parallel_linear_loss(x, self.real_weight(), targets, self.vocab_start, self.group, reduction,
                                          weights=weights)


def _global_lse(m, sumexp, target_logit, group):
    """The shards' statistics fp32 [N] combined over the tp group -> (log-sum-exp over the whole vocab, capped
    target logit): MAX of the row max, SUM of the sum-exp rescaled to it, SUM of the target logit (owned by one
    shard, 0 on the others). No communication when group is None or of size 1."""
    if group is not None and dist.get_world_size(group) > 1:
        m_global = m.clone()
        dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=group)
        sumexp = sumexp * torch.exp(m - m_global)
        dist.all_reduce(sumexp, group=group)
        dist.all_reduce(target_logit, group=group)
        m = m_global
    return m + torch.log(sumexp), target_logit


class _VocabParallelSoftcapCE(torch.autograd.Function):
    """Per-token cross-entropy fp32 [N] of cap*tanh(z/cap) (the kernels' cap, 15) for raw logits [N, V_local].

    As Megatron's `_VocabParallelCrossEntropy`: the kernels compute this shard's statistics and the local
    backward; `_global_lse` combines them over the tp group. Backward needs no communication.
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group, ignore_index):
        stats = kernels.softcap_ce_stats(logits, targets, ignore_index=ignore_index, vocab_start=vocab_start)
        lse, target_logit = _global_lse(*stats, group)
        ctx.save_for_backward(logits, targets, lse)
        ctx.vocab_start, ctx.ignore_index = vocab_start, ignore_index
        return torch.where(targets == ignore_index, torch.zeros_like(lse), lse - target_logit)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss):
        logits, targets, lse = ctx.saved_tensors
        dlogits = kernels.softcap_ce_backward(logits, targets, lse, dloss, ignore_index=ctx.ignore_index,
                                              vocab_start=ctx.vocab_start)
        return dlogits, None, None, None, None


# One chunk's logits (and in backward their gradient) take at most this many bytes: 2,048 tokens x 65,536 ids in
# bf16 (d20 at tp = 1), 4,096 at tp = 2, so each chunk's matmul is still 344 GFLOP at d20 (cuBLAS-sized; the GPU
# rows of scripts/bench_loss.py time 1,024 to 8,192 tokens a chunk).
LOSS_CHUNK_BYTES = 2 ** 28


def loss_chunk_tokens(vocab_local, dtype):
    """Tokens per chunk of vocab_parallel_linear_loss: the most whose logits [tokens, vocab_local] in dtype fit in
    LOSS_CHUNK_BYTES (at least 1)."""
    return max(1, LOSS_CHUNK_BYTES // (vocab_local * torch.empty((), dtype=dtype).element_size()))


def _chunks(n, chunk_tokens):
    return [(start, min(start + chunk_tokens, n)) for start in range(0, n, chunk_tokens)]


def _chunk_statistics(h, weight, targets, vocab_start, group, ignore_index):
    """One chunk's global log-sum-exp and per-token loss, fp32 [chunk] each (0 at ignored targets). At tp > 1 the
    chunk's statistics are all-reduced here (`_global_lse`), so every tp rank runs the same chunks in order."""
    stats = kernels.softcap_ce_stats(F.linear(h, weight), targets, ignore_index=ignore_index, vocab_start=vocab_start)
    lse, target_logit = _global_lse(*stats, group)
    return lse, torch.where(targets == ignore_index, torch.zeros_like(lse), lse - target_logit)


class _VocabParallelLinearSoftcapCE(torch.autograd.Function):
    """Per-token loss fp32 [N] of _VocabParallelSoftcapCE(hidden @ weight.T), chunk_tokens rows at a time, for
    reduction 'none' (a loss whose gradient per token is only known in backward).

    Forward: each chunk's logits -> the global log-sum-exp and the loss. Backward: each chunk's logits again (one
    more matmul, the price of not keeping them), the kernels' d logits, then d hidden = d logits @ weight (into
    its rows of the [N, C] result) and d weight += d logits.T @ hidden (an fp32 sum over chunks for bf16/fp16
    weights). Saved for backward: hidden, weight, targets and the log-sum-exp [N]; never a [N, V_local] tensor.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, group, ignore_index, chunk_tokens):
        n = hidden.size(0)
        lse, loss = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(2))
        for start, stop in _chunks(n, chunk_tokens):
            lse[start:stop], loss[start:stop] = _chunk_statistics(hidden[start:stop], weight, targets[start:stop],
                                                                  vocab_start, group, ignore_index)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.vocab_start, ctx.ignore_index, ctx.chunk_tokens = vocab_start, ignore_index, chunk_tokens
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss):
        hidden, weight, targets, lse = ctx.saved_tensors
        dhidden = torch.empty_like(hidden)
        dweight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                              device=weight.device)
        for start, stop in _chunks(hidden.size(0), ctx.chunk_tokens):
            h = hidden[start:stop]
            dlogits = kernels.softcap_ce_backward(F.linear(h, weight), targets[start:stop], lse[start:stop],
                                                  dloss[start:stop], ignore_index=ctx.ignore_index,
                                                  vocab_start=ctx.vocab_start)
            _accumulate_grads(dlogits, h, weight, dhidden[start:stop], dweight)
            del dlogits  # before the next chunk's logits: at most one chunk's logits and gradient at a time
        return dhidden, dweight.to(weight.dtype), None, None, None, None, None


def _accumulate_grads(dlogits, h, weight, dhidden, dweight):
    """dhidden (a [chunk, C] view) = d logits @ weight; dweight (fp32 [V_local, C]) += d logits.T @ h."""
    torch.mm(dlogits, weight, out=dhidden)
    if dweight.dtype == dlogits.dtype:
        dweight.addmm_(dlogits.t(), h)
    else:
        dweight += dlogits.t() @ h


class _VocabParallelLinearSoftcapCESum(torch.autograd.Function):
    """sum_i w_i * loss_i (fp32 scalar) of the per-token losses of _VocabParallelLinearSoftcapCE, w = the per-token
    weights (None: all 1), with the gradients formed in forward, as Liger's fused linear cross-entropy does.

    The loss is a scalar here, so d loss_i = grad_output * w_i is known in forward up to one number: each chunk's
    d logits (for grad_output = 1) become d hidden's rows and a term of d weight at once, and the chunk's logits
    are dropped; backward only scales the two by grad_output. No logits matmul in backward. Saved for backward:
    d hidden [N, C] (hidden's dtype, in place of hidden) and d weight (fp32 [V_local, C]); never a [N, V_local]
    tensor. need_grads False (evaluation, no_grad): the loss only.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, vocab_start, group, ignore_index, chunk_tokens, need_grads):
        n = hidden.size(0)
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        if need_grads:
            dhidden = torch.empty_like(hidden)
            dweight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                  device=weight.device)
        for start, stop in _chunks(n, chunk_tokens):
            h, t = hidden[start:stop], targets[start:stop]
            stats, saved = kernels.softcap_ce_forward(F.linear(h, weight), t, ignore_index=ignore_index,
                                                      vocab_start=vocab_start)
            lse, target_logit = _global_lse(*stats, group)
            loss[start:stop] = torch.where(t == ignore_index, torch.zeros_like(lse), lse - target_logit)
            if need_grads:
                dloss = torch.ones_like(lse) if weights is None else weights[start:stop]
                dlogits = kernels.softcap_ce_grad(saved, t, lse, dloss, ignore_index=ignore_index,
                                                  vocab_start=vocab_start)
                del saved
                _accumulate_grads(dlogits, h, weight, dhidden[start:stop], dweight)
                del dlogits  # at most one chunk's logits (or their tanh and exp) and gradient at a time
        if need_grads:
            ctx.save_for_backward(dhidden, dweight)
        ctx.weight_dtype, ctx.scaled = weight.dtype, False
        return loss.sum() if weights is None else (loss * weights).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dtotal):
        if ctx.scaled:
            raise RuntimeError("the fused LM head + loss was differentiated twice (retain_graph): its gradients "
                               "were formed in forward and scaled in place once; run the forward again")
        ctx.scaled = True
        dhidden, dweight = ctx.saved_tensors
        # in place (no second [N, C] or [V_local, C] buffer); the scale in fp32: a 0-dim fp32 tensor times a bf16
        # tensor computes in fp32 and rounds once
        return (dhidden.mul_(dtotal), dweight.mul_(dtotal).to(ctx.weight_dtype),
                None, None, None, None, None, None, None)


def _reduce(loss, targets, reduction, ignore_index):
    """Per-token loss fp32 [N] -> fp32 [*targets.shape] ('none') or the mean over non-ignored targets ('mean')."""
    if reduction == "none":
        return loss.view(targets.shape)
    if reduction != "mean":
        raise ValueError(f"loss reduction {reduction!r} is not supported; use 'mean' or 'none'")
    return loss.sum() / _count(targets, ignore_index)


def _count(targets, ignore_index):
    return (targets != ignore_index).sum().clamp(min=1)


def vocab_parallel_loss(logits, targets, vocab_start, group, reduction="mean", ignore_index=-1):
    """Softcapped cross-entropy of local raw logits [B, T, V_local] and global targets [B, T].

    reduction 'none': fp32 [B, T] (0 at ignored targets); 'mean': sum / number of non-ignored targets, as
    nanochat's F.cross_entropy(ignore_index=-1) does, except that a batch with no target gives 0 instead of nan.
    The result is identical on every tp rank. group None: the whole vocab is here, no communication.
    """
    loss = _VocabParallelSoftcapCE.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), vocab_start,
                                         group, ignore_index)
    return _reduce(loss, targets, reduction, ignore_index)


def vocab_parallel_linear_loss(hidden, weight, targets, vocab_start, group, reduction="mean", ignore_index=-1,
                               chunk_tokens=None, weights=None):
    """vocab_parallel_loss(F.linear(hidden, weight), targets, vocab_start, group, reduction) with the matmul fused
    in: hidden [B, T, C] (in the tp region: its gradient here is this shard's part, which enter_tp_region's
    backward all-reduces), weight [V_local, C] this shard's real rows (global ids vocab_start..), targets [B, T].
    The logits are computed and dropped chunk_tokens tokens at a time (default `loss_chunk_tokens`: a chunk's
    logits within LOSS_CHUNK_BYTES), so no [B*T, V_local] tensor is ever made.

    reduction 'mean' (over non-ignored targets), or 'sum' with per-token weights fp32 [B, T] (sum of weights x
    loss: the trainer's normalisation and RL's advantages): a scalar, the gradients formed in forward, so backward
    computes no logits (`_VocabParallelLinearSoftcapCESum`). 'none': fp32 [B, T], the logits computed again in
    backward (`_VocabParallelLinearSoftcapCE`).
    """
    if chunk_tokens is None:
        chunk_tokens = loss_chunk_tokens(weight.size(0), hidden.dtype)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens = {chunk_tokens} must be >= 1 (or None for the default by bytes)")
    if (weights is not None) != (reduction == "sum"):
        raise ValueError(f"loss reduction {reduction!r} with weights {'given' if weights is not None else 'None'}: "
                         "per-token weights go with reduction 'sum' only (and 'sum' needs them)")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss reduction {reduction!r} is not supported; use 'mean', 'sum' (with weights) or 'none'")
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    if reduction == "none":
        loss = _VocabParallelLinearSoftcapCE.apply(flat_hidden, weight, flat_targets, vocab_start, group,
                                                   ignore_index, chunk_tokens)
        return loss.view(targets.shape)
    if weights is not None:
        if weights.shape != targets.shape:
            raise ValueError(f"per-token weights {tuple(weights.shape)} must have the targets' shape "
                             f"{tuple(targets.shape)}")
        weights = weights.reshape(-1).float()
    need_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = _VocabParallelLinearSoftcapCESum.apply(flat_hidden, weight, flat_targets, weights, vocab_start, group,
                                                   ignore_index, chunk_tokens, need_grads)
    return total if reduction == "sum" else total / _count(targets, ignore_index)


def gather_vocab_logits(logits, vocab_size, group):
    """Local logits [.., n_real] of a vocab shard -> full [.., vocab_size] on every tp rank (for evaluation and
    tests only: this materializes tokens x vocab). No autograd."""
    if group is None:
        return logits
    tp = dist.get_world_size(group)
    local = padded_vocab_size(vocab_size, tp) // tp
    padded = logits.new_zeros(*logits.shape[:-1], local)
    padded[..., :logits.size(-1)] = logits
    parts = [torch.empty_like(padded) for _ in range(tp)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]


def shard_tensor(full, param, tp_rank, tp):
    """This rank's piece of `full` (a tensor shaped like the full, unpadded weight of `param`, e.g. the weight or
    an optimizer moment): zero-padded along partition_dim to shard * tp, then narrowed. Replicated: full."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    local = param.size(dim)
    if full.size(dim) < local * tp:
        pad = list(full.shape)
        pad[dim] = local * tp - full.size(dim)
        full = torch.cat([full, full.new_zeros(pad)], dim=dim)
    return full.narrow(dim, tp_rank * local, local)


def gather_tensor(local, param, full_shape, group):
    """Inverse of shard_tensor: all-gather the tp shards of `local` (shaped like `param`) over group, cat along
    partition_dim and drop padding to full_shape. Collective over the tp group for sharded params. No autograd."""
    if not getattr(param, "tensor_model_parallel", False) or group is None:
        return local
    dim = param.partition_dim
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=dim).narrow(dim, 0, full_shape[dim])
