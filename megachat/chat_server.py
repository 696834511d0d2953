"""megachat.chat_server: the chat web server of scripts/chat_web.py, a FastAPI app around one inference engine.

- `POST /v1/chat/completions`: OpenAI's chat-completions API (so OpenAI's SDKs and tools talk to it): body
  {model?, messages: [{role, content}], temperature?, top_p?, top_k? (an extension), max_tokens?, seed?, stream?};
  a `chat.completion` object, or with `stream: true` server-sent `chat.completion.chunk` events ending in
  `data: [DONE]`. Other OpenAI fields (stop, penalties, tools, ...) are ignored; `n` must be 1.
- `GET /` the chat page (megachat/chat_ui.html), `GET /health`, `GET /stats`, `GET /v1/models`, `GET /openapi.json`
  (the request body and the 400/401/413/503 answers as the server checks them).
- Limits (nanochat's chat_web): 1..500 messages, each 1..8,000 characters, 32,000 in all; temperature in [0, 2],
  top_k in [1, 200], top_p in (0, 1], max_tokens in [1, 4096], and prompt + max_tokens within the engine's maximum
  length (without max_tokens the server's default is lowered to fit). Bad input is a 400 naming the problem
  ({"error": {"message", "type", "param", "code"}}), never a 500.
- API key (create_app's api_key, --api-key): /v1/* wants `Authorization: Bearer KEY`, else a 401 in OpenAI's shape.
- Continuous batching: `Worker` owns the engine on its own thread (the engine is not thread-safe; the event loop
  stays free for /health and for streaming). Each step it hands the engine the requests that arrived and the
  cancellations of those whose clients left, steps it, and hands each request's new pieces to its asyncio queue.
  At most engine.max_batch requests generate, max_queue more wait for a row, more get a 503.
- Tensor parallel: rank 0 serves HTTP; its worker shares each step's changes (megachat.chat.share) and every rank
  applies them with `Lockstep` and steps, so all run the same batch; the other ranks run `follow(engine)` until
  the worker stops (shares None). While idle the worker shares a heartbeat every heartbeat_s (chat_web: a third of
  --collective-timeout, the process-group timeout) and every rank answers it (a barrier), so an idle server never
  reaches the timeout, and a lost rank (dead or stalled) ends the others within it: a follower's wait for rank 0
  fails (chat_web's megachat.watchdog names the lost rank and exits 1); rank 0's heartbeat or step fails, the worker
  answers every request a 500 naming the failure, refuses new ones with a 503, and calls on_failure (chat_web:
  stop serving, then exit 1 naming the lost rank).
- Calculator calls: the content text reads `[python: 2+3*4][output: 14]` as in the chat CLI, two pieces whose
  delta also carries a non-standard `"tool": {"type": "python" | "output", "text": ...}` that OpenAI clients
  ignore and the page styles. The page sends such turns back as assistant content parts [{"type": "text" |
  "python" | "python_output", "text"}], as Tokenizer.render_conversation reads them.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from importlib import resources

import torch
import torch.distributed as dist
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from megachat.chat import Reply, prompt_ids, share
from megachat.engine import Sampling

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MAX_BODY_BYTES = 1 << 20  # far above what the character limits allow in JSON
TEMPERATURE, TOP_K, TOP_P, MAX_TOKENS = (0, 2), (1, 200), (0, 1), (1, 4096)  # top_p's range is open at 0
HEARTBEAT = "heartbeat"
log = logging.getLogger("megachat.chat_server")


class RequestError(ValueError):
    """A request the server refuses: the HTTP status and an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": None, "code": self.code}}


# what a request does not set (scripts/chat_web.py's defaults): seed None draws a fresh one per request
DEFAULT_SAMPLING = Sampling(max_tokens=512, temperature=0.8, top_k=50, seed=None)


