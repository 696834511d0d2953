"""megachat.engine, the KV-cache inference engine: cached logits equal a full recompute at every step for a batch of
prompts of different lengths (left padding), greedy tp = 2 equals tp = 1 token for token, a seed fixes the samples,
the cache stays within its preallocation and its analytic size, and the calculator's result is forced into a row."""
import pytest
import torch
from _dist import run_gloo

from megachat.engine import Engine, KVCache, Sampling, sample_next
from megachat.model import GPTConfig, build_model, nanochat_shapes
from megachat.parallel import init_grid

CONFIG = dict(sequence_len=16, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def random_weights(seed=0):
    """Every matrix random (the init zeroes lm_head and c_proj: every logit would be equal)."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) / (1.0 if "wte" in name else shape[1] ** 0.5)
            for name, shape in nanochat_shapes(GPTConfig(**CONFIG)).items()}


def model_on(grid=None):
    return build_model(GPTConfig(**CONFIG), grid, weights=random_weights()).eval()


def prompts(tok):
    return [tok.encode("Once upon a time there was", prepend=tok.bos_id), [tok.bos_id, 300],
            tok.encode("The cat sat", prepend=tok.bos_id)]


def test_cached_logits_equal_a_full_recompute_for_rows_that_join_leave_and_prefill_in_chunks(tok, monkeypatch):
    model = model_on()
    engine = Engine(model, tok, max_batch=8, prefill_chunk=4)  # the long prompt takes two chunks
    events = []  # ("forward", slots, each row's cached length, input ids, logits) or ("copy", src, dst)
    logits_of = engine._logits

    def record(idx, cache):
        lens = list(cache.lens)
        events.append(("forward", list(cache.slots), lens, idx.tolist(), logits_of(idx, cache)))
        return events[-1][-1]

    engine._logits = record
    copy_slot = KVCache.copy_slot
    monkeypatch.setattr(KVCache, "copy_slot", lambda c, src, dst: events.append(("copy", src, dst)) or
                        copy_slot(c, src, dst))
    ps = prompts(tok)
    engine.submit(ps[:2], Sampling(num_samples=2, max_tokens=8, temperature=1.0, seed=3))
    engine.step()
    engine.step()
    engine.submit(ps[2:] + ps[:1], Sampling(max_tokens=5, temperature=0.7, seed=4))  # joins two rows decoding
    while engine.busy:
        engine.step()
    seq, checked = {}, 0  # each slot's tokens so far, replayed from the forwards and copies
    with torch.no_grad():
        for event in events:
            if event[0] == "copy":
                seq[event[2]] = list(seq[event[1]])
                continue
            _, slots, lens, ids, logits = event
            assert len(ids[0]) <= 4  # no forward longer than a prefill chunk
            for r, (slot, length) in enumerate(zip(slots, lens)):
                seq[slot] = seq.get(slot, [])[:length] + ids[r]
                full = model(torch.tensor([seq[slot]]))[0, -1]  # no cache: positions 0..len-1
                err = ((logits[r] - full).abs().max() / full.abs().max()).item()
                assert err <= 1e-5, (slot, len(seq[slot]), err)
                checked += 1
    assert checked > 30 and any(len(set(e[2])) > 1 for e in events if e[0] == "forward")  # rows at other lengths


def tool_caller(engine):
    """The engine's model made to call the calculator: at the positions after 4 tokens a row's logits favour
    <|python_start|> 2+3 <|python_end|> (a bias by position, so a row's own, batched or alone)."""
    sp = engine.tokenizer.encode_special
    script = [sp("<|python_start|>"), *engine.tokenizer.encode("2+3"), sp("<|python_end|>")]
    logits_of = engine._logits

    def biased(idx, cache):
        after = [n + idx.size(1) for n in cache.lens]  # each row's next position
        logits = logits_of(idx, cache)
        for r, position in enumerate(after):
            if 6 <= position < 6 + len(script):
                logits[r, script[position - 6]] += 1e4
        return logits

    engine._logits = biased
    return engine


def test_concurrent_requests_each_get_what_they_get_alone(tok):
    engine = tool_caller(Engine(model_on(), tok, max_batch=5, prefill_chunk=3))
    ps = prompts(tok)
    calls = [([ps[0]], Sampling(max_tokens=12, temperature=0)),
             ([ps[1], ps[2]], Sampling(num_samples=2, max_tokens=7, temperature=1.0, top_k=50, seed=1)),
             ([ps[2]], Sampling(max_tokens=20, temperature=0.7, top_p=0.9, seed=2)),
             ([ps[1]], Sampling(max_tokens=3, temperature=1.2, seed=3)),
             ([ps[0] + ps[2]], Sampling(num_samples=3, max_tokens=9, temperature=0.9, seed=4))]
    alone = [list(engine.generate(*call)) for call in calls]
    assert engine.cache.batch <= 5 and engine.rows_running == 0
    requests, queued = [], False
    for step in range(200):
        if step % 2 == 0 and len(requests) < len(calls):
            requests.append(engine.submit(*calls[len(requests)]))  # one joins every other step
        queued |= bool(engine.waiting)
        engine.step()
        assert engine.rows_running <= 5
        if not engine.busy and len(requests) == len(calls):
            break
    assert [list(r.steps) for r in requests] == alone
    assert queued  # max_batch 5 made some request wait for slots to free
    forced = [f for steps in alone for _, fs in steps for f in fs]
    assert any(forced), "no calculator output was forced: the test exercises no tool call"
    assert engine.cache.batch <= engine.max_batch and engine.cache.max_len <= engine.max_len


def test_a_cancelled_request_frees_its_rows_and_the_next_reuses_them(tok):
    engine = Engine(model_on(), tok, max_batch=2)
    a = engine.submit([prompts(tok)[0]], Sampling(num_samples=2, max_tokens=30, seed=1))
    b = engine.submit([prompts(tok)[1]], Sampling(max_tokens=4, seed=2))
    engine.step()
    assert engine.rows_running == 2 and list(engine.waiting) == [b]
    engine.cancel(a)
    assert a.finished and engine.rows_running == 0
    engine.step()  # b takes a freed slot
    assert [row.slot for row in b.rows] == [0] and engine.cache.batch == 2
    alone = Engine(model_on(), tok).generate_batch([prompts(tok)[1]], Sampling(max_tokens=4, seed=2))
    while engine.busy:
        engine.step()
    out = [t for tokens, _ in b.steps for t in tokens if t is not None]
    assert out[:len(alone[0][0])] == alone[0][0]


def test_the_same_seed_gives_the_same_samples_and_samples_of_one_prompt_differ(tok):
    engine = Engine(model_on(), tok)
    ps = [prompts(tok)[0]]
    a = engine.generate_batch(ps, Sampling(num_samples=4, max_tokens=10, temperature=1.0, seed=7))
    b = engine.generate_batch(ps, Sampling(num_samples=4, max_tokens=10, temperature=1.0, seed=7))
    c = engine.generate_batch(ps, Sampling(num_samples=4, max_tokens=10, temperature=1.0, seed=8))
    assert a == b and a != c
    assert len({tuple(t[:3]) for t in a[0]}) > 1  # each sample draws its own first token (nanochat shared it)


def test_greedy_batch_equals_each_prompt_alone(tok):
    engine = Engine(model_on(), tok)
    ps = prompts(tok)
    batch, _ = engine.generate_batch(ps, Sampling(max_tokens=8, temperature=0))
    alone = [engine.generate_batch([p], Sampling(max_tokens=8, temperature=0))[0][0] for p in ps]
    assert batch == alone


def test_a_request_longer_than_the_cache_is_refused_and_the_cache_never_grows(tok):
    model = model_on()
    engine = Engine(model, tok, max_len=20)
    with pytest.raises(ValueError, match="exceeds the engine's maximum length 20"):
        next(engine.generate([prompts(tok)[0]], Sampling(max_tokens=15)))
    cache = KVCache(model, batch=1, max_len=4)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="KV cache of 4 tokens cannot take 5"):
            model(torch.tensor([[4, 5]]), cache=cache)
    assert cache.k.size(2) == 4


def test_a_request_without_a_seed_is_refused(tok):
    engine = Engine(model_on(), tok)
    with pytest.raises(ValueError, match="sampling.seed is None: draw one for the request"):
        next(engine.generate([prompts(tok)[0]], Sampling(max_tokens=4, seed=None)))


def test_cache_bytes_are_the_analytic_size():
    model = model_on()
    cache = KVCache(model, batch=3, max_len=40)
    c = GPTConfig(**CONFIG)
    assert cache.nbytes == c.n_layer * 2 * 3 * 40 * c.n_kv_head * c.head_dim * 4  # layers x k,v x B x T x H x D x fp32


def test_sampling_rules():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 200)
    assert sample_next(logits, g, temperature=0).tolist() == [1] * 200
    assert set(sample_next(logits, g, temperature=1.0, top_k=2).tolist()) == {1, 3}
    assert set(sample_next(logits, g, temperature=1.0, top_p=1e-3).tolist()) == {1}


