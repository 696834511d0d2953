"""megachat.measure: what a live process holds, counted tensor by tensor: the measurements megachat.planner's
predictions are checked against (tests/test_planner.py, tests/test_zero_memory.py, scripts/bench_memory.py,
scripts/bench_activations.py).

- `saved_tensor_bytes(exclude)`: the bytes autograd saves for backward inside a block (activations).
- `model_state_census(engine, model)`: the bytes this rank holds now by kind (weights, grads, optimizer, DeepSpeed's
  buckets, ZeRO-3's gathered parameters, other), reading DeepSpeed's state through megachat.deepspeed_internals.
- `measure_model_states(trainer, batches)`: the most of each kind during one train step.
"""
from __future__ import annotations

import gc
import warnings
from contextlib import contextmanager

import torch

from megachat import deepspeed_internals as dsi
from megachat.optim import hybrid_optimizer


@contextmanager
def saved_tensor_bytes(exclude: set[int]):
    """Inside the block, record every tensor autograd saves for backward; yields a dict whose "bytes" is the sum
    of the unique storages saved (each counted once, whole), storages whose data_ptr is in `exclude` (parameters,
    buffers) left out."""
    seen: dict[int, int] = {}
    result = {"bytes": 0, "count": 0}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude and s.data_ptr() not in seen:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"], result["count"] = sum(seen.values()), len(seen)


def model_storages(model) -> set[int]:
    """data_ptrs of a model's parameter and buffer storages (what saved_tensor_bytes leaves out)."""
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if not t.is_meta}


def _live_tensors() -> list[torch.Tensor]:
    """Every tensor (not on the meta device) the garbage collector reaches now, after a collection."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta]


def live_storages() -> set[int]:
    """data_ptrs of every tensor storage the garbage collector reaches now (for model_state_census's `exclude`)."""
    return {t.untyped_storage().data_ptr() for t in _live_tensors()}


def model_state_census(engine, model, exclude: set[int] = frozenset()) -> dict[str, int]:
    """Bytes this rank holds now, counted tensor by tensor, each storage once (views share it), by what it is:
    weights (the parameters, or their ZeRO-3 partitions and persistent whole copies), grads (.grad and DeepSpeed's
    gradient partitions), optimizer (DeepSpeed's fp32 master partition where it is not the weights' own and
    HybridOptimizer's state), buffers (DeepSpeed's gradient buckets), gathered (ZeRO-3's whole copies of partitioned
    parameters, alive between their all-gather and their release) and other: every further tensor the garbage
    collector can reach (batches, activations kept from Python, anything held by mistake). The model's own buffers
    (the RoPE tables) and the storages in `exclude` (live_storages() before the trainer was built) are left out."""
    wrapper = engine.optimizer
    opt = hybrid_optimizer(wrapper)
    counted = {t.untyped_storage().data_ptr() for t in model.buffers() if not t.is_meta} | set(exclude)
    out = {"weights": 0, "grads": 0, "optimizer": 0, "buffers": 0, "gathered": 0, "other": 0}

    def add(kind, tensors):
        for t in tensors:
            if t is None or t.is_meta or t.numel() == 0:
                continue
            s = t.untyped_storage()
            if s.data_ptr() not in counted:
                counted.add(s.data_ptr())
                out[kind] += s.nbytes()

    params = [p for p in model.parameters() if not p.is_meta]
    add("weights", [dsi.zero3_partition(p) if dsi.zero3_partition(p) is not None else p for p in params])
    add("weights", [p.data for p in params if dsi.zero3_persistent(p)])
    add("gathered", [p.data for p in dsi.zero3_gathered(params)])
    add("buffers", dsi.bucket_tensors(wrapper))  # before grads: gradients may be views into a bucket
    add("grads", [p.grad for p in params])
    add("grads", dsi.gradient_tensors(wrapper))
    add("optimizer", dsi.master_tensors(wrapper))
    add("optimizer", [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)])
    found = _live_tensors()
    add("other", found)
    add("other", [t.grad for t in found if t.is_leaf and t.grad is not None])
    return out


def measure_model_states(trainer, batches, exclude: set[int] = frozenset()) -> dict[str, int]:
    """The most this rank holds of each model_state_census kind during one trainer.train_step(batches) (call it after
    a first step, so that the optimizer's state exists): counted at the end of every backward (pp = 1), inside
    backward once the first parameter's gradient has arrived (its last), just before the optimizer step and after
    the step; ZeRO-3's gathered parameters also after every module's forward and at every gradient's arrival."""
    engine, model, seen = trainer.ds_engine, trainer.model, []
    params = [p for p in model.parameters() if not p.is_meta]
    partitioned = dsi.zero3_gathered(params)
    gathered = [0]

    def census():
        seen.append(model_state_census(engine, model, exclude))

    def count_gathered(*_):
        gathered[0] = max(gathered[0], sum({p.data.untyped_storage().data_ptr(): p.data.untyped_storage().nbytes()
                                            for p in partitioned if p.data.numel()}.values()))

    wrapper = engine.optimizer
    step, backward = wrapper.step, engine.backward
    hooks = [params[0].register_post_accumulate_grad_hook(lambda p: census())]  # its gradient arrives last
    if partitioned:
        hooks += [m.register_forward_hook(count_gathered) for m in model.modules()]
        hooks += [p.register_post_accumulate_grad_hook(count_gathered) for p in params[1:]]
    wrapper.step = lambda *a, **k: (census(), step(*a, **k))[1]
    if trainer.cfg.pp == 1:
        engine.backward = lambda *a, **k: (backward(*a, **k), census())[0]
    try:
        trainer.train_step(batches)
        census()
    finally:
        wrapper.step, engine.backward = step, backward
        for h in hooks:
            h.remove()
    most = {k: max(c[k] for c in seen) for k in seen[0]}
    most["gathered"] = max(most["gathered"], gathered[0])
    return most
