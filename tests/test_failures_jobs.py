"""A lost rank in the jobs without steps, under the real deepspeed launcher on CPU (2 gloo ranks): a stalled rank of
base_eval (chat_eval runs the same code) or of the chat server under tp, and a killed follower of the chat server, end
every rank and the launcher within the bound, and the first live rank names the lost one. test_failures.py: the same
for training.
"""
import json
import os
import re
import signal
import socket
import time

import httpx
import pytest
from _dist import free_port
from test_chat_web import HELLO, run_dir  # noqa: F401 (run_dir: the module's fixture, a tiny random-weights run)
from test_failures import LAUNCHER_GRACE, Launch

from megachat.watchdog import JUDGE_S

SHORT = 3  # --collective-timeout of the jobs below: their bound, as they have no step limit
SLACK = 15  # a loaded box: the survivor's wake-up, the server's shutdown, the message


def stop_rank(job: Launch, rank: int) -> int:
    victim = job.rank_pid(rank)
    os.kill(victim, signal.SIGSTOP)
    return victim


def ended_naming(job: Launch, victim: int, rank: int, during: str, since: float, bound: float) -> str:
    """The one watchdog message, printed within `bound` seconds of `since`, naming the stopped `rank`; then the
    stopped rank is killed (the launcher would, 30 s later: test_a_stalled_rank_ends_the_job_with_the_live_ranks_stacks)
    and the launcher exits non-zero."""
    try:
        message = job.wait_for(lambda line: line.startswith("megachat watchdog:"), bound + 60, "watchdog message")
        elapsed = time.monotonic() - since
    finally:
        os.kill(victim, signal.SIGCONT)
        os.kill(victim, signal.SIGKILL)
    rc, out = job.wait(timeout=60)
    assert rc != 0
    assert elapsed <= bound, f"{elapsed:.1f} s after the stop"
    assert len([line for line in out.splitlines() if line.startswith("megachat watchdog:")]) == 1, out[-6000:]
    assert re.search(rf"lost rank {rank} on host {re.escape(socket.gethostname())} \(pid {victim}, stopped \(SIGSTOP "
                     rf"or a debugger\)\), during {during}: a collective failed \(.+\); every rank stops now; start "
                     rf"{during} again; the live ranks' tracebacks are in .*/hang/$", message.strip()), message
    return out


def test_a_stalled_rank_ends_base_eval_naming_it(run_dir):  # noqa: F811
    job = Launch("base_eval.py", "--run", str(run_dir), "--tp", "2", "--eval", "sample", "--collective-timeout",
                 str(SHORT))
    beat = run_dir / "heartbeat" / "base_eval-rank-00001.json"
    deadline = time.monotonic() + 120
    while not beat.exists():  # rank 1 joined the world and runs under its watchdog
        assert time.monotonic() < deadline and job.proc.poll() is None, "".join(job.text)[-6000:]
        time.sleep(0.05)
    victim = stop_rank(job, 1)
    ended_naming(job, victim, 1, "base_eval", time.monotonic(), SHORT + JUDGE_S + SLACK)
    assert not (run_dir / "base_eval.csv").exists()
    traceback = (run_dir / "hang" / "base_eval-rank-00000.txt").read_text()
    assert "Traceback" in traceback and "base_eval.py" in traceback, traceback


@pytest.fixture
def served(run_dir):  # noqa: F811
    """chat_web.py --tp 2 under the launcher, --collective-timeout SHORT (a heartbeat every SHORT / 3 s): (job, URL)."""
    port = free_port()
    job = Launch("chat_web.py", "--run", str(run_dir), "--tp", "2", "--port", str(port), "--collective-timeout",
                 str(SHORT))
    job.wait_for(lambda line: "Uvicorn running on" in line or "Application startup complete" in line, 120,
                 "server start")
    yield job, f"http://127.0.0.1:{port}"
    if job.proc.poll() is None:
        job.kill()


def test_a_stalled_follower_makes_the_server_answer_500_and_end_naming_it(served):
    job, url = served
    assert httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4}, timeout=60
                      ).status_code == 200
    victim, since = stop_rank(job, 1), time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4}, timeout=60)
    assert r.status_code == 500, r.text
    assert re.fullmatch(r"generation failed \(\w+: .+\); the server stops: restart it", r.json()["error"]["message"])
    assert time.monotonic() - since <= SHORT + SHORT / 3 + SLACK  # the heartbeat running, then the request's step
    ended_naming(job, victim, 1, "chat_web", since, SHORT + SHORT / 3 + JUDGE_S + SLACK)


def test_a_stalled_server_rank_0_ends_its_followers_naming_it(served):
    job, url = served
    victim, since = stop_rank(job, 0), time.monotonic()
    # the follower waits in rank 0's next broadcast (a heartbeat every SHORT / 3 s) for SHORT s
    ended_naming(job, victim, 0, "chat_web", since, SHORT / 3 + SHORT + JUDGE_S + SLACK)


def test_a_killed_follower_ends_the_server_naming_it(run_dir):  # noqa: F811
    # the default --collective-timeout (180 s): the idle server shares its next heartbeat a minute later, so rank 0
    # learns of the loss only from the launcher's SIGTERM (launch.py sends it when a rank exits non-zero)
    port = free_port()
    job = Launch("chat_web.py", "--run", str(run_dir), "--tp", "2", "--port", str(port))
    try:
        job.wait_for(lambda line: "Uvicorn running on" in line or "Application startup complete" in line, 120,
                     "server start")
        victim, beat = job.rank_pid(1), run_dir / "heartbeat" / "chat_web-rank-00001.json"
        deadline = time.monotonic() + 60
        while not beat.exists() or json.loads(beat.read_text())["pid"] != victim:  # rank 1 runs under its watchdog
            assert time.monotonic() < deadline and job.proc.poll() is None, "".join(job.text)[-6000:]
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        since = time.monotonic()
        rc, out = job.wait(timeout=LAUNCHER_GRACE + 60)
    finally:
        if job.proc.poll() is None:
            job.kill()
    elapsed = time.monotonic() - since
    assert rc != 0
    # the launcher polls its ranks every second; then rank 0 judges the heartbeats
    assert elapsed <= 1 + JUDGE_S + SLACK, f"{elapsed:.1f} s after the kill"
    messages = [line for line in out.splitlines() if line.startswith("megachat watchdog:")]
    assert len(messages) == 1, out[-6000:]
    assert re.search(rf"lost rank 1 on host {re.escape(socket.gethostname())} \(pid {victim}, dead\), during chat_web: "
                     rf".+; every rank stops now; start chat_web again; the live ranks' tracebacks are in .*/hang/$",
                     messages[0]), messages[0]