def test_the_calculator_result_is_forced_into_the_row(tok):
    engine = Engine(model_on(), tok)
    sp = tok.encode_special
    script = [sp("<|python_start|>"), *tok.encode("2+3*4"), sp("<|python_end|>"), 300, 301, 302, 303, 304,
              sp("<|assistant_end|>")]
    calls = iter(range(100))

    def scripted(idx, cache):  # the "model" wants the script's next token, whatever the engine forced
        logits = torch.full((idx.size(0), 512), -1e9)
        logits[:, script[min(next(calls), len(script) - 1)]] = 0.0
        return logits

    engine._logits = scripted
    out, mask = engine.generate_batch([[tok.bos_id]], Sampling(max_tokens=30, temperature=0))
    forced = [t for t, m in zip(out[0], mask[0]) if m == 0]
    assert tok.decode(forced) == "<|output_start|>14<|output_end|>"
    start = out[0].index(sp("<|output_start|>"))
    assert out[0][:start] == script[:start]  # the python call itself was sampled
    # while the output was forced the model's own tokens were discarded: 300.. resume after <|output_end|>
    assert out[0][start + len(forced):][:1] == [script[start + len(forced)]]


def tp_worker(rank, tok_dir):
    from megachat.tokenizer import Tokenizer
    tok = Tokenizer.load(tok_dir)
    grid = init_grid(tp=2)
    engine = Engine(model_on(grid), tok)
    cache = KVCache(engine.model, batch=1, max_len=8)
    return {"greedy": engine.generate_batch(prompts(tok), Sampling(max_tokens=8, temperature=0))[0],
            "sampled": engine.generate_batch(prompts(tok)[:1], Sampling(num_samples=3, max_tokens=6, seed=5))[0],
            "kv_heads": cache.k.size(3)}


def test_tp2_greedy_and_seeded_samples_equal_one_process(tok, tmp_path):
    tok.save(str(tmp_path / "tok"))
    got = run_gloo(tp_worker, 2, str(tmp_path / "tok"), timeout_s=120)
    engine = Engine(model_on(), tok)
    want = engine.generate_batch(prompts(tok), Sampling(max_tokens=8, temperature=0))[0]
    sampled = engine.generate_batch(prompts(tok)[:1], Sampling(num_samples=3, max_tokens=6, seed=5))[0]
    for r in got:
        assert r["greedy"] == want and r["sampled"] == sampled
        assert r["kv_heads"] == CONFIG["n_kv_head"] // 2  # each tp rank caches only its KV heads
