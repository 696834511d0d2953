"""Export a run's weights (layout-free, sharded: megachat.sharded) into one file other tools read, streaming one
tensor at a time (memory: the largest tensor, not the model):

    python tools/export_checkpoint.py RUN_DIR --format safetensors --output d20.safetensors
    python tools/export_checkpoint.py RUN_DIR/checkpoints/step_005000 --format nanochat --output base_checkpoints/d20
    python tools/export_checkpoint.py RUN_DIR --format hf --output d20-hf

RUN_DIR exports the run's final weights (RUN_DIR/model/; a run that has not finished: its latest checkpoint);
RUN_DIR/checkpoints/step_NNNNNN that checkpoint's weights. --format safetensors: one file, fp32 weights under
nanochat's names, the model config in its metadata ("model_config"); --format nanochat: the directory --output
with model_NNNNNN.pt and meta_NNNNNN.json, nanochat's checkpoint layout; --format hf: the directory --output that
transformers loads (AutoModelForCausalLM / AutoTokenizer.from_pretrained, NanoChatForCausalLM, with the run's
tokenizer and megachat's chat template; megachat/hf.py), vLLM serves and lm-evaluation-harness evaluates. All three
load with --init-from (and an hf directory with --run / --checkpoint of the chat and evaluation scripts).
"""
import argparse
import os

from megachat import cli, export, hf
from megachat.checkpoint import WEIGHTS_DIR, latest_tag, read_run_config, sharded_state
from megachat.tokenizer import Tokenizer


def source_state(path: str):
    """The sharded state that `path` names (see the module docstring)."""
    ckpt_dir = os.path.join(path, "checkpoints")
    tag = latest_tag(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if tag and not os.path.isdir(os.path.join(path, WEIGHTS_DIR)):  # a run that has not finished
        return sharded_state(os.path.join(ckpt_dir, tag))
    try:
        return sharded_state(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; give a run directory or RUN_DIR/checkpoints/step_NNNNNN") from None


def run_tokenizer(args) -> str:
    """--tokenizer, or the tokenizer directory the source's run recorded in RUN_DIR/config.json."""
    if args.tokenizer:
        return args.tokenizer
    path = os.path.abspath(args.source)
    for run_dir in (path, os.path.dirname(os.path.dirname(path))):  # RUN_DIR, RUN_DIR/checkpoints/step_NNNNNN
        if os.path.isfile(os.path.join(run_dir, "config.json")):
            return read_run_config(run_dir)["tokenizer"]
    raise FileNotFoundError(f"{args.source}: no run config.json names its tokenizer; pass --tokenizer DIR")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="RUN_DIR or RUN_DIR/checkpoints/step_NNNNNN")
    p.add_argument("--format", choices=["safetensors", "nanochat", "hf"], required=True)
    p.add_argument("--output", required=True, help="the .safetensors file, nanochat's checkpoint directory or the "
                                                    "Hugging Face directory")
    p.add_argument("--tokenizer", default=None, help="--format hf: the tokenizer directory (default: the run's)")
    p.add_argument("--max-shard-size", default="5GB", help="--format hf: split the weights into files of at most "
                                                           "this size (huggingface_hub's notation: 5GB, 500MB)")
    args = p.parse_args(argv)
    state = source_state(args.source)
    damage = state.damage()
    if damage:
        raise RuntimeError(f"{damage}: the source is damaged; export another checkpoint")
    if args.format == "safetensors":
        if os.path.isdir(args.output):
            raise IsADirectoryError(f"--output {args.output} is a directory; give the .safetensors file to write")
        export.to_safetensors(state, args.output)
        out = args.output
    elif args.format == "hf":
        hf.save(state.config, state.step, export.tensors(state, "hf"), Tokenizer.load(run_tokenizer(args)),
                args.output, args.max_shard_size)
        out = args.output
    else:
        out = export.to_nanochat(state, args.output)
    print(f"exported {state.directory} (step {state.step}, {len(state.tensors)} tensors) to {out}")
    return out


if __name__ == "__main__":
    cli.run(main)
