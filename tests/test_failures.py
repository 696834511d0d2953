"""What a job does when things fail, with the real deepspeed launcher on CPU (2 gloo ranks): a rank killed with
SIGKILL or stopped with SIGSTOP ends every rank and the launcher within the bound, rank 0 names the lost rank, its
host, the step and the checkpoint to resume from, a stall leaves the live ranks' stacks in RUN_DIR/hang/, and
`--resume auto` then continues the uninterrupted loss curve bit for bit. One chain of launches: an uninterrupted
reference; a run whose rank 1 is killed; its resume, whose rank 1 is stopped; the resume that finishes. Also a disk
that fills up and damaged shards. The jobs without steps (evaluation, the chat server): test_failures_jobs.py.
"""
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from _dist import free_port
from test_train import TINY, corpus, curve, train  # noqa: F401 (corpus: the module's fixture)

from test_disk_full import mounts, pages  # noqa: F401 (mounts: the fixture)

from megachat.data import check_shards
from megachat.watchdog import JUDGE_S, MIN_LIMIT_S, SLOW_LIMIT_S, step_limit

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
TIMEOUT = 20  # --collective-timeout: short, so a stall costs seconds
LAUNCHER_GRACE = 30  # the deepspeed launcher's SIGTERM -> SIGKILL wait for the ranks left (launch.py)
ARGS = [*TINY[:TINY.index("--num-iterations")], "--num-iterations", str(STEPS),
        *TINY[TINY.index("--num-iterations") + 2:], "--sample-tokens", "0", "--save-every", "2",
        "--collective-timeout", str(TIMEOUT)]


class Launch:
    """scripts/SCRIPT under `deepspeed --num_gpus 2`, its output read line by line as it comes."""

    def __init__(self, script: str, *args: str):
        self.script = script
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(ROOT / "scripts" / script), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines, self.text = queue.Queue(), []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.text.append(line)
            self.lines.put(line)

    def wait_for_step(self, step: int, timeout: float = 240) -> None:
        self.wait_for(lambda line: (m := re.match(r"step\s+(\d+)/", line)) and int(m.group(1)) >= step, timeout,
                      f"step {step}")

    def wait_for(self, found, timeout: float, what: str) -> str:
        """The first line from now on for which found(line) is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.reader.is_alive(), "".join(self.text)[-6000:]  # the output ended
                continue
            if found(line):
                return line
        raise AssertionError(f"no {what} in {timeout} s:\n" + "".join(self.text)[-6000:])

    def rank_pid(self, rank: int) -> int:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if self.script in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                    return child.pid
            except psutil.Error:
                pass
        raise AssertionError(f"no rank {rank} among the launcher's processes")

    def wait(self, timeout: float) -> tuple[int, str]:
        """(the launcher's exit status, all output); fails after `timeout` seconds."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the job still ran {timeout} s later:\n" + "".join(self.text)[-6000:]) from None
        time.sleep(0.2)  # the reader thread takes the last lines
        return rc, "".join(self.text)

    def kill(self):
        for child in psutil.Process(self.proc.pid).children(recursive=True) + [psutil.Process(self.proc.pid)]:
            try:
                child.send_signal(signal.SIGCONT)
                child.kill()
            except psutil.Error:
                pass


def base_train(corpus, out: Path, *args: str) -> Launch:
    return Launch("base_train.py", "--data", corpus["train"], "--tokenizer", corpus["tokenizer"], "--out", str(out),
                  *ARGS, *args)


def latest(run: Path) -> str:
    return str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip())


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(corpus, out, 2, *ARGS)
    return out


@pytest.fixture(scope="module")
def chain(corpus, tmp_path_factory):
    return {"run": tmp_path_factory.mktemp("interrupted")}


def test_a_dead_rank_ends_the_job_in_seconds_naming_it(corpus, chain):
    run = chain["run"]
    job = base_train(corpus, run)
    job.wait_for_step(3)
    victim = job.rank_pid(1)
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    rc, out = job.wait(timeout=120)
    elapsed = time.monotonic() - t0
    assert rc != 0
    assert elapsed <= JUDGE_S + LAUNCHER_GRACE, f"{elapsed:.1f} s after the kill"
    messages = [line for line in out.splitlines() if line.startswith("megachat watchdog:")]
    assert len(messages) == 1, out[-6000:]
    assert re.search(rf"lost rank 1 on host {re.escape(socket.gethostname())} \(pid {victim}, dead\), during step "
                     rf"\d+: a collective failed", messages[0]), messages[0]
    assert f"resume from the newest intact checkpoint {latest(run)} with --resume auto" in messages[0]
    # the metrics of every step the ranks finished survive the crash (flushed each step)
    printed = [int(m.group(1)) for m in re.finditer(r"^step\s+(\d+)/", out, re.M)]
    assert sorted(curve(run)) == list(range(1, max(printed) + 1))
    chain["dead_after"] = elapsed


