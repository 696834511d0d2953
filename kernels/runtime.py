"""What the Triton kernel modules share at run time; imports nothing else from `kernels/`.

`interpreting()` picks the interpreter's block sizes, `FP_FUSION` is passed to every launch, and `KernelSpec`
is the plain record each kernel module's `h100_specs()` fills for the compile-ahead tooling (`sm90_aot.py`).
"""
import os
from dataclasses import dataclass

# Every launch (and every compile ahead) asks for fused multiply-adds explicitly: Triton's default until 3.9,
# which warns that 3.10 turns the default off. The kernels' tests hold with FMAs on.
FP_FUSION = True


def interpreting():
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class KernelSpec:
    """One GPU launch of a Triton kernel at the d20 shape: its arguments as the JIT would see them, the traffic."""
    name: str
    kernel: object  # the @triton.jit function
    pointers: dict  # tensor argument -> element type ("bf16", "fp32", "i32", "i64"); torch allocations are aligned
    ints: dict  # integer argument -> its value at the d20 shape (specialized as the JIT does: 1, multiple of 16)
    floats: tuple  # float scalar arguments (fp32)
    constexprs: dict
    num_warps: int
    num_stages: int = 3
    bytes_moved: int = 0  # HBM bytes per call at the d20 shape
    flops: int = 0  # floating-point operations per call at the d20 shape
    bound: str = "memory"  # "memory" or "compute": which H100 peak the GPU timing is compared with