@dataclass
class ChatRequest:
    ids: list[int]  # the prompt: the conversation, then <|assistant_start|>
    sampling: Sampling  # one sample, seed drawn
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def _number(body: dict, name: str, bounds: tuple, integer: bool = False, open_low: bool = False):
    """body[name] checked against bounds (None when absent or null)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}")
    low, high = bounds
    if not ((low < value) if open_low else (low <= value)) or not value <= high:
        raise RequestError(f"{name} {value} is outside {'(' if open_low else '['}{low}, {high}]")
    return value


def parse_sampling(body: dict, defaults: Sampling) -> tuple[Sampling, bool]:
    """(the request's sampling over `defaults`, whether it set max_tokens); RequestError on a value out of range."""
    got = {"temperature": _number(body, "temperature", TEMPERATURE),
           "top_k": _number(body, "top_k", TOP_K, integer=True),
           "top_p": _number(body, "top_p", TOP_P, open_low=True),
           "max_tokens": _number(body, "max_tokens", MAX_TOKENS, integer=True),
           "seed": _number(body, "seed", (0, 2 ** 63 - 1), integer=True)}
    newer = _number(body, "max_completion_tokens", MAX_TOKENS, integer=True)  # the newer name of the same limit
    if got["max_tokens"] is None:
        got["max_tokens"] = newer
    return replace(defaults, **{k: v for k, v in got.items() if v is not None}), got["max_tokens"] is not None


def _content(message: dict, where: str, role: str):
    """(content as render_conversation takes it, its length in characters)."""
    content = message.get("content")
    if isinstance(content, str):
        return content, len(content)
    if not isinstance(content, list):
        raise RequestError(f"{where}: content must be a string or a list of text parts, got "
                           f"{json.dumps(content)[:80]}")
    kinds = ("text", "python", "python_output") if role == "assistant" else ("text",)
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in kinds or not isinstance(part.get("text"), str):
            raise RequestError(f"{where}, part {j}: expected {{\"type\": {' | '.join(map(json.dumps, kinds))}, "
                               f"\"text\": string}}, got {json.dumps(part)[:80]}")
    length = sum(len(part["text"]) for part in content)
    if role == "assistant":
        return content, length  # a reply with calculator calls, as the page sends it back
    return "\n".join(part["text"] for part in content), length


def parse_request(body: bytes, tokenizer, max_len: int, defaults: Sampling) -> ChatRequest:
    """A chat-completions request body -> the prompt's tokens and how to sample; RequestError (400) naming the
    problem for anything else."""
    try:
        body = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object with a 'messages' list")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {\"role\": ..., \"content\": ...}")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"{len(messages)} messages: at most {MAX_MESSAGES} per request")
    turns, total = [], 0
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: expected an object with 'role' and 'content', got "
                               f"{json.dumps(message)[:80]}")
        role = message.get("role")
        if role not in ("system", "user", "assistant") or (role == "system" and i > 0):
            raise RequestError(f"{where}: role {json.dumps(role)} is not allowed; use 'system' (first message "
                               f"only), then 'user' and 'assistant' alternating")
        content, length = _content(message, where, role)
        if length == 0:
            raise RequestError(f"{where}: empty content; drop the message or give it text")
        if length > MAX_MESSAGE_CHARS:
            raise RequestError(f"{where}: {length} characters, over the limit of {MAX_MESSAGE_CHARS}")
        total += length
        turns.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"the messages hold {total} characters, over the limit of {MAX_TOTAL_CHARS} in all")
    if isinstance(body.get("n"), bool) or body.get("n") not in (None, 1):
        raise RequestError(f"n = {json.dumps(body['n'])}: this server returns one choice (n = 1)")
    stream, options = body.get("stream", False), body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(stream, bool) or not isinstance(options, dict) or \
            not isinstance(options.get("include_usage", False), (bool, type(None))):
        raise RequestError("stream must be true or false and stream_options an object whose include_usage is true "
                           "or false")
    if not isinstance(body.get("model", ""), (str, type(None))):
        raise RequestError(f"model must be a string, got {json.dumps(body['model'])[:80]}")
    sampling, explicit = parse_sampling(body, defaults)
    try:
        ids = prompt_ids(tokenizer, turns)
    except ValueError as e:  # the conversation's order: names the message
        raise RequestError(str(e)) from None
    room = max_len - len(ids)
    if explicit and sampling.max_tokens > room:
        raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {sampling.max_tokens} exceeds the model's "
                           f"maximum length {max_len}; shorten the conversation or lower max_tokens")
    if room < 1:
        raise RequestError(f"the prompt of {len(ids)} tokens leaves no room to reply within the model's maximum "
                           f"length {max_len}; shorten the conversation")
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
    return ChatRequest(ids, replace(sampling, max_tokens=min(sampling.max_tokens, room), seed=seed), stream,
                       bool(options.get("include_usage")))


