"""Memory (and, with a GPU, time) of the loss: the LM head and the softcapped cross-entropy fused, a chunk of tokens
at a time (`megachat.tensor_parallel.vocab_parallel_linear_loss`, what training runs), against the unfused path
(the [tokens x vocab shard] logits from F.linear, then `vocab_parallel_loss`).

Always (no GPU needed):
- d20 (65,536 tokens per micro-batch, n_embd 1280, vocab 65,536, bf16) at tp = 1, 2, 4, 8: the bytes each path
  holds at its peak during forward + backward, beyond its inputs, and what it saves for backward, computed from
  the shapes and the chunk size (`peak_bytes`; the GPU path, whose Triton kernels allocate only their outputs);
- the same two paths measured on this CPU at a smaller shape (`measure`): every tensor the forward and backward
  create is counted while it lives (`LiveBytes`, a TorchDispatchMode) and every tensor autograd saves
  (saved_tensors_hooks). The CPU runs the torch reference of the kernels, whose fp32 temporaries are of the
  logits' size (unfused) or of a chunk's (fused).
With a CUDA GPU: forward + backward time and torch.cuda peak memory of both paths at d20 shapes, the fused one at
several chunk sizes (to choose LOSS_CHUNK_BYTES).

    python scripts/bench_loss.py            # add --device cpu to run the timing rows on the CPU at a small shape
"""
import argparse
import contextlib
import statistics
import sys
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megachat import kernels
from megachat.tensor_parallel import loss_chunk_tokens, vocab_parallel_linear_loss, vocab_parallel_loss

D20 = dict(tokens=65536, n_embd=1280, vocab=65536)


def peak_bytes(tokens, n_embd, vocab_local, itemsize, chunk_tokens):
    """(unfused, fused) bytes the loss's forward + backward hold at their peak beyond the inputs (hidden, weight,
    targets) on the GPU path, whose kernels allocate only their outputs. Both hold three fp32 [N]: the saved
    log-sum-exp, the per-token loss and its gradient. Unfused: the logits (saved) and their gradient, while the CE
    backward runs. Fused: d hidden [N, C], the fp32 d weight sum [V, C], and one chunk's logits and their gradient
    (or the gradient and the chunk's d weight term)."""
    N, C, V, b, K = tokens, n_embd, vocab_local, itemsize, min(chunk_tokens, tokens)
    unfused = 2 * N * V * b + 3 * N * 4
    fused = N * C * b + V * C * 4 + max(2 * K * V * b, K * V * b + V * C * b) + 3 * N * 4
    return unfused, fused


def saved_bytes(tokens, vocab_local, itemsize):
    """(unfused, fused) bytes saved for backward beyond hidden, weight and targets: the logits, or the fp32
    log-sum-exp (the unfused path saves that too)."""
    return tokens * vocab_local * itemsize + tokens * 4, tokens * 4


class LiveBytes(TorchDispatchMode):
    """Counts the storages of the tensors every op creates under it while they live: `peak` bytes at once,
    `largest` single storage. Tensors that existed before (inputs, weights) are not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._seen = set()
        self._counting = True

    @contextlib.contextmanager
    def uncounted(self):
        """Ops within it are not counted (nor are the tensors they create, later)."""
        self._counting = False
        try:
            yield
        finally:
            self._counting = True

    def _freed(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views, in-place and out= ops return a storage of their arguments: not a new one
        given = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0] if self._counting else ():
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()  # the same Python object while the storage lives
                if id(storage) not in self._seen and id(storage) not in given:
                    self._seen.add(id(storage))
                    self.live += storage.nbytes()
                    self.peak, self.largest = max(self.peak, self.live), max(self.largest, storage.nbytes())
                    weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
        return out


def unfused_loss(hidden, weight, targets, chunk_tokens=None):
    return vocab_parallel_loss(F.linear(hidden, weight), targets, 0, None, reduction="none")


def fused_loss(hidden, weight, targets, chunk_tokens=None):
    return vocab_parallel_linear_loss(hidden, weight, targets, 0, None, reduction="none", chunk_tokens=chunk_tokens)


def inputs(tokens, n_embd, vocab, dtype, device="cpu", seed=0):
    """hidden [tokens, n_embd] and weight [vocab, n_embd] requiring grad, targets [tokens] with every 7th ignored."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(tokens, n_embd, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, n_embd, generator=g, device=device) / n_embd ** 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    targets[::7] = -1
    return hidden, weight, targets


@contextlib.contextmanager
def _kernels_count_outputs_only(live):
    """Within it the cross-entropy kernels' torch references run uncounted and only their outputs are counted, as
    the Triton kernels allocate nothing else."""
    originals = kernels.softcap_ce_stats, kernels.softcap_ce_backward

    def outputs_only(fn):
        def run(*args, **kwargs):
            with live.uncounted():
                out = fn(*args, **kwargs)
            return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()
        return run

    kernels.softcap_ce_stats, kernels.softcap_ce_backward = map(outputs_only, originals)
    try:
        yield
    finally:
        kernels.softcap_ce_stats, kernels.softcap_ce_backward = originals


