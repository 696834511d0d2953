"""megachat.kernels: the dispatching functions the model and the optimizer call.

One switch (`use_triton`): a CUDA tensor runs the fused Triton kernel; a CPU tensor runs the torch reference
(`reference.py`; so does any float64 tensor), unless MEGACHAT_TRITON=1 and TRITON_INTERPRET=1 are set, in which case the same Triton kernels
run in Triton's interpreter (how the tests prove the kernels without a GPU). Triton is imported only when a
kernel is dispatched to it, so a CPU run never imports it.
"""
import os

import torch

from . import reference

__all__ = ["rmsnorm", "rope", "rope_qk", "relu2", "newton_schulz", "softcap_cross_entropy", "softcap", "attention",
           "use_triton"]


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
    if x.size(1) + offset > cos.size(0):
        raise ValueError(f"rope: positions {offset}..{offset + x.size(1) - 1} exceed the cos/sin table of "
                         f"{cos.size(0)} rows; build the tables for a longer sequence")


def rope(x, cos, sin, offset=0):
    """x [B, T, H, D] rotated with table rows offset..offset+T of cos/sin [T_max, D//2]; fp32 math, x's dtype."""
    _check_rope(x, cos, sin, offset)
    if use_triton(x):
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
    if use_triton(q):
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


def newton_schulz(G, steps=5, compute_dtype=torch.bfloat16):
    """nanochat's quintic Newton-Schulz orthogonalization of G [..., m, n] in compute_dtype; returns G's dtype.
    No autograd (an optimizer step)."""
    if G.ndim < 2:
        raise ValueError(f"newton_schulz: G must have at least 2 dims [..., m, n], got shape {tuple(G.shape)}")
    if use_triton(G):
        from .newton_schulz_kernel import newton_schulz as fused
        return fused(G, steps, compute_dtype)
    return reference.newton_schulz(G, steps, compute_dtype)


def softcap_cross_entropy(logits, targets, cap=15.0, ignore_index=-1, vocab_start=0, group=None):
    """Per-token loss fp32 [N] (0 at ignored targets) of cap*tanh(logits/cap) on a vocab shard.

    logits [N, V_local]: raw (un-capped) logits of global ids vocab_start..vocab_start+V_local-1;
    targets [N] int64 global ids; group: the tp process group (None = the whole vocab is here).
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"softcap_cross_entropy: expected logits [N, V] and targets [N], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}; flatten the batch first")
    if use_triton(logits):
        from .softcap_ce_kernel import softcap_cross_entropy as fused
        return fused(logits, targets, cap, ignore_index, vocab_start, group)
    return reference.softcap_cross_entropy(logits, targets, cap, ignore_index, vocab_start, group)


def softcap(logits, cap=15.0):
    """cap * tanh(logits / cap) (the logits the model returns); one elementwise op, left to torch everywhere."""
    return reference.softcap(logits, cap)


def attention(q, k, v, causal=True):
    """q [B, T, H, D], k/v [B, Tk, Hkv, D] (GQA when Hkv < H) -> [B, T, H, D]; flash-attn on CUDA when installed
    (bf16/fp16), else torch SDPA with the same math."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            flash_attn_func = None
        if flash_attn_func is not None:
            # flash-attn aligns the causal mask bottom-right when T < Tk, the same as the reference's KV-cache mask.
            return flash_attn_func(q, k, v, causal=causal)
    return reference.attention(q, k, v, causal)