def reply_pieces(events):
    """Reply events -> (content, tool) pieces: text as is (tool None); a calculator call and its result inline as
    the chat CLI prints them, `[python: EXPR]` and `[output: RESULT]`, tagged {"type": "python" | "output", "text":
    EXPR | RESULT}."""
    for kind, text in events:
        yield (text, None) if kind == "text" else (f"[{kind}: {text}]", {"type": kind, "text": text})


class Lockstep:
    """What every rank does with each step's message from rank 0's worker ({"submit": [(number, {"ids",
    "sampling"})], "cancel": [number]}): submit and cancel those requests, then step the engine. Under tp every rank
    applies the same messages in the same order, so every rank runs the same batch."""

    def __init__(self, engine):
        self.engine, self.live = engine, {}  # number -> engine Request (or the ValueError refusing it)

    def apply(self, message: dict) -> None:
        """Submit, cancel and step; requests that finished (or were refused) stay in `live` until the next apply,
        so that rank 0 can hand out their last tokens."""
        for number in [n for n, r in self.live.items() if isinstance(r, ValueError) or r.finished]:
            del self.live[number]
        for number in message["cancel"]:
            request = self.live.pop(number, None)
            if request is not None and not isinstance(request, ValueError):
                self.engine.cancel(request)
        for number, shared in message["submit"]:
            try:
                self.live[number] = self.engine.submit([shared["ids"]], shared["sampling"])
            except ValueError as e:  # the engine refusing the request, alike on every rank
                self.live[number] = e
        if self.engine.busy:
            self.engine.step()


def follow(engine) -> None:
    """Ranks other than 0 under tp: apply every step rank 0 shares, until it shares None."""
    lockstep = Lockstep(engine)
    while (message := share()) is not None:
        if message == HEARTBEAT:
            answer_heartbeat()
        else:
            lockstep.apply(message)


