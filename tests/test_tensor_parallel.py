"""Tensor parallelism over 2 real gloo processes versus one process: the golden nanochat vectors with the weights
split over tp = 2 (its single KV head replicated), a model with split KV heads and a padded vocab, init, the
pipeline stages, and the vocab-parallel cross-entropy on its own. One spawn computes everything (start-up
dominates on 2 cores); each test checks one behaviour."""
from pathlib import Path

import pytest
import torch
from _dist import run_gloo, vocab_split_softcap_ce

from megachat import kernels
from megachat.model import GPTConfig, build_model, full_state_dict, nanochat_shapes
from megachat.parallel import Grid, init_grid
from megachat.tensor_parallel import gather_tensor, tp_group_of, vocab_parallel_loss

GOLDEN = Path(__file__).parent / "fixtures" / "nanochat_v0_tiny.pt"
# Split KV heads (2 over 2 ranks) and a vocab of 251, padded to 252 at tp = 2.
SMALL = dict(sequence_len=16, vocab_size=251, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
pytestmark = pytest.mark.timeout(180)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def random_state_dict(config, seed):
    """Full nanochat-named weights with every matrix random (the spec's init zeroes lm_head and c_proj)."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) / (1.0 if "wte" in name else shape[1] ** 0.5)
            for name, shape in nanochat_shapes(config).items()}


def small_batch(config, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size, (2, config.sequence_len), generator=g)
    targets = torch.randint(0, config.vocab_size, (2, config.sequence_len), generator=g)
    targets[1, :5] = -1
    targets[0, -1] = config.vocab_size - 1  # a target in the last shard, next to the padding row
    return idx, targets


def build(config, grid, state_dict=None, seed=0):
    return build_model(config, grid, "cpu", weights=state_dict, seed=seed)


def run_model(model, idx, targets):
    """Gathered softcapped logits, loss, per-token loss and gathered grads (nanochat names) of one model."""
    shapes, group = nanochat_shapes(model.config), tp_group_of(model.grid)
    with torch.no_grad():
        logits = model.gather_logits(model(idx))
        per_token = model(idx, targets, loss_reduction="none")
    loss = model(idx, targets)
    loss.backward()
    grads = {n: gather_tensor(p.grad, p, shapes[n], group) for n, p in model.named_parameters()}
    return dict(logits=logits, loss=loss.detach(), per_token=per_token, grads=grads)


def ce_inputs():
    """Raw logits [11, 64] (two shards of 32 ids at tp = 2), targets with an ignored one and the first and last id
    of both shards, per-token loss weights."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 64, generator=g) * 20
    targets = torch.randint(0, 64, (11,), generator=g)
    targets[3] = -1
    targets[5], targets[6], targets[7], targets[8] = 0, 31, 32, 63
    return logits, targets, torch.rand(11, generator=g)


def worker(rank):
    grid = init_grid(tp=2)
    golden = torch.load(GOLDEN, weights_only=True)
    model = build(GPTConfig(**golden["config"]), grid, golden["state_dict"])
    results = dict(golden=run_model(model, golden["idx"], golden["targets"]))
    results["golden_state"] = full_state_dict(model)

    config = GPTConfig(**SMALL)
    idx, targets = small_batch(config, seed=1)
    model = build(config, grid, random_state_dict(config, seed=2))
    results["small"] = run_model(model, idx, targets)
    x = idx
    for layer in model.layers():
        x = layer(x)
    with torch.no_grad():
        results["pipeline_logits"] = model.gather_logits(kernels.softcap(x))
        results["pipeline_loss"] = model.loss(x, targets)
    model = build(config, grid, random_state_dict(config, seed=2))
    model.set_sequence_parallel(True)
    results["small_sp"] = run_model(model, idx, targets)  # logits and per-token losses: no autograd, no split
    try:  # 15 positions do not split over 2 ranks
        model(idx[:, :15], targets[:, :15])
    except ValueError as e:
        results["sp_error"] = str(e)
    for mode in ("full", "selective"):  # recomputation replays the sequence-parallel collectives in backward
        model = build(config, grid, random_state_dict(config, seed=2))
        model.set_sequence_parallel(True)
        model.set_activation_checkpointing(mode)
        results[f"small_sp_{mode}"] = run_model(model, idx, targets)
    results["init"] = full_state_dict(build(config, grid, seed=7))
    results["ce"] = vocab_split_softcap_ce(rank, *ce_inputs())
    return results


@pytest.fixture(scope="module")
def tp2():
    """Results of both tp = 2 ranks: [rank0, rank1]."""
    return run_gloo(worker, 2)


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope="module")
def small_tp1():
    config = GPTConfig(**SMALL)
    return run_model(build(config, Grid(), random_state_dict(config, seed=2)), *small_batch(config, seed=1))


