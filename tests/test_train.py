"""scripts/base_train.py under the real deepspeed launcher on CPU (gloo), fp32 unless stated: every tp x pp x dp
layout with world <= 8 gives the single-process loss curve (and val bpb, and the sample decoded from the gathered
weights), with --compile, --sequence-parallel and activation checkpointing riding on some of them (LAYOUTS says
which), ZeRO-3 gives ZeRO-0's, the run directory holds what it should, bf16 on real text lowers the loss, a NaN loss
stops the run naming the step with the last checkpoint in charge, a damaged checkpoint is named, and a bad layout
fails with its message before any training (resumes, SIGTERM and kill -9: test_train_resume.py). Tiny model (depth
4: 256 wide, 2 heads, 4 layers; 512-id vocab). Each launch costs ~10 s before its first step, so a feature that must
leave the arithmetic alone rides on a launch that is compared with an exact curve anyway rather than getting its own.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _dist import free_port

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
# depth 4: n_embd 256, 2 heads (tp 2 splits them), 4 layers (pp 2 gets 2 blocks per stage); 256 tokens per step
# = 8 sequences of 32, so dp 1 accumulates 4 micro-batches of 2 and dp 2 accumulates 2.
TINY = ["--depth", "4", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "256",
        "--num-iterations", str(STEPS), "--sample-tokens", "6", "--dtype", "fp32", "--zero", "0",
        "--ns-dtype", "fp32"]  # exact arithmetic: every layout's curve equal to the single process's


def train(corpus: dict, out: Path, nprocs: int, *args: str, timeout: int = 300, check: bool = True):
    """Run base_train.py on `nprocs` CPU processes (plain python for one); stdout+stderr in .stdout."""
    script = str(ROOT / "scripts" / "base_train.py")
    cmd = ([sys.executable, script] if nprocs == 1 else
           [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nprocs), "--master_port",
            str(free_port()), script])
    cmd += ["--data", corpus["train"], "--tokenizer", corpus["tokenizer"], "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def sample(proc) -> str:
    return next(line for line in proc.stdout.splitlines() if line.startswith("sample |"))


def curve(out: Path, key: str = "loss") -> dict:
    """{step: value} of `key` from RUN_DIR/metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


def assert_same_curve(got: dict, want: dict, rel: float = 1e-4, steps=range(1, STEPS + 1)):
    assert sorted(got) == list(steps) and sorted(want) == sorted(got), (sorted(got), sorted(want))
    for step in sorted(want):
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), \
            f"step {step}: loss {got[step]!r} vs reference {want[step]!r} (tolerance {rel} relative)\n{got}\n{want}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, texts, tok):
    """conftest's 512-id tokenizer, saved, and train / val shards of its texts (last 10 documents held out)."""
    from megachat.data import IndexedDatasetWriter, dtype_for_vocab
    out = tmp_path_factory.mktemp("corpus")
    tok.save(str(out / "tokenizer"))
    for name, part in (("train", texts[:-10]), ("val", texts[-10:])):
        with IndexedDatasetWriter(str(out / name), dtype_for_vocab(tok.vocab_size)) as w:
            for d in part:
                w.add_document(tok.encode(d, prepend=tok.bos_id))
    return {"tokenizer": str(out / "tokenizer"), "train": str(out / "train"), "val": str(out / "val")}


