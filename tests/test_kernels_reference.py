"""The torch references of megachat.kernels reproduce nanochat's numerics (golden fixture and nanochat's formulas),
and the vocab-parallel cross-entropy over a real 2-process gloo group equals the unsharded one."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _dist import run_gloo, vocab_split_softcap_ce

from megachat import kernels
from megachat.kernels import reference

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat_v0_tiny.pt"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_newton_schulz_matches_nanochat_golden_at_bf16_tolerance():
    gold = torch.load(FIXTURE, weights_only=True)
    out = kernels.newton_schulz(gold["ns_input"])
    assert out.dtype == torch.float32 and out.shape == gold["ns_output"].shape
    # bf16 Newton-Schulz carries ~3% run-to-run rounding noise; a wrong step count or coefficient is off by >30%.
    assert rel_err(out, gold["ns_output"]) < 0.05


def test_newton_schulz_fp32_matches_float64_iteration_and_transposes_tall_matrices():
    torch.manual_seed(0)
    G = torch.randn(3, 70, 45)  # batched, rows > cols: iterated on the transpose
    a, b, c = reference.NS_COEFFS
    X = G.double().mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    out = kernels.newton_schulz(G, compute_dtype=torch.float32)
    torch.testing.assert_close(out.double(), X.mT, rtol=0, atol=1e-5)


def nanochat_apply_rotary_emb(x, cos, sin):
    # nanochat gpt.py (Oct 2025), cos/sin shaped [1, T, 1, D/2] in bf16.
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3).to(x.dtype)


def rotary_tables(t_max, head_dim, base=10000):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(t_max, dtype=torch.float32), inv_freq)
    return freqs.cos().bfloat16(), freqs.sin().bfloat16()


def test_rope_matches_nanochat_apply_rotary_emb_with_bf16_tables_and_offset():
    torch.manual_seed(0)
    cos, sin = rotary_tables(64, 32)
    x = torch.randn(2, 7, 3, 32)
    offset = 5
    want = nanochat_apply_rotary_emb(x, cos[None, offset:offset + 7, None], sin[None, offset:offset + 7, None])
    torch.testing.assert_close(kernels.rope(x, cos, sin, offset), want, rtol=0, atol=0)


def test_rope_rejects_positions_beyond_the_table():
    cos, sin = rotary_tables(8, 4)
    with pytest.raises(ValueError, match="exceed the cos/sin table"):
        kernels.rope(torch.zeros(1, 5, 1, 4), cos, sin, offset=4)


def test_rope_rejects_tables_not_shaped_t_by_half_head_dim():
    cos, sin = rotary_tables(8, 4)
    with pytest.raises(ValueError, match="squeeze the tables"):
        kernels.rope(torch.zeros(1, 5, 1, 4), cos[None, :, None], sin[None, :, None])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1.5 * 2.0 ** -8)])
def test_relu2_gradient_from_its_output_matches_float64(dtype, tol):
    # dx = 2 * sqrt(y) * dy: the stored y's rounding is halved by sqrt, then dx is rounded once.
    torch.manual_seed(0)
    x = (torch.randn(300, 257) * 4).to(dtype)
    dy = torch.randn(300, 257).to(dtype)
    xr = x.clone().requires_grad_()
    kernels.relu2(xr).backward(dy)
    want = 2 * x.double().clamp(min=0) * dy.double()
    err = (xr.grad.double() - want).abs()
    assert xr.grad.dtype == dtype
    assert (err <= tol * want.abs() + 1e-30).all(), f"max rel err {(err / want.abs().clamp(min=1e-30)).max()}"


def test_mlp_autograd_keeps_the_relu2_output_but_not_the_up_projection():
    from megachat.model import MLP, GPTConfig
    from megachat.parallel import Grid
    torch.manual_seed(0)
    mlp = MLP(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=4, n_kv_head=4, n_embd=64), Grid())
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.1)
    params = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
    saved = {}  # storage -> bytes of every activation autograd keeps for backward

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(2, 16, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mlp(x)
    # c_fc keeps x, c_proj keeps y = relu2(c_fc(x)) [.., 256]; relu2 adds nothing (h or relu(h) would add 4 * x).
    assert sorted(saved.values()) == [x.nbytes, 4 * x.nbytes]
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def nanochat_loss(logits, targets):
    capped = (15 * torch.tanh(logits / 15)).float()
    return F.cross_entropy(capped, targets, ignore_index=-1, reduction="none")


def test_softcap_cross_entropy_matches_nanochat_loss_and_gradient():
    torch.manual_seed(0)
    logits = (torch.randn(9, 50) * 20).requires_grad_()
    targets = torch.randint(0, 50, (9,))
    targets[[0, 4]] = -1
    weights = torch.rand(9)
    loss = kernels.softcap_cross_entropy(logits, targets)
    (loss * weights).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()
    want = nanochat_loss(ref_logits, targets)
    (want * weights).sum().backward()
    assert loss.dtype == torch.float32 and loss[0] == 0 and loss[4] == 0
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.timeout(120)
def test_softcap_cross_entropy_tp2_matches_unsharded():
    torch.manual_seed(0)
    logits = torch.randn(11, 64) * 20
    targets = torch.randint(0, 64, (11,))
    targets[3] = -1
    targets[5], targets[6] = 0, 63  # the first and last id of the two shards' ranges
    weights = torch.rand(11)
    r0, r1 = run_gloo(vocab_split_softcap_ce, 2, logits, targets, weights)
    full = logits.clone().requires_grad_()
    want = kernels.softcap_cross_entropy(full, targets)
    (want * weights).sum().backward()
    torch.testing.assert_close(r0["loss"], want.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(r1["loss"], want.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(torch.cat([r0["grad"], r1["grad"]], 1), full.grad, rtol=1e-5, atol=1e-7)


def test_attention_with_kv_cache_equals_the_last_rows_of_full_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)  # GQA 2:1
    full = kernels.attention(q, k, v)
    torch.testing.assert_close(kernels.attention(q[:, 6:], k, v), full[:, 6:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernels.attention(q[:, 8:], k, v), full[:, 8:], rtol=1e-5, atol=1e-6)
    # GQA equals repeating each kv head for its group of query heads.
    k2, v2 = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    torch.testing.assert_close(full, kernels.attention(q, k2, v2), rtol=1e-5, atol=1e-6)


def test_megachat_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("MEGACHAT_TRITON", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.relu2(torch.ones(3))
