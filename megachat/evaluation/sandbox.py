"""Run untrusted generated code (HumanEval completions) in a separate, limited process.

Limits, applied in the child before the candidate code runs:
- time: a wall-clock timeout (the parent kills the whole process group) plus RLIMIT_CPU;
- memory: RLIMIT_AS (address space), and RLIMIT_FSIZE caps the size of any file written;
- network: the child runs in a fresh network namespace (`unshare -n`: only a downed loopback exists) when the
  kernel allows it; otherwise socket creation is blocked by replacing `socket.socket` and friends inside the
  child before the candidate is executed. `SandboxResult.network` says which one was used;
- files: the working directory is a fresh temp dir, deleted afterwards; `open()` for writing, os/shutil
  removal, rename and mkdir outside that dir raise PermissionError (patched in the child), and the rest of the
  environment is minimal (no PYTHONPATH, HOME = the temp dir).
This is a guard against accidents of a small model's code, like nanochat's execution.py, not a jail against a
determined attacker (Python-level patches can be undone by code that knows about them); the namespace is.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

# Executed by `python -I -c`; reads {"code", "tmp", "max_memory", "cpu_seconds", "block_sockets"} from stdin.
_CHILD = r'''
import builtins, io, json, os, resource, shutil, sys
cfg = json.loads(sys.stdin.read())
tmp = os.path.realpath(cfg["tmp"])
os.chdir(tmp)
resource.setrlimit(resource.RLIMIT_AS, (cfg["max_memory"], cfg["max_memory"]))
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (10 << 20, 10 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def _inside(path):
    try:
        p = os.path.realpath(os.fspath(path) if not isinstance(path, int) else "/proc/self/fd/%d" % path)
    except TypeError:
        return False
    return p == tmp or p.startswith(tmp + os.sep)

def _guard(fn, *argpos):
    def wrapped(*args, **kwargs):
        for i in argpos:
            if i < len(args) and not _inside(args[i]):
                raise PermissionError("sandbox: no file changes outside the temp dir: %r" % (args[i],))
        return fn(*args, **kwargs)
    return wrapped

_open = builtins.open
def _safe_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError("sandbox: no file writes outside the temp dir: %r" % (file,))
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _safe_open
_os_open = os.open
def _safe_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC) and not _inside(path):
        raise PermissionError("sandbox: no file writes outside the temp dir: %r" % (path,))
    return _os_open(path, flags, *args, **kwargs)
os.open = _safe_os_open
for name in ("remove", "unlink", "rmdir", "mkdir", "makedirs", "removedirs", "chmod", "chown", "truncate",
             "symlink", "link"):
    if hasattr(os, name):
        setattr(os, name, _guard(getattr(os, name), 0))
for name in ("rename", "replace"):
    setattr(os, name, _guard(getattr(os, name), 0, 1))
shutil.rmtree = _guard(shutil.rmtree, 0)
shutil.move = _guard(shutil.move, 0, 1)
os.system = os.popen = os.fork = os.forkpty = os.killpg = None
os.execv = os.execve = os.execvp = os.execvpe = os.spawnv = os.spawnve = None
import subprocess
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = None

if cfg["block_sockets"]:
    import socket
    def _no_network(*args, **kwargs):
        raise PermissionError("sandbox: network access is disabled")
    socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _no_network
    socket.getaddrinfo = _no_network

exec(compile(cfg["code"], "<candidate>", "exec"), {"__name__": "__main__"})
'''


@dataclass
class SandboxResult:
    passed: bool          # exited with status 0 within the limits
    status: str           # "passed" | "failed" | "timeout"
    output: str           # stdout + stderr, truncated
    network: str          # "namespace" (unshare -n) or "socket-patch"


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """True when `unshare -n` works here (root, or user namespaces enabled)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        return subprocess.run([unshare, "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_code(code: str, timeout: float = 5.0, max_memory_bytes: int = 1 << 30,
             network_namespace: bool | None = None) -> SandboxResult:
    """Execute `code` as a script in the sandbox; passed = it exited 0 within `timeout` seconds.

    network_namespace: None = use `unshare -n` when available, False = force the socket patch (tests)."""
    namespace = network_namespace_available() if network_namespace is None else network_namespace
    with tempfile.TemporaryDirectory(prefix="megachat-sandbox-") as tmp:
        cfg = {"code": code, "tmp": tmp, "max_memory": int(max_memory_bytes),
               "cpu_seconds": max(1, int(timeout) + 1), "block_sockets": not namespace}
        cmd = [sys.executable, "-I", "-c", _CHILD]
        if namespace:
            cmd = [shutil.which("unshare"), "-n"] + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=tmp, env=env, start_new_session=True)
        try:
            out, _ = proc.communicate(json.dumps(cfg).encode(), timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: kills anything it started too
            out, _ = proc.communicate()
            status = "timeout"
    return SandboxResult(status == "passed", status, out.decode("utf-8", "replace")[-4000:],
                         "namespace" if namespace else "socket-patch")


def check_humaneval(problem: dict, completion: str, timeout: float = 5.0) -> SandboxResult:
    """Run a HumanEval problem's tests against `completion` (the full function source, prompt included)."""
    program = f"{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    return run_code(program, timeout=timeout)


def main(argv=None) -> int:
    """Run every canonical HumanEval solution through the sandbox: all must pass (a check of the limits)."""
    from megachat.tasks.humaneval import load_humaneval  # here: megachat.tasks.humaneval imports this module
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--data-dir", default=None, help="evaluation cache (default ~/.cache/megachat/eval)")
    args = ap.parse_args(argv)
    t0, failed = time.time(), []
    problems = load_humaneval(args.data_dir)
    for p in problems:
        result = check_humaneval(p, p["messages"][1]["content"], timeout=10)
        if not result.passed:
            failed.append(f"{p['task_id']}: {result.status}: {result.output[-200:]}")
    print(f"{len(problems) - len(failed)}/{len(problems)} canonical HumanEval solutions pass in the sandbox "
          f"(network: {'namespace' if network_namespace_available() else 'socket-patch'}, "
          f"{time.time() - t0:.1f} s)")
    print("\n".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
