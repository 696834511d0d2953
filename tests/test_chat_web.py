"""scripts/chat_web.py, the chat web server, over real HTTP: a reply is an OpenAI chat completion equal to the
in-process engine's, streaming sends the same text as server-sent chunks ending in [DONE] (also through the
official openai SDK), concurrent requests are each answered as if alone, a full queue answers 503 while /health
stays responsive, every malformed request is a 400 naming the problem, calculator calls arrive as pieces tagged
`tool` reading [python: EXPR][output: RESULT], the chat page works in headless Chromium, the other tp ranks follow
rank 0's requests and heartbeats, and under `deepspeed --num_gpus 2 --tp 2` the greedy reply is the single
process's. Tiny random-weights model (512-id vocab, max length 320)."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from _dist import free_port

from megachat.chat import prompt_ids, stream_reply
from megachat.chat_server import DEFAULT_SAMPLING, MAX_MESSAGE_CHARS, Worker, create_app, reply_pieces
from megachat.engine import Engine, Sampling
from megachat.model import GPTConfig, nanochat_shapes
from megachat.sharded import save_full

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "chat_web.py")
CONFIG = dict(sequence_len=32, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)  # max length 320
HELLO = [{"role": "user", "content": "Once upon a time there was"}]
TIMEOUT = 30  # seconds, for every HTTP call


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    """RUN_DIR as load_run reads it: config.json {"model", "tokenizer"}, model/ of random weights."""
    root = tmp_path_factory.mktemp("chat_run")
    tok.save(str(root / "tokenizer"))
    g = torch.Generator().manual_seed(0)  # every matrix random: the init's zero lm_head would tie every logit
    save_full(str(root / "model"), {name: torch.randn(shape, generator=g) / (1.0 if "wte" in name else shape[1] ** 0.5)
                                    for name, shape in nanochat_shapes(GPTConfig(**CONFIG)).items()},
              GPTConfig(**CONFIG))
    (root / "config.json").write_text(json.dumps({"model": CONFIG, "tokenizer": str(root / "tokenizer")}))
    return root


@pytest.fixture(scope="module")
def engine(run_dir):
    """The run's engine in this process: the replies the server must send."""
    from megachat.checkpoint import load_run
    from megachat.parallel import Grid
    model, tok, _ = load_run(str(run_dir), Grid(), torch.device("cpu"))
    return Engine(model, tok)


def expected(engine, messages, max_tokens):
    """The greedy reply: its text, finish reason, and prompt and completion token counts (the stopping token
    counts)."""
    ids = prompt_ids(engine.tokenizer, messages)
    greedy = Sampling(max_tokens=max_tokens, temperature=0)
    text = "".join(c for c, _ in reply_pieces(stream_reply(engine, ids, greedy)))
    out, _ = engine.generate_batch([ids], greedy)
    stopped = len(out[0]) < max_tokens
    return text, "stop" if stopped else "length", len(ids), len(out[0]) + stopped


