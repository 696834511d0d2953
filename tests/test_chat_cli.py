"""scripts/chat_cli.py driven through stdin/stdout as a user would: a greedy conversation replies exactly what the
engine generates in-process for the same prompts (each reply back in the conversation), /clear starts over,
/quit and end of input exit 0, -p answers one prompt, an over-long turn is refused with one line and the session
goes on, and under `deepspeed --tp 2` the transcript is the single process's. Tiny random-weights GPT."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from _dist import free_port
from test_chat import scripted_engine
from test_engine import model_on, random_weights

from megachat.chat import prompt_ids
from megachat.engine import Engine, Sampling
from megachat.model import GPTConfig
from megachat.sharded import save_full

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "chat_cli.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import chat_cli  # noqa: E402

MAX_TOKENS = 12
TURNS = ["Hello there", "What is two plus three?"]
CONVERSATION = f"{TURNS[0]}\n{TURNS[1]}\n/clear\n{TURNS[0]}\n/quit\nnever read\n"
DEEPSPEED_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|WARNING)\]")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    """RUN_DIR as megachat.checkpoint.load_run reads it: test_engine's tiny GPT (random weights), conftest's tok."""
    from test_engine import CONFIG
    root = tmp_path_factory.mktemp("chat_run")
    tok.save(str(root / "tok"))
    save_full(str(root / "model"), random_weights(), GPTConfig(**CONFIG))
    (root / "config.json").write_text(json.dumps({"model": CONFIG, "tokenizer": str(root / "tok")}))
    return root


@pytest.fixture(scope="module")
def replies(tok):
    """The greedy reply to each of TURNS in one conversation, from Engine.generate_batch in this process."""
    engine = Engine(model_on(), tok)
    tools = {tok.encode_special(s) for s in ("<|python_start|>", "<|output_start|>")}
    messages, out = [], []
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        ids = engine.generate_batch([prompt_ids(tok, messages)], Sampling(max_tokens=MAX_TOKENS, temperature=0))[0][0]
        assert not tools & set(ids)  # this test's replies are plain text
        text = tok.decode(ids).rstrip("\ufffd")  # the stream holds back a character cut off by max_tokens
        assert text
        messages.append({"role": "assistant", "content": text})
        out.append(text)
    return out


def chat(run_dir, *args, stdin="", timeout=120, nprocs=1):
    """scripts/chat_cli.py (under the deepspeed launcher when nprocs > 1), greedy, fed `stdin`."""
    cmd = ([sys.executable, SCRIPT] if nprocs == 1 else
           [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nprocs),
            "--master_port", str(free_port()), SCRIPT, "--tp", str(nprocs)])
    cmd += ["--run", str(run_dir), "--temperature", "0", "--max-tokens", str(MAX_TOKENS), *args]
    return subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def transcript(replies):
    return (f"Assistant: {replies[0]}\nAssistant: {replies[1]}\n(new conversation)\n"
            f"Assistant: {replies[0]}\n")


def test_a_greedy_conversation_replies_what_the_engine_generates_and_clear_starts_over(run_dir, replies):
    proc = chat(run_dir, stdin=CONVERSATION)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == transcript(replies)


def test_an_over_long_turn_is_refused_in_one_line_and_the_session_goes_on_until_end_of_input(run_dir, replies):
    long = " ".join(["word"] * 200)
    proc = chat(run_dir, stdin=f"{long}\n{TURNS[0]}\n")
    assert proc.returncode == 0, proc.stderr
    refused, *rest = proc.stdout.splitlines(keepends=True)
    assert "exceeds the engine's maximum length 160" in refused and "/clear" in refused
    assert "".join(rest) == f"Assistant: {replies[0]}\n"  # the refused turn is not in the conversation


def test_p_answers_one_prompt_and_exits(run_dir, replies):
    proc = chat(run_dir, "-p", TURNS[0])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{replies[0]}\n"


def test_tp2_under_deepspeed_gives_the_single_process_transcript(run_dir, replies):
    proc = chat(run_dir, stdin=CONVERSATION, nprocs=2, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = "".join(line for line in proc.stdout.splitlines(keepends=True) if not DEEPSPEED_LOG.match(line))
    assert out == transcript(replies)


def test_a_tool_call_is_shown_inline_and_kept_as_the_model_made_it(tok, capsys):
    sp = tok.encode_special
    forced = len(tok.encode("14")) + 2  # <|output_start|> 14 <|output_end|>, forced by the engine
    script = [*tok.encode("So "), sp("<|python_start|>"), *tok.encode("2+3*4"), sp("<|python_end|>"),
              *[300] * forced, *tok.encode(" done"), sp("<|assistant_end|>")]
    args = chat_cli.parse_args(["--run", "unused", "--temperature", "0", "--max-tokens", "30"])
    parts = chat_cli.answer(scripted_engine(tok, script), [{"role": "user", "content": "2+3*4?"}], args,
                            chat_cli.Output(talker=True), label="Assistant: ")
    assert capsys.readouterr().out == "Assistant: So [python: 2+3*4][output: 14] done\n"
    assert parts == [{"type": "text", "text": "So "}, {"type": "python", "text": "2+3*4"},
                     {"type": "python_output", "text": "14"}, {"type": "text", "text": " done"}]
    # the next turn's prompt holds the reply token for token as the engine generated it
    generated = Engine.generate_batch(scripted_engine(tok, script), [[tok.bos_id]],
                                     Sampling(max_tokens=30, temperature=0))[0][0]
    messages = [{"role": "user", "content": "2+3*4?"}, {"role": "assistant", "content": parts},
                {"role": "user", "content": "ok"}]
    ids = prompt_ids(tok, messages)
    start = ids.index(sp("<|assistant_start|>")) + 1
    assert ids[start:ids.index(sp("<|assistant_end|>"))] == generated


def test_an_empty_reply_is_left_out_of_the_conversation(tok, monkeypatch, capsys):
    import io

    sp = tok.encode_special
    engine = scripted_engine(tok, [sp("<|assistant_end|>"), *tok.encode("Hi"), sp("<|assistant_end|>")])
    prompts, generate = [], engine.generate
    engine.generate = lambda ps, sampling: prompts.append(ps[0]) or generate(ps, sampling)
    monkeypatch.setattr(chat_cli, "load_chat", lambda run, tp: (engine, None))
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n"))
    assert chat_cli.main(["--run", "unused", "--temperature", "0", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == ("Assistant: \n(empty reply: this turn is left out of the conversation)\n"
                                       "Assistant: Hi\n")
    assert prompts[1] == prompt_ids(tok, [{"role": "user", "content": "second"}])
