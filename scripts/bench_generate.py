"""Generation speed and KV-cache memory of the inference engine (megachat.engine), printed as markdown tables.

    python scripts/bench_generate.py [--depths 4 12] [--batches 1 16] [--prompt-len 64] [--new-tokens 32]

Random weights at nanochat's sizing (depth d: d layers, 64 d wide), vocab 65,536, one process. For each depth and
batch it times prefill (one forward over the prompts, tokens/s) and decode (tokens/s over `--new-tokens` greedy
steps) with the KV cache, against a full-context recompute of every step (what generation costs without a cache),
and against the cached decode step under torch.compile (`--compile`). On a GPU it also prints decode's share of
HBM bandwidth: each step reads every weight and the whole cache once (bytes / step time / --hbm-gbps).

Memory: the peak growth of the process while generating (`--mem-depth`, batch `--mem-batch`, a cache of
`--mem-len` tokens; CPU: resident-set high-water mark, reset before the call; GPU: max allocated) against the
cache's analytic size, layers x 2 x batch x length x local KV heads x head_dim x bytes.
"""
import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import torch

from megachat import cli
from megachat.engine import Engine, KVCache, Sampling
from megachat.model import GPTConfig, build_model, nanochat_shapes


class _Specials:
    """The engine needs the special tokens' ids; a benchmark has no tokenizer: the last ids of the vocabulary."""

    def __init__(self, vocab_size):
        names = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                 "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
        self.ids = {n: vocab_size - len(names) + i for i, n in enumerate(names)}
        self.bos_id = self.ids["<|bos|>"]

    def encode_special(self, name):
        return self.ids[name]


def random_model(depth, vocab, seq_len, device, dtype):
    cfg = GPTConfig.from_depth(depth, vocab, seq_len)
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(s, generator=g) / (1.0 if "wte" in n else s[1] ** 0.5)
               for n, s in nanochat_shapes(cfg).items()}
    weights["lm_head.weight"][-9:] = 0  # special tokens never win the argmax: no row stops or calls the tool
    return build_model(cfg, device=device, weights=weights, dtype=dtype).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_engine(model, batch, prompt_len, new_tokens, device, compile_step=False):
    """(prefill tokens/s, decode tokens/s) of the cached engine, greedy, all rows decoding every step."""
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab - 9, (batch, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    forward = torch.compile(model, dynamic=False) if compile_step else model
    for _ in range(2):  # warm-up (and compile)
        cache = KVCache(model, batch, prompt_len + new_tokens)
        model(prompt, cache=cache)
        nxt = torch.zeros(batch, 1, dtype=torch.long, device=device)
        for _ in range(3):
            forward(nxt, cache=cache)
    cache = KVCache(model, batch, prompt_len + new_tokens)
    sync(device)
    t0 = time.perf_counter()
    logits = model(prompt, cache=cache)
    sync(device)
    prefill = time.perf_counter() - t0
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = forward(nxt, cache=cache)[:, -1].argmax(-1, keepdim=True)
    sync(device)
    decode = time.perf_counter() - t0
    return batch * prompt_len / prefill, batch * new_tokens / decode, cache


@torch.no_grad()
def time_recompute(model, batch, prompt_len, new_tokens, device):
    """Decode tokens/s without a cache: every step runs the whole sequence so far."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab - 9, (batch, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    model(ids)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    sync(device)
    return batch * new_tokens / (time.perf_counter() - t0)


def rss_high_water_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_rss_high_water():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the resident-set high-water mark to the current RSS


@torch.no_grad()
def cache_memory(depth, batch, length, device, dtype):
    """(measured peak growth while generating, analytic cache bytes) for one engine request that fills its cache."""
    torch.set_num_threads(1)
    model = random_model(depth, 65536, length, device, dtype)
    engine = Engine(model, _Specials(65536))
    prompts = [[1, 2, 3, 4]] * batch
    cfg, attn = model.config, model.transformer.h[0].attn
    analytic = cfg.n_layer * 2 * batch * length * attn.n_kv_head * attn.head_dim * torch.finfo(dtype).bits // 8
    greedy = Sampling(max_tokens=4, temperature=0)
    for _ in engine.generate(prompts, greedy):  # warm-up: the first forward's own buffers
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_rss_high_water()
        base = rss_high_water_bytes()
    # temperature 0 and a bos-free vocabulary keep every row decoding to the end: the cache fills completely
    for _ in engine.generate(prompts, replace(greedy, max_tokens=length - 4)):
        pass
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_high_water_bytes()
    return peak - base, analytic


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 12])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="also time the decode step under torch.compile")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--hbm-gbps", type=float, default=3350.0, help="GPU memory bandwidth (H100 SXM: 3.35 TB/s)")
    p.add_argument("--mem-depth", type=int, default=4)
    p.add_argument("--mem-batch", type=int, default=16)
    p.add_argument("--mem-len", type=int, default=4096)
    args = p.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)

    gpu = device.type == "cuda"
    print(f"device {device} ({torch.cuda.get_device_name() if gpu else f'{torch.get_num_threads()} threads'}), "
          f"{dtype}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per row\n")
    cols = ["depth", "batch", "prefill tok/s", "decode tok/s (KV cache)", "decode tok/s (recompute)", "cache speed-up"]
    if args.compile:
        cols.append("decode tok/s (compiled)")
    if gpu:
        cols.append("decode % of HBM")
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for depth in args.depths:
        model = random_model(depth, 65536, args.prompt_len + args.new_tokens, device, dtype)
        for batch in args.batches:
            prefill, decode, cache = time_engine(model, batch, args.prompt_len, args.new_tokens, device)
            recompute = time_recompute(model, batch, args.prompt_len, args.new_tokens, device)
            row = [depth, batch, f"{prefill:,.0f}", f"{decode:,.0f}", f"{recompute:,.0f}", f"{decode / recompute:.2f}x"]
            if args.compile:
                row.append(f"{time_engine(model, batch, args.prompt_len, args.new_tokens, device, True)[1]:,.0f}")
            if gpu:
                weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
                step_bytes = weight_bytes + cache.nbytes  # every weight and (at most) the whole cache per step
                row.append(f"{step_bytes * decode / batch / (args.hbm_gbps * 1e9):.1%}")
            print("| " + " | ".join(map(str, row)) + " |", flush=True)
        del model

    # in a fresh process: memory the timing runs freed stays resident in this one and would be reused unseen
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        measured, analytic = pool.submit(cache_memory, args.mem_depth, args.mem_batch, args.mem_len, device,
                                         dtype).result()
    print(f"\n| KV cache, depth {args.mem_depth}, batch {args.mem_batch}, {args.mem_len} tokens | bytes |")
    print("| --- | --- |")
    print(f"| analytic: layers x 2 x batch x length x KV heads x head_dim x {torch.finfo(dtype).bits // 8} B | "
          f"{analytic:,} |")
    print(f"| measured peak growth while generating ({'max allocated' if gpu else 'RSS high-water'}) | "
          f"{measured:,} ({measured / analytic:.1%} of analytic) |")


if __name__ == "__main__":
    cli.run(main)
