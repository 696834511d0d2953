"""megachat.optim in one process: nanochat conformance (golden fixture), orthogonality, schedules, errors.

The multi-rank equivalence (tp / pp / dp / ZeRO against the single-process oracle) is in
test_optim_distributed.py.
"""
import copy
from pathlib import Path

import pytest
import torch

from megachat.kernels import newton_schulz
from megachat.optim import (LEARNING_RATES, HybridOptimizer, clip_coefficient, global_grad_norm, learning_rates,
                            lr_multiplier, muon_momentum, optimizer_stats, param_kind)

GOLDEN = Path(__file__).parent / "fixtures" / "nanochat_v0_tiny.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def test_newton_schulz_reproduces_nanochat(golden):
    out = newton_schulz(golden["ns_input"], steps=5, compute_dtype=torch.bfloat16)
    torch.testing.assert_close(out, golden["ns_output"], rtol=0, atol=2e-2)


def test_muon_step_reproduces_nanochat(golden):
    w = torch.nn.Parameter(golden["muon_weight"].clone())
    w.grad = golden["muon_grad"].clone()
    m = float(golden["muon_momentum"])
    opt = HybridOptimizer([("transformer.h.0.mlp.c_fc.weight", w)], n_embd=64, matrix_lr=float(golden["muon_lr"]))
    opt.set_schedule(0, 1.0, m)
    opt.step()
    got, want = w.detach() - golden["muon_weight"], golden["muon_weight_after"] - golden["muon_weight"]
    # both ran Newton-Schulz in bf16, which alone differs by 3.5% (relative Frobenius) from the golden NS
    # output; a wrong sqrt(rows/cols) scale would be off by 23%
    assert float((got - want).norm() / want.norm()) < 0.05


def test_newton_schulz_singular_values_near_one():
    # nanochat's quintic leaves singular values in about [0.68, 1.13] (fp32 gives 0.682..1.134 here);
    # bf16 rounding widens that by ~0.01. A rectangular Gaussian matrix: no near-zero singular values.
    g = torch.randn(128, 320, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(newton_schulz(g, steps=5, compute_dtype=torch.bfloat16).float())
    assert 0.66 <= float(s.min()) and float(s.max()) <= 1.15, (float(s.min()), float(s.max()))


def test_lr_schedule_is_constant_then_linear_warmdown_to_zero():
    n = 100
    assert [lr_multiplier(s, n) for s in (0, 50, 80)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(90, n) == pytest.approx(0.5)
    assert lr_multiplier(100, n) == 0.0
    assert lr_multiplier(101, n) == 0.0  # past the horizon: no negative rate
    assert [lr_multiplier(s, 2) for s in range(4)] == [1.0, 1.0, 1.0, 0.0]  # too short for a warmdown step


def test_warmdown_over_the_whole_run_decays_linearly_from_the_first_step():
    # nanochat's SFT schedule: lrm = 1 - step / num_iterations
    assert [lr_multiplier(s, 10, warmdown_ratio=1.0) for s in (0, 1, 5, 10)] == [1.0, 0.9, 0.5, 0.0]


def test_learning_rates_scale_the_adamw_rates_with_model_width():
    assert learning_rates(768) == LEARNING_RATES == {"matrix": 0.02, "embedding": 0.2, "lm_head": 0.004}
    assert learning_rates(192) == {"matrix": 0.02, "embedding": 0.4, "lm_head": 0.008}


def test_param_kind_sends_wte_and_lm_head_to_adamw_and_block_matrices_to_muon():
    names = ("transformer.wte.weight", "lm_head.weight", "transformer.h.0.mlp.c_fc.weight")
    assert [param_kind(n, torch.zeros(4, 4)) for n in names] == ["embedding", "lm_head", "matrix"]


def test_muon_momentum_warms_from_085_to_095_over_300_steps():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)


def _tiny_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"transformer.wte.weight": (32, 16), "transformer.h.0.attn.c_q.weight": (16, 16),
              "transformer.h.0.mlp.c_fc.weight": (64, 16), "transformer.h.0.mlp.c_proj.weight": (16, 64),
              "lm_head.weight": (32, 16)}
    return {n: torch.nn.Parameter(torch.randn(s, generator=g)) for n, s in shapes.items()}


def _clipped_step(opt, step: int, num_iterations: int) -> float:
    """The trainer's order: the global gradient norm, then the step at the schedule with the gradient clipped to 1;
    returns the norm."""
    norm = global_grad_norm(opt)
    opt.set_schedule(step, lr_multiplier(step, num_iterations), muon_momentum(step),
                     grad_scale=clip_coefficient(norm, 1.0))
    opt.step()
    return float(norm)


