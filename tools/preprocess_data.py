"""Tokenize raw text into Megatron MMIDIDX shards (PREFIX.bin/.idx, plus PREFIX_val with a validation split).

    python tools/preprocess_data.py --input 'data/*.parquet' --tokenizer tokenizer --output-prefix data/fineweb \
        --val-input data/shard_01822.parquet

Workers read and encode their own row groups / byte ranges (no torch imported); an interrupted run leaves only
temp files and finished per-input parts, and a rerun continues from the finished parts.
"""
import argparse
import json

from megachat import cli
from megachat.corpus import preprocess
from megachat.data import MAX_DOC_TOKENS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or globs: .parquet, .jsonl, .txt (one doc each)")
    p.add_argument("--tokenizer", required=True, help="directory written by tools/train_tokenizer.py")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx (and PREFIX_val.bin/.idx)")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--json-key", default="text")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of documents (by text hash) for PREFIX_val")
    p.add_argument("--val-input", nargs="+", default=(), help="held-out files that go wholly to PREFIX_val")
    p.add_argument("--max-doc-tokens", type=int, default=MAX_DOC_TOKENS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    summary = preprocess(args.input, args.tokenizer, args.output_prefix, workers=args.workers,
                         text_column=args.text_column, json_key=args.json_key, val_fraction=args.val_fraction,
                         val_inputs=args.val_input, max_doc_tokens=args.max_doc_tokens, progress=not args.quiet)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    cli.run(main)