def answer_heartbeat() -> None:
    """Every rank meets after rank 0's heartbeat, so that rank 0 too notices a lost rank while idle."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@dataclass(eq=False)
class _Job:
    request: dict  # what every rank needs: {"ids", "sampling"}
    emit: object  # thread-safe: hands an event to the HTTP request's queue
    cancelled: bool = False  # the client left: its row leaves the batch at the next step
    number: int = -1
    reply: Reply | None = None
    tokens: int = 0  # completion tokens so far (the stopping token included)


class Worker:
    """The engine's thread: steps the engine's continuous batch (at most engine.max_batch requests generating) and
    hands each request's events to its HTTP request; at most max_queue more requests wait for a row, then 503.
    When a step or a heartbeat fails (a lost tp rank, a failed generation) it answers every request a 500, refuses
    new ones, keeps the error in `error` and calls on_failure()."""

    def __init__(self, engine, max_queue: int = 16, heartbeat_s: float = 60.0, on_failure=None):
        self.engine, self.max_queue, self.heartbeat_s, self.on_failure = engine, max_queue, heartbeat_s, on_failure
        self.error: Exception | None = None
        self.refusal = "the server is shutting down"
        self.inbox: queue.Queue = queue.Queue()  # submitted jobs the engine has not seen yet
        self.lock = threading.Lock()
        self.admitted = self.served = self.rejected = self.numbered = 0  # admitted: waiting or generating now
        self.stopping = False
        self.active: list[_Job] = []  # jobs in the engine
        self.lockstep = Lockstep(engine)
        self.thread = threading.Thread(target=self._run, name="megachat-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Refuse the jobs not finished, release the other ranks, and join."""
        with self.lock:
            self.stopping = True  # admit nothing more
        self.inbox.put(None)
        self.thread.join()

    def submit(self, request: dict, emit) -> _Job:
        """Queue one shared request; RequestError 503 when max_batch generate and max_queue already wait."""
        with self.lock:
            if self.stopping:
                raise RequestError(self.refusal, 503, "server_busy")
            if self.admitted >= self.engine.max_batch + self.max_queue:
                self.rejected += 1
                raise RequestError(f"the server is busy: the queue is full ({self.admitted - self.engine.max_batch} "
                                   f"waiting, --max-queue {self.max_queue}), {self.engine.max_batch} generating "
                                   f"(--max-batch {self.engine.max_batch}); retry in a moment", 503, "server_busy")
            self.admitted += 1
            job = _Job(request, emit)
            self.inbox.put(job)  # under the lock: once stopping, the inbox gets nothing more
        return job

    def stats(self) -> dict:
        with self.lock:
            generating = self.engine.rows_running
            return {"generating": generating, "waiting": self.admitted - generating,
                    "max_batch": self.engine.max_batch, "max_queue": self.max_queue, "served": self.served,
                    "rejected": self.rejected}

    def _run(self) -> None:
        if self.engine.device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(self.engine.device)
        stop = False
        while not stop:
            new = []
            if not self.active:  # idle: wait for a job, keeping the other ranks' broadcast alive
                try:
                    job = self.inbox.get(timeout=self.heartbeat_s)
                except queue.Empty:
                    try:
                        share(HEARTBEAT)
                        answer_heartbeat()
                    except Exception as e:  # a tp rank is lost
                        self._fail(e, [])
                        return
                    continue
                new.append(job)
            while True:
                try:
                    new.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            stop = None in new or self.stopping
            new = [job for job in new if job is not None]
            for job in new:
                job.number, self.numbered = self.numbered, self.numbered + 1
                job.reply = Reply(self.engine)
            gone = [job for job in self.active if job.cancelled or stop]
            message = {"submit": [(job.number, job.request) for job in new if not (job.cancelled or stop)],
                       "cancel": [job.number for job in gone]}
            for job in new:
                if job.cancelled or stop:
                    gone.append(job)
            try:
                share(message)
                self.lockstep.apply(message)
            except Exception as e:  # a tp rank is lost or generation failed: no reply can be generated any more
                self._fail(e, self.active + new)
                return
            if stop:
                for job in gone:
                    job.emit(("error", RequestError("the server is shutting down", 503, "server_busy")))
            self.active = [job for job in self.active if job not in gone]
            self._done(gone)
            self.active += [job for job in new if job not in gone]
            finished = [job for job in self.active if self._dispatch(job)]
            self.active = [job for job in self.active if job not in finished]
            self._done(finished, served=True)
        try:
            share(None)
        except Exception as e:  # the other ranks are gone already (Ctrl-C reaches every rank)
            log.warning("could not release the other ranks: %s", e)

    def _fail(self, error: Exception, jobs: list[_Job]) -> None:
        """No reply can be generated any more: a 500 to `jobs` and to those waiting, a 503 to later ones, then
        on_failure(). The other ranks are not released (they are lost, or fail on their own at the timeout)."""
        log.error("the engine's step failed", exc_info=error)
        failure = (f"generation failed ({type(error).__name__}: {str(error).splitlines()[0][:300]}); the server stops: "
                   f"restart it")
        with self.lock:
            self.stopping, self.error, self.refusal = True, error, failure
        while True:  # the jobs that arrived meanwhile
            try:
                jobs.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        jobs = [job for job in jobs if job is not None]
        for job in jobs:
            job.emit(("error", RequestError(failure, 500, "server_error")))
        self._done(jobs)
        self.active = []
        if self.on_failure is not None:
            self.on_failure()

    def _dispatch(self, job: _Job) -> bool:
        """Hand the job's new tokens to its client as pieces; True once it has finished."""
        request = self.lockstep.live[job.number]
        if isinstance(request, ValueError):
            job.emit(("error", RequestError(str(request))))
            return True
        while request.steps:
            token = request.steps.popleft()[0][0]
            if token is None:
                continue
            job.tokens += 1
            for content, tool in reply_pieces(job.reply.push(token)):
                job.emit(("piece", content, tool))
        if request.finished:
            job.emit(("done", "stop" if job.reply.ended else "length", job.tokens))
            return True
        return False

    def _done(self, jobs, served: bool = False) -> None:
        with self.lock:
            self.admitted -= len(jobs)
            self.served += len(jobs) if served else 0


def _chat_ui() -> str:
    return resources.files("megachat").joinpath("chat_ui.html").read_text(encoding="utf-8")


