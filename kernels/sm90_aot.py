"""Compile-ahead for an H100 (sm_90) on a machine without a GPU, and the report on the compiled code.

Tooling only: it imports the kernel modules (in `all_specs`), never the reverse; what they share at run time is
in `runtime.py`. Each kernel module lists, in `h100_specs()`, the launches it makes for a d20-sized model (dtypes,
block sizes, warps, which arguments are 16-byte aligned, as Triton's JIT specializes them on the GPU), built from
the same `_config` functions its launcher uses. `compile_spec` compiles one through `triton.compile` to PTX and
cubin; `ptxas_stats` reads registers, spills and shared memory from the `ptxas -v` that ships in the triton wheel.
"""
import re
import subprocess
import tempfile
from pathlib import Path

from .runtime import FP_FUSION

H100_HBM_BYTES_PER_S = 3.35e12
H100_BF16_FLOPS = 989e12


def _jit_function(kernel):
    # Under TRITON_INTERPRET=1 @triton.jit returns an InterpretedFunction; compile needs the real JITFunction.
    from triton.runtime.jit import JITFunction
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def compile_spec(spec):
    """Compile spec for sm_90 with no GPU present; returns triton's CompiledKernel (asm has 'ptx' and 'cubin').

    Integer arguments are specialized the way triton's launcher does on the GPU: a value of 1 becomes a
    compile-time constant, a multiple of 16 gets the divisibility hint; data pointers get the hint as well.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    fn = _jit_function(spec.kernel)
    signature, constexprs, aligned = {}, dict(spec.constexprs), []
    for name, dtype in spec.pointers.items():
        signature[name] = "*" + dtype
        aligned.append(name)
    for name, value in spec.ints.items():
        if value == 1:
            constexprs[name] = 1
            continue
        signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        if value % 16 == 0:
            aligned.append(name)
    for name in spec.floats:
        signature[name] = "fp32"
    for name in constexprs:
        signature[name] = "constexpr"
    missing = [a for a in fn.arg_names if a not in signature]
    if missing:
        raise ValueError(f"{spec.name}: no value for arguments {missing}")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                   "enable_fp_fusion": FP_FUSION})


def ptxas_path():
    """The ptxas triton itself runs for sm_90 (the wheel's `ptxas-blackwell`, CUDA 13; the plain `ptxas` beside it
    is older and rejects triton's PTX version)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(90).path


def ptxas_stats(compiled):
    """Registers, spill bytes (stores + loads) and static shared memory from `ptxas -v` on the kernel's PTX,
    run with the flags triton's own cubin step uses."""
    ptx = compiled.asm["ptx"]
    arch = "sm_90a"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(ptxas_path()), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas rejected {compiled.name}: {res.stderr.strip()}")
    text = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    smem = re.search(r"(\d+) bytes smem", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spill.group(1)) + int(spill.group(2)) if spill else 0,
        "static_smem": int(smem.group(1)) if smem else 0,
        "shared": compiled.metadata.shared,  # what triton allocates (dynamic shared memory)
    }


def global_load_widths(compiled):
    """Kinds of global loads in the PTX: 'v4.b32' (16-byte vector load), 'b16', ..., and 'cp.async.16' for the
    16-byte asynchronous global->shared copies the matmul pipelines use."""
    ptx = compiled.asm["ptx"]
    kinds = set(re.findall(r"ld\.global(?:\.[a-z]+)*\.((?:v\d\.)?[bfsu]\d+)", ptx))
    kinds |= {f"cp.async.{int(n, 0)}" for n in re.findall(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(\w+)", ptx)}
    return kinds


def has_16_byte_loads(compiled):
    """True when the kernel's bulk global reads are 16 bytes wide (ld.global.v4.b32 or 16-byte cp.async)."""
    return bool(global_load_widths(compiled) & {"v4.b32", "v2.b64", "cp.async.16"})


def all_specs(dtype="bf16"):
    """Every kernel's d20 GPU launches with dtype ("bf16", the training dtype, or "fp32") data tensors."""
    from . import newton_schulz_kernel, relu2_kernel, rmsnorm_kernel, rope_kernel, softcap_ce_kernel
    return (rmsnorm_kernel.h100_specs(dtype=dtype) + rope_kernel.h100_specs(dtype=dtype)
            + relu2_kernel.h100_specs(dtype=dtype) + softcap_ce_kernel.h100_specs(dtype=dtype)
            + newton_schulz_kernel.h100_specs(dtype=dtype))