def test_a_step_without_a_schedule_creates_the_state_and_moves_nothing():
    params = _tiny_model()
    opt = HybridOptimizer(params.items(), n_embd=16)
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()  # as DeepSpeed's wrappers call it at construction
    assert all(torch.equal(params[n].detach(), w) for n, w in before.items())
    assert set(opt.state[opt.param_groups[0]["params"][0]]) == {"momentum_buffer", "exp_avg", "exp_avg_sq"}
    _clipped_step(opt, 0, 10)
    assert not any(torch.equal(params[n].detach(), w) for n, w in before.items())


def test_single_process_step_matches_torch_adamw_and_reference_muon():
    params = _tiny_model()
    ref = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    opt = HybridOptimizer(params.items(), n_embd=16, ns_dtype=torch.float32)
    scale = (16 / 768) ** -0.5
    adam = torch.optim.AdamW([{"params": [ref["transformer.wte.weight"]], "lr": 0.2 * scale},
                              {"params": [ref["lm_head.weight"]], "lr": 0.004 * scale}],
                             betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    bufs = {n: torch.zeros_like(p) for n, p in ref.items()}
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        grads = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
        for n in params:
            params[n].grad, ref[n].grad = grads[n].clone(), grads[n].clone()
        got_norm = _clipped_step(opt, step, 10)
        norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), 1.0)
        assert got_norm == pytest.approx(float(norm), rel=1e-6)
        adam.step()
        m = muon_momentum(step)
        with torch.no_grad():
            for n, p in ref.items():
                if n.endswith(("wte.weight", "lm_head.weight")):
                    continue
                bufs[n].lerp_(p.grad, 1 - m)
                u = p.grad.lerp(bufs[n], m)
                p.add_(newton_schulz(u, 5, torch.float32) * max(1, p.size(0) / p.size(1)) ** 0.5, alpha=-0.02)
    for n in params:
        torch.testing.assert_close(params[n].detach(), ref[n].detach(), rtol=0, atol=1e-6)
    assert optimizer_stats(opt)["bytes_sent"] == 0


def test_state_dict_roundtrip_resumes_exactly():
    def run(params, opt, first, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for step in range(first, first + steps):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g)
            _clipped_step(opt, step, 6)

    a = _tiny_model()
    opt_a = HybridOptimizer(a.items(), n_embd=16)
    run(a, opt_a, 0, 3, seed=5)
    saved_params = {n: p.detach().clone() for n, p in a.items()}
    saved = copy.deepcopy(opt_a.state_dict())  # state_dict() shares the live tensors
    run(a, opt_a, 3, 3, seed=6)
    b = {n: torch.nn.Parameter(t.clone()) for n, t in saved_params.items()}
    opt_b = HybridOptimizer(b.items(), n_embd=16)
    opt_b.load_state_dict(saved)
    run(b, opt_b, 3, 3, seed=6)
    for n in a:
        assert torch.equal(a[n].detach(), b[n].detach()), n


def test_vector_parameter_is_rejected_with_clear_error():
    with pytest.raises(ValueError, match="has no optimizer"):
        HybridOptimizer([("transformer.h.0.norm.bias", torch.nn.Parameter(torch.zeros(4)))], n_embd=16)


def test_a_non_finite_gradient_skips_the_step_without_touching_weights_or_state():
    torch.manual_seed(0)
    named = [("transformer.h.0.mlp.c_fc.weight", torch.nn.Parameter(torch.randn(8, 4))),
             ("transformer.wte.weight", torch.nn.Parameter(torch.randn(16, 4)))]
    opt = HybridOptimizer(named, n_embd=4)
    for _, p in named:
        p.grad = torch.randn_like(p)
    _clipped_step(opt, 0, 10)  # one good step: momentum and moments are non-zero now
    weights = [p.detach().clone() for _, p in named]
    state = {k: v.clone() for k, v in opt.state[opt.param_groups[0]["params"][0]].items()}
    for bad in (float("nan"), float("inf")):
        for _, p in named:
            p.grad = torch.randn_like(p)
        named[1][1].grad[3, 1] = bad
        assert not torch.isfinite(torch.tensor(_clipped_step(opt, 1, 10)))
        assert optimizer_stats(opt)["skipped"]
        assert all(torch.equal(p, w) for (_, p), w in zip(named, weights))
        assert all(torch.equal(v, state[k]) for k, v in opt.state[opt.param_groups[0]["params"][0]].items())
    for _, p in named:
        p.grad = torch.randn_like(p)
    _clipped_step(opt, 1, 10)
    assert not optimizer_stats(opt)["skipped"] and not torch.equal(named[0][1], weights[0])
