"""The first hour on a GPU in one command (`make gpu-check`, <= 10 minutes on one H100): runs every check below as
a subprocess with its own time limit, writes one markdown report and prints its path.

- kernels: every kernel's tests on CUDA against its torch reference, forward and backward, fp32 and bf16
  (tests/test_kernels_cuda.py);
- bench_kernels: scripts/bench_kernels.py (Triton vs torch.compile vs eager, and vs liger-kernel where installed);
- attention: a d12 bf16 run with flash-attn and the same with SDPA (scripts/bench_train.py --sdpa): the last
  step's loss within 1 % and tokens/s;
- d20: a 50-step d20 bf16 run (one GPU, ZeRO-1, micro-batch 32, seq 2048, vocab 65,536): MFU and peak memory beside
  megachat.planner's prediction for the same layout;
- fp8: the same d20 run with --fp8 (Transformer Engine, delayed scaling): the last step's loss within 2 % of bf16's;
- decode: KV-cache decode tokens/s (scripts/bench_generate.py);
- layouts: with 2 or more GPUs, the tp2 / pp2 / dp2 layout-equivalence tests of tests/test_train.py on NCCL (as many
  of them as the GPUs allow).

    python scripts/gpu_check.py [--out gpu_check.md] [--only kernels d20 ...]

Without CUDA it prints one line and exits 0. A check that fails or times out is reported as such, with its output's
tail, and the others still run; the exit status is 1 when any check failed.
"""
import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megachat.model import GPTConfig
from megachat.planner import GiB, Hardware, Job, Layout, predict

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
D12 = ["--depth", "12", "--dtype", "bf16", "--zero", "1", "--max-seq-len", "2048", "--device-batch-size", "16",
       "--vocab-size", "65536", "--warmup", "3", "--steps", "20"]
D20 = ["--depth", "20", "--dtype", "bf16", "--zero", "1", "--max-seq-len", "2048", "--device-batch-size", "32",
       "--vocab-size", "65536", "--warmup", "3", "--steps", "50"]
ATTENTION_TOLERANCE = 0.01  # relative difference of the last step's loss, flash-attn vs SDPA
FP8_TOLERANCE = 0.02  # relative difference of the last step's loss after 50 steps, fp8 vs bf16
# layout tests of tests/test_train.py by the GPUs they need
LAYOUT_TESTS = {2: ["tp2", "pp2"], 4: ["tp2_pp2", "tp2_dp2_zero2", "pp2_dp2_zero1"], 8: ["tp2_pp2_dp2"]}


@dataclass
class Run:
    """One subprocess of a check: its command, exit status (None: timed out), seconds and output."""
    command: list
    rc: int | None
    seconds: float
    output: str


@dataclass
class Check:
    name: str
    what: str
    runs: list = field(default_factory=list)
    ok: bool = True
    findings: list = field(default_factory=list)  # lines of the summary: the numbers and the verdicts


def run(command, timeout, env=None) -> Run:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        out += f"\n[gpu_check: timed out after {timeout} s]"
    return Run([str(c) for c in command], rc, time.perf_counter() - t0, out)


def bench_train(args, timeout, env=None) -> Run:
    return run([PY, "scripts/bench_train.py", *args], timeout, env)


def parse_train(out: str) -> dict:
    """The numbers scripts/bench_train.py prints: tokens/s, MFU, last step's loss, peak memory GiB, attention."""
    found = {}
    row = next((line for line in out.splitlines() if line.startswith("| d")), None)
    if row:
        cells = [c.strip() for c in row.strip("|").split("|")]
        found["tokens_per_s"] = float(cells[3].replace(",", ""))
        found["step_ms"] = float(cells[2])
        if cells[-1].endswith("%"):
            found["mfu"] = float(cells[-1].rstrip("%")) / 100
    m = re.search(r"last step loss: ([0-9.eE+-]+|nan|inf); attention: (.+)", out)
    if m:
        found["loss"], found["attention"] = float(m.group(1)), m.group(2).strip()
    m = re.search(r"peak memory \(rank 0, torch.cuda.max_memory_allocated\): ([0-9.]+) GiB", out)
    if m:
        found["peak_gib"] = float(m.group(1))
    return found


