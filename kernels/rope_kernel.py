"""Fused rotary embedding (half-split pairs) in Triton: q and k [B, T, H, D] read once, written once, one launch.

One grid covers the rows of q's (B*T*Hq, D) view, then those of k's (B*T*Hk, D) view (Hk < Hq under GQA): a
program rotates BLOCK_R rows of one of the two. Row r of a tensor with H heads sits at position
(r // H) % T + offset of the cos/sin tables [T_max, D//2] (kept in bf16 by the model; the math runs in fp32).
y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos. The backward is the inverse rotation, the same kernel with sin
negated (BACKWARD=True). A single tensor (`rope`, e.g. the KV cache's new keys) is the same launch with no k rows.
`outs` may be the inputs themselves (in place).
"""
import torch
import triton
import triton.language as tl

from .runtime import FP_FUSION, KernelSpec, interpreting


@triton.jit
def _rope_rows(X, COS, SIN, Y, block, n_rows, T, H, offset, half, stride_tab,
               BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate rows block*BLOCK_R.. of the contiguous (n_rows, 2*half) view X into Y."""
    rows = block.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < half)
    pos = (rows // H) % T + offset
    tab = pos[:, None] * stride_tab + cols[None, :]
    c = tl.load(COS + tab, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + tab, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        s = -s
    at = rows[:, None] * (2 * half) + cols[None, :]
    x1 = tl.load(X + at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + at + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + at, (x1 * c + x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + at + half, (x2 * c - x1 * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, QO, KO, q_rows, k_rows, q_blocks, T, HQ, HK, offset, half, stride_tab,
                 BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    if pid < q_blocks:
        _rope_rows(Q, COS, SIN, QO, pid, q_rows, T, HQ, offset, half, stride_tab, BACKWARD, BLOCK_R, BLOCK_D)
    else:
        _rope_rows(K, COS, SIN, KO, pid - q_blocks, k_rows, T, HK, offset, half, stride_tab, BACKWARD, BLOCK_R,
                   BLOCK_D)


def _config(head_dim, interpret):
    """(BLOCK_R, BLOCK_D, num_warps): ~8K elements (both halves) per GPU program; 16x more in the interpreter."""
    block_d = triton.next_power_of_2(head_dim // 2)
    per_program = 65536 if interpret else 4096
    block_r = max(1, per_program // block_d)
    return block_r, block_d, 8 if block_r * block_d >= 4096 else 4


def rope_apply(xs, cos, sin, offset=0, backward=False, outs=None):
    """Rotate the contiguous tensors xs (one or two, [B, T, H_i, D] with the same B, T, D) by table rows
    offset..offset+T in one launch (inverse rotation if backward); returns a tuple like xs."""
    q, k = xs[0], xs[-1]
    B, T, _, D = q.shape
    if len(xs) > 2 or k.shape[:2] != q.shape[:2] or k.size(3) != D:
        raise ValueError(f"rope: expected one or two tensors [B, T, H, D] with the same B, T, D, got "
                         f"{[tuple(x.shape) for x in xs]}")
    if D % 2:
        raise ValueError(f"rope: head_dim {D} must be even")
    if cos.shape != sin.shape or cos.size(1) != D // 2 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError(f"rope: cos/sin must be [T_max, {D // 2}] with the same contiguous layout, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    outs = tuple(torch.empty_like(x) for x in xs) if outs is None else tuple(outs)
    block_r, block_d, num_warps = _config(D, interpreting())
    q_rows = q.numel() // D
    k_rows = k.numel() // D if len(xs) == 2 else 0
    q_blocks = triton.cdiv(q_rows, block_r)
    grid = q_blocks + triton.cdiv(k_rows, block_r)
    if grid == 0:
        return outs
    _rope_kernel[(grid,)](
        q, k, cos, sin, outs[0], outs[-1], q_rows, k_rows, q_blocks, T, q.size(2), k.size(2), offset, D // 2,
        cos.stride(0), BACKWARD=backward, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
        enable_fp_fusion=FP_FUSION)
    return outs


class Rope(torch.autograd.Function):
    """Rotates one or two tensors (q, k) in one launch each way; the backward rotates the gradients back."""

    @staticmethod
    def forward(ctx, cos, sin, offset, *xs):
        ctx.save_for_backward(cos, sin)
        ctx.offset = offset
        return rope_apply(tuple(x.contiguous() for x in xs), cos, sin, offset)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *dys):
        cos, sin = ctx.saved_tensors
        dxs = rope_apply(tuple(dy.contiguous() for dy in dys), cos, sin, ctx.offset, backward=True)
        return (None, None, None, *dxs)


def rope(x, cos, sin, offset=0):
    """x [B, T, H, D] rotated by cos/sin [T_max, D//2] rows offset..offset+T; fp32 math, x's dtype."""
    return Rope.apply(cos, sin, offset, x)[0]


def rope_qk(q, k, cos, sin, offset=0):
    """(q, k) [B, T, Hq, D], [B, T, Hk, D] both rotated in one launch; fp32 math, their dtypes."""
    return Rope.apply(cos, sin, offset, q, k)


def h100_specs(tokens=65536, n_head=10, n_kv_head=10, head_dim=128, seq_len=2048, dtype="bf16"):
    """d20 launches on q and k together (nanochat's d20 has no GQA: 10 query and 10 KV heads), forward and
    backward; bf16 tables of 10x seq_len rows."""
    block_r, block_d, num_warps = _config(head_dim, interpret=False)
    q_rows, k_rows = tokens * n_head, tokens * n_kv_head
    ints = {"q_rows": q_rows, "k_rows": k_rows, "q_blocks": triton.cdiv(q_rows, block_r), "T": seq_len,
            "HQ": n_head, "HK": n_kv_head, "offset": 0, "half": head_dim // 2, "stride_tab": head_dim // 2}
    n = (q_rows + k_rows) * head_dim
    # HBM bytes: q, k read + written (bf16) + the rows of the two tables used (re-reads of table rows hit L2).
    traffic = 2 * n * (2 if dtype == "bf16" else 4) + 2 * seq_len * (head_dim // 2) * 2
    return [KernelSpec(f"rope_{'bwd' if bwd else 'fwd'}[q+k {tokens}x({n_head}+{n_kv_head})x{head_dim} {dtype}]",
                       _rope_kernel, {"Q": dtype, "K": dtype, "COS": "bf16", "SIN": "bf16", "QO": dtype, "KO": dtype},
                       ints, (), {"BACKWARD": bwd, "BLOCK_R": block_r, "BLOCK_D": block_d}, num_warps,
                       bytes_moved=traffic, flops=3 * n)
            for bwd in (False, True)]
