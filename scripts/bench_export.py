"""Peak memory of the Hugging Face export and import (megachat/hf.py) against the model's size: both stream.

    python scripts/bench_export.py --depth 20 --out /tmp/bench_export

Writes a randomly initialised dD model (nanochat's init, `model.init_full_weight`) as a finished run's final
weights, RUN_DIR/model/ (one rank's sharded state, written one tensor at a time), and RUN_DIR/config.json; then, each
in a fresh process, `tools/export_checkpoint.py RUN_DIR --format hf` and the import (`checkpoint.load_run` of the
export: the model built from the Hugging Face directory, as --run / --checkpoint / --init-from read it). Prints each
process's peak RSS (getrusage's ru_maxrss of the child), the fp32 model's size and its largest tensor.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from megachat import cli, sharded
from megachat.model import GPTConfig, init_full_weight, nanochat_shapes
from megachat.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9
IMPORT = """
import sys, torch
from megachat.checkpoint import load_run
from megachat.parallel import Grid
model, _, _ = load_run(sys.argv[1], Grid(), "cpu")
print(sum(p.numel() for p in model.parameters()))
"""


def write_run(run_dir: str, config: GPTConfig, tokenizer_dir: str) -> None:
    """RUN_DIR/model/ as one rank's sharded state of the init's weights, RUN_DIR/config.json naming the tokenizer."""
    sharded.save_full(os.path.join(run_dir, "model"), {n: init_full_weight(n, s, seed=0) for n, s in
                                                       nanochat_shapes(config).items()}, config)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"model": vars(config), "tokenizer": tokenizer_dir}, f)


def peak_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of a child process running cmd (its own rusage, from wait4)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode})")
    return usage.ru_maxrss * 1024 / GB, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    config = GPTConfig.from_depth(args.depth, args.vocab_size, 2048)
    # the tokenizer only has to exist (the export converts it, the import reads it): the 512-id one of the tests' demo
    # corpus sample, whatever the model's vocab_size
    with open(os.path.join(ROOT, "tests", "fixtures", "demo_corpus_sample.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok_dir = os.path.join(args.out, "tokenizer")
    Tokenizer.train(iter(texts), vocab_size=512).save(tok_dir)
    run_dir = os.path.join(args.out, "run")
    write_run(run_dir, config, tok_dir)
    sizes = [torch.Size(s).numel() * 4 for s in nanochat_shapes(config).values()]
    print(f"d{args.depth}: {sum(sizes) / GB:.2f} GB of fp32 weights, largest tensor {max(sizes) / GB:.2f} GB")
    export = os.path.join(args.out, "hf")
    rss, secs = peak_of([sys.executable, os.path.join(ROOT, "tools", "export_checkpoint.py"), run_dir,
                         "--format", "hf", "--output", export])
    print(f"export: peak RSS {rss:.2f} GB, {secs:.0f} s")
    rss, secs = peak_of([sys.executable, "-c", IMPORT, export])
    print(f"import (load_run of the export): peak RSS {rss:.2f} GB, {secs:.0f} s")


if __name__ == "__main__":
    cli.run(main)
