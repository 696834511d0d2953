"""megachat.sharded: the layout-free training state, written by every rank at once and read back by slices under any
tp / pp / dp / ZeRO layout.

A sharded state is a directory (a checkpoint's step_NNNNNN/state/, a run's final weights RUN_DIR/model/):
- rank-RRRRR.safetensors, one per rank: 2-D tensors, each a rectangle of one full (unsharded, unpadded) tensor
  under nanochat's name: the weight from DeepSpeed's fp32 master copy where it keeps one (ZeRO >= 1, so a bf16
  run reshards exactly) or else the fp32 parameter, and with the optimizer its state (Muon "momentum_buffer";
  AdamW "exp_avg", "exp_avg_sq");
- index.json, written by rank 0 last and atomically, once every rank's file is fsynced: per tensor its shape and,
  per state, the rectangles [file, key, row, col, rows, cols] that tile it; per file its size and CRC-32
  (computed while writing: safetensors has no checksum); the step, the model config and the layout.

Who writes what: each rank the elements it holds (megachat.optim.held_state), straight from the memory they are in,
so nothing moves between ranks, no rank holds more than in training and the bytes follow DeepSpeed's partitions.
What several ranks hold alike (dp replicas at ZeRO-0, a weight tp does not split) is split among them
(zero_partitions.written_share). A run of a flat ZeRO partition is a stretch of a tp shard: it is stored as up to
three rectangles of the full tensor (`regions`: a partial row, whole rows, a partial row; a column-split shard's
rows are row segments of the full tensor; vocab padding rows are left out). Rank 0 gathers only this metadata.

Reading (`ShardedState`): a rank asks for the rectangles it needs (`load_model`: its tp shards, before DeepSpeed
starts; `load_optimizer`: its pieces of the master weights and the optimizer state, after) and opens only the
files that overlap them, one tensor at a time, with safetensors' safe_open / get_slice: the file is memory-mapped,
only the overlapping bytes are touched, and the mapping is closed after each tensor, so a loading rank holds its
state plus at most one tensor's worth of mapped pages.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import zlib
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import safe_open

from megachat.fileio import atomic_write_json, write_error
from megachat.model import nanochat_shapes
from megachat.optim import held_state
from megachat.zero_partitions import partition_dim

FORMAT = "megachat-sharded/1"
INDEX = "index.json"
DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}  # safetensors' names
_CHUNK_BYTES = 64 << 20  # what is copied from the device and written at a time


@dataclass(frozen=True)
class Region:
    """Rows [row, row + rows) x columns [col, col + cols) of a full 2-D tensor; they are elements
    [offset, offset + rows * cols) of a 1-D run, row-major."""
    row: int
    col: int
    rows: int
    cols: int
    offset: int = 0

    def of(self, run: torch.Tensor) -> torch.Tensor:
        """The region's elements of `run` (1-D) as a [rows, cols] view."""
        return run[self.offset:self.offset + self.rows * self.cols].view(self.rows, self.cols)


def regions(shard_shape, partition_dim: int | None, tp_rank: int, full_shape, start: int, length: int) -> list[Region]:
    """Elements [start, start + length) of a flattened tp shard (shape shard_shape, tp rank tp_rank, split from the
    full tensor along partition_dim, None when whole) as at most three rectangles of the full tensor of shape
    full_shape; rows past it (the vocab padding of the last tp shard) are left out. Offsets count from `start`."""
    rows_in, cols_in = shard_shape
    row0 = tp_rank * rows_in if partition_dim == 0 else 0
    col0 = tp_rank * cols_in if partition_dim == 1 else 0
    out, pos, end = [], start, start + length
    while pos < end:
        r, c = divmod(pos, cols_in)
        if c or end - pos < cols_in:  # a part of one row
            n_rows, n_cols = 1, min(cols_in - c, end - pos)
        else:  # whole rows
            n_rows, n_cols = (end - pos) // cols_in, cols_in
        kept = min(n_rows, full_shape[0] - (row0 + r))
        if kept > 0:
            out.append(Region(row0 + r, col0 + c, kept, n_cols, pos - start))
        pos += n_rows * n_cols
    return out


