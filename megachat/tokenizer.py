"""The tokenizer: nanochat's byte-level BPE (trained with rustbpe, run with tiktoken) and chat rendering.

- SPLIT_PATTERN is GPT-4's pre-tokenizer regex with numbers split into groups of at most 2 digits.
- The nine SPECIAL_TOKENS take the last ids of the vocabulary; `<|bos|>` starts every document.
- A saved tokenizer is a directory: `mergeable_ranks.tiktoken` (tiktoken's own base64 format),
  `tokenizer.json` (pattern, specials) and `token_bytes.npy` (int32 byte length of every id, 0 for the
  specials, which bits-per-byte needs). It loads as a plain `tiktoken.Encoding`.
- `render_conversation` turns a chat into (ids, mask) with nanochat's rules: mask 1 on what the assistant
  writes (its text, its python calls, <|assistant_end|>), 0 on the user's text and on tool output.
This module must not import torch: the preprocessing workers import it.
"""
import base64
import functools
import hashlib
import json
import os

import numpy as np
import rustbpe
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from megachat.fileio import atomic_write

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's answer, forced into the stream
]
RANKS_FILE, META_FILE, TOKEN_BYTES_FILE = "mergeable_ranks.tiktoken", "tokenizer.json", "token_bytes.npy"


class Tokenizer:
    """A tiktoken.Encoding with nanochat's special tokens and chat format."""

    def __init__(self, enc: tiktoken.Encoding, fingerprint: str | None = None):
        missing = [s for s in SPECIAL_TOKENS if s not in enc._special_tokens]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; train it with tools/train_tokenizer.py")
        self.enc = enc
        self.bos_id = enc._special_tokens["<|bos|>"]
        self.vocab_size = enc.n_vocab
        # sha256 of the saved mergeable_ranks.tiktoken (None until saved or loaded): what shards record as the
        # tokenizer they were made with (PREFIX.meta.json), so training refuses shards of another tokenizer
        self.fingerprint = fingerprint

    # ---- training, saving, loading ----
    @classmethod
    def train(cls, text_iterator, vocab_size=65536):
        """BPE over the texts with rustbpe: 256 byte tokens + merges + the 9 specials = vocab_size ids."""
        n_merged = vocab_size - len(SPECIAL_TOKENS)
        if n_merged < 256:
            raise ValueError(f"vocab_size {vocab_size} is too small: it needs 256 byte tokens + "
                             f"{len(SPECIAL_TOKENS)} specials; use --vocab-size >= {256 + len(SPECIAL_TOKENS)}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(text_iterator, n_merged, pattern=SPLIT_PATTERN)
        ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
        if len(ranks) < n_merged:
            # rustbpe stops early when the text has no more pairs to merge; the ids must stay dense.
            raise ValueError(f"the training text allows only {len(ranks)} merged tokens, fewer than the "
                             f"{n_merged} that vocab_size {vocab_size} needs; give more text or a smaller --vocab-size")
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(tiktoken.Encoding("megachat", pat_str=bpe.get_pattern(), mergeable_ranks=ranks,
                                     special_tokens=specials))

    def save(self, directory):
        """Write the tokenizer directory (each file atomically)."""
        os.makedirs(directory, exist_ok=True)
        self.fingerprint = self.save_ranks(os.path.join(directory, RANKS_FILE))
        meta = {"pattern": self.enc._pat_str, "special_tokens": self.enc._special_tokens,
                "vocab_size": self.vocab_size}
        atomic_write(os.path.join(directory, META_FILE), json.dumps(meta, indent=1).encode())
        tmp = os.path.join(directory, f"token_bytes.tmp-{os.getpid()}.npy")
        np.save(tmp, self.token_bytes)
        os.replace(tmp, os.path.join(directory, TOKEN_BYTES_FILE))

    def save_ranks(self, path) -> str:
        """Write the mergeable ranks in tiktoken's format to path (atomically); returns their fingerprint."""
        data = _ranks_file(self.enc._mergeable_ranks)
        atomic_write(path, data)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, directory):
        """A tokenizer directory (see the module docstring), or a Hugging Face export's tokenizer.json (megachat.hf)."""
        if not os.path.isfile(os.path.join(directory, RANKS_FILE)) and os.path.isfile(os.path.join(directory,
                                                                                                   META_FILE)):
            with open(os.path.join(directory, META_FILE), encoding="utf-8") as f:
                meta = json.load(f)
            if "model" in meta:  # tokenizers' format, not megachat's
                return cls.from_hf(meta, directory)
        for name in (RANKS_FILE, META_FILE):
            if not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(f"{os.path.join(directory, name)} not found: {directory} is not a tokenizer "
                                        "directory; make one with tools/train_tokenizer.py --output DIR")
        with open(os.path.join(directory, META_FILE)) as f:
            meta = json.load(f)
        ranks = load_tiktoken_bpe(os.path.join(directory, RANKS_FILE))
        with open(os.path.join(directory, RANKS_FILE), "rb") as f:
            fingerprint = hashlib.sha256(f.read()).hexdigest()
        return cls(tiktoken.Encoding("megachat", pat_str=meta["pattern"], mergeable_ranks=ranks,
                                     special_tokens=meta["special_tokens"]), fingerprint)

    @classmethod
    def from_hf(cls, tokenizer_json: dict, where: str = "tokenizer.json"):
        """The tokenizer of a `tokenizers` byte-level BPE (tokenizer.json as megachat.hf writes it, and as nanochat's
        Hugging Face checkpoints hold it): ranks = the vocabulary's ids over the bytes its tokens stand for, the
        split regex of its pre-tokenizer, the added tokens as special tokens. The fingerprint is that of the ranks
        file `save` would write, so shards made with the exported tokenizer stay accepted."""
        model, pre = tokenizer_json.get("model") or {}, tokenizer_json.get("pre_tokenizer") or {}
        splits = [p for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
        if model.get("type") != "BPE" or len(splits) != 1 or "Regex" not in splits[0].get("pattern", {}):
            raise ValueError(f"{where}: not a byte-level BPE with one split regex (tokenizers' form of a tiktoken "
                             f"tokenizer); megachat reads the tokenizer.json that tools/export_checkpoint.py writes")
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        ranks = {bytes(byte_of[c] for c in tok): rank for tok, rank in model["vocab"].items()}
        specials = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
        enc = tiktoken.Encoding("megachat", pat_str=splits[0]["pattern"]["Regex"], mergeable_ranks=ranks,
                                special_tokens=specials)
        return cls(enc, hashlib.sha256(_ranks_file(ranks)).hexdigest())

    @functools.cached_property
    def token_bytes(self):
        """int32 [vocab]: the UTF-8 byte length of every id (what bits-per-byte divides by); computed on first use,
        since preprocessing, which loads the tokenizer in every run, never needs it."""
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for tok, rank in self.enc._mergeable_ranks.items():
            lengths[rank] = len(tok)
        return lengths  # specials keep 0: they are not text and bpb excludes them

    # ---- encoding ----
    def encode_special(self, name):
        return self.enc._special_tokens[name]

    def _prefix(self, prepend):
        if prepend is None:
            return []
        return [self.encode_special(prepend) if isinstance(prepend, str) else int(prepend)]

    def encode(self, text, prepend=None):
        """str -> list[int] (special-token text is encoded as ordinary text); a list of str -> list of lists."""
        if isinstance(text, list):
            return self.encode_batch(text, prepend)
        return self._prefix(prepend) + self.enc.encode_ordinary(text)

    __call__ = encode

    def encode_batch(self, texts, prepend=None, num_threads=8):
        head = self._prefix(prepend)
        return [head + ids for ids in self.enc.encode_ordinary_batch(texts, num_threads=num_threads)]

    def decode(self, ids):
        return self.enc.decode(list(map(int, ids)))

    def id_to_token(self, i):
        return self.enc.decode([int(i)])

    # nanochat's names, so code ported from nanochat runs unchanged
    def get_bos_token_id(self):
        return self.bos_id

    def get_vocab_size(self):
        return self.vocab_size

    # ---- chat ----
    def render_conversation(self, conversation, max_tokens=2048):
        """{"messages": [{"role", "content"}, ...]} -> (ids, mask), both list[int] of the same length <= max_tokens.

        Roles alternate user, assistant, ... (an optional leading system message is merged into the first user
        message, as nanochat does). Assistant content is a str or a list of parts {"type": "text" | "python" |
        "python_output", "text": str}. Raises ValueError naming the message index when the chat is malformed.
        """
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        if not isinstance(messages, list) or not messages:
            raise ValueError("conversation has no messages; give {'messages': [{'role': 'user', 'content': ...}, ...]}")
        offset = 0
        if isinstance(messages[0], dict) and messages[0].get("role") == "system":
            if len(messages) < 2 or not isinstance(messages[1], dict) or messages[1].get("role") != "user":
                raise ValueError("message 1: a system message must be followed by a user message")
            merged = dict(messages[1], content=f"{messages[0].get('content', '')}\n\n{messages[1].get('content', '')}")
            messages, offset = [merged] + messages[2:], 1
        sp = self.encode_special
        ids, mask = [self.bos_id], [0]

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        for i, msg in enumerate(messages):
            where = f"message {i + offset}"
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {str(msg)[:80]!r}")
            role, content = msg["role"], msg["content"]
            if role not in ("user", "assistant"):
                raise ValueError(f"{where}: unknown role {role!r}; use 'user' or 'assistant' (or 'system' first)")
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"{where}: role {role!r} out of order; messages must alternate user, assistant, ...")
            if not content:
                raise ValueError(f"{where}: empty content; drop the message or give it text")
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"{where}: user content must be a str, got {type(content).__name__}")
                add([sp("<|user_start|>")] + self.encode(content) + [sp("<|user_end|>")], 0)
                continue
            add([sp("<|assistant_start|>")], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise ValueError(f"{where}: assistant content must be a str or a list of parts")
            for j, part in enumerate(parts):
                kind = part.get("type") if isinstance(part, dict) else None
                text = part.get("text") if isinstance(part, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{where}, part {j}: expected {{'type': ..., 'text': str}}, "
                                     f"got {str(part)[:80]!r}")
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":
                    add([sp("<|python_start|>")] + self.encode(text) + [sp("<|python_end|>")], 1)
                elif kind == "python_output":
                    add([sp("<|output_start|>")] + self.encode(text) + [sp("<|output_end|>")], 0)
                else:
                    raise ValueError(f"{where}, part {j}: unknown part type {kind!r}; use text, python or "
                                     "python_output")
            add([sp("<|assistant_end|>")], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """The conversation minus its last (assistant) message, then <|assistant_start|>: a prompt for sampling."""
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation that ends with an assistant message")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=1 << 62)
        return ids + [self.encode_special("<|assistant_start|>")]


def _ranks_file(ranks: dict) -> bytes:
    """Mergeable ranks {token bytes: rank} in tiktoken's file format (base64 token, rank; by rank)."""
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    return b"".join(base64.b64encode(tok) + b" %d\n" % rank for tok, rank in by_rank)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies spell their tokens in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}
