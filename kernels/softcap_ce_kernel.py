"""Fused soft-capped cross-entropy statistics and backward of one vocab shard in Triton, never materializing
fp32 [tokens x vocab]. Local math only: combining the shards over the tp group is `megachat.tensor_parallel`'s.

Statistics (`softcap_ce_stats`): one pass over the raw logits in BLOCK_V chunks per row block,
c = cap * tanh(z / cap) in fp32, online max and sum-exp per row, plus the capped target logit when this shard
owns the target id. Backward (`softcap_ce_backward`): a second pass recomputes the softmax from the global
log-sum-exp chunk by chunk and writes d logits = (softmax - onehot) * dloss * (1 - (c / cap)^2) in logits'
dtype. tanh is exp-based (1 - 2 / (exp(2y) + 1)) because libdevice is unavailable in the interpreter.
"""
import torch
import triton
import triton.language as tl

from .runtime import FP_FUSION, KernelSpec, interpreting


@triton.jit
def _softcap_ce_fwd(LOGITS, TARGETS, MAX, SUMEXP, TGT, n_rows, n_cols, stride, vocab_start, ignore_index, cap,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    base = LOGITS + rows[:, None] * stride
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        z = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        c = cap - 2.0 * cap / (tl.exp(2.0 * z / cap) + 1.0)
        c = tl.where(mask, c, float("-inf"))
        m_new = tl.maximum(m, tl.max(c, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new[:, None]), axis=1)
        m = m_new
    tgt = tl.load(TARGETS + rows, mask=row_ok, other=ignore_index)
    local = tgt - vocab_start
    owned = row_ok & (tgt != ignore_index) & (local >= 0) & (local < n_cols)
    local = tl.where(owned, local, 0)
    zt = tl.load(LOGITS + rows * stride + local, mask=owned, other=0.0).to(tl.float32)
    ct = tl.where(owned, cap - 2.0 * cap / (tl.exp(2.0 * zt / cap) + 1.0), 0.0)
    tl.store(MAX + rows, m, mask=row_ok)
    tl.store(SUMEXP + rows, s, mask=row_ok)
    tl.store(TGT + rows, ct, mask=row_ok)


@triton.jit
def _softcap_ce_bwd(LOGITS, TARGETS, LSE, DLOSS, DLOGITS, n_rows, n_cols, stride, stride_d, vocab_start,
                    ignore_index, cap, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    tgt = tl.load(TARGETS + rows, mask=row_ok, other=ignore_index)
    local = tgt - vocab_start
    g = tl.load(DLOSS + rows, mask=row_ok, other=0.0)
    g = tl.where(tgt != ignore_index, g, 0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        z = tl.load(LOGITS + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        th = 1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0)
        p = tl.exp(cap * th - lse[:, None])
        p = tl.where(cols[None, :] == local[:, None], p - 1.0, p)
        d = p * g[:, None] * (1.0 - th * th)
        tl.store(DLOGITS + rows[:, None] * stride_d + cols[None, :], d.to(DLOGITS.dtype.element_ty), mask=mask)


def _config(interpret):
    """(BLOCK_N, BLOCK_V, num_warps): a GPU program streams one row in 4096-wide chunks (16 bf16 per thread);
    an interpreter program takes 16 rows x 4096."""
    return (16, 4096, 4) if interpret else (1, 4096, 8)


def softcap_ce_stats(logits, targets, cap, ignore_index, vocab_start, out=None):
    """Local statistics of raw logits [N, V_local], fp32 [N] each: row max of the capped logits, sum of
    exp(c - max), capped target logit (0 where this shard does not own the target). out: optional buffers."""
    logits, targets = logits.contiguous(), targets.contiguous()
    n_rows, n_cols = logits.shape
    if out is None:
        out = tuple(torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    m, s, t = out
    block_n, block_v, num_warps = _config(interpreting())
    if n_rows == 0:
        return m, s, t
    _softcap_ce_fwd[(triton.cdiv(n_rows, block_n),)](
        logits, targets, m, s, t, n_rows, n_cols, logits.stride(0), vocab_start, ignore_index, float(cap),
        BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    return m, s, t


def softcap_ce_backward(logits, targets, lse, dloss, cap, ignore_index, vocab_start, out=None):
    """d loss / d logits [N, V_local] in logits' dtype from the global log-sum-exp lse fp32 [N] and dloss [N],
    recomputing the softmax chunk by chunk."""
    logits, targets = logits.contiguous(), targets.contiguous()
    lse, dloss = lse.contiguous(), dloss.float().contiguous()
    n_rows, n_cols = logits.shape
    d = torch.empty_like(logits) if out is None else out
    block_n, block_v, num_warps = _config(interpreting())
    if n_rows == 0:
        return d
    _softcap_ce_bwd[(triton.cdiv(n_rows, block_n),)](
        logits, targets, lse, dloss, d, n_rows, n_cols, logits.stride(0), d.stride(0), vocab_start, ignore_index,
        float(cap), BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    return d


def h100_specs(tokens=65536, vocab=65536, dtype="bf16"):
    """d20 launches (tp = 1): logits [tokens, vocab] (bf16 from the autocast lm_head), int64 targets."""
    block_n, block_v, num_warps = _config(interpret=False)
    const = {"BLOCK_N": block_n, "BLOCK_V": block_v}
    n = tokens * vocab
    size = 2 if dtype == "bf16" else 4
    ints = {"n_rows": tokens, "n_cols": vocab, "stride": vocab, "vocab_start": 0, "ignore_index": -1}
    return [
        KernelSpec(f"softcap_ce_fwd[{tokens}x{vocab} {dtype}]", _softcap_ce_fwd,
                   {"LOGITS": dtype, "TARGETS": "i64", "MAX": "fp32", "SUMEXP": "fp32", "TGT": "fp32"}, ints,
                   ("cap",), const, num_warps, bytes_moved=n * size + tokens * (8 + 12), flops=8 * n),
        KernelSpec(f"softcap_ce_bwd[{tokens}x{vocab} {dtype}]", _softcap_ce_bwd,
                   {"LOGITS": dtype, "TARGETS": "i64", "LSE": "fp32", "DLOSS": "fp32", "DLOGITS": dtype},
                   {**ints, "stride_d": vocab}, ("cap",), const, num_warps,
                   bytes_moved=2 * n * size + tokens * (8 + 8), flops=12 * n),
    ]
