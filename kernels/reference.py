"""Torch reference implementations of every fused kernel: the CPU path and the ground truth of the tests.

Each function reproduces the numerics of nanochat@885a4f2's `gpt.py` / `muon.py`:
- rmsnorm: `F.rms_norm(x, (x.size(-1),))`, eps = torch's default: the epsilon of the
  op-math type (fp32's 1.19e-7 for bf16/fp16/fp32 inputs, not bf16's 0.0078).
- rope: `apply_rotary_emb` with half-split pairs; the multiply-adds run in fp32 on the (bf16) table values.
- relu2: `F.relu(x).square()`; its gradient from the output, 2·sqrt(y)·dy (`relu2_backward`).
- newton_schulz: `zeropower_via_newtonschulz5` (bf16 by default), cast back to G's dtype.
- softcap_ce_stats / softcap_ce_backward: `15 * tanh(logits / 15)`, `.float()`, `F.cross_entropy(ignore_index=-1)`
  per token, split as Megatron's cross_entropy.py: the local statistics of one vocab shard and the local backward.
  softcap_ce_forward / softcap_ce_grad: the same two halves keeping tanh and exp between them (the fused head's
  gradient formed in forward: on a CPU the elementwise passes, not the math, are what costs).
  Combining the shards' statistics over the tp group is `megachat.tensor_parallel`'s job, not a kernel's.
"""
import torch
import torch.nn.functional as F

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def rmsnorm(x):
    """RMS over the last dim, no weight; same shape and dtype as x."""
    return F.rms_norm(x, (x.size(-1),))


def rope(x, cos, sin, offset=0):
    """x [B, T, H, D]; cos/sin [T_max, D//2]; rows offset..offset+T (offset an int, or int64 [B]: one per row);
    fp32 math, output in x's dtype."""
    B, T, D = x.size(0), x.size(1), x.size(3)
    d = D // 2
    if torch.is_tensor(offset):  # per-row positions (left-padded batches in the KV-cache engine)
        rows = (offset.view(B, 1) + torch.arange(T, device=offset.device)).clamp(min=0)  # padding: any row will do
        c, s = cos[rows].float().view(B, T, 1, d), sin[rows].float().view(B, T, 1, d)
    else:
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
    X = X.contiguous()  # a tall G's transposed view would make every elementwise op below a strided one (CPU: ~2x)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def softcap_ce_stats(logits, targets, cap=15.0, ignore_index=-1, vocab_start=0):
    """Local statistics of raw logits [N, V_local] (global ids vocab_start..) and targets [N] int64 global ids,
    fp32 [N] each, of c = cap * tanh(logits / cap): row max, sum of exp(c - max), c at the target (0 where the
    target is ignored or outside this shard)."""
    # nanochat: softcap in logits' dtype, then float(). In place where the op is the same (one [N, V] buffer
    # instead of five: on a CPU the fresh buffers' page faults cost as much as the math)
    capped = torch.div(logits, cap).tanh_().mul_(cap).float()
    V = capped.size(1)
    m = capped.amax(dim=1)
    local = targets - vocab_start
    owned = (local >= 0) & (local < V) & (targets != ignore_index)
    picked = capped.gather(1, local.clamp(0, V - 1)[:, None]).squeeze(1)
    sumexp = capped.sub_(m[:, None]).exp_().sum(dim=1)
    return m, sumexp, torch.where(owned, picked, torch.zeros_like(picked))


def softcap_ce_forward(logits, targets, cap=15.0, ignore_index=-1, vocab_start=0):
    """softcap_ce_stats' (max, sum-exp, target) and what softcap_ce_grad needs to form d logits without computing
    tanh and exp again: tanh(logits / cap) and exp(c - max) [N, V_local] (two buffers; the logits are not kept)."""
    th = torch.div(logits, cap).tanh_()
    capped = (th * cap).float()
    V = capped.size(1)
    m = capped.amax(dim=1)  # amax: the same value as max(dim=1).values, without the indices (7x faster on CPU)
    local = targets - vocab_start
    owned = (local >= 0) & (local < V) & (targets != ignore_index)
    picked = capped.gather(1, local.clamp(0, V - 1)[:, None]).squeeze(1)
    e = capped.sub_(m[:, None]).exp_()
    return (m, e.sum(dim=1), torch.where(owned, picked, torch.zeros_like(picked))), (th, e, m)


def softcap_ce_grad(saved, targets, lse, dloss, cap=15.0, ignore_index=-1, vocab_start=0):
    """d loss / d logits [N, V_local] in the logits' dtype from softcap_ce_forward's saved buffers (used up, in
    place) and the global log-sum-exp lse fp32 [N]: softmax = exp(c - max) * exp(max - lse)."""
    th, e, m = saved
    V = e.size(1)
    grad = e.mul_(torch.exp(m - lse)[:, None])
    local = targets - vocab_start
    owned = (local >= 0) & (local < V) & (targets != ignore_index)
    rows = owned.nonzero().squeeze(1)
    grad[rows, local[rows]] -= 1.0
    g = dloss.float().masked_fill(targets == ignore_index, 0.0)
    grad.mul_(g[:, None]).mul_(th.float().square_().neg_().add_(1.0))
    return grad.to(th.dtype)


def softcap_ce_backward(logits, targets, lse, dloss, cap=15.0, ignore_index=-1, vocab_start=0):
    """d loss / d logits [N, V_local] in logits' dtype: (softmax - onehot) * dloss * (1 - tanh^2), 0 on ignored
    rows; lse: the log-sum-exp fp32 [N] over the whole vocab (all shards), dloss [N]."""
    V = logits.size(1)
    th = torch.div(logits, cap).tanh_()  # the same ops as written out of place, in place on one buffer each
    grad = (cap * th).float().sub_(lse[:, None]).exp_()
    local = targets - vocab_start
    owned = (local >= 0) & (local < V) & (targets != ignore_index)
    rows = owned.nonzero().squeeze(1)
    grad[rows, local[rows]] -= 1.0
    g = dloss.float().masked_fill(targets == ignore_index, 0.0)
    grad.mul_(g[:, None]).mul_(th.float().square_().neg_().add_(1.0))  # d(cap*tanh(x/cap))/dx = 1 - tanh^2
    return grad.to(logits.dtype)


def attention(q, k, v, causal=True, mask=None):
    """q [B, T, H, D], k/v [B, Tk, Hkv, D] -> [B, T, H, D] via SDPA; with T < Tk (KV cache) the queries are the
    last T positions, as nanochat's engine does. mask: bool [B, 1, T, Tk] (True = attend) instead of `causal`."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if mask is not None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    elif not causal or Tq == 1:
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    elif Tq == Tk:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        # Query i sits at position Tk - Tq + i: it sees the whole prefix and the chunk causally.
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)
