"""Midtraining and SFT (scripts/mid_train.py, scripts/chat_sft.py) under the real deepspeed launcher on CPU, fp32:
the same per-step losses in one process and in tp2, pp2, dp2 and tp2 x pp2 x dp2 (SFT's masked targets included:
the mask must not change the loss's normalisation across ranks), an exact resume, and the phases' run
directories; plus the mixtures and the padded SFT batch on their own. Tiny model (depth 4), 512-id tokenizer."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dist import free_port

from megachat.model import GPTConfig, nanochat_shapes
from megachat.sharded import save_full
from megachat.tasks.mixture import Part, TaskMixture, TaskSequence, render_batch
from megachat.tasks.recipes import mid_mixture, sft_mixture

ROOT = Path(__file__).resolve().parent.parent
SEQ = 64
COMMON = ["--max-seq-len", str(SEQ), "--dtype", "fp32", "--zero", "0", "--mixture-scale", "0.01",
          "--ns-dtype", "fp32"]  # exact arithmetic: the layouts' curves compared with one process's
MID = [*COMMON, "--device-batch-size", "2", "--total-batch-size", str(8 * SEQ), "--num-iterations", "4",
       "--eval-every", "4", "--eval-tokens", str(8 * SEQ)]
SFT_BASE = [*COMMON, "--device-batch-size", "2", "--examples-per-step", "8", "--num-iterations", "4",
            "--eval-examples", "8"]
SFT = [*SFT_BASE, "--eval-every", "2", "--acc-every", "0", "--save-every", "2"]


def run(script, out, nprocs, *args, check=True):
    path = str(ROOT / "scripts" / script)
    cmd = ([sys.executable, path] if nprocs == 1 else
           [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nprocs), "--master_port",
            str(free_port()), path])
    proc = subprocess.run(cmd + ["--out", str(out), *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-5000:]}")
    return proc


def curve(out, key="loss"):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


def assert_same(got, want, rel=1e-4):
    assert sorted(got) == sorted(want) and got, (got, want)
    for step in want:
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), (step, got, want)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tok):
    """A base run directory as base_train leaves it: config.json (model, tokenizer) and model/ (random weights:
    the init's zero lm_head would make every loss the same)."""
    out = tmp_path_factory.mktemp("base")
    tok.save(str(out / "tokenizer"))
    config = GPTConfig.from_depth(4, tok.vocab_size, SEQ)
    g = torch.Generator().manual_seed(0)
    save_full(str(out / "model"), {n: torch.randn(s, generator=g) / (1.0 if "wte" in n else s[1] ** 0.5)
                                   for n, s in nanochat_shapes(config).items()}, config)
    (out / "config.json").write_text(json.dumps({"model": vars(config), "tokenizer": str(out / "tokenizer")}))
    return out


@pytest.fixture(scope="module")
def mid_reference(base_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("mid1")
    proc = run("mid_train.py", out, 1, "--init-from", str(base_run), *MID)
    assert "mid_train: SmolTalk left out: no --chat-data directory" in proc.stdout
    return out


@pytest.fixture(scope="module")
def sft_reference(mid_reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft1")
    run("chat_sft.py", out, 1, "--init-from", str(mid_reference), *SFT)
    return out


def test_mid_writes_its_run_directory_and_lowers_nothing_it_should_not(mid_reference, base_run):
    config = json.loads((mid_reference / "config.json").read_text())
    assert config["phase"] == "mid" and config["parent"] == str(base_run)
    assert sorted(curve(mid_reference)) == [1, 2, 3, 4] and sorted(curve(mid_reference, "val_bpb")) == [0, 4]
    assert (mid_reference / "model" / "index.json").is_file() and (mid_reference / "data" / "mid.meta.json").is_file()


def test_mid_tp2_pp2_dp2_matches_one_process(base_run, mid_reference, tmp_path):
    run("mid_train.py", tmp_path, 8, "--init-from", str(base_run), *MID, "--tp", "2", "--pp", "2")
    assert_same(curve(tmp_path), curve(mid_reference))
    assert_same(curve(tmp_path, "val_bpb"), curve(mid_reference, "val_bpb"))


SFT_LAYOUTS = [("tp2", 2, ["--tp", "2"]), ("pp2", 2, ["--pp", "2"]), ("dp2", 2, []),
               ("tp2_pp2_dp2", 8, ["--tp", "2", "--pp", "2"])]


@pytest.mark.parametrize("name,nprocs,args", SFT_LAYOUTS, ids=[x[0] for x in SFT_LAYOUTS])
def test_sft_layout_matches_one_process(mid_reference, sft_reference, tmp_path, name, nprocs, args):
    run("chat_sft.py", tmp_path, nprocs, "--init-from", str(mid_reference), *SFT, *args)
    assert_same(curve(tmp_path), curve(sft_reference))
    assert_same(curve(tmp_path, "val_bpb"), curve(sft_reference, "val_bpb"))
    if name == "dp2":  # and an exact resume from its step-2 checkpoint
        resumed = tmp_path.parent / f"{tmp_path.name}_resumed"
        shutil.copytree(tmp_path / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
        (resumed / "checkpoints" / "latest").write_text("step_000002")
        shutil.copy(tmp_path / "metrics.jsonl", resumed / "metrics.jsonl")
        proc = run("chat_sft.py", resumed, 2, "--init-from", str(mid_reference), *SFT, "--resume")
        assert "start at step 2" in proc.stdout
        assert_same(curve(resumed), curve(tmp_path), rel=1e-6)


def test_sft_reports_accuracy_and_refuses_a_missing_parent(mid_reference, tmp_path):
    run("chat_sft.py", tmp_path, 1, "--init-from", str(mid_reference), *SFT_BASE, "--eval-every", "4",
        "--acc-every", "4", "--acc-examples", "4")
    assert sorted(curve(tmp_path, "mmlu_acc")) == [0, 4] and sorted(curve(tmp_path, "arc_easy_acc")) == [0, 4]
    proc = run("chat_sft.py", tmp_path / "x", 1, "--init-from", str(tmp_path / "nothing"), *SFT, check=False)
    assert proc.returncode == 2 and "chat_sft.py: error: --init-from" in proc.stdout


def test_render_batch_trains_only_the_assistants_tokens(tok):
    conversation = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    x, y = render_batch([conversation], tok, 32)
    ids, mask = tok.render_conversation(conversation)
    n = len(ids) - 1
    assert x[0, :n].tolist() == ids[:-1] and (x[0, n:] == tok.bos_id).all()
    assert y[0, :n].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])] and (y[0, n:] == -1).all()
    assert tok.decode([t for t in y[0].tolist() if t >= 0]) == "hello<|assistant_end|>"


def test_mixtures_are_deterministic_and_say_what_is_left_out():
    parts = [Part("a", [{"i": i} for i in range(3)], repeats=2), Part("b", [{"i": 10 + i} for i in range(5)], limit=2)]
    m1, m2 = TaskMixture(parts, seed=1), TaskMixture(parts, seed=1)
    assert [m1[i] for i in range(len(m1))] == [m2[i] for i in range(len(m2))] and m1.counts() == {"a": 6, "b": 2}
    assert [c["i"] for c in TaskSequence(parts)] == [0, 1, 2, 0, 1, 2, 10, 11]
    train, val, left_out = sft_mixture(scale=0.01)
    assert set(left_out) == {"ARC-Easy", "ARC-Challenge", "GSM8K", "SmolTalk"}
    assert set(train.counts()) == {"identity", "SimpleSpelling", "SpellingBee"} and len(val) > 0
    train, _, left_out = mid_mixture(scale=0.001)
    assert set(left_out) == {"SmolTalk", "MMLU-aux", "GSM8K"} and train.counts()["identity"] == 2
