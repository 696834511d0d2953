"""The model's pipeline stages inside DeepSpeed's real PipelineModule over pp = 2 gloo processes: the stage split,
the parameter names, only the stage's own layers materialized, and the two stages chained by hand (hidden state sent from
stage 0 to stage 1) giving the single-process loss. Training through the pipeline engine is the trainer's test."""
import pytest
import torch
import torch.distributed as dist
from _dist import run_gloo

from megachat.model import GPTConfig, build_model, full_state_dict
from megachat.parallel import init_grid, without_deepspeed_shm_allreduce
from megachat.pipeline import pipeline_module, stage_bounds

CONFIG = dict(sequence_len=16, vocab_size=251, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)
pytestmark = pytest.mark.timeout(180)


def build(grid, seed=3):
    model = build_model(GPTConfig(**CONFIG), grid, "cpu", seed=seed)  # with pp > 1: this stage's layers only
    # Every matrix random (init zeroes lm_head and c_proj, which would make the loss trivial); one generator per
    # parameter, so a stage draws the same values as the single-process model.
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            if not p.is_meta:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(seed * 1000 + i))
    return model


def batch():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, CONFIG["vocab_size"], (2, CONFIG["sequence_len"]), generator=g)
    targets = torch.randint(0, CONFIG["vocab_size"], (2, CONFIG["sequence_len"]), generator=g)
    targets[0, :4] = -1
    return idx, targets


def worker(rank):
    import deepspeed
    without_deepspeed_shm_allreduce()
    deepspeed.init_distributed("gloo", verbose=False)  # adopts run_gloo's process group
    grid = init_grid(tp=1, pp=2)
    model = build(grid)
    pipe = pipeline_module(model, grid)  # checks DeepSpeed's split against stage_bounds
    assert pipe.parts == stage_bounds(CONFIG["n_layer"], 2) == [0, 3, 6]
    nanochat_name = {id(p): n for n, p in model.named_parameters()}
    names = {name: nanochat_name[id(p)] for name, p in pipe.named_parameters()}  # the model's own tensors
    idx, targets = batch()
    if grid.pp_rank == 0:
        hidden = pipe(idx)
        dist.send(hidden.detach().contiguous(), dst=1)
        loss = None
    else:
        hidden = torch.empty(2, CONFIG["sequence_len"], CONFIG["n_embd"])
        dist.recv(hidden, src=0)
        loss = pipe.loss_fn(pipe(hidden), targets).detach()
    dist.barrier()
    return dict(names=names, meta=sorted(n for n, p in model.named_parameters() if p.is_meta), loss=loss,
                state=full_state_dict(model))


@pytest.fixture(scope="module")
def pp2():
    return run_gloo(worker, 2)


@pytest.fixture(scope="module")
def single():
    from megachat.parallel import Grid
    return build(Grid())


def test_pp2_stages_split_the_blocks_and_name_every_parameter_once(pp2, single):
    stage0, stage1 = (set(r["names"].values()) for r in pp2)
    assert "transformer.wte.weight" in stage0 and "lm_head.weight" in stage1
    assert {n for n in stage0 if ".h." in n} == {n for n in stage0 if ".h.0." in n or ".h.1." in n}
    assert not stage0 & stage1 and stage0 | stage1 == {n for n, _ in single.named_parameters()}


def test_pp2_other_stages_layers_stay_on_meta(pp2):
    for r, other in ((0, 1), (1, 0)):
        assert set(pp2[r]["meta"]) == set(pp2[other]["names"].values())


def test_pp2_stage_state_dicts_hold_the_single_process_weights(pp2, single):
    full = full_state_dict(single)
    for r in range(2):
        assert set(pp2[r]["state"]) == set(pp2[r]["names"].values())
        for name, w in pp2[r]["state"].items():
            assert torch.equal(w, full[name]), name


def test_pp2_stages_chained_give_the_single_process_loss(pp2, single):
    with torch.no_grad():
        expected = single(*batch())
    assert torch.allclose(pp2[1]["loss"], expected, rtol=1e-6, atol=0)
