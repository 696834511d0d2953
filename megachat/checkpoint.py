"""megachat.checkpoint: checkpoints that are complete or invisible, kept to the last K, resumable exactly under the
layout they were saved with or any other.

Layout: RUN_DIR/checkpoints/step_000123/ holds state/, the layout-free sharded state (megachat.sharded: every rank
writes the elements it holds, in parallel, as rectangles of the full tensors under nanochat's names: the fp32
master weights and the optimizer state, with the step; an index.json written last names the files with their
CRC-32s), and megachat.json (step, consumed samples: the data position, the layout, the config), readable without
torch. RUN_DIR/checkpoints/latest names the newest complete checkpoint.

`latest` is replaced atomically (temp file + fsync + os.replace) only after every rank's files are fsynced and the
index and megachat.json are written: a checkpoint that `latest` does not name is never loaded, so an interrupted
save (kill -9 at any moment) leaves the previous checkpoint in charge. A resume first runs `verify`: every file
against the size and CRC-32 its index records, so damage after the save stops the run with the file's name
instead of loading garbage.

Every resume reads the same files (`layout_free_state`): each rank reads only its own slices, its tp shards into
the model before DeepSpeed starts and its pieces of the fp32 master weights and of the optimizer state after. The
state is everything a step depends on: the weights, Muon's momentum, Adam's moments, the step (the schedule's
position, Adam's bias correction) and the data position (the data is indexed by global sample number); no global
RNG is drawn from in training (RL samples from generators seeded per question), so a resume under the same layout
continues bit for bit.

Final weights: RUN_DIR/model/ (Trainer.save_weights), the same sharded form without the optimizer state;
`load_weights` / `load_run` / `load_init` read it, an exported .safetensors file (tools/export_checkpoint.py) and
nanochat's checkpoints.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from megachat import hf, sharded
from megachat.fileio import atomic_write
from megachat.model import GPTConfig, build_model
from megachat.tokenizer import Tokenizer

TAG_RE = re.compile(r"^step_(\d{6,})$")
STATE_DIR = "state"  # step_NNNNNN/state/: the layout-free sharded state
WEIGHTS_DIR = "model"  # RUN_DIR/model/: the final weights, sharded


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def latest_tag(ckpt_dir: str) -> str | None:
    """The tag `latest` names, or None when there is no complete checkpoint."""
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not TAG_RE.match(tag) or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise RuntimeError(f"{path} names {tag!r}, which is not a checkpoint directory in {ckpt_dir}; "
                           f"point it at an existing step_NNNNNN directory or delete it to start over")
    return tag


def archive_damage(path: str) -> str | None:
    """What is wrong with the torch.save file at path (truncated, overwritten, a record whose bytes no longer
    match their CRC-32), or None when it is intact; reads the whole file once."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{path}: not a complete torch.save file ({e})"
    return f"{path}: record {bad} fails its CRC-32 check" if bad is not None else None


def verify(ckpt_dir: str, tag: str) -> None:
    """Check checkpoint `tag` before loading it: every file of its sharded state must have the size and CRC-32 its
    index records. The ranks split the files between them and share what they find, so all stop together with one
    message naming the file and the previous checkpoint, instead of one rank failing while the others wait in a
    collective."""
    tag_dir = os.path.join(ckpt_dir, tag)
    checks, damage = [], None
    try:
        checks = sharded.ShardedState(os.path.join(tag_dir, STATE_DIR)).files()
    except (OSError, ValueError) as e:
        damage = str(e)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    damage = damage or next(filter(None, (sharded.file_damage(*f) for f in checks[rank::world])), None)
    if world > 1:
        found = [None] * world
        dist.all_gather_object(found, damage)
        damage = next((d for d in found if d), None)
    if damage:
        steps = sorted(int(TAG_RE.match(t).group(1)) for t in os.listdir(ckpt_dir)
                       if TAG_RE.match(t) and os.path.isfile(os.path.join(ckpt_dir, t, "megachat.json")))
        earlier = [t for t in steps if t < int(TAG_RE.match(tag).group(1))]
        fix = (f"resume from the previous checkpoint: echo {tag_for(earlier[-1])} > {os.path.join(ckpt_dir, 'latest')}"
               if earlier else "no earlier checkpoint is kept: restore the file from a copy or start over without "
               "--resume")
        raise RuntimeError(f"checkpoint {tag_dir} is damaged: {damage}; {fix}")