class SafetensorsWriter:
    """One safetensors file written tensor by tensor in the order of `specs` ({key: (dtype, shape)}), the header
    first, with the CRC-32 of every byte computed on the way; close() fsyncs it and returns (crc32, bytes)."""

    def __init__(self, path: str, specs: dict, metadata: dict[str, str] | None = None):
        header, offset = ({"__metadata__": metadata} if metadata else {}), 0
        for key, (dtype, shape) in specs.items():
            n = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path, self.specs, self._todo = path, specs, iter(specs)
        self.crc, self.nbytes = 0, 0
        self._file = open(path, "wb")
        try:
            self._put(len(raw).to_bytes(8, "little") + raw)
        except OSError:
            self.abort()
            raise

    def _put(self, data) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self._file.write(data)
        self.nbytes += len(data)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """The next tensor of specs (any device; copied to the host 64 MB at a time)."""
        want = next(self._todo, None)
        dtype, shape = self.specs.get(key, (None, None))
        if key != want or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: got {key} {tensor.dtype} {tuple(tensor.shape)}, the header announced "
                             f"{want} next ({dtype} {shape})")
        flat = tensor.detach().reshape(-1)
        step = max(1, _CHUNK_BYTES // flat.element_size())
        for i in range(0, flat.numel(), step):
            self._put(memoryview(flat[i:i + step].cpu().contiguous().view(torch.uint8).numpy()))

    def abort(self) -> None:
        """Close and remove the unfinished file (a write failed); never raises, so that a rank whose write failed
        still reaches the collective that tells the others (closing flushes what is buffered, which fails again
        on a full disk)."""
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            os.remove(self.path)

    def close(self) -> tuple[int, int]:
        missing = next(self._todo, None)
        if missing is not None:
            self._file.close()
            raise ValueError(f"{self.path}: closed before {missing} and the tensors after it were written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self.crc, self.nbytes


def file_damage(path: str, nbytes: int, crc32: int) -> str | None:
    """What is wrong with the file at path against the size and CRC-32 its index records, or None; reads it once."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return f"{path}: missing"
    if size != nbytes:
        return f"{path}: {size} bytes, the index records {nbytes} (truncated or overwritten)"
    crc, buf = 0, bytearray(16 << 20)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(memoryview(buf)[:n], crc)
    return None if crc == crc32 else f"{path}: its bytes fail the CRC-32 the index records"


def _start(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, INDEX)):
        os.remove(os.path.join(directory, INDEX))  # a state half rewritten must not pass for a whole one


def stage(engine, shapes: dict, *, optimizer: bool, copy: bool = False) -> dict:
    """This rank's pieces of the training state under DeepSpeed `engine`: {key in the file: (name, state, region,
    [rows, cols] tensor)}, views of the memory they are in, or with copy=True a copy in host memory (pinned on
    CUDA) that training may run on beside (an asynchronous save)."""
    pieces = {}
    for run in held_state(engine, once=True):
        length = run.tensors["weight"].numel()
        for region in regions(run.shard_shape, run.partition_dim, run.tp_rank, shapes[run.name], run.start, length):
            for state, flat in run.tensors.items():
                if optimizer or state == "weight":
                    view = region.of(flat)
                    if copy:
                        host = torch.empty(view.shape, dtype=view.dtype, pin_memory=view.is_cuda)
                        view = host.copy_(view)
                    pieces[f"{run.name}:{state}@{region.row},{region.col}"] = (run.name, state, region, view)
    return pieces


def save(directory: str, engine, model_config, step: int, layout: dict, *, optimizer: bool,
         shapes: dict | None = None, staged: dict | None = None, group=None) -> None:
    """Write this rank's slices of the training state under DeepSpeed `engine` into `directory` (collective over
    `group`, default the world; see the module docstring). optimizer=False writes the weights only (a run's final
    weights). shapes: {name: full shape} of a model other than nanochat's GPT of `model_config` (tests' stand-ins;
    model_config None). staged: `stage`'s copy to write instead of the live state (an asynchronous save, run in a
    thread on a group of its own). On return every rank's file is fsynced and index.json names them. A directory
    that already holds a complete state (a run's model/ written again) is replaced only once the new one is
    complete: the new state is written beside it (DIRECTORY.new) and swapped in. A write that fails on any rank (a
    full disk, an I/O error) raises OSError on every rank, naming the path, the bytes needed and free; the
    unfinished files are removed and a complete state that was there stays."""
    rank, world = dist.get_rank(), dist.get_world_size()
    target = [directory]
    if rank == 0:
        if os.path.exists(os.path.join(directory, INDEX)):
            target[0] = directory + ".new"
            shutil.rmtree(target[0], ignore_errors=True)  # the remains of an earlier failed save
        try:
            os.makedirs(target[0], exist_ok=True)
        except OSError as e:
            target[0] = OSError(e.errno, f"cannot create {target[0]}: {e.strerror}")
    dist.broadcast_object_list(target, src=0, group=group)
    if isinstance(target[0], OSError):
        raise target[0]
    target = target[0]
    shapes = nanochat_shapes(model_config) if shapes is None else shapes
    pieces = stage(engine, shapes, optimizer=optimizer) if staged is None else staged
    file = f"rank-{rank:05d}.safetensors"
    path, writer, error, crc, nbytes = os.path.join(target, file), None, None, 0, 0
    specs = {key: (view.dtype, tuple(view.shape)) for key, (*_, view) in pieces.items()}
    try:
        writer = SafetensorsWriter(path, specs, metadata={"format": FORMAT, "rank": str(rank)})
        for key, (*_, view) in pieces.items():
            writer.write(key, view)
        crc, nbytes = writer.close()
    except OSError as e:  # SafetensorsWriter removes its unfinished file itself
        if writer is not None:
            writer.abort()
        needed = sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs.values())
        error = str(write_error(path, e, needed))
    mine = {"file": file, "crc32": crc, "bytes": nbytes, "error": error,
            "regions": [(name, state, key, r.row, r.col, r.rows, r.cols)
                        for key, (name, state, r, _) in pieces.items()]}
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0, group=group)
    problem = [None]
    if rank == 0:
        problem[0] = next((p["error"] for p in gathered if p["error"]), None)
        if problem[0] is None:
            try:
                problem[0] = _write_index(target, gathered, shapes, {
                    "format": FORMAT, "step": step, "optimizer": optimizer, "config": vars(model_config) if model_config is not None else {},
                    "layout": layout})
            except OSError as e:
                problem[0] = str(e)
        if problem[0] is None and target != directory:  # the new state is complete: swap it in
            old = directory + ".old"
            try:
                os.rename(directory, old)
                try:
                    os.rename(target, directory)
                except OSError:
                    os.rename(old, directory)
                    raise
            except OSError as e:
                problem[0] = f"cannot move {target} to {directory} ({e.strerror}); the new state is complete in {target}"
            else:
                shutil.rmtree(old, ignore_errors=True)
        elif problem[0] is not None and target != directory:
            shutil.rmtree(target, ignore_errors=True)
    dist.broadcast_object_list(problem, src=0, group=group)  # every rank returns, or every rank raises
    if problem[0]:
        raise OSError(f"sharded save into {directory}: {problem[0]}")


def save_full(directory: str, weights: dict[str, torch.Tensor], model_config, step: int = 0) -> None:
    """Full weights {nanochat name: tensor} of a model of `model_config` written by this one process as a sharded
    state of weights only (one file): a run's model/ made outside training (importers, tests)."""
    shapes = nanochat_shapes(model_config)
    if set(weights) != set(shapes):
        raise ValueError(f"weights for {directory} lack {sorted(set(shapes) - set(weights))[:3]} or have extra "
                         f"{sorted(set(weights) - set(shapes))[:3]}: give every tensor of the model, nothing else")
    _start(directory)
    file = "rank-00000.safetensors"
    keys = {name: f"{name}:weight@0,0" for name in shapes}
    writer = SafetensorsWriter(os.path.join(directory, file),
                               {keys[n]: (torch.float32, tuple(shape)) for n, shape in shapes.items()},
                               metadata={"format": FORMAT, "rank": "0"})
    for name in shapes:
        writer.write(keys[name], weights[name].float())
    crc, nbytes = writer.close()
    part = {"file": file, "crc32": crc, "bytes": nbytes,
            "regions": [(n, "weight", keys[n], 0, 0, *shape) for n, shape in shapes.items()]}
    problem = _write_index(directory, [part], shapes, {
        "format": FORMAT, "step": step, "optimizer": False, "config": vars(model_config),
        "layout": {"tp": 1, "pp": 1, "dp": 1, "zero": 0}})
    if problem:
        raise ValueError(f"sharded save into {directory}: {problem}")


def _write_index(directory: str, per_rank: list[dict], shapes: dict, head: dict) -> str | None:
    """Write index.json from every rank's list of rectangles, unless they do not tile every tensor exactly once
    (a bug): then say what is wrong."""
    tensors = {name: {"shape": list(shape), "states": defaultdict(list)} for name, shape in shapes.items()}
    for part in per_rank:
        for name, state, key, *rect in part["regions"]:
            tensors[name]["states"][state].append([part["file"], key, *rect])
    for name, entry in tensors.items():
        rows, cols = entry["shape"]
        if "weight" not in entry["states"]:
            return f"no rank wrote {name}"
        for state, rects in entry["states"].items():
            if sum(r[4] * r[5] for r in rects) != rows * cols:
                written = sum(r[4] * r[5] for r in rects)
                return f"the ranks wrote {written} elements of {name} ({state}), which has {rows * cols}"
    index = {**head, "files": {p["file"]: {"bytes": p["bytes"], "crc32": p["crc32"]} for p in per_rank},
             "tensors": tensors}
    atomic_write_json(os.path.join(directory, INDEX), index, indent=None)
    for f in os.listdir(directory):  # files of an earlier save by more ranks
        if f.endswith(".safetensors") and f not in index["files"]:
            os.remove(os.path.join(directory, f))
    return None


class ShardedState:
    """A sharded state directory, read by slices. `read` fills rectangles of any tensor; `load_model` and
    `load_optimizer` fill this rank's part of a model / DeepSpeed engine under any layout; `weights` assembles the
    full weights (the whole model in memory: for evaluation and single-process tools)."""

    def __init__(self, directory: str):
        path = os.path.join(directory, INDEX)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {directory} is not a complete sharded state (its save was "
                                    f"interrupted, or it is something else); use another checkpoint or weights")
        try:
            with open(path) as f:
                index = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}): the index is damaged; use another checkpoint") from None
        if index.get("format") != FORMAT:
            raise ValueError(f"{path} is of format {index.get('format')!r}, this megachat reads {FORMAT!r}")
        self.directory, self.index = directory, index
        self.step, self.config, self.layout = index["step"], index["config"], index["layout"]
        self.tensors = index["tensors"]

    def files(self) -> list[tuple[str, int, int]]:
        """(path, bytes, crc32) of every file, in the index's order."""
        return [(os.path.join(self.directory, f), v["bytes"], v["crc32"]) for f, v in self.index["files"].items()]

    def damage(self) -> str | None:
        """The first file whose bytes do not match the index, or None; reads every file once."""
        return next(filter(None, (file_damage(*f) for f in self.files())), None)

    def check_model(self, config) -> None:
        """Raise ValueError unless this state holds the tensors of a model of `config` (a GPTConfig)."""
        if {n: list(s) for n, s in nanochat_shapes(config).items()} != {n: t["shape"] for n, t in self.tensors.items()}:
            raise ValueError(f"{self.directory} holds a model {self.config}, not {vars(config)}: load it into the "
                             f"model it was saved from")

    def read(self, name: str, state: str, targets: list[tuple[Region, torch.Tensor]]) -> None:
        """Fill each target tensor [rows, cols] (any device and dtype) with the elements `region` of the full tensor
        `name`'s `state`, opening each file that overlaps them once."""
        entry = self.tensors.get(name)
        if entry is None:
            raise ValueError(f"{self.directory} has no tensor {name}: it was saved from another model")
        if state not in entry["states"]:
            raise ValueError(f"{self.directory} holds no {state} of {name}" + (
                "" if self.index["optimizer"] else ": it holds weights only (final weights, not a checkpoint)"))
        by_file = defaultdict(list)
        for want, out in targets:
            covered = 0
            for file, key, row, col, rows, cols in entry["states"][state]:
                r0, r1 = max(row, want.row), min(row + rows, want.row + want.rows)
                c0, c1 = max(col, want.col), min(col + cols, want.col + want.cols)
                if r0 < r1 and c0 < c1:
                    by_file[file].append((key, (slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)),
                                          out[r0 - want.row:r1 - want.row, c0 - want.col:c1 - want.col]))
                    covered += (r1 - r0) * (c1 - c0)
            if covered != want.rows * want.cols:
                raise ValueError(f"{self.directory} lacks elements of {name} ({state}) in rows {want.row}.."
                                 f"{want.row + want.rows - 1}: its index is incomplete; use another checkpoint")
        for file, reads in by_file.items():
            with safe_open(os.path.join(self.directory, file), framework="pt") as f:
                for key, src, dst in reads:
                    dst.copy_(f.get_slice(key)[src])

    def full(self, name: str, state: str = "weight") -> torch.Tensor:
        """The full tensor `name`'s `state`, fp32 on the CPU."""
        rows, cols = self.tensors[name]["shape"]
        out = torch.empty(rows, cols)
        self.read(name, state, [(Region(0, 0, rows, cols), out)])
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        """{nanochat name: full fp32 weight}: the whole model in memory."""
        return {name: self.full(name) for name in self.tensors}

    @torch.no_grad()
    def load_model(self, model) -> None:
        """This rank's tp shards of every materialized parameter of `model` (a megachat GPT, before DeepSpeed casts
        or partitions it); vocab padding rows are left as they are."""
        if getattr(model, "config", None) is not None:  # a megachat GPT (tests' stand-ins have none)
            self.check_model(model.config)
        grid = model.grid
        for name, p in model.named_parameters():
            if not p.is_meta:
                if name not in self.tensors:
                    raise ValueError(f"{self.directory} has no tensor {name}: it was saved from another model")
                flat = p.detach().view(-1)
                mine = regions(tuple(p.shape), partition_dim(p, grid.tp), grid.tp_rank, self.tensors[name]["shape"],
                               0, p.numel())
                self.read(name, "weight", [(r, r.of(flat)) for r in mine])

    @torch.no_grad()
    def load_optimizer(self, engine) -> None:
        """This rank's pieces of the master weights and of the optimizer state into DeepSpeed `engine` (after
        deepspeed.initialize, before the next step); the step is the trainer's (self.step)."""
        runs = held_state(engine, once=False)
        targets = defaultdict(list)
        for run in runs:
            length = run.tensors["weight"].numel()
            if run.name not in self.tensors:
                raise ValueError(f"{self.directory} has no tensor {run.name}: it was saved from another model")
            for r in regions(run.shard_shape, run.partition_dim, run.tp_rank, self.tensors[run.name]["shape"],
                             run.start, length):
                for state, flat in run.tensors.items():
                    targets[(run.name, state)].append((r, r.of(flat)))
        for (name, state), wanted in targets.items():
            self.read(name, state, wanted)