def start(cmd, port, log: Path) -> subprocess.Popen:
    """Start a server (its own process group) and wait for /health; its output goes to `log`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise AssertionError(f"{' '.join(cmd)} did not answer /health in 60 s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (every rank), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """`python scripts/chat_web.py --run RUN_DIR` on a free port: its base URL."""
    port = free_port()
    proc = start([sys.executable, SCRIPT, "--run", str(run_dir), "--port", str(port)], port,
                 tmp_path_factory.mktemp("logs") / "server.log")
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def complete(url, messages, **body):
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, **body}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def stream(url, messages, **body):
    """The chunks of a streaming request (the [DONE] line checked and dropped)."""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"messages": messages, "stream": True, **body},
                      timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]", events[-3:]
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def streamed_text(chunks):
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def test_a_reply_is_an_openai_chat_completion_equal_to_the_engine_with_its_usage(server, engine):
    got = complete(server, HELLO, temperature=0, max_tokens=24, model="anything")
    text, finish, prompt_tokens, completion_tokens = expected(engine, HELLO, 24)
    assert got["object"] == "chat.completion" and got["id"].startswith("chatcmpl-") and got["model"]
    assert isinstance(got["created"], int)
    (choice,) = got["choices"]
    assert choice["message"] == {"role": "assistant", "content": text} and text
    assert choice["finish_reason"] == finish
    assert got["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}


def test_streaming_sends_chunks_ending_in_done_with_the_same_greedy_text(server):
    chunks = stream(server, HELLO, temperature=0, max_tokens=24, stream_options={"include_usage": True})
    whole = complete(server, HELLO, temperature=0, max_tokens=24)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert len(chunks) > 4  # the text came in pieces
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]  # stream_options.include_usage
    assert streamed_text(chunks) == whole["choices"][0]["message"]["content"]


def test_the_openai_sdk_talks_to_it(server):
    from openai import OpenAI
    client = OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    whole = client.chat.completions.create(model="megachat", messages=HELLO, temperature=0, max_tokens=16)
    pieces = client.chat.completions.create(model="megachat", messages=HELLO, temperature=0, max_tokens=16,
                                            stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in pieces if chunk.choices)
    assert whole.choices[0].message.content == text and text
    assert whole.usage.completion_tokens <= 16 and [m.id for m in client.models.list()] == [whole.model]


def test_concurrent_requests_are_each_answered_as_if_alone(server, engine):
    convs = [HELLO, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat sat"}]]
    want = [expected(engine, m, 20)[0] for m in convs]

    def ask(i):
        if i % 2:
            return streamed_text(stream(server, convs[i % 4 // 2], temperature=0, max_tokens=20))
        return complete(server, convs[i % 4 // 2], temperature=0, max_tokens=20)["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == [want[i % 4 // 2] for i in range(8)]


LONG = "hello world " * 600  # 7,200 characters: over 320 tokens
USER = {"role": "user", "content": "hi"}
BAD = [  # (body, the message's words)
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    ({}, "messages must be a non-empty list"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": "hi"}, "messages must be a non-empty list"),
    ({"messages": [USER, {"role": "assistant", "content": "a"}] * 250 + [USER]}, "501 messages: at most 500"),
    ({"messages": [None]}, "message 0: expected an object"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, 'message 0: role "bot" is not allowed'),
    ({"messages": [{"content": "hi"}]}, "message 0: role null is not allowed"),
    ({"messages": [USER, {"role": "system", "content": "x"}]}, 'message 1: role "system" is not allowed'),
    ({"messages": [USER, USER]}, "message 1: role 'user' out of order"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "a"}, USER]},
     "message 1: a system message must be followed by a user message"),
    ({"messages": [USER, {"role": "assistant", "content": "a"}]}, "message 1: the conversation must end with a user"),
    ({"messages": [{"role": "user", "content": ""}]}, "message 0: empty content"),
    ({"messages": [{"role": "user", "content": []}]}, "message 0: empty content"),
    ({"messages": [{"role": "user", "content": 5}]}, "message 0: content must be a string or a list of text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "python", "text": "1+1"}]}]}, "message 0, part 0: expected"),
    ({"messages": [USER, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}, USER]},
     "message 1, part 0: expected"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]},
     "message 0: 8001 characters, over the limit of 8000"),
    ({"messages": [USER, {"role": "assistant", "content": "y" * 8000}] * 2 + [USER] + [
        {"role": "assistant", "content": "y" * 8000}, {"role": "user", "content": "z" * 8000}]},
     "the messages hold 32006 characters, over the limit of 32000 in all"),
    ({"messages": [USER], "temperature": -0.1}, "temperature -0.1 is outside [0, 2]"),
    ({"messages": [USER], "temperature": 2.5}, "temperature 2.5 is outside [0, 2]"),
    ({"messages": [USER], "temperature": "hot"}, 'temperature must be a number, got "hot"'),
    ({"messages": [USER], "top_k": 0}, "top_k 0 is outside [1, 200]"),
    ({"messages": [USER], "top_k": 201}, "top_k 201 is outside [1, 200]"),
    ({"messages": [USER], "top_k": 1.5}, "top_k must be an integer, got 1.5"),
    ({"messages": [USER], "top_p": 0}, "top_p 0 is outside (0, 1]"),
    ({"messages": [USER], "top_p": 1.5}, "top_p 1.5 is outside (0, 1]"),
    ({"messages": [USER], "max_tokens": 0}, "max_tokens 0 is outside [1, 4096]"),
    ({"messages": [USER], "max_tokens": 4097}, "max_tokens 4097 is outside [1, 4096]"),
    ({"messages": [USER], "max_tokens": True}, "max_tokens must be an integer, got true"),
    ({"messages": [USER], "max_tokens": 4096},
     "+ max_tokens 4096 exceeds the model's maximum length 320; shorten the conversation or lower max_tokens"),
    ({"messages": [{"role": "user", "content": LONG}]}, "leaves no room to reply within the model's maximum length"),
    ({"messages": [USER], "seed": -1}, "seed -1 is outside"),
    ({"messages": [USER], "n": 2}, "n = 2: this server returns one choice"),
    ({"messages": [USER], "stream": "yes"}, "stream must be true or false"),
]


@pytest.mark.parametrize("body,words", BAD, ids=[w[:40] for _, w in BAD])
def test_a_bad_request_is_a_400_naming_the_problem(server, body, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server}/v1/chat/completions", content=raw, timeout=TIMEOUT,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text)
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error", error


def test_an_oversized_body_is_a_413(server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b'{"messages": "' + b"x" * (2 << 20) + b'"}',
                   timeout=TIMEOUT)
    assert r.status_code == 413 and "request body over" in r.json()["error"]["message"]


def test_a_taken_port_or_a_bad_default_fails_before_loading_the_model(server, run_dir, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import chat_web
    port = server.rsplit(":", 1)[1]
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} .*: pass another --port or --host"):
        chat_web.main(["--run", str(run_dir), "--port", port])
    with pytest.raises(SystemExit):
        chat_web.main(["--run", str(run_dir), "--top-k", "500"])
    assert "top_k 500 is outside [1, 200] (--top-k)" in capsys.readouterr().err


# --- in-process servers: an engine whose "model" follows a script, behind a gate the test opens ---

class ScriptedEngine(Engine):
    """A real engine whose model wants, in each row, the script's next token (after a token the engine forced, the
    same one again), then <|assistant_end|>; a decode step waits for `gate` (admission and prefill do not)."""

    def __init__(self, model, tok, script, max_batch=1):
        super().__init__(model, tok, max_batch=max_batch)
        self.script, self.gate, self.pos = script, threading.Event(), {}  # pos: each slot's place in the script
        self.gate.set()

    def _decode(self):
        if self.decoding and not self.gate.wait(TIMEOUT):
            raise RuntimeError("the test never opened the gate")
        super()._decode()

    def _logits(self, idx, cache):
        logits = torch.full((idx.size(0), self.tokenizer.vocab_size), -1e9)
        for r, slot in enumerate(cache.slots):
            if idx.size(1) > 1:  # a prompt: the row starts the script
                self.pos[slot] = 0
            elif self.pos[slot] < len(self.script) and idx[r, 0].item() == self.script[self.pos[slot]]:
                self.pos[slot] += 1
            logits[r, self.script[min(self.pos[slot], len(self.script) - 1)]] = 0.0
        return logits


def calculator_script(tok):
    sp = tok.encode_special
    return [*tok.encode("The answer is "), sp("<|python_start|>"), *tok.encode("2+3*4"), sp("<|python_end|>"),
            *tok.encode(" so there."), sp("<|assistant_end|>")]


CALC_REPLY = "The answer is [python: 2+3*4][output: 14] so there."


@contextlib.contextmanager
def in_process(app):
    """`app` served by uvicorn on a thread on a free port: its base URL."""
    import uvicorn
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the in-process server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def scripted(engine):
    """create_app over a ScriptedEngine (--max-batch 1, --max-queue 1) served in-process: (base URL, engine)."""
    scripted = ScriptedEngine(engine.model, engine.tokenizer, calculator_script(engine.tokenizer))
    with in_process(create_app(scripted, "scripted", DEFAULT_SAMPLING, max_queue=1)) as url:
        yield url, scripted
        scripted.gate.set()


def test_calculator_calls_arrive_as_tool_pieces_inline_in_the_text(scripted):
    url, _ = scripted
    chunks = stream(url, HELLO, max_tokens=60)
    tools = [c["choices"][0]["delta"]["tool"] for c in chunks if "tool" in c["choices"][0].get("delta", {})]
    assert tools == [{"type": "python", "text": "2+3*4"}, {"type": "output", "text": "14"}]
    assert streamed_text(chunks) == CALC_REPLY and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    whole = complete(url, HELLO, max_tokens=60)
    assert whole["choices"][0]["message"]["content"] == CALC_REPLY
    # the page sends such a reply back as parts, which the prompt renders as the model's own tool tokens
    parts = [{"type": "text", "text": "The answer is "}, {"type": "python", "text": "2+3*4"},
             {"type": "python_output", "text": "14"}, {"type": "text", "text": " so there."}]
    complete(url, HELLO + [{"role": "assistant", "content": parts}, {"role": "user", "content": "thanks"}])


def test_the_worker_hands_out_the_pieces_then_done_with_the_token_count(engine):
    """The engine's thread (what rank 0 runs; the other ranks apply the same Lockstep messages): a reply's events,
    the done event last with the completion tokens, the forced ones included."""
    scripted = ScriptedEngine(engine.model, engine.tokenizer, calculator_script(engine.tokenizer))
    worker, events, done = Worker(scripted), [], threading.Event()
    worker.start()
    try:
        worker.submit({"ids": prompt_ids(engine.tokenizer, HELLO), "sampling": Sampling(max_tokens=60, temperature=0)},
                      lambda e: (events.append(e), e[0] == "done" and done.set()))
        assert done.wait(TIMEOUT), events
    finally:
        worker.stop()
    assert "".join(e[1] for e in events if e[0] == "piece") == CALC_REPLY
    forced = len(engine.tokenizer.encode("14")) + 2  # <|output_start|> 14 <|output_end|>
    assert events[-1] == ("done", "stop", len(calculator_script(engine.tokenizer)) + forced)


def test_a_full_queue_answers_503_while_health_stays_responsive(scripted):
    url, engine = scripted
    engine.gate.clear()  # the first request generates, blocked; the second waits (--max-queue 1)
    try:
        with httpx.Client(timeout=TIMEOUT) as client, \
                client.stream("POST", f"{url}/v1/chat/completions", json={"messages": HELLO, "stream": True}) as a, \
                client.stream("POST", f"{url}/v1/chat/completions", json={"messages": HELLO, "stream": True}) as b:
            assert a.status_code == b.status_code == 200
            deadline = time.time() + 10
            while (stats := client.get(f"{url}/stats", timeout=2).json())["generating"] != 1:
                assert time.time() < deadline, stats
            assert stats["waiting"] == 1 and stats["max_queue"] == 1
            t0 = time.time()
            assert client.get(f"{url}/health", timeout=2).json()["status"] == "ok"
            assert time.time() - t0 < 1.0  # the event loop is free while the engine's thread generates
            busy = client.post(f"{url}/v1/chat/completions", json={"messages": HELLO})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "the server is busy: the queue is full (1 waiting, --max-queue 1)" in busy.json()["error"]["message"]
            engine.gate.set()
            for r in (a, b):
                events = [line for line in r.iter_lines() if line]
                assert events[-1] == "data: [DONE]"
                assert streamed_text([json.loads(e[6:]) for e in events[:-1]]) == CALC_REPLY
            assert client.get(f"{url}/stats").json()["rejected"] == 1
    finally:
        engine.gate.set()


def chromium():
    """Headless Chromium driven by Selenium (Debian's chromium and chromium-driver)."""
    from selenium import webdriver
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver_path, "chromium and chromedriver are missing: run `make setup` " \
                                    "(apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,640"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))


