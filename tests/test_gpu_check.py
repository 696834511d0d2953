"""scripts/gpu_check.py (`make gpu-check`) on a machine without CUDA: one line, exit 0, no report; and its report
writer on recorded outputs of the checks (what bench_train.py, pytest and bench_generate.py print on a GPU), with
the verdicts: losses within the tolerances pass, outside them fail, a timed-out run is reported as such. Its
parser also reads a real (CPU) bench_train.py run."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def gpu_check():
    spec = importlib.util.spec_from_file_location("megachat_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_output(loss, tokens_per_s, attention="flash-attn", mfu="38.2%", peak=61.3):
    """What scripts/bench_train.py prints at the end of a one-GPU bf16 run (recorded format)."""
    return f"""| layout | tokens/step | step ms | tokens/s | model TFLOP/s | fwd ms | bwd ms | optim ms | comm ms | MFU |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| d20 tp1 pp1 dp1 zero1 bf16 | 65536 | 171.2 | {tokens_per_s:,.0f} | 377.7 | 52.1 | 101.3 | 15.0 | 0.0 | {mfu} |

Muon step (max over ranks): 14.1 ms inside the optimizer, 0.000 MB sent by the busiest rank, minimum for the scheme 0.000 MB per rank
last step loss: {loss:.6f}; attention: {attention}
peak memory (rank 0, torch.cuda.max_memory_allocated): {peak:.2f} GiB
"""


def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "r.md")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines() == ["gpu-check: no CUDA device here (torch.cuda.is_available() is False); "
                                                "nothing to check"]
    assert not (tmp_path / "r.md").exists()


def test_the_report_from_recorded_outputs_gives_numbers_and_verdicts(tmp_path):
    g = gpu_check()
    kernels = g.Check("kernels", "kernels")
    kernels.runs.append(g.Run(["pytest"], 1, 40.0, "...F...\n=== 1 failed, 17 passed in 39.1s ==="))
    g.judge_kernels(kernels)
    attention = g.Check("attention", "flash vs sdpa")
    attention.runs += [g.Run(["bench_train.py"], 0, 50.0, train_output(5.1234, 400_000)),
                       g.Run(["bench_train.py", "--sdpa"], 0, 55.0, train_output(5.1301, 300_000, "sdpa"))]
    g.judge_attention(attention)
    d20 = g.Check("d20", "d20")
    bf16 = g.Run(["bench_train.py"], 0, 60.0, train_output(6.0, 382_000))
    d20.runs.append(bf16)
    g.judge_d20(d20, {"memory_gib": 64.6, "mfu": 0.497, "step_s": 0.466})
    fp8 = g.Check("fp8", "fp8")
    fp8.runs.append(g.Run(["bench_train.py", "--fp8"], 0, 60.0, train_output(6.2, 500_000)))  # 3.3 %: too far
    g.judge_fp8(fp8, bf16)
    decode = g.Check("decode", "decode")
    decode.runs.append(g.Run(["bench_generate.py"], None, 90.0, "| depth | batch |\n[gpu_check: timed out after 90 s]"))
    g.judge_decode(decode)

    assert not kernels.ok and kernels.findings == ["1 failed, 17 passed in 39.1s"]
    assert attention.ok and "loss differs by 0.13%" in attention.findings[0]
    assert "flash / sdpa tokens/s 1.33x" in attention.findings[0]
    assert d20.ok and d20.findings == [
        "measured: MFU 38.2%, 382,000 tokens/s, 171 ms/step, peak memory 61.3 GiB (allocated)",
        "planned (megachat.planner, same layout): MFU 49.7%, 466 ms/step, memory 64.6 GiB (with its 2 GiB runtime "
        "reserve)"]
    assert not fp8.ok and "fp8 loss 6.2000 vs bf16 6.0000 after 50 steps: 3.33% (tolerance 2%)" in fp8.findings[0]
    assert not decode.ok

    report = tmp_path / "gpu_check.md"
    g.write_report([kernels, attention, d20, fp8, decode], report, "1 x NVIDIA H100 80GB HBM3 (79 GiB)",
                   "2026-12-03 14:00:00")
    text = report.read_text()
    assert text.startswith("# megachat gpu-check: 1 x NVIDIA H100 80GB HBM3 (79 GiB)\n")
    for row in ("| kernels | FAILED | 40 | 1 failed, 17 passed in 39.1s |", "| attention | ok | 105 |",
                "| d20 | ok | 60 | measured: MFU 38.2%", "| fp8 | FAILED | 60 |", "| decode | timed out | 90 |"):
        assert row in text, row
    assert "## d20: d20" in text and "`bench_train.py --fp8` (exit 0, 60 s)" in text
    assert "[gpu_check: timed out after 90 s]" in text


def test_a_failed_fp8_run_reports_its_last_line():
    g = gpu_check()
    fp8 = g.Check("fp8", "fp8")
    fp8.runs.append(g.Run(["bench_train.py", "--fp8"], 1, 3.0, "Traceback ...\nValueError: --fp8 needs Transformer "
                                                                   "Engine: pip install transformer-engine[pytorch]"))
    g.judge_fp8(fp8, None)
    assert not fp8.ok and fp8.findings == ["--fp8 failed: ValueError: --fp8 needs Transformer Engine: pip install "
                                           "transformer-engine[pytorch]"]


@pytest.mark.timeout(180)
def test_the_parser_reads_a_real_bench_train_run():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--depth", "1", "--max-seq-len",
                           "16", "--device-batch-size", "1", "--vocab-size", "64", "--zero", "0", "--dtype", "fp32",
                           "--steps", "1", "--warmup", "0"], capture_output=True, text=True, cwd=ROOT, timeout=170,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = gpu_check().parse_train(proc.stdout)
    assert got["tokens_per_s"] > 0 and got["step_ms"] > 0 and 0 < got["loss"] < 10 and got["attention"] == "sdpa"
    assert "mfu" not in got and "peak_gib" not in got  # CPU: no MFU column, no CUDA memory
