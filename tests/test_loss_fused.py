"""The LM head and the softcapped cross-entropy fused, a chunk of tokens at a time
(`megachat.tensor_parallel.vocab_parallel_linear_loss`: what GPT.forward with targets and the pipeline's last stage
run), against the unfused path (the [tokens x vocab] logits, then `vocab_parallel_loss`): the same loss and
gradients at tp = 1 and over 2 real gloo processes (ignored targets, per-token weights, chunk sizes that divide the
tokens and that do not, a padded vocab row that must never win), and the memory: no [tokens x vocab] tensor saved
or made, and the peak bytes of scripts/bench_loss.py's formula measured on CPU."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from _dist import run_gloo

from megachat import tensor_parallel
from megachat.model import GPTConfig, build_model, nanochat_shapes
from megachat.parallel import Grid, init_grid
from megachat.tensor_parallel import (VocabParallelLMHead, enter_tp_region, loss_chunk_tokens, shard_tensor,
                                      vocab_parallel_linear_loss, vocab_parallel_loss)

pytestmark = pytest.mark.timeout(180)
BENCH = Path(__file__).parent.parent / "scripts" / "bench_loss.py"
# vocab 251: padded to 252 at tp = 2, so the last shard holds a padding row
SMALL = dict(sequence_len=16, vocab_size=251, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
N, C, V = 50, 24, 97  # the loss on its own: 50 tokens, vocab 97 (padded to 98 at tp = 2)
CHUNKS = [1, 7, 16, 50, None]  # 7 and 16 do not divide 50; None: the default by bytes (one chunk here)


def bench_loss():
    spec = importlib.util.spec_from_file_location("megachat_bench_loss", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def ce_case(dtype=torch.float32, seed=0):
    """hidden [N, C], weight [V, C] (logits of scale ~20, so the softcap bites), targets with ignored ones and the
    first and last id of both tp = 2 shards, per-token weights."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g)
    weight = torch.randn(V, C, generator=g) * (20 / C ** 0.5)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::6] = -1
    targets[1:5] = torch.tensor([0, 48, 49, V - 1])
    return hidden.to(dtype), weight.to(dtype), targets, torch.rand(N, generator=g)


def loss_and_grads(fn, hidden, weight, targets, weights):
    """fn(hidden, weight) -> per-token loss; (loss, d hidden, d weight) of sum(weights * loss)."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w)
    (loss * weights).sum().backward()
    return loss.detach(), h.grad, w.grad


def unfused(targets):
    return lambda h, w: vocab_parallel_loss(F.linear(h, w), targets, 0, None, reduction="none")


def fused(targets, chunk):
    return lambda h, w: vocab_parallel_linear_loss(h, w, targets, 0, None, reduction="none", chunk_tokens=chunk)


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c}")
def test_tp1_fused_loss_and_gradients_match_unfused(chunk):
    hidden, weight, targets, weights = ce_case()
    want = loss_and_grads(unfused(targets), hidden, weight, targets, weights)
    got = loss_and_grads(fused(targets, chunk), hidden, weight, targets, weights)
    for name, g, w in zip(("loss", "d hidden", "d weight"), got, want):
        assert rel_err(g, w) <= 1e-5, name
    ignored = targets == -1
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()


def test_tp1_fused_mean_reduction_matches_unfused():
    hidden, weight, targets, _ = ce_case()
    want = vocab_parallel_loss(F.linear(hidden, weight).view(5, 10, V), targets.view(5, 10), 0, None)
    got = vocab_parallel_linear_loss(hidden.view(5, 10, C), weight, targets.view(5, 10), 0, None, chunk_tokens=7)
    assert rel_err(got, want) <= 1e-6


def summed(targets, chunk, weights):
    """The scalar path (gradients formed in forward): sum of weights x loss."""
    return lambda h, w: vocab_parallel_linear_loss(h, w, targets, 0, None, reduction="sum", chunk_tokens=chunk,
                                                   weights=weights)


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c}")
def test_tp1_weighted_sum_and_mean_form_the_unfused_gradients_in_forward(chunk):
    hidden, weight, targets, weights = ce_case()
    want_loss, want_dh, want_dw = loss_and_grads(unfused(targets), hidden, weight, targets, weights)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total = summed(targets, chunk, weights)(h, w)
    (3.0 * total).backward()  # grad_output 3: backward scales what forward formed
    assert rel_err(total, (want_loss * weights).sum()) <= 1e-6
    assert rel_err(h.grad, 3 * want_dh) <= 1e-5 and rel_err(w.grad, 3 * want_dw) <= 1e-5
    ones = torch.ones(N)
    want_loss, want_dh, want_dw = loss_and_grads(unfused(targets), hidden, weight, targets, ones)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    mean = vocab_parallel_linear_loss(h, w, targets, 0, None, chunk_tokens=chunk)
    mean.backward()
    count = (targets != -1).sum()
    assert rel_err(mean, want_loss.sum() / count) <= 1e-6
    assert rel_err(h.grad, want_dh / count) <= 1e-5 and rel_err(w.grad, want_dw / count) <= 1e-5
    assert (h.grad[targets == -1] == 0).all()


class MatmulCount(TorchDispatchMode):
    """Counts the matmuls (mm, addmm) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm)
        return func(*args, **(kwargs or {}))


