"""megachat.export: a sharded state (megachat.sharded: a checkpoint's state/, a run's model/) streamed into a file
that other tools read, one full tensor at a time, never the whole model in memory:

- `to_safetensors(state, path)`: one safetensors file, the full fp32 weights under nanochat's names, with
  "model_config" (JSON) and "step" in its metadata; `checkpoint.load_init` (--init-from) and `load_weights`
  (--checkpoint) read it, and so does anything that reads safetensors.
- `to_nanochat(state, out_dir)`: nanochat's checkpoint layout, model_NNNNNN.pt (the torch.save of the state dict)
  and meta_NNNNNN.json ({"step", "model_config", ...}), which nanochat's checkpoint_manager builds its GPT from and
  `checkpoint.load_init` reads too.

torch.save pickles the whole dict with every tensor in memory; `save_torch_streaming` writes the same archive
(byte for byte the same pickle, the same records with their CRC-32s) record by record: the pickle first, whose
tensors refer to storages data/0, data/1, ... by key, then each storage as its tensor arrives.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import pickle
import sys

import torch
from tqdm import tqdm

from megachat.fileio import atomic_write_json, replace_durably, write_error
from megachat.sharded import SafetensorsWriter, ShardedState

_STORAGE_TYPES = {torch.float32: torch.FloatStorage, torch.bfloat16: torch.BFloat16Storage,
                  torch.float16: torch.HalfStorage}


class _Storage:
    """A storage written later: pickled as torch.save pickles one (a persistent id naming record data/KEY)."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """A contiguous tensor over a _Storage, pickled as torch.save pickles a tensor."""

    def __init__(self, storage: _Storage, shape):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        stride = torch.empty(self.shape, device="meta").stride()
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return "storage", _STORAGE_TYPES[obj.dtype], obj.key, "cpu", obj.numel
        return None


def save_torch_streaming(path: str, specs: dict, tensors) -> None:
    """torch.save({name: tensor}) to path for specs {name: (dtype, shape)}, the tensors arriving one at a time from
    the iterable `tensors` of (name, tensor) in specs' order; torch.load(weights_only=True) reads it back."""
    storages = {name: _Storage(str(i), dtype, torch.Size(shape).numel()) for i, (name, (dtype, shape)) in
                enumerate(specs.items())}
    pkl = io.BytesIO()
    _Pickler(pkl, protocol=2).dump({name: _Tensor(storages[name], shape) for name, (_, shape) in specs.items()})
    # torch's own zip writer (record alignment, CRC-32s, the version records); the record order of torch.save
    with torch.serialization._open_zipfile_writer(path) as archive:
        for name, data in (("data.pkl", pkl.getvalue()), (".format_version", "1"),
                           (".storage_alignment", str(torch.serialization._get_storage_alignment())),
                           ("byteorder", sys.byteorder)):
            archive.write_record(name, data, len(data))
        todo = iter(specs.items())
        for name, tensor in tensors:
            want, (dtype, shape) = next(todo, (None, (None, None)))
            if name != want or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{path}: got {name} {tensor.dtype} {tuple(tensor.shape)}, expected {want} next "
                                 f"({dtype} {shape})")
            t = tensor.detach().cpu().contiguous()
            if t.storage_offset() or t.untyped_storage().nbytes() != t.nbytes:
                t = t.clone()
            archive.write_record(f"data/{storages[name].key}", t.untyped_storage(), t.nbytes)
        if next(todo, None) is not None:
            raise ValueError(f"{path}: fewer tensors arrived than specs name")


def tensors(state: ShardedState, what: str):
    """(name, full fp32 weight) of every tensor, read one at a time, with a progress bar."""
    for name in tqdm(state.tensors, desc=what, unit="tensor", disable=None):
        yield name, state.full(name)


def _specs(state: ShardedState) -> dict:
    return {name: (torch.float32, tuple(t["shape"])) for name, t in state.tensors.items()}


@contextlib.contextmanager
def _written(tmp: str, path: str, state: ShardedState):
    """A failed write of `tmp` (a full disk, an I/O error) removes it and raises OSError naming `path`, the bytes
    needed (the fp32 weights) and free; whatever was at `path` stays."""
    try:
        yield
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        needed = sum(math.prod(t["shape"]) * 4 for t in state.tensors.values())
        raise write_error(path, e, needed) from e


def to_safetensors(state: ShardedState, path: str) -> None:
    """The full fp32 weights of `state` as one safetensors file at path (written beside it, then renamed)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with _written(tmp, path, state):
        writer = SafetensorsWriter(tmp, _specs(state), metadata={
            "format": "pt", "model_config": json.dumps(state.config), "step": str(state.step)})
        try:
            for name, tensor in tensors(state, os.path.basename(path)):
                writer.write(name, tensor)
            writer.close()
        except OSError:
            writer.abort()
            raise
        replace_durably(tmp, path)


def to_nanochat(state: ShardedState, out_dir: str) -> str:
    """nanochat's checkpoint of `state`'s weights in out_dir: model_NNNNNN.pt and meta_NNNNNN.json (NNNNNN the
    step); returns the .pt's path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"model_{state.step:06d}.pt")
    tmp = f"{path}.tmp-{os.getpid()}"
    with _written(tmp, path, state):
        save_torch_streaming(tmp, _specs(state), tensors(state, os.path.basename(path)))
        replace_durably(tmp, path)
    atomic_write_json(os.path.join(out_dir, f"meta_{state.step:06d}.json"),
                      {"step": state.step, "model_config": state.config,
                       "megachat": {"source": os.path.abspath(state.directory), "layout": state.layout}})
    return path
