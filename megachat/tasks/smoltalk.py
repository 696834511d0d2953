"""SmolTalk (HuggingFaceTB/smol-smoltalk): everyday chat conversations, nanochat's general data for midtraining
(train, 460,341) and SFT (its first 10,000), with the test split (24,229) for validation loss. Also the reader
that every downloaded chat training source shares.

`python tools/fetch_data.py chat --output DIR` puts each source's parquet files in DIR/<source>/ (smoltalk,
mmlu-auxiliary-train, gsm8k, arc-easy, arc-challenge); the loaders take DIR. `ParquetConversations` keeps the
rows as one Arrow table of only the columns a format needs and builds conversation i when asked: SmolTalk's train
split costs its Arrow size (~1.8 GB), not that plus ~1 GB of Python dicts. The order is nanochat's: its tasks
shuffle with `datasets.Dataset.shuffle(seed=42)`, which takes numpy's `default_rng(42).permutation(len)`, and so
does the reader (seed=None keeps file order). So conversation i, and the first 10,000, are nanochat's.

A SmolTalk conversation is {"messages": the row's messages} as they are; a leading system message is merged into
the first user message by tokenizer.render_conversation, as nanochat does.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megachat.tasks.task import Task


def source_files(directory, name: str, split: str) -> list[str]:
    """The `split` parquet files (`{split}-*.parquet`, sorted) that `fetch_data.py chat NAME --output directory`
    downloaded into directory/NAME; FileNotFoundError naming that command when there are none."""
    folder = os.path.join(directory, name)
    paths = sorted(glob.glob(os.path.join(glob.escape(folder), f"{split}-*.parquet")))
    if not paths:
        raise FileNotFoundError(f"{folder}: no {split}-*.parquet files; download them with "
                                f"`python tools/fetch_data.py chat {name} --output {directory}`")
    return paths


class ParquetConversations(Sequence):
    """conversations[i] = make(row) for row order[i] of the files' rows (concatenated in the given order), a dict
    of `columns`, built on each access; order = default_rng(seed).permutation(rows), or file order if seed=None."""

    def __init__(self, paths: list[str], columns: tuple[str, ...], make: Callable[[dict], dict], seed: int | None = 42):
        tables = []
        for path in paths:
            names = pq.read_schema(path).names
            missing = [c for c in columns if c not in names]
            if missing:
                raise ValueError(f"{path}: no column(s) {missing} (it has {names}); not the expected dataset file: "
                                 "delete it and download it again with tools/fetch_data.py chat")
            tables.append(pq.read_table(path, columns=list(columns)))
        self.table = pa.concat_tables(tables)
        self.columns = [self.table.column(c) for c in columns]
        self.names = columns
        self.make = make
        self.order = None if seed is None else np.random.default_rng(seed).permutation(self.table.num_rows)

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"conversation {index} of {n}")
        index %= n
        row = index if self.order is None else int(self.order[index])
        return self.make({name: column[row].as_py() for name, column in zip(self.names, self.columns)})


def smoltalk_conversation(row: dict) -> dict:
    return {"messages": row["messages"]}


def score(conversation: dict, completion: str) -> bool:
    raise NotImplementedError("SmolTalk has no reference answer to score a completion against; it is training data "
                              "and a validation-loss set")


def smoltalk(directory, split: str = "train", seed: int | None = 42) -> Task:
    """SmolTalk's train (460,341) or test (24,229) conversations from directory/smoltalk, in nanochat's order."""
    if split not in ("train", "test"):
        raise ValueError(f"SmolTalk split {split!r}: use 'train' or 'test'")
    rows = ParquetConversations(source_files(directory, "smoltalk", split), ("messages",), smoltalk_conversation, seed)
    return Task(f"SmolTalk-{split}", rows, "generative", score)
