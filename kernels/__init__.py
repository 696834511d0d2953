"""megachat.kernels: the dispatching functions the model and the optimizer call.

Files: `reference.py` (torch references: the CPU path and the tests' ground truth), one `*_kernel.py` per fused
Triton kernel (launcher and `h100_specs()`), `runtime.py` (what those share at run time), and `sm90_aot.py`
(compile-ahead for sm_90 and the report on the compiled code: tooling that imports the kernels, never the reverse).

One switch (`use_triton`): a CUDA tensor runs the fused Triton kernel; a CPU tensor runs the torch reference
(so does any float64 tensor), unless MEGACHAT_TRITON=1 and TRITON_INTERPRET=1 are set, in which case the same
Triton kernels run in Triton's interpreter (how the tests prove the kernels without a GPU). Triton is imported
only when a kernel is dispatched to it, so a CPU run never imports it.

Kernels compute: they run no collective and know no process group. The softcapped cross-entropy is
split as Megatron-core's `tensor_parallel/cross_entropy.py`: `softcap_ce_stats` and `softcap_ce_backward` are the
local math of one vocab shard, and `megachat.tensor_parallel.vocab_parallel_loss` all-reduces the statistics.
"""
import functools
import os

import torch

from . import reference

__all__ = ["rmsnorm", "rope", "rope_qk", "relu2", "newton_schulz", "softcap_ce_stats", "softcap_ce_backward",
           "softcap_ce_forward", "softcap_ce_grad", "softcap", "attention", "use_triton"]


def use_triton(t):
    """True when tensor t goes to the Triton kernels: on CUDA, or on CPU under MEGACHAT_TRITON=1 + TRITON_INTERPRET=1.
    float64 always takes the reference (the kernels compute in fp32)."""
    if t.dtype == torch.float64:
        return False
    if t.is_cuda:
        return True
    if os.environ.get("MEGACHAT_TRITON") != "1":
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("MEGACHAT_TRITON=1 on a CPU tensor needs TRITON_INTERPRET=1 set before triton is "
                           "imported; set both (or unset MEGACHAT_TRITON to use the torch reference)")
    return True


def rmsnorm(x):
    """RMS over the last dim, no weight, eps as F.rms_norm(eps=None): fp32's epsilon for bf16/fp16/fp32 inputs
    (torch takes it from the op-math type), fp64's for fp64; same shape and dtype."""
    if use_triton(x):
        from .rmsnorm_kernel import rmsnorm as fused
        return fused(x)
    return reference.rmsnorm(x)


def _check_rope(x, cos, sin, offset):
    if cos.ndim != 2 or sin.shape != cos.shape or x.ndim != 4 or cos.size(1) * 2 != x.size(3):
        raise ValueError(f"rope: expected x [B, T, H, D] and cos/sin [T_max, D//2], got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}; squeeze the tables to 2-D")
    last = int(offset.max()) if torch.is_tensor(offset) else offset
    if x.size(1) + last > cos.size(0):
        raise ValueError(f"rope: positions up to {last + x.size(1) - 1} exceed the cos/sin table of "
                         f"{cos.size(0)} rows; build the tables for a longer sequence")
    if torch.is_tensor(offset) and (offset.shape != (x.size(0),) or offset.dtype != torch.int64):
        raise ValueError(f"rope: a per-row offset must be int64 [B = {x.size(0)}], got {offset.dtype} "
                         f"{tuple(offset.shape)}")


def rope(x, cos, sin, offset=0):
    """x [B, T, H, D] rotated with table rows offset..offset+T of cos/sin [T_max, D//2]; fp32 math, x's dtype.
    offset: an int, or int64 [B] (one per row: the KV-cache engine's left-padded batches), which takes the torch
    path on every device (decode rotates one token per row: nothing for a fused kernel to save)."""
    _check_rope(x, cos, sin, offset)
    if use_triton(x) and not torch.is_tensor(offset):
        from .rope_kernel import rope as fused
        return fused(x, cos, sin, offset)
    return reference.rope(x, cos, sin, offset)


def rope_qk(q, k, cos, sin, offset=0):
    """(rope(q), rope(k)) for q [B, T, Hq, D] and k [B, T, Hk, D] (GQA: Hk < Hq); one Triton launch for both."""
    _check_rope(q, cos, sin, offset)
    _check_rope(k, cos, sin, offset)
    if q.shape[:2] != k.shape[:2] or q.size(3) != k.size(3) or q.dtype != k.dtype:
        raise ValueError(f"rope_qk: q and k must share B, T, head_dim and dtype, got {tuple(q.shape)} "
                         f"{q.dtype} and {tuple(k.shape)} {k.dtype}; rotate them with two rope calls")
    if use_triton(q) and not torch.is_tensor(offset):
        from .rope_kernel import rope_qk as fused
        return fused(q, k, cos, sin, offset)
    return reference.rope(q, cos, sin, offset), reference.rope(k, cos, sin, offset)


