"""megachat.optim under tp x pp x dp and DeepSpeed ZeRO equals the single-process Muon + AdamW oracle.

Each launch spawns real gloo ranks (OMP_NUM_THREADS=1, a free port, a wall-clock timeout) that run several
layouts through the real `deepspeed.initialize` (mpu = the grid) with HybridOptimizer as the client optimizer.
The model is a stand-in with nanochat's parameter names and Megatron tp attributes whose loss is
sum(w * R) + 0.05 * sum(w^2), R drawn per (parameter, step, dp rank) from a seed, so every rank knows the
full gradient mean_d(R) + 0.1 w and can run the oracle: plain torch on the unsharded matrices
(clip_grad_norm_, torch.optim.AdamW, Muon with the shared newton_schulz in fp32).
Tolerance, on |got - want| / max(1, |want|) over every weight element after 4 steps: fp32 layouts 2e-5 (the
summation order of the dp gradient average is the only difference; they measure ~4e-7); bf16 layouts 2e-2
(bf16 weights and gradients: one bf16 rounding of a weight is up to 4e-3 relative).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import zlib

import pytest

# name, full shape, partition_dim (0 = rows, 1 = cols, None = whole on every tp rank, as megachat.model's KV
# weights when tp > n_kv_head), pipeline stage (of 2)
SPECS = [
    ("transformer.wte.weight", (16, 12), 0, 0),
    ("transformer.h.0.attn.c_q.weight", (12, 12), 0, 0),
    ("transformer.h.0.attn.c_proj.weight", (12, 12), 1, 0),
    ("transformer.h.0.mlp.c_fc.weight", (48, 12), 0, 0),
    ("transformer.h.0.mlp.c_proj.weight", (12, 48), 1, 0),
    ("transformer.h.1.attn.c_k.weight", (6, 12), 0, 1),
    ("transformer.h.1.attn.c_v.weight", (6, 12), None, 1),
    ("transformer.h.1.mlp.c_fc.weight", (20, 12), 0, 1),
    ("transformer.h.1.mlp.c_proj.weight", (12, 20), 1, 1),
    ("lm_head.weight", (16, 12), 0, 1),
]
N_EMBD, STEPS, NUM_ITERATIONS = 12, 4, 4  # warmdown over the last 20% -> lr multiplier changes in step 4


def _opt_kwargs(torch):
    return dict(n_embd=N_EMBD, ns_dtype=torch.float32)


def _step(engine, step):
    """The trainer's optimizer step `step`, after the backward: the global gradient norm, the schedule (momentum warms
    up over 3 steps) with the gradient clipped to 1 onto the HybridOptimizer inside `engine`, DeepSpeed's step."""
    from megachat.optim import clip_coefficient, global_grad_norm, hybrid_optimizer, lr_multiplier, muon_momentum
    norm = global_grad_norm(engine)
    hybrid_optimizer(engine).set_schedule(step, lr_multiplier(step, NUM_ITERATIONS),
                                          muon_momentum(step, warmup_steps=3), grad_scale=clip_coefficient(norm, 1.0))
    engine.step()


def _shard(t, pdim, grid):
    """This tp rank's piece of the full tensor t (all of it for a tp-replicated weight)."""
    return t if pdim is None else t.chunk(grid.tp, dim=pdim)[grid.tp_rank]


def _full_init(torch):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(shape, generator=g) * 0.5 for n, shape, _, _ in SPECS}


def _noise(torch, name, step, dp_rank):
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}/{dp_rank}".encode()))
    shape = dict((n, s) for n, s, _, _ in SPECS)[name]
    scale = 1.0 if step % 2 == 0 else 0.01  # clipping active on even steps, inactive on odd ones
    return torch.randn(shape, generator=g) * scale


