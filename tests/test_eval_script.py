"""scripts/base_eval.py end to end in one process: bpb, CORE from a tiny eval bundle, samples, the reports."""
import json
import math
import os
import sys

import pytest
import torch

from megachat.checkpoint import load_weights
from megachat.data import IndexedDatasetWriter
from megachat.model import GPTConfig, nanochat_shapes
from megachat.sharded import save_full

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import base_eval  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, texts, tok):
    root = tmp_path_factory.mktemp("run")
    tok.save(str(root / "tok"))
    writer = IndexedDatasetWriter(str(root / "val"))
    for text in texts[:20]:
        writer.add_document(tok.encode(text, prepend=tok.bos_id))
    writer.finalize()
    cfg = dict(sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    g = torch.Generator().manual_seed(0)
    save_full(str(root / "model"), {k: torch.randn(s, generator=g) * 0.2
                                    for k, s in nanochat_shapes(GPTConfig(**cfg)).items()}, GPTConfig(**cfg))
    (root / "config.json").write_text(json.dumps({"model": cfg, "tokenizer": str(root / "tok"),
                                                  "val_data": str(root / "val")}))
    bundle = root / "bundle" / "eval_data" / "commonsense_reasoning"
    bundle.mkdir(parents=True)
    with open(bundle / "copa.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"query": f"The day {i} was", "choices": ["sunny.", "cold."], "gold": i % 2}) + "\n")
    return root


def test_base_eval_writes_bpb_core_with_task_count_and_samples(run_dir, capsys):
    base_eval.main(["--run", str(run_dir), "--eval", "bpb,core,sample", "--eval-tokens", "1024",
                    "--device-batch-size", "2", "--eval-bundle", str(run_dir / "bundle"),
                    "--data-dir", str(run_dir / "cache")])
    out = capsys.readouterr().out
    assert "CORE" in out and "over 1/22 tasks (missing: hellaswag_zeroshot" in out
    rows = dict(line.split(",", 1) for line in (run_dir / "base_eval.csv").read_text().splitlines()[1:])
    assert 0 < float(rows["val_bpb"]) < 50 and rows["core_tasks"] == "1/22"
    assert math.isfinite(float(rows["core"]))
    md = (run_dir / "base_eval.md").read_text()
    assert "| copa | 6 |" in md and "missing" in md and "## Samples" in md
    assert os.listdir(run_dir / "tensorboard")


def test_base_eval_without_weights_says_where_they_should_be(run_dir, tmp_path):
    (tmp_path / "config.json").write_text((run_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=f"no weights at {tmp_path / 'model'}"):
        base_eval.main(["--run", str(tmp_path), "--eval", "sample"])


def test_base_eval_refuses_weights_whose_bytes_changed(run_dir, tmp_path):
    torch.save(load_weights(str(run_dir / "model")), tmp_path / "model_000001.pt")  # nanochat's form
    data = bytearray((tmp_path / "model_000001.pt").read_bytes())
    data[len(data) // 2] ^= 0x10  # torch.load alone would return the flipped weights
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="flipped.pt: record .* fails its CRC-32 check; the weights are damaged"):
        base_eval.main(["--run", str(run_dir), "--checkpoint", str(tmp_path / "flipped.pt"), "--eval", "sample"])


def test_base_eval_reads_a_nanochat_state_dict_file(run_dir, tmp_path, capsys):
    torch.save(load_weights(str(run_dir / "model")), tmp_path / "model_000001.pt")
    base_eval.main(["--run", str(run_dir), "--eval", "sample"])
    want = [line for line in capsys.readouterr().out.splitlines() if "->" in line]
    base_eval.main(["--run", str(run_dir), "--checkpoint", str(tmp_path / "model_000001.pt"), "--eval", "sample"])
    got = [line for line in capsys.readouterr().out.splitlines() if "->" in line]
    assert want and got == want


def test_base_eval_rejects_an_unknown_metric():
    with pytest.raises(SystemExit):
        base_eval.parse_args(["--run", "x", "--eval", "bpb,mmlu"])
