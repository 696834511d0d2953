"""megachat.watchdog: a training job that loses a rank (dead or stalled) ends by itself, naming the rank.

When one rank dies (kill -9, the OOM killer) or stalls (SIGSTOP, a hung node), the others wait in a collective. A
dead rank's connections close and gloo (NCCL with async error handling) raises in the survivors at once; a stalled
rank's stay open and nothing happens until a timeout. Trainer.fit runs its loop under a `Watchdog`:

- Heartbeat: a daemon thread writes RUN_DIR/heartbeat/rank-RRRRR.json about once a second (rank, host, pid, step, a
  counter). A dead or stopped rank stops beating; a rank waiting in a collective goes on (torch releases the GIL
  while it waits). A survivor judges by watching the counters for a few seconds, so the hosts' clocks never matter
  (RUN_DIR is on the shared filesystem the checkpoints need anyway).
- Limit: the loop calls `beat(step)` before every step, `beat(step, slow=True)` before an evaluation or a save.
  When no beat came for the limit (`step_limit`: `--collective-timeout` when given, else sized from the measured
  steps), the thread dumps the Python stacks of every thread of this rank (faulthandler) into
  RUN_DIR/hang/rank-RRRRR.txt, names the lost ranks, and ends the process with status 1 (os._exit: the main thread
  is stuck in a collective). faulthandler.dump_traceback_later(exit=True), re-armed at every beat a little later
  than the thread's limit, is the backstop for a main thread that never releases the GIL.
- A collective that raises (a dead peer) reaches `failed(error)`: the same judgement and message, then exit
  status 1. Errors that megachat raises itself (a bad step, a damaged checkpoint) pass through unchanged.

The first live rank prints one line: the lost ranks with host, pid and what became of them (dead, stopped, or
silent on another host), the step, and the newest intact checkpoint (`checkpoints/latest`) to continue from with
`--resume auto`. The launcher then ends the other ranks (the deepspeed launcher sends SIGTERM, and SIGKILL 30 s
later to what is left, such as a stopped rank).

Jobs without steps (base_eval, chat_eval, the chat server under tp: `job` names them) run under a Watchdog too, as
a context (`with Watchdog(...)`), with their heartbeats and stacks under their own names (RUN_DIR/heartbeat/
JOB-rank-RRRRR.json, RUN_DIR/hang/JOB-rank-RRRRR.txt) so that they may run beside a training job on the same
RUN_DIR. They have no step limit: their bound is the process-group timeout alone (`collective_timeout_s(..., grace=
False)`, --collective-timeout), whose error reaches `failed`, which names the lost ranks as above, writes the
failed collective's traceback to the stack file and ends the process with status 1. A dead rank often reaches a
survivor first as the deepspeed launcher's SIGTERM (sent when a rank exits non-zero), while it computes, serves, or
waits in a store (creating a group): in such a job, started on the main thread, the Watchdog handles SIGTERM. Its
Python handler runs only once the main thread is free, so the signal's wakeup fd (signal.set_wakeup_fd) wakes a
thread that judges the heartbeats at once: a lost rank is named the same way (once; the stacks of every thread go to
the stack file) and the process ends with status 1. With none lost, the handler ends the process as the SIGTERM
would have, once the judging is done (JUDGE_S; a rank blocked in a collective: when the collective returns). A rank
whose job ended (close(), a plain SIGTERM) marks its heartbeat `ended` and is never named lost; close() restores the
handler and the wakeup fd.
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback

import torch.distributed as dist

from megachat.cli import raised_by_megachat

PERIOD_S = 1.0  # heartbeat interval
JUDGE_S = 3.0  # how long a survivor watches the counters before naming the ranks that stopped
WARMUP_STEPS = 2  # the first steps (allocation, compilation, DeepSpeed's first-step set-up) are not measured
MIN_LIMIT_S = 60.0  # auto limit: at least this, and STEP_FACTOR x the slowest measured step
STEP_FACTOR = 10.0
SLOW_LIMIT_S = 600.0  # auto limit of the first steps, evaluations and saves (not measured), and of every collective
GRACE_S = 30.0  # the process-group timeout is the limit plus this


def step_limit(step_times: list[float], explicit: float | None = None) -> float:
    """Seconds a step may take before the job is declared hung: `explicit` (--collective-timeout) when given; else
    max(MIN_LIMIT_S, STEP_FACTOR x the slowest step after the first WARMUP_STEPS), SLOW_LIMIT_S until then."""
    if explicit:
        return float(explicit)
    steady = step_times[WARMUP_STEPS:]
    return max(MIN_LIMIT_S, STEP_FACTOR * max(steady)) if steady else SLOW_LIMIT_S


def collective_timeout_s(explicit: float | None, grace: bool = True) -> float:
    """The process-group timeout (megachat.parallel.init_distributed: every collective, also outside the training
    loop): --collective-timeout, else SLOW_LIMIT_S, plus GRACE_S so that in training the watchdog, which names the
    lost rank and dumps the stacks, acts first (grace=False: a job without steps, where the timeout is the bound)."""
    return (float(explicit) if explicit else SLOW_LIMIT_S) + (GRACE_S if grace else 0.0)


def for_job(run_dir: str, job: str) -> Watchdog:
    """The watchdog of a job without steps (base_eval, chat_eval, chat_web) on this process's group, used as `with
    for_job(RUN_DIR, NAME):`; it watches nothing without a group of several ranks (a plain `python` run)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return Watchdog(run_dir if world > 1 else None, dist.get_rank() if world > 1 else 0, world, job=job)


class Watchdog:
    """start(), beat(step) before every step, failed(error) when the loop raises, close() (see the module
    docstring); or, for a job without steps, `with for_job(RUN_DIR, NAME):` around it. run_dir None: every call
    does nothing."""

    def __init__(self, run_dir: str | None, rank: int, world: int, timeout: float | None = None, job: str = "train"):
        self.run_dir, self.rank, self.world, self.explicit, self.job = run_dir, rank, world, timeout, job
        self.prefix = "" if job == "train" else f"{job}-"
        self.beat_dir = os.path.join(run_dir or "", "heartbeat")
        self.hang_path = os.path.join(run_dir or "", "hang", f"{self.prefix}rank-{rank:05d}.txt")
        self.host, self.step, self.count = socket.gethostname(), 0, 0
        self.step_times: list[float] = []
        self.last_beat, self.last_was_step = time.monotonic(), False
        self.limit = step_limit([], timeout)
        self.reported = threading.Lock()  # held by whichever of the thread and the main thread reports first
        self.writing = threading.Lock()  # the thread and a failing main thread both beat
        self.stop = threading.Event()
        self.sigterm = None  # job mode: the SIGTERM handler start() replaced
        self.judged = threading.Event()  # job mode: a SIGTERM was judged and no rank was lost
        self.judging = threading.Lock()  # job mode: held by the thread or the main thread judging a SIGTERM

    def start(self) -> None:
        """Begin beating and watching (a no-op without a run directory)."""
        if self.run_dir is None:
            return
        try:
            os.makedirs(self.beat_dir, exist_ok=True)
            os.makedirs(os.path.dirname(self.hang_path), exist_ok=True)
            self.hang_file = open(self.hang_path, "a")
        except OSError as e:
            if self.job == "train":  # a training run writes its RUN_DIR anyway
                raise
            # serving or evaluating a run in a directory this job cannot write: the timeout still ends it
            print(f"megachat watchdog: cannot write {self.run_dir} ({e.strerror}): a lost rank ends {self.job} after "
                  f"the collective timeout without being named", flush=True)
            self.run_dir = None
            return
        self._write_heartbeat()
        self.thread = threading.Thread(target=self._watch, name="megachat-watchdog", daemon=True)
        self.thread.start()
        if self.job == "train":
            self._arm()
        elif threading.current_thread() is threading.main_thread():
            self.sigterm = signal.signal(signal.SIGTERM, self._terminated)
            # a Python handler runs only once the main thread is free (not in a collective or a store's wait);
            # the wakeup fd gets the signal's number at once, for _await_sigterm's thread
            self.wake, self.wake_w = socket.socketpair()
            self.wake_w.setblocking(False)
            self.wakeup = signal.set_wakeup_fd(self.wake_w.fileno())
            threading.Thread(target=self._await_sigterm, name="megachat-sigterm", daemon=True).start()

    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(self, kind, error, tb) -> None:
        if isinstance(error, Exception):
            self.failed(error)
        self.close()

    def failed(self, error: BaseException) -> None:
        """The loop raised `error`: when a collective failed because ranks stopped beating, report them and exit 1;
        otherwise return (the caller re-raises)."""
        if self.run_dir is None or not isinstance(error, RuntimeError) or raised_by_megachat(error):
            return
        self.stop.set()
        faulthandler.cancel_dump_traceback_later()
        if threading.current_thread() is threading.main_thread():
            # this process ends either way: the launcher's SIGTERM (it saw a dead rank) must not cut the judging short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        lost = self._lost_ranks()
        if lost and self.reported.acquire(blocking=False):
            if self.job != "train":  # no stacks were dumped: where the collective was called
                traceback.print_exception(error, file=self.hang_file)
                self.hang_file.flush()
            self._report(lost, f"a collective failed ({str(error).splitlines()[0][:200]})", stacks=self.job != "train")
            _exit()

    def close(self) -> None:
        """Stop beating and watching; remove this rank's stack file when nothing was dumped into it."""
        if self.run_dir is None:
            return
        if self.sigterm is not None:
            signal.signal(signal.SIGTERM, self.sigterm)
            signal.set_wakeup_fd(self.wakeup)
            self.wake_w.close()  # ends _await_sigterm
        self.stop.set()
        faulthandler.cancel_dump_traceback_later()
        self.thread.join()
        if self.job != "train":
            self._write_heartbeat(ended=True)  # not lost: this rank is done (a peer's SIGTERM may come after)
        self.hang_file.close()
        if os.path.getsize(self.hang_path) == 0:
            os.remove(self.hang_path)
            with contextlib.suppress(OSError):  # another rank's stacks, or another rank removing it first
                os.rmdir(os.path.dirname(self.hang_path))

    def beat(self, step: int, slow: bool = False) -> None:
        """Progress: `step` is about to run (slow=True: an evaluation or a save follows, which is not measured)."""
        now = time.monotonic()
        if self.last_was_step:
            self.step_times.append(now - self.last_beat)
        self.step, self.last_beat, self.last_was_step = step, now, not slow
        limit = step_limit(self.step_times, self.explicit)
        self.limit = limit if self.explicit or not slow else max(limit, SLOW_LIMIT_S)
        if self.run_dir is not None:
            self._arm()

    def _arm(self) -> None:
        # the backstop fires after the thread had its chance to judge and report
        faulthandler.dump_traceback_later(self.limit + JUDGE_S + 10 * PERIOD_S, exit=True, file=self.hang_file)

    def _await_sigterm(self) -> None:
        """Job mode: judge a SIGTERM as soon as it comes, whatever the main thread does."""
        while data := self.wake.recv(64):  # b"" once close() closed the other end
            if signal.SIGTERM in data:
                self._judge_sigterm()
        self.wake.close()

    def _judge_sigterm(self) -> None:
        """The deepspeed launcher sends SIGTERM to the other ranks when one exits non-zero (a kill -9), often
        before they meet the failing collective: a lost rank is named as failed() names it (the stacks of this
        rank's threads to the stack file) and the process ends with status 1. Once per process."""
        with self.judging:
            if self.judged.is_set():
                return
            lost = self._lost_ranks()
            if lost and self.reported.acquire(blocking=False):
                self.hang_file.write(f"rank {self.rank} on {self.host}, pid {os.getpid()}: SIGTERM; the stacks of "
                                     f"every thread:\n")
                self.hang_file.flush()
                faulthandler.dump_traceback(self.hang_file, all_threads=True)
                self._report(lost, "SIGTERM (the launcher's, as a rank exited)", stacks=True)
                _exit()
            self.judged.set()

    def _terminated(self, signum, frame) -> None:
        """The SIGTERM's Python handler, once the main thread is free: judged (here when the wakeup fd was another's,
        uvloop's while it serves) and no rank lost, end as the SIGTERM would have (quietly, killed by the signal),
        this rank's heartbeat marked `ended`."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the judging
        self._judge_sigterm()
        self.stop.set()
        self.thread.join()
        self._write_heartbeat(ended=True)
        signal.signal(signal.SIGTERM, self.sigterm)
        signal.raise_signal(signal.SIGTERM)

    def _write_heartbeat(self, ended: bool = False) -> None:
        path = os.path.join(self.beat_dir, f"{self.prefix}rank-{self.rank:05d}.json")
        with self.writing, contextlib.suppress(OSError):  # a full disk must not end the watching
            self.count += 1
            with open(f"{path}.tmp", "w") as f:
                json.dump({"rank": self.rank, "host": self.host, "pid": os.getpid(), "step": self.step,
                           "count": self.count, "ended": ended}, f)
            os.replace(f"{path}.tmp", path)  # no fsync: a heartbeat only has to be readable, not durable

    def _read_heartbeats(self) -> dict[int, dict]:
        beats = {}
        for rank in range(self.world):
            try:
                with open(os.path.join(self.beat_dir, f"{self.prefix}rank-{rank:05d}.json")) as f:
                    beats[rank] = json.load(f)
            except (OSError, ValueError):
                pass
        return beats

    def _lost_ranks(self) -> list[dict]:
        """The ranks whose heartbeat does not move for JUDGE_S seconds (this rank's own thread keeps beating), but
        for those that ended their job (Watchdog.close, a plain SIGTERM)."""
        before = self._read_heartbeats()
        deadline = time.monotonic() + JUDGE_S
        while time.monotonic() < deadline:
            time.sleep(PERIOD_S)
            self._write_heartbeat()
        after = self._read_heartbeats()
        return [before.get(r) or {"rank": r, "host": "?", "pid": None, "step": None} for r in range(self.world)
                if r != self.rank and (r not in after or after[r]["count"] == before.get(r, {}).get("count")
                                       and not after[r].get("ended"))]

    def _watch(self) -> None:
        while not self.stop.wait(PERIOD_S):
            self._write_heartbeat()
            if self.job == "train" and time.monotonic() - self.last_beat > self.limit and not self.stop.is_set():
                step, limit = self.step, self.limit
                self.hang_file.write(f"rank {self.rank} on {self.host}, pid {os.getpid()}: step {step} has not "
                                     f"finished in {limit:.0f} s; the stacks of every thread:\n")
                self.hang_file.flush()
                faulthandler.dump_traceback(self.hang_file, all_threads=True)
                self.hang_file.flush()
                lost = self._lost_ranks()
                if self.reported.acquire(blocking=False):
                    self._report(lost, f"step {step} has not finished in {limit:.0f} s (--collective-timeout)",
                                 stacks=True)
                    _exit()
                return

    def _report(self, lost: list[dict], what: str, stacks: bool = False) -> None:
        """The one message, printed by the lowest-numbered live rank."""
        lost_ranks = {d["rank"] for d in lost}
        if min(r for r in range(self.world) if r not in lost_ranks) != self.rank:
            return
        names = "; ".join(f"rank {d['rank']} on host {d['host']} (pid {d['pid']}, {_fate(d, self.host)})"
                          for d in lost)
        ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        latest = os.path.join(ckpt_dir, "latest")
        tag = open(latest).read().strip() if os.path.isfile(latest) else None
        resume = (f"resume from the newest intact checkpoint {os.path.join(ckpt_dir, tag)} with --resume auto"
                  if tag else "no checkpoint was written yet: --resume auto starts over")
        who = (f"lost {names}" if lost else "no rank stopped beating: a live rank is stuck (a collective that not "
               "every rank called, or a dead link)")
        during, stack_kind = f"step {self.step}", "Python stacks"
        if self.job != "train":
            during, resume, stack_kind = self.job, f"start {self.job} again", "tracebacks"
        print(f"megachat watchdog: {who}, during {during}: {what}; every rank stops now; {resume}" +
              (f"; the live ranks' {stack_kind} are in {os.path.dirname(self.hang_path)}/" if stacks else ""),
              flush=True)


def _exit() -> None:
    """End this process now with status 1 (the main thread may be stuck in a collective and never return)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _fate(beat: dict, host: str) -> str:
    """What became of a rank that stopped beating, as far as this host can see: dead, stopped, or silent."""
    if beat["host"] != host or not beat["pid"]:
        return "silent: its heartbeat stopped"
    try:
        with open(f"/proc/{beat['pid']}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return "dead"
    return "stopped (SIGSTOP or a debugger)" if state in ("T", "t") else (
        "dead" if state in ("Z", "X") else "alive but silent")