def oracle(torch, dp, steps: int) -> dict:
    """Single-process Muon + AdamW on the full model: the reference every layout must reproduce.
    dp: the data-parallel degree whose gradients are averaged (an int, or one per step)."""
    dps = [dp] * steps if isinstance(dp, int) else dp
    from megachat.kernels import newton_schulz
    from megachat.optim import lr_multiplier, muon_momentum
    w = {n: t.clone().requires_grad_(True) for n, t in _full_init(torch).items()}
    scale = (N_EMBD / 768) ** -0.5
    adam = torch.optim.AdamW([{"params": [w["transformer.wte.weight"]], "lr": 0.2 * scale, "base": 0.2 * scale},
                              {"params": [w["lm_head.weight"]], "lr": 0.004 * scale, "base": 0.004 * scale}],
                             betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    bufs = {n: torch.zeros_like(t) for n, t in w.items()}
    for step in range(steps):
        for n, t in w.items():
            t.grad = torch.stack([_noise(torch, n, step, d) for d in range(dps[step])]).mean(0) + 0.1 * t.detach()
        torch.nn.utils.clip_grad_norm_(list(w.values()), 1.0)
        lrm = lr_multiplier(step, NUM_ITERATIONS)
        for group in adam.param_groups:
            group["lr"] = group["base"] * lrm
        adam.step()
        m = muon_momentum(step, warmup_steps=3)
        with torch.no_grad():
            for n, t in w.items():
                if n in ("transformer.wte.weight", "lm_head.weight"):
                    continue
                g = t.grad.clone()
                bufs[n].lerp_(g, 1 - m)
                u = g.lerp_(bufs[n], m)
                t.add_(newton_schulz(u, 5, torch.float32) * max(1, t.size(0) / t.size(1)) ** 0.5,
                       alpha=-0.02 * lrm)
    return {n: t.detach() for n, t in w.items()}


def _stage_model(torch, grid, full=None):
    """This rank's stage of the stand-in model: tp shards with tensor_model_parallel / partition_dim."""
    nn = torch.nn
    full = _full_init(torch) if full is None else full

    class Leaf(nn.Module):
        # ZeRO-3 gathers a module's parameters around its forward, so each weight gets its own module
        def __init__(self, name, weight, pdim):
            super().__init__()
            self.name, self.weight, self.pdim = name, weight, pdim

        def forward(self, step, dp_rank):
            p = self.weight
            r = _shard(_noise(torch, self.name, step, dp_rank), self.pdim, grid)
            return (p.float() * r).sum() + 0.05 * (p.float() ** 2).sum()

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.grid, self.leaves = grid, []
            for name, shape, pdim, stage in SPECS:
                if stage != grid.pp_rank and grid.pp > 1:
                    continue
                *path, leaf = name.split(".")
                mod = self
                for part in path[:-1]:
                    if not hasattr(mod, part):
                        mod.add_module(part, nn.Module())
                    mod = getattr(mod, part)
                p = nn.Parameter(_shard(full[name], pdim, grid).clone())
                # megachat.tensor_parallel's marks: replicated weights get False and partition_dim -1
                p.tensor_model_parallel, p.partition_dim = pdim is not None, -1 if pdim is None else pdim
                mod.add_module(path[-1], Leaf(name, p, pdim))
                self.leaves.append(getattr(mod, path[-1]))

        def forward(self, x):
            step, dp_rank = int(x[0]), int(x[1])
            return sum(leaf(step, dp_rank) for leaf in self.leaves)

    return Stage()


def _weights(engine) -> dict:
    """{name: this rank's tp shard, fp32}; ZeRO-3 gathers its dp-partitioned parameters first."""
    import deepspeed
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=hasattr(params[0][1], "ds_id")):
        return {n: p.detach().float().clone() for n, p in params}


def _zero_config(stage: int) -> dict:
    # ZeRO-3 keeps parameters under 1e5 elements whole on every rank; 0 partitions ours as it would a big model
    return {"stage": stage, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}


def _run_layout(torch, tp, pp, zero, bf16, steps, ckpt=None):
    import deepspeed

    from megachat import sharded
    from megachat.optim import HybridOptimizer, optimizer_stats
    from megachat.parallel import init_grid
    grid = init_grid(tp, pp)
    model = _stage_model(torch, grid)
    opt = HybridOptimizer(model.named_parameters(), grid, **_opt_kwargs(torch))
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_optimization": _zero_config(zero), "zero_allow_untested_optimizer": True,
           "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    if bf16:  # 1: bf16 weights, fp32 gradient accumulation (BF16_Optimizer); 2: bf16 accumulation
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32" if bf16 == 1 else "bf16"}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=grid)

    def one_step(step):
        loss = engine(torch.tensor([step, grid.dp_rank]))
        engine.backward(loss)
        _step(engine, step)

    if ckpt is None:
        for step in range(steps):
            one_step(step)
    else:  # save after half the steps, continue; then a fresh engine resumes from the checkpoint
        half = steps // 2
        for step in range(half):
            one_step(step)
        sharded.save(ckpt, engine, None, half, {}, optimizer=True, shapes={n: s for n, s, _, _ in SPECS})
        for step in range(half, steps):
            one_step(step)
        straight = _weights(engine)
        model2 = _stage_model(torch, grid)
        state = sharded.ShardedState(ckpt)
        state.load_model(model2)  # the trainer's resume: tp shards before DeepSpeed, the rest after
        opt2 = HybridOptimizer(model2.named_parameters(), grid, **_opt_kwargs(torch))
        engine, *_ = deepspeed.initialize(model=model2, optimizer=opt2, config=cfg, mpu=grid)
        state.load_optimizer(engine)
        for step in range(half, steps):
            one_step(step)
        resumed = _weights(engine)
        return max(float((straight[n] - resumed[n]).abs().max()) for n in straight)
    stats = optimizer_stats(engine)
    ref = oracle(torch, grid.dp, steps)
    return _error(engine, grid, ref), stats


