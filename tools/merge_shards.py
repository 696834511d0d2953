"""Concatenate .bin/.idx shards (same tokenizer, same dtype) into one, streaming: no memory grows with size.

    python tools/merge_shards.py --input data/a data/b 'data/part_*' --output-prefix data/all
"""
import argparse
import glob
import os

from megachat import cli
from megachat.data import IndexedDataset, IndexedDatasetWriter, shard_tokenizer
from megachat.fileio import atomic_write_json


def common_tokenizer(prefixes):
    """The tokenizer the shards' meta.json files name, when every shard has one and they agree; None when any
    shard has none (Megatron's); an error when two name different tokenizers."""
    made = {prefix: shard_tokenizer(prefix) for prefix in prefixes}
    if None in made.values():
        return None
    (first, want), *rest = made.items()
    for prefix, meta in rest:
        if (meta["tokenizer_sha256"], meta["vocab_size"]) != (want["tokenizer_sha256"], want["vocab_size"]):
            raise ValueError(f"{first} and {prefix} were tokenized with different tokenizers ({want['tokenizer']}, "
                             f"{meta['tokenizer']}): merge only shards of one tokenizer")
    return want


def merge_shards(prefixes, output_prefix):
    """Write output_prefix.bin/.idx = the shards in order (and output_prefix.meta.json naming their tokenizer,
    when they all name the same one); returns (documents, tokens)."""
    if os.path.exists(output_prefix + ".idx") or os.path.exists(output_prefix + ".bin"):
        raise FileExistsError(f"{output_prefix}.bin/.idx exist; delete them or choose another --output-prefix")
    shards = [IndexedDataset(p) for p in prefixes]  # opens (and validates) every shard before writing anything
    tokenizer = common_tokenizer(prefixes)
    with IndexedDatasetWriter(output_prefix, shards[0].dtype) as out:
        for shard in shards:
            out.add_index(shard)
    if tokenizer:
        atomic_write_json(output_prefix + ".meta.json", {**tokenizer, "merged_from": [os.path.abspath(p) for p in
                          prefixes], "train_documents": out.num_docs, "train_tokens": out.num_tokens})
    return out.num_docs, out.num_tokens


def expand_prefixes(patterns):
    prefixes = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = sorted(p[:-4] for p in glob.glob(pattern + ("" if pattern.endswith(".idx") else ".idx")))
            if not found:
                raise FileNotFoundError(f"--input {pattern}: no shard matches (looked for {pattern}.idx)")
            prefixes += found
        else:
            prefixes.append(pattern[:-4] if pattern.endswith((".idx", ".bin")) else pattern)
    return prefixes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="shard prefixes (PREFIX.bin/.idx) or globs")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    docs, tokens = merge_shards(expand_prefixes(args.input), args.output_prefix)
    print(f"merged into {args.output_prefix}: {docs:,} documents, {tokens:,} tokens")


if __name__ == "__main__":
    cli.run(main)
