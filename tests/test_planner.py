"""The planner (megachat/planner.py) against measurement on CPU, and its choices.

Measured, on real gloo ranks (tests/_dist.run_gloo), for a depth-4 model (vocabulary 1,024, sequence 64, micro-batch
2, two micro-batches per step):
- activations: the bytes autograd saves in one micro-batch's forward (torch.autograd.graph.saved_tensors_hooks,
  each storage once, parameters and buffers left out), through the kernels' GPU path (the Triton kernels in
  Triton's interpreter, MEGACHAT_TRITON=1): per layer kind at tp 1 and 2, fp32 and bf16 (the LM head with and
  without the loss fused in, a block under full and selective recomputation; at tp 2 in bf16 also under sequence
  parallelism), and per pipeline stage at pp 2;
- model states: after a first optimizer step under build_trainer (DeepSpeed's real optimizers), the most each
  rank holds of weights, gradients, optimizer state (fp32 master + Muon momentum + AdamW moments) and DeepSpeed's
  gradient buckets during the second step (megachat.measure.measure_model_states, the same measure as
  tests/test_zero_memory.py and scripts/bench_memory.py): fp32 ZeRO-1 in one
  process, at tp 2 and at dp 2, fp32 ZeRO-3 at dp 2 (depth 4's block matrices are below DeepSpeed's
  stage3_param_persistence_threshold, so they stay whole beside their partitions: both paths of the model run);
  bf16 ZeRO-1 (BF16_Optimizer), ZeRO-2 and pp 2.
Each planned number must be within 10 % of the measured one (they agree to the byte today).

`python tests/test_planner.py` prints the measured-vs-planned table that docs/scaling.md shows.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist import run_gloo  # noqa: E402

DEPTH, VOCAB, SEQ, MICRO = 4, 1024, 64, 2
# (tp, pp, zero, dtype) trained per launch, by world size
STATE_LAYOUTS = {1: [(1, 1, 1, "fp32")],
                 2: [(2, 1, 1, "fp32"), (1, 1, 1, "fp32"), (1, 1, 3, "fp32"), (1, 1, 1, "bf16"), (1, 1, 2, "bf16"),
                     (1, 2, 1, "bf16")]}
# (tp, pp, dtype, sequence parallel) whose saved activations are counted per launch
ACTIVATION_LAYOUTS = {1: [(1, 1, "fp32", False), (1, 1, "bf16", False)],
                      2: [(2, 1, "fp32", False), (2, 1, "bf16", False), (2, 1, "bf16", True), (1, 2, "fp32", False)]}
TOLERANCE = 0.10


def _batch(torch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (MICRO, SEQ), generator=g), torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)


def _activations(torch, tp, pp, dtype, sp):
    """[(label, quantity, measured, planned)] of one layout's saved activations on this rank: per layer kind (the
    head unfused and, where megachat has it, fused with the loss; a block under each activation checkpointing
    mode megachat has), or per pipeline stage as the pipeline trains it."""
    from megachat.measure import model_storages, saved_tensor_bytes
    from megachat.model import GPTConfig, build_model
    from megachat.parallel import Grid, init_grid
    from megachat.planner import Job, Layout, activation_bytes, stage_activation_bytes, stage_bounds
    grid = init_grid(tp, pp) if tp * pp > 1 else Grid()
    config = GPTConfig.from_depth(DEPTH, VOCAB, SEQ)
    model = build_model(config, grid, dtype=torch.bfloat16 if dtype == "bf16" else None)
    model.set_sequence_parallel(sp)
    x, y = _batch(torch)
    w = torch.ones(MICRO, SEQ)
    exclude = model_storages(model)
    label = f"tp{tp} pp{pp} {dtype}" + (" sp" if sp else "")
    fused = hasattr(model, "head_loss")  # megachat's LM head fused with the loss (GPT.head_loss)
    if pp == 1:
        planned = activation_bytes(config, tp, MICRO, dtype, fused_head_loss=False, sequence_parallel=sp)
        layers, rows, h = model.layers(), [], x
        for layer, kind in ((layers[0], "embedding"), (layers[1], "block")):
            with saved_tensor_bytes(exclude) as got:
                h = layer(h)
            rows.append((label, f"activations: {kind}", got["bytes"], planned[kind]))
        for mode in ("selective", "full") if hasattr(model, "set_activation_checkpointing") else ():
            model.set_activation_checkpointing(mode)
            with saved_tensor_bytes(exclude) as got:
                layers[2](h)
            model.set_activation_checkpointing("none")
            rows.append((label, f"activations: block, {mode} recompute", got["bytes"],
                         activation_bytes(config, tp, MICRO, dtype, checkpointing=mode,
                                          sequence_parallel=sp)["block"]))
        for layer in layers[2:-1]:
            h = layer(h)
        with saved_tensor_bytes(exclude) as got:
            model.loss(layers[-1](h), (y, w))
        rows.append((label, "activations: head", got["bytes"], planned["head"]))
        if fused:
            with saved_tensor_bytes(exclude) as got:
                model.head_loss(model.layers(fused_loss=True)[-1](h), (y, w))
            rows.append((label, "activations: head fused with the loss", got["bytes"],
                         activation_bytes(config, tp, MICRO, dtype, fused_head_loss=True,
                                          sequence_parallel=sp)["head"]))
        return rows
    # one pipeline stage, as the pipeline trains it: ids into the first, a received hidden state (requires grad, as
    # DeepSpeed's) into the others
    lo, hi = stage_bounds(config.n_layer, pp)[grid.pp_rank:grid.pp_rank + 2]
    layers = (model.layers(fused_loss=True) if fused else model.layers())[lo:hi]
    h = x if grid.pp_rank == 0 else torch.randn(MICRO, SEQ, config.n_embd, requires_grad=True)
    with saved_tensor_bytes(exclude) as got:
        for layer in layers:
            h = layer(h)
        if grid.pp_rank == pp - 1:
            (model.head_loss if fused else model.loss)(h, (y, w))
    job = Job(config, total_batch_size=MICRO * SEQ * 2, dtype=dtype, fused_head_loss=fused)
    planned = stage_activation_bytes(job, Layout(tp=tp, pp=pp, dp=1, zero=1, micro_batch=MICRO), grid.pp_rank)
    return [(f"{label} stage {grid.pp_rank}", "activations: stage", got["bytes"], planned)]


def _model_states(torch, tp, pp, zero, dtype):
    """[(label, quantity, measured, planned)] of one layout's model states on this rank."""
    import torch.distributed as dist

    from megachat.build import build_trainer
    from megachat.measure import measure_model_states
    from megachat.planner import Job, job_zero_settings, model_state_bytes, stage_layers
    from megachat.train_config import TrainConfig
    dp = dist.get_world_size() // (tp * pp)
    cfg = TrainConfig(depth=DEPTH, vocab_size=VOCAB, seq_len=SEQ, device_batch_size=MICRO,
                      total_batch_size=MICRO * SEQ * dp * 2, num_iterations=4, tp=tp, pp=pp, zero=zero, dtype=dtype)
    trainer = build_trainer(cfg)
    batches = [_batch(torch, seed) for seed in range(2)]
    trainer.train_step(batches)  # the optimizer's state exists after its first step
    got = measure_model_states(trainer, batches)
    layers = stage_layers(cfg.model_config(), tp, pp, trainer.grid.pp_rank)
    settings = job_zero_settings(Job(cfg.model_config(), cfg.total_batch_size, dtype), zero)
    planned = model_state_bytes(layers, dp, zero, dtype, settings, dp_rank=trainer.grid.dp_rank,
                                micro_batches=len(batches))
    label = f"tp{tp} pp{pp} dp{dp} ZeRO-{zero} {dtype}" + (f" stage {trainer.grid.pp_rank}" if pp > 1 else "")
    return [(label, k, got[k], planned[k]) for k in ("weights", "grads", "optimizer", "buffers")]


