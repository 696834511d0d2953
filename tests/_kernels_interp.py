"""Triton kernels vs their torch references in Triton's CPU interpreter (forward and backward).

Not collected by the main pytest run: tests/test_kernels_interpreter.py runs this module in a subprocess with
TRITON_INTERPRET=1 and MEGACHAT_TRITON=1 set before triton is imported (another test module may import triton
first in the main process, and @triton.jit picks the interpreter when it decorates). Each kernel is checked in
fp32 against its reference, in bf16 against a float64 computation on the same bf16-rounded inputs, on odd shapes
(one row, non-power-of-two widths, many rows), and with NaN-poisoned output buffers so unwritten elements fail.
"""
import os
from unittest import mock

if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("MEGACHAT_TRITON") != "1":
    raise RuntimeError("tests/_kernels_interp.py needs TRITON_INTERPRET=1 and MEGACHAT_TRITON=1 in the environment; "
                       "run it through tests/test_kernels_interpreter.py")

import pytest  # noqa: E402
import torch  # noqa: E402

from megachat import kernels  # noqa: E402
from megachat.kernels import newton_schulz_kernel, reference, relu2_kernel, rmsnorm_kernel, rope_kernel  # noqa: E402
from megachat.kernels import softcap_ce_kernel  # noqa: E402
from megachat.tensor_parallel import vocab_parallel_linear_loss, vocab_parallel_loss  # noqa: E402

from _dist import run_gloo, vocab_split_softcap_ce  # noqa: E402

BF16_EPS = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits)


def poisoned(like, dtype=None):
    return torch.full_like(like, float("nan"), dtype=dtype or like.dtype)


def assert_bf16_close(got, want64, roundings=2):
    """got (bf16) within `roundings` units of 2^-8 of the float64 result, relative to the output's scale.

    The interpreter's fp32 -> bf16 cast truncates (error < 2^-7, two units) where the GPU rounds to nearest."""
    scale = want64.abs().max().item() + 1e-30
    err = (got.double() - want64).abs()
    assert torch.isfinite(got).all()
    assert (err <= roundings * BF16_EPS * want64.abs() + 1e-3 * scale).all(), \
        f"max err {err.max().item()} scale {scale}"


def check_autograd_fp32(fn, ref_fn, x, *args, rtol=1e-5, atol=1e-6):
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y1, y2 = fn(x1, *args), ref_fn(x2, *args)
    torch.testing.assert_close(y1, y2, rtol=rtol, atol=atol)
    g = torch.randn_like(y2)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- rmsnorm
@pytest.mark.parametrize("shape", [(1, 1280), (37, 1000), (5000, 96), (2, 3, 5, 100)])
def test_rmsnorm_fp32_forward_and_backward_match_reference(shape):
    check_autograd_fp32(kernels.rmsnorm, reference.rmsnorm, torch.randn(shape) * 3)