def measure(loss_fn, hidden, weight, targets, chunk_tokens=None, outputs_only=False):
    """Forward + backward of loss_fn on CPU: {"peak": bytes live at once, "largest": one tensor's bytes, "saved":
    bytes autograd saved for backward (each storage once, hidden/weight/targets included)}. outputs_only: count
    only the outputs of the cross-entropy kernels (the GPU path's allocations) instead of the reference's
    temporaries too."""
    saved = {}

    def pack(t):
        saved[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    hidden.grad = weight.grad = None
    live = LiveBytes()
    only = _kernels_count_outputs_only(live) if outputs_only else contextlib.nullcontext()
    with live, only, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(hidden, weight, targets, chunk_tokens)
        loss.backward(torch.ones_like(loss))
    return {"peak": live.peak, "largest": live.largest, "saved": sum(saved.values())}


def analytic_report(chunk_tokens=None):
    N, C, V = D20["tokens"], D20["n_embd"], D20["vocab"]
    print(f"Loss memory, d20 micro-batch ({N} tokens, n_embd {C}, vocab {V}, bf16), GPU path (peak_bytes), "
          f"beyond hidden, weight and targets:")
    print(f"{'tp':>3s} {'chunk tokens':>12s} {'unfused peak GB':>15s} {'fused peak GB':>13s} {'ratio':>6s} "
          f"{'unfused saves GB':>16s} {'fused saves MB':>14s}")
    for tp in (1, 2, 4, 8):
        v = V // tp
        k = chunk_tokens or loss_chunk_tokens(v, torch.bfloat16)
        unfused, fused = peak_bytes(N, C, v, 2, k)
        s_unfused, s_fused = saved_bytes(N, v, 2)
        print(f"{tp:3d} {k:12d} {unfused / 1e9:15.2f} {fused / 1e9:13.3f} {unfused / fused:5.1f}x "
              f"{s_unfused / 1e9:16.2f} {s_fused / 1e6:14.3f}")


def cpu_report(tokens=4096, n_embd=128, vocab=8192, chunk_tokens=512):
    """Both paths measured on this CPU at a smaller shape, fp32: counting only the CE kernels' outputs (what the
    GPU path allocates; equal to peak_bytes), and with the torch reference's temporaries."""
    args = inputs(tokens, n_embd, vocab, torch.float32)
    formula = dict(zip(("unfused", "fused"), peak_bytes(tokens, n_embd, vocab, 4, chunk_tokens)))
    print(f"\nMeasured on CPU, {tokens} tokens x vocab {vocab}, n_embd {n_embd}, fp32, fused chunk {chunk_tokens} "
          f"tokens; one fp32 logits tensor = {tokens * vocab * 4 / 1e6:.1f} MB. Peak counting the CE kernels' "
          f"outputs only (the GPU path) vs peak_bytes, then with the torch reference's temporaries (the CPU path):")
    print(f"{'path':8s} {'peak MB':>9s} {'formula MB':>10s} {'CPU path peak MB':>16s} {'largest tensor MB':>17s} "
          f"{'saved MB':>9s}")
    for name, fn in (("unfused", unfused_loss), ("fused", fused_loss)):
        gpu = measure(fn, *args, chunk_tokens=chunk_tokens, outputs_only=True)
        cpu = measure(fn, *args, chunk_tokens=chunk_tokens)
        print(f"{name:8s} {gpu['peak'] / 1e6:9.3f} {formula[name] / 1e6:10.3f} {cpu['peak'] / 1e6:16.1f} "
              f"{cpu['largest'] / 1e6:17.1f} {cpu['saved'] / 1e6:9.1f}")


def _time_ms(fn, device):
    if device == "cuda":
        import triton.testing  # the CUDA path only: a CPU run never imports triton
        return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timing_report(device, tokens, n_embd, vocab, dtype, chunks=(1024, 2048, 4096, 8192)):
    """Forward + backward time (and torch.cuda peak memory above the inputs) of both paths, fp32 d hidden/d weight
    kept out of the timing's allocations by zeroing .grad first."""
    hidden, weight, targets = inputs(tokens, n_embd, vocab, dtype, device)
    flops = 2 * tokens * n_embd * vocab
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"\nTimings on {name}: {tokens} tokens x vocab {vocab}, n_embd {n_embd}, {dtype}; LM head matmuls "
          f"{flops / 1e12:.2f} TFLOP each (unfused 3, fused 4: backward recomputes the logits)")
    rows = [("unfused", unfused_loss, None)] + [(f"fused chunk {k}", fused_loss, k) for k in chunks if k <= tokens]
    for label, fn, k in rows:
        def step():
            hidden.grad = weight.grad = None
            loss = fn(hidden, weight, targets, k)
            loss.backward(torch.ones_like(loss))
        step()
        peak = ""
        if device == "cuda":
            torch.cuda.synchronize()
            hidden.grad = weight.grad = None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = f"{(torch.cuda.max_memory_allocated() - base) / 2**30:8.2f} GiB peak above the inputs"
        ms = _time_ms(step, device)
        print(f"  {label:18s} fwd+bwd {ms:10.2f} ms  {peak}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None,
                    help="run the timing rows on this device (default: cuda when available, else none)")
    args = ap.parse_args(argv)
    analytic_report()
    cpu_report()
    if args.device == "cuda":
        for tp in (1, 8):
            timing_report("cuda", D20["tokens"], D20["n_embd"], D20["vocab"] // tp, torch.bfloat16)
    elif args.device == "cpu":
        timing_report("cpu", 1024, 64, 4096, torch.float32, chunks=(128, 512))
    else:
        print("\nno CUDA device: GPU timings skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
