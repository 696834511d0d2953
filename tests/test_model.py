"""megachat.model in one process: conformance with nanochat's golden vectors, init, meta construction, pipeline
stages, sizing and the errors on layouts tp cannot split."""
import math
from pathlib import Path

import pytest
import torch

from megachat import kernels
from megachat.model import (GPT, Block, GPTConfig, build_model, full_state_dict, load_nanochat_state_dict,
                            nanochat_shapes, rotary_tables)
from megachat.parallel import Grid

GOLDEN = Path(__file__).parent / "fixtures" / "nanochat_v0_tiny.pt"


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope="module")
def golden_run(golden):
    """The golden weights loaded into a tp = 1 model built on the meta device: (model, logits, loss)."""
    model = build_model(GPTConfig(**golden["config"]), weights=golden["state_dict"])
    with torch.no_grad():
        logits = model(golden["idx"])
    loss = model(golden["idx"], golden["targets"])
    loss.backward()
    return model, logits, loss


def small_config(**kw):
    return GPTConfig(**{**dict(sequence_len=16, vocab_size=251, n_layer=2, n_head=4, n_kv_head=2, n_embd=64), **kw})


def init_model(config, seed, grid=None):
    return build_model(config, grid, seed=seed)


def test_tp1_logits_match_nanochat(golden, golden_run):
    assert rel_err(golden_run[1], golden["logits"]) < 1e-4


def test_tp1_loss_matches_nanochat(golden, golden_run):
    assert abs(golden_run[2].item() - golden["loss"].item()) / golden["loss"].item() < 1e-4


def test_tp1_gradients_match_nanochat(golden, golden_run):
    model = golden_run[0]
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert set(grads) == set(golden["grads"])
    for name, g in golden["grads"].items():
        assert rel_err(grads[name], g) < 1e-4, name


def test_full_state_dict_returns_the_loaded_nanochat_weights(golden, golden_run):
    sd = full_state_dict(golden_run[0])
    assert list(sd) == list(golden["state_dict"])
    for name, w in golden["state_dict"].items():
        assert torch.equal(sd[name], w), name


def test_load_rejects_a_state_dict_of_another_shape(golden):
    model = init_model(small_config(vocab_size=256, n_head=2, n_kv_head=1), seed=0)
    sd = dict(golden["state_dict"])
    sd["lm_head.weight"] = sd["lm_head.weight"][:100]
    with pytest.raises(ValueError, match="lm_head.weight has shape"):
        load_nanochat_state_dict(model, sd)
    del sd["lm_head.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_nanochat_state_dict(model, sd)


def test_meta_construction_materializes_with_tp_attributes_and_rotary_tables():
    config = small_config()
    with torch.device("meta"):
        model = GPT(config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights(0)
    assert all(not p.is_meta and torch.isfinite(p).all() for p in model.parameters())
    # to_empty builds new Parameter objects; the tp attributes must survive it.
    for name, p in model.named_parameters():
        assert p.tensor_model_parallel is True, name
        assert p.partition_dim == (1 if name.endswith("c_proj.weight") else 0), name
    cos, sin = rotary_tables(10 * config.sequence_len, config.head_dim)
    for block in model.transformer.h:
        assert block.attn.cos.dtype == torch.bfloat16
        assert torch.equal(block.attn.cos, cos) and torch.equal(block.attn.sin, sin)


def test_init_weights_before_to_empty_raises():
    with torch.device("meta"):
        model = GPT(small_config())
    with pytest.raises(ValueError, match="to_empty"):
        model.init_weights(0)


def test_init_follows_nanochat_scheme():
    config = small_config(n_embd=128, n_head=2, n_kv_head=1, vocab_size=4096)
    model = init_model(config, seed=1)
    sd = dict(model.named_parameters())
    assert sd["lm_head.weight"].abs().max() == 0
    for i in range(config.n_layer):
        assert sd[f"transformer.h.{i}.attn.c_proj.weight"].abs().max() == 0
        assert sd[f"transformer.h.{i}.mlp.c_proj.weight"].abs().max() == 0
    assert abs(sd["transformer.wte.weight"].std().item() - 1.0) < 0.02
    C = config.n_embd
    assert abs(sd["transformer.h.0.attn.c_q.weight"].std().item() - 1 / math.sqrt(C)) < 0.05 / math.sqrt(C)
    # fan_out 64 < fan_in 128: std = 1/sqrt(128) * sqrt(64/128)
    assert abs(sd["transformer.h.0.attn.c_k.weight"].std().item() - 0.5 / 8) < 0.05 * 0.5 / 8
    assert abs(sd["transformer.h.0.mlp.c_fc.weight"].std().item() - 1 / math.sqrt(C)) < 0.02 / math.sqrt(C)


def test_init_is_a_function_of_the_seed():
    a, b, c = (full_state_dict(init_model(small_config(), seed)) for seed in (3, 3, 4))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["transformer.h.0.attn.c_q.weight"], c["transformer.h.0.attn.c_q.weight"])


@pytest.mark.parametrize("n_kv_head", [2, 1], ids=["kv_split", "kv_replicated"])
def test_tp2_init_shards_concatenate_to_tp1_init(n_kv_head):
    config = small_config(n_kv_head=n_kv_head)  # vocab 251: padded to 252 at tp = 2
    full = full_state_dict(init_model(config, seed=7))
    ranks = [dict(init_model(config, 7, Grid(tp=2, rank=r)).named_parameters()) for r in range(2)]
    for name, shape in nanochat_shapes(config).items():
        p0, p1 = ranks[0][name], ranks[1][name]
        if p0.tensor_model_parallel:
            joined = torch.cat([p0, p1], dim=p0.partition_dim).narrow(p0.partition_dim, 0, shape[p0.partition_dim])
        else:  # KV heads replicated on both ranks
            assert torch.equal(p0, p1), name
            joined = p0
        assert torch.equal(joined, full[name]), name


def test_pipeline_layers_chained_equal_forward(golden):
    model = init_model(GPTConfig(**golden["config"]), seed=0)
    load_nanochat_state_dict(model, golden["state_dict"])
    layers = model.layers()
    assert len(layers) == model.config.n_layer + 2 and all(isinstance(b, Block) for b in layers[1:-1])
    x = golden["idx"]
    for layer in layers:
        x = layer(x)
    with torch.no_grad():
        assert torch.equal(kernels.softcap(x), model(golden["idx"]))
    assert torch.equal(model.loss(x, golden["targets"]), model(golden["idx"], golden["targets"]))


def test_layers_hold_every_parameter_once():
    model = init_model(small_config(), seed=0)
    held = [p for layer in model.layers() for p in layer.parameters()]
    assert len(held) == len({id(p) for p in held}) == len(list(model.parameters()))
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}