def test_the_chat_page_streams_a_reply_shows_the_calculator_and_starts_over(scripted, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = scripted
    driver = chromium()
    try:
        driver.set_page_load_timeout(TIMEOUT)
        driver.get(url + "/")
        wait = WebDriverWait(driver, TIMEOUT)
        wait.until(lambda d: "scripted" in d.find_element(By.ID, "model").text)  # from /health
        box = driver.find_element(By.ID, "input")
        box.send_keys("What is 2+3*4?")
        driver.find_element(By.ID, "send").click()
        replies = lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant")  # noqa: E731
        idle = lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"  # noqa: E731
        wait.until(lambda d: replies(d) and idle(d))
        reply = replies(driver)[0].text
        assert reply.startswith("The answer is ") and reply.endswith(" so there."), reply
        assert [c.text for c in driver.find_elements(By.CSS_SELECTOR, "code.tool.python")] == ["2+3*4"]
        assert [c.text for c in driver.find_elements(By.CSS_SELECTOR, "code.tool.output")] == ["14"]
        box.send_keys("Thanks!", Keys.ENTER)  # a second turn: the first reply goes back as content parts
        wait.until(lambda d: len(replies(d)) == 2 and idle(d))
        assert not driver.find_elements(By.CSS_SELECTOR, ".message.error")
        assert [m.text for m in driver.find_elements(By.CSS_SELECTOR, ".message.user")] == ["What is 2+3*4?",
                                                                                           "Thanks!"]
        driver.save_screenshot(str(tmp_path / "chat_page.png"))
        driver.find_element(By.ID, "new-chat").click()
        assert not driver.find_elements(By.CSS_SELECTOR, ".message")
        assert driver.find_element(By.ID, "empty").is_displayed()
    finally:
        driver.quit()


def worker_and_follower(rank, run_dir):
    """Rank 0: a Worker (heartbeats every 50 ms) given one request after some idle heartbeats; rank 1: follow()."""
    from megachat.chat_server import Worker, follow
    from megachat.checkpoint import load_run
    from megachat.parallel import init_grid
    model, tok, _ = load_run(run_dir, init_grid(tp=2), torch.device("cpu"))
    engine = Engine(model, tok)
    if rank == 1:
        follow(engine)  # returns once rank 0's worker stops
        return {}
    worker, events, done = Worker(engine, heartbeat_s=0.05), [], threading.Event()
    worker.start()
    time.sleep(0.3)
    worker.submit({"ids": prompt_ids(tok, HELLO), "sampling": Sampling(max_tokens=16, temperature=0)},
                  lambda e: (events.append(e), e[0] == "done" and done.set()))
    assert done.wait(60), events
    worker.stop()
    return {"text": "".join(e[1] for e in events if e[0] == "piece")}


def test_the_other_ranks_follow_rank_0s_requests_and_heartbeats_until_it_stops(run_dir, engine):
    from _dist import run_gloo
    got = run_gloo(worker_and_follower, 2, str(run_dir), timeout_s=60)
    assert got[0]["text"] == expected(engine, HELLO, 16)[0] and got[1] == {}


def test_tp2_under_the_deepspeed_launcher_answers_as_one_process(server, run_dir, tmp_path):
    port = free_port()
    proc = start([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                  str(free_port()), SCRIPT, "--run", str(run_dir), "--tp", "2", "--port", str(port)], port,
                 tmp_path / "tp.log")
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["tp"] == 2
        convs = [HELLO, [{"role": "user", "content": "The cat sat"}]]
        for messages in convs:
            want = complete(server, messages, temperature=0, max_tokens=16)
            got = complete(url, messages, temperature=0, max_tokens=16)
            assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
        sampled = [streamed_text(stream(u, HELLO, temperature=1.0, seed=3, max_tokens=12)) for u in (url, server)]
        assert sampled[0] == sampled[1]  # the seed travels with the request to every rank
    finally:
        stop(proc)
    assert "Traceback" not in (tmp_path / "tp.log").read_text()


# --- continuous batching, API keys and the schema, over real HTTP ---

KEY = "sk-megachat-test-key"


class SlowEngine(Engine):
    """The real engine, each step taking at least `delay` seconds, so that a test sees requests overlap."""
    delay, steps = 0.0, 0

    def step(self):
        time.sleep(self.delay)
        super().step()
        self.steps += 1


@pytest.fixture(scope="module")
def keyed(engine):
    """create_app(--api-key KEY, --max-batch 4, --max-queue 2) over the run's model, in-process: (URL, engine). Its
    default seed is fixed: the chat page sends none, and with a seed drawn per request the random-weights model
    sometimes ends its reply at once, which the page shows as an error ("the model replied with nothing")."""
    slow = SlowEngine(engine.model, engine.tokenizer, max_batch=4)
    defaults = replace(DEFAULT_SAMPLING, seed=0)
    with in_process(create_app(slow, "keyed", defaults, max_queue=2, api_key=KEY)) as url:
        yield url, slow


def bearer(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_v1_wants_the_api_key_in_openai_s_error_shape_and_health_stays_open(keyed, monkeypatch):
    url, _ = keyed
    body = {"messages": HELLO, "max_tokens": 4}
    for headers, words in (({}, "You didn't provide an API key"), (bearer("sk-wrong"), "Incorrect API key"),
                           ({"Authorization": KEY}, "You didn't provide an API key")):  # not Bearer
        for r in (httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=TIMEOUT),
                  httpx.get(f"{url}/v1/models", headers=headers, timeout=TIMEOUT)):
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (r.status_code, r.text)
            error = r.json()["error"]
            assert words in error["message"] and error["type"] == "invalid_request_error"
            assert error["code"] == "invalid_api_key" and error["param"] is None
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["api_key"] is True
    assert httpx.post(f"{url}/v1/chat/completions", json=body, headers=bearer(), timeout=TIMEOUT).status_code == 200
    from openai import AuthenticationError, OpenAI
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert [m.id for m in OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).models.list()] == ["keyed"]
    sys.path.insert(0, str(ROOT / "scripts"))
    import chat_web
    monkeypatch.setenv("MEGACHAT_API_KEY", "from-the-environment")
    assert chat_web.parse_args(["--run", "x"]).api_key == "from-the-environment"
    assert chat_web.parse_args(["--run", "x", "--api-key", "flag"]).api_key == "flag"


