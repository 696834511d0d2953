"""megachat.chat: what the chat CLI and the chat web server share.

- `load_chat(run_dir, tp)`: join the launcher's world (or stay one process), build the run's model on a tp grid
  (pp = 1: any run's layout-free weights load under any tp), and wrap it in the inference engine.
- `prompt_ids(tokenizer, messages)`: a conversation that ends with the user's turn -> the tokens to complete
  (nanochat's chat format, then <|assistant_start|>); malformed conversations raise ValueError naming the message.
- `stream_reply(engine, ids, sampling)`: the assistant's reply, sampled as a megachat.engine.Sampling says, as
  events while it is generated: ("text", piece), ("python", expression) when the model calls the calculator and
  ("output", result) when the engine forces the result in. Text is decoded incrementally and held back while it
  ends in an incomplete UTF-8 character. `Reply` turns tokens into those events one at a time (the server feeds
  it each request's tokens from the running batch).
- `share(obj)`: under tp, rank 0 reads the user and broadcasts each request, so every rank decodes together.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megachat.checkpoint import load_run, read_run_config
from megachat.engine import Engine
from megachat.parallel import device, init_distributed, init_grid


def load_chat(run_dir: str, tp: int = 1, checkpoint: str | None = None, dtype=torch.float32,
              max_len: int | None = None, max_batch: int = 32, collective_timeout: float = 24 * 3600):
    """(engine, grid) for RUN_DIR on this rank. Collective under a launcher: every rank calls it. Every collective
    fails after collective_timeout seconds: the chat CLI's ranks other than 0 wait in share() while the user types
    (a day, not the default ten minutes); the web server's worker shares a heartbeat while idle and passes less."""
    read_run_config(run_dir)  # a wrong --run fails before any process group
    init_distributed(world_of_one=False, timeout_s=collective_timeout, grace=False)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != tp:
        raise ValueError(f"--tp {tp} but {world} processes were launched: chat runs tensor-parallel only "
                         f"(pp = dp = 1); launch --num_gpus {tp} or pass --tp {world}")
    grid = init_grid(tp, 1)
    model, tokenizer, _ = load_run(run_dir, grid, device(), dtype, weights_path=checkpoint)
    return Engine(model, tokenizer, max_len=max_len, max_batch=max_batch), grid


def prompt_ids(tokenizer, messages) -> list[int]:
    """Token ids of `messages` (user, assistant, ..., user; an optional leading system message) followed by
    <|assistant_start|>: the prompt of the assistant's next reply."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    if not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        raise ValueError(f"message {len(messages) - 1}: the conversation must end with a user message")
    ids, _ = tokenizer.render_conversation({"messages": messages}, max_tokens=1 << 62)
    return ids + [tokenizer.encode_special("<|assistant_start|>")]


class _Decoder:
    """Incremental detokenization: new text of a growing token list, holding back an incomplete character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a character split over tokens: wait for the rest
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new

    def reset(self) -> None:
        self.ids, self.sent = [], 0


class Reply:
    """The assistant's reply as events, token by token: push(token) -> the (kind, text) events it completes; kind
    is "text", "python" (the calculator expression, once its block closes) or "output" (the calculator's result,
    forced by the engine). `ended` once the model ends its turn (<|assistant_end|> or <|bos|>)."""

    def __init__(self, engine):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.kind, self.decoder, self.ended = "text", _Decoder(engine.tokenizer), False

    def push(self, token: int) -> list[tuple[str, str]]:
        engine = self.engine
        if self.ended or token in (engine.assistant_end, engine.bos):
            self.ended = True
            return []
        if token in (engine.python_start, engine.output_start):
            self.kind = "python" if token == engine.python_start else "output"
            self.decoder.reset()
        elif token in (engine.python_end, engine.output_end):
            events = [(self.kind, self.tokenizer.decode(self.decoder.ids))] if self.kind != "text" else []
            self.kind = "text"
            self.decoder.reset()
            return events
        elif self.kind == "text":
            piece = self.decoder.push(token)
            return [("text", piece)] if piece else []
        else:
            self.decoder.ids.append(token)
        return []


def stream_reply(engine, ids: list[int], sampling):
    """Yield (kind, text) events of the assistant's reply to prompt `ids` (one sample, as megachat.engine.Sampling
    `sampling` says): Reply's events as the engine generates."""
    reply = Reply(engine)
    for tokens, _ in engine.generate([ids], sampling):
        if tokens[0] is None:
            break
        yield from reply.push(tokens[0])
        if reply.ended:
            break


def share(obj=None, src: int = 0):
    """obj from rank `src` on every rank of the world (a request: rank 0 talks to the user); obj itself without
    a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def is_talker() -> bool:
    """Whether this process talks to the user (rank 0, or the only process)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
