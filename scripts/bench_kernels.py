"""Numbers for the fused Triton kernels.

Always (no GPU needed): for every kernel launch at d20 sizes (n_embd 1280, seq 2048, batch 32 -> 65,536 tokens,
vocab 65,536, 10 heads of 128; Newton-Schulz in every tile its autotuner may pick) the HBM bytes and FLOPs per
call, and from the code compiled for an H100 (sm_90): registers, spills, shared memory, whether global loads
are 16 bytes wide, and the H100 lower bound on the time (bytes / 3.35 TB/s or FLOPs / 989 TFLOP/s); and the
activation memory relu2 saves (its backward reads the output, not the input).
With a CUDA GPU: each kernel timed against the torch eager reference and torch.compile of it, with % of HBM
bandwidth (memory-bound kernels) or % of dense bf16 peak (Newton-Schulz), the cross-entropy's peak memory, and
the Newton-Schulz tiles the autotuner picked.

    python scripts/bench_kernels.py            # static report; GPU timings too when CUDA is available
    python scripts/bench_kernels.py --only rope
"""
import argparse
import os
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated so it does not warn

import torch  # noqa: E402
import triton.testing  # noqa: E402

from megachat import kernels  # noqa: E402
from megachat.kernels import (newton_schulz_kernel, reference, relu2_kernel, rmsnorm_kernel,  # noqa: E402
                              rope_kernel, sm90_aot, softcap_ce_kernel)
from megachat.tensor_parallel import vocab_parallel_linear_loss, vocab_parallel_loss  # noqa: E402

HBM = sm90_aot.H100_HBM_BYTES_PER_S
PEAK = sm90_aot.H100_BF16_FLOPS


def static_report(specs):
    width = max(len(s.name) for s in specs)
    print(f"{'kernel (d20 shape)':{width}s} {'MB/call':>9s} {'GFLOP':>8s} {'regs':>5s} {'spill B':>7s} "
          f"{'smem KB':>7s} {'16B loads':>9s} {'H100 floor us':>13s}")
    for spec in specs:
        compiled = sm90_aot.compile_spec(spec)
        st = sm90_aot.ptxas_stats(compiled)
        floor_s = max(spec.bytes_moved / HBM, spec.flops / PEAK)
        wide = "yes" if sm90_aot.has_16_byte_loads(compiled) else "NO"
        print(f"{spec.name:{width}s} {spec.bytes_moved / 1e6:9.1f} {spec.flops / 1e9:8.2f} {st['registers']:5d} "
              f"{st['spill_bytes']:7d} {st['shared'] / 1024:7.1f} {wide:>9s} {floor_s * 1e6:13.1f}")


def relu2_memory_report(tokens=65536, n_embd=1280, n_layer=20):
    """Bytes relu2 saves against autograd of relu(h)²: its backward reads its output y (which c_proj keeps anyway),
    not h."""
    h = tokens * 4 * n_embd * 2  # h = c_fc(x), bf16
    print(f"\nReLU² activation memory, d20 bf16, tp = 1 (divide by tp): autograd of relu(h)² would keep "
          f"h = c_fc(x) [{tokens} x {4 * n_embd}]\nbeside y = relu(h)², which c_proj keeps; relu2's backward reads y "
          f"instead: "
          f"{h / 1e6:.1f} MB less per layer, {n_layer * h / 1e9:.2f} GB less over {n_layer} layers per micro-batch")


def _bench_ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _row(label, ms, nbytes=None, flops=None):
    extra = ""
    if nbytes is not None:
        extra = f"{nbytes / (ms * 1e-3) / 1e12:7.2f} TB/s = {100 * nbytes / (ms * 1e-3) / HBM:5.1f}% of HBM"
    if flops is not None:
        extra = f"{flops / (ms * 1e-3) / 1e12:7.1f} TFLOP/s = {100 * flops / (ms * 1e-3) / PEAK:5.1f}% of bf16 peak"
    print(f"  {label:34s} {ms * 1e3:10.1f} us  {extra}")


def _fwd_bwd(fn, *args, n_grad=1):
    """Forward + backward of fn(*args) with gradients for the first n_grad args (fn may return a tuple)."""
    def run():
        xs = [a.detach().requires_grad_() for a in args[:n_grad]]
        ys = fn(*xs, *args[n_grad:])
        ys = ys if isinstance(ys, tuple) else (ys,)
        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
    return run


