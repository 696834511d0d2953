"""Torch reference implementations of every fused kernel: the CPU path and the ground truth of the tests.

Each function reproduces nanochat's numerics (late-October-2025 `gpt.py` / `muon.py`):
- rmsnorm: `F.rms_norm(x, (x.size(-1),))`, eps = torch's default: the epsilon of the
  op-math type (fp32's 1.19e-7 for bf16/fp16/fp32 inputs, not bf16's 0.0078).
- rope: `apply_rotary_emb` with half-split pairs; the multiply-adds run in fp32 on the (bf16) table values.
- relu2: `F.relu(x).square()`; its gradient from the output, 2·sqrt(y)·dy (`relu2_backward`).
- newton_schulz: `zeropower_via_newtonschulz5` (bf16 by default), cast back to G's dtype.
- softcap_cross_entropy: `15 * tanh(logits / 15)`, `.float()`, `F.cross_entropy(ignore_index=-1)` per token,
  written for a vocab shard with the max / sum-exp / target logit all-reduced over the tp group.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def rmsnorm(x):
    """RMS over the last dim, no weight; same shape and dtype as x."""
    return F.rms_norm(x, (x.size(-1),))


def rope(x, cos, sin, offset=0):
    """x [B, T, H, D]; cos/sin [T_max, D//2]; rows offset..offset+T; fp32 math, output in x's dtype."""
    T, D = x.size(1), x.size(3)
    d = D // 2
    c = cos[offset:offset + T].float().view(1, T, 1, d)
    s = sin[offset:offset + T].float().view(1, T, 1, d)
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    y1 = x1 * c + x2 * s
    y2 = x1 * (-s) + x2 * c
    return torch.cat([y1, y2], 3).to(x.dtype)


def relu2(x):
    return F.relu(x).square()


def relu2_backward(dy, y):
    """Gradient of relu2 from its output y = relu(x)**2: 2 * sqrt(y) * dy, in fp32 (or fp64), y's dtype."""
    math_dtype = torch.promote_types(y.dtype, torch.float32)
    return (2 * y.to(math_dtype).sqrt() * dy.to(math_dtype)).to(y.dtype)


def softcap(logits, cap=15.0):
    return cap * torch.tanh(logits / cap)


def newton_schulz_start(G, compute_dtype):
    """(X, transposed): G in compute_dtype, made wide (rows <= cols) and scaled to Frobenius norm ~1."""
    X = G.to(compute_dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    return X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7), transposed


@torch.no_grad()
def newton_schulz(G, steps=5, compute_dtype=torch.bfloat16):
    """nanochat's quintic Newton-Schulz on [..., m, n]; computed in compute_dtype, returned in G's dtype."""
    a, b, c = NS_COEFFS
    X, transposed = newton_schulz_start(G, compute_dtype)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def _all_reduce(t, op, group):
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def softcap_ce_stats(capped, targets, ignore_index, vocab_start, group):
    """Shard statistics of fp32 capped logits [N, V_local]: (global max [N], log-sum-exp [N], target logit [N])."""
    V = capped.size(1)
    m = _all_reduce(capped.max(dim=1).values, dist.ReduceOp.MAX, group)
    sumexp = _all_reduce(torch.exp(capped - m[:, None]).sum(dim=1), dist.ReduceOp.SUM, group)
    local = targets - vocab_start
    owned = (local >= 0) & (local < V) & (targets != ignore_index)
    picked = capped.gather(1, local.clamp(0, V - 1)[:, None]).squeeze(1)
    tgt = _all_reduce(torch.where(owned, picked, torch.zeros_like(picked)), dist.ReduceOp.SUM, group)
    return m, m + torch.log(sumexp), tgt


class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-token softcapped cross-entropy on a vocab shard; the backward recomputes the softmax from logits."""

    @staticmethod
    def forward(ctx, logits, targets, cap, ignore_index, vocab_start, group):
        capped = (cap * torch.tanh(logits / cap)).float()  # nanochat: softcap in logits' dtype, then float()
        _, lse, tgt = softcap_ce_stats(capped, targets, ignore_index, vocab_start, group)
        loss = torch.where(targets == ignore_index, torch.zeros_like(lse), lse - tgt)
        ctx.save_for_backward(logits, targets, lse)
        ctx.cap, ctx.ignore_index, ctx.vocab_start = cap, ignore_index, vocab_start
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        cap, V = ctx.cap, logits.size(1)
        th = torch.tanh(logits / cap)
        capped = (cap * th).float()
        grad = torch.exp(capped - lse[:, None])
        local = targets - ctx.vocab_start
        owned = (local >= 0) & (local < V) & (targets != ctx.ignore_index)
        rows = owned.nonzero().squeeze(1)
        grad[rows, local[rows]] -= 1.0
        g = torch.where(targets == ctx.ignore_index, torch.zeros_like(grad_loss), grad_loss.float())
        grad = grad * g[:, None] * (1.0 - th.float() ** 2)  # d(cap*tanh(x/cap))/dx = 1 - tanh^2
        return grad.to(logits.dtype), None, None, None, None, None


def softcap_cross_entropy(logits, targets, cap=15.0, ignore_index=-1, vocab_start=0, group=None):
    """logits [N, V_local] raw shard of global ids vocab_start.., targets [N] int64 -> loss fp32 [N] (0 if ignored)."""
    return SoftcapCrossEntropy.apply(logits, targets, cap, ignore_index, vocab_start, group)


def attention(q, k, v, causal=True):
    """q [B, T, H, D], k/v [B, Tk, Hkv, D] -> [B, T, H, D] via SDPA; with T < Tk (KV cache) the queries are the
    last T positions, as nanochat's engine does."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if not causal or Tq == 1:
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    elif Tq == Tk:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        # Query i sits at position Tk - Tq + i: it sees the whole prefix and the chunk causally.
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)
