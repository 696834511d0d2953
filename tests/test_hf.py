"""The Hugging Face format (megachat/hf.py, tools/export_checkpoint.py --format hf), both ways, against transformers'
own NanoChatForCausalLM and tokenizers: tiny runs trained by base_train.py at tp 1 and at tp 2 x pp 2 exported and
loaded with AutoModelForCausalLM / AutoTokenizer (logits, greedy generation, the chat template, tokenizer ids on hard
text), export -> import -> export, a directory laid out like nanochat's Hub checkpoints continued by chat_sft.py
--init-from under tp 2 x pp 2 (and base_train.py --init-from), and lm-evaluation-harness on an export with a task
read from a local file."""
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_chat_phases import SFT
from test_chat_phases import run as run_script
from test_train import TINY, corpus, train  # noqa: F401 (corpus is a fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from megachat import hf
from megachat.checkpoint import load_init, load_run
from megachat.engine import Engine, Sampling
from megachat.model import ROPE_BASE, GPTConfig, build_model, full_state_dict, nanochat_shapes
from megachat.parallel import Grid
from megachat.tokenizer import SPECIAL_TOKENS, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("export_checkpoint", ROOT / "tools" / "export_checkpoint.py")
export_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_tool)

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 12*34?  Show\twork.\n"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute:"},
                                       {"type": "python", "text": "12*34"},
                                       {"type": "python_output", "text": "408"},
                                       {"type": "text", "text": " so 408 🎉"}]}],
    [{"role": "user", "content": "naïve café — 日本語?"}, {"role": "assistant", "content": "  spaces   and\n\n\nlines"},
     {"role": "user", "content": "def f(x):\n    return x ** 2  # ok"}, {"role": "assistant", "content": "1234567"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Bonjour"},
     {"role": "assistant", "content": "Salut !"}],
]


def hard_texts(n=300, seed=0):
    """Random strings over what trips tokenizers up: letters of several scripts, emoji (with joiners), runs of
    spaces, tabs and newlines, digit runs, code punctuation, contractions."""
    pieces = ["a", "Z", "é", "ß", "ж", "日本", "語", "🎉", "👩‍💻", "🇫🇷", "\u200b", " ", "  ", "    ", "\t", "\n", "\n\n",
              "\r\n", "0", "12", "345", "6789", "3.14", "def ", "(x)", "{", "}", "[]", "==", "->", "//", "#", "'s",
              "'ll", "'VE", "n't", "\\", "\"", "_", "the", " quick", "Hello", "WORLD", "…", "—", "\x00", "\x7f"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def exact_rope(model):
    """megachat (as nanochat) rounds RoPE's cos/sin tables to bf16 whatever the activation dtype; transformers'
    NanoChat computes them in the activation dtype. The fp32 comparisons give megachat fp32 tables, the one
    computation the two implementations do differently (in bf16 both round the tables the same way)."""
    for block in model.transformer.h:
        attn = block.attn
        inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, attn.head_dim, 2).float() / attn.head_dim)
        freqs = torch.outer(torch.arange(attn.cos.size(0)).float(), inv_freq)
        attn.cos, attn.sin = freqs.cos(), freqs.sin()
    return model