def _schemas(max_len: int) -> dict:
    """OpenAPI components: the request body as parse_request accepts it and the error body of every refusal."""
    def parts(kinds):
        part = {"type": "object", "required": ["type", "text"],
                "properties": {"type": {"type": "string", "enum": kinds}, "text": {"type": "string"}}}
        return {"type": "array", "minItems": 1, "items": part}

    text = {"type": "string", "minLength": 1, "maxLength": MAX_MESSAGE_CHARS}
    message = {"anyOf": [
        {"type": "object", "required": ["role", "content"],
         "properties": {"role": {"type": "string", "enum": ["system", "user"]},
                        "content": {"anyOf": [text, parts(["text"])]}}},
        {"type": "object", "required": ["role", "content"],
         "description": "python / python_output parts: an earlier reply's calculator call and its result",
         "properties": {"role": {"type": "string", "enum": ["assistant"]},
                        "content": {"anyOf": [text, parts(["text", "python", "python_output"])]}}}]}

    def integer(low, high, description=None):  # null: the server's default, as a missing field
        return {"type": ["integer", "null"], "minimum": low, "maximum": high,
                **({"description": description} if description else {})}

    request = {
        "type": "object", "required": ["messages"],
        "description": f"A conversation: an optional system message first, then user and assistant alternating, "
                       f"ending with user; at most {MAX_TOTAL_CHARS} characters in all; the prompt plus max_tokens "
                       f"within the model's {max_len} tokens. Other OpenAI fields are accepted and ignored.",
        "properties": {
            "model": {"type": ["string", "null"], "description": "accepted and ignored"},
            "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": message},
            "temperature": {"type": ["number", "null"], "minimum": TEMPERATURE[0], "maximum": TEMPERATURE[1]},
            "top_p": {"type": ["number", "null"], "exclusiveMinimum": TOP_P[0], "maximum": TOP_P[1]},
            "top_k": integer(*TOP_K, "an extension to OpenAI's API"),
            "max_tokens": integer(*MAX_TOKENS), "max_completion_tokens": integer(*MAX_TOKENS),
            "seed": integer(0, 2 ** 63 - 1),
            "n": {"type": ["integer", "null"], "enum": [1, None]},
            "stream": {"type": "boolean"},
            "stream_options": {"type": ["object", "null"],
                               "properties": {"include_usage": {"type": ["boolean", "null"]}}}}}
    error = {"type": "object", "required": ["error"],
             "properties": {"error": {"type": "object", "required": ["message", "type"],
                                      "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                     "param": {"type": ["string", "null"]},
                                                     "code": {"type": ["string", "null"]}}}}}
    return {"ChatCompletionRequest": request, "Error": error}


def _errors(*statuses) -> dict:
    what = {400: "the request is malformed or out of bounds (the message names the field)",
            401: "no API key, or a wrong one (--api-key)", 413: f"the body is over {MAX_BODY_BYTES} bytes",
            500: "generation failed (a lost tensor-parallel rank): the server stops",
            503: "the server is busy (--max-batch generating and --max-queue waiting) or shutting down; Retry-After"}
    return {s: {"description": what[s], "content": {"application/json": {"schema": {"$ref": "#/components/schemas/"
                                                                                             "Error"}}}}
            for s in statuses}


