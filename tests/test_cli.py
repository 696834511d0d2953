"""Errors as a user sees them (megachat/cli.py): a bad input to a tool ends in one line `TOOL.py: error: MESSAGE`
and exit status 2, `--debug` or MEGACHAT_DEBUG=1 shows the traceback, bugs always keep theirs."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "demo_corpus_sample.jsonl")


def tool(name, *args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def bad_input(case, tok_dir, tmp_path):
    """(tool, args, what the one line must say) for a user's mistake."""
    (tmp_path / "notjson.jsonl").write_bytes(b'{"text": "ok"}\n{"text": \n')
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    out = ["--output-prefix", tmp_path / "out"]
    return {
        "invalid JSON line": ("preprocess_data.py", ["--input", tmp_path / "notjson.jsonl", "--tokenizer", tok_dir,
                                                     *out], "notjson.jsonl: line at byte 15 is not valid JSON"),
        # --workers 2: the error is raised in a worker process and re-raised in the parent
        "non-UTF-8 file": ("preprocess_data.py", ["--input", tmp_path / "latin1.jsonl", "--tokenizer", tok_dir,
                                                  "--workers", "2", *out], "latin1.jsonl: invalid UTF-8 at byte 28"),
        "missing tokenizer directory": ("preprocess_data.py", ["--input", FIXTURE, "--tokenizer", tmp_path / "nope",
                                                               *out], "nope is not a tokenizer directory"),
        "existing tokenizer output": ("train_tokenizer.py", ["--input", FIXTURE, "--vocab-size", "300", "--output",
                                                             tok_dir], f"{tok_dir} already holds a tokenizer"),
        "no shard matches": ("merge_shards.py", ["--input", tmp_path / "x_*", *out], "no shard matches"),
    }[case]


CASES = ["invalid JSON line", "non-UTF-8 file", "missing tokenizer directory", "existing tokenizer output",
         "no shard matches"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_prints_one_line_naming_the_problem_and_exits_2(case, tok_dir, tmp_path):
    name, args, message = bad_input(case, tok_dir, tmp_path)
    proc = tool(name, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{name}: error: "), proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", ["--debug", "MEGACHAT_DEBUG=1"])
def test_debug_shows_the_traceback(how, tok_dir, tmp_path):
    name, args, message = bad_input("invalid JSON line", tok_dir, tmp_path)
    proc = tool(name, *args, "--debug") if how == "--debug" else tool(name, *args, env={"MEGACHAT_DEBUG": "1"})
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith(
        f"ValueError: {tmp_path / 'notjson.jsonl'}: line at byte 15 is not valid JSON")


def test_ranks_of_one_launcher_print_a_shared_error_once_and_a_different_one_with_their_rank(tok_dir, tmp_path):
    # this test process plays the launcher: the tools it starts are its children, like a launcher's ranks
    name, args, message = bad_input("missing tokenizer directory", tok_dir, tmp_path)
    first = tool(name, *args, env={"RANK": "3"})
    assert first.returncode == 2 and first.stderr.startswith(f"[rank 3] {name}: error: ") and message in first.stderr
    again = tool(name, *args, env={"RANK": "0"})  # the same error on another rank: already reported
    assert again.returncode == 2 and again.stderr == ""
    name, args, message = bad_input("invalid JSON line", tok_dir, tmp_path)
    other = tool(name, *args, env={"RANK": "1"})
    assert other.returncode == 2 and other.stderr.startswith(f"[rank 1] {name}: error: ") and message in other.stderr


# ---- the rule itself, on small entry scripts (standard library only: each run takes ~50 ms) ----
def entry(tmp_path, body, *args, env=None):
    """Run a script whose main() executes `body`, ended with cli.run(main) like every tool."""
    (tmp_path / "helper.py").write_text("def fail():\n    raise RuntimeError('from another library')\n")
    script = tmp_path / "entry.py"
    script.write_text("import sys\nimport helper\nfrom megachat import cli\n\n\ndef main():\n"
                      f"    {body}\n\n\nif __name__ == '__main__':\n    cli.run(main)\n")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("body, message", [
    ("raise ValueError('--lr -1 must be positive; pass --lr 0.02')", "--lr -1 must be positive; pass --lr 0.02"),
    ("raise FloatingPointError('loss is nan at step 7; lower --lr')", "loss is nan at step 7; lower --lr"),
    ("raise RuntimeError('checkpoint x is damaged')", "checkpoint x is damaged"),
    ("open('/nonexistent/run/config.json')", "[Errno 2] No such file or directory: '/nonexistent/run/config.json'"),
    ("b'caf\\xe9'.decode()", "'utf-8' codec can't decode byte 0xe9 in position 3"),
])
def test_user_errors_are_one_line(tmp_path, body, message):
    proc = entry(tmp_path, body)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"entry.py: error: {message}"), proc.stderr


@pytest.mark.parametrize("body, error", [
    ("{}['missing']", "KeyError: 'missing'"),
    ("None.split()", "AttributeError"),
    ("len(1)", "TypeError"),
    ("helper.fail()", "RuntimeError: from another library"),  # as torch's own RuntimeErrors (CUDA, shapes)
])
def test_bugs_keep_their_traceback(tmp_path, body, error):
    proc = entry(tmp_path, body)
    assert proc.returncode == 1 and proc.stderr.startswith("Traceback")
    assert proc.stderr.strip().splitlines()[-1].startswith(error)


def test_exit_status_ctrl_c_and_the_debug_flag_is_not_seen_by_main(tmp_path):
    assert entry(tmp_path, "return 3").returncode == 3
    assert entry(tmp_path, "return {'summary': 1}").returncode == 0
    interrupted = entry(tmp_path, "raise KeyboardInterrupt")
    assert (interrupted.returncode, interrupted.stderr) == (130, "")
    seen = entry(tmp_path, "print(sys.argv[1:])", "--x", "--debug", "y")
    assert (seen.returncode, seen.stdout) == (0, "['--x', 'y']\n")


def test_a_finished_run_exits_without_teardown_yet_loses_nothing_a_normal_exit_keeps(tmp_path):
    # cli.exit_now skips the interpreter's teardown: a file main left open still gets its buffered text, atexit
    # handlers still run, stdout still arrives, and a thread that is not a daemon is still waited for
    out = tmp_path / "left_open.txt"
    body = (f"import atexit, threading, time; f = open({str(out)!r}, 'w'); f.write('kept'); "
            "atexit.register(print, 'atexit ran'); print('printed', end=''); "
            f"threading.Thread(target=lambda: (time.sleep(0.3), open({str(out)!r} + '.thread', 'w').write('x')))"
            ".start(); return 4")
    proc = entry(tmp_path, body)
    assert proc.returncode == 4 and proc.stdout == "printedatexit ran\n", proc
    assert out.read_text() == "kept" and (tmp_path / "left_open.txt.thread").read_text() == "x"
    # exit_now's own path (no thread left): the file is still referenced (a module global, a library's handle),
    # so only the flush before os._exit writes it; atexit handlers run and stdout arrives
    body = (f"sys.left_open = open({str(out)!r}, 'w'); sys.left_open.write('kept again'); "
            "import atexit; atexit.register(print, 'atexit ran'); print('printed', end='')")
    proc = entry(tmp_path, body)
    assert proc.returncode == 0 and proc.stdout == "printedatexit ran\n" and out.read_text() == "kept again", proc