def _worker(rank, activation_layouts, state_layouts):
    import torch
    rows = []
    os.environ["MEGACHAT_TRITON"] = "1"  # the Triton kernels (interpreted): what the GPU path saves
    for layout in activation_layouts:
        rows += _activations(torch, *layout)
    os.environ["MEGACHAT_TRITON"] = "0"  # the optimizer's Newton-Schulz: the torch reference, fast on a CPU
    for layout in state_layouts:
        rows += _model_states(torch, *layout)
    return rows


def measured_vs_planned() -> list[tuple]:
    """Every rank's (label, quantity, measured, planned) of the launches above (de-duplicated)."""
    os.environ["TRITON_INTERPRET"] = "1"  # before any spawned rank imports triton
    rows = []
    for world in (1, 2):
        for rank_rows in run_gloo(_worker, world, ACTIVATION_LAYOUTS[world], STATE_LAYOUTS[world], timeout_s=240):
            rows += [r for r in rank_rows if r not in rows]
    return rows


@pytest.fixture(scope="module")
def rows():
    saved = os.environ.get("TRITON_INTERPRET")
    try:
        return measured_vs_planned()
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def test_planned_activation_and_model_state_bytes_are_within_10_percent_of_measured(rows):
    assert len(rows) >= 40
    off = [(label, q, got, want) for label, q, got, want in rows
           if abs(want - got) > TOLERANCE * max(got, 1) and not (q == "buffers" and got == want == 0)]
    assert not off, "planned vs measured beyond 10 %: " + "; ".join(f"{lab} {q}: measured {got:,} planned {want:,.0f}"
                                                                  for lab, q, got, want in off)