def parse_pytest(out: str) -> str:
    """pytest's summary line ('12 passed, 1 failed in 3.2s'), or '' when there is none."""
    lines = [line.strip("= ") for line in out.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return lines[-1] if lines else ""


def planned_d20(gpu_memory_gib: float) -> dict:
    """megachat.planner's prediction for the d20 check's layout on this one GPU."""
    job = Job(GPTConfig.from_depth(20, 65536, 2048), total_batch_size=32 * 2048, dtype="bf16")
    pred = predict(job, Layout(tp=1, pp=1, dp=1, zero=1, micro_batch=32), Hardware(gpus_per_node=1,
                                                                                   memory=gpu_memory_gib * GiB))
    return {"memory_gib": pred.memory.total / GiB, "mfu": pred.mfu, "step_s": pred.time.total}


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ---------------------------------------------------------------- the checks: each fills a Check from its runs
def judge_kernels(c: Check) -> None:
    (r,) = c.runs
    c.ok = r.rc == 0
    c.findings.append(parse_pytest(r.output) or "no pytest summary")


def judge_bench_kernels(c: Check) -> None:
    (r,) = c.runs
    c.ok = r.rc == 0
    c.findings.append("timings in the output below" if c.ok else "bench_kernels.py failed")
    if "liger-kernel" not in r.output:
        c.findings.append("liger-kernel rows absent (not installed)")


def judge_attention(c: Check) -> None:
    flash, sdpa = (parse_train(r.output) for r in c.runs)
    c.ok = all(r.rc == 0 for r in c.runs) and "loss" in flash and "loss" in sdpa
    if not c.ok:
        c.findings.append("a run failed")
        return
    diff = relative(flash["loss"], sdpa["loss"])
    c.ok = diff <= ATTENTION_TOLERANCE
    c.findings.append(f"{flash['attention']}: loss {flash['loss']:.4f}, {flash['tokens_per_s']:,.0f} tokens/s; "
                      f"sdpa: loss {sdpa['loss']:.4f}, {sdpa['tokens_per_s']:,.0f} tokens/s; loss differs by "
                      f"{diff:.2%} (tolerance {ATTENTION_TOLERANCE:.0%}); flash / sdpa tokens/s "
                      f"{flash['tokens_per_s'] / sdpa['tokens_per_s']:.2f}x")


def judge_d20(c: Check, planned: dict) -> None:
    (r,) = c.runs
    got = parse_train(r.output)
    c.ok = r.rc == 0 and "tokens_per_s" in got
    if not c.ok:
        c.findings.append("the run failed")
        return
    mfu = f"{got['mfu']:.1%}" if "mfu" in got else "n/a (peak unknown for this GPU)"
    c.findings.append(f"measured: MFU {mfu}, {got['tokens_per_s']:,.0f} tokens/s, {got['step_ms']:.0f} ms/step, "
                      f"peak memory {got.get('peak_gib', float('nan')):.1f} GiB (allocated)")
    c.findings.append(f"planned (megachat.planner, same layout): MFU {planned['mfu']:.1%}, "
                      f"{planned['step_s'] * 1000:.0f} ms/step, memory {planned['memory_gib']:.1f} GiB "
                      f"(with its 2 GiB runtime reserve)")


def judge_fp8(c: Check, bf16_run: Run | None) -> None:
    (r,) = c.runs
    if r.rc != 0:
        c.ok = False
        last = r.output.strip().splitlines()[-1:] or ["no output"]
        c.findings.append(f"--fp8 failed: {last[0]}")
        return
    fp8 = parse_train(r.output)
    bf16 = parse_train(bf16_run.output) if bf16_run else {}
    if "loss" not in bf16 or "loss" not in fp8:
        c.ok = False
        c.findings.append("no bf16 or fp8 loss to compare")
        return
    diff = relative(fp8["loss"], bf16["loss"])
    c.ok = diff <= FP8_TOLERANCE
    c.findings.append(f"fp8 loss {fp8['loss']:.4f} vs bf16 {bf16['loss']:.4f} after 50 steps: {diff:.2%} "
                      f"(tolerance {FP8_TOLERANCE:.0%}); fp8 / bf16 tokens/s "
                      f"{fp8['tokens_per_s'] / bf16['tokens_per_s']:.2f}x")


def judge_decode(c: Check) -> None:
    (r,) = c.runs
    c.ok = r.rc == 0
    rows = [line for line in r.output.splitlines() if line.startswith("| ") and "---" not in line]
    c.findings.append(f"{len(rows)} table rows below" if c.ok else "bench_generate.py failed")


def judge_layouts(c: Check) -> None:
    (r,) = c.runs
    c.ok = r.rc == 0
    c.findings.append(parse_pytest(r.output) or "no pytest summary")


def gpu_check(only, gpus: int, gpu_memory_gib: float) -> list:
    """Run the checks named in `only`; returns the Checks in order."""
    checks = []

    def want(name):
        return not only or name in only

    if want("kernels"):
        c = Check("kernels", "every kernel vs its torch reference on CUDA, fwd + bwd, fp32 and bf16")
        c.runs.append(run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_cuda.py"], 120))
        judge_kernels(c)
        checks.append(c)
    if want("bench_kernels"):
        c = Check("bench_kernels", "Triton vs torch.compile vs eager (vs liger-kernel where installed), d20 shapes")
        c.runs.append(run([PY, "scripts/bench_kernels.py"], 180))
        judge_bench_kernels(c)
        checks.append(c)
    if want("attention"):
        c = Check("attention", "flash-attn vs SDPA, d12 bf16, 23 steps")
        c.runs += [bench_train(D12, 90), bench_train([*D12, "--sdpa"], 90)]
        judge_attention(c)
        checks.append(c)
    bf16_run = None
    if want("d20"):
        c = Check("d20", "50-step d20 bf16 run, one GPU, ZeRO-1, micro-batch 32, seq 2048")
        bf16_run = bench_train(D20, 150)
        c.runs.append(bf16_run)
        judge_d20(c, planned_d20(gpu_memory_gib))
        checks.append(c)
    if want("fp8"):
        c = Check("fp8", "the d20 run with --fp8 (Transformer Engine, delayed scaling) vs bf16")
        c.runs.append(bench_train([*D20, "--fp8"], 150))
        judge_fp8(c, bf16_run)
        checks.append(c)
    if want("decode"):
        c = Check("decode", "KV-cache decode tokens/s")
        c.runs.append(run([PY, "scripts/bench_generate.py"], 90))
        judge_decode(c)
        checks.append(c)
    if want("layouts") and gpus >= 2:
        names = [n for need, group in LAYOUT_TESTS.items() if gpus >= need for n in group]
        c = Check("layouts", f"layout-equivalence tests on NCCL ({gpus} GPUs): {', '.join(names)}")
        c.runs.append(run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_train.py", "-k",
                           " or ".join(f"test_layout_matches_single_process[{n}]" for n in names)], 300))
        judge_layouts(c)
        checks.append(c)
    return checks


