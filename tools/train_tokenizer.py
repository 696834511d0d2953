"""Train megachat's BPE tokenizer (rustbpe) on the same inputs preprocess_data.py takes; save it to --output DIR.

    python tools/train_tokenizer.py --input 'data/*.parquet' --max-chars 2000000000 --output tokenizer
"""
import argparse
import os
import time

import numpy as np
from tqdm import tqdm

from megachat import cli
from megachat.corpus import expand_inputs, iter_texts
from megachat.tokenizer import META_FILE, RANKS_FILE, Tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or globs: .parquet, .jsonl, .txt")
    p.add_argument("--text-column", default="text", help="parquet column holding the documents")
    p.add_argument("--json-key", default="text", help="jsonl key holding the documents")
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on at most this many characters")
    p.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--output", required=True, help="tokenizer directory to write")
    args = p.parse_args(argv)

    files = expand_inputs(args.input)
    existing = [f for f in (RANKS_FILE, META_FILE) if os.path.exists(os.path.join(args.output, f))]
    if existing:  # shards made with that tokenizer would silently mean other text under a new one
        raise FileExistsError(f"{args.output} already holds a tokenizer ({', '.join(existing)}); shards encoded "
                              f"with it would no longer match: choose another --output (or delete it first)")
    chars = [0]
    # disable=None: no bar when stderr is not a terminal (logs, tests)
    bar = tqdm(unit="char", unit_scale=True, desc="tokenizer: reading text", disable=None)

    def texts():
        with bar:  # closed when rustbpe has read every text, before it merges (that part has no bar)
            for t in iter_texts(files, args.text_column, args.json_key, args.max_chars, args.doc_cap):
                chars[0] += len(t)
                bar.update(len(t))
                yield t

    t0 = time.time()
    tok = Tokenizer.train(texts(), args.vocab_size)
    seconds = time.time() - t0
    tok.save(args.output)
    sample = next(iter_texts(files, args.text_column, args.json_key, 200_000, None))
    ratio = len(sample.encode()) / max(1, len(tok.encode(sample)))
    print(f"trained vocab {tok.vocab_size} on {chars[0]:,} chars in {seconds:.1f} s; "
          f"{ratio:.2f} bytes/token on the first document; longest token {int(np.max(tok.token_bytes))} bytes; "
          f"saved to {args.output}")


if __name__ == "__main__":
    cli.run(main)