def rmsnorm64(x, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def test_rmsnorm_bf16_matches_float64_on_bf16_inputs():
    x = (torch.randn(300, 1000) * 3).bfloat16()
    dy = torch.randn(300, 1000).bfloat16()
    eps = torch.finfo(torch.float32).eps  # F.rms_norm's default for bf16: the op-math (fp32) epsilon
    xr = x.clone().requires_grad_()
    y = kernels.rmsnorm(xr)
    y.backward(dy)
    x64 = x.double().requires_grad_()
    y64 = rmsnorm64(x64, eps)
    y64.backward(dy.double())
    assert y.dtype == torch.bfloat16 and xr.grad.dtype == torch.bfloat16
    assert_bf16_close(y, y64.detach())
    assert_bf16_close(xr.grad, x64.grad)


def test_rmsnorm_bf16_uses_the_eps_of_torch_rms_norm_for_small_inputs():
    x = (torch.randn(50, 300) * 1e-3).bfloat16()  # mean square ~1e-6: a bf16-sized eps would shrink y by ~40x
    torch.testing.assert_close(kernels.rmsnorm(x), reference.rmsnorm(x), rtol=2 * BF16_EPS, atol=0)


def test_rmsnorm_writes_every_element_of_poisoned_buffers():
    x = torch.randn(1031, 77)
    y, rstd = rmsnorm_kernel.rmsnorm_forward(x, out=poisoned(x))
    torch.testing.assert_close(y, reference.rmsnorm(x), rtol=1e-5, atol=1e-6)
    dx = rmsnorm_kernel.rmsnorm_backward(torch.randn_like(x), x, rstd, out=poisoned(x))
    assert torch.isfinite(dx).all()


# ---------------------------------------------------------------- rope
def tables(t_max, half, dtype=torch.bfloat16):
    return torch.randn(t_max, half).to(dtype), torch.randn(t_max, half).to(dtype)


@pytest.mark.parametrize("shape,offset", [((1, 1, 1, 2), 0), ((2, 7, 3, 66), 5), ((4, 300, 10, 16), 37)])
def test_rope_fp32_forward_and_backward_match_reference(shape, offset):
    cos, sin = tables(400, shape[3] // 2)
    check_autograd_fp32(kernels.rope, reference.rope, torch.randn(shape), cos, sin, offset)


def test_rope_bf16_matches_float64_on_bf16_inputs():
    cos, sin = tables(64, 33)
    x = torch.randn(3, 20, 5, 66).bfloat16()
    dy = torch.randn(3, 20, 5, 66).bfloat16()
    xr = x.clone().requires_grad_()
    y = kernels.rope(xr, cos, sin, 9)
    y.backward(dy)
    x64 = x.double().requires_grad_()
    y64 = reference.rope(x64, cos.double(), sin.double(), 9)
    y64.backward(dy.double())
    assert_bf16_close(y, y64.detach())
    assert_bf16_close(xr.grad, x64.grad)


def test_rope_writes_every_element_of_poisoned_buffers():
    cos, sin = tables(50, 24)
    q, k = torch.randn(2, 50, 3, 48), torch.randn(2, 50, 1, 48)
    yq, yk = rope_kernel.rope_apply((q, k), cos, sin, 0, outs=(poisoned(q), poisoned(k)))
    torch.testing.assert_close(yq, reference.rope(q, cos, sin, 0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(yk, reference.rope(k, cos, sin, 0), rtol=1e-6, atol=1e-6)
    bq, bk = rope_kernel.rope_apply((yq, yk), cos, sin, 0, backward=True, outs=(poisoned(q), poisoned(k)))
    # The backward is the transposed rotation: sin negated (the random tables are not unit rotations).
    torch.testing.assert_close(bq, reference.rope(yq, cos, -sin, 0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bk, reference.rope(yk, cos, -sin, 0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hq,hk,offset", [(1, 1, 0), (6, 2, 3), (5, 5, 11)])
def test_rope_qk_fp32_forward_and_backward_match_reference_with_gqa(hq, hk, offset):
    cos, sin = tables(400, 33)
    q, k = torch.randn(3, 257, hq, 66), torch.randn(3, 257, hk, 66)  # q and k rows end mid-program
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    yq, yk = kernels.rope_qk(q1, k1, cos, sin, offset)
    wq, wk = reference.rope(q2, cos, sin, offset), reference.rope(k2, cos, sin, offset)
    torch.testing.assert_close(yq, wq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(yk, wk, rtol=1e-6, atol=1e-6)
    gq, gk = torch.randn_like(wq), torch.randn_like(wk)
    ((yq * gq).sum() + (yk * gk).sum()).backward()
    ((wq * gq).sum() + (wk * gk).sum()).backward()
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k1.grad, k2.grad, rtol=1e-6, atol=1e-6)


def test_rope_qk_bf16_matches_float64_on_bf16_inputs():
    cos, sin = tables(64, 16)
    q, k = torch.randn(2, 30, 4, 32).bfloat16(), torch.randn(2, 30, 2, 32).bfloat16()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    yq, yk = kernels.rope_qk(qr, kr, cos, sin, 7)
    ((yq.float() * dq).sum() + (yk.float() * dk).sum()).backward()
    for x, y, d, grad in ((q, yq, dq, qr.grad), (k, yk, dk, kr.grad)):
        x64 = x.double().requires_grad_()
        y64 = reference.rope(x64, cos.double(), sin.double(), 7)
        y64.backward(d.double())
        assert y.dtype == grad.dtype == torch.bfloat16
        assert_bf16_close(y, y64.detach())
        assert_bf16_close(grad, x64.grad)


def test_rope_qk_rotates_q_and_k_in_one_launch_each_way(monkeypatch):
    launches = []
    kernel = rope_kernel._rope_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]
    monkeypatch.setattr(rope_kernel, "_rope_kernel", Counting())
    cos, sin = tables(16, 8)
    q, k = torch.randn(1, 16, 4, 16, requires_grad=True), torch.randn(1, 16, 2, 16, requires_grad=True)
    yq, yk = kernels.rope_qk(q, k, cos, sin)
    (yq.sum() + yk.sum()).backward()
    assert len(launches) == 2 and q.grad is not None and k.grad is not None


# ---------------------------------------------------------------- relu2
@pytest.mark.parametrize("shape", [(1,), (3, 1001), (70000,)])
def test_relu2_fp32_forward_and_backward_match_reference(shape):
    check_autograd_fp32(kernels.relu2, reference.relu2, torch.randn(shape))


def test_relu2_bf16_matches_float64_on_bf16_inputs():
    x = (torch.randn(777, 129) * 4).bfloat16()
    dy = torch.randn(777, 129).bfloat16()
    xr = x.clone().requires_grad_()
    y = kernels.relu2(xr)
    y.backward(dy)
    x64 = x.double()
    assert_bf16_close(y, x64.clamp(min=0) ** 2)
    # The gradient comes from the stored bf16 y: sqrt halves y's rounding, then dx is rounded: 1.5 roundings,
    # 3 units under the interpreter's truncating cast (the torch path is held to 1.5 in test_kernels_reference).
    assert_bf16_close(xr.grad, 2 * x64.clamp(min=0) * dy.double(), roundings=3)


def test_relu2_fp32_gradient_from_output_matches_float64():
    x, dy = torch.randn(3, 1001) * 4, torch.randn(3, 1001)
    xr = x.clone().requires_grad_()
    kernels.relu2(xr).backward(dy)
    torch.testing.assert_close(xr.grad.double(), 2 * x.double().clamp(min=0) * dy.double(), rtol=1e-6, atol=0)


def test_relu2_writes_every_element_of_poisoned_buffers():
    x = torch.randn(66000)
    y = relu2_kernel.relu2_forward(x, out=poisoned(x))
    torch.testing.assert_close(y, reference.relu2(x))
    dy = torch.randn_like(x)
    dx = relu2_kernel.relu2_backward(dy, y, out=poisoned(x))
    torch.testing.assert_close(dx, 2 * x.clamp(min=0) * dy, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- softcap cross-entropy
def ce_inputs(n, v, dtype=torch.float32):
    logits = (torch.randn(n, v) * 20).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[::5] = -1
    return logits, targets


def ce_loss(logits, targets):
    """Per-token loss at tp = 1 through the one autograd function of megachat.tensor_parallel."""
    return vocab_parallel_loss(logits, targets, 0, None, reduction="none")


def on_reference():
    """Within it, megachat.kernels dispatches to the torch reference (forward and backward alike)."""
    return mock.patch.dict(os.environ, {"MEGACHAT_TRITON": "0"})


@pytest.mark.parametrize("n,v", [(1, 7), (37, 5000), (300, 1000)])
def test_softcap_ce_fp32_forward_and_backward_match_reference(n, v):
    logits, targets = ce_inputs(n, v)
    if n == 1:
        targets[0] = 3
    w = torch.rand(n)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    la = ce_loss(a, targets)
    (la * w).sum().backward()
    with on_reference():
        lb = ce_loss(b, targets)
        (lb * w).sum().backward()
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_softcap_ce_shard_stats_and_backward_match_reference():
    logits = torch.randn(45, 777) * 20  # the shard of global ids 500..1276
    targets = torch.randint(0, 2000, (45,))  # ~40% of them in this shard, the rest other shards' ids
    targets[::5] = -1
    targets[1:4] = torch.tensor([500, 1276, 1277])  # the shard's first and last id, the first id past it
    got = softcap_ce_kernel.softcap_ce_stats(logits, targets, 15.0, -1, 500)
    want = reference.softcap_ce_stats(logits, targets, 15.0, -1, 500)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5)
    lse, dloss = want[0] + torch.log(want[1]) + 1.0, torch.rand(45)  # as if other shards held more of the mass
    torch.testing.assert_close(softcap_ce_kernel.softcap_ce_backward(logits, targets, lse, dloss, 15.0, -1, 500),
                               reference.softcap_ce_backward(logits, targets, lse, dloss, 15.0, -1, 500),
                               rtol=1e-4, atol=1e-6)


def test_softcap_ce_bf16_matches_float64_on_bf16_inputs():
    logits, targets = ce_inputs(64, 3000, torch.bfloat16)
    w = torch.rand(64)
    a = logits.clone().requires_grad_()
    loss = ce_loss(a, targets)
    (loss * w).sum().backward()
    b = logits.double().requires_grad_()
    capped = 15 * torch.tanh(b / 15)
    want = torch.nn.functional.cross_entropy(capped, targets, ignore_index=-1, reduction="none")
    (want * w.double()).sum().backward()
    assert loss.dtype == torch.float32 and a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-4)  # fp32 math on exact inputs
    assert_bf16_close(a.grad, b.grad)


def test_softcap_ce_writes_every_element_of_poisoned_buffers():
    logits, targets = ce_inputs(41, 999)
    out = tuple(torch.full((41,), float("nan")) for _ in range(3))
    stats = softcap_ce_kernel.softcap_ce_stats(logits, targets, 15.0, -1, 0, out=out)
    for got, want in zip(stats, reference.softcap_ce_stats(logits, targets, 15.0, -1, 0)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    lse = stats[0] + torch.log(stats[1])
    d = softcap_ce_kernel.softcap_ce_backward(logits, targets, lse, torch.rand(41), 15.0, -1, 0,
                                              out=poisoned(logits))
    assert torch.isfinite(d).all()


def test_softcap_ce_tp2_triton_matches_unsharded_reference():
    logits, targets = ce_inputs(23, 600)
    targets[1], targets[2] = 299, 300  # the last id of shard 0 and the first of shard 1
    w = torch.rand(23)
    r = run_gloo(vocab_split_softcap_ce, 2, logits, targets, w)
    full = logits.clone().requires_grad_()
    with on_reference():
        want = ce_loss(full, targets)
        (want * w).sum().backward()
    for ri in r:
        torch.testing.assert_close(ri["loss"], want.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(torch.cat([r[0]["grad"], r[1]["grad"]], 1), full.grad, rtol=1e-4, atol=1e-6)


def test_softcap_ce_fused_with_the_lm_head_matches_reference():
    """vocab_parallel_linear_loss (the LM head's matmul and the loss, chunks of 6 of 23 tokens, the last short; the
    per-token path and the weighted sum, whose gradients are formed in forward) with
    the Triton statistics and backward vs the same function on the torch reference."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(23, 40, generator=g), torch.randn(600, 40, generator=g)
    targets = torch.randint(0, 600, (23,), generator=g)
    targets[::5] = -1
    w = torch.rand(23, generator=g)

    def loss_and_grads(reduction):
        h, wt = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if reduction == "none":  # d logits in backward, from the logits computed again
            loss = vocab_parallel_linear_loss(h, wt, targets, 0, None, reduction="none", chunk_tokens=6)
            (loss * w).sum().backward()
        else:  # d logits formed in forward
            loss = vocab_parallel_linear_loss(h, wt, targets, 0, None, reduction="sum", chunk_tokens=6, weights=w)
            loss.backward()
        return loss.detach(), h.grad, wt.grad

    for reduction in ("none", "sum"):
        got = loss_and_grads(reduction)
        with on_reference():
            want = loss_and_grads(reduction)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=2e-5)
        for g_, w_ in zip(got[1:], want[1:]):
            torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- Newton-Schulz
def test_newton_schulz_symmetric_products_match_matmul_and_fill_poisoned_buffers():
    X = torch.randn(2, 70, 45)  # 3 tiles of 32 rows: the diagonal, mirrored and ragged tile pairs
    A = newton_schulz_kernel.syrk(X, out=poisoned(X, torch.float32).new_full((2, 70, 70), float("nan")))
    torch.testing.assert_close(A, X @ X.mT, rtol=1e-5, atol=1e-4)
    B = newton_schulz_kernel.syrk(A, out=torch.full_like(A, float("nan")), C=A, alpha=2.0315, beta=-4.775)
    torch.testing.assert_close(B, -4.775 * A + 2.0315 * (A @ A), rtol=1e-5, atol=1e-2)
    Y = newton_schulz_kernel.gemm(B, X, C=X, out=poisoned(X), alpha=1.0, beta=3.4445)
    torch.testing.assert_close(Y, 3.4445 * X + B @ X, rtol=1e-5, atol=1e-2)


def test_newton_schulz_tile_pair_numbering_covers_the_upper_triangle_once():
    import triton
    import triton.language as tl

    @triton.jit
    def pairs(OUT, n, BLOCK: tl.constexpr):
        p = tl.arange(0, BLOCK)
        i, j = newton_schulz_kernel._tile_pair(p)
        tl.store(OUT + 2 * p, i, mask=p < n)
        tl.store(OUT + 2 * p + 1, j, mask=p < n)
    tiles = 181  # 16,471 pairs: more tile pairs than 4096 rows in 32-row tiles give
    n = tiles * (tiles + 1) // 2
    out = torch.full((n, 2), -1, dtype=torch.int32)
    pairs[(1,)](out, n, BLOCK=triton.next_power_of_2(n))
    assert out.tolist() == [[i, j] for j in range(tiles) for i in range(j + 1)]


@pytest.mark.parametrize("shape", [(1, 1), (33, 33), (2, 70, 45), (45, 70)])
def test_newton_schulz_fp32_matches_reference(shape):
    G = torch.randn(shape)
    out = kernels.newton_schulz(G, compute_dtype=torch.float32)
    torch.testing.assert_close(out, reference.newton_schulz(G, compute_dtype=torch.float32), rtol=1e-4, atol=1e-5)


def test_newton_schulz_bf16_tracks_float64_iteration_on_bf16_inputs():
    G = torch.randn(64, 100).bfloat16()
    a, b, c = reference.NS_COEFFS
    X = G.double()
    X = X / (X.norm() + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    out = kernels.newton_schulz(G)
    assert out.dtype == torch.bfloat16
    # bf16 storage of X, A, B between products: a few percent, like nanochat's own bf16 iteration.
    assert ((out.double() - X).norm() / X.norm()).item() < 0.03


def test_newton_schulz_rejects_compute_dtypes_without_kernels():
    with pytest.raises(ValueError, match="bf16 or fp32"):
        kernels.newton_schulz(torch.randn(8, 8), compute_dtype=torch.float16)


def test_newton_schulz_bf16_matches_nanochat_golden():
    from pathlib import Path
    gold = torch.load(Path(__file__).parent / "fixtures" / "nanochat_v0_tiny.pt", weights_only=True)
    out = kernels.newton_schulz(gold["ns_input"])
    assert ((out - gold["ns_output"]).norm() / gold["ns_output"].norm()).item() < 0.05


def test_rmsnorm_rope_relu2_softcap_ce_accept_empty_inputs():
    assert kernels.rmsnorm(torch.zeros(0, 64)).shape == (0, 64)
    cos, sin = tables(8, 4)
    assert kernels.rope(torch.zeros(0, 3, 2, 8), cos, sin).shape == (0, 3, 2, 8)
    assert kernels.relu2(torch.zeros(0)).shape == (0,)
    assert ce_loss(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)).shape == (0,)