class ReLU2(torch.autograd.Function):
    """relu(x)**2 that saves only its output y for backward: dx = 2 * sqrt(y) * dy (relu(x) = sqrt(y)).

    The MLP's down-projection saves y anyway, so no copy of x (the up-projection's [tokens, 4 * n_embd] output)
    is kept. The same function runs on both paths: the Triton kernels or the torch reference compute each step.
    """

    @staticmethod
    def forward(ctx, x):
        if use_triton(x):
            from .relu2_kernel import relu2_forward
            y = relu2_forward(x.contiguous())
        else:
            y = reference.relu2(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        if use_triton(y):
            from .relu2_kernel import relu2_backward
            return relu2_backward(dy.contiguous(), y)
        return reference.relu2_backward(dy, y)


def relu2(x):
    """relu(x)**2, same shape/dtype; autograd keeps only the output (see ReLU2)."""
    return ReLU2.apply(x)


def newton_schulz(G, steps=5, compute_dtype=torch.bfloat16, compiled=False):
    """nanochat's quintic Newton-Schulz orthogonalization of G [..., m, n] in compute_dtype; returns G's dtype.
    No autograd (an optimizer step). compiled: the torch path through torch.compile (`_compiled_newton_schulz`),
    as nanochat compiles its zeropower; the Triton kernel is used regardless where it runs."""
    if G.ndim < 2:
        raise ValueError(f"newton_schulz: G must have at least 2 dims [..., m, n], got shape {tuple(G.shape)}")
    if use_triton(G):
        from .newton_schulz_kernel import newton_schulz as fused
        return fused(G, steps, compute_dtype)
    if compiled:
        return _compiled_newton_schulz()(G, steps, compute_dtype)
    return reference.newton_schulz(G, steps, compute_dtype)


@functools.cache
def _compiled_newton_schulz():
    """reference.newton_schulz through torch.compile (one graph per shape), made on first use so that no run
    without compiled=True compiles anything. Inductor fuses the elementwise ops around the matmuls and computes
    them in fp32 registers, rounding once to bf16 where eager rounds after each op (as nanochat's compiled
    zeropower; tests/test_kernels_reference.py holds it to the golden output's tolerance)."""
    return torch.compile(reference.newton_schulz, dynamic=False)


def _check_ce(logits, targets):
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"softcap cross-entropy: expected logits [N, V] and targets [N], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}; flatten the batch first")


def softcap_ce_stats(logits, targets, cap=15.0, ignore_index=-1, vocab_start=0):
    """Local statistics of c = cap*tanh(logits/cap) on one vocab shard, fp32 [N] each: (row max, sum of
    exp(c - max), c at the target or 0 where the target is ignored or not in this shard).

    logits [N, V_local]: raw logits of global ids vocab_start..vocab_start+V_local-1; targets [N] int64 global ids.
    No communication: `megachat.tensor_parallel.vocab_parallel_loss` combines the shards' statistics.
    """
    _check_ce(logits, targets)
    if use_triton(logits):
        from .softcap_ce_kernel import softcap_ce_stats as fused
        return fused(logits, targets, cap, ignore_index, vocab_start)
    return reference.softcap_ce_stats(logits, targets, cap, ignore_index, vocab_start)


def softcap_ce_backward(logits, targets, lse, dloss, cap=15.0, ignore_index=-1, vocab_start=0):
    """d loss / d logits [N, V_local] in logits' dtype, for the global log-sum-exp lse fp32 [N] (over all
    shards) and the loss gradient dloss [N]; 0 on rows whose target is ignored."""
    _check_ce(logits, targets)
    if use_triton(logits):
        from .softcap_ce_kernel import softcap_ce_backward as fused
        return fused(logits, targets, lse, dloss, cap, ignore_index, vocab_start)
    return reference.softcap_ce_backward(logits, targets, lse, dloss, cap, ignore_index, vocab_start)


def softcap_ce_forward(logits, targets, cap=15.0, ignore_index=-1, vocab_start=0):
    """(softcap_ce_stats(...), saved): the statistics and what `softcap_ce_grad` needs to form these logits'
    gradient once the global log-sum-exp is known. Triton: the logits themselves (the backward kernel reads them
    again from HBM); the torch path: tanh and exp(c - max), so neither is computed twice."""
    _check_ce(logits, targets)
    if use_triton(logits):
        return softcap_ce_stats(logits, targets, cap, ignore_index, vocab_start), (logits,)
    return reference.softcap_ce_forward(logits, targets, cap, ignore_index, vocab_start)


def softcap_ce_grad(saved, targets, lse, dloss, cap=15.0, ignore_index=-1, vocab_start=0):
    """softcap_ce_backward(logits, targets, lse, dloss, ...) from softcap_ce_forward's `saved` (used up)."""
    if len(saved) == 1:
        return softcap_ce_backward(saved[0], targets, lse, dloss, cap, ignore_index, vocab_start)
    return reference.softcap_ce_grad(saved, targets, lse, dloss, cap, ignore_index, vocab_start)


def softcap(logits, cap=15.0):
    """cap * tanh(logits / cap) (the logits the model returns); one elementwise op, left to torch everywhere."""
    return reference.softcap(logits, cap)


def attention(q, k, v, causal=True, mask=None):
    """q [B, T, H, D], k/v [B, Tk, Hkv, D] (GQA when Hkv < H) -> [B, T, H, D]; flash-attn on CUDA when installed
    (bf16/fp16), else torch SDPA with the same math. mask: bool [B, 1, T, Tk], True = attend (the KV-cache engine's
    left-padded batches; SDPA on every device). MEGACHAT_ATTENTION=sdpa: SDPA even where flash-attn would run (the
    GPU check's flash-attn vs SDPA comparison)."""
    if (mask is None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and os.environ.get("MEGACHAT_ATTENTION") != "sdpa"):
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            flash_attn_func = None
        if flash_attn_func is not None:
            # flash-attn aligns the causal mask bottom-right when T < Tk, the same as the reference's KV-cache mask.
            return flash_attn_func(q, k, v, causal=causal)
    return reference.attention(q, k, v, causal, mask)
