"""Talk to a trained model in the terminal (nanochat's chat_cli), on one process or tensor-parallel.

    python scripts/chat_cli.py --run RUN_DIR [--temperature 0.6] [--top-k 50] [--max-tokens 256] [--seed 42]
    python scripts/chat_cli.py --run RUN_DIR -p "Why is the sky blue?"          (answer one prompt, then exit)
    deepspeed --num_gpus N scripts/chat_cli.py --run RUN_DIR --tp N

Each line read is the user's next turn of one conversation; the assistant's reply is printed token by token as it
is generated, a calculator call inline as [python: EXPR][output: RESULT] (dimmed on a terminal). The reply goes
back into the conversation as nanochat's parts (text, python, python_output), so the next prompt holds the tool
call as the model made it. /clear starts a new conversation; /quit or end of input exits.
A turn whose prompt plus --max-tokens exceeds the engine's maximum length (10 x the run's sequence_len) is
refused with one line and the session goes on without it: /clear, or a lower --max-tokens, makes room.
Under tp, rank 0 reads and prints; each line is broadcast (megachat.chat.share) so that every rank decodes the
same turn, and /quit or end of input stops every rank.
"""
import argparse
import itertools
import sys
from dataclasses import replace

import torch.distributed as dist

from megachat import cli
from megachat.chat import is_talker, load_chat, prompt_ids, share, stream_reply
from megachat.engine import Sampling

COMMANDS = "/clear starts a new conversation, /quit (or end of input) exits"
DEFAULT_SAMPLING = Sampling(max_tokens=256, temperature=0.6, top_k=50, seed=42)  # nanochat's chat_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="RUN_DIR of a training run (config.json, model/)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (launch as many with deepspeed)")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    d = DEFAULT_SAMPLING
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=d.top_k, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="most tokens per reply")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed of every reply")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    args = p.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or args.max_tokens < 1:
        p.error(f"--temperature {args.temperature} and --top-k {args.top_k} must be >= 0, --max-tokens "
                f"{args.max_tokens} >= 1")
    if args.prompt is not None and not args.prompt.strip():
        p.error("-p needs a non-empty prompt")
    args.sampling = replace(d, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k or None,
                            seed=args.seed)
    return args


class Output:
    """stdout on the rank that talks to the user (nothing elsewhere); tool calls dimmed on a terminal."""

    def __init__(self, talker: bool):
        self.talker, self.tty = talker, sys.stdout.isatty()

    def write(self, text: str, dim: bool = False) -> None:
        if self.talker:
            sys.stdout.write(f"\x1b[2m{text}\x1b[0m" if dim and self.tty else text)
            sys.stdout.flush()


def answer(engine, messages, args, out: Output, label: str = "") -> list[dict]:
    """Stream the assistant's reply to `messages` to `out` after `label`; returns it as nanochat parts. Raises the
    engine's ValueError, before printing anything, when the prompt plus --max-tokens does not fit."""
    events = stream_reply(engine, prompt_ids(engine.tokenizer, messages), args.sampling)
    first = next(events, None)  # the engine checks the request's length here
    out.write(label)
    parts = []
    for kind, text in itertools.chain([first] if first else [], events):
        if kind == "text":
            out.write(text)
            if parts and parts[-1]["type"] == "text":
                parts[-1]["text"] += text
            else:
                parts.append({"type": "text", "text": text})
        else:
            out.write(f"[{kind}: {text}]", dim=True)
            parts.append({"type": "python" if kind == "python" else "python_output", "text": text})
    out.write("\n")
    return parts


def read_line(talker: bool, interactive: bool):
    """The user's next line, read by rank 0 and shared with every rank; None at end of input."""
    line = None
    if talker:
        try:
            line = input("User: " if interactive else "")
        except EOFError:
            if interactive:
                print()
    return share(line)


def main(argv=None):
    args = parse_args(argv)
    engine, _ = load_chat(args.run, args.tp)
    talker = is_talker()
    out = Output(talker)
    if args.prompt is not None:
        answer(engine, [{"role": "user", "content": args.prompt}], args, out)
    else:
        interactive = talker and sys.stdin.isatty()
        if interactive:
            import readline  # noqa: F401  (line editing and history for input(); only on a terminal)
            print(f"megachat chat with {args.run} (tp {args.tp}); {COMMANDS}")
        messages = []
        while (line := read_line(talker, interactive)) is not None:
            line = line.strip()
            if line == "/quit":
                break
            if line == "/clear":
                messages = []
                out.write("(new conversation)\n")
                continue
            if not line:
                continue
            if line.startswith("/"):
                out.write(f"unknown command {line.split()[0]}: {COMMANDS}\n")
                continue
            messages.append({"role": "user", "content": line})
            try:
                parts = answer(engine, messages, args, out, label="Assistant: ")
            except ValueError as error:  # the conversation no longer fits the engine
                messages.pop()
                out.write(f"{error} (/clear starts a new conversation)\n")
                continue
            if parts:
                messages.append({"role": "assistant", "content": parts})
            else:  # nanochat's format has no empty message: the turn is left out
                messages.pop()
                out.write("(empty reply: this turn is left out of the conversation)\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    cli.run(main)
