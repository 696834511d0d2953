"""Every Triton kernel, with the dtypes, block sizes and warps it launches with on the GPU at d20 shapes, compiles
for an H100 (sm_90) through triton.compile on this GPU-less machine: PTX and a cubin from the real ptxas, no
register spills, shared memory within the H100's 227 KB per block, and 16-byte global loads (ld.global.v4 or
16-byte cp.async); bf16 (training) and fp32 inputs. Newton-Schulz is compiled in every tile its autotuner may pick."""
import pytest
import torch

from megachat.kernels import newton_schulz_kernel, sm90_aot

SPECS = sm90_aot.all_specs("bf16") + sm90_aot.all_specs("fp32")
H100_MAX_SHARED = 227 * 1024  # dynamic shared memory one block may opt into on sm_90


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_kernel_compiles_for_h100_without_spills_and_with_16_byte_loads(spec):
    compiled = sm90_aot.compile_spec(spec)
    assert ".target sm_90a" in compiled.asm["ptx"]
    assert len(compiled.asm["cubin"]) > 0
    stats = sm90_aot.ptxas_stats(compiled)
    assert stats["spill_bytes"] == 0, f"{spec.name} spills {stats['spill_bytes']} bytes: {stats}"
    assert stats["shared"] + stats["static_smem"] <= H100_MAX_SHARED, f"{spec.name}: {stats}"
    assert sm90_aot.has_16_byte_loads(compiled), \
        f"{spec.name} global loads: {sm90_aot.global_load_widths(compiled)}"


def test_specs_cover_every_kernel_forward_and_backward():
    names = {s.name.split("[")[0] for s in SPECS}
    assert names == {"rmsnorm_fwd", "rmsnorm_bwd", "rope_fwd", "rope_bwd", "relu2_fwd", "relu2_bwd",
                     "softcap_ce_fwd", "softcap_ce_bwd", "ns_syrk", "ns_gemm"}


@pytest.mark.parametrize("dtype,compute_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_specs_cover_every_newton_schulz_autotune_config(dtype, compute_dtype):
    # The autotuned launchers' configs, read back from the triton.Autotuner objects themselves.
    for tuned, kernel in ((newton_schulz_kernel._SYRK, "ns_syrk"), (newton_schulz_kernel._GEMM, "ns_gemm")):
        configs = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                   for c in tuned[compute_dtype].configs}
        compiled = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_K"], s.num_warps, s.num_stages)
                    for s in SPECS if s.name.startswith(kernel) and f" {dtype} " in s.name}
        assert configs == compiled == set(newton_schulz_kernel.tiles(compute_dtype, interpret=False))


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name.startswith("ns_") and " bf16 " in s.name],
                         ids=lambda s: s.name)
def test_newton_schulz_bf16_products_use_hopper_wgmma(spec):
    assert "wgmma" in sm90_aot.compile_spec(spec).asm["ptx"]
