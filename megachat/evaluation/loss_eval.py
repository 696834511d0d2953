"""Bits per byte: the tokenizer-independent validation loss.

    bpb = sum of nats over target tokens / (ln 2 * sum of the UTF-8 bytes of those target tokens)

Special tokens have 0 bytes (`Tokenizer.token_bytes`) and are left out of both sums, as are targets equal to
ignore_index (-1). The model side is one function, so any layout plugs in (model_eval.py):

    token_loss(x LongTensor [B, T], y LongTensor [B, T]) -> fp32 [B, T] per-token nats, or None

`None` marks a rank that holds no loss (a pipeline stage before the last, or a tp rank other than 0, whose
loss is a copy of tp rank 0's). The two sums are all-reduced over the whole world, so every rank returns the
same bpb and each (dp slice) counts once.

`val_dataset` gives the validation samples in one fixed order (VAL_SEED, not the run's --seed), so the val
bpb that base_train logs and the one base_eval reports score the same first samples, for every run.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megachat.data import GPTDataset

VAL_SEED = 0  # the validation sample order; independent of the training seed so runs compare on the same samples


def val_dataset(prefix, seq_len):
    """The validation samples of PREFIX.bin/.idx as a GPTDataset in the VAL_SEED order (collective when a
    process group exists, like every GPTDataset)."""
    return GPTDataset([prefix], None, seq_len=seq_len, seed=VAL_SEED)


def val_batches(dataset, eval_tokens, device_batch_size, grid):
    """This rank's share of the first eval_tokens tokens (at least one global batch, at most one pass over the
    data) of `dataset`, as (x, y) batches [device_batch_size, seq_len]: the same samples for any dp size
    (base_train and base_eval)."""
    global_batch = device_batch_size * grid.dp
    steps = eval_tokens // (dataset.seq_len * global_batch)
    steps = min(steps, sum(getattr(dataset, "samples_per_epoch", [steps * global_batch])) // global_batch)
    for step in range(max(1, steps)):
        yield dataset.get_batch(step, global_batch, grid.dp_rank, grid.dp)


def all_reduce_sum(t):
    """Sum a small CPU tensor over the whole world in place (via the GPU under NCCL); no-op without a world."""
    if dist.is_available() and dist.is_initialized():
        on_gpu = dist.get_backend() == "nccl"
        buf = t.to(torch.device("cuda", torch.cuda.current_device())) if on_gpu else t
        dist.all_reduce(buf)
        if on_gpu:
            t.copy_(buf.cpu())
    return t


def bpb_sums(losses, targets, token_bytes, ignore_index=-1):
    """(sum of nats, sum of bytes) as float64 scalars over the targets that have bytes.

    losses fp32 [...] per-token nats; targets int64 [...] same shape; token_bytes int [vocab]."""
    valid = targets != ignore_index
    nbytes = torch.where(valid, token_bytes.to(targets.device)[targets.clamp(min=0)], 0)
    counted = nbytes > 0
    nats = torch.where(counted, losses.double(), 0.0).sum()
    return nats, nbytes.sum().double()


def bpb_from_sums(nats, nbytes):
    if nbytes <= 0:
        raise ValueError("bpb over zero bytes: the evaluated batches hold no non-special target tokens")
    return float(nats) / (math.log(2) * float(nbytes))


@torch.no_grad()
def evaluate_bpb(token_loss, batches, token_bytes, ignore_index=-1):
    """bpb over `batches` (an iterable of (x, y) pairs, this rank's dp share); summed over the world."""
    sums = torch.zeros(2, dtype=torch.float64)
    for x, y in batches:
        losses = token_loss(x, y)
        if losses is None:
            continue
        nats, nbytes = bpb_sums(losses, y, token_bytes, ignore_index)
        sums += torch.stack([nats.cpu(), nbytes.cpu()])
    all_reduce_sum(sums)
    return bpb_from_sums(sums[0].item(), sums[1].item())
