"""megachat.engine: the inference engine (as nanochat names it): continuous batching over a KV cache, with sampling
and the calculator tool, on one process or tensor-parallel (pp = 1). DeepSpeed's training engine is built in
megachat/build.py and run by megachat/trainer.py.

- `KVCache`: keys and values of this rank's KV heads (GQA: the local n_kv_head, not n_head) in `batch` slots of up
  to `max_len` tokens, [n_layer, batch, max_len, kv_heads, head_dim]. Each slot holds one sequence from column 0
  at its own length; `cache.rows(slots)` is what one forward of those rows reads and appends to (each row at its
  own RoPE positions, masked to its own columns), so a row's tokens are what it would get alone.
- `Sampling`: how one request samples (num_samples, max_tokens, temperature, top_k, top_p, seed), the one settings
  object of every caller (chat CLI and server, ChatCORE, RL, base samples); each keeps its defaults as a
  module-level `Sampling(...)`.
- `Engine`: continuous batching. `submit(prompts, sampling)` queues a `Request` (its prompts' rows, prompt i's
  samples being rows i * num_samples ...); each `step()` admits waiting requests while slots are free (at most
  `max_batch` rows in all), prefills admitted prompts, and decodes one token for every running row in one forward.
  A request joins the running batch at the step after its prefill and leaves it (its slots free for the next)
  when it finishes; `cancel` frees its rows at once. Each request samples from its own generator seeded by
  sampling.seed, with its own temperature, top-k, top-p and max_tokens, so its tokens do not depend on what else
  is running (every tp rank, stepping the same requests, samples the same token from the same gathered logits).
- Prefill runs between decode steps, each prompt alone (batch 1) in chunks of `prefill_chunk` tokens at fixed
  offsets (0, chunk, 2 chunk, ...); while rows are decoding a step prefills at most one chunk's worth of tokens
  (at least one chunk), so a long prompt delays the running rows by one chunk's forward per token they decode,
  not by its whole prefill. Chunks at fixed offsets keep a prompt's prefill the same whatever else runs. A
  separate forward (rather than a chunk fused into the decode batch) keeps every forward one of two shapes: rows
  of one new token each, or one row of a prompt chunk.
- `generate(prompts, sampling)` yields one request's steps as they come (streaming), `generate_batch` returns them
  all, `generate_many` runs many requests through the batch together (ChatCORE, RL rollouts). A row stops at
  <|assistant_end|> or <|bos|>; the whole request at max_tokens.
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
    """This rank's keys and values for `batch` slots of up to `max_len` tokens; lengths[s]: columns slot s holds.
    Used as the model's cache argument directly, it stands for all its slots (one forward of the whole batch)."""

    def __init__(self, model, batch: int, max_len: int):
        attn = model.transformer.h[0].attn
        p = model.lm_head.weight
        shape = (model.config.n_layer, batch, max_len, attn.n_kv_head, attn.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.max_len, self.lengths = max_len, [0] * batch
        self._all = None

    @property
    def batch(self) -> int:
        return self.k.size(1)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def rows(self, slots) -> "CacheRows":
        return CacheRows(self, list(slots))

    def resized(self, batch: int, max_len: int) -> "KVCache":
        """A cache of batch slots x max_len columns holding this one's contents (both at least this one's)."""
        new = KVCache.__new__(KVCache)
        shape = (self.k.size(0), batch, max_len, *self.k.shape[3:])
        new.k, new.v = self.k.new_zeros(shape), self.v.new_zeros(shape)
        new.k[:, :self.batch, :self.max_len] = self.k
        new.v[:, :self.batch, :self.max_len] = self.v
        new.max_len, new.lengths, new._all = max_len, self.lengths + [0] * (batch - self.batch), None
        return new

    def copy_slot(self, src: int, dst: int) -> None:
        """Slot dst holds what slot src holds (the samples of one prompt share its prefill)."""
        n = self.lengths[src]
        self.k[:, dst, :n] = self.k[:, src, :n]
        self.v[:, dst, :n] = self.v[:, src, :n]
        self.lengths[dst] = n

    def positions(self) -> torch.Tensor:
        return self._every().positions()

    def update(self, layer: int, k, v):
        return self._every().update(layer, k, v)

    def advance(self, T: int) -> None:
        self._every().advance(T)

    def _every(self) -> "CacheRows":
        if self._all is None:
            self._all = self.rows(range(self.batch))
        return self._all


class CacheRows:
    """Some slots of a KVCache as one forward's batch (row r = slots[r]), each row at its own length: the model's
    cache argument while those rows run."""

    def __init__(self, cache: KVCache, slots: list[int]):
        self.cache, self.slots = cache, slots
        self.lens = [cache.lengths[s] for s in slots]
        device = cache.k.device
        self.index = torch.tensor(slots, device=device)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        self.block = slice(slots[0], slots[0] + len(slots)) if contiguous else self.index  # a view, or a gather
        self._positions = torch.tensor(self.lens, dtype=torch.int64, device=device)
        self._mask = None

    def positions(self) -> torch.Tensor:
        """int64 [rows]: the RoPE position of each row's next token."""
        return self._positions

    def update(self, layer: int, k, v):
        """Write the new tokens' keys/values k, v [rows, T, kv_heads, head_dim] after each row's cached ones; returns
        the keys and values of columns 0 .. max length + T and the attention mask bool [rows, 1, T, columns] (True =
        attend; None when every row has one length: then it is the causal mask aligned to the last column)."""
        cache, T = self.cache, k.size(1)
        end = max(self.lens) + T
        if end > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} tokens cannot take {end}: allocate it for the prompt plus "
                             f"max_tokens")
        same = min(self.lens) == max(self.lens)
        if same and isinstance(self.block, slice):
            cache.k[layer, self.block, end - T:end] = k
            cache.v[layer, self.block, end - T:end] = v
        else:
            cols = self._positions.view(-1, 1) + torch.arange(T, device=k.device)
            cache.k[layer, self.index.view(-1, 1), cols] = k
            cache.v[layer, self.index.view(-1, 1), cols] = v
        if not same and self._mask is None:
            query = self._positions.view(-1, 1, 1) + torch.arange(T, device=k.device).view(1, T, 1)
            self._mask = (torch.arange(end, device=k.device).view(1, 1, end) <= query).unsqueeze(1)
        return cache.k[layer, self.block, :end], cache.v[layer, self.block, :end], self._mask

    def advance(self, T: int) -> None:
        for s in self.slots:
            self.cache.lengths[s] += T
        self.lens = [n + T for n in self.lens]
        self._positions, self._mask = self._positions + T, None


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
    """One sample's state: its cache slot (None once it left the batch), the python block being read, and tokens
    forced into it next."""
    slot: int | None = None
    python: list[int] | None = None  # tokens since <|python_start|>, None outside a block
    forced: deque = field(default_factory=deque)
    done: bool = False


