"""Look into token shards: counts, samples per epoch at a sequence length, and decoded samples of batch 0.

    python tools/inspect_data.py --data demo_out/data/demo --tokenizer demo_out/tokenizer --seq-len 256 --samples 3
"""
import argparse

from megachat import cli
from megachat.data import GPTDataset, IndexedDataset
from megachat.tokenizer import Tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="shard prefixes (PREFIX.bin/.idx)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--chars", type=int, default=300, help="characters shown per sample")
    args = p.parse_args(argv)
    tok = Tokenizer.load(args.tokenizer)
    for prefix in args.data:
        ds = IndexedDataset(prefix)
        print(f"{prefix}: {len(ds):,} documents, {ds.num_tokens:,} tokens ({ds.dtype}), "
              f"{ds.num_tokens / max(1, len(ds)):,.0f} tokens/document")
        data = GPTDataset([prefix], None, args.seq_len, args.seed)
        print(f"seq_len {args.seq_len}: {data.samples_per_epoch[0]:,} samples per epoch")
        x, y = data.get_batch(step=0, global_batch_size=args.samples)
        if int(x.max()) >= tok.vocab_size:
            raise ValueError(f"{prefix}: token id {int(x.max())} >= vocab size {tok.vocab_size}: {args.tokenizer} is "
                             "not the tokenizer these shards were made with")
        for i, row in enumerate(x):
            print(f"--- sample {i} of batch 0 (x {tuple(x.shape)}, y = x shifted by one) ---")
            print(repr(tok.decode(row.tolist())[:args.chars]))


if __name__ == "__main__":
    cli.run(main)