def test_a_stalled_rank_ends_the_job_with_the_live_ranks_stacks(corpus, chain):
    run = chain["run"]
    if "dead_after" not in chain:
        pytest.skip("continues the run of test_a_dead_rank_ends_the_job_in_seconds_naming_it")
    job = base_train(corpus, run, "--resume", "auto")
    done = int(Path(latest(run)).name.split("_")[1])
    job.wait_for_step(done + 2)
    victim = job.rank_pid(1)
    os.kill(victim, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        rc, out = job.wait(timeout=TIMEOUT + 120)
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elapsed = time.monotonic() - t0
    assert rc != 0
    # the limit counts from the last step's start; then the judgement and the launcher's grace for the stopped rank
    assert elapsed <= TIMEOUT + 2 + JUDGE_S + LAUNCHER_GRACE + 10, f"{elapsed:.1f} s after the stop"
    assert f"start at step {done}" in out
    messages = [line for line in out.splitlines() if line.startswith("megachat watchdog:")]
    assert len(messages) == 1, out[-6000:]
    assert re.search(rf"lost rank 1 on host {re.escape(socket.gethostname())} \(pid {victim}, stopped \(SIGSTOP or "
                     rf"a debugger\)\), during step \d+: step \d+ has not finished in {TIMEOUT} s", messages[0]), \
        messages[0]
    assert f"resume from the newest intact checkpoint {latest(run)} with --resume auto" in messages[0]
    assert f"stacks are in {run / 'hang'}/" in messages[0]
    stacks = (run / "hang" / "rank-00000.txt").read_text()
    assert "has not finished in 20 s; the stacks of every thread" in stacks
    assert re.search(r'File ".*trainer\.py", line \d+ in (train_step|fit|_stop_requested)', stacks), stacks


def test_resume_auto_after_the_failures_continues_the_uninterrupted_curve_bitwise(corpus, chain, reference):
    run = chain["run"]
    if "dead_after" not in chain:
        pytest.skip("continues the run of the two tests above")
    train(corpus, run, 2, *ARGS, "--resume", "auto")
    assert curve(run) == curve(reference)  # every step's loss, bit for bit, across two failures and three launches


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs (a disk that fills up) needs root")
def test_a_run_whose_disk_fills_up_stops_naming_it_and_resumes_bitwise(corpus, reference, tmp_path, mounts):
    # room for one checkpoint and a half: the one at step 2 is written, the one at step 4 meets a full disk
    ckpts = reference / "checkpoints"
    one = sum(pages(p) for p in (ckpts / "step_000008").rglob("*") if p.is_file())
    rest = sum(pages(p) for p in ckpts.iterdir() if p.is_file())
    run = tmp_path / "run"
    mount = mounts(run / "checkpoints", f"{(rest + one * 3 // 2) // 1024}k")
    proc = train(corpus, run, 2, *ARGS, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if "base_train.py: error:" in line]
    assert len(errors) == 1, proc.stdout[-6000:]  # every rank stops with the same message, printed once
    # refused before writing (the previous checkpoint's size does not fit), or by the write that met the full disk
    assert re.search(rf"checkpoint {re.escape(str(mount / 'step_000004'))} was not written: .*cannot write "
                     rf"{re.escape(str(mount / 'step_000004'))}\S* \([^)]+\): it needs [\d,]+ bytes, "
                     rf"[\d,]+ bytes are free on its filesystem.*; {re.escape(str(mount / 'latest'))} still names "
                     rf"step_000002, intact: free space \(or fix the storage\) and continue with --resume auto",
                     errors[0]), errors[0]
    assert (mount / "latest").read_text() == "step_000002" and not (mount / "step_000004").exists()
    assert sorted(curve(run)) == [1, 2, 3, 4]  # the records of the steps done
    subprocess.run(["mount", "-o", "remount,size=1g", str(mount)], check=True)  # space again
    train(corpus, run, 2, *ARGS, "--resume", "auto")
    assert curve(run) == curve(reference)


def test_damaged_or_changed_shards_are_refused_before_the_first_step(corpus, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for ext in ("bin", "idx"):
        shutil.copy(f"{corpus['train']}.{ext}", data / f"train.{ext}")
    prefix, run = str(data / "train"), tmp_path / "run"
    one = [a for a in ARGS if a not in ("--collective-timeout", str(TIMEOUT))]

    def base_train(*args):
        return train({**corpus, "train": prefix}, run, 1, *one, *args, check=False)

    proc = base_train("--num-iterations", "4")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert json.loads((run / "data.json").read_text())[prefix]["bin"]["bytes"] == os.path.getsize(prefix + ".bin")
    tokens = np.fromfile(prefix + ".bin", np.uint16)
    refusals = [
        # the same size, other tokens (a shard made again from other text): a resume would read other samples
        (lambda: tokens[::-1].tofile(prefix + ".bin"), rf"{prefix}\.bin changed since the run started"),
        (lambda: tokens[:-7].tofile(prefix + ".bin"), rf"{prefix}\.bin has \d+ bytes but {prefix}\.idx needs"),
        (lambda: np.where(np.arange(tokens.size) == 3, 60000, tokens).astype(np.uint16).tofile(prefix + ".bin"),
         rf"{prefix}\.bin: token id 60000 near byte 0 is outside the tokenizer's 512 ids"),
    ]
    for damage, message in refusals:
        damage()
        proc = base_train("--resume", "auto", "--num-iterations", "4")
        assert proc.returncode == 2 and re.search(message, proc.stdout), proc.stdout[-3000:]
        assert not re.search(r"^step\s+\d+/", proc.stdout, re.M)  # refused before any step
    tokens.tofile(prefix + ".bin")  # the original bytes (with a new mtime, as a copy has) pass again
    check_shards(str(run), [prefix], resumed=True, vocab_size=512)


def test_the_limit_is_sized_from_the_measured_steps():
    assert step_limit([], 20) == step_limit([30.0, 9.0, 9.0], 20) == 20  # --collective-timeout wins
    assert step_limit([]) == step_limit([100.0, 1.0]) == SLOW_LIMIT_S  # the first steps are warm-up
    assert step_limit([100.0, 1.0, 1.0, 1.2]) == MIN_LIMIT_S  # 1 s steps: the floor
    assert step_limit([100.0, 10.0, 9.0, 12.0]) == 120.0  # 10 x the slowest measured step