def timed_stream(url, messages, out, **body):
    """Stream one request, recording (the time its first and last chunk arrived, its chunks) in out."""
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=bearer(), timeout=TIMEOUT,
                      json={"messages": messages, "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        chunks = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                out.setdefault("first", time.time())
        out.update(last=time.time(), chunks=chunks)


def test_a_short_request_sent_after_a_long_one_finishes_first_and_each_is_what_it_is_alone(keyed, engine):
    url, slow = keyed
    slow.delay = 0.01  # >= 2 s for the long reply
    long_body = dict(max_tokens=200, temperature=1.0, seed=3)  # this seed runs to max_tokens
    short_body = dict(max_tokens=4, temperature=0.5, seed=5)
    long, short = {}, {}
    try:
        thread = threading.Thread(target=timed_stream, args=(url, HELLO, long), kwargs=long_body)
        thread.start()
        deadline = time.time() + TIMEOUT
        while "first" not in long and time.time() < deadline:
            time.sleep(0.01)
        timed_stream(url, [{"role": "user", "content": "The cat sat"}], short, **short_body)
        thread.join(TIMEOUT)
    finally:
        slow.delay = 0.0
    assert short["last"] < long["last"] and long["first"] < short["first"]
    assert long["chunks"][-1]["choices"][0]["finish_reason"] == "length"  # still generating when short finished
    for messages, body, got in ((HELLO, long_body, long), ([{"role": "user", "content": "The cat sat"}], short_body,
                                                           short)):
        ids = prompt_ids(engine.tokenizer, messages)
        sampling = Sampling(max_tokens=body["max_tokens"], temperature=body["temperature"], top_k=50,
                            seed=body["seed"])
        assert streamed_text(got["chunks"]) == "".join(c for c, _ in reply_pieces(stream_reply(engine, ids, sampling)))


def test_sampled_concurrent_replies_equal_each_alone(server, engine):
    """Eight requests at once with their own temperature, top-k / top-p, length and seed: each reply is the
    engine's for that request alone."""
    convs = [HELLO, [{"role": "user", "content": "The cat sat"}], [{"role": "user", "content": "hello world " * 20}]]
    bodies = [dict(temperature=0.0, max_tokens=30), dict(temperature=0.7, max_tokens=12, seed=1),
              dict(temperature=1.0, top_k=20, max_tokens=25, seed=2), dict(temperature=1.3, top_p=0.9, max_tokens=7,
                                                                           seed=3),
              dict(temperature=0.9, max_tokens=40, seed=4), dict(temperature=0.5, top_k=5, max_tokens=3, seed=5),
              dict(temperature=1.0, max_tokens=18, seed=6), dict(temperature=0.2, top_p=0.5, max_tokens=33, seed=7)]

    def ask(i):
        return complete(server, convs[i % 3], **bodies[i])["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    for i, body in enumerate(bodies):
        sampling = Sampling(max_tokens=body["max_tokens"], temperature=body["temperature"],
                            top_k=body.get("top_k", DEFAULT_SAMPLING.top_k), top_p=body.get("top_p"),
                            seed=body.get("seed", 0))
        ids = prompt_ids(engine.tokenizer, convs[i % 3])
        assert got[i] == "".join(c for c, _ in reply_pieces(stream_reply(engine, ids, sampling))), i


def test_a_client_that_disconnects_frees_its_row_within_a_step(keyed):
    url, slow = keyed
    slow.delay = 0.05  # 200 tokens: 10 s
    try:
        with httpx.Client(timeout=TIMEOUT, headers=bearer()) as client:
            with client.stream("POST", f"{url}/v1/chat/completions",
                               json={"messages": HELLO, "stream": True, "max_tokens": 200, "seed": 3}) as r:
                for line in r.iter_lines():  # the first piece of text: the row is decoding
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        break
                assert client.get(f"{url}/stats").json()["generating"] == 1
            left, steps = time.time(), slow.steps  # the connection is closed
            # both counts reach 0: the engine thread drops the row before it counts the job done, so for a moment
            # /stats shows the cancelled job as waiting
            while (stats := client.get(f"{url}/stats").json())["generating"] or stats["waiting"]:
                assert time.time() - left < 5.0, stats  # the request had 9 s to go
                time.sleep(0.01)
            assert slow.steps - steps <= 2, slow.steps - steps  # the step under way, at most one more
    finally:
        slow.delay = 0.0


def test_schemathesis_finds_no_server_error_and_no_undocumented_status(keyed, tmp_path):
    url, _ = keyed
    schema = httpx.get(f"{url}/openapi.json", timeout=TIMEOUT).json()
    body = schema["paths"]["/v1/chat/completions"]["post"]
    assert body["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    assert {"200", "400", "401", "413", "503"} <= set(body["responses"])
    st = str(Path(sys.executable).parent / "st")
    run = subprocess.run([st, "--config-file", str(ROOT / "tests" / "schemathesis.toml"), "run", f"{url}/openapi.json",
                          "--checks", "all", "-H", f"Authorization: Bearer {KEY}", "--max-examples", "30", "--seed", "1", "--workers", "1", "--no-color",
                          "--phases", "examples,coverage,fuzzing"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    (tmp_path / "st.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def test_the_chat_page_asks_for_the_api_key_once_and_sends_it(keyed):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = keyed
    driver = chromium()
    try:
        driver.set_page_load_timeout(TIMEOUT)
        driver.get(url + "/")
        wait = WebDriverWait(driver, TIMEOUT)
        wait.until(lambda d: "keyed" in d.find_element(By.ID, "model").text)  # /health: it wants a key
        replies = lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant")  # noqa: E731
        idle = lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"  # noqa: E731
        box = driver.find_element(By.ID, "input")
        box.send_keys("Once upon a time", Keys.ENTER)
        alert = wait.until(expected_conditions.alert_is_present())
        assert "API key" in alert.text
        alert.send_keys(KEY)
        alert.accept()
        wait.until(lambda d: replies(d) and idle(d))
        box.send_keys("And then?", Keys.ENTER)  # no second prompt: an open alert would fail the next lookups
        wait.until(lambda d: len(replies(d)) == 2 and idle(d))
        assert not driver.find_elements(By.CSS_SELECTOR, ".message.error")
        assert driver.execute_script("return sessionStorage.getItem('megachat-api-key')") == KEY
    finally:
        driver.quit()
