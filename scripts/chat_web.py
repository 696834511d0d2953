"""Talk to a trained model over HTTP: an OpenAI-compatible chat API and a chat page, one process or tensor-parallel.

    python scripts/chat_web.py --run RUN_DIR [--host 127.0.0.1 --port 8000] \
        [--temperature 0.8 --top-k 50 --max-tokens 512] [--max-batch 16 --max-queue 16] [--api-key KEY]
    deepspeed --num_gpus N scripts/chat_web.py --run RUN_DIR --tp N

Then open http://127.0.0.1:8000/ or POST http://127.0.0.1:8000/v1/chat/completions (docs/chat.md, "Web server").
Under tp rank 0 serves HTTP and every rank generates each reply together (megachat.chat_server); a lost rank (dead
or stalled) ends every rank within --collective-timeout, the requests in flight answered with a 500, and the first
live rank names the lost one (megachat/watchdog.py).
"""
import argparse
import os
import socket
from dataclasses import replace

import torch
import torch.distributed as dist
import uvicorn

from megachat import cli, watchdog
from megachat.chat import is_talker, load_chat
from megachat.chat_server import DEFAULT_SAMPLING, RequestError, create_app, follow, parse_sampling
from megachat.engine import Sampling


def parse_args(argv=None):
    defaults = DEFAULT_SAMPLING  # a request's own values override these
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="RUN_DIR of a training run (config.json, model/)")
    p.add_argument("--checkpoint", default=None, help="weights to serve instead of RUN_DIR/model/ (a checkpoint, an export)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (launch that many processes)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="default when a request gives none")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="default when a request gives none")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                   help="default reply length when a request gives none")
    p.add_argument("--max-batch", type=int, default=16, help="requests generating together (the engine's batch rows)")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting for a row; more: 503")
    p.add_argument("--api-key", default=os.environ.get("MEGACHAT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MEGACHAT_API_KEY; none: open)")
    p.add_argument("--name", default=None, help="model name in responses (default: RUN_DIR's name)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--collective-timeout", type=float, default=180.0,
                   help="under tp: seconds a collective waits for a lost rank before every rank stops, naming it; "
                        "the idle server shares a heartbeat every third of it")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    args = p.parse_args(argv)
    if args.max_queue < 0 or args.max_batch < 1 or args.collective_timeout <= 0:
        p.error(f"--max-batch {args.max_batch} must be >= 1, --max-queue {args.max_queue} >= 0 and "
                f"--collective-timeout {args.collective_timeout} > 0")
    if args.api_key is not None and not args.api_key.strip():
        p.error("--api-key (or MEGACHAT_API_KEY) is empty: give a key, or unset it to serve without one")
    args.defaults = replace(defaults, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k)
    try:
        parse_sampling(vars(args.defaults), Sampling())  # the limits a request's own values must meet
    except RequestError as e:
        p.error(f"{e} (--{str(e).split()[0].replace('_', '-')})")
    return args


def check_port(host: str, port: int) -> None:
    """Fail before loading the model when the address is taken (bound as uvicorn binds it)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port or --host") from None


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get("RANK", "0") == "0":
        check_port(args.host, args.port)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    engine, _ = load_chat(args.run, args.tp, checkpoint=args.checkpoint, dtype=dtype, max_batch=args.max_batch,
                          collective_timeout=args.collective_timeout)
    with watchdog.for_job(args.run, "chat_web"):
        if is_talker():
            name = args.name or os.path.basename(os.path.normpath(args.run))
            app = create_app(engine, name, args.defaults, args.max_queue, heartbeat_s=args.collective_timeout / 3,
                             api_key=args.api_key, on_failure=lambda: setattr(server, "should_exit", True))
            server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
            key = "with an API key" if args.api_key else "without an API key"
            print(f"serving {name} (tp {args.tp}, --max-batch {args.max_batch}, {key}) at "
                  f"http://{args.host}:{args.port}/", flush=True)
            server.run()
            if app.state.worker.error is not None:  # generation failed: the requests got their 500, now stop
                raise app.state.worker.error
        else:
            follow(engine)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    cli.run(main)