def test_loss_reduction_none_gives_per_token_losses_and_zero_at_ignored(golden, golden_run):
    model = golden_run[0]
    with torch.no_grad():
        per_token = model(golden["idx"], golden["targets"], loss_reduction="none")
    assert per_token.shape == golden["targets"].shape and per_token.dtype == torch.float32
    assert (per_token[0, :3] == 0).all()
    mask = golden["targets"] != -1
    assert rel_err(per_token[mask].mean(), golden["loss"]) < 1e-5


def test_batch_with_every_target_ignored_gives_zero_loss():
    model = init_model(small_config(), seed=0)
    idx = torch.zeros(1, 4, dtype=torch.long)
    assert model(idx, torch.full((1, 4), -1)).item() == 0.0


def test_from_depth_sizes_d20_like_nanochat():
    config = GPTConfig.from_depth(20, vocab_size=65536, sequence_len=2048)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head, config.head_dim) == (20, 1280, 10, 10, 128)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params() == sum(p.numel() for p in model.parameters()) == 560_988_160  # "~561M"
    assert model.estimate_flops() == 6 * (560_988_160 - 65536 * 1280) + 12 * 20 * 10 * 128 * 2048


def test_config_rejects_head_dim_that_does_not_divide():
    with pytest.raises(ValueError, match="n_embd = 320 is not divisible by n_head = 3"):
        GPTConfig.from_depth(5, vocab_size=256, sequence_len=64)


@pytest.mark.parametrize("kw, tp, match", [
    (dict(n_head=2, n_kv_head=2), 3, "does not divide n_head"),
    (dict(n_head=6, n_kv_head=3, n_embd=96), 2, "n_kv_head = 3 do not fit"),
    (dict(vocab_size=3), 4, "too small for tp"),
])
def test_layouts_tp_cannot_split_raise(kw, tp, match):
    with torch.device("meta"), pytest.raises(ValueError, match=match):
        GPT(small_config(**kw), Grid(tp=tp))


def saved_bytes(model, idx, targets):
    """Bytes of the distinct tensors autograd saves for backward during one forward, and the gradients."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return sum(seen.values()), loss.detach(), grads


def test_activation_checkpointing_keeps_the_gradients_and_saves_less():
    config = small_config(n_layer=3)
    model = build_model(config, seed=0)
    with torch.no_grad():  # the init zeroes lm_head and c_proj: every gradient but theirs would be 0
        for p in model.parameters():
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (2, config.sequence_len), generator=g)
    results = {}
    for mode in ("none", "selective", "full"):
        model.set_activation_checkpointing(mode)
        results[mode] = saved_bytes(model, idx, idx.roll(-1, 1))
    none, selective, full = results["none"], results["selective"], results["full"]
    for other in (selective, full):
        assert torch.equal(other[1], none[1])
        for name, grad in none[2].items():
            assert rel_err(other[2][name], grad) <= 1e-6, name
    assert full[0] < selective[0] < none[0], (full[0], selective[0], none[0])
    with pytest.raises(ValueError, match="use none, full or selective"):
        model.set_activation_checkpointing("some")