def test_every_layout_the_planner_ranks_is_one_the_trainer_accepts():
    from megachat.model import GPTConfig
    from megachat.planner import Hardware, Job, plan
    from megachat.train_config import TrainConfig, check_config
    job = Job(GPTConfig.from_depth(20, 65536, 2048), total_batch_size=524288)
    result = plan(job, nodes=1)
    assert result.fits and result.rejected
    for pred in result.fits + result.too_big:
        lay = pred.layout
        checkpointing = {"activation_checkpointing": lay.checkpointing} if lay.checkpointing != "none" else {}
        check_config(TrainConfig(depth=20, vocab_size=65536, seq_len=2048, device_batch_size=lay.micro_batch,
                                 total_batch_size=524288, num_iterations=1, tp=lay.tp, pp=lay.pp, zero=lay.zero,
                                 **checkpointing), lay.world)
        assert pred.memory.total <= Hardware().memory or pred in result.too_big
    reasons = " | ".join(r.reason for r in result.rejected)
    for words in ("--dtype bf16 needs --zero >= 1", "cannot be combined with pipeline parallelism",
                  "does not divide n_head = 10"):
        assert words in reasons
    times = [p.time.total for p in result.fits]
    assert all(later > 0.99 * earlier for earlier, later in zip(times, times[1:]))  # ranked by time, 1 % ties


def test_the_bubble_follows_p_minus_1_over_m_plus_p_minus_1_and_fusing_the_head_saves_the_logits():
    from megachat.model import GPTConfig
    from megachat.planner import Hardware, Job, Layout, activation_bytes, predict
    job = Job(GPTConfig.from_depth(32, 65536, 2048), total_batch_size=524288)
    pred = predict(job, Layout(tp=2, pp=4, dp=4, zero=1, micro_batch=4), Hardware(gpus_per_node=8))
    t = pred.time
    m, p = pred.micro_batches, 4
    assert t.bubble / (t.compute + t.tp_comm + t.pp_comm + t.bubble) == pytest.approx((p - 1) / (m + p - 1))
    c = job.config
    plain, fused = activation_bytes(c, 1, 8, fused_head_loss=False), activation_bytes(c, 1, 8, fused_head_loss=True)
    # the bf16 logits of 16,384 tokens and their targets, log-sum-exp and weights, against the fp32 d W that the
    # fused head forms in forward and holds until backward
    assert plain["head"] - fused["head"] == 8 * 2048 * (65536 * 2 + 16) - 4 * 65536 * c.n_embd
    assert plain["block"] == fused["block"]


def test_zero3_states_shrink_with_dp_and_its_gathered_parameters_follow_the_deepspeed_json(tmp_path):
    import json

    from megachat.build import CONFIG_DIR
    from megachat.model import GPTConfig
    from megachat.planner import Hardware, Job, Layout, predict
    # unfused head: the backward's transients (the logits' gradient, the gathered parameters) are the workspace's peak
    job = Job(GPTConfig.from_depth(20, 65536, 2048), total_batch_size=524288, fused_head_loss=False)
    layout = Layout(tp=1, pp=1, dp=8, zero=3, micro_batch=16)
    z1 = predict(job, Layout(tp=1, pp=1, dp=8, zero=1, micro_batch=16), Hardware()).memory
    z3 = predict(job, layout, Hardware()).memory
    assert z3.weights + z3.grads + z3.optimizer < (z1.weights + z1.grads + z1.optimizer) / 3
    # megachat sizes ZeRO-3's gathering from the model (build.zero_buckets: at most two layers live, one being
    # fetched); DeepSpeed's defaults (1e9 live parameters, reuse distance 1e9) keep all of d20 gathered, in bf16
    from megachat.planner import layer_params
    conf = json.loads((CONFIG_DIR / "zero3_bf16.json").read_text())
    conf["zero_optimization"].update(stage3_max_live_parameters=10**9, stage3_max_reuse_distance=10**9)
    (tmp_path / "z3.json").write_text(json.dumps(conf))
    defaults = predict(job, layout, Hardware(), ds_config=str(tmp_path / "z3.json")).memory
    sizes = [sum(layer.numels) for layer in layer_params(job.config, 1)]
    assert defaults.workspace - z3.workspace == 2 * (sum(sizes) - 3 * max(sizes))


def main():
    rows = measured_vs_planned()
    print("| layout | quantity | measured (bytes) | planned (bytes) | planned / measured |")
    print("| --- | --- | ---: | ---: | ---: |")
    for label, quantity, got, want in rows:
        ratio = f"{want / got:.3f}" if got else ("-" if not want else "inf")
        print(f"| {label} | {quantity} | {got:,} | {want:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