def test_scalar_loss_backward_runs_no_matmul_and_the_per_token_one_recomputes_the_logits():
    hidden, weight, targets, weights = ce_case()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    for loss in (summed(targets, 7, weights)(h, w), vocab_parallel_linear_loss(h, w, targets, 0, None, chunk_tokens=7)):
        with MatmulCount() as counted:
            loss.backward()
        assert counted.count == 0
    with MatmulCount() as counted:
        (fused(targets, 7)(h, w) * weights).sum().backward()
    assert counted.count == 3 * 8  # 8 chunks: logits, d hidden, d weight each
    with torch.no_grad(), MatmulCount() as counted:
        summed(targets, 7, weights)(h, w)
    assert counted.count == 8  # no gradient wanted: the logits only


def test_weights_go_with_reduction_sum_only():
    hidden, weight, targets, weights = ce_case()
    with pytest.raises(ValueError, match="reduction 'sum' only"):
        vocab_parallel_linear_loss(hidden, weight, targets, 0, None, reduction="mean", weights=weights)
    with pytest.raises(ValueError, match="reduction 'sum' only"):
        vocab_parallel_linear_loss(hidden, weight, targets, 0, None, reduction="sum")
    with pytest.raises(ValueError, match="targets' shape"):
        vocab_parallel_linear_loss(hidden, weight, targets, 0, None, reduction="sum", weights=weights[:-1])


def test_tp1_fused_bf16_gradients_are_as_close_to_float64_as_unfused():
    hidden, weight, targets, weights = ce_case(torch.bfloat16)
    exact = loss_and_grads(unfused(targets), hidden.double(), weight.double(), targets, weights.double())
    want = loss_and_grads(unfused(targets), hidden, weight, targets, weights)
    got = loss_and_grads(fused(targets, 16), hidden, weight, targets, weights)  # 4 chunks: d weight summed in fp32
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for name, g, w, e in zip(("loss", "d hidden", "d weight"), got, want, exact):
        assert rel_err(g, e) <= max(2 * rel_err(w, e), 2 ** -8), name


def test_loss_chunk_tokens_bounds_a_chunk_of_logits_by_bytes():
    assert loss_chunk_tokens(65536, torch.bfloat16) == 2048  # d20 at tp = 1: 2048 x 65536 x 2 B = 256 MiB
    assert loss_chunk_tokens(8192, torch.bfloat16) == 16384
    assert loss_chunk_tokens(2 ** 30, torch.float32) == 1
    with pytest.raises(ValueError, match="chunk_tokens = 0"):
        vocab_parallel_linear_loss(*ce_case()[:3], 0, None, chunk_tokens=0)


# ---------------------------------------------------------------- tp = 2 over real gloo processes
def random_state_dict(config, seed):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) / (1.0 if "wte" in name else shape[1] ** 0.5)
            for name, shape in nanochat_shapes(config).items()}


def model_batch(config, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size, (3, config.sequence_len), generator=g)
    targets = torch.randint(0, config.vocab_size, (3, config.sequence_len), generator=g)
    targets[1, :5] = -1
    targets[0, -1] = config.vocab_size - 1  # next to the padding row at tp = 2
    return idx, targets, torch.rand(3, config.sequence_len, generator=g)


