"""The report card (megachat/report.py, scripts/report.py) from synthesized run directories: sections, numbers
(tokens, FLOPs, durations), the summary table, the PNG curves, and one-line errors for a bad run directory."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megachat.data import IndexedDatasetWriter
from megachat.report import read_phase, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# matplotlib's colours C0..C3: phase n is drawn in COLORS[n] in every plot
COLORS = [(0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e), (0x2c, 0xa0, 0x2c), (0xd6, 0x27, 0x28)]


def make_run(path, config, records, files=None):
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    for name, text in (files or {}).items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return str(path)


def config(total_batch_size, flops_per_token, data, **extra):
    return {"train": {"depth": 4, "total_batch_size": total_batch_size, "tp": 2, "pp": 1, "zero": 1,
                      "dtype": "bf16"},
            "model": {"vocab_size": 512, "n_layer": 4}, "dp": 4, "world": 8, "tokenizer": "/tok",
            "data": data, "val_data": data[0] + "_val", "num_params": 123456, "flops_per_token": flops_per_token,
            **extra}


def train_records(steps, loss0, t0, val_every=None):
    """Step records as the trainer logs them (0.5 s a step, a timestamp each), val bpb at 0 and every val_every."""
    out = [{"step": 0, "val_bpb": 3.0}] if val_every else []
    for s in range(1, steps + 1):
        out.append({"step": s, "loss": loss0 - 0.1 * s, "step_time_s": 0.5, "tokens_per_s": 2048.0,
                    "time": t0 + 0.5 * s})
        if val_every and s % val_every == 0:
            out.append({"step": s, "val_bpb": 3.0 - 0.1 * s})
    return out


@pytest.fixture
def runs(tmp_path):
    """base (10 steps x 1024 tokens, CORE, samples), mid (5 steps x 2048, no val bpb, named by config's "phase"),
    sft (4 steps x 512, ChatCORE, env.json); the base data shard holds 7 tokens."""
    with IndexedDatasetWriter(tmp_path / "shard", np.uint16) as w:
        w.add_document([1, 2, 3])
        w.add_document([4, 5, 6, 7])
    base_eval_csv = ("metric,value\nval_bpb,2.100000\ncore,0.250000\ncore_tasks,21/22\ncore_missing,jeopardy\n"
                     "core/hellaswag,0.300000\ncore/arc_easy,0.200000\n")
    base_eval_md = "# Base model evaluation\n\n## Samples\n\n- `The capital of France is` -> `Paris`\n"
    chat_eval_csv = ("metric,value\nchat/ARC-Easy,0.512300\nchat/ARC-Challenge,0.400000\nchat/MMLU,0.350000\n"
                     "chat/GSM8K,0.050000\nchat/HumanEval,0.060000\nchat/SpellingBee,0.700000\nchatcore,0.123400\n"
                     "chatcore_tasks,6/6\nchatcore_missing,-\n")
    env = {"hostname": "gpu-node-7", "gpus": ["NVIDIA H100 80GB HBM3"] * 2, "torch": "2.9.0", "deepspeed": "0.19.8"}
    base = make_run(tmp_path / "base", config(1024, 1e6, [str(tmp_path / "shard")]), train_records(10, 5.0, 1000.0, 5),
                    {"base_eval.csv": base_eval_csv, "base_eval.md": base_eval_md})
    mid = make_run(tmp_path / "m2", config(2048, 1e6, ["/nowhere/mid"], phase="mid"), train_records(5, 4.0, 2000.0))
    sft = make_run(tmp_path / "sft", config(512, 1e6, ["/nowhere/sft"]), train_records(4, 3.0, 3000.0, 2),
                   {"chat_eval.csv": chat_eval_csv, "env.json": json.dumps(env)})
    return [base, mid, sft]


def colors_in(png_path):
    from PIL import Image
    pixels = set(Image.open(png_path).convert("RGB").getdata())
    return [c in pixels for c in COLORS]


def test_report_has_every_section_with_tokens_flops_and_durations(runs, tmp_path):
    path = write_report(runs, str(tmp_path / "out"))
    assert path == str(tmp_path / "out" / "report.md")
    md = open(path).read()
    headings = ["## Environment", "## Tokenizer and data", "## Phase 1: base", "## Phase 2: mid", "## Phase 3: sft",
                "## Curves", "## Summary", "## Total"]
    assert [md.index(h) for h in headings] == sorted(md.index(h) for h in headings)
    # environment: the training machine when recorded, the report machine labelled as such, the layout
    assert "- sft: hostname=gpu-node-7; gpus=NVIDIA H100 80GB HBM3, NVIDIA H100 80GB HBM3; torch=2.9.0" in md
    assert "- base: no env.json" in md
    assert f"python {sys.version.split()[0]}" in md and "(this machine, not necessarily the training machine)" in md
    assert "megachat git commit" in md
    assert "| base | 8 | 2 | 1 | 4 | 1 | bf16 |" in md
    # tokenizer and data: vocab, the shard's token count, an unreadable prefix said so
    assert f"| base | 512 | `/tok` | `{tmp_path / 'shard'}` (7 tokens) |" in md
    assert "`/nowhere/mid` (not readable here)" in md
    # per phase: steps x batch, FLOPs = flops_per_token x tokens, step time sum, wall time from timestamps
    assert "| tokens | 10,240 (10 steps x 1,024) |" in md and "| compute | 1.024e+10 FLOPs" in md
    assert "| tokens | 10,240 (5 steps x 2,048) |" in md
    assert "| tokens | 2,048 (4 steps x 512) |" in md and "| compute | 2.048e+09 FLOPs" in md
    assert "| step time | 5.0s (sum of step_time_s) |" in md and "| wall time | 4.5s |" in md
    assert "| step time | 2.5s (sum of step_time_s) |" in md and "| wall time | 2.0s |" in md
    assert "| val bpb (first -> last) | 3.0000 -> 2.0000 |" in md and "| final loss | 4.0000 |" in md
    # evaluations: CORE table, ChatCORE table, samples
    assert "CORE 0.2500 over 21/22 tasks; missing: jeopardy" in md and "| hellaswag | 0.3000 |" in md
    assert "| ARC-Easy | 0.5123 |" in md and "| chatcore | 0.1234 |" in md
    assert "- `The capital of France is` -> `Paris`" in md
    # summary: a column per phase, "-" where a phase has no such number
    assert "| metric | BASE | MID | SFT |" in md
    assert "| CORE | 0.2500 | - | - |" in md and "| ARC-E | - | - | 0.5123 |" in md
    assert "| SpellingBee | - | - | 0.7000 |" in md and "| ChatCORE | - | - | 0.1234 |" in md
    # totals over all phases
    assert "- step time: 9.5s" in md and "- wall time: 8.0s" in md
    assert "- tokens: 22,528" in md and "- compute: 2.253e+10 FLOPs" in md
    assert "![train loss](loss.png)" in md and "![validation bits per byte](val_bpb.png)" in md


def test_curves_are_png_files_with_one_line_per_phase_that_logged_the_metric(runs, tmp_path):
    write_report(runs, str(tmp_path / "out"))
    for name in ("loss.png", "val_bpb.png"):
        data = open(tmp_path / "out" / name, "rb").read()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    assert colors_in(tmp_path / "out" / "loss.png") == [True, True, True, False]  # base, mid, sft
    assert colors_in(tmp_path / "out" / "val_bpb.png") == [True, False, True, False]  # mid logged no val bpb


def test_a_run_without_evaluations_or_metrics_reports_what_it_has(tmp_path):
    run = make_run(tmp_path / "bare", {"model": {"vocab_size": 64}}, [])
    md = open(write_report([run], str(tmp_path / "out"))).read()
    assert "No loss records in any metrics.jsonl." in md and not os.path.exists(tmp_path / "out" / "loss.png")
    assert "| metric | bare |" in md and "| ChatCORE | - |" in md and "- tokens: -" in md
    assert read_phase(run).steps == 0


def script(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "report.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_script_prints_the_report_path_last_and_writes_next_to_the_first_run(runs):
    out = script(*runs)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == f"report: {os.path.join(runs[0], 'report.md')}"
    assert os.path.isfile(os.path.join(runs[0], "loss.png"))


@pytest.mark.parametrize("case", ["missing directory", "no config.json", "damaged config.json",
                                  "damaged metrics.jsonl"])
def test_a_bad_run_directory_is_one_line_and_exit_2(case, tmp_path):
    run = tmp_path / "run"
    if case != "missing directory":
        run.mkdir()
    if case == "damaged config.json":
        (run / "config.json").write_text('{"train": ')
    if case == "damaged metrics.jsonl":
        (run / "config.json").write_text("{}")
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, \n')
    expect = {"missing directory": f"{run}: no such run directory",
              "no config.json": f"{run} is not a run directory (no config.json)",
              "damaged config.json": f"{run / 'config.json'} is not valid JSON",
              "damaged metrics.jsonl": f"{run / 'metrics.jsonl'}: line 2 is not valid JSON"}[case]
    out = script(run, "--out", tmp_path / "out")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("report.py: error: ") and expect in out.stderr