def _error(engine, grid, ref) -> float:
    """max |got - want| / max(1, |want|) over this rank's weights against the oracle's full ones."""
    err = 0.0
    for name, got in _weights(engine).items():
        want = _shard(ref[name], dict((n, d) for n, _, d, _ in SPECS)[name], grid)
        err = max(err, float(((got - want).abs() / want.abs().clamp(min=1.0)).max()))
    return err


def _reshard(torch, first, second, steps):
    """Train half the steps under layout `first` (tp, zero), carry the weights and full_optimizer_state over
    to layout `second`, train the rest there; returns the error against the oracle of that history."""
    import deepspeed
    import torch.distributed as dist
    from megachat.optim import HybridOptimizer, full_optimizer_state, load_full_optimizer_state
    from megachat.parallel import init_grid
    half, full, state, dps = steps // 2, None, None, []
    for (tp, zero), todo in ((first, range(half)), (second, range(half, steps))):
        grid = init_grid(tp, 1)
        model = _stage_model(torch, grid, full)
        opt = HybridOptimizer(model.named_parameters(), grid, **_opt_kwargs(torch))
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
               "zero_optimization": _zero_config(zero), "zero_allow_untested_optimizer": True,
               "steps_per_print": 10 ** 9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=grid)
        if state is not None:
            load_full_optimizer_state(engine, state)
        for step in todo:
            loss = engine(torch.tensor([step, grid.dp_rank]))
            engine.backward(loss)
            _step(engine, step)
            dps.append(grid.dp)
        if full is None:
            state = full_optimizer_state(engine)
            full = {}
            for name, w in _weights(engine).items():
                pdim = dict((n, d) for n, _, d, _ in SPECS)[name]
                parts = [torch.empty_like(w) for _ in range(grid.tp)]
                dist.all_gather(parts, w.contiguous(), group=grid.tp_group)
                full[name] = w if pdim is None else torch.cat(parts, dim=pdim)
    return _error(engine, grid, oracle(torch, dps, steps))


def _worker(rank, layouts, ckpt_dir):
    import torch
    import torch.distributed as dist
    from megachat.parallel import without_deepspeed_shm_allreduce
    without_deepspeed_shm_allreduce()
    results = {}
    for key, (tp, pp, zero, bf16, resume) in layouts.items():
        t0 = time.time()
        try:
            if resume == "reshard":  # (tp, zero) of the first half, (pp, bf16) = (tp, zero) of the second
                results[key] = {"err": _reshard(torch, (tp, zero), (pp, bf16), STEPS)}
            elif resume:
                results[key] = {"resume_diff": _run_layout(torch, tp, pp, zero, bf16, STEPS,
                                                           ckpt=os.path.join(ckpt_dir, key))}
            else:
                err, stats = _run_layout(torch, tp, pp, zero, bf16, STEPS)
                results[key] = {"err": err, **stats}
        except (ValueError, RuntimeError, NotImplementedError) as e:
            results[key] = {"error": f"{type(e).__name__}: {e}"}
        dist.barrier()
        if rank == 0:
            print(f"layout {key}: {time.time() - t0:.1f}s", flush=True)
    return results