def ids_of(encoded):
    """apply_chat_template's ids (a list, or a BatchEncoding under transformers 5)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """Two tiny base runs (3 steps): one process, and tp 2 x pp 2 (4 processes)."""
    out = {}
    for name, nprocs, args in (("tp1", 1, []), ("tp2_pp2", 4, ["--tp", "2", "--pp", "2"])):
        out[name] = tmp_path_factory.mktemp(name)
        train(corpus, out[name], nprocs, *TINY, "--num-iterations", "3", *args)
    return out


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """Each run exported with the tool (weights split into files of at most 1 MB: sharded, with an index)."""
    out = {}
    for name, run_dir in runs.items():
        out[name] = tmp_path_factory.mktemp("hf") / name
        export_tool.main([str(run_dir), "--format", "hf", "--output", str(out[name]), "--max-shard-size", "1MB"])
    return out


def test_tokenizer_json_gives_megachat_ids_on_hard_text(tok, tmp_path):
    hf.write_tokenizer(tok, str(tmp_path), 64)
    fast = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = hard_texts()
    for text in texts:
        assert fast(text, add_special_tokens=False)["input_ids"] == tok.encode(text), repr(text)
        assert fast.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    # the special tokens: the same ids, and in text they are the special token (as tiktoken with allowed_special)
    for name in SPECIAL_TOKENS:
        assert fast.convert_tokens_to_ids(name) == tok.encode_special(name)
    for text in texts[:50]:
        mixed = f"<|bos|>{text}<|user_start|>{text}<|assistant_end|>"
        assert fast(mixed, add_special_tokens=False)["input_ids"] == tok.enc.encode(mixed, allowed_special="all")
    # read back as megachat's tokenizer: the same ids, and the fingerprint of the tokenizer it was made from
    tok.save(str(tmp_path / "orig"))
    back = Tokenizer.load(str(tmp_path))
    assert back.fingerprint == Tokenizer.load(str(tmp_path / "orig")).fingerprint
    assert all(back.encode(t) == tok.encode(t) for t in texts)
    assert back.enc._special_tokens == tok.enc._special_tokens


def test_chat_template_renders_what_megachat_renders(tok, tmp_path):
    hf.write_tokenizer(tok, str(tmp_path), 64)
    fast = AutoTokenizer.from_pretrained(str(tmp_path))
    for conversation in CONVERSATIONS:
        prompt = ids_of(fast.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=True))
        assert prompt == tok.render_for_completion(conversation)
        whole = ids_of(fast.apply_chat_template(conversation, tokenize=True))
        assert whole == tok.render_conversation(conversation)[0]
    with pytest.raises(Exception, match="alternate"):
        fast.apply_chat_template([{"role": "assistant", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize("name", ["tp1", "tp2_pp2"])
def test_transformers_gives_megachat_logits_and_greedy_tokens(runs, exports, name):
    export = exports[name]
    assert (export / hf.INDEX_NAME).is_file() and not (export / hf.WEIGHTS_NAME).exists()
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == \
        json.loads((export / "config.json").read_text())["eos_token_id"]
    model, tokenizer, _ = load_run(str(runs[name]), Grid(), "cpu")
    exact_rope(model)
    theirs = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    fast = AutoTokenizer.from_pretrained(str(export))
    idx = torch.tensor([tokenizer.encode(t, prepend="<|bos|>")[:30] for t in hard_texts(4, seed=1)
                        if len(tokenizer.encode(t)) >= 29][:2])
    with torch.no_grad():
        want, got = model(idx), theirs(idx).logits
    assert (got - want).abs().max().item() <= 1e-4
    # megachat reads the export too: --checkpoint DIR (weights_path) and --run DIR
    for read_back in (load_run(str(runs[name]), Grid(), "cpu", weights_path=str(export))[0],
                      load_run(str(export), Grid(), "cpu")[0]):
        with torch.no_grad():
            assert torch.equal(exact_rope(read_back)(idx), want)
    # greedy decoding of a chat prompt: transformers' generate, megachat's KV-cache engine
    prompt = tokenizer.render_for_completion(CONVERSATIONS[0][:3])
    assert ids_of(fast.apply_chat_template(CONVERSATIONS[0][:2], add_generation_prompt=True)) == prompt
    ours, _ = Engine(model, tokenizer).generate_batch([prompt], Sampling(max_tokens=24, temperature=0.0))
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24)
    generated = out[0, len(prompt):].tolist()
    stop = next((i for i, t in enumerate(generated) if t in (tokenizer.encode_special("<|assistant_end|>"),
                                                            tokenizer.bos_id)), len(generated))
    assert len(ours[0]) > 0 and ours[0] == generated[:stop]


def test_export_import_export_gives_identical_tensors(runs, exports, tmp_path):
    weights, run_cfg = load_init(str(exports["tp1"]))  # what --init-from reads
    assert isinstance(weights, hf.Weights) and run_cfg["tokenizer"] == str(exports["tp1"])
    model = build_model(GPTConfig(**run_cfg["model"]), weights=weights)
    sd = full_state_dict(model)
    again = tmp_path / "again"
    hf.save(run_cfg["model"], 3, ((n, sd[n]) for n in nanochat_shapes(model.config)),
            Tokenizer.load(run_cfg["tokenizer"]), str(again), max_shard_size="1MB")
    first, second = hf.Weights(str(exports["tp1"])), hf.Weights(str(again))
    run_weights = load_init(str(runs["tp1"]))[0]
    for name in first:
        assert torch.equal(first[name], second[name]) and torch.equal(first[name], run_weights[name]), name
    for f in ("config.json", "tokenizer.json", "chat_template.jinja", hf.INDEX_NAME):
        assert (again / f).read_text() == (exports["tp1"] / f).read_text(), f
    # a second export over the first replaces it whole
    export_tool.main([str(runs["tp1"]), "--format", "hf", "--output", str(again)])
    assert (again / hf.WEIGHTS_NAME).is_file() and not (again / hf.INDEX_NAME).exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]


def test_a_failed_export_leaves_the_previous_one_whole(tok, tmp_path):
    config = GPTConfig(sequence_len=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)
    sd = full_state_dict(build_model(config, seed=1))
    out = tmp_path / "hf"
    hf.save(vars(config), 1, sd.items(), tok, str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full_at_the_fourth_tensor():
        for i, item in enumerate(sd.items()):
            if i == 3:
                raise OSError(28, "No space left on device")
            yield item
    with pytest.raises(OSError, match="No space left"):
        hf.save(vars(config), 2, disk_full_at_the_fourth_tensor(), tok, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and os.listdir(tmp_path) == ["hf"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a Hugging Face export"):
        hf.save(vars(config), 1, sd.items(), tok, str(tmp_path / "notes"))


def nanochat_hub_layout(export: Path, out: Path, tok_dir: str):
    """A directory as nanochat's Hub checkpoints are: transformers' save_pretrained of NanoChatForCausalLM in bf16
    (one model.safetensors, rms_norm_eps 1e-6), tokenizer.json from transformers' tiktoken converter (what its
    convert_tiktoken_to_fast writes), no chat_template.jinja."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    model = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.bfloat16)
    model.config.rms_norm_eps = 1e-6
    model.save_pretrained(str(out))
    tok = Tokenizer.load(tok_dir)
    tok.save_ranks(str(out.parent / "ranks.tiktoken"))
    TikTokenConverter(vocab_file=str(out.parent / "ranks.tiktoken"), pattern=tok.enc._pat_str,
                      extra_special_tokens=tok.enc._special_tokens).converted().save(str(out / "tokenizer.json"))
    return out