def tiny(corpus):
    """TINY plus val bpb at steps 0 and 6 on 8 held-out sequences."""
    return [*TINY, "--val-data", corpus["val"], "--eval-every", str(STEPS), "--eval-tokens", "256"]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One process, ZeRO-0, Muon: the curve every layout must reproduce (checkpoints at 2, 4, 6; newest 2 kept)."""
    out = tmp_path_factory.mktemp("ref")
    proc = train(corpus, out, 1, *tiny(corpus), "--save-every", "2", "--keep-checkpoints", "2")
    (out / "sample.txt").write_text(sample(proc))
    return out


# First of the compiled runs: pp2's blocks have this run's shapes, so on a new machine its ranks find the inductor
# cache (/tmp/torchinductor_<user>) filled instead of each compiling the same graphs (41 s -> 21 s for that launch)
def test_compiled_blocks_give_the_eager_losses(corpus, reference, tmp_path):
    train(corpus, tmp_path, 1, *tiny(corpus), "--save-every", "2", "--keep-checkpoints", "2", "--compile")
    assert_same_curve(curve(tmp_path), curve(reference), rel=1e-5)


# (name, processes, args): every layout of tp, pp, dp in {1, 2}; the ZeRO stages ride along (pp > 1 allows 0/1), and
# so do the features that must not change the arithmetic: each layout's curve is compared with the single eager
# process's, so a rider that changed a loss (a wrong recompute, a lost sequence shard, a compiled block that differs
# from eager) moves that layout off it. tp2_pp2 stays plain, so plain tp and pp are still compared on their own.
#   tp2: --compile --sequence-parallel (tp's collectives, here sequence parallelism's all-gathers and
#        reduce-scatters, run inside the compiled blocks)
#   pp2: --compile (the pipeline engine calls the compiled blocks of its stage)
#   tp2_dp2_zero2: --activation-checkpointing full; pp2_dp2_zero1: --activation-checkpointing selective
#   tp2_pp2_dp2: --sequence-parallel (each tp rank sends its own 16 of the 32 positions to the next stage:
#        DeepSpeed's partitioned pipe messages are turned off for it)
LAYOUTS = [
    ("tp2", 2, ["--tp", "2", "--compile", "--sequence-parallel"]),
    ("pp2", 2, ["--pp", "2", "--compile"]),
    ("tp2_pp2", 4, ["--tp", "2", "--pp", "2"]),
    ("tp2_dp2_zero2", 4, ["--tp", "2", "--zero", "2", "--activation-checkpointing", "full"]),
    ("pp2_dp2_zero1", 4, ["--pp", "2", "--zero", "1", "--activation-checkpointing", "selective"]),
    ("tp2_pp2_dp2", 8, ["--tp", "2", "--pp", "2", "--sequence-parallel"]),
]


@pytest.mark.parametrize("name,nprocs,args", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_layout_matches_single_process(corpus, reference, tmp_path, name, nprocs, args):
    proc = train(corpus, tmp_path, nprocs, *tiny(corpus), *args)
    assert_same_curve(curve(tmp_path), curve(reference))
    # the global gradient norm, taken between the backward and the optimizer step (with pp > 1 between DeepSpeed's
    # pipeline schedule and its step), is the one process's; above 1 at some step, so clipping acts in this curve
    assert_same_curve(curve(tmp_path, "grad_norm"), curve(reference, "grad_norm"))
    assert max(curve(reference, "grad_norm").values()) > 1.0
    assert_same_curve(curve(tmp_path, "val_bpb"), curve(reference, "val_bpb"), steps=[0, STEPS])
    # the end-of-run sample decodes the weights gathered from every tp / pp shard onto rank 0
    assert sample(proc) == (reference / "sample.txt").read_text()


def test_dp2_zero3_matches_single_process_zero0(corpus, reference, tmp_path):
    # ZeRO-3 partitions the weights themselves; Muon still orthogonalizes whole matrices (megachat.optim); the
    # user's file asks for sub groups of 1,000 parameters (so few that Muon would see several), which the
    # trainer raises to the model's size
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "sub_group_size": 1000},
                              "zero_allow_untested_optimizer": True}))
    proc = train(corpus, tmp_path / "run", 2, *tiny(corpus), "--zero", "3", "--ds-config", str(ds))
    assert sample(proc) == (reference / "sample.txt").read_text()  # partitioned weights gathered for the sample
    assert_same_curve(curve(tmp_path / "run"), curve(reference))


def test_checkpoints_keep_the_newest_and_latest_names_a_complete_one(reference):
    ckpts = reference / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000006"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_000004", "step_000006"]
    assert not list(ckpts.glob("*.tmp*"))
    # one format: the layout-free state (one file per rank and the index naming them) and megachat.json
    assert sorted(p.name for p in (ckpts / "step_000006").iterdir()) == ["megachat.json", "state"]
    assert sorted(p.name for p in (ckpts / "step_000006" / "state").iterdir()) == ["index.json",
                                                                                   "rank-00000.safetensors"]


def test_run_dir_holds_config_metrics_and_tensorboard_events(reference):
    config = json.loads((reference / "config.json").read_text())
    assert config["model"]["n_layer"] == 4 and config["model"]["vocab_size"] == 512
    rec = [r for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "model_flops_per_s", "memory_gib"):
        assert key in rec, key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = list((reference / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(reference / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, STEPS + 1))
    assert [e.step for e in acc.Scalars("val_bpb")] == [0, STEPS]


def test_run_dir_holds_the_final_weights_under_nanochat_names(reference):
    from megachat.checkpoint import load_weights
    from megachat.model import GPTConfig, nanochat_shapes
    config = json.loads((reference / "config.json").read_text())
    weights = load_weights(str(reference / "model"))  # RUN_DIR/model/: written by every rank, no rank-0 gather
    shapes = nanochat_shapes(GPTConfig(**config["model"]))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(s) for k, s in shapes.items()}
    assert not list(reference.glob("model.pt*")) and not list((reference / "model").glob("*.tmp*"))


def test_bf16_on_real_text_lowers_loss_and_val_bpb(corpus, tmp_path):
    # one process and depth 2 (128 wide): CPU bf16 matmuls are ~80x slower than fp32
    proc = train(corpus, tmp_path, 1, "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4",
                 "--total-batch-size", "256", "--num-iterations", "10", "--dtype", "bf16", "--zero", "1",
                 "--val-data", corpus["val"], "--eval-every", "10", "--eval-tokens", "512", "--sample-tokens", "4")
    loss, bpb = curve(tmp_path), curve(tmp_path, "val_bpb")
    assert sorted(bpb) == [0, 10]
    assert loss[10] < 0.9 * loss[1], loss
    assert bpb[10] < 0.9 * bpb[0], bpb
    assert "sample |" in proc.stdout


def poison(state_dir: Path, name: str) -> None:
    """Set every element of weight `name` in the sharded state at state_dir to NaN, its index updated to match (a
    state that passes verify: training made the NaN, not the disk)."""
    import zlib

    from safetensors import safe_open
    from safetensors.torch import save_file
    index = json.loads((state_dir / "index.json").read_text())
    for file in index["files"]:
        path = state_dir / file
        with safe_open(str(path), framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        for key, t in tensors.items():
            if key.startswith(name + ":weight@"):
                t.fill_(float("nan"))
        save_file(tensors, str(path), metadata=metadata)
        data = path.read_bytes()
        index["files"][file] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    (state_dir / "index.json").write_text(json.dumps(index))


def test_nan_loss_stops_with_the_step_and_leaves_the_checkpoint_in_charge(corpus, reference, tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_000004"
    shutil.copytree(reference / "checkpoints" / "step_000004", ckpt)
    (tmp_path / "checkpoints" / "latest").write_text("step_000004")
    poison(ckpt / "state", "transformer.h.0.mlp.c_fc.weight")
    proc = train(corpus, tmp_path, 1, *TINY, "--save-every", "1", "--resume", "--max-bad-steps", "2", check=False)
    assert proc.returncode != 0
    assert "step      5/6 | loss nan" in proc.stdout and "skipped: non-finite loss or gradient" in proc.stdout
    assert "loss is nan at step 6: 2 bad step(s) in a row, each skipped (--max-bad-steps 2)" in proc.stdout
    assert "latest intact checkpoint: " + str(ckpt) in proc.stdout
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000004"
    # the skipped step 5 changed nothing and was not checkpointed (--save-every 1 would have saved it)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000004"]


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":  # one bit in the middle of a tensor: torch.load would read it without a word
        data[len(data) // 2] ^= 0x10
    else:
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_checkpoint_stops_the_resume_naming_the_file_and_the_previous_checkpoint(corpus, reference,
                                                                                          tmp_path, how):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    bad = tmp_path / "checkpoints" / "step_000006" / "state" / "rank-00000.safetensors"
    damage(bad, how)
    proc = train(corpus, tmp_path, 1, *tiny(corpus), "--resume", check=False, timeout=120)
    assert proc.returncode != 0
    assert f"checkpoint {bad.parent.parent} is damaged: {bad}: " in proc.stdout
    assert f"resume from the previous checkpoint: echo step_000004 > {tmp_path / 'checkpoints' / 'latest'}" \
        in proc.stdout
    assert "step      1" not in proc.stdout


def test_a_fresh_start_into_an_earlier_runs_directory_is_refused_and_leaves_it_alone(corpus, reference, tmp_path):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    proc = train(corpus, tmp_path, 1, *TINY, "--save-every", "1", check=False, timeout=120)
    assert proc.returncode != 0
    assert f"{tmp_path} already holds a run (checkpoints/latest, model/index.json): pass --resume" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


def test_bad_layout_fails_before_training_with_a_clear_message(corpus, tmp_path):
    proc = train(corpus, tmp_path, 2, *TINY, "--pp", "2", "--zero", "2", check=False, timeout=120)
    assert proc.returncode != 0
    assert "DeepSpeed's pipeline engine supports ZeRO-0/1 only" in proc.stdout
    assert "step      1" not in proc.stdout


def test_val_bpb_of_training_equals_base_eval_on_the_final_weights(reference, tmp_path):
    # training's validation and base_eval run the same forward (GridForward) over the same samples (val_batches)
    sys.path.insert(0, str(ROOT / "scripts"))
    import base_eval
    shutil.copy(reference / "config.json", tmp_path / "config.json")  # base_eval writes its reports into --run
    shutil.copytree(reference / "model", tmp_path / "model")
    base_eval.main(["--run", str(tmp_path), "--eval", "bpb", "--eval-tokens", "256", "--device-batch-size", "2"])
    rows = dict(line.split(",", 1) for line in (tmp_path / "base_eval.csv").read_text().splitlines()[1:])
    assert float(rows["val_bpb"]) == pytest.approx(curve(reference, "val_bpb")[STEPS], rel=1e-5)
