"""Every kernel on CUDA against its torch reference on the same device: forward and backward, fp32 and bf16 (bf16
within two roundings of the float64 reference on the same bf16 inputs). Skipped without CUDA; `make gpu-check`
runs it. MEGACHAT_KERNEL_DEVICE=cpu with MEGACHAT_TRITON=1 TRITON_INTERPRET=1 runs the same cases in Triton's
interpreter (how this file was checked without a GPU)."""
import os

import pytest
import torch

from megachat import kernels
from megachat.kernels import reference
from megachat.tensor_parallel import vocab_parallel_linear_loss, vocab_parallel_loss

DEVICE = os.environ.get("MEGACHAT_KERNEL_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(DEVICE, dtype)


def assert_matches(got, ref64, dtype, what, bf16_tol=2 * 2 ** -8):
    """fp32: within 1e-4 of the float64 reference relative to its scale; bf16: within bf16_tol (default two bf16
    roundings)."""
    scale = ref64.abs().max().item() + 1e-30
    err = (got.double() - ref64).abs().max().item() / scale
    assert torch.isfinite(got).all() and err <= (1e-4 if dtype == torch.float32 else bf16_tol), (what, err)


def check_fwd_bwd(fused, ref, inputs, dtype, n_grad=1, bf16_tol=2 * 2 ** -8):
    """fused(*inputs) (the Triton kernels on DEVICE) and ref on float64 copies: outputs and input gradients."""
    xs = [x.detach().clone().requires_grad_(i < n_grad) for i, x in enumerate(inputs)]
    x64 = [x.detach().double().requires_grad_(i < n_grad) if x.is_floating_point() else x
           for i, x in enumerate(inputs)]
    ys, ys64 = fused(*xs), ref(*x64)
    ys, ys64 = (ys, ys64) if isinstance(ys, tuple) else ((ys,), (ys64,))
    grads = [randn(*y.shape, seed=7 + i) for i, y in enumerate(ys)]
    torch.autograd.backward(ys, [g.to(y.dtype) for g, y in zip(grads, ys)])
    torch.autograd.backward(ys64, [g.to(y.dtype).double() for g, y in zip(grads, ys)])
    for i, (y, y64) in enumerate(zip(ys, ys64)):
        assert_matches(y, y64.detach(), dtype, f"output {i}", bf16_tol)
    for i in range(n_grad):
        assert_matches(xs[i].grad, x64[i].grad, dtype, f"gradient {i}", bf16_tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rmsnorm(dtype):
    check_fwd_bwd(kernels.rmsnorm, reference.rmsnorm, [randn(257, 1280, dtype=dtype, scale=3)], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_qk(dtype):
    q, k = randn(2, 64, 4, 128, dtype=dtype), randn(2, 64, 2, 128, dtype=dtype, seed=1)
    cos, sin = randn(80, 64, dtype=dtype, seed=2), randn(80, 64, dtype=dtype, seed=3)

    def ref(q, k):
        return reference.rope(q, cos.double(), sin.double(), 3), reference.rope(k, cos.double(), sin.double(), 3)
    check_fwd_bwd(lambda q, k: kernels.rope_qk(q, k, cos, sin, 3), ref, [q, k], dtype, n_grad=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_relu2(dtype):
    check_fwd_bwd(kernels.relu2, reference.relu2, [randn(129, 5120, dtype=dtype)], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_softcap_ce(dtype):
    targets = torch.randint(0, 3001, (300,), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    targets[::7] = -1

    def loss(logits):
        return vocab_parallel_loss(logits, targets, 0, None, reduction="none")

    def ref(logits):  # the same formula, unfused, in float64
        capped = 15 * torch.tanh(logits / 15)
        return torch.nn.functional.cross_entropy(capped, targets, ignore_index=-1, reduction="none")
    check_fwd_bwd(loss, ref, [randn(300, 3001, dtype=dtype, scale=10)], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_fused_lm_head_loss(dtype, reduction):
    """The LM head and the loss fused in chunks of 96 of 300 tokens (the last short): the per-token path and the
    weighted sum whose gradients are formed in forward."""
    targets = torch.randint(0, 3001, (300,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    targets[::7] = -1
    weights = torch.rand(300, generator=torch.Generator().manual_seed(6)).to(DEVICE)

    def fused(h, w):
        if reduction == "none":
            return vocab_parallel_linear_loss(h, w, targets, 0, None, reduction="none", chunk_tokens=96)
        return vocab_parallel_linear_loss(h, w, targets, 0, None, reduction="sum", chunk_tokens=96,
                                          weights=weights.to(torch.float32))

    def ref(h, w):
        capped = 15 * torch.tanh(h @ w.t() / 15)
        loss = torch.nn.functional.cross_entropy(capped, targets, ignore_index=-1, reduction="none")
        return loss if reduction == "none" else (loss * weights.double()).sum()
    # bf16: the logits are rounded to bf16 before the loss (as on the unfused path), hence the looser bound
    check_fwd_bwd(fused, ref, [randn(300, 256, dtype=dtype), randn(3001, 256, dtype=dtype, scale=0.3, seed=1)],
                  dtype, n_grad=2, bf16_tol=2 ** -5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(256, 256), (200, 520), (3, 160, 96)])
def test_newton_schulz(shape, dtype):
    """Five steps in dtype (the Triton kernels) against the same iteration in float64 on the rounded input, by the
    Frobenius norm: bf16 storage between the products costs a few percent, as in nanochat's own bf16 iteration;
    fp32 within 1 % (a GPU's tensor-core fp32 products may run as TF32)."""
    G = randn(*shape, dtype=dtype)
    a, b, c = reference.NS_COEFFS
    X = G.double()
    if X.size(-2) > X.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    got = kernels.newton_schulz(G, compute_dtype=dtype)
    assert got.dtype == dtype and got.device == G.device
    assert ((got.double() - X).norm() / X.norm()).item() < (0.01 if dtype == torch.float32 else 0.03)