def test_a_hub_nanochat_checkpoint_continues_with_init_from(corpus, runs, exports, tmp_path):  # noqa: F811
    hub = nanochat_hub_layout(exports["tp1"], tmp_path / "hub", json.loads(
        (runs["tp1"] / "config.json").read_text())["tokenizer"])
    with safe_open(str(hub / hf.WEIGHTS_NAME), framework="pt") as f:
        assert "model.layers.0.self_attn.q_proj.weight" in f.keys()
    weights, run_cfg = load_init(str(hub))
    exported = hf.Weights(str(exports["tp1"]))
    assert all(torch.equal(weights[n], exported[n].bfloat16().float()) for n in exported)
    out = tmp_path / "sft"
    proc = run_script("chat_sft.py", out, 4, "--init-from", str(hub), *SFT, "--tp", "2", "--pp", "2",
                      "--num-iterations", "2", "--save-every", "0")
    assert "Traceback" not in proc.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tokenizer"] == str(hub) and cfg["model"] == {**run_cfg["model"], "sequence_len": 64}  # SFT's
    model, tokenizer, _ = load_run(str(out), Grid(), "cpu")  # the continued run loads, with the Hub tokenizer
    assert tokenizer.vocab_size == model.config.vocab_size
    # base continuation: pretraining data tokenized with the run's tokenizer is accepted with the Hub's tokenizer.json
    # (the same fingerprint); --depth is the parent's, whatever TINY says
    train(corpus, tmp_path / "base", 1, *TINY, "--depth", "2", "--num-iterations", "1", "--init-from", str(hub))
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    assert cfg["model"] == run_cfg["model"] and cfg["parent"] == str(hub)


def test_lm_eval_harness_runs_on_an_export(runs, exports, tmp_path):
    data = tmp_path / "data.jsonl"
    docs = [{"question": "The capital of France is", "choices": ["Paris", "Rome", "a cat"], "answer": 0},
            {"question": "Two plus two equals", "choices": ["four", "five"], "answer": 0},
            {"question": "def f(x):\n    return", "choices": ["x", "12 * 34", "🎉"], "answer": 0}]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(
        "task: megachat_local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
                           f"pretrained={exports['tp1']},dtype=float32", "--tasks", "megachat_local_mc",
                           "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2",
                           "--output_path", str(tmp_path / "out"), "--log_samples"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    samples = [json.loads(line) for p in (tmp_path / "out").rglob("samples_megachat_local_mc_*.jsonl")
               for line in p.read_text().splitlines()]
    assert len(samples) == len(docs)
    # each choice's log-likelihood is megachat's: the sum of log p(continuation tokens | context tokens), the
    # continuation being " " + choice (lm-eval's default target delimiter)
    model, tokenizer, _ = load_run(str(runs["tp1"]), Grid(), "cpu")
    exact_rope(model)
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[s["doc_id"]]
        for choice, resp in zip(doc["choices"], s["filtered_resps"]):
            context = tokenizer.encode(doc["question"])
            whole = tokenizer.encode(doc["question"] + " " + choice)
            cont = whole[len(context):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole]))[0, len(context) - 1:-1], -1)
            want = logp.gather(1, torch.tensor(cont)[:, None]).sum().item()
            assert abs(float(resp[0]) - want) <= 1e-4, (doc, choice, resp, want)