def read_meta(ckpt_dir: str, tag: str) -> dict:
    """step_NNNNNN/megachat.json: step, consumed_samples, layout (tp, pp, dp, zero), config."""
    path = os.path.join(ckpt_dir, tag, "megachat.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {os.path.join(ckpt_dir, tag)} was not written by megachat's "
                                f"checkpoint.save; resume from a megachat checkpoint")
    with open(path) as f:
        return json.load(f)


def save(engine, ckpt_dir: str, step: int, meta: dict, model_config, keep: int = 3, *, staged: dict | None = None,
         group=None, check_space: bool = True) -> str:
    """Save a checkpoint of the state after `step` optimizer steps (collective over `group`, default the world);
    returns its tag. meta (step, consumed_samples, layout, config) goes to step_NNNNNN/megachat.json; every rank
    writes its slices of the training state of the model of `model_config` (a GPTConfig; or `staged`, a copy
    sharded.stage made) into step_NNNNNN/state/. The checkpoint becomes visible through `latest` only once every
    rank's files are on disk; then all but the newest `keep` are removed. A write that fails on any rank (a full
    disk, an I/O error, a read-only directory) raises OSError on every rank naming the path, the bytes it needed and
    the bytes free; the unfinished checkpoint is removed and `latest` still names the previous one, intact.
    check_space: first refuse, the same way, a save that cannot fit, judged by the size of the previous checkpoint
    (a disk that fills during the save is still caught by the writes themselves; the tests turn this off to fault
    each write)."""
    tag = tag_for(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    if check_space:
        _refuse(_any_problem(_no_room(ckpt_dir, tag_dir) if dist.get_rank() == 0 else None, group), ckpt_dir,
                tag_dir, group)
    problem = None
    try:  # each rank fsyncs its own file; rank 0 writes the index after all of them
        sharded.save(os.path.join(tag_dir, STATE_DIR), engine, model_config, step, meta["layout"], optimizer=True,
                     staged=staged, group=group)  # raises on every rank alike
        if dist.get_rank() == 0:  # the index's and this write fsync their directories
            atomic_write(os.path.join(tag_dir, "megachat.json"), json.dumps(
                {k: meta[k] for k in ("step", "consumed_samples", "layout", "config")}, indent=2))
    except OSError as e:
        problem = str(e)
    problem = _any_problem(problem, group)  # every rank has written and closed its files
    if problem is None and dist.get_rank() == 0:
        try:
            atomic_write(os.path.join(ckpt_dir, "latest"), tag)
        except OSError as e:
            problem = str(e)
    _refuse(_any_problem(problem, group), ckpt_dir, tag_dir, group)
    if dist.get_rank() == 0:
        tags = sorted(t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(ckpt_dir, t)))
        for old in tags[:-keep] if keep > 0 else []:
            if old != tag:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier(group=group)
    return tag


def _no_room(ckpt_dir: str, tag_dir: str) -> str | None:
    """Why a new checkpoint will not fit beside the others (judged by the size of the newest), or None."""
    previous = latest_tag(ckpt_dir)
    if previous is None or os.path.join(ckpt_dir, previous) == tag_dir:
        return None
    need = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(os.path.join(ckpt_dir, previous))
               for f in files)
    free = shutil.disk_usage(ckpt_dir).free
    return None if need < free else (f"cannot write {tag_dir} (not enough space: {previous} took {need:,} bytes): "
                                     f"it needs {need:,} bytes, {free:,} bytes are free on its filesystem")


