"""megachat.monitor: one record per step to RUN_DIR/metrics.jsonl and to TensorBoard (RUN_DIR/tensorboard/).

Only rank 0 writes (the metrics are already reduced over the grid). Each jsonl line is written whole and
flushed (the TensorBoard events too) every step, so a killed run keeps the records of its finished steps; a line
that cannot be written whole (a full disk) is cut off again and the run stops naming the file, the bytes needed
and free. On resume the file is cut back to the resumed step so the log stays one curve.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import time

import torch

from megachat.fileio import atomic_write, write_error

# Dense bf16 peak of one GPU, by device-name substring (MFU is reported only where the peak is known).
PEAK_FLOPS_BF16 = {"H100": 989e12, "H200": 989e12}


def peak_flops(dtype: str) -> float | None:
    """Peak FLOP/s of this process's device for `dtype`, or None when unknown (CPU, fp32, other GPUs)."""
    if dtype != "bf16" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS_BF16.items() if k in name), None)


def memory_gib() -> float:
    """Peak memory of this process: CUDA max allocated on GPU, max resident set size on CPU (GiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Monitor:
    def __init__(self, run_dir: str, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        self.writer = summary_writer(run_dir, purge_step=resume_step + 1 if resume_step is not None else None)

    def _truncate_after(self, step: int) -> None:
        """Keep the records of steps <= step (a resumed run rewrites what came after its checkpoint)."""
        with open(self.path) as f:
            keep = [line for line in f if _complete(line) and json.loads(line).get("step", 0) <= step]
        atomic_write(self.path, "".join(keep))

    def log(self, step: int, **metrics) -> None:
        """One jsonl line {"step": step, **metrics, "time": unix seconds} and one TensorBoard scalar per numeric
        metric."""
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics, "time": round(time.time(), 3)}) + "\n"
        end = self.file.tell()
        try:
            self.file.write(line)
            self.file.flush()
        except OSError as e:
            with contextlib.suppress(OSError):
                self.file.close()  # fails to flush the rest again, but closes: no torn line follows later
            os.truncate(self.path, end)
            self.file = open(self.path, "a")
            raise write_error(self.path, e, len(line.encode())) from e
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.writer.close()


def _complete(line: str) -> bool:
    """Whether a metrics.jsonl line is a whole record (not the torn end of a crash)."""
    try:
        return line.endswith("\n") and isinstance(json.loads(line), dict)
    except ValueError:
        return False


def summary_writer(run_dir: str, purge_step: int | None = None):
    """A TensorBoard SummaryWriter on RUN_DIR/tensorboard. torch.utils.tensorboard is imported here, not at the top:
    every rank of every launch imports this module and only the writing rank needs it."""
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge_step)


def write_scalars(run_dir: str, tag: str, rows) -> None:
    """An evaluation's (metric, value) rows as TensorBoard scalars `tag/metric` under RUN_DIR/tensorboard; rows
    whose value is text (task counts, missing tasks) stay in the evaluation's CSV and markdown only."""
    writer = summary_writer(run_dir)
    for key, value in rows:
        try:
            writer.add_scalar(f"{tag}/{key}", float(value))
        except ValueError:
            pass
    writer.close()
