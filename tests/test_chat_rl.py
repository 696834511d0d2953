"""megachat.rl and scripts/chat_rl.py, nanochat's simplified GRPO on the trainer: rows train only the tokens the model
sampled, weighted by reward - the question's mean reward; an RL step under dp 2 (ZeRO-1) equals one process given
the same rollouts; the script runs end to end under the deepspeed launcher (dp 2, SpellingBee, offline) on a tiny
SFT-like run, and a resume from its step-1 checkpoint gives the same step-2 loss. The tiny model is a hand-set
bigram model (c_proj = 0, so the logits depend on the last token only) that answers "#...# 1" or "#...# 2", so
rewards, and the policy gradient, are not all zero."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dist import free_port, run_gloo

from megachat import rl
from megachat.checkpoint import load_weights
from megachat.model import GPTConfig, init_full_weight, nanochat_shapes
from megachat.sharded import save_full

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


# ---- rows: what is trained, with which weight ----

def test_rows_train_only_sampled_tokens_weighted_by_the_question_centred_reward():
    r = rl.Rollout(prompt=[1, 2, 3], completions=[[10, 11, 12, 13], [20]], masks=[[1, 0, 0, 1], [1]],
                   rewards=[1.0, 0.0])
    assert r.advantages() == [0.5, -0.5]
    x, y, w = rl.policy_rows([r], seq_len=8, pad_id=0)
    assert x.tolist() == [[1, 2, 3, 10, 11, 12, 0, 0], [1, 2, 3, 0, 0, 0, 0, 0]]
    # prompt -> -1; 10 sampled; 11, 12 forced by the calculator -> -1; 13 sampled; padding -1
    assert y.tolist() == [[-1, -1, 10, -1, -1, 13, -1, -1], [-1, -1, 20, -1, -1, -1, -1, -1]]
    assert w.tolist() == [[0, 0, 0.5, 0, 0, 0.5, 0, 0], [0, 0, -0.5, 0, 0, 0, 0, 0]]
    assert x.dtype == y.dtype == torch.long and w.dtype == torch.float32


def test_a_question_whose_samples_all_score_alike_contributes_zero_weight():
    varied = rl.Rollout([1, 2], [[5, 6], [7]], [[1, 1], [1]], [1.0, 0.0])
    alike = rl.Rollout([3], [[8, 9, 10], [11, 12]], [[1, 1, 1], [1, 0]], [1.0, 1.0])
    x, y, w = rl.policy_rows([varied, alike], seq_len=4, pad_id=0)
    assert (w[2:] == 0).all() and (y[2:] >= 0).sum() == 4  # still trained tokens: they count in the normaliser
    assert w[:2].abs().sum() > 0


def test_rows_longer_than_seq_len_are_cut_and_micro_batches_split_rows():
    x, y, w = rl.policy_rows([rl.Rollout([1, 2], [[3, 4, 5, 6], [7]], [[1, 1, 1, 1], [1]], [0.0, 1.0])], 3, 0)
    assert x.tolist() == [[1, 2, 3], [1, 2, 0]] and y.tolist() == [[-1, 3, 4], [-1, 7, -1]]
    assert [tuple(t.shape) for mb in rl.micro_batches(x, y, w, 1) for t in mb] == [(1, 3)] * 6
    with pytest.raises(ValueError, match="do not split into micro-batches of 4"):
        rl.micro_batches(x, y, w, 4)


def test_the_rl_batch_must_split_into_whole_questions_and_micro_batches():
    rl.check_rl_batch(16, 16, 8, 8)
    with pytest.raises(ValueError, match="--questions-per-step 6 does not split over 4 data-parallel slices"):
        rl.check_rl_batch(6, 16, 8, 4)
    with pytest.raises(ValueError, match="not a multiple of --device-batch-size 8"):
        rl.check_rl_batch(4, 6, 8, 2)


def test_gsm8k_without_chat_data_is_refused_naming_the_fetch_and_spelling_bee():
    with pytest.raises(ValueError, match="needs --chat-data DIR .*tools/fetch_data.py chat gsm8k.*--task SpellingBee"):
        rl.load_rl_tasks("GSM8K", None)


def test_gsm8k_trains_on_the_fetched_train_split_in_a_seeded_order_and_evaluates_on_test(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
            for i in range(6)]
    (tmp_path / "gsm8k").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm8k" / "train-00000-of-00001.parquet")
    train, held_out, where = rl.load_rl_tasks("GSM8K", str(tmp_path), eval_questions=3, seed=1)
    assert where == (f"GSM8K train (6 questions from {tmp_path}); evaluation on GSM8K test (first 3 questions)")
    questions = [train[i]["messages"][0]["content"] for i in range(6)]
    assert sorted(questions) == sorted(r["question"] for r in rows)
    assert questions == [rl.load_rl_tasks("GSM8K", str(tmp_path), 3, seed=1)[0][i]["messages"][0]["content"]
                         for i in range(6)]
    assert questions != [rl.load_rl_tasks("GSM8K", str(tmp_path), 3, seed=2)[0][i]["messages"][0]["content"]
                         for i in range(6)]
    assert train.score(train[0], f"so #### {train[0]['answer']}") and not train.score(train[0], "#### -1")
    from megachat.tasks.gsm8k import load_gsm8k
    assert [c["messages"][0]["content"] for c in held_out] == [load_gsm8k()[i]["messages"][0]["content"]
                                                               for i in range(3)]


@pytest.mark.parametrize("flags,message", [(["--pp", "2"], "--pp 2: RL samples its rollouts with the inference engine"),
                                           (["--zero", "3"], "--zero 3: ZeRO-3 gathers the weights with a collective")])
def test_pp_and_zero3_are_refused_before_anything_starts(tmp_path, flags, message):
    import chat_rl
    with pytest.raises(ValueError, match=message):
        chat_rl.main(["--init-from", str(tmp_path), "--out", str(tmp_path / "out"), *flags])


# ---- a tiny SFT-like model whose answers are sometimes right ----

DEPTH = 2  # n_embd 128, one head


def bigram_weights(tok, config):
    """nanochat's init, then a bigram chain (with c_proj = 0 every block adds 0, so the logits are
    lm_head . norm(wte[last token])): <|assistant_start|> -> "#", "#" -> "#" (~90 %) or " ", " " -> "1" or "2",
    digit -> <|assistant_end|>. Four "#" or more then " 1" / " 2" is a SpellingBee answer, right or wrong."""
    w = {name: init_full_weight(name, shape, 0) for name, shape in nanochat_shapes(config).items()}
    sp = tok.encode_special
    hash_, space, one, two = (tok.encode(c)[0] for c in "# 12")
    chain = {sp("<|assistant_start|>"): {hash_: 14.0}, hash_: {hash_: 14.0, space: 10.0},
             space: {one: 14.0, two: 14.0}, one: {sp("<|assistant_end|>"): 14.0},
             two: {sp("<|assistant_end|>"): 14.0}}
    for dim, (token, following) in enumerate(chain.items()):
        w["transformer.wte.weight"][token] = 0.0
        w["transformer.wte.weight"][token, dim] = 1.0  # after the RMSNorm: sqrt(n_embd) in dimension `dim`
        for nxt, logit in following.items():
            w["lm_head.weight"][nxt, dim] = logit / math.sqrt(config.n_embd)
    return w


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tok):
    """A run directory as SFT leaves it: config.json {"model", "tokenizer"}, model/ (the bigram model)."""
    out = tmp_path_factory.mktemp("sft")
    tok.save(str(out / "tokenizer"))
    config = GPTConfig.from_depth(DEPTH, tok.vocab_size, 64)
    save_full(str(out / "model"), bigram_weights(tok, config), config)
    (out / "config.json").write_text(json.dumps({"model": vars(config), "tokenizer": str(out / "tokenizer")}))
    return out


def test_rollouts_sample_the_live_model_and_score_its_answers(sft_run, tok):
    from megachat.engine import Engine, Sampling
    from megachat.model import build_model
    config = GPTConfig(**json.loads((sft_run / "config.json").read_text())["model"])
    engine = Engine(build_model(config, weights=load_weights(str(sft_run / "model"))), tok)
    train, held_out, where = rl.load_rl_tasks("SpellingBee", eval_questions=4)
    assert where.startswith("SpellingBee train (80,000 synthetic questions")
    sampling = Sampling(num_samples=8, max_tokens=24, temperature=1.0, seed=rl.sample_seed(42, 0))
    r = rl.rollout(engine, train[0], train.score, sampling)
    assert r == rl.rollout(engine, train[0], train.score, sampling)
    assert r.prompt == tok.render_for_completion(train[0])
    texts = [tok.decode(c) for c in r.completions]
    assert all(t.startswith("#") for t in texts) and all(m == [1] * len(c) for c, m in zip(r.completions, r.masks))
    assert r.rewards == [float(t.endswith(f"#### {train[0]['answer']}")) for t in texts]
    assert 0 < sum(r.rewards) < len(r.rewards), texts  # some right, some wrong: a learning signal
    passes = rl.pass_at_k(engine, held_out, Sampling(num_samples=4, max_tokens=24, temperature=1.0, seed=42))
    assert list(passes) == ["pass@1", "pass@2", "pass@3", "pass@4"]
    assert all(a <= b for a, b in zip(list(passes.values()), list(passes.values())[1:])), passes


# ---- one RL step: dp 2 (ZeRO-1) equals one process ----

Q, SAMPLES, SEQ = 4, 4, 24


def fixed_rollouts():
    """Q questions x SAMPLES samples of random tokens, some forced, rewards 0/1 (question 1: all alike)."""
    g = torch.Generator().manual_seed(0)
    randint = lambda lo, hi, n=None: torch.randint(lo, hi, (n,) if n else (), generator=g)  # noqa: E731
    out = []
    for q in range(Q):
        prompt = randint(0, 512, int(randint(4, 10))).tolist()
        completions = [randint(0, 512, int(randint(1, 14))).tolist() for _ in range(SAMPLES)]
        masks = [[int(m) for m in (randint(0, 4, len(c)) > 0)] for c in completions]
        rewards = [1.0] * SAMPLES if q == 1 else [float(v) for v in randint(0, 2, SAMPLES)]
        out.append(rl.Rollout(prompt, completions, masks, rewards))
    assert len({tuple(r.rewards) for r in out}) > 1
    return out


def random_model_weights(config):
    """Every matrix random (the init zeroes lm_head and c_proj: only lm_head would get a gradient)."""
    g = torch.Generator().manual_seed(1)
    return {name: torch.randn(shape, generator=g) / (1.0 if "wte" in name else shape[1] ** 0.5)
            for name, shape in nanochat_shapes(config).items()}


def rl_step_worker(rank, rollouts, zero):
    import torch.distributed as dist

    from megachat.build import build_trainer
    from megachat.train_config import TrainConfig
    cfg = TrainConfig(depth=DEPTH, vocab_size=512, seq_len=SEQ, device_batch_size=2,
                      total_batch_size=Q * SAMPLES * SEQ, num_iterations=4, zero=zero, dtype="fp32",
                      ns_dtype="fp32", lr_scale=0.05, warmdown_ratio=1.0, grad_clip=0.0)
    trainer = build_trainer(cfg, weights=random_model_weights(cfg.model_config()))
    grid = trainer.grid
    mine = [rollouts[n] for n in rl.batch_indices(0, Q, grid.dp_rank, grid.dp).tolist()]
    rec = trainer.train_step(rl.micro_batches(*rl.policy_rows(mine, SEQ, 0), cfg.device_batch_size))
    weights = trainer.full_state_dict()
    return {"loss": rec["loss"], "weights": weights} if dist.get_rank() == 0 else None


def test_an_rl_step_under_dp2_zero1_equals_one_process():
    rollouts = fixed_rollouts()
    one = run_gloo(rl_step_worker, 1, rollouts, 0, timeout_s=120)[0]
    two = run_gloo(rl_step_worker, 2, rollouts, 1, timeout_s=120)[0]
    before = random_model_weights(GPTConfig.from_depth(DEPTH, 512, SEQ))
    assert one["loss"] != 0.0
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    for name, want in one["weights"].items():
        step = (want - before[name]).abs().max().item()
        assert step > 0, f"{name} did not move"
        # every element to 1e-6 of a ~3e-4 step, but AdamW's first step is lr * g / (|g| + 1e-10): where the
        # centred advantages cancel a gradient down to rounding noise, a few elements may land apart by a
        # fraction of one step (the summation order differs between dp 1 and dp 2)
        diff = (two["weights"][name] - want).abs()
        assert (diff > 1e-6).sum() <= 2 and diff.max() <= 0.05 * step, (name, diff.max().item(), step)


# ---- the script end to end under the launcher ----

TINY = ["--task", "SpellingBee", "--questions-per-step", "4", "--num-samples", "4", "--device-batch-size", "4",
        "--max-new-tokens", "24", "--num-iterations", "2", "--eval-every", "2", "--eval-questions", "4",
        "--eval-samples", "2", "--save-every", "1", "--dtype", "fp32", "--zero", "1"]


def chat_rl(sft_run, out, *args, timeout=240, check=True):
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "scripts" / "chat_rl.py"), "--init-from", str(sft_run), "--out", str(out), *TINY, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_chat_rl_runs_end_to_end_under_dp2_and_resumes_exactly(sft_run, tmp_path):
    out = tmp_path / "rl"
    proc = chat_rl(sft_run, out)
    assert "SpellingBee train (80,000 synthetic questions, train seeds)" in proc.stdout
    recs = records(out)
    loss = {r["step"]: r["loss"] for r in recs if "loss" in r}
    reward = {r["step"]: r["reward"] for r in recs if "reward" in r}
    evals = [r for r in recs if "pass@1" in r]
    assert sorted(loss) == sorted(reward) == [1, 2]
    assert all(v != 0.0 for v in loss.values()), loss  # rewards varied within a question: a policy gradient
    assert 0 < reward[1] < 1, reward
    assert [e["step"] for e in evals] == [0, 2] and all(set(e) >= {"pass@1", "pass@2"} for e in evals)
    config = json.loads((out / "config.json").read_text())
    assert config["phase"] == "rl" and config["parent"] == str(sft_run) and config["task"] == "SpellingBee"
    assert config["train"]["lr_scale"] == 0.05 and config["train"]["total_batch_size"] == 16 * config["train"][
        "seq_len"]
    weights = load_weights(str(out / "model"))
    assert set(weights) == set(nanochat_shapes(GPTConfig(**config["model"])))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # killed right after the step-1 checkpoint: the resume samples the same rollouts from the same weights
    again = tmp_path / "again"
    shutil.copytree(out / "checkpoints" / "step_000001", again / "checkpoints" / "step_000001")
    (again / "checkpoints" / "latest").write_text("step_000001")
    shutil.copy(out / "metrics.jsonl", again / "metrics.jsonl")
    proc = chat_rl(sft_run, again, "--resume")
    assert "start at step 1" in proc.stdout
    resumed = records(again)
    assert {r["step"]: r["loss"] for r in resumed if "loss" in r} == pytest.approx(loss, rel=1e-6)
    assert {r["step"]: r["reward"] for r in resumed if "reward" in r} == reward
