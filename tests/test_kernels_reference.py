"""The torch references of megachat.kernels reproduce nanochat's numerics (golden fixture and nanochat's formulas);
the cross-entropy's statistics are local to one vocab shard (the 2-process vocab split that combines them is checked
in tests/test_tensor_parallel.py)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megachat import kernels
from megachat.kernels import reference
from megachat.tensor_parallel import vocab_parallel_loss

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat_v0_tiny.pt"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_newton_schulz_matches_nanochat_golden_at_bf16_tolerance(compiled):
    # compiled: what --compile runs (torch.compile fuses the elementwise ops, rounding to bf16 less often)
    gold = torch.load(FIXTURE, weights_only=True)
    out = kernels.newton_schulz(gold["ns_input"], compiled=compiled)
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
    # nanochat@885a4f2 gpt.py, cos/sin shaped [1, T, 1, D/2] in bf16.
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


def test_softcap_ce_stats_are_the_local_statistics_of_one_vocab_shard():
    torch.manual_seed(0)
    logits = torch.randn(6, 8) * 20  # the shard of global ids 8..15
    targets = torch.tensor([8, 15, 3, 16, -1, 11])
    m, s, t = kernels.softcap_ce_stats(logits, targets, vocab_start=8)
    capped = 15 * torch.tanh(logits.double() / 15)
    want_m = capped.max(dim=1).values
    torch.testing.assert_close(m.double(), want_m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.double(), torch.exp(capped - want_m[:, None]).sum(1), rtol=1e-5, atol=0)
    owned = torch.tensor([True, True, False, False, False, True])  # 3 and 16 are other shards' ids, -1 ignored
    want_t = torch.where(owned, capped.gather(1, (targets - 8).clamp(0, 7)[:, None]).squeeze(1), 0.0)
    torch.testing.assert_close(t.double(), want_t, rtol=1e-6, atol=1e-6)
    assert m.dtype == s.dtype == t.dtype == torch.float32 and (t[~owned] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_softcap_ce_forward_and_grad_keep_tanh_and_exp_and_equal_stats_and_backward(dtype):
    """The torch path's two halves with tanh and exp kept between them (the fused head's gradient in forward) give
    the statistics of softcap_ce_stats bit for bit and d logits of softcap_ce_backward to rounding, on a shard."""
    torch.manual_seed(0)
    logits = (torch.randn(7, 8) * 20).to(dtype)  # the shard of global ids 8..15
    targets = torch.tensor([8, 15, 3, 16, -1, 11, 9])
    dloss = torch.rand(7)
    stats, saved = kernels.softcap_ce_forward(logits, targets, vocab_start=8)
    for got, want in zip(stats, kernels.softcap_ce_stats(logits, targets, vocab_start=8)):
        assert torch.equal(got, want)
    lse = stats[0] + stats[1].log() + 0.3  # as if another shard added to the sum-exp
    got = kernels.softcap_ce_grad(saved, targets, lse, dloss, vocab_start=8)
    want = kernels.softcap_ce_backward(logits, targets, lse, dloss, vocab_start=8)
    assert got.dtype == dtype and (got[4] == 0).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5 if dtype == torch.float32 else 2 ** -7, atol=1e-7)


def test_softcap_ce_through_vocab_parallel_loss_matches_nanochat_loss_and_gradient():
    torch.manual_seed(0)
    logits = (torch.randn(9, 50) * 20).requires_grad_()
    targets = torch.randint(0, 50, (9,))
    targets[[0, 4]] = -1
    weights = torch.rand(9)
    loss = vocab_parallel_loss(logits, targets, 0, None, reduction="none")  # kernels' stats and backward, tp = 1
    (loss * weights).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()
    want = nanochat_loss(ref_logits, targets)
    (want * weights).sum().backward()
    assert loss.dtype == torch.float32 and loss[0] == 0 and loss[4] == 0
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)


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
