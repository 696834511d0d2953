"""A full disk loses nothing, on a real filesystem that fills up (a tmpfs, mounted as root): a checkpoint that cannot
be written, faulted at its first shard, its index, its megachat.json and `latest`, never becomes `latest`, leaves the
previous one intact and resumable, and stops every rank with one message naming the path, the bytes needed and free;
the final weights, metrics.jsonl, the TensorBoard events and tools/export_checkpoint.py never let a partial file
replace a whole one (TensorBoard reads every earlier record). The checkpoint faults run in one 2-rank gloo world
(tests/_dist.py) around a depth-1 trainer.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _dist import run_gloo
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megachat.monitor import EventFile

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096  # tmpfs allocates whole pages

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs (a disk that fills up) needs root")


@pytest.fixture
def mounts(tmp_path):
    """mount(path, size): a tmpfs of `size` at path, unmounted after the test."""
    done = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        done.append(path)
        return path

    yield mount
    for path in reversed(done):
        subprocess.run(["umount", str(path)], check=False)


def free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def pages(path) -> int:
    return -(-os.path.getsize(path) // PAGE) * PAGE


def fill(mount: Path, leave: int) -> Path:
    """A ballast file that leaves `leave` bytes (whole pages) free on the tmpfs at `mount`."""
    ballast = mount / "ballast"
    with open(ballast, "ab") as f:
        f.write(b"\0" * (free(mount) - leave))
    assert free(mount) == leave
    return ballast


def _faults(rank, run_dir):
    from megachat import checkpoint
    from megachat.build import build_trainer
    from megachat.parallel import without_deepspeed_shm_allreduce
    from megachat.train_config import TrainConfig
    without_deepspeed_shm_allreduce()
    cfg = TrainConfig(depth=1, vocab_size=512, seq_len=16, device_batch_size=2, total_batch_size=64,
                      num_iterations=4, zero=1, dtype="fp32")
    trainer = build_trainer(cfg, run_dir)
    g = torch.Generator().manual_seed(rank)
    trainer.train_step([(torch.randint(0, 512, (2, 16), generator=g), torch.randint(0, 512, (2, 16), generator=g))])
    ckpts = Path(run_dir) / "checkpoints"
    trainer.save(1)
    # what a checkpoint writes, in order: every rank's shard of the state, the index, megachat.json, then `latest`
    tag = ckpts / "step_000001"
    shards = sorted((tag / "state").glob("rank-*.safetensors"))
    before_state = sum(pages(p) for p in tag.rglob("*") if p.is_file() and "state" not in p.parts
                       and p.name != "megachat.json")
    points = {"the first shard": before_state + PAGE,  # less than either rank's shard
              "the index": before_state + sum(pages(p) for p in shards),
              "megachat.json": before_state + sum(pages(p) for p in shards) + pages(tag / "state" / "index.json"),
              "latest": sum(pages(p) for p in tag.rglob("*") if p.is_file())}
    assert min(pages(p) for p in shards) > PAGE
    seen = {}
    for point, leave in points.items():
        if rank == 0:
            ballast = fill(ckpts, leave)
        dist.barrier()
        with pytest.raises(OSError) as error:  # past the check of the space (judged by the previous checkpoint)
            checkpoint.save(trainer.ds_engine, str(ckpts), 2, {"step": 2, "consumed_samples": 2 * cfg.global_batch,
                                                               "layout": trainer.layout, "config": cfg.to_json()},
                            cfg.model_config(), keep=3, check_space=False)
        seen[point] = str(error.value)
        if rank == 0:
            ballast.unlink()
        dist.barrier()
        assert checkpoint.latest_tag(str(ckpts)) == "step_000001"
        assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000001"], point  # the failed one removed
        assert not list(ckpts.rglob("*.tmp*")) and not list(ckpts.rglob("*.new")), point
        dist.barrier()  # every rank has looked before the next fault
    checkpoint.verify(str(ckpts), "step_000001")  # the previous checkpoint is whole
    trainer.save(2)  # with space again, the next save succeeds
    assert checkpoint.latest_tag(str(ckpts)) == "step_000002"
    # the final weights: a complete model/ stays until the new one is complete
    trainer.save_weights(run_dir)
    model = Path(run_dir) / "model"
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    if rank == 0:
        ballast = fill(Path(run_dir), PAGE)
    dist.barrier()
    with pytest.raises(OSError) as error:
        trainer.save_weights(run_dir)
    seen["the final weights"] = str(error.value)
    if rank == 0:
        ballast.unlink()
    dist.barrier()
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert sorted(p.name for p in Path(run_dir).iterdir() if p.name.startswith("model")) == ["model"]
    dist.barrier()  # every rank has looked before the next save makes model.new again
    trainer.save_weights(run_dir)
    assert checkpoint.sharded_state(str(model)).damage() is None
    assert sorted(p.name for p in Path(run_dir).iterdir() if p.name.startswith("model")) == ["model"]
    return seen


def test_a_checkpoint_that_meets_a_full_disk_never_becomes_latest(tmp_path, mounts):
    run = mounts(tmp_path / "run", "16m")
    mounts(run / "checkpoints", "8m")
    seen = run_gloo(_faults, 2, str(run), timeout_s=300)  # generous: a loaded box
    assert seen[0] == seen[1]  # every rank stops with the same message
    ckpts = run / "checkpoints"
    bytes_ = r"it needs [\d,]+ bytes, [\d,]+ bytes are free on its filesystem"
    tag = re.escape(str(ckpts / "step_000002"))
    expect = {"the first shard": rf"{tag}/state(\.new)?/rank-0000[01]\.safetensors \(No space left on device\): "
                                 rf"{bytes_}",
              "the index": rf"{tag}/state/index\.json \(No space left on device\): {bytes_}",
              "megachat.json": rf"{tag}/megachat\.json \(No space left on device\): {bytes_}",
              "latest": rf"{re.escape(str(ckpts / 'latest'))} \(No space left on device\): {bytes_}"}
    for point, pattern in expect.items():
        message = seen[0][point]
        assert re.search(rf"^\[Errno 28\] checkpoint {tag} was not written: ", message) or \
            message.startswith(f"checkpoint {ckpts / 'step_000002'} was not written: "), (point, message)
        assert re.search(f"cannot write {pattern}", message), (point, message)
        assert message.endswith(f"{ckpts / 'latest'} still names step_000001, intact: free space (or fix the storage) "
                                f"and continue with --resume auto"), (point, message)
    assert re.search(rf"cannot write {re.escape(str(run / 'model.new'))}/rank-0000[01]\.safetensors \(No space left "
                     rf"on device\): {bytes_}", seen[0]["the final weights"]), seen[0]["the final weights"]


def test_a_shard_that_fails_to_write_is_removed_without_raising_again(tmp_path, mounts):
    """A rank whose shard meets the full disk must still reach the collective that tells the others (else they wait
    in it until the timeout): aborting the writer never raises, whether the bytes failed on the way (a tensor
    larger than the file's buffer) or only when closing flushed them (a small one)."""
    from megachat.sharded import SafetensorsWriter
    disk = mounts(tmp_path / "disk", "64k")
    fill(disk, 0)
    for numel in (16, 1 << 16):
        path = disk / f"rank-{numel}.safetensors"
        writer = SafetensorsWriter(str(path), {"w": (torch.float32, (numel,))})
        with pytest.raises(OSError, match="No space left on device"):
            writer.write("w", torch.ones(numel))
            writer.close()
        writer.abort()
        assert not path.exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # TensorBoard's writer thread
def test_metrics_and_exports_on_a_full_disk_keep_their_whole_files(tmp_path, mounts, texts):
    from megachat.monitor import Monitor
    disk = mounts(tmp_path / "disk", "1m")
    monitor = Monitor(str(disk / "run"), enabled=True)
    monitor.log(1, loss=1.0)
    ballast = fill(disk, 0)
    with pytest.raises(OSError, match=rf"cannot write {re.escape(str(disk / 'run' / 'metrics.jsonl'))} .*it needs "
                                      r"\d+ bytes, 0 bytes are free"):
        for step in range(2, 1000):  # the first line that needs a new page fails, and is cut off again
            monitor.log(step, loss=1.0, note="x" * 200)
    lines = (disk / "run" / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(line)["step"] for line in lines] == list(range(1, len(lines) + 1))
    assert all(line.endswith("\n") for line in lines)
    ballast.unlink()
    monitor.log(len(lines) + 1, loss=1.0)  # with space again, the next record is whole too
    monitor.close()
    assert json.loads((disk / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == len(lines) + 1
    # TensorBoard: a step's records that meet the full disk are cut off again, and TensorBoard reads every earlier one
    events = EventFile(str(disk / "tensorboard"))
    events.add(1, {"loss": 1.0})
    ballast = fill(disk, 0)
    with pytest.raises(OSError, match=rf"cannot write {re.escape(str(disk / 'tensorboard'))}/events\.out\.tfevents\."
                                      r"\S+ \(No space left on device\): it needs \d+ bytes, 0 bytes are free"):
        for step in range(2, 1000):
            events.add(step, {"loss": 1.0, "lr": 0.5})
    ballast.unlink()
    events.add(step + 1, {"loss": 1.0})  # with space again, in a new event file
    events.close()
    tensorboard = EventAccumulator(str(disk / "tensorboard"))
    tensorboard.Reload()
    assert [e.step for e in tensorboard.Scalars("loss")] == [*range(1, step), step + 1]
    assert [e.step for e in tensorboard.Scalars("lr")] == list(range(2, step))
    # tools/export_checkpoint.py over a whole exported file: the file stays, no temp file is left
    state = _weights(tmp_path / "weights")
    out = disk / "model.safetensors"
    cmd = [sys.executable, str(ROOT / "tools" / "export_checkpoint.py"), str(state), "--format", "safetensors",
           "--output", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    whole = out.read_bytes()
    fill(disk, PAGE)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and re.search(rf"cannot write {re.escape(str(out))} \(No space left on device\): it "
                                              rf"needs [\d,]+ bytes, 4,096 bytes are free", proc.stderr), proc.stderr
    assert out.read_bytes() == whole and sorted(p.name for p in disk.iterdir()) == ["ballast", "model.safetensors",
                                                                                  "run", "tensorboard"]


def _weights(directory: Path) -> Path:
    """A depth-1 model's final weights as a sharded state (what RUN_DIR/model/ holds), written by one rank."""
    run_gloo(_write_weights, 1, str(directory), timeout_s=120)
    return directory / "model"


def _write_weights(rank, run_dir):
    from megachat.build import build_trainer
    from megachat.parallel import without_deepspeed_shm_allreduce
    from megachat.train_config import TrainConfig
    without_deepspeed_shm_allreduce()
    cfg = TrainConfig(depth=1, vocab_size=512, seq_len=16, device_batch_size=2, total_batch_size=32,
                      num_iterations=4, zero=0, dtype="fp32")
    build_trainer(cfg, run_dir).save_weights(run_dir)