def _refuse(problem: str | None, ckpt_dir: str, tag_dir: str, group=None) -> None:
    """On every rank alike (problem comes from _any_problem): nothing when problem is None; else remove the
    unfinished checkpoint and raise OSError naming the problem and the checkpoint still in charge."""
    if problem is None:
        return
    previous = latest_tag(ckpt_dir)
    if dist.get_rank() == 0 and os.path.join(ckpt_dir, previous or "") != tag_dir:
        shutil.rmtree(tag_dir, ignore_errors=True)  # its space back; `latest` never named it
    dist.barrier(group=group)
    raise OSError(f"checkpoint {tag_dir} was not written: {problem}; "
                  + (f"{os.path.join(ckpt_dir, 'latest')} still names {previous}, intact: free space (or fix the "
                     f"storage) and continue with --resume auto" if previous else
                     "there is no earlier checkpoint: free space (or fix the storage) and start again"))


def _any_problem(problem: str | None, group=None) -> str | None:
    """The first rank's problem, on every rank (collective over `group`, default the world)."""
    found = [None] * dist.get_world_size(group)
    dist.all_gather_object(found, problem, group=group)
    return next((p for p in found if p), None)


def layout_free_state(ckpt_dir: str, tag: str) -> sharded.ShardedState:
    """Checkpoint `tag`'s training state (step_NNNNNN/state/), which each rank of any layout reads by slices."""
    return sharded.ShardedState(os.path.join(ckpt_dir, tag, STATE_DIR))


def read_run_config(run_dir: str) -> dict:
    """RUN_DIR/config.json as the training script wrote it ("model", "train", "tokenizer", data paths); for a Hugging
    Face directory (megachat.hf) its "model" and "tokenizer" (the directory itself)."""
    if hf.is_hf_dir(run_dir):
        return {"model": hf.read_config(run_dir), "tokenizer": run_dir}
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --run must be the --out directory of a training run")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): restore it from the run's checkpoints/*/megachat.json "
                         f"or retrain") from None


def final_weights(run_dir: str) -> str:
    """Where a run's final weights are: RUN_DIR/model/ (sharded); a Hugging Face directory's are in it."""
    if hf.is_hf_dir(run_dir):
        return run_dir
    return os.path.join(run_dir, WEIGHTS_DIR)


def sharded_state(path: str) -> sharded.ShardedState:
    """The sharded state at path: a state directory itself, a checkpoint step_NNNNNN (its state/) or a run directory
    (its final weights, model/)."""
    for directory in (path, os.path.join(path, STATE_DIR), os.path.join(path, WEIGHTS_DIR)):
        if os.path.isfile(os.path.join(directory, sharded.INDEX)):
            return sharded.ShardedState(directory)
    raise FileNotFoundError(f"{path} holds no sharded state: no {sharded.INDEX} in it, in {STATE_DIR}/ (a checkpoint) "
                            f"or in {WEIGHTS_DIR}/ (a finished run)")


