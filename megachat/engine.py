"""megachat.engine: the inference engine (as nanochat names it): KV-cache generation with sampling and the calculator
tool, on one process or tensor-parallel (pp = 1). DeepSpeed's training engine lives in megachat/trainer.py.

- `KVCache`: keys and values of this rank's KV heads (GQA: the local n_kv_head, not n_head), preallocated
  [n_layer, batch, max_len, kv_heads, head_dim] once per request; a request that would outgrow it is refused
  before any work. Batches of prompts of different lengths are left-padded: every row writes the same cache
  column at each step, and each row keeps its own RoPE positions (column - its padding) and a mask that hides its
  padding, so a row's tokens are exactly what it would get alone.
- `Sampling`: how one request samples (num_samples, max_tokens, temperature, top_k, top_p, seed), the one settings
  object of every caller (chat CLI and server, ChatCORE, RL, base samples); each keeps its defaults as a
  module-level `Sampling(...)`.
- `Engine.generate(prompts, sampling)`: prefill each prompt once (one forward for the batch), copy its cache rows
  to its `num_samples` samples, then decode one token per row per step; yields each step's tokens as they come
  (streaming). Sampling: greedy (temperature 0), temperature, top-k, top-p, from a generator seeded by
  sampling.seed, so the same seed gives the same samples (every tp rank samples the same token from the same
  gathered logits). A row stops at <|assistant_end|> or <|bos|>; the whole request at max_tokens.
- Tool use: between <|python_start|> and <|python_end|> the row's tokens are buffered; at <|python_end|> the
  calculator (megachat.calculator, an ast whitelist interpreter) evaluates them and the engine forces
  <|output_start|> result <|output_end|> into that row, as nanochat does. Forced tokens are marked in the output.
  These per-row rules are `Tools` (no model), which Engine extends; greedy samples under pp > 1 follow them too.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from megachat.calculator import calculate


class KVCache:
    """This rank's keys and values for `batch` rows of up to `max_len` tokens, left-padded rows.

    length: columns filled so far (the same for every row); start: int64 [batch], each row's first real column."""

    def __init__(self, model, batch: int, max_len: int, start: torch.Tensor | None = None):
        attn = model.transformer.h[0].attn
        p = model.lm_head.weight
        shape = (model.config.n_layer, batch, max_len, attn.n_kv_head, attn.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.max_len, self.length = max_len, 0
        self.start = torch.zeros(batch, dtype=torch.int64, device=p.device) if start is None else start.to(p.device)
        self._mask = None

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def positions(self) -> torch.Tensor:
        """int64 [batch]: the RoPE position of each row's next token (negative while in its left padding)."""
        return self.length - self.start

    def update(self, layer: int, k, v):
        """Write the new tokens' keys/values k, v [batch, T, kv_heads, head_dim] after the cached ones; returns all
        keys and values so far and the attention mask bool [batch, 1, T, length + T] (True = attend)."""
        T, end = k.size(1), self.length + k.size(1)
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} tokens cannot take {end}: allocate it for the prompt plus "
                             f"max_tokens")
        self.k[layer, :, self.length:end] = k
        self.v[layer, :, self.length:end] = v
        if self._mask is None or self._mask.size(-1) != end:
            cols = torch.arange(end, device=k.device)
            query_cols = cols[self.length:].view(T, 1)
            causal = cols.view(1, end) <= query_cols
            real = cols.view(1, 1, end) >= self.start.view(-1, 1, 1)
            # a padding query sees only itself (it must see something to stay finite; nothing reads its output)
            self._mask = (causal & (real | (cols.view(1, end) == query_cols))).unsqueeze(1)
        return self.k[layer, :, :end], self.v[layer, :, :end], self._mask

    def advance(self, T: int) -> None:
        self.length += T

    def expand(self, repeats: int, max_len: int) -> "KVCache":
        """A new cache of max_len columns whose rows are each of this cache's rows `repeats` times (samples of one
        prompt share its prefill)."""
        new = KVCache.__new__(KVCache)
        shape = (self.k.size(0), self.k.size(1) * repeats, max_len, *self.k.shape[3:])
        new.k = self.k.new_zeros(shape)
        new.v = self.v.new_zeros(shape)
        new.k[:, :, :self.length] = self.k[:, :, :self.length].repeat_interleave(repeats, dim=1)
        new.v[:, :, :self.length] = self.v[:, :, :self.length].repeat_interleave(repeats, dim=1)
        new.max_len, new.length, new._mask = max_len, self.length, None
        new.start = self.start.repeat_interleave(repeats)
        return new


