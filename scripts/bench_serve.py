"""Load test of the chat server: N concurrent streaming clients against scripts/chat_web.py on 127.0.0.1.

    python scripts/bench_serve.py [--clients 1 4 16 64] [--requests 2] [--max-tokens 64] [--soak-s 60]
    python scripts/bench_serve.py --url http://127.0.0.1:8000 [--api-key KEY]    # a server already running

Without --url it writes a run of the CPU d4 model (4 layers, width 256, random weights, greedy so that every reply
runs to --max-tokens; a 4,096-token tokenizer trained on tests/fixtures/demo_corpus_sample.jsonl) to a temporary
directory, starts `scripts/chat_web.py --max-batch B --max-queue Q` on a free port (one torch thread), and prints:

- per client count: aggregate completion tokens/s over the phase, time to first token and time per output token
  (each request's (last token - first token) / (tokens - 1)) at p50 and p99, the 503 count (a client told 503 waits
  Retry-After and asks again), and the server's RSS after the phase; of --rounds runs of each count, interleaved
  (1, 4, 16, 64, 1, 4, ...), the fastest, so that other load on a shared machine biases no count;
- a soak: --soak-clients clients asking in a loop for --soak-s seconds: every status seen, whether the server is
  still up, and its RSS growth after the warm-up phases;
- the prefill stall: in-process, the median and the longest engine step while --stall-rows rows decode and a
  --stall-prompt-token prompt joins, with the engine's chunked prefill and with the whole prompt in one forward
  (each the shortest of --rounds interleaved runs).
"""
import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from megachat import sharded
from megachat.checkpoint import load_run
from megachat.engine import Engine, Sampling
from megachat.model import GPTConfig, nanochat_shapes
from megachat.parallel import Grid, free_port
from megachat.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fixtures" / "demo_corpus_sample.jsonl"
WORDS = "the a cat dog sat ran on under over house tree river story time once upon there was".split()