def model_losses(model, idx, targets, weights):
    """{"fused": GPT.forward(idx, (targets, weights)), "unfused": GPT.loss of the logits of the chained layers()}:
    (loss, {name: grad of this rank's shard}) each."""
    out = {}
    for path in ("fused", "unfused"):
        model.zero_grad(set_to_none=True)
        if path == "fused":
            loss = model(idx, (targets, weights))
        else:
            x = idx
            for layer in model.layers():
                x = layer(x)
            loss = model.loss(x, (targets, weights))
        loss.backward()
        out[path] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def pad_row_poisoned_model(grid):
    """The SMALL model with random weights and, on the rank holding it, a padding row of the LM head that would
    dominate every softmax if it counted."""
    config = GPTConfig(**SMALL)
    model = build_model(config, grid, weights=random_state_dict(config, seed=2))
    with torch.no_grad():
        model.lm_head.weight[model.lm_head.n_real:] = 1e3
    return model


def tp2_worker(rank):
    grid = init_grid(tp=2)
    hidden, weight, targets, weights = ce_case()
    head = VocabParallelLMHead(C, V, grid)
    with torch.no_grad():
        head.weight.copy_(shard_tensor(weight, head.weight, grid.tp_rank, grid.tp))
        head.weight[head.n_real:] = 1e3  # rank 1's padding row: must never win or count
    results = {}
    for chunk in CHUNKS:
        h = hidden.clone().requires_grad_()
        head.weight.grad = None
        loss = head.loss(enter_tp_region(h, head.group), targets, reduction="none")
        (loss * weights).sum().backward()
        results[chunk] = (loss.detach(), h.grad, head.weight.grad.clone())
        h = hidden.clone().requires_grad_()
        head.weight.grad = None
        total = head.loss(enter_tp_region(h, head.group), targets, reduction="sum", weights=weights)
        total.backward()  # the scalar path: each chunk's statistics all-reduced before its gradient is formed
        results["sum", chunk] = (total.detach(), h.grad, head.weight.grad.clone())
    tensor_parallel.LOSS_CHUNK_BYTES = 5 * 126 * 4  # 5 tokens of a 126-id shard: 10 chunks of the 48 tokens
    model = pad_row_poisoned_model(grid)
    return dict(ce=results, n_real=head.n_real, model=model_losses(model, *model_batch(model.config)))


@pytest.fixture(scope="module")
def tp2():
    return run_gloo(tp2_worker, 2)


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c}")
def test_tp2_fused_loss_and_gradients_match_unsharded_unfused(tp2, chunk):
    hidden, weight, targets, weights = ce_case()
    want_loss, want_dh, want_dw = loss_and_grads(unfused(targets), hidden, weight, targets, weights)
    for r in range(2):
        loss, dh, _ = tp2[r]["ce"][chunk]
        assert rel_err(loss, want_loss) <= 1e-5 and rel_err(dh, want_dh) <= 1e-5, r  # dh all-reduced over tp
    dw0, dw1 = tp2[0]["ce"][chunk][2], tp2[1]["ce"][chunk][2]
    n_real = tp2[1]["n_real"]
    assert n_real < dw1.size(0) and (dw1[n_real:] == 0).all()  # the padding row gets no gradient
    assert rel_err(torch.cat([dw0, dw1[:n_real]]), want_dw) <= 1e-5


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c}")
def test_tp2_weighted_sum_forms_the_unsharded_gradients_in_forward(tp2, chunk):
    hidden, weight, targets, weights = ce_case()
    want_loss, want_dh, want_dw = loss_and_grads(unfused(targets), hidden, weight, targets, weights)
    for r in range(2):
        total, dh, _ = tp2[r]["ce"]["sum", chunk]
        assert rel_err(total, (want_loss * weights).sum()) <= 1e-5 and rel_err(dh, want_dh) <= 1e-5, r
    dw0, dw1 = tp2[0]["ce"]["sum", chunk][2], tp2[1]["ce"]["sum", chunk][2]
    n_real = tp2[1]["n_real"]
    assert (dw1[n_real:] == 0).all() and rel_err(torch.cat([dw0, dw1[:n_real]]), want_dw) <= 1e-5


