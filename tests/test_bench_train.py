"""scripts/bench_train.py --vs-nanochat: nanochat's column reads "absent" without nanochat, and with a package named
nanochat on the path (here a stand-in written by the test, not nanochat's code) both columns and the ratio print."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--vs-nanochat", "--depth", "1", "--max-seq-len", "16", "--device-batch-size", "1", "--vocab-size", "64",
        "--zero", "0", "--steps", "2", "--warmup", "1"]

STAND_IN = '''
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.vocab_size, config.n_embd)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def init_weights(self):
        pass

    def setup_optimizers(self):
        opts = [torch.optim.AdamW(self.transformer.parameters(), lr=1e-3),
                torch.optim.SGD(self.lm_head.parameters(), lr=1e-3, momentum=0.9)]
        for opt in opts:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return opts

    def forward(self, idx, targets):
        return F.cross_entropy(self.lm_head(self.transformer.wte(idx)).flatten(0, 1), targets.flatten())
'''


def run_bench(tmp_path, gpt_source):
    package = tmp_path / "nanochat"
    package.mkdir()
    (package / "__init__.py").write_text("")
    if gpt_source:
        (package / "gpt.py").write_text(gpt_source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT]), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_train.py"), *TINY], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_without_nanochat_its_column_reads_absent(tmp_path):
    out = run_bench(tmp_path, None)  # a package named nanochat without gpt.py: `import nanochat.gpt` fails
    assert "| nanochat | absent | absent | absent | absent | absent | absent |" in out
    assert "| megachat | " in out and "megachat / nanochat" not in out


def test_with_a_nanochat_package_both_columns_and_the_ratio_print(tmp_path):
    out = run_bench(tmp_path, STAND_IN)
    rows = [line for line in out.splitlines() if line.startswith(("| nanochat |", "| megachat |"))]
    assert [r.split("|")[1].strip() for r in rows] == ["nanochat", "megachat"]
    assert "absent" not in out and "megachat / nanochat tokens/s:" in out