@dataclass(eq=False)  # identity: a request is one submission
class Request:
    """One submitted generation in the engine: its rows (prompt i's samples are rows i * num_samples ..
    i * num_samples + num_samples - 1), its own generator, and the steps produced and not yet read (`steps`:
    (tokens, forced) per decode step, lists over its rows; token None once a row stopped)."""
    prompts: list[list[int]]
    sampling: Sampling
    generator: torch.Generator
    rows: list[Row]
    steps: deque = field(default_factory=deque)
    prefilled: list = field(default_factory=list)  # last-position logits of each prompt prefilled so far
    logits: torch.Tensor | None = None  # fp32 [live rows, vocab]: what the next step samples from
    produced: int = 0  # decode steps so far
    finished: bool = False


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
    """Continuous batching with a KV cache for a GPT (pp = 1; tp ranks submit, cancel and step alike, in one order).

    max_batch: rows decoding at once (the cache's slots); prefill_chunk: prompt tokens per prefill forward. The cache
    grows to the slots and columns its admitted requests need, never past max_batch x max_len."""

    def __init__(self, model, tokenizer, max_len: int | None = None, max_batch: int = 32, prefill_chunk: int = 256):
        if model.grid.pp != 1:
            raise ValueError(f"the inference engine runs with pp = 1 (got pp = {model.grid.pp}); load the run's "
                             f"layout-free weights under --tp only")
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch {max_batch} and prefill_chunk {prefill_chunk} must be >= 1")
        super().__init__(tokenizer)
        self.model = model
        self.max_len = max_len or model.transformer.h[0].attn.cos.size(0)  # the RoPE tables bound positions
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.device = model.lm_head.weight.device
        self.cache: KVCache | None = None
        self.waiting: deque[Request] = deque()  # submitted, no slots yet (arrival order)
        self.prefilling: list[Request] = []  # slots taken, prompts being prefilled
        self.decoding: list[Request] = []  # in the running batch
        self.used: set[int] = set()  # slots of admitted rows

    def _logits(self, idx, cache) -> torch.Tensor:
        """The last position's full-vocab softcapped logits fp32 [rows, vocab_size] (gathered over tp). Blocks that
        --compile compiled for training (RL's rollouts, the end-of-run sample) run eagerly here: every prefill chunk
        and decode step has new shapes, and compiling each (dynamic=False) would cost a compilation per token."""
        with torch.compiler.set_stance("force_eager"):
            return self.model.gather_logits(self.model(idx, cache=cache))[:, 0].float()

    def submit(self, prompts: list[list[int]], sampling: Sampling = Sampling()) -> Request:
        """Queue a request; it joins the running batch as slots free up. ValueError for one the engine cannot
        run."""
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
        rows = len(prompts) * num_samples
        if rows > self.max_batch:
            raise ValueError(f"{len(prompts)} prompts x {num_samples} samples = {rows} rows, over the engine's "
                             f"max_batch {self.max_batch}; submit fewer prompts per request or raise max_batch")
        request = Request([list(p) for p in prompts], sampling,
                          torch.Generator(device=self.device).manual_seed(sampling.seed), [Row() for _ in range(rows)])
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Drop a request wherever it is (its client left): its rows leave the batch now."""
        for queue in (self.waiting, self.prefilling, self.decoding):
            if request in queue:
                queue.remove(request)
        self._finish(request)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    @property
    def rows_running(self) -> int:
        """Rows holding a cache slot (prefilling or decoding)."""
        return len(self.used)

    @torch.no_grad()
    def step(self) -> None:
        """Admit, prefill (one chunk's worth while others decode), and decode one token for every running row;
        each request's new step lands in its `steps`."""
        self._admit()
        self._prefill()
        self._decode()

    def _admit(self) -> None:
        """Give waiting requests slots, in arrival order, while max_batch allows; grow the cache to fit them."""
        while self.waiting:
            request = self.waiting[0]
            if len(self.used) + len(request.rows) > self.max_batch:
                return
            self.waiting.popleft()
            free = (s for s in range(self.max_batch) if s not in self.used)
            for row in request.rows:
                row.slot = next(free)
                self.used.add(row.slot)
            batch = max(row.slot for row in request.rows) + 1
            length = max(map(len, request.prompts)) + request.sampling.max_tokens
            if self.cache is None or batch > self.cache.batch or length > self.cache.max_len:
                old = self.cache or KVCache(self.model, 0, 0)
                # grow by doubling (slots) and to 256-column multiples, so that a stream of requests grows it rarely
                batch = min(self.max_batch, max(batch, 2 * old.batch))
                length = min(self.max_len, max(old.max_len, -(-length // 256) * 256))
                self.cache = old.resized(batch, length)
            for row in request.rows:
                self.cache.lengths[row.slot] = 0
            self.prefilling.append(request)

    def _prefill(self) -> None:
        """Prefill admitted prompts in order, chunk by chunk; a request whose prompts are all done joins decoding."""
        budget = self.prefill_chunk if self.decoding else float("inf")  # nobody waits on an idle batch
        for request in list(self.prefilling):
            n = request.sampling.num_samples
            for i in range(len(request.prefilled), len(request.prompts)):
                prompt, slot = request.prompts[i], request.rows[i * n].slot
                done = self.cache.lengths[slot]
                while done < len(prompt) and budget > 0:
                    end = min(len(prompt), (done // self.prefill_chunk + 1) * self.prefill_chunk)
                    ids = torch.tensor([prompt[done:end]], device=self.device)
                    logits = self._logits(ids, self.cache.rows([slot]))
                    budget, done = budget - (end - done), end
                if done < len(prompt):
                    return
                request.prefilled.append(logits)
            for r, row in enumerate(request.rows):  # the samples of a prompt start from its prefill
                if r % n:
                    self.cache.copy_slot(request.rows[r - r % n].slot, row.slot)
            request.logits = torch.cat(request.prefilled).repeat_interleave(n, dim=0)
            request.prefilled = []
            self.prefilling.remove(request)
            self.decoding.append(request)

    def _decode(self) -> None:
        """Sample each running request's next tokens, then one forward of every row that goes on."""
        going, last = [], []  # (request, row) that need the next forward, and the token each feeds
        for request in list(self.decoding):
            s = request.sampling
            sampled = iter(sample_next(request.logits, request.generator, s.temperature, s.top_k, s.top_p).tolist())
            tokens, forced = [], []
            for row in request.rows:
                if row.done:
                    tokens.append(None)
                    forced.append(False)
                    continue
                token = next(sampled)
                is_forced = bool(row.forced)
                token = row.forced.popleft() if is_forced else token
                tokens.append(token)
                forced.append(is_forced)
                self.advance(row, token)
            request.produced += 1
            request.steps.append((tokens, forced))
            if request.produced == s.max_tokens or all(row.done for row in request.rows):
                self.decoding.remove(request)
                self._finish(request)
                continue
            for row, token in zip(request.rows, tokens):
                if row.done:
                    self._release(row)
                elif token is not None:
                    going.append((request, row))
                    last.append(token)
        if not going:
            return
        ids = torch.tensor(last, device=self.device).view(-1, 1)
        logits = self._logits(ids, self.cache.rows([row.slot for _, row in going]))
        start = 0
        for request in dict.fromkeys(r for r, _ in going):  # each request's rows are consecutive
            count = sum(1 for r, _ in going if r is request)
            request.logits, start = logits[start:start + count], start + count

    def _release(self, row: Row) -> None:
        if row.slot is not None:
            self.used.discard(row.slot)
            row.slot = None

    def _finish(self, request: Request) -> None:
        for row in request.rows:
            self._release(row)
        request.finished, request.logits, request.prefilled = True, None, []

    def generate(self, prompts: list[list[int]], sampling: Sampling = Sampling()):
        """Yield, per decode step, (tokens, forced): lists over rows (prompt i's samples are rows
        i * num_samples .. i * num_samples + num_samples - 1) of the new token (None once a row has stopped) and
        whether the engine forced it (tool output) rather than the model sampling it. Steps the engine, so other
        submitted requests advance too."""
        request = self.submit(prompts, sampling)
        try:
            while True:
                while request.steps:
                    yield request.steps.popleft()
                if request.finished:
                    return
                self.step()
        finally:
            if not request.finished:  # the caller stopped reading
                self.cancel(request)

    def generate_batch(self, prompts: list[list[int]], sampling: Sampling = Sampling()
                       ) -> tuple[list[list[int]], list[list[int]]]:
        """All of generate at once: per row, the generated tokens (without the stopping token) and a mask
        (1 = sampled, 0 = forced by the tool)."""
        return self.generate_many([(prompts, sampling)])[0]

    def generate_many(self, calls: list[tuple[list[list[int]], Sampling]]) -> list[tuple[list, list]]:
        """generate_batch of every (prompts, sampling) call, run through the batch together (each as its own
        request, so each gets what it gets alone)."""
        requests = [self.submit(prompts, sampling) for prompts, sampling in calls]
        results = [([[] for _ in r.rows], [[] for _ in r.rows], [False] * len(r.rows)) for r in requests]
        try:
            while True:
                for request, (out, masks, stopped) in zip(requests, results):
                    while request.steps:
                        tokens, forced = request.steps.popleft()
                        for i, (t, f) in enumerate(zip(tokens, forced)):
                            if t is None or stopped[i]:
                                continue
                            if t in (self.assistant_end, self.bos):
                                stopped[i] = True
                                continue
                            out[i].append(t)
                            masks[i].append(0 if f else 1)
                if all(r.finished for r in requests):
                    return [(out, masks) for out, masks, _ in results]
                self.step()
        finally:
            for request in requests:
                if not request.finished:
                    self.cancel(request)
