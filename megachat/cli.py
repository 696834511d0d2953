"""How an entry point ends: every tool and script closes with `if __name__ == "__main__": cli.run(main)`.

A user error ends in one line on stderr, `SCRIPT.py: error: MESSAGE`, and exit status 2, the way argparse
reports a bad flag: megachat's messages name the value and the fix, and a traceback would only bury them.
User errors are
- OSError (a missing file or directory, one that already exists, a permission, a full disk) and UnicodeError
  (bytes that are not UTF-8 text), wherever raised;
- ValueError, RuntimeError and FloatingPointError raised by megachat itself: the innermost frame of the
  traceback is in a `megachat` module or in the entry script (a C function called there, such as open() or
  int(), counts as called by it), or the error came back from a multiprocessing worker. torch raises these
  types for its own failures too (shape mismatches, CUDA, NCCL); those keep their traceback.
Any other exception is a bug and keeps its traceback. `--debug` anywhere on the command line (taken out before
main() parses it) or MEGACHAT_DEBUG=1 shows the traceback of user errors too. Ctrl-C exits 130, no traceback.

Ranks: under a launcher (RANK set) an error that several ranks of a node meet alike (a bad layout, a damaged
checkpoint: megachat's checks stop every rank with the same message) is printed once, by the first of them; an
error of one rank alone is still printed, prefixed `[rank N] ` for ranks other than 0. The ranks of a node agree
through an empty marker file in the temp directory named after the launcher process and the message.
This module imports only the standard library: the tools never import torch.
"""
import atexit
import gc
import hashlib
import io
import os
import sys
import tempfile
import threading

USER_ERRORS = (OSError, UnicodeError, ValueError, RuntimeError, FloatingPointError)


def raised_by_megachat(error):
    """Whether `error` was raised in megachat's own code or the entry script, or re-raised from a worker process."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    from_worker = type(error.__cause__).__name__ == "RemoteTraceback"  # multiprocessing.pool's wrapper
    return module == "__main__" or module.partition(".")[0] == "megachat" or from_worker


def is_user_error(error):
    """Whether `error` is reported as one line (see the module docstring) rather than with its traceback."""
    if isinstance(error, (OSError, UnicodeError)):
        return True
    return isinstance(error, USER_ERRORS) and raised_by_megachat(error)


def first_to_report(message):
    """False when another rank started by the same launcher process has already reported this message."""
    if "RANK" not in os.environ:
        return True
    key = hashlib.sha256(f"{os.getppid()}\n{message}".encode()).hexdigest()[:24]
    try:
        os.close(os.open(os.path.join(tempfile.gettempdir(), f"megachat-error-{key}"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    except OSError:  # no writable temp directory: report rather than stay silent
        pass
    return True


def run(main):
    """Call main() (which parses sys.argv) and exit: with main's return value when it is an int, else 0; with 2
    and one line on stderr on a user error; with 130 on Ctrl-C."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("MEGACHAT_DEBUG") == "1"
    sys.argv[1:] = [a for a in sys.argv[1:] if a != "--debug"]
    try:
        status = main()
    except KeyboardInterrupt:
        if debug:
            raise
        sys.exit(130)
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        rank = os.environ.get("RANK", "0")
        message = f"{os.path.basename(sys.argv[0])}: error: {str(error) or type(error).__name__}"
        sys.stdout.flush()
        if first_to_report(message):
            print(f"{'' if rank == '0' else f'[rank {rank}] '}{message}", file=sys.stderr, flush=True)
        sys.exit(2)
    exit_now(status if isinstance(status, int) else 0)


def exit_now(status: int) -> None:
    """Exit with `status` the way a normal exit would, less the interpreter's teardown, which frees every object
    and module one by one: about a second per process once torch and DeepSpeed are loaded, paid by every rank of
    every launch. What a normal exit finishes is finished first: atexit handlers (logging flushed, worker pools and
    child processes shut down), files some library left open flushed (as the teardown would), the standard streams
    flushed. The normal exit is taken while a thread that is not a daemon still runs (it waits for the thread), and
    under a profiler, tracer or debugger (cProfile, coverage, pdb), which writes its results after the script."""
    working = any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate())  # alive ones
    if working or sys.gettrace() is not None or sys.getprofile() is not None:
        sys.exit(status)
    atexit._run_exitfuncs()  # what sys.exit would run; os._exit below runs nothing
    # type(), not isinstance: isinstance dereferences weak proxies (dead ones raise) and warns on deprecated aliases
    files = [obj for obj in gc.get_objects() if type(obj) in (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)]
    files.sort(key=lambda f: type(f) is not io.TextIOWrapper)  # text first: it flushes into its buffer
    for f in files:
        try:
            if not f.closed and f.writable():
                f.flush()
        except (OSError, ValueError):  # a full disk, a closed pipe: the teardown would have ignored it too
            pass
    os._exit(status)