def create_app(engine, model_name: str = "megachat", defaults: Sampling = DEFAULT_SAMPLING, max_queue: int = 16,
               heartbeat_s: float = 60.0, api_key: str | None = None, on_failure=None):
    """The FastAPI app serving `engine` (rank 0's under tp: run `follow(engine)` on the others). Its lifespan
    starts and stops the engine's worker thread (app.state.worker). api_key: required as `Authorization: Bearer
    KEY` on /v1/*. on_failure(): called on the worker's thread once generation failed (Worker)."""
    parse_sampling(asdict(defaults), Sampling())  # bad defaults fail at start, with the request's messages
    if defaults.num_samples != 1:
        raise ValueError(f"defaults.num_samples {defaults.num_samples}: the server replies with one sample (n = 1)")
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: pass a non-empty --api-key (or MEGACHAT_API_KEY), or none")
    worker = Worker(engine, max_queue, heartbeat_s, on_failure)
    started = time.time()
    tp = engine.model.grid.tp

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="megachat", lifespan=lifespan)
    app.state.worker = worker
    auth = {"security": [{"bearer": []}]} if api_key else {}
    v1_errors = (401,) if api_key else ()

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title="megachat", version="1", routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(_schemas(engine.max_len))
            if api_key:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    def error(e: RequestError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def denied(http: Request):
        """The 401 of a /v1/* request without the API key (OpenAI's error), or None."""
        if api_key is None:
            return None
        scheme, _, given = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and given and hmac.compare_digest(given.strip().encode(), api_key.encode()):
            return None
        message = ("Incorrect API key provided." if given else "You didn't provide an API key. Send it in an "
                   "Authorization header using Bearer auth (Authorization: Bearer YOUR_KEY).")
        return error(RequestError(message, 401, code="invalid_api_key"))

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(_chat_ui())

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name, "tp": tp, "max_len": engine.max_len,
                "defaults": asdict(defaults), "api_key": api_key is not None}

    @app.get("/stats")
    def stats():
        return {"model": model_name, "tp": tp, "uptime_s": round(time.time() - started, 1), **worker.stats()}

    @app.get("/v1/models", responses=_errors(*v1_errors), openapi_extra=auth)
    def models(http: Request):
        if (refused := denied(http)) is not None:
            return refused
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "megachat"}]}

    completion_doc = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/ChatCompletionRequest"}}}}, **auth}
    completion_responses = {
        200: {"description": "a chat.completion object, or with stream: true server-sent chat.completion.chunk "
                             "events ending in data: [DONE]",
              "content": {"application/json": {"schema": {"type": "object"}},
                          "text/event-stream": {"schema": {  # each event's data
                              "anyOf": [{"type": "object", "description": "a chat.completion.chunk, or an error"},
                                        {"type": "string", "enum": ["[DONE]"]}]}}}},
        **_errors(400, *v1_errors, 413, 500, 503)}

    @app.post("/v1/chat/completions", openapi_extra=completion_doc, responses=completion_responses)
    async def chat_completions(http: Request):
        if (refused := denied(http)) is not None:
            return refused
        body = bytearray()
        async for chunk in http.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return error(RequestError(f"request body over {MAX_BODY_BYTES} bytes", 413))
        try:
            req = parse_request(bytes(body), engine.tokenizer, engine.max_len, defaults)
            loop, events = asyncio.get_running_loop(), asyncio.Queue()

            def emit(event):  # on the worker thread
                with contextlib.suppress(RuntimeError):  # the loop closed (server shutting down)
                    loop.call_soon_threadsafe(events.put_nowait, event)

            job = worker.submit({"ids": req.ids, "sampling": req.sampling}, emit)
        except RequestError as e:
            return error(e)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        async def watch():  # the client leaving frees its row at the engine's next step
            while (await http.receive())["type"] != "http.disconnect":
                pass
            job.cancelled = True

        watcher = asyncio.ensure_future(watch())

        def usage(completion_tokens):
            return {"prompt_tokens": len(req.ids), "completion_tokens": completion_tokens,
                    "total_tokens": len(req.ids) + completion_tokens}

        if not req.stream:
            pieces = []
            try:
                while (event := await events.get())[0] == "piece":
                    pieces.append(event[1])
            finally:
                job.cancelled = True
                watcher.cancel()
            if event[0] == "error":
                return error(event[1])
            message = {"role": "assistant", "content": "".join(pieces)}
            return {**head, "object": "chat.completion", "usage": usage(event[2]),
                    "choices": [{"index": 0, "message": message, "finish_reason": event[1]}]}

        def sse(choices, **extra):
            return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

        async def chunks():
            try:
                yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                while (event := await events.get())[0] == "piece":
                    delta = {"content": event[1], **({"tool": event[2]} if event[2] else {})}
                    yield sse([{"index": 0, "delta": delta, "finish_reason": None}])
                if event[0] == "error":
                    yield f"data: {json.dumps(event[1].body())}\n\n"
                else:
                    yield sse([{"index": 0, "delta": {}, "finish_reason": event[1]}])
                    if req.include_usage:
                        yield sse([], usage=usage(event[2]))
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True
                watcher.cancel()

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
