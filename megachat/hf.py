"""megachat.hf: the Hugging Face format, both ways: transformers' NanoChatForCausalLM (model_type "nanochat"), the
format nanochat's own released checkpoints use.

A Hugging Face directory holds config.json (a NanoChatConfig), model.safetensors (or model-0000K-of-0000N.safetensors
and model.safetensors.index.json above `max_shard_size`), generation_config.json, tokenizer.json +
tokenizer_config.json (a `tokenizers` byte-level BPE with megachat's split regex, special tokens as added tokens: the
same ids as megachat's tokenizer) and chat_template.jinja (megachat's chat format, `Tokenizer.render_conversation`).

- `save(config, step, tensors, tokenizer, out_dir)`: streams the weights into that directory one tensor at a time,
  written beside it and swapped in whole, so a partial export never replaces a whole one.
- `is_hf_dir(path)`, `read_config(path)` (a GPTConfig's fields from config.json) and `Weights(path)` (a read-only
  {nanochat name: fp32 tensor} mapping that reads one tensor per access, through safe_open): what --init-from,
  --run and --checkpoint read; megachat.checkpoint dispatches here. The tokenizer of such a directory loads with
  `megachat.tokenizer.Tokenizer.load(path)`.

What NanoChatForCausalLM computes differently from megachat, and what the conversion does about it:
- RMSNorm epsilon: megachat (and nanochat) normalize with F.rms_norm's default, fp32's epsilon; transformers reads
  `rms_norm_eps`, so the export writes fp32's epsilon there. An imported config's own value (the Hub's checkpoints
  say 1e-6, the port's default, not what nanochat trained with) cannot be kept: megachat has no such setting.
- RoPE: the same half-split rotation (transformers' NanoChat `rotate_half` is nanochat's) with theta 10000; a
  directory with another theta or a RoPE scaling type is refused. megachat rounds the cos/sin tables to bf16
  whatever the activation dtype (as nanochat); transformers computes them in the activation dtype. In bf16 the two
  agree; in fp32 transformers' tables are exact and its logits differ from megachat's by that rounding alone.
- Names: transformer.wte -> model.embed_tokens, transformer.h.i.attn.c_{q,k,v,proj} -> model.layers.i.self_attn.
  {q,k,v,o}_proj, mlp.c_fc / c_proj -> mlp.fc1 / fc2, lm_head -> lm_head; the matrices are the same [out, in].
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import torch
from safetensors import safe_open

from megachat.fileio import atomic_write_json, replace_durably
from megachat.model import ROPE_BASE, SOFTCAP, GPTConfig, nanochat_shapes
from megachat.sharded import SafetensorsWriter

WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
MAX_SHARD_SIZE = "5GB"  # huggingface_hub's default shard size: the Hub's files stay under it
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm(eps=None) on fp32 / bf16 inputs
_LAYER_NAMES = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
                "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}

# megachat's chat format (Tokenizer.render_conversation) as a Jinja template: <|bos|>, then per user message
# <|user_start|>...<|user_end|>, per assistant message <|assistant_start|> text / python / python_output parts
# <|assistant_end|>; a leading system message is merged into the first user message ("system\n\nuser").
CHAT_TEMPLATE = """\
{%- if not messages -%}{{ raise_exception('the conversation has no messages') }}{%- endif -%}
{%- set ns = namespace(skip=0) -%}
{%- if messages[0]['role'] == 'system' -%}{%- set ns.skip = 1 -%}{%- endif -%}
{{- '<|bos|>' -}}
{%- for message in messages[ns.skip:] -%}
{%- set content = message['content'] -%}
{%- if loop.first and ns.skip -%}{%- set content = messages[0]['content'] ~ '\\n\\n' ~ content -%}{%- endif -%}
{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
{{- raise_exception('messages must alternate user, assistant, ... (an optional system message first)') -}}
{%- endif -%}
{%- if not content -%}{{- raise_exception('a message has empty content') -}}{%- endif -%}
{%- if message['role'] == 'user' -%}
{{- '<|user_start|>' ~ content ~ '<|user_end|>' -}}
{%- else -%}
{{- '<|assistant_start|>' -}}
{%- if content is string -%}{{- content -}}{%- else -%}
{%- for part in content -%}
{%- if part['type'] == 'python' -%}{{- '<|python_start|>' ~ part['text'] ~ '<|python_end|>' -}}
{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' ~ part['text'] ~ '<|output_end|>' -}}
{%- elif part['type'] == 'text' -%}{{- part['text'] -}}
{%- else -%}{{- raise_exception('unknown part type ' ~ part['type'] ~ '; use text, python or python_output') -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|assistant_end|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}
"""


def hf_name(name: str) -> str:
    """nanochat's parameter name -> transformers' NanoChatForCausalLM name."""
    if name == "transformer.wte.weight":
        return "model.embed_tokens.weight"
    if name.startswith("transformer.h."):
        layer, rest = name.removeprefix("transformer.h.").split(".", 1)
        return f"model.layers.{layer}.{_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"
    return name


def hf_config(config: dict, tokenizer) -> dict:
    """config.json of a model of GPTConfig fields `config` with `tokenizer` (a megachat Tokenizer)."""
    sp = tokenizer.encode_special
    return {
        "architectures": ["NanoChatForCausalLM"], "model_type": "nanochat",
        "vocab_size": config["vocab_size"], "hidden_size": config["n_embd"],
        "intermediate_size": 4 * config["n_embd"], "num_hidden_layers": config["n_layer"],
        "num_attention_heads": config["n_head"], "num_key_value_heads": config["n_kv_head"],
        "max_position_embeddings": config["sequence_len"], "hidden_act": "relu2", "attention_bias": False,
        "attention_dropout": 0.0, "rms_norm_eps": RMS_NORM_EPS, "final_logit_softcapping": SOFTCAP,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(ROPE_BASE)},
        "bos_token_id": tokenizer.bos_id, "eos_token_id": sp("<|assistant_end|>"),
        "pad_token_id": sp("<|assistant_end|>"), "tie_word_embeddings": False, "dtype": "float32",
    }


def _shards(shapes: dict, max_shard_size) -> tuple[dict[str, list[str]], dict | None]:
    """({file: [hf names]}, the index's metadata, None for one file) of fp32 tensors of `shapes` ({hf name: shape}):
    consecutive tensors filled into files of at most max_shard_size (huggingface_hub's notation, "5GB"; a larger
    tensor gets a file of its own). huggingface_hub's own split reorders the tensors, and the weights stream in
    order."""
    from huggingface_hub.serialization._base import parse_size_to_int  # optional: megachat[hf] brings it
    limit = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    groups, size = [[]], 0
    for name, shape in shapes.items():
        n = 4 * torch.Size(shape).numel()
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    if len(groups) == 1:
        return {WEIGHTS_NAME: groups[0]}, None
    files = {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}
    return files, {"total_size": sum(4 * torch.Size(s).numel() for s in shapes.values())}


def write_tokenizer(tokenizer, out_dir: str, model_max_length: int) -> None:
    """tokenizer.json (transformers' tiktoken converter: the split regex, then byte-level BPE whose merges come from
    the mergeable ranks; the special tokens added with their ids), tokenizer_config.json and chat_template.jinja."""
    try:  # an optional package (megachat[hf]), and seconds to import
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:
        raise ImportError(f"the Hugging Face export writes its tokenizer with transformers ({e}): pip install "
                          f"'megachat[hf]'") from None
    specials = sorted(tokenizer.enc._special_tokens.items(), key=lambda kv: kv[1])
    ranks_path = os.path.join(out_dir, "mergeable_ranks.tiktoken")  # what the converter reads; removed below
    tokenizer.save_ranks(ranks_path)
    backend = TikTokenConverter(vocab_file=ranks_path, pattern=tokenizer.enc._pat_str,
                                extra_special_tokens=[name for name, _ in specials]).converted()
    os.remove(ranks_path)
    wrong = [(name, i, backend.token_to_id(name)) for name, i in specials if backend.token_to_id(name) != i]
    if wrong:
        raise ValueError(f"the converted tokenizer gives special tokens other ids than megachat's ({wrong[:3]}): the "
                         f"special tokens must take the last ids of the vocabulary (tools/train_tokenizer.py)")
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|assistant_end|>",
                                   pad_token="<|assistant_end|>", model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def save(config: dict, step: int, tensors, tokenizer, out_dir: str, max_shard_size=MAX_SHARD_SIZE) -> None:
    """Write the Hugging Face directory out_dir for a model of GPTConfig fields `config` whose full fp32 weights
    arrive from the iterable `tensors` of (nanochat name, tensor) in nanochat_shapes' order, one at a time. Built in
    a sibling directory, then swapped in: out_dir is either its old self or the whole new export."""
    shapes = {hf_name(n): s for n, s in nanochat_shapes(GPTConfig(**config)).items()}
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not is_hf_dir(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"--output {out_dir} exists and is not a Hugging Face export; give a new directory")
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write(tmp, config, step, shapes, tensors, tokenizer, max_shard_size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _write(tmp: str, config: dict, step: int, shapes: dict, tensors, tokenizer, max_shard_size) -> None:
    """save's files, durable, in the directory tmp (the tokenizer first: it needs transformers, and the weights take
    the time)."""
    write_tokenizer(tokenizer, tmp, config["sequence_len"])
    files, index = _shards(shapes, max_shard_size)
    owner = {name: file for file, names in files.items() for name in names}
    tensors = iter(tensors)
    for file, names in files.items():  # the shards hold consecutive tensors: one writer open at a time
        writer = SafetensorsWriter(os.path.join(tmp, file), {n: (torch.float32, shapes[n]) for n in names},
                                   metadata={"format": "pt", "step": str(step)})
        for _ in names:
            name, tensor = next(tensors, (None, None))
            if name is None or owner.get(hf_name(name)) != file:
                raise ValueError(f"weights arrived out of order at {name}: give them in nanochat_shapes' order")
            writer.write(hf_name(name), tensor.float())
        writer.close()
    if index is not None:
        atomic_write_json(os.path.join(tmp, INDEX_NAME), {"metadata": index, "weight_map": {
            name: file for file, names in files.items() for name in names}}, indent=2)
    cfg = hf_config(config, tokenizer)
    atomic_write_json(os.path.join(tmp, "config.json"), cfg, indent=2)
    atomic_write_json(os.path.join(tmp, "generation_config.json"), {
        "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
        "pad_token_id": cfg["pad_token_id"]}, indent=2)
    for name in os.listdir(tmp):  # save_pretrained's files were written in place: make them durable too
        replace_durably(os.path.join(tmp, name), os.path.join(tmp, name))


# ---- reading ----
def is_hf_dir(path: str) -> bool:
    """Whether `path` is a directory with a transformers config.json of model_type "nanochat"."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            return json.load(f).get("model_type") == "nanochat"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def read_config(path: str) -> dict:
    """The GPTConfig fields of the Hugging Face directory `path`; ValueError for what megachat's GPT cannot run."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", ROPE_BASE))
    hidden = cfg["hidden_size"]
    problems = [what for what, bad in [
        (f"intermediate_size {cfg.get('intermediate_size')} (megachat's MLP is 4 x hidden_size = {4 * hidden})",
         cfg.get("intermediate_size", 4 * hidden) != 4 * hidden),
        (f"hidden_act {cfg.get('hidden_act')!r} (megachat's MLP is relu2)", cfg.get("hidden_act", "relu2") != "relu2"),
        (f"final_logit_softcapping {cfg.get('final_logit_softcapping')} (megachat caps at {SOFTCAP})",
         cfg.get("final_logit_softcapping", SOFTCAP) != SOFTCAP),
        (f"rope theta {theta} (megachat's RoPE base is {ROPE_BASE})", float(theta) != ROPE_BASE),
        (f"rope type {rope.get('rope_type')!r} (megachat's RoPE is unscaled)",
         rope.get("rope_type", "default") != "default"),
        ("attention_bias true (megachat's linears have no bias)", bool(cfg.get("attention_bias"))),
        ("tie_word_embeddings true (megachat's head is untied)", bool(cfg.get("tie_word_embeddings"))),
        (f"head_dim {cfg.get('head_dim')} (megachat's is hidden_size / num_attention_heads)",
         cfg.get("head_dim") not in (None, hidden // cfg["num_attention_heads"]))] if bad]
    if problems:
        raise ValueError(f"{path}: a NanoChat model megachat's GPT does not compute: {'; '.join(problems)}")
    return {"sequence_len": cfg.get("max_position_embeddings", 2048), "vocab_size": cfg["vocab_size"],
            "n_layer": cfg["num_hidden_layers"], "n_head": cfg["num_attention_heads"],
            "n_kv_head": cfg.get("num_key_value_heads") or cfg["num_attention_heads"], "n_embd": hidden}


class Weights(Mapping):
    """{nanochat name: full fp32 tensor} of the Hugging Face directory `path`, read from its safetensors file(s) one
    tensor per access (nothing is held: build_model fills each parameter as it reads it)."""

    def __init__(self, path: str):
        self.path, self.config = path, read_config(path)
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            with safe_open(os.path.join(path, WEIGHTS_NAME), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), WEIGHTS_NAME)
        else:
            raise FileNotFoundError(f"{path} has config.json but neither {WEIGHTS_NAME} nor {INDEX_NAME}: the "
                                    f"weights are missing (a .bin checkpoint? save it with safe_serialization)")
        self._files = {}
        for name in nanochat_shapes(GPTConfig(**self.config)):
            file = weight_map.get(hf_name(name))
            if file is None:
                raise ValueError(f"{path} lacks {hf_name(name)}: it is not a complete NanoChat checkpoint")
            self._files[name] = file

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(os.path.join(self.path, self._files[name]), framework="pt") as f:
            return f.get_tensor(hf_name(name)).float()

    def __iter__(self):
        return iter(self._files)

    def __len__(self):
        return len(self._files)
