"""megachat.sharded: layout-free checkpoints that every rank writes in parallel and reads by slices.

- `regions`: any run of any tp shard (rows split with vocab padding, columns split, whole) maps onto the right
  rectangles of the full tensor, and the runs of all ranks tile it exactly once.
- One launch of 2 gloo ranks through the real trainer (build_trainer, DeepSpeed): a bf16 dp2 ZeRO-1 run of a GQA
  model (1 KV head: tp 2 replicates c_k / c_v) with a vocab that tp 2 pads, 2 steps, a checkpoint and its final
  weights; then resumed from that checkpoint under tp2 (bf16 ZeRO-1), dp2 bf16 ZeRO-3 and dp2 fp32 ZeRO-0 (each
  rank reading only its slices), each writing its state again. Checked here: the fp32 master weights and every
  optimizer state come back bit for bit under every layout (bf16 rounding would not), the step, the balance of
  the bytes per rank, verify on damaged files, and the exports (safetensors, nanochat) read back into the same
  logits and through --init-from (load_init).
"""
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from megachat.sharded import Region, ShardedState, regions

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 251  # odd: tp 2 pads the embedding and the LM head by one row
SEQ = 16


def test_runs_of_every_tp_shard_tile_the_full_tensor_once():
    from megachat.tensor_parallel import shard_tensor
    rng = random.Random(0)

    class Param:  # what shard_tensor reads of a parameter
        def __init__(self, shape, pdim):
            self.shape, self.tensor_model_parallel, self.partition_dim = shape, pdim is not None, pdim

        def size(self, dim):
            return self.shape[dim]

    for _ in range(300):
        tp = rng.choice([1, 2, 4])
        pdim = rng.choice([None, 0, 1]) if tp > 1 else None
        rows, cols = rng.randint(tp, 11), tp * rng.randint(1, 4)
        full = torch.arange(rows * cols, dtype=torch.float32).view(rows, cols)
        shard_shape = [rows, cols]
        if pdim is not None:
            shard_shape[pdim] = -(-shard_shape[pdim] // tp)
        seen = torch.zeros(rows, cols)
        for t in range(tp):
            shard = shard_tensor(full, Param(shard_shape, pdim), t, tp).reshape(-1)
            cuts = sorted(rng.sample(range(1, shard.numel()), min(3, shard.numel() - 1)))
            for start, end in zip([0, *cuts], [*cuts, shard.numel()]):  # runs as ZeRO partitions cut them
                for r in regions(tuple(shard_shape), pdim, t, (rows, cols), start, end - start):
                    assert torch.equal(r.of(shard[start:end]), full[r.row:r.row + r.rows, r.col:r.col + r.cols])
                    if pdim is not None or t == 0:
                        seen[r.row:r.row + r.rows, r.col:r.col + r.cols] += 1
        assert torch.all(seen == 1), (rows, cols, tp, pdim)


# ---- one launch: train, save, resume under three other layouts, save again ----

def _config(**layout):
    from megachat.train_config import TrainConfig
    return TrainConfig(depth=4, vocab_size=VOCAB, seq_len=SEQ, device_batch_size=2, total_batch_size=4 * SEQ,
                       num_iterations=4, n_kv_head=1, **{"dtype": "bf16", "zero": 1, **layout})


def _batches(trainer, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, VOCAB, (trainer.cfg.global_batch, SEQ + 1), generator=g)
    mine = x.chunk(trainer.grid.dp)[trainer.grid.dp_rank]
    return [(mb[:, :-1], mb[:, 1:]) for mb in mine.split(trainer.cfg.device_batch_size)]


def _worker(rank, out):
    import torch.distributed as dist

    from megachat import sharded
    from megachat.build import build_trainer
    run = os.path.join(out, "run")
    first = build_trainer(_config(), run)  # dp2, bf16, ZeRO-1
    losses = [first.train_step(_batches(first, step))["loss"] for step in range(2)]
    first.save(2)
    first.save_weights(run)
    for name, layout in (("tp2", {"tp": 2}), ("zero3", {"zero": 3}), ("zero0_fp32", {"zero": 0, "dtype": "fp32"})):
        again = build_trainer(_config(**layout), run, resume=True)  # another layout: reads its slices
        sharded.save(os.path.join(out, name), again.ds_engine, again.cfg.model_config(), again.step, again.layout,
                     optimizer=True)
        dist.barrier()
    return {"losses": losses}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The launch's directory: run/ (checkpoints/step_000002, model/), tp2/, zero3/, zero0_fp32/."""
    from _dist import run_gloo
    out = tmp_path_factory.mktemp("sharded")
    results = run_gloo(_worker, 2, str(out), timeout_s=240)
    assert all(0 < loss < 10 for loss in results[0]["losses"])
    return out


def _state(saved):
    return ShardedState(str(saved / "run" / "checkpoints" / "step_000002" / "state"))


def test_a_bf16_run_resumed_under_another_layout_gets_the_fp32_master_weights_bit_for_bit(saved):
    state = _state(saved)
    assert state.layout == {"tp": 1, "pp": 1, "dp": 2, "zero": 1} and state.step == 2
    rounded = 0
    for name in state.tensors:
        master = state.full(name)
        rounded += int((master.bfloat16().float() != master).sum())
        for again in ("tp2", "zero3", "zero0_fp32"):
            assert torch.equal(ShardedState(str(saved / again)).full(name), master), (again, name)
    assert rounded > 1000  # the master copy is not the bf16 weights: a resume from those would differ here


def test_optimizer_state_and_step_move_exactly_to_every_layout(saved):
    state = _state(saved)
    moved = set()
    for again in ("tp2", "zero3", "zero0_fp32"):
        other = ShardedState(str(saved / again))
        assert other.step == 2
        for name, entry in state.tensors.items():
            assert sorted(entry["states"]) == sorted(other.tensors[name]["states"])
            for key in entry["states"]:
                got, want = other.full(name, key), state.full(name, key)
                assert torch.equal(got, want), (again, name, key)
                moved |= {key} if want.abs().sum() > 0 else set()
    assert moved == {"weight", "momentum_buffer", "exp_avg", "exp_avg_sq"}  # two steps left state behind


def test_every_rank_writes_its_own_share_balanced(saved):
    for directory in (saved / "run" / "checkpoints" / "step_000002" / "state", saved / "run" / "model",
                      saved / "zero0_fp32", saved / "zero3"):
        index = json.loads((directory / "index.json").read_text())
        sizes = [f["bytes"] for f in index["files"].values()]
        assert len(sizes) == 2 and max(sizes) / (sum(sizes) / 2) <= 1.25, (directory, sizes)
        assert sorted(p.name for p in directory.iterdir()) == ["index.json", "rank-00000.safetensors",
                                                               "rank-00001.safetensors"]
    final = ShardedState(str(saved / "run" / "model"))  # the final weights: weights only
    assert {k for t in final.tensors.values() for k in t["states"]} == {"weight"}
    assert sorted(p.name for p in (saved / "run" / "checkpoints" / "step_000002").iterdir()) == ["megachat.json",
                                                                                               "state"]


def test_regions_of_a_state_read_back_what_was_written(saved):
    state = _state(saved)
    name = "transformer.h.1.mlp.c_proj.weight"
    full = state.full(name)
    out = torch.empty(3, 5)
    state.read(name, "weight", [(Region(7, 100, 3, 5), out)])  # a rectangle across the ranks' runs
    assert torch.equal(out, full[7:10, 100:105])


@pytest.mark.parametrize("how", ["flip", "truncate", "index"])
def test_verify_names_a_damaged_file_of_the_sharded_state(saved, tmp_path, how):
    from megachat import checkpoint
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(saved / "run" / "checkpoints", ckpts)
    bad = ckpts / "step_000002" / "state" / "rank-00001.safetensors"
    data = bytearray(bad.read_bytes())
    if how == "flip":  # one bit of a weight: safetensors itself would read it without a word
        data[len(data) // 2] ^= 0x10
        bad.write_bytes(bytes(data))
        message = f"{bad}: its bytes fail the CRC-32 the index records"
    elif how == "truncate":
        bad.write_bytes(bytes(data[:len(data) // 2]))
        message = f"{bad}: {len(data) // 2} bytes, the index records {len(data)}"
    else:
        (bad.parent / "index.json").unlink()
        message = "index.json is missing"
    with pytest.raises(RuntimeError, match="is damaged: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        checkpoint.verify(str(ckpts), "step_000002")


def _logits(weights):
    from megachat.model import GPTConfig, build_model
    config = GPTConfig(**_state_config())
    model = build_model(config, weights=weights).eval()
    idx = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(idx)


def _state_config():
    return _config().model_config().__dict__


def test_exports_read_back_into_the_same_logits_and_through_init_from(saved, tmp_path):
    import importlib.util

    from megachat.checkpoint import load_init, load_weights
    spec = importlib.util.spec_from_file_location("export_checkpoint", ROOT / "tools" / "export_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    want = ShardedState(str(saved / "run" / "model")).weights()
    reference = _logits(want)

    path = tool.main([str(saved / "run"), "--format", "safetensors", "--output", str(tmp_path / "m.safetensors")])
    assert path == str(tmp_path / "m.safetensors")
    got = load_weights(path)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(_logits(got), reference)
    weights, run_cfg = load_init(path)
    assert run_cfg == {"model": _state_config()} and all(torch.equal(weights[k], want[k]) for k in want)

    path = tool.main([str(saved / "run" / "checkpoints" / "step_000002"), "--format", "nanochat",
                      "--output", str(tmp_path / "nanochat")])
    assert Path(path).name == "model_000002.pt"
    assert zipfile.ZipFile(path).testzip() is None  # every record's CRC-32 as torch.save writes it
    sd = torch.load(path, map_location="cpu", weights_only=True)  # as nanochat's checkpoint_manager loads it
    assert list(sd) == list(want) and all(torch.equal(sd[k], want[k]) for k in want)
    torch.save(want, tmp_path / "ref.pt")  # the same pickle torch.save writes
    pickles = [next(z.read(n) for n in z.namelist() if n.endswith("/data.pkl"))
               for z in map(zipfile.ZipFile, (path, tmp_path / "ref.pt"))]
    assert pickles[0] == pickles[1]
    meta = json.loads((tmp_path / "nanochat" / "meta_000002.json").read_text())
    assert meta["step"] == 2 and meta["model_config"] == _state_config()
    weights, run_cfg = load_init(str(tmp_path / "nanochat"))
    assert run_cfg == {"model": _state_config()} and torch.equal(_logits(weights), reference)


def test_export_tool_refuses_a_directory_without_sharded_weights(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export_checkpoint.py"), str(tmp_path),
                           "--format", "safetensors", "--output", str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"export_checkpoint.py: error: {tmp_path} holds no sharded state" in proc.stderr