def write_run(root: Path, depth: int, vocab: int, seq_len: int) -> Path:
    """A RUN_DIR of random weights at nanochat's sizing for `depth`, with a tokenizer trained on the sample corpus."""
    texts = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    tok = Tokenizer.train(iter(texts), vocab_size=vocab)
    tok.save(str(root / "tokenizer"))
    cfg = GPTConfig.from_depth(depth, vocab, seq_len)
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(s, generator=g) / (1.0 if "wte" in n else s[1] ** 0.5)
               for n, s in nanochat_shapes(cfg).items()}
    weights["lm_head.weight"][-9:] = 0  # the special tokens never win the argmax: every reply runs to max_tokens
    sharded.save_full(str(root / "model"), weights, cfg)
    model = {k: getattr(cfg, k) for k in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")}
    (root / "config.json").write_text(json.dumps({"model": model, "tokenizer": str(root / "tokenizer")}))
    return root


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def percentile(values, q):
    """The q-th percentile (nearest rank) of values; nan when empty."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


async def one_request(client, url, body, stats):
    """One streaming request, retried after Retry-After while the server answers 503; records its timings."""
    while True:
        sent = time.perf_counter()
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
            if r.status_code == 503:
                await r.aread()
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                if stats.get("stop_at") and time.perf_counter() > stats["stop_at"]:
                    return
                continue
            if r.status_code != 200:
                await r.aread()
                stats["errors"].append(f"{r.status_code}: {r.text[:200]}")
                return
            times, tokens = [], 0
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
            if times:
                stats["ttft"].append(times[0] - sent)
                if len(times) > 1:
                    stats["tpot"].append((times[-1] - times[0]) / (len(times) - 1))
            stats["tokens"] += tokens
            return


async def clients(url, n, requests, max_tokens, headers, until=None):
    """n clients, each sending `requests` streaming requests one after another (or, with `until`, looping until
    that perf_counter time): their timings and statuses."""
    stats = {"status": {}, "ttft": [], "tpot": [], "tokens": 0, "errors": [], "stop_at": until}
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        async def one_client(i):
            rng, k = random.Random(i), 0
            while (until is None and k < requests) or (until is not None and time.perf_counter() < until):
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
                body = {"messages": [{"role": "user", "content": prompt}], "stream": True, "temperature": 0,
                        "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
                await one_request(client, url, body, stats)
                k += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(n)))
        stats["wall"] = time.perf_counter() - t0
    return stats


def prefill_stall(run: Path, rows: int, prompt_tokens: int, chunk: int) -> tuple[float, float]:
    """(median decode step s, longest step s) while `rows` rows decode and one prompt of prompt_tokens joins."""
    model, tok, _ = load_run(str(run), Grid(), torch.device("cpu"))
    engine = Engine(model, tok, max_batch=rows + 1, prefill_chunk=chunk)
    greedy = Sampling(max_tokens=64, temperature=0)
    for i in range(rows):
        engine.submit([[tok.bos_id] + [100 + i] * 16], greedy)
    for _ in range(8):  # every row decoding, the cache grown
        engine.step()
    engine.submit([[tok.bos_id] + [200 + i % 50 for i in range(prompt_tokens - 1)]], greedy)
    steps = []
    for _ in range(24):
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    return statistics.median(steps), max(steps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start one on the d4 model)")
    p.add_argument("--api-key", default=os.environ.get("MEGACHAT_API_KEY"))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--rounds", type=int, default=3, help="runs of each client count (interleaved); the fastest shown")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--soak-clients", type=int, default=64)
    p.add_argument("--soak-s", type=float, default=60, help="0: no soak")
    p.add_argument("--stall-rows", type=int, default=15)
    p.add_argument("--stall-prompt", type=int, default=2048)
    args = p.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    proc, url = None, args.url
    if url is None:
        run = write_run(Path(tmp.name), args.depth, args.vocab, seq_len=256)
        port = free_port()
        cmd = [sys.executable, str(ROOT / "scripts" / "chat_web.py"), "--run", str(run), "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
        log = open(Path(tmp.name) / "server.log", "w")
        proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the server did not start: {(Path(tmp.name) / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
    try:
        print(f"server: {url}, --max-batch {args.max_batch} --max-queue {args.max_queue}; d{args.depth}, vocab "
              f"{args.vocab}, greedy replies of {args.max_tokens} tokens, {args.requests} requests per client, the "
              f"fastest of {args.rounds} rounds\n")
        print("| clients | tokens/s | vs 1 client | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) "
              "| 503s | server RSS (MiB) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        best = {}  # client count -> (its fastest round's stats, the server's RSS after it)
        for _ in range(args.rounds):  # rounds interleave the client counts: a busy spell hits all of them alike
            for n in args.clients:
                s = asyncio.run(clients(url, n, args.requests, args.max_tokens, headers))
                if s["errors"]:
                    raise RuntimeError(f"{len(s['errors'])} requests failed, e.g. {s['errors'][0]}")
                s["rate"] = s["tokens"] / s["wall"]
                if n not in best or s["rate"] > best[n][0]["rate"]:
                    best[n] = (s, rss_bytes(proc.pid) if proc else None)
        base = best[args.clients[0]][0]["rate"]
        for n in args.clients:
            s, rss = best[n]
            print(f"| {n} | {s['rate']:,.0f} | {s['rate'] / base:.2f}x | {percentile(s['ttft'], 50) * 1e3:,.0f} | "
                  f"{percentile(s['ttft'], 99) * 1e3:,.0f} | {percentile(s['tpot'], 50) * 1e3:.1f} | "
                  f"{percentile(s['tpot'], 99) * 1e3:.1f} | {s['status'].get(503, 0)} | "
                  f"{f'{rss / 2 ** 20:,.0f}' if rss else '-'} |", flush=True)
        if args.soak_s > 0:
            warm = rss_bytes(proc.pid) if proc else None
            s = asyncio.run(clients(url, args.soak_clients, 0, args.max_tokens, headers,
                                    until=time.perf_counter() + args.soak_s))
            up = httpx.get(f"{url}/health", timeout=10).status_code == 200 and (proc is None or proc.poll() is None)
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(s["status"].items()))
            print(f"\n| soak | seconds | statuses | server up | tokens/s | RSS after warm-up (MiB) | RSS after soak "
                  f"(MiB) | growth |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
            if proc:
                end = rss_bytes(proc.pid)
                print(f"| {args.soak_clients} clients | {s['wall']:.0f} | {statuses} | {'yes' if up else 'NO'} | "
                      f"{s['tokens'] / s['wall']:,.0f} | {warm / 2 ** 20:,.0f} | {end / 2 ** 20:,.0f} | "
                      f"{(end - warm) / warm:+.1%} |", flush=True)
            else:
                print(f"| {args.soak_clients} clients | {s['wall']:.0f} | {statuses} | {'yes' if up else 'NO'} | "
                      f"{s['tokens'] / s['wall']:,.0f} | - | - | - |")
        if proc and args.stall_prompt:
            run = Path(tmp.name)
            print(f"\n| prefill of a {args.stall_prompt:,}-token prompt joining {args.stall_rows} decoding rows | "
                  f"median step (ms) | longest step (ms) |\n| --- | --- | --- |")
            ways = (("chunked, 256 tokens per step", 256), ("whole prompt in one step", 1 << 30))
            runs = [[prefill_stall(run, args.stall_rows, args.stall_prompt, chunk) for _, chunk in ways]
                    for _ in range(args.rounds)]  # interleaved rounds; the least disturbed (shortest) shown
            for k, (label, _) in enumerate(ways):
                med, worst = min(r[k] for r in runs)[0], min(r[k][1] for r in runs)
                print(f"| {label} | {med * 1e3:.1f} | {worst * 1e3:.1f} |", flush=True)
    finally:
        if proc:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
