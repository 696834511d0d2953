"""Newton-Schulz orthogonalization (nanochat's quintic, Muon's inner loop) with symmetric Triton matmuls.

Per step: A = X Xᵀ, B = b A + c A Aᵀ (A is symmetric, so A A = A Aᵀ and B is symmetric too), X = a X + B X.
The two symmetric products run in `_syrk_kernel`, which computes only the tile pairs (i <= j) of the upper
triangle and stores each tile twice (as itself and transposed), halving their FLOPs; the epilogue fuses
b A + c (A Aᵀ). `_gemm_kernel` fuses a X + B X. Operands are stored in compute_dtype (bf16 on the GPU, as
nanochat), products accumulate in fp32 and are rounded once per output, not after every op.
Tiles are picked by triton.autotune per shape on the GPU from a short list (`BF16_TILES`, `FP32_TILES`); a
program of the symmetric kernel finds its tile pair from its id (`_tile_pair`), so the grid follows the tile.
Under the interpreter the operands are widened to fp32 right after tl.load (its bf16 dot works on raw bits).
"""
import torch
import triton
import triton.language as tl

from .reference import NS_COEFFS, newton_schulz_start
from .runtime import FP_FUSION, KernelSpec, interpreting


@triton.jit
def _tile_pair(p):
    """(i, j), i <= j, of upper-triangle tile pair number p, numbered column by column: p = j (j + 1) / 2 + i.
    j from the fp32 square root, then corrected by one either way in exact integers."""
    j = ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > p, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= p, j + 1, j)
    return p - j * (j + 1) // 2, j