def test_tp2_model_fused_forward_matches_unfused_loss_and_gradients(tp2):
    for r in range(2):
        (loss, grads), (want, want_grads) = tp2[r]["model"]["fused"], tp2[r]["model"]["unfused"]
        assert rel_err(loss, want) <= 1e-5, r
        for name, g in want_grads.items():
            assert rel_err(grads[name], g) <= 1e-5, (r, name)
    pad = tp2[1]["model"]["fused"][1]["lm_head.weight"][-1]
    assert (pad == 0).all()


def test_tp2_model_fused_loss_matches_tp1(tp2, monkeypatch):
    monkeypatch.setattr(tensor_parallel, "LOSS_CHUNK_BYTES", 5 * 251 * 4)
    model = pad_row_poisoned_model(Grid())  # tp = 1: no padding
    loss, _ = model_losses(model, *model_batch(model.config))["fused"]
    for r in range(2):
        assert rel_err(tp2[r]["model"]["fused"][0], loss) <= 1e-5


def test_tp1_model_fused_forward_matches_unfused_loss_and_gradients(monkeypatch):
    monkeypatch.setattr(tensor_parallel, "LOSS_CHUNK_BYTES", 7 * 251 * 4)  # 7 tokens: 7 chunks of 48
    model = pad_row_poisoned_model(Grid())
    res = model_losses(model, *model_batch(model.config))
    (loss, grads), (want, want_grads) = res["fused"], res["unfused"]
    assert rel_err(loss, want) <= 1e-5
    for name, g in want_grads.items():
        assert rel_err(grads[name], g) <= 1e-5, name


# ---------------------------------------------------------------- memory
def saved_numels(fn):
    """Element counts of every tensor autograd saves while fn() runs forward and backward."""
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().backward()
    return numels


def test_fused_loss_saves_no_tokens_by_vocab_tensor():
    hidden, weight, targets, _ = ce_case()
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    assert max(saved_numels(lambda: vocab_parallel_linear_loss(h, w, targets, 0, None, chunk_tokens=7))) < N * V
    assert max(saved_numels(lambda: vocab_parallel_loss(F.linear(h, w), targets, 0, None))) == N * V  # the test bites


def test_model_loss_saves_and_makes_no_tokens_by_vocab_tensor(monkeypatch):
    config = GPTConfig(**{**SMALL, "vocab_size": 4096})  # the logits dwarf every other activation
    monkeypatch.setattr(tensor_parallel, "LOSS_CHUNK_BYTES", 8 * 4096 * 4)  # 8 tokens a chunk
    model = build_model(config, weights=random_state_dict(config, seed=2))
    idx, targets, weights = model_batch(config)
    tokens_by_vocab = idx.numel() * config.vocab_size
    bench = bench_loss()

    def unfused_loss():
        x = idx
        for layer in model.layers():
            x = layer(x)
        return model.loss(x, (targets, weights))

    for fn, holds_logits in ((lambda: model(idx, (targets, weights)), False), (unfused_loss, True)):
        live = bench.LiveBytes()
        with live:
            numels = saved_numels(fn)
        assert (max(numels) >= tokens_by_vocab) == holds_logits
        assert (live.largest >= tokens_by_vocab * 4) == holds_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_peak_bytes_formula_equals_the_measured_peak_of_the_gpu_path(dtype):
    """scripts/bench_loss.py's d20 numbers come from peak_bytes: measured here at a small shape on CPU, counting
    only what the Triton kernels would allocate (their outputs), to the byte; the chunk does not divide the tokens."""
    bench = bench_loss()
    tokens, n_embd, vocab, chunk = 300, 16, 1000, 32
    args = bench.inputs(tokens, n_embd, vocab, dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    formula = bench.peak_bytes(tokens, n_embd, vocab, itemsize, chunk)
    for fn, want in zip((bench.unfused_loss, bench.fused_loss), formula):
        assert bench.measure(fn, *args, chunk_tokens=chunk, outputs_only=True)["peak"] == want, fn.__name__
    assert formula[0] > 5 * formula[1]


def test_bench_timing_rows_run_on_cpu(capsys):
    bench_loss().timing_report("cpu", 64, 16, 256, torch.float32, chunks=(16, 128))
    out = capsys.readouterr().out
    assert "unfused" in out and "fused chunk 16" in out and "fused chunk 128" not in out
