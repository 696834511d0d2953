"""megachat.checkpoint: DeepSpeed checkpoints that are complete or invisible, kept to the last K, resumable exactly.

Layout: RUN_DIR/checkpoints/step_000123/ (DeepSpeed's files: model, optimizer / ZeRO shards, LR schedule, and
our client state) and RUN_DIR/checkpoints/latest (the tag of the newest complete checkpoint).

DeepSpeed's own `latest` is written by rank 0 right after its own files, before the closing barrier, with a
plain open('w'): other ranks may still be writing their ZeRO shards, and a kill mid-write leaves a torn
`latest`. So we save with save_latest=False, wait for every rank, fsync the tag's files, and only then
replace `latest` atomically (temp file + fsync + os.replace). A checkpoint that `latest` does not name is
never loaded, so an interrupted save leaves the previous checkpoint in charge. A resume first runs `verify`:
every file's records against their CRC-32, so damage after the save (a truncated copy, flipped bits) stops the
run with the file's name instead of loading garbage.

Client state (same on every rank, saved by DeepSpeed with the model states): step, consumed samples (the
data position: the data is indexed by global sample number), the layout, and the RNG states. The same facts
(minus RNG) go to step_NNNNNN/megachat.json, readable without DeepSpeed.

Another layout: DeepSpeed's files are per tp / pp / dp shard and cannot be loaded under a different grid, so
each checkpoint also holds the layout-free full state step_NNNNNN/full_state.pt: the unsharded weights under
nanochat's names and the unsharded optimizer state (megachat.optim.full_optimizer_state). (Not DeepSpeed's
"universal checkpoint", a different format; checkpoints written before the rename call it universal.pt.)
A resume under another --tp / --pp / dp / --zero builds the model from those weights (before DeepSpeed copies
them into its master weights) and loads the optimizer state into the new shards. In a bf16 run the weights
there are the bf16 model weights, not DeepSpeed's fp32 master copy, so such a resume continues from weights
rounded to bf16 (an fp32 run continues exactly).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from megachat.fileio import atomic_write, replace_durably

TAG_RE = re.compile(r"^step_(\d{6,})$")


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)




def save_weights(path: str, state_dict: dict) -> None:
    """The full, layout-free state dict (nanochat's names) as one file, atomically: `scripts/base_eval.py`
    and conversion tools read it under any grid."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state_dict, tmp)
    replace_durably(tmp, path)


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
    """Check checkpoint `tag` before loading it: every .pt file must be a complete torch.save archive whose
    records match their CRC-32 (torch.load itself reads flipped bits without a word). The ranks split the files
    between them and share what they find, so all stop together with one message naming the file and the
    previous checkpoint, instead of one rank failing inside DeepSpeed while the others wait in a collective."""
    tag_dir = os.path.join(ckpt_dir, tag)
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(tag_dir) for f in names if f.endswith(".pt"))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    damage = next(filter(None, map(archive_damage, files[rank::world])), None)
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


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_meta(ckpt_dir: str, tag: str) -> dict:
    """step_NNNNNN/megachat.json: step, consumed_samples, layout (tp, pp, dp, zero), config."""
    path = os.path.join(ckpt_dir, tag, "megachat.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {os.path.join(ckpt_dir, tag)} was not written by megachat's "
                                f"checkpoint.save; resume from a megachat checkpoint")
    with open(path) as f:
        return json.load(f)


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep: int = 3, full_state: dict | None = None) -> str:
    """Save a checkpoint of the state after `step` optimizer steps (collective); returns its tag. client_state
    must hold step, consumed_samples, layout and config; full_state (rank 0's, see the module docstring) is
    written when given. The checkpoint becomes visible through `latest` only once every rank's files are on disk; then
    all but the newest `keep` are removed."""
    tag = tag_for(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={**client_state, "rng": rng_state()},
                           save_latest=False)
    if dist.get_rank() == 0:
        if full_state is not None:
            tmp = os.path.join(ckpt_dir, tag, "full_state.pt.tmp")
            torch.save(full_state, tmp)
            replace_durably(tmp, os.path.join(ckpt_dir, tag, "full_state.pt"))
        atomic_write(os.path.join(ckpt_dir, tag, "megachat.json"), json.dumps(
            {k: client_state[k] for k in ("step", "consumed_samples", "layout", "config")}, indent=2))
    dist.barrier()  # every rank has written and closed its files
    if dist.get_rank() == 0:
        _fsync_tree(os.path.join(ckpt_dir, tag))
        atomic_write(os.path.join(ckpt_dir, "latest"), tag)
        tags = sorted(t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(ckpt_dir, t)))
        for old in tags[:-keep] if keep > 0 else []:
            if old != tag:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()
    return tag


def load_full_state(ckpt_dir: str, tag: str) -> dict:
    """step_NNNNNN/full_state.pt: {"model": nanochat-named full weights, "optimizer": full optimizer state}."""
    path = os.path.join(ckpt_dir, tag, "full_state.pt")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(ckpt_dir, tag, "universal.pt")):
        path = os.path.join(ckpt_dir, tag, "universal.pt")  # its name before the rename
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing, so {os.path.join(ckpt_dir, tag)} can only be resumed with the "
                                f"layout it was saved with; resume with the same --tp/--pp/--zero and number of "
                                f"processes")
    return torch.load(path, map_location="cpu", weights_only=True)


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Load checkpoint `tag` (saved under this layout: the trainer checks) into the DeepSpeed engine (model,
    optimizer, LR schedule) and restore the RNG; returns the client state."""
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag)}")
    set_rng_state(client["rng"])
    return client


def read_run_config(run_dir: str) -> dict:
    """RUN_DIR/config.json as the training script wrote it ("model", "train", "tokenizer", data paths)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --run must be the --out directory of a training run")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): restore it from the run's checkpoints/*/megachat.json "
                         f"or retrain") from None


def load_weights(path: str) -> dict:
    """Full weights under nanochat's names from `path`: a torch.save of a state dict, of {"state_dict": ...}, or a
    checkpoint's full_state.pt ({"model": ...}); checked against the CRC-32s first (torch.load would read flipped
    bits as weights without a word)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights at {path}: pass --checkpoint FILE (a full state dict under nanochat's "
                                f"names) or write RUN_DIR/model.pt at the end of training")
    damage = archive_damage(path)
    if damage:
        raise RuntimeError(f"{damage}; the weights are damaged: point --checkpoint at another copy (an earlier "
                           f"RUN_DIR/checkpoints/step_*/full_state.pt holds the weights of that step)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def load_run(run_dir: str, grid, device, dtype=torch.float32, weights_path: str | None = None,
             tokenizer_dir: str | None = None):
    """(model, tokenizer, run config) of a finished run on this rank of `grid`: RUN_DIR/config.json's model with
    RUN_DIR/model.pt's weights (or weights_path's), in eval mode; the tokenizer the run recorded (or
    tokenizer_dir)."""
    from megachat.model import GPTConfig, build_model
    from megachat.tokenizer import Tokenizer
    run_cfg = read_run_config(run_dir)
    tokenizer = Tokenizer.load(tokenizer_dir or run_cfg["tokenizer"])
    weights = load_weights(weights_path or os.path.join(run_dir, "model.pt"))
    model = build_model(GPTConfig(**run_cfg["model"]), grid, device, weights=weights, dtype=dtype).eval()
    return model, tokenizer, run_cfg
