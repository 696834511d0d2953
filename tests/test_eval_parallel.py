"""bpb and CORE on tp2, pp2 and dp2 equal one process (real gloo process groups; megachat.evaluation.model_eval)."""
import pytest
import torch
from _dist import run_gloo

from megachat.evaluation.chat_tasks import evaluate_categorical
from megachat.evaluation.core_eval import evaluate_core
from megachat.evaluation.core_tasks import CoreTask, CoreTaskSet, CoreTaskSpec
from megachat.evaluation.loss_eval import evaluate_bpb
from megachat.evaluation.model_eval import GridForward
from megachat.model import GPTConfig, build_model, nanochat_shapes
from megachat.parallel import Grid, init_grid

BOS = 128
CONFIG = dict(sequence_len=64, vocab_size=130, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
TOKEN_BYTES = torch.tensor([1] * 128 + [0, 0], dtype=torch.int32)  # ids 128, 129 are special


def encode(text):
    return [BOS] + [ord(c) % 128 for c in text]


def random_weights(seed=0):
    """Every weight random (nanochat's init zeroes lm_head, which would tie every prediction)."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * 0.3 for name, shape in nanochat_shapes(GPTConfig(**CONFIG)).items()}


def toy_tasks():
    words = ["apple", "river", "stone", "cloud", "light", "music", "green", "table", "dream", "ocean"]
    mc = [{"query": f"{w} is", "choices": [words[(i + 1) % 10], words[(i + 3) % 10], "xyz"], "gold": i % 3}
          for i, w in enumerate(words)]
    schema = [{"context_options": [w, words[(i + 5) % 10]], "continuation": "and more", "gold": i % 2}
              for i, w in enumerate(words)]
    lm = [{"context": f"{w} {w}", "continuation": w[:2]} for w in words]
    return CoreTaskSet(tasks={
        "mc": CoreTask(CoreTaskSpec("mc", "", "multiple_choice", 2, " ", 33.3), mc, "toy"),
        "schema": CoreTask(CoreTaskSpec("schema", "", "schema", 1, " ", 50.0), schema, "toy"),
        "lm": CoreTask(CoreTaskSpec("lm", "", "language_modeling", 3, " ", 0.0), lm, "toy")},
        missing={"winograd": "toy"})


class ToyTokenizer:
    def encode(self, text):
        return encode(text)[1:]

    def render_for_completion(self, conv):
        return encode(conv["messages"][0]["content"])


def toy_conversations():
    # option "letters" @ A B C are ids 64..67: with tp2 (65 ids per shard) they straddle the two vocab shards
    return [{"letters": list("@ABC"), "messages": [{"role": "user", "content": f"question {i}?"},
                                                   {"role": "assistant", "content": "@ABC"[i % 4]}]}
            for i in range(8)]


def batches(dp_rank=0, dp=1):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 130, (8, 16), generator=g)
    y = torch.randint(0, 130, (8, 16), generator=g)
    y[0, :3] = -1
    return [(x[i:i + 2], y[i:i + 2]) for i in range(dp_rank * 2, 8, dp * 2)]


def evaluate(grid):
    model = build_model(GPTConfig(**CONFIG), grid, weights=random_weights()).eval()
    fwd = GridForward(model, grid)
    bpb = evaluate_bpb(fwd.token_loss, batches(grid.dp_rank, grid.dp), TOKEN_BYTES)
    core = evaluate_core(toy_tasks(), encode, fwd.core_forward, BOS, dp_rank=grid.dp_rank, dp_size=grid.dp,
                         scores=fwd.reports, log=None)
    chat = evaluate_categorical(toy_conversations(), ToyTokenizer(), fwd.letter_logits, dp_rank=grid.dp_rank,
                                dp_size=grid.dp, scores=fwd.reports)
    # the greedy predictions themselves (the toy LM task is too hard for a random model to show them)
    out = fwd.core_forward(batches()[0][0])
    predictions = out[1].tolist() if out is not None else None
    return {"bpb": bpb, "accuracy": core.accuracy, "core": core.core, "num_tasks": core.num_tasks,
            "predictions": predictions, "categorical": chat}


def _worker(rank, tp, pp):
    return evaluate(init_grid(tp=tp, pp=pp))


@pytest.fixture(scope="module")
def single_process():
    return evaluate(Grid())


def test_single_process_scores_every_toy_task(single_process):
    assert single_process["num_tasks"] == 3 and 0 < single_process["bpb"] < 100


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "dp2"])
def test_layout_matches_single_process(single_process, tp, pp):
    results = run_gloo(_worker, 2, tp, pp)
    reporting = [r["predictions"] for r in results if r["predictions"] is not None]
    assert len(reporting) == (2 if tp == pp == 1 else 1)  # tp rank 0 of the last stage in each dp slice
    assert all(p == single_process["predictions"] for p in reporting)
    for got in results:
        assert got["bpb"] == pytest.approx(single_process["bpb"], rel=1e-5)
        assert got["accuracy"] == single_process["accuracy"]
        assert got["core"] == pytest.approx(single_process["core"], rel=1e-9)
        assert got["categorical"] == single_process["categorical"]