@triton.jit
def _syrk_kernel(X, C, OUT, M, K, stride_xb, stride_xm, stride_xk, stride_cb, stride_cm, stride_cn,
                 stride_ob, stride_om, stride_on, alpha, beta, HAS_C: tl.constexpr, FP32_DOT: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT = alpha * X Xᵀ (+ beta * C, C symmetric) for X [M, K], on tile pair number program_id(0)."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    ti, tj = _tile_pair(pid)
    ri = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = tj * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    xb = X + bid * stride_xb
    acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(xb + ri[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(ri[:, None] < M) & (kk[None, :] < K), other=0.0)
        bt = tl.load(xb + rj[None, :] * stride_xm + kk[:, None] * stride_xk,
                     mask=(rj[None, :] < M) & (kk[:, None] < K), other=0.0)
        if FP32_DOT:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    acc = acc * alpha
    mask = (ri[:, None] < M) & (rj[None, :] < M)
    if HAS_C:
        cij = tl.load(C + bid * stride_cb + ri[:, None] * stride_cm + rj[None, :] * stride_cn, mask=mask, other=0.0)
        acc += beta * cij.to(tl.float32)
    out = acc.to(OUT.dtype.element_ty)
    ob = OUT + bid * stride_ob
    tl.store(ob + ri[:, None] * stride_om + rj[None, :] * stride_on, out, mask=mask)
    if ti != tj:
        tl.store(ob + rj[:, None] * stride_om + ri[None, :] * stride_on, tl.trans(out), mask=tl.trans(mask))


@triton.jit
def _gemm_kernel(P, Q, C, OUT, M, N, K, stride_pb, stride_pm, stride_pk, stride_qb, stride_qk, stride_qn,
                 stride_cb, stride_cm, stride_cn, stride_ob, stride_om, stride_on, alpha, beta,
                 FP32_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """OUT = alpha * P Q + beta * C for P [M, K], Q [K, N], C and OUT [M, N]."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rm = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    pb = P + bid * stride_pb
    qb = Q + bid * stride_qb
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        p = tl.load(pb + rm[:, None] * stride_pm + kk[None, :] * stride_pk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        q = tl.load(qb + kk[:, None] * stride_qk + rn[None, :] * stride_qn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if FP32_DOT:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    c = tl.load(C + bid * stride_cb + rm[:, None] * stride_cm + rn[None, :] * stride_cn, mask=mask, other=0.0)
    acc = alpha * acc + beta * c.to(tl.float32)
    tl.store(OUT + bid * stride_ob + rm[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(OUT.dtype.element_ty), mask=mask)


# Tile candidates (BLOCK, BLOCK_K, num_warps, num_stages) that triton.autotune times on the GPU per shape (M, K;
# M, N, K) at the first call; all compile for sm_90 without spills (tests/test_kernels_h100_compile.py compiles
# every one). bf16 runs on wgmma: 128-wide tiles for large matrices (4096: 528 tile pairs), 64-wide ones so that
# d20's 1280-row matrices still give 210 pairs for 132 SMs. fp32 ('ieee' products, the fp32 trainer) keeps one
# tile (64x64x32 with 4 warps spills 36 bytes in A = X Xᵀ; with 8 it does not). The interpreter gets one small
# tile (autotune cannot time there) so that test matrices span several tile pairs.
BF16_TILES = ((128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3))
FP32_TILES = ((64, 32, 8, 3),)
INTERPRETER_TILES = ((32, 32, 4, 1),)


def tiles(compute_dtype, interpret):
    """The tile candidates for compute_dtype (bf16 or fp32) on the GPU or in the interpreter."""
    if interpret:
        return INTERPRETER_TILES
    return BF16_TILES if compute_dtype == torch.bfloat16 else FP32_TILES


def _autotuned(kernel, key, gemm):
    """{compute dtype: kernel under triton.autotune over that dtype's tiles} (BLOCK_N = BLOCK_M for the gemm).

    Each process times the tiles once per shape at its first call (no `cache_results`: that needs triton >= 3.4,
    and torch < 2.8 ships older triton); a restarted run may pick other tiles, which round differently in the last
    bit. The outputs never alias the inputs, so the repeated timing launches leave the results right."""
    def config(block, block_k, num_warps, num_stages):
        sizes = dict(BLOCK_M=block, BLOCK_K=block_k, **({"BLOCK_N": block} if gemm else {}))
        return triton.Config(sizes, num_warps=num_warps, num_stages=num_stages)
    return {dt: triton.autotune([config(*t) for t in tiles(dt, interpreting())], key=key)(kernel)
            for dt in (torch.bfloat16, torch.float32)}


_SYRK = _autotuned(_syrk_kernel, ["M", "K", "HAS_C"], gemm=False)
_GEMM = _autotuned(_gemm_kernel, ["M", "N", "K"], gemm=True)


def _precision(dtype, interpret):
    """(FP32_DOT, PRECISION): the interpreter widens operands to fp32 (its bf16 dot works on raw bits) with exact
    products; on the GPU bf16 operands go to wgmma as they are, fp32 ones use exact 'ieee' products."""
    if interpret:
        return True, "ieee"
    return False, "tf32" if dtype == torch.bfloat16 else "ieee"


def syrk(X, out, C=None, alpha=1.0, beta=0.0):
    """out [b, m, m] = alpha * X Xᵀ + beta * C for X [b, m, k]; C must be symmetric; tile pairs computed once."""
    nb, m, k = X.shape
    fp32_dot, precision = _precision(X.dtype, interpreting())
    Cx = out if C is None else C  # unused pointer when HAS_C is False

    def grid(meta):
        tiles_m = triton.cdiv(m, meta["BLOCK_M"])
        return tiles_m * (tiles_m + 1) // 2, nb
    _SYRK[X.dtype][grid](
        X, Cx, out, m, k, *X.stride(), *Cx.stride(), *out.stride(), float(alpha), float(beta),
        HAS_C=C is not None, FP32_DOT=fp32_dot, PRECISION=precision, enable_fp_fusion=FP_FUSION)
    return out


def gemm(P, Q, C, out, alpha=1.0, beta=1.0):
    """out [b, m, n] = alpha * P Q + beta * C for P [b, m, k], Q [b, k, n]."""
    nb, m, k = P.shape
    n = Q.size(2)
    fp32_dot, precision = _precision(P.dtype, interpreting())

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), nb
    _GEMM[P.dtype][grid](
        P, Q, C, out, m, n, k, *P.stride(), *Q.stride(), *C.stride(), *out.stride(), float(alpha), float(beta),
        FP32_DOT=fp32_dot, PRECISION=precision, enable_fp_fusion=FP_FUSION)
    return out


@torch.no_grad()
def newton_schulz(G, steps=5, compute_dtype=torch.bfloat16):
    """nanochat's quintic Newton-Schulz of G [..., m, n] in compute_dtype; returns G's dtype."""
    if compute_dtype not in _SYRK:
        raise ValueError(f"newton_schulz: the Triton kernels compute in bf16 or fp32, not {compute_dtype}; pass "
                         f"compute_dtype=torch.bfloat16 or torch.float32")
    a, b, c = NS_COEFFS
    X, transposed = newton_schulz_start(G, compute_dtype)
    shape = X.shape
    X = X.reshape(-1, shape[-2], shape[-1]).contiguous()
    nb, m, _ = X.shape
    A = torch.empty(nb, m, m, dtype=compute_dtype, device=X.device)
    B = torch.empty_like(A)
    Y = torch.empty_like(X)
    for _ in range(steps):
        syrk(X, out=A)
        syrk(A, out=B, C=A, alpha=c, beta=b)
        gemm(B, X, C=X, out=Y, alpha=1.0, beta=a)
        X, Y = Y, X
    X = X.view(shape)
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def h100_specs(sizes=((1280, 5120), (1280, 1280), (4096, 4096)), dtype="bf16"):
    """Launches for d20's MLP and attention matrices and a 4096x4096 matrix (one of each kernel per
    Newton-Schulz step), in every tile the autotuner may pick; contiguous [1, m, n] operands as `newton_schulz`
    makes them; bf16 is the default."""
    size = 2 if dtype == "bf16" else 4
    compute_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    _, precision = _precision(compute_dtype, interpret=False)
    specs = []
    for m, n in sizes:
        for block, block_k, num_warps, num_stages in tiles(compute_dtype, interpret=False):
            tile = f"tile {block}x{block}x{block_k} w{num_warps} s{num_stages}"
            common = {"FP32_DOT": False, "PRECISION": precision, "BLOCK_M": block, "BLOCK_K": block_k}
            t = triton.cdiv(m, block)
            frac = t * (t + 1) / 2 / t ** 2  # share of the output tiles the symmetric kernel computes
            for has_c, k in ((False, n), (True, m)):
                ints = {"M": m, "K": k, "stride_xb": m * k, "stride_xm": k, "stride_xk": 1, "stride_cb": m * m,
                        "stride_cm": m, "stride_cn": 1, "stride_ob": m * m, "stride_om": m, "stride_on": 1}
                specs.append(KernelSpec(
                    f"ns_syrk[{'B=bA+cAAt' if has_c else 'A=XXt'} {m}x{k}, G {m}x{n} {dtype} {tile}]", _syrk_kernel,
                    {"X": dtype, "C": dtype, "OUT": dtype}, ints, ("alpha", "beta"), {**common, "HAS_C": has_c},
                    num_warps, num_stages, bytes_moved=size * (m * k + m * m * (2 if has_c else 1)),
                    flops=int(2 * m * m * k * frac), bound="compute"))
            ints = {"M": m, "N": n, "K": m, "stride_pb": m * m, "stride_pm": m, "stride_pk": 1, "stride_qb": m * n,
                    "stride_qk": n, "stride_qn": 1, "stride_cb": m * n, "stride_cm": n, "stride_cn": 1,
                    "stride_ob": m * n, "stride_om": n, "stride_on": 1}
            specs.append(KernelSpec(
                f"ns_gemm[X=aX+BX {m}x{m}@{m}x{n}, G {m}x{n} {dtype} {tile}]", _gemm_kernel,
                {"P": dtype, "Q": dtype, "C": dtype, "OUT": dtype}, ints, ("alpha", "beta"),
                {**common, "BLOCK_N": block}, num_warps, num_stages,
                bytes_moved=size * (m * m + 3 * m * n), flops=2 * m * m * n, bound="compute"))
    return specs
