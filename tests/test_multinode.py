"""Multi-node launches of scripts/base_train.py, on one CPU box (gloo, fp32, tiny model as in tests/test_train.py):
two "nodes" of 2 processes, each started by DeepSpeed's per-node launcher (`python -m deepspeed.launcher.launch
--world_info ... --node_rank R`, what `deepspeed --hostfile` runs on every host), form one 4-rank world whose
tp 2 x dp 2 loss curve equals that of 4 processes on one node: the tp groups {0, 1} and {2, 3} stay inside a node,
the dp groups {0, 2} and {1, 3} and the optimizer's all_to_all (ZeRO-1) cross between the nodes. And
scripts/slurm_train.sbatch, with stand-ins for srun and scontrol, starts torchrun (which passes no --local_rank) on
two "nodes" of one process each, to the same curve.
"""
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _dist import free_port
from test_train import assert_same_curve, curve

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "base_train.py")
BIN = Path(sys.executable).parent
STEPS = 4
# depth 4 (256 wide, 2 heads for tp 2); 256 tokens per step = 8 sequences of 32: at dp 2 each rank accumulates 2
# micro-batches of 2
TINY = ["--depth", "4", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "256",
        "--num-iterations", str(STEPS), "--sample-tokens", "0", "--dtype", "fp32", "--zero", "1", "--tp", "2",
        "--ns-dtype", "fp32"]
TIMEOUT = 240  # seconds per launch; one took 20-60 s on the shared 2-core box


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, texts, tok):
    """conftest's 512-id tokenizer, saved, and one training shard of its texts."""
    from megachat.data import IndexedDatasetWriter, dtype_for_vocab
    out = tmp_path_factory.mktemp("corpus")
    tok.save(str(out / "tokenizer"))
    with IndexedDatasetWriter(str(out / "train"), dtype_for_vocab(tok.vocab_size)) as w:
        for d in texts:
            w.add_document(tok.encode(d, prepend=tok.bos_id))
    return ["--data", str(out / "train"), "--tokenizer", str(out / "tokenizer")]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process below it, also those in a session of their own (torchrun's ranks)."""
    import psutil
    try:
        top = psutil.Process(proc.pid)
        tree = [top, *top.children(recursive=True)]  # the whole tree first: a killed parent's children lose it
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def run_together(cmds: list[list[str]], logs: list[Path], timeout: int = TIMEOUT,
                 env: dict | None = None) -> list[str]:
    """Start every command at once and wait for all; returns their outputs (stdout and stderr).

    When one fails or the time runs out, every launcher still running is killed with all of its ranks (a rank
    that dies leaves the others waiting in a collective), and the test fails with each command's output."""
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        for cmd, log in zip(cmds, logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:  # also when pytest-timeout or Ctrl-C interrupts the wait
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
    outputs = [log.read_text() for log in logs]
    if any(p.returncode != 0 for p in procs):
        report = "\n".join(f"$ {' '.join(c)}\nexit {p.returncode}\n{out[-4000:]}"
                           for c, p, out in zip(cmds, procs, outputs))
        raise AssertionError(f"a launch failed or ran past {timeout} s:\n{report}")
    return outputs


@pytest.fixture(scope="module")
def one_node(corpus, tmp_path_factory):
    """deepspeed --num_gpus 4, tp 2 x dp 2: the curve the two nodes must reproduce."""
    out = tmp_path_factory.mktemp("one_node")
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "4", "--master_port", str(free_port()), SCRIPT, *corpus, *TINY,
           "--out", str(out / "run")]
    run_together([cmd], [out / "launch.log"])
    return out / "run"


def world_info(nodes: dict) -> str:
    """The launcher's --world_info: {host: [device ids]} as JSON, base64url-encoded (what launch.py decodes)."""
    return base64.urlsafe_b64encode(json.dumps(nodes).encode()).decode()


@pytest.mark.timeout(2 * TIMEOUT + 60)
def test_two_nodes_of_two_processes_match_one_node_of_four(corpus, one_node, tmp_path):
    info, port, out = world_info({"nodeA": [0, 1], "nodeB": [0, 1]}), free_port(), tmp_path / "run"
    cmds = [[sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={info}", f"--node_rank={node}",
             "--master_addr=127.0.0.1", f"--master_port={port}", SCRIPT, *corpus, *TINY, "--out", str(out)]
            for node in (0, 1)]
    node_a, node_b = run_together(cmds, [tmp_path / "node_a.log", tmp_path / "node_b.log"])
    # node B holds global ranks 2 and 3 (LOCAL_RANK 0 and 1): it joined node A's world and writes nothing itself
    assert "'nodeB': [2, 3]" in node_b, node_b[-3000:]
    assert "tp 2 x pp 1 x dp 2" in node_a and "megachat base_train" not in node_b
    assert "step      1/" in node_a and "step      1/" not in node_b
    config = json.loads((out / "config.json").read_text())
    assert (config["world"], config["dp"]) == (4, 2)
    assert_same_curve(curve(out), curve(one_node), steps=range(1, STEPS + 1))
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:06d}"


# Stand-ins for SLURM's commands, enough for scripts/slurm_train.sbatch on one box: srun starts its command once per
# "node" with that node's SLURM_NODEID; scontrol names the nodes 127.0.0.1 and records a requeue.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case $1 in
  show) for _ in $(seq "$SLURM_JOB_NUM_NODES"); do echo 127.0.0.1; done ;;
  requeue) echo "$2" >> "$(dirname "$0")/requeued" ;;
esac
"""


@pytest.mark.timeout(2 * TIMEOUT + 60)
def test_slurm_script_runs_torchrun_on_two_nodes_to_the_same_curve(corpus, one_node, tmp_path):
    # scripts/slurm_train.sbatch as SLURM would run it on 2 nodes of 1 "GPU": torchrun per node (it passes no
    # --local_rank), node ranks from SLURM_NODEID; dp 2 here, so the curve also equals tp2 x dp2's
    bin_dir, out = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{BIN}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2", "GPUS_PER_NODE": "1",
           "MASTER_PORT": str(free_port())}
    cmd = ["bash", str(ROOT / "scripts" / "slurm_train.sbatch"), *corpus, *TINY, "--tp", "1", "--out", str(out)]
    (log,) = run_together([cmd], [tmp_path / "slurm.log"], env=env)
    assert "2 nodes x 1, master 127.0.0.1" in log and "fresh start" in log
    assert "tp 1 x pp 1 x dp 2" in log
    assert_same_curve(curve(out), curve(one_node), steps=range(1, STEPS + 1))
    assert (out / "model" / "index.json").exists() and not (bin_dir / "requeued").exists()  # finished: no requeue
