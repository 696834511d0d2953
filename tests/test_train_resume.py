"""scripts/base_train.py resumed, under the real deepspeed launcher on CPU (gloo): a dp 2 x ZeRO-1 run gives the
single-process curve, and its checkpoints continue it exactly (the same layout at 1e-6, another layout at the
reference's tolerance), after a scheduler's SIGTERM (save and exit 0, then `--resume auto`) and after kill -9 of every
process while asynchronous saves are in flight; a damaged file that another rank checks stops every rank. The tiny
model, the corpus and the single-process reference are test_train.py's.
"""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dist import free_port
from test_train import ROOT, STEPS, assert_same_curve, corpus, curve, damage, reference, tiny, train  # noqa: F401, F811

from megachat import checkpoint
from megachat.checkpoint import load_weights


@pytest.fixture(scope="module")
def dp2_zero1(corpus, tmp_path_factory):
    """2 processes, ZeRO-1 (optimizer state sharded over dp), checkpoint at step 3 and 6."""
    out = tmp_path_factory.mktemp("dp2_zero1")
    train(corpus, out, 2, *tiny(corpus), "--zero", "1", "--save-every", "3")
    return out


def test_dp2_zero1_matches_single_process(dp2_zero1, reference):
    assert_same_curve(curve(dp2_zero1), curve(reference))
    assert_same_curve(curve(dp2_zero1, "val_bpb"), curve(reference, "val_bpb"), steps=[0, STEPS])


def test_resume_continues_the_uninterrupted_curve(corpus, dp2_zero1, tmp_path):
    # the dp2 ZeRO-1 run's step-3 checkpoint, as if the run had been killed right after saving it
    shutil.copytree(dp2_zero1 / "checkpoints" / "step_000003", tmp_path / "checkpoints" / "step_000003")
    (tmp_path / "checkpoints" / "latest").write_text("step_000003")
    shutil.copy(dp2_zero1 / "metrics.jsonl", tmp_path / "metrics.jsonl")  # resume drops the records after step 3
    proc = train(corpus, tmp_path, 2, *tiny(corpus), "--zero", "1", "--resume")
    assert "start at step 3" in proc.stdout
    assert_same_curve(curve(tmp_path), curve(dp2_zero1), rel=1e-6)
    assert_same_curve(curve(tmp_path, "val_bpb"), curve(dp2_zero1, "val_bpb"), rel=1e-6, steps=[0, STEPS])


def test_resume_under_another_layout_continues_the_curve(corpus, dp2_zero1, reference, tmp_path):
    # saved by dp 2 x ZeRO-1, resumed by tp 2 x pp 2 (4 processes): weights and optimizer state re-sharded
    shutil.copytree(dp2_zero1 / "checkpoints" / "step_000003", tmp_path / "checkpoints" / "step_000003")
    (tmp_path / "checkpoints" / "latest").write_text("step_000003")
    shutil.copy(dp2_zero1 / "metrics.jsonl", tmp_path / "metrics.jsonl")
    proc = train(corpus, tmp_path, 4, *tiny(corpus), "--tp", "2", "--pp", "2", "--resume")
    assert "resumed step 3 saved under {'tp': 1, 'pp': 1, 'dp': 2, 'zero': 1}" in proc.stdout
    assert_same_curve(curve(tmp_path), curve(reference))
    assert_same_curve(curve(tmp_path, "val_bpb"), curve(reference, "val_bpb"), steps=[0, STEPS])
    # its final weights, written by the 4 ranks of both pipeline stages, are the single process's
    got, want = load_weights(str(tmp_path / "model")), load_weights(str(reference / "model"))
    assert len(list((tmp_path / "model").glob("rank-*.safetensors"))) == 4 and list(got) == list(want)
    for name in want:
        if name != "transformer.wte.weight":
            torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5, msg=name)
    # The embedding is compared by count: AdamW (eps 1e-10) turns an element whose gradient is pure rounding
    # noise into a full-size step whose sign depends on the summation order, which differs between layouts
    # (1 element of 131,072 on some CPU types). A resharding error (a wrong slice of weights, moments or
    # step) moves whole rows or partitions: thousands of elements, far above this bound.
    far = ~torch.isclose(got["transformer.wte.weight"], want["transformer.wte.weight"], rtol=1e-3, atol=1e-5)
    assert far.sum() <= 4, f"transformer.wte.weight: {int(far.sum())} of {far.numel()} elements differ"