def write_report(checks, path: Path, device: str, started: str) -> None:
    """The markdown report: a summary table, then each check's findings, commands and output tails."""
    lines = [f"# megachat gpu-check: {device}", "", f"Started {started}; `python scripts/gpu_check.py`.", "",
             "| check | result | seconds | findings |", "| --- | --- | ---: | --- |"]
    for c in checks:
        secs = sum(r.seconds for r in c.runs)
        timed_out = any(r.rc is None for r in c.runs)
        result = "ok" if c.ok else ("timed out" if timed_out else "FAILED")
        lines.append(f"| {c.name} | {result} | {secs:.0f} | {'; '.join(c.findings)} |")
    for c in checks:
        lines += ["", f"## {c.name}: {c.what}", ""]
        lines += [f"- {f}" for f in c.findings]
        for r in c.runs:
            status = "timed out" if r.rc is None else f"exit {r.rc}"
            tail = r.output[-6000:]
            lines += ["", f"`{' '.join(r.command)}` ({status}, {r.seconds:.0f} s)", "", "```", tail.rstrip(), "```"]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check.md", help="the report's path")
    p.add_argument("--only", nargs="+", choices=["kernels", "bench_kernels", "attention", "d20", "fp8", "decode",
                                                 "layouts"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing to check")
        return 0
    props = torch.cuda.get_device_properties(0)
    gpus = torch.cuda.device_count()
    device = f"{gpus} x {props.name} ({props.total_memory / 2 ** 30:.0f} GiB)"
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    checks = gpu_check(args.only, gpus, props.total_memory / 2 ** 30)
    out = Path(args.out).resolve()
    write_report(checks, out, device, started)
    print(out)
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
