"""Fused RMSNorm (no weight) in Triton: one read and one write per element, fp32 statistics.

A program normalizes BLOCK_R rows of the (rows, width) view at once; the width is padded to a power of two
and masked, so any width works. The forward stores 1/rms per row (fp32) for the backward:
dx = rstd * dy - x * rstd^3 * mean(dy * x).
"""
import torch
import triton
import triton.language as tl

from .runtime import FP_FUSION, KernelSpec, interpreting

# F.rms_norm(eps=None) takes eps from the op-math type: fp32's epsilon for bf16, fp16 and fp32 inputs.
EPS = torch.finfo(torch.float32).eps
MAX_WIDTH = 16384  # one row per program at this width compiles for sm_90 without spills (fwd 88, bwd 172 regs)


@triton.jit
def _rmsnorm_fwd(X, Y, RSTD, n_rows, n_cols, eps, stride_x, stride_y,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rmsnorm_bwd(DY, X, RSTD, DX, n_rows, n_cols, stride_dy, stride_x, stride_dx,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
    dot = tl.sum(dy * x, axis=1) / n_cols
    dx = rstd[:, None] * dy - x * (rstd * rstd * rstd * dot)[:, None]
    tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


def _config(n_cols, interpret):
    """(BLOCK_R, BLOCK_C, num_warps): ~4K elements per GPU program; the interpreter gets 16x more per program."""
    block_c = triton.next_power_of_2(n_cols)
    per_program = 65536 if interpret else 4096
    block_r = max(1, per_program // block_c)
    num_warps = 8 if block_c * block_r >= 8192 else 4
    return block_r, block_c, num_warps


def _check(x):
    if x.size(-1) > MAX_WIDTH:
        raise ValueError(f"rmsnorm: width {x.size(-1)} exceeds the fused kernel's {MAX_WIDTH}; use "
                         f"megachat.kernels.reference.rmsnorm for such widths")


def rmsnorm_forward(x2d, out=None):
    """x2d [rows, width] (last dim contiguous) -> (y [rows, width] in x's dtype, rstd fp32 [rows])."""
    _check(x2d)
    n_rows, n_cols = x2d.shape
    y = torch.empty_like(x2d) if out is None else out
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    block_r, block_c, num_warps = _config(n_cols, interpreting())
    if n_rows == 0:
        return y, rstd
    _rmsnorm_fwd[(triton.cdiv(n_rows, block_r),)](
        x2d, y, rstd, n_rows, n_cols, EPS, x2d.stride(0), y.stride(0),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    return y, rstd


def rmsnorm_backward(dy2d, x2d, rstd, out=None):
    """Gradient of rmsnorm for dy2d, x2d [rows, width] and the forward's rstd; returns dx in x's dtype."""
    n_rows, n_cols = x2d.shape
    dx = torch.empty_like(x2d) if out is None else out
    block_r, block_c, num_warps = _config(n_cols, interpreting())
    if n_rows == 0:
        return dx
    _rmsnorm_bwd[(triton.cdiv(n_rows, block_r),)](
        dy2d, x2d, rstd, dx, n_rows, n_cols, dy2d.stride(0), x2d.stride(0), dx.stride(0),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    return dx


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x2d = x.reshape(-1, x.size(-1)).contiguous()
        y, rstd = rmsnorm_forward(x2d)
        ctx.save_for_backward(x2d, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, rstd = ctx.saved_tensors
        dx = rmsnorm_backward(dy.reshape(x2d.shape).contiguous(), x2d, rstd)
        return dx.view(dy.shape)


def rmsnorm(x):
    """RMS over the last dim, no weight, eps = fp32's epsilon (as F.rms_norm for bf16/fp16/fp32); x's shape/dtype."""
    return RMSNorm.apply(x)


def h100_specs(tokens=65536, n_embd=1280, n_head=10, head_dim=128, dtype="bf16"):
    """d20 launches: the block norm (width n_embd) and QK-norm (width head_dim over q and k heads)."""
    size = 2 if dtype == "bf16" else 4
    specs = []
    for label, rows, width in (("block", tokens, n_embd), ("qk", tokens * n_head, head_dim)):
        block_r, block_c, num_warps = _config(width, interpret=False)
        const = {"BLOCK_R": block_r, "BLOCK_C": block_c}
        n = rows * width
        specs.append(KernelSpec(
            f"rmsnorm_fwd[{label} {rows}x{width} {dtype}]", _rmsnorm_fwd, {"X": dtype, "Y": dtype, "RSTD": "fp32"},
            {"n_rows": rows, "n_cols": width, "stride_x": width, "stride_y": width}, ("eps",), const, num_warps,
            bytes_moved=2 * n * size + 4 * rows, flops=3 * n))
        specs.append(KernelSpec(
            f"rmsnorm_bwd[{label} {rows}x{width} {dtype}]", _rmsnorm_bwd,
            {"DY": dtype, "X": dtype, "RSTD": "fp32", "DX": dtype},
            {"n_rows": rows, "n_cols": width, "stride_dy": width, "stride_x": width, "stride_dx": width}, (),
            const, num_warps, bytes_moved=3 * n * size + 4 * rows, flops=6 * n))
    return specs