def sample_next(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits fp32 [rows, vocab] -> int64 [rows]: argmax at temperature 0, else a draw from softmax(logits / T)
    restricted to the top_k largest and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the tokens needed to reach top_p, at least one
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class Sampling:
    """How the engine samples one request: num_samples completions per prompt, each of at most max_tokens tokens;
    temperature 0 = greedy, else a draw from softmax(logits / temperature) within the top_k likeliest tokens and
    the top_p nucleus (None: no limit), from a generator seeded by seed. seed None is for a caller that draws one
    per request (the chat server) before generating: the engine refuses it (every tp rank must use one seed)."""
    num_samples: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = 42


@dataclass
class Row:
    """One sample's tool state: the python block being read, and tokens forced into it next."""
    python: list[int] | None = None  # tokens since <|python_start|>, None outside a block
    forced: deque = field(default_factory=deque)
    done: bool = False


class Tools:
    """What the engine does with each token a row emits, apart from any model (so that greedy decoding under
    pp > 1, which recomputes instead, ends and forces rows alike: evaluation.model_eval.greedy_samples)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        sp = tokenizer.encode_special
        self.bos, self.assistant_end = tokenizer.bos_id, sp("<|assistant_end|>")
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")

    def advance(self, row: Row, token: int) -> None:
        """Advance one row's state by the token it just emitted: <|assistant_end|> or <|bos|> ends it; at
        <|python_end|> the calculator's result is queued to be forced in as <|output_start|> ... <|output_end|>."""
        if token in (self.assistant_end, self.bos):
            row.done = True
        elif token == self.python_start:
            row.python = []
        elif token == self.python_end and row.python is not None:
            result = calculate(self.tokenizer.decode(row.python))
            row.python = None
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.python is not None:
            row.python.append(token)


class Engine(Tools):
    """Generation with a KV cache for a GPT (pp = 1; tp ranks all call generate with the same arguments)."""

    def __init__(self, model, tokenizer, max_len: int | None = None):
        if model.grid.pp != 1:
            raise ValueError(f"the inference engine runs with pp = 1 (got pp = {model.grid.pp}); load the run's "
                             f"layout-free weights under --tp only")
        super().__init__(tokenizer)
        self.model = model
        self.max_len = max_len or model.transformer.h[0].attn.cos.size(0)  # the RoPE tables bound positions
        self.device = model.lm_head.weight.device

    def _logits(self, idx, cache) -> torch.Tensor:
        """The last position's full-vocab softcapped logits fp32 [rows, vocab_size] (gathered over tp)."""
        return self.model.gather_logits(self.model(idx, cache=cache))[:, 0].float()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling = Sampling()):
        """Yield, per decode step, (tokens, forced): lists over rows (prompt i's samples are rows
        i * num_samples .. i * num_samples + num_samples - 1) of the new token (None once a row has stopped) and
        whether the engine forced it (tool output) rather than the model sampling it."""
        num_samples, max_tokens, temperature = sampling.num_samples, sampling.max_tokens, sampling.temperature
        if not prompts or any(not p for p in prompts):
            raise ValueError("generate needs at least one prompt, each of at least one token")
        if temperature < 0 or max_tokens < 1 or num_samples < 1:
            raise ValueError(f"temperature {temperature} must be >= 0, max_tokens {max_tokens} and num_samples "
                             f"{num_samples} >= 1")
        if sampling.seed is None:
            raise ValueError("sampling.seed is None: draw one for the request (random.getrandbits(63)) before "
                             "generating, so that every tp rank samples with the same seed")
        longest = max(map(len, prompts))
        if longest + max_tokens > self.max_len:
            raise ValueError(f"prompt of {longest} tokens + max_tokens {max_tokens} exceeds the engine's maximum "
                             f"length {self.max_len}; shorten the conversation or lower max_tokens")
        generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.int64)
        ids = torch.tensor([[self.bos] * (longest - len(p)) + list(p) for p in prompts], device=self.device)
        prefill = KVCache(self.model, len(prompts), longest, start=pad)
        logits = self._logits(ids, prefill).repeat_interleave(num_samples, dim=0)
        cache = prefill.expand(num_samples, longest + max_tokens)
        del prefill
        rows = [Row() for _ in range(len(prompts) * num_samples)]
        for step in range(max_tokens):
            sampled = sample_next(logits, generator, temperature, sampling.top_k, sampling.top_p).tolist()
            tokens, forced = [], []
            for row, token in zip(rows, sampled):
                if row.done:
                    tokens.append(None)
                    forced.append(False)
                    continue
                is_forced = bool(row.forced)
                token = row.forced.popleft() if is_forced else token
                tokens.append(token)
                forced.append(is_forced)
                self.advance(row, token)
            yield tokens, forced
            if step == max_tokens - 1 or all(row.done for row in rows):
                return
            step = torch.tensor([[t if t is not None else self.bos] for t in tokens], device=self.device)
            logits = self._logits(step, cache)

    def generate_batch(self, prompts: list[list[int]], sampling: Sampling = Sampling()
                       ) -> tuple[list[list[int]], list[list[int]]]:
        """All of generate at once: per row, the generated tokens (without the stopping token) and a mask
        (1 = sampled, 0 = forced by the tool)."""
        out, masks = None, None
        for tokens, forced in self.generate(prompts, sampling):
            if out is None:
                out, masks, stopped = [[] for _ in tokens], [[] for _ in tokens], [False] * len(tokens)
            for i, (t, f) in enumerate(zip(tokens, forced)):
                if t is None or stopped[i]:
                    continue
                if t in (self.assistant_end, self.bos):
                    stopped[i] = True
                    continue
                out[i].append(t)
                masks[i].append(0 if f else 1)
        return out, masks