def liger_module(name, *args, **kwargs):
    """liger_kernel.transformers.<name>(*args, **kwargs) when liger-kernel is installed (a row beside ours), else
    None (the report says so once)."""
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        if not getattr(liger_module, "said", False):
            print("  (liger-kernel not installed: no liger rows)")
            liger_module.said = True
        return None
    return getattr(liger, name)(*args, **kwargs)


def gpu_report(only, dev="cuda", tokens=65536, n_embd=1280, n_head=10, head_dim=128, seq=2048, ce_tokens=16384,
               vocab=65536, ns_sizes=((4096, 4096), (1280, 5120))):
    """Time every kernel against torch eager and torch.compile at d20 sizes (smaller sizes only for smoke runs)."""
    name = torch.cuda.get_device_name() if dev == "cuda" else dev
    print(f"\nGPU timings on {name} (median of triton.testing.do_bench; % of 3.35 TB/s HBM or 989 TFLOP/s bf16)")
    bf = torch.bfloat16

    def three_way(name, fused, ref, *args, n_grad=1, fwd_bytes, bwd_bytes, liger=None):
        print(name)
        compiled = torch.compile(ref)
        for label, fn in (("triton", fused), ("torch eager", ref), ("torch.compile", compiled),
                          *((("liger-kernel", liger),) if liger else ())):
            _row(f"{label} fwd", _bench_ms(lambda: fn(*args)), fwd_bytes)
            _row(f"{label} fwd+bwd", _bench_ms(_fwd_bwd(fn, *args, n_grad=n_grad)), fwd_bytes + bwd_bytes)

    if "rmsnorm" in only:
        x = torch.randn(tokens, n_embd, device=dev, dtype=bf)
        f, b = rmsnorm_kernel.h100_specs(tokens, n_embd, n_head, head_dim)[:2]
        liger = liger_module("LigerRMSNorm", n_embd, eps=torch.finfo(torch.float32).eps)  # weight of ones
        three_way(f"rmsnorm [{tokens}x{n_embd}] bf16", rmsnorm_kernel.rmsnorm, reference.rmsnorm, x,
                  fwd_bytes=f.bytes_moved, bwd_bytes=b.bytes_moved, liger=liger and liger.to(dev, bf))
    if "rope" in only:
        q = torch.randn(tokens // seq, seq, n_head, head_dim, device=dev, dtype=bf)
        k = torch.randn(tokens // seq, seq, n_head, head_dim, device=dev, dtype=bf)  # d20: no GQA
        cos = torch.randn(10 * seq, head_dim // 2, device=dev, dtype=bf)
        sin = torch.randn(10 * seq, head_dim // 2, device=dev, dtype=bf)
        f, b = rope_kernel.h100_specs(tokens, n_head, n_head, head_dim, seq)

        def rope_qk_reference(q, k, cos, sin):
            return reference.rope(q, cos, sin), reference.rope(k, cos, sin)
        three_way(f"rope q and k {list(q.shape)} each, bf16", kernels.rope_qk, rope_qk_reference, q, k, cos, sin,
                  n_grad=2, fwd_bytes=f.bytes_moved, bwd_bytes=b.bytes_moved)
    if "relu2" in only:
        x = torch.randn(tokens, 4 * n_embd, device=dev, dtype=bf)
        f, b = relu2_kernel.h100_specs(tokens, n_embd)
        three_way(f"relu2 [{tokens}x{4 * n_embd}] bf16", kernels.relu2, reference.relu2, x,
                  fwd_bytes=f.bytes_moved, bwd_bytes=b.bytes_moved)
    if "softcap_ce" in only:
        n, v = ce_tokens, vocab  # 16K tokens: the unfused path's fp32 copies of 64K tokens would not fit in 80 GB
        logits = torch.randn(n, v, device=dev, dtype=bf) * 10
        targets = torch.randint(0, v, (n,), device=dev)

        def unfused(z, t):
            return torch.nn.functional.cross_entropy((15 * torch.tanh(z / 15)).float(), t, ignore_index=-1,
                                                     reduction="none")

        def fused(z, t):  # the Triton statistics and backward under the tp = 1 autograd function
            return vocab_parallel_loss(z, t, 0, None, reduction="none")
        f, b = softcap_ce_kernel.h100_specs(tokens=n, vocab=v)
        print(f"softcap cross-entropy [{n}x{v}] bf16")
        compiled = torch.compile(unfused)
        liger = liger_module("LigerCrossEntropyLoss", ignore_index=-1, softcap=15.0)  # its mean over tokens
        for label, fn in (("triton", fused), ("torch eager", unfused), ("torch.compile", compiled),
                          *((("liger-kernel", liger),) if liger else ())):
            _row(f"{label} fwd", _bench_ms(lambda: fn(logits, targets)), f.bytes_moved)
            _row(f"{label} fwd+bwd", _bench_ms(_fwd_bwd(fn, logits, targets)), f.bytes_moved + b.bytes_moved)
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                _fwd_bwd(fn, logits, targets)()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                print(f"  {label + ' fwd+bwd peak memory':34s} {peak:10.2f} GiB above the inputs")
        # the LM head and the loss fused (what training runs: the gradients formed in forward) vs Liger's
        hidden = torch.randn(n, n_embd, device=dev, dtype=bf)
        weight = torch.randn(v, n_embd, device=dev, dtype=bf) / n_embd ** 0.5 * 10
        print(f"LM head + softcap cross-entropy fused, hidden [{n}x{n_embd}], weight [{v}x{n_embd}] bf16")
        liger = liger_module("LigerFusedLinearCrossEntropyLoss", ignore_index=-1, softcap=15.0)
        paths = (("megachat (chunked, torch matmuls)", lambda h, w: vocab_parallel_linear_loss(h, w, targets, 0, None)),
                 *((("liger-kernel", lambda h, w: liger(w, h, targets)),) if liger else ()))
        for label, fn in paths:
            _row(f"{label} fwd+bwd", _bench_ms(_fwd_bwd(fn, hidden, weight, n_grad=2)), flops=3 * 2 * n * v * n_embd)
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                _fwd_bwd(fn, hidden, weight, n_grad=2)()
                torch.cuda.synchronize()
                print(f"  {label + ' peak memory':34s} {(torch.cuda.max_memory_allocated() - base) / 2**30:10.2f} GiB")
    if "newton_schulz" in only:
        for m, n in ns_sizes:
            G = torch.randn(m, n, device=dev, dtype=torch.float32)
            # dense-equivalent FLOPs of 5 steps (what the torch version computes): X Xᵀ, A A, B X
            flops = 5 * (2 * m * m * n + 2 * m * m * m + 2 * m * m * n)
            print(f"newton_schulz {m}x{n}, 5 steps, bf16 (FLOPs counted dense: {flops / 1e12:.2f} TFLOP)")
            compiled = torch.compile(reference.newton_schulz)
            for label, fn in (("triton (symmetric)", newton_schulz_kernel.newton_schulz),
                              ("torch eager", reference.newton_schulz), ("torch.compile", compiled)):
                _row(label, _bench_ms(lambda: fn(G)), flops=flops)
        for name, tuned in (("syrk", newton_schulz_kernel._SYRK), ("gemm", newton_schulz_kernel._GEMM)):
            for key, config in tuned[torch.bfloat16].cache.items():
                print(f"  autotuned ns_{name} {key}: {config}")


KERNELS = ("rmsnorm", "rope", "relu2", "softcap_ce", "newton_schulz")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=KERNELS, action="append", help="limit to these kernels (repeatable)")
    ap.add_argument("--no-gpu", action="store_true", help="skip GPU timings even when CUDA is available")
    args = ap.parse_args(argv)
    only = tuple(args.only or KERNELS)
    prefixes = {"rmsnorm": "rmsnorm", "rope": "rope", "relu2": "relu2", "softcap_ce": "softcap_ce",
                "newton_schulz": "ns_"}
    specs = [s for s in sm90_aot.all_specs() if any(s.name.startswith(prefixes[k]) for k in only)]
    print("Static report: triton.compile for GPUTarget('cuda', 90, 32), ptxas -v from the triton wheel\n")
    static_report(specs)
    if "relu2" in only:
        relu2_memory_report()
    if torch.cuda.is_available() and not args.no_gpu:
        gpu_report(only)
    else:
        print("\nno CUDA device: GPU timings skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
