"""Each ZeRO stage holds the model-state bytes its formula promises, counted tensor by tensor on real DeepSpeed.

One launch of 2 gloo ranks (tests/_dist.run_gloo) trains a depth-6 model (n_embd 384: every block matrix is above
ZeRO-3's persistence threshold, so ZeRO-3 partitions them all) under megachat.build.build_trainer at ZeRO-1, 2 and
3, fp32 and bf16 (micro-batches of one 32-token sequence and Muon's Newton-Schulz in fp32: neither changes a
model-state byte, and both make the steps cheaper on a CPU), and counts during a third step what each rank holds
(megachat.measure.measure_model_states: every tensor the garbage collector reaches, .grad included, each storage once,
sorted into weights, gradients, optimizer state, DeepSpeed's gradient buckets, ZeRO-3's gathered parameters and the
rest). With N parameters, M of them in
Muon's block matrices and A in AdamW's wte / lm_head, per data-parallel rank of dp (w = 4 bytes in fp32, 2 in bf16):

| | weights | gradients | optimizer |
| --- | --- | --- | --- |
| ZeRO-1 | w N | 4 N (fp32); bf16: 4 N fp32 accumulation + 2 N .grad | (4 M + 8 A) / dp, + 4 N / dp fp32 master in bf16 |
| ZeRO-2 | w N | 4 N / dp (fp32 with several micro-batches: 8 N / dp) | same |
| ZeRO-3 | w N / dp | 4 N / dp | same |

(in fp32 DeepSpeed's master partition is the weights' own: megachat.deepspeed_internals.share_fp32_master; DeepSpeed 0.19's
fp32 ZeRO-2 keeps the partition accumulated over earlier micro-batches beside the one each backward reduces into).
Each measured
kind must be within 5 % of this formula and of megachat.planner.model_state_bytes, DeepSpeed's buckets equal to
the planner's, ZeRO-3's gathered parameters within the planner's workspace term, everything else under 2 % of the
model states, and ZeRO-3 must hold the least of the three stages.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist import run_gloo  # noqa: E402

DEPTH, VOCAB, SEQ, MICRO, DP = 6, 1024, 32, 1, 2
LAYOUTS = [(zero, dtype) for dtype in ("fp32", "bf16") for zero in (1, 2, 3)]
TOLERANCE = 0.05
STATES = ("weights", "grads", "optimizer")


def formula(zero: int, dtype: str, matrix: int, adam: int, dp: int) -> dict[str, float]:
    """The table above: bytes per dp rank for M = matrix, A = adam elements (two micro-batches per step)."""
    w, n = (4 if dtype == "fp32" else 2), matrix + adam
    optimizer = (4 * matrix + 8 * adam + (4 * n if dtype == "bf16" else 0)) / dp
    grads = {1: 4 * n + (w * n if dtype == "bf16" else 0), 2: (8 if dtype == "fp32" else 4) * n / dp,
             3: 4 * n / dp}[zero]
    return {"weights": w * n / dp if zero == 3 else w * n, "grads": grads, "optimizer": optimizer}


def _measure(rank, layouts):
    """[(zero, dtype, measured, planned, formula, planned gathered)] on this rank, one trainer after another."""
    import gc

    import torch

    from megachat.build import build_trainer
    from megachat.measure import live_storages, measure_model_states
    from megachat.planner import Job, job_zero_settings, layer_params, model_state_bytes, predict_gathered_bytes
    from megachat.train_config import TrainConfig
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, VOCAB, (MICRO, SEQ), generator=g), torch.randint(0, VOCAB, (MICRO, SEQ), generator=g))
               for _ in range(2)]
    rows = []
    for zero, dtype in layouts:
        cfg = TrainConfig(depth=DEPTH, vocab_size=VOCAB, seq_len=SEQ, device_batch_size=MICRO,
                          total_batch_size=MICRO * SEQ * DP * len(batches), num_iterations=10, zero=zero, dtype=dtype,
                          ns_dtype="fp32")
        before = live_storages()  # what earlier trainers of this process left behind
        trainer = build_trainer(cfg)
        for _ in range(2):  # the optimizer's state and ZeRO-3's complete trace of the modules exist after them
            trainer.train_step(batches)
        got = measure_model_states(trainer, batches, exclude=before)
        job = Job(cfg.model_config(), total_batch_size=cfg.total_batch_size, dtype=dtype)
        layers = layer_params(job.config, 1)
        settings = job_zero_settings(job, zero)
        planned = model_state_bytes(layers, DP, zero, dtype, settings, dp_rank=trainer.grid.dp_rank,
                                    micro_batches=len(batches))
        kinds = [k for layer in layers for k in layer.optim_kinds]
        numels = [n for layer in layers for n in layer.numels]
        matrix = sum(n for n, k in zip(numels, kinds) if k == "matrix")
        rows.append((zero, dtype, got, planned, formula(zero, dtype, matrix, sum(numels) - matrix, DP),
                     predict_gathered_bytes(layers, zero, dtype, settings)))
        del trainer
        gc.collect()
    return rows


@pytest.fixture(scope="module")
def measured():
    return run_gloo(_measure, DP, LAYOUTS, timeout_s=240)


def test_each_zero_stage_holds_its_formulas_model_state_bytes_within_5_percent(measured):
    off = []
    for rank, rows in enumerate(measured):
        for zero, dtype, got, planned, expected, _ in rows:
            for kind in STATES:
                for source, want in (("formula", expected[kind]), ("planner", planned[kind])):
                    if abs(got[kind] - want) > TOLERANCE * want:
                        off.append(f"rank {rank} ZeRO-{zero} {dtype} {kind}: measured {got[kind]:,} {source} "
                                   f"{want:,.0f}")
    assert not off, "; ".join(off)


def test_buckets_gathered_parameters_and_the_rest_are_what_the_planner_plans(measured):
    for rank, rows in enumerate(measured):
        for zero, dtype, got, planned, _, gathered in rows:
            label = f"rank {rank} ZeRO-{zero} {dtype}"
            assert got["buffers"] == pytest.approx(planned["buffers"], rel=TOLERANCE), label
            assert got["gathered"] <= gathered, f"{label}: {got['gathered']:,} gathered, planned {gathered:,}"
            states = sum(got[k] for k in STATES)
            assert got["other"] < 0.02 * states, f"{label}: {got['other']:,} bytes in no known place"


def test_zero3_holds_the_least_and_zero2_less_than_zero1(measured):
    for rows in measured:
        for dtype in ("fp32", "bf16"):
            total = {zero: sum(v for k, v in got.items() if k != "other")
                     for zero, d, got, *_ in rows if d == dtype}
            assert total[3] < total[2] < total[1], (dtype, total)