def test_tp2_golden_logits_match_nanochat(tp2, golden):
    for r in range(2):
        assert rel_err(tp2[r]["golden"]["logits"], golden["logits"]) < 1e-4


def test_tp2_golden_loss_matches_nanochat_on_every_rank(tp2, golden):
    for r in range(2):
        assert abs(tp2[r]["golden"]["loss"].item() - golden["loss"].item()) / golden["loss"].item() < 1e-4


def test_tp2_golden_gradients_match_nanochat(tp2, golden):
    for r in range(2):  # the replicated KV weights must carry the full gradient on both ranks
        grads = tp2[r]["golden"]["grads"]
        assert set(grads) == set(golden["grads"])
        for name, g in golden["grads"].items():
            assert rel_err(grads[name], g) < 1e-4, (r, name)


def test_tp2_full_state_dict_gathers_the_loaded_nanochat_weights(tp2, golden):
    for name, w in golden["state_dict"].items():
        assert torch.equal(tp2[0]["golden_state"][name], w), name


def test_tp2_split_kv_heads_and_padded_vocab_match_single_process(tp2, small_tp1):
    for r in range(2):
        res = tp2[r]["small"]
        assert res["logits"].shape == small_tp1["logits"].shape
        assert rel_err(res["logits"], small_tp1["logits"]) < 1e-5
        assert rel_err(res["loss"], small_tp1["loss"]) < 1e-5
        for name, g in small_tp1["grads"].items():
            assert rel_err(res["grads"][name], g) < 1e-4, (r, name)


def test_tp2_per_token_losses_match_single_process(tp2, small_tp1):
    for r in range(2):
        assert rel_err(tp2[r]["small"]["per_token"], small_tp1["per_token"]) < 1e-5


@pytest.mark.parametrize("key", ["small_sp", "small_sp_full", "small_sp_selective"])
def test_tp2_sequence_parallel_loss_and_gradients_match_single_process(tp2, small_tp1, key):
    for rank in tp2:
        got = rank[key]
        assert rel_err(got["loss"], small_tp1["loss"]) < 1e-5
        assert rel_err(got["logits"], small_tp1["logits"]) < 1e-5  # evaluation (no autograd) runs unsplit
        for name, grad in small_tp1["grads"].items():
            assert rel_err(got["grads"][name], grad) < 1e-5, name


def test_tp2_sequence_parallel_refuses_a_length_tp_does_not_divide(tp2):
    assert "does not divide them" in tp2[0]["sp_error"] and "--sequence-parallel" in tp2[0]["sp_error"]


def test_tp2_init_with_real_groups_equals_tp1_init(tp2):
    full = full_state_dict(build(GPTConfig(**SMALL), Grid(), seed=7))
    for name, w in full.items():
        assert torch.equal(tp2[0]["init"][name], w), name


def test_tp2_pipeline_layers_chained_equal_forward(tp2):
    for r in range(2):
        assert torch.equal(tp2[r]["pipeline_logits"], tp2[r]["small"]["logits"])
        assert torch.equal(tp2[r]["pipeline_loss"], tp2[r]["small"]["loss"])


def test_tp2_vocab_parallel_loss_matches_unsharded_loss_and_gradient(tp2):
    logits, targets, weights = ce_inputs()
    full = logits.clone().requires_grad_()
    want = vocab_parallel_loss(full, targets, 0, None, reduction="none")
    (want * weights).sum().backward()
    for r in range(2):
        torch.testing.assert_close(tp2[r]["ce"]["loss"], want.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(torch.cat([tp2[0]["ce"]["grad"], tp2[1]["ce"]["grad"]], 1), full.grad,
                               rtol=1e-5, atol=1e-7)