def load_weights(path: str) -> dict:
    """Full fp32 weights under nanochat's names (the whole model in memory) from `path`: a sharded state
    (`sharded_state`: RUN_DIR/model, a checkpoint RUN_DIR/checkpoints/step_NNNNNN), an exported .safetensors file,
    or a torch.save state dict (nanochat's model_NNNNNN.pt, or {"state_dict": ...}). Checked first: sharded files
    against the CRC-32s of their index, a .pt against the CRC-32s of its records (torch.load would read flipped bits
    as weights without a word). A Hugging Face directory (megachat.hf) gives a mapping that reads one tensor per
    access instead."""
    if os.path.isdir(path) and hf.is_hf_dir(path):
        return hf.Weights(path)
    if os.path.isdir(path):
        state = sharded_state(path)
        damage = state.damage()
        if damage:
            raise RuntimeError(f"{damage}; the weights are damaged: point --checkpoint at another copy (each "
                               f"RUN_DIR/checkpoints/step_NNNNNN holds the weights of that step)")
        return state.weights()
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights at {path}: pass --checkpoint PATH (a run's model/ directory, a "
                                f"checkpoint step_NNNNNN, an exported .safetensors or a .pt state dict under "
                                f"nanochat's names), or train to the end (RUN_DIR/model/ is written after the last "
                                f"step)")
    if path.endswith(".safetensors"):
        return {k: v.float() for k, v in load_file(path).items()}
    damage = archive_damage(path)
    if damage:
        raise RuntimeError(f"{damage}; the weights are damaged: point --checkpoint at another copy (each "
                           f"RUN_DIR/checkpoints/step_NNNNNN holds the weights of that step)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["state_dict"] if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else obj


def load_run(run_dir: str, grid, device, dtype=torch.float32, weights_path: str | None = None,
             tokenizer_dir: str | None = None):
    """(model, tokenizer, run config) of a finished run on this rank of `grid`: RUN_DIR/config.json's model with
    the run's final weights (`final_weights`; or weights_path's, any form `load_weights` reads), in eval mode; the
    tokenizer the run recorded (or tokenizer_dir)."""
    run_cfg = read_run_config(run_dir)
    tokenizer = Tokenizer.load(tokenizer_dir or run_cfg["tokenizer"])
    weights = load_weights(weights_path or final_weights(run_dir))
    model = build_model(GPTConfig(**run_cfg["model"]), grid, device, weights=weights, dtype=dtype).eval()
    return model, tokenizer, run_cfg


def load_init(path: str) -> tuple[dict, dict]:
    """(full weights, run config) to start a training phase from: a megachat run directory (config.json + its final
    weights, model/), a Hugging Face directory (megachat.hf: its tokenizer too), a .safetensors file
    exported by tools/export_checkpoint.py (its metadata's "model_config"), or a nanochat checkpoint directory
    (model_NNNNNN.pt + meta_NNNNNN.json, the newest step; its "model_config" becomes the run config's "model")."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            config = (f.metadata() or {}).get("model_config")
        if config is None:
            raise ValueError(f"--init-from {path}: no model_config in its metadata; export it with "
                             f"tools/export_checkpoint.py --format safetensors")
        return load_weights(path), {"model": json.loads(config)}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--init-from {path}: not a directory or a .safetensors file; give a megachat run "
                                f"directory (config.json, model/), an exported .safetensors file or a nanochat "
                                f"checkpoint directory (model_NNNNNN.pt, meta_NNNNNN.json)")
    if os.path.isfile(os.path.join(path, "config.json")):
        return load_weights(final_weights(path)), read_run_config(path)
    steps = sorted(int(m.group(1)) for f in os.listdir(path) if (m := re.match(r"^model_(\d+)\.pt$", f)))
    if not steps or not os.path.isfile(os.path.join(path, f"meta_{steps[-1]:06d}.json")):
        raise FileNotFoundError(f"--init-from {path}: no config.json (megachat run) and no model_NNNNNN.pt with its "
                                f"meta_NNNNNN.json (nanochat checkpoint)")
    with open(os.path.join(path, f"meta_{steps[-1]:06d}.json")) as f:
        meta = json.load(f)
    return load_weights(os.path.join(path, f"model_{steps[-1]:06d}.pt")), {"model": meta["model_config"]}


def load_parent(init_from: str, tokenizer_dir: str | None = None):
    """What a phase continues from: (full weights, the parent's run config, its tokenizer, the tokenizer's
    directory): load_init(init_from), with the tokenizer the parent recorded unless tokenizer_dir is given."""
    weights, parent = load_init(init_from)
    tokenizer_dir = tokenizer_dir or parent.get("tokenizer")
    if not tokenizer_dir:
        raise ValueError(f"{init_from} names no tokenizer: pass --tokenizer DIR")
    return weights, parent, Tokenizer.load(tokenizer_dir), os.path.abspath(tokenizer_dir)