def test_a_damaged_file_that_another_rank_checks_stops_every_rank(corpus, dp2_zero1, tmp_path):
    # rank 1 checks every second file of verify's list (the sharded state's files in the index's order): rank 1's
    # file falls to it, and rank 0 must stop too (not wait in a collective)
    shutil.copytree(dp2_zero1, tmp_path, dirs_exist_ok=True)
    files = sorted((tmp_path / "checkpoints" / "step_000006" / "state").glob("*.safetensors"))
    assert [f.name for f in files] == ["rank-00000.safetensors", "rank-00001.safetensors"], files
    size = files[1].stat().st_size
    damage(files[1], "truncate")
    proc = train(corpus, tmp_path, 2, *tiny(corpus), "--zero", "1", "--resume", check=False, timeout=120)
    assert proc.returncode != 0
    # both ranks stop with the same message, printed once
    assert proc.stdout.count(f"is damaged: {files[1]}: {size // 2} bytes, the index records {size}") == 1, \
        proc.stdout[-3000:]
    assert "echo step_000003 > " in proc.stdout


def test_sigterm_saves_and_exits_and_resume_auto_continues_the_curve(corpus, dp2_zero1, tmp_path):
    # a requeue loop: the same command twice, --resume auto; the first is stopped by the scheduler's SIGTERM
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "scripts" / "base_train.py"), "--data", corpus["train"], "--tokenizer", corpus["tokenizer"],
           "--out", str(tmp_path), *tiny(corpus), "--zero", "1", "--eval-every", "1", "--resume", "auto"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step      1/6"):
                os.killpg(proc.pid, signal.SIGTERM)  # as SLURM signals a job: every process of it
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    stopped = next(int(line.split()[1].rstrip(":")) for line in lines if "stopping on a signal" in line)
    assert 1 <= stopped < STEPS, out[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{stopped:06d}"
    assert not (tmp_path / "model").exists()  # the final weights come only after the last step
    proc = train(corpus, tmp_path, 2, *tiny(corpus), "--zero", "1", "--eval-every", "1", "--resume", "auto")
    assert f"start at step {stopped}" in proc.stdout
    assert_same_curve(curve(tmp_path), curve(dp2_zero1), rel=1e-6)


def test_async_save_writes_the_synchronous_checkpoint_and_a_kill_leaves_a_complete_one_in_charge(corpus, dp2_zero1,
                                                                                                tmp_path):
    # --async-save: each rank's state is copied to host memory and written by a thread while training goes on; the
    # step-3 checkpoint is byte for byte the synchronous one of dp2_zero1, and the curve is the same. Full activation
    # checkpointing rides along: recomputing each block in the backward must give dp2_zero1's (no recompute) losses
    # and weights exactly.
    done = tmp_path / "async"
    train(corpus, done, 2, *tiny(corpus), "--zero", "1", "--save-every", "3", "--async-save",
          "--activation-checkpointing", "full")
    assert_same_curve(curve(done), curve(dp2_zero1), rel=1e-6)
    want = dp2_zero1 / "checkpoints" / "step_000003"
    got = done / "checkpoints" / "step_000003"
    assert sorted(p.name for p in (got / "state").iterdir()) == sorted(p.name for p in (want / "state").iterdir())
    for f in (want / "state").iterdir():
        assert (got / "state" / f.name).read_bytes() == f.read_bytes(), f.name
    # kill -9 of every process while saves are in flight (one after every step): `latest` names a complete
    # checkpoint, and the resume from it continues the curve. Both launches recompute the attention core
    # (selective activation checkpointing): their losses must be dp2_zero1's too.
    killed = tmp_path / "killed"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "scripts" / "base_train.py"), "--data", corpus["train"], "--tokenizer", corpus["tokenizer"],
           "--out", str(killed), *tiny(corpus), "--zero", "1", "--save-every", "1", "--async-save", "--resume", "auto",
           "--activation-checkpointing", "selective"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("step      4/6"):
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ckpts = killed / "checkpoints"
    tag = checkpoint.latest_tag(str(ckpts))
    assert tag in ("step_000002", "step_000003", "step_000004"), tag
    checkpoint.verify(str(ckpts), tag)
    proc = train(corpus, killed, 2, *tiny(corpus), "--zero", "1", "--save-every", "1", "--async-save",
                 "--resume", "auto", "--activation-checkpointing", "selective")
    assert f"start at step {int(tag[5:])}" in proc.stdout
    assert_same_curve(curve(killed), curve(dp2_zero1), rel=1e-6)