def launch(world: int, layouts: dict, timeout: int) -> dict:
    """Run `layouts` {key: (tp, pp, zero, bf16, resume)} on `world` gloo ranks; per key, the worst rank."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, str(world), json.dumps(layouts), os.path.join(out, "ranks.json")]
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"launch failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        per_rank = json.load(open(os.path.join(out, "ranks.json")))
    merged = {}
    for key in layouts:
        rows = [r[key] for r in per_rank]
        errors = [r["error"] for r in rows if "error" in r]
        if errors:
            merged[key] = {"error": errors[0]}
            continue
        merged[key] = {k: max(r[k] for r in rows) for k in rows[0] if rows[0][k] is not None}
        if "bytes_sent" in rows[0]:
            merged[key]["bytes_sent_all_ranks"] = sum(r["bytes_sent"] for r in rows)
    return merged


LAYOUTS_8 = {
    "tp2_pp2_dp2_zero0": (2, 2, 0, False, False),
    "tp2_pp2_dp2_zero1": (2, 2, 1, False, False),
    "tp2_pp2_dp2_bf16_zero1": (2, 2, 1, 1, False),
    "tp2_dp4_zero2": (2, 1, 2, False, False),
    "tp2_dp4_bf16_zero2": (2, 1, 2, 1, False),
    "tp2_dp4_zero3": (2, 1, 3, False, False),
    "tp2_dp4_bf16_zero3": (2, 1, 3, 1, False),
    "tp2_dp4_bf16_zero1_resume": (2, 1, 1, 1, True),
}
LAYOUTS_2 = {
    "tp2": (2, 1, 0, False, False),
    "pp2": (1, 2, 0, False, False),
    "dp2": (1, 1, 0, False, False),
    "dp2_zero1": (1, 1, 1, False, False),
    "dp2_zero2": (1, 1, 2, False, False),
    "dp2_zero3": (1, 1, 3, False, False),
    "dp2_bf16_zero0": (1, 1, 0, 2, False),
    "dp2_bf16_zero1": (1, 1, 1, 1, False),
    "dp2_zero1_resume": (1, 1, 1, False, True),
    "dp2_zero3_resume": (1, 1, 3, False, True),
    "tp2_to_dp2_zero3": (2, 1, 0, 3, "reshard"),
    "dp2_zero1_to_tp2": (1, 2, 1, 0, "reshard"),
}
FP32_TOL, BF16_TOL = 2e-5, 2e-2


@pytest.fixture(scope="module")
def world8():
    return launch(8, LAYOUTS_8, timeout=300)


@pytest.fixture(scope="module")
def world2():
    return launch(2, LAYOUTS_2, timeout=200)


def _err(results, key):
    r = results[key]
    assert "error" not in r, r["error"]
    return r["err"]


def test_tp2_matches_single_process(world2):
    assert _err(world2, "tp2") < FP32_TOL


def test_pp2_matches_single_process(world2):
    assert _err(world2, "pp2") < FP32_TOL


def test_dp2_matches_single_process(world2):
    assert _err(world2, "dp2") < FP32_TOL


def test_dp2_zero1_matches_single_process(world2):
    assert _err(world2, "dp2_zero1") < FP32_TOL


def test_dp2_zero2_matches_single_process(world2):
    assert _err(world2, "dp2_zero2") < FP32_TOL


def test_dp2_zero3_matches_single_process(world2):
    assert _err(world2, "dp2_zero3") < FP32_TOL


def test_zero3_resume_equals_uninterrupted(world2):
    assert world2["dp2_zero3_resume"]["resume_diff"] == 0.0


def test_optimizer_state_moves_from_tp2_to_dp2_zero3(world2):
    assert _err(world2, "tp2_to_dp2_zero3") < FP32_TOL


def test_optimizer_state_moves_from_dp2_zero1_to_tp2(world2):
    assert _err(world2, "dp2_zero1_to_tp2") < FP32_TOL


def test_tp2_dp4_zero3_matches_single_process(world8):
    assert _err(world8, "tp2_dp4_zero3") < FP32_TOL


def test_tp2_dp4_bf16_zero3_matches_single_process(world8):
    assert _err(world8, "tp2_dp4_bf16_zero3") < BF16_TOL


def test_tp2_dp4_bf16_zero2_matches_single_process(world8):
    assert _err(world8, "tp2_dp4_bf16_zero2") < BF16_TOL


def test_dp2_bf16_matches_single_process(world2):
    assert _err(world2, "dp2_bf16_zero0") < BF16_TOL


def test_dp2_bf16_fp32_master_weights_match_single_process(world2):
    assert _err(world2, "dp2_bf16_zero1") < BF16_TOL


def test_zero1_resume_equals_uninterrupted(world2):
    assert world2["dp2_zero1_resume"]["resume_diff"] == 0.0


def test_tp2_pp2_dp2_matches_single_process(world8):
    assert _err(world8, "tp2_pp2_dp2_zero0") < FP32_TOL


def test_tp2_pp2_dp2_zero1_matches_single_process(world8):
    assert _err(world8, "tp2_pp2_dp2_zero1") < FP32_TOL


def test_tp2_pp2_dp2_bf16_zero1_matches_single_process(world8):
    assert _err(world8, "tp2_pp2_dp2_bf16_zero1") < BF16_TOL


def test_tp2_dp4_zero2_matches_single_process(world8):
    assert _err(world8, "tp2_dp4_zero2") < FP32_TOL


def test_bf16_zero1_resume_equals_uninterrupted(world8):
    assert world8["tp2_dp4_bf16_zero1_resume"]["resume_diff"] == 0.0


def test_exchange_volume_is_the_minimum_of_the_scheme(world8):
    # pp = 1, so the 8 ranks are one stage: together they send exactly what must move (each element of u to
    # its matrix's owner, each piece of the update to its holder); bytes_min is that total / 8, rounded down
    r = world8["tp2_dp4_zero2"]
    assert r["bytes_min"] > 0
    assert 0 <= r["bytes_sent_all_ranks"] - 8 * r["bytes_min"] < 8


if __name__ == "__main__":
    from _dist import run_gloo
    world, layouts, out = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    with tempfile.TemporaryDirectory() as ckpt:
        per_rank = run_gloo(_worker, world, layouts, ckpt, timeout_s=120)
    with open(out, "w") as f:
        json.dump(per_rank, f)
