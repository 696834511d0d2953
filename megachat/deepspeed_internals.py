"""megachat.deepspeed_internals: everything megachat reads or changes inside DeepSpeed beyond its public API.

DeepSpeed's public API (deepspeed.initialize, init_distributed, the engine's forward / backward / step /
train_batch, deepspeed.pipe.PipelineModule, deepspeed.zero.GatheredParameters) is used where it is needed; what
is not public lives here, each with the DeepSpeed version it was written against and why megachat needs it. No
other module under megachat/, scripts/ or tools/ imports deepspeed.runtime or names one of PRIVATE_NAMES
(tests/test_deepspeed_internals.py checks both, and that each internal still exists in the installed DeepSpeed;
setup.py pins deepspeed to the range these were tested on).

- ZeRO-3's parameter attributes and partitions: which elements of a weight a rank holds.
- The ZeRO / bf16 optimizer wrappers' flat fp32 master partitions and gradient buffers, and where the reduced
  gradients wait between the last backward and the step (`reduced_gradients`: the trainer clips there).
- The flat-buffer layout of ZeRO-1/2 and BF16_Optimizer (weights are views into one flat buffer; dp rank d holds
  [d*P, (d+1)*P)), read by `partition_layout`.
- The CPU backend's shared-memory all-reduce, switched off (`without_shm_allreduce`).
- A FutureWarning of torch about the collective DeepSpeed's ZeRO-1/2 gathers with, hidden
  (`quiet_deprecated_all_gather`).
- The pipeline's balanced partitioning, topology and instruction table (its train_batch without the optimizer
  step, so that the trainer clips between the two).
deepspeed itself is imported on first use: it takes seconds, which modules that never train should not pay.
"""
from __future__ import annotations

import importlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

TESTED_VERSIONS = ">=0.19.8,<0.20"  # setup.py's pin: the range every internal below was checked on

# (where, name): every private name megachat touches, for tests/test_deepspeed_internals.py. `where` is the module
# (and class) whose source must still set or define `name`.
INTERNALS = [
    ("deepspeed.runtime.zero.partition_parameters", "ds_tensor"),
    ("deepspeed.runtime.zero.partition_parameters", "ds_shape"),
    ("deepspeed.runtime.zero.partition_parameters", "ds_persist"),
    ("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3", "fp32_partitioned_groups_flat"),
    ("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3", "fp16_partitioned_groups_flat"),
    ("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3", "grad_partitions_flat_buffer"),
    ("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3", "ipg_buckets"),
    ("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "single_partition_of_fp32_groups"),
    ("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "parallel_partitioned_bit16_groups"),
    ("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "real_dp_process_group"),
    ("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "_link_all_hp_params"),
    ("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "averaged_gradients"),
    ("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "all_grad_tensors"),
    ("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "grads_in_partition"),
    ("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "ipg_buckets"),
    ("deepspeed.runtime.bf16_optimizer:BF16_Optimizer", "fp32_groups_flat_partition"),
    ("deepspeed.runtime.bf16_optimizer:BF16_Optimizer", "fp32_groups_gradients_flat"),
    ("deepspeed.runtime.bf16_optimizer:BF16_Optimizer", "fp32_groups_gradient_flat_partition"),
    ("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3", "averaged_gradients"),
    ("deepspeed.runtime.zero.stage_1_and_2:GradPartitionBufferGroup", "flat_partition"),
    ("deepspeed.runtime.pipe.engine:PipelineEngine", "_exec_optimizer_step"),
    ("deepspeed.runtime.fp16.unfused_optimizer:FP16_UnfusedOptimizer", "fp32_groups"),
    ("deepspeed.runtime.fp16.unfused_optimizer:FP16_UnfusedOptimizer", "fp16_groups"),
    ("deepspeed.runtime.engine:DeepSpeedEngine", "enable_backward_allreduce"),
    ("deepspeed.comm.torch", "build_shm_op"),
    ("deepspeed.runtime.utils", "partition_balanced"),
    ("deepspeed.runtime.pipe.topology", "PipeModelDataParallelTopology"),
    ("deepspeed.runtime.pipe.engine:PipelineEngine", "_INSTRUCTION_MAP"),
    ("deepspeed.runtime.pipe.schedule", "ForwardPass"),
]
# what no other module may name: DeepSpeed's private attributes (as .attribute or a getattr / hasattr string) and
# the modules they live in (imports)
PRIVATE_NAMES = ("ds_tensor", "ds_shape", "ds_persist", "ds_id", "ds_numel", "fp32_partitioned_groups_flat",
                 "fp16_partitioned_groups_flat", "grad_partitions_flat_buffer", "ipg_buckets",
                 "single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups", "real_dp_process_group",
                 "_link_all_hp_params", "averaged_gradients", "all_grad_tensors", "grads_in_partition",
                 "fp32_groups_flat_partition", "fp32_groups_gradients_flat", "fp32_groups_gradient_flat_partition",
                 "fp32_groups", "fp16_groups", "flat_partition", "enable_backward_allreduce", "build_shm_op",
                 "_INSTRUCTION_MAP", "_exec_optimizer_step")
PRIVATE_MODULES = ("deepspeed.runtime", "deepspeed.comm.torch")


# ---- ZeRO-3 parameters (0.19.8 runtime/zero/partition_parameters.py sets these on every parameter it converts).
# A ZeRO-3 parameter's .data is empty outside forward / backward; its partition ds_tensor holds elements
# [d*ps, (d+1)*ps) of the flattened weight on dp rank d, ps = ceil(numel / dp); ds_shape is the weight's shape.

def zero3_partition(p: torch.Tensor) -> torch.Tensor | None:
    """This rank's ZeRO-3 partition of p (1-D), or None when ZeRO-3 does not partition p."""
    return getattr(p, "ds_tensor", None)


def weight_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape of the weight p stands for (ZeRO-3 empties p.data outside forward / backward)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def zero3_persistent(p: torch.Tensor) -> bool:
    """Whether ZeRO-3 keeps p whole on every rank (stage3_param_persistence_threshold: small weights)."""
    return bool(getattr(p, "ds_persist", False))


def zero3_gathered(params) -> list[torch.Tensor]:
    """The parameters whose .data ZeRO-3 gathers around their forward and backward (partitioned, not persistent)."""
    return [p for p in params if zero3_partition(p) is not None and not zero3_persistent(p)]


# ---- the layout DeepSpeed hands a client optimizer (0.19.8: stage_1_and_2.py, bf16_optimizer.py, stage3.py)

@dataclass
class PartitionLayout:
    """What DeepSpeed handed the optimizer for `params` (this rank's tp shards): `kind` "replicated" (the
    parameters themselves, or same-shaped fp32 copies), "flat" (one flat fp32 partition of P elements: ZeRO-1/2 and
    BF16_Optimizer, whose weights are views into one flat buffer of dp * P elements, dp rank d holding
    [d*P, (d+1)*P)) or "zero3" (the concatenation of every weight's own ZeRO-3 partition, in parameter order).
    held(i, d): [(start in parameter i, length, offset in dp rank d's tensor)] of what dp rank d holds of it."""
    kind: str
    shard_shapes: list[tuple[int, ...]]
    held: Callable[[int, int], list[tuple[int, int, int]]]


def partition_layout(names: list[str], params: list[torch.Tensor], local: list[torch.Tensor],
                     dp: int) -> PartitionLayout:
    """Read the layout of `local` (the tensors DeepSpeed handed the optimizer) against `params` (named `names`):
    raises when it is none of the three megachat knows."""
    zero3 = any(zero3_partition(p) is not None for p in params)
    # DeepSpeed may swap the parameter objects (bf16 conversion) but keeps their order
    replicated = not zero3 and len(local) == len(params) and all(a.shape == b.shape for a, b in zip(local, params))
    if not replicated and (len(local) != 1 or local[0].dim() != 1):
        raise RuntimeError(f"HybridOptimizer: DeepSpeed handed the optimizer {len(local)} tensors of "
                           f"shapes {[tuple(t.shape) for t in local][:4]}; expected the model's "
                           f"parameters or one flat partition (ZeRO-0/1/2/3, BF16_Optimizer)")
    shard_shapes = [weight_shape(p) for p in params]
    numels = [math.prod(shape) for shape in shard_shapes]
    partition_numel = local[0].numel()
    if replicated:
        return PartitionLayout("replicated", shard_shapes, lambda i, d: [(0, numels[i], 0)])
    if zero3:
        # the ds_tensors' storage offsets are not final while DeepSpeed is still setting up: count
        sizes = [zero3_partition(p).numel() for p in params]
        if sum(sizes) != partition_numel:
            raise ValueError(f"Muon + ZeRO-3: DeepSpeed split the parameters into several sub groups (flat "
                             f"partition of {partition_numel} elements, parameters hold {sum(sizes)}); Muon needs "
                             f"them in one step: raise zero_optimization.sub_group_size above the model's size "
                             f"(megachat.build.ds_config does so for its runs)")
        offsets = [sum(sizes[:i]) for i in range(len(params))]

        def held3(i, d):
            lo, hi = d * sizes[i], min(numels[i], (d + 1) * sizes[i])
            return [(lo, hi - lo, offsets[i])] if hi > lo else []
        return PartitionLayout("zero3", shard_shapes, held3)
    storage = params[0].untyped_storage()
    for n, p in zip(names, params):
        if (p.untyped_storage().data_ptr() != storage.data_ptr()
                or storage.nbytes() != dp * partition_numel * p.element_size()):
            raise RuntimeError(f"HybridOptimizer: parameter {n!r} is not a view into one flat buffer of "
                               f"dp*partition = {dp}*{partition_numel} elements; this DeepSpeed layout is "
                               f"not supported")

    def held_flat(i, d):
        offset = params[i].storage_offset()
        lo, hi = max(offset, d * partition_numel), min(offset + numels[i], (d + 1) * partition_numel)
        return [(lo - offset, hi - lo, lo - d * partition_numel)] if hi > lo else []
    return PartitionLayout("flat", shard_shapes, held_flat)


def zero3_master_flats(wrapper) -> list[torch.Tensor]:
    """ZeRO-3's fp32 master partitions, one flat per sub group: what it hands the client optimizer at step(), and
    empties the optimizer's param group of between steps (0.19.8 stage3.py)."""
    return list(getattr(wrapper, "fp32_partitioned_groups_flat", []))


def share_fp32_master(wrapper) -> None:
    """fp32 training at ZeRO >= 1: make DeepSpeed's fp32 master partition the weights' own partition instead of a
    copy. DeepSpeed copies the master into the weights after every step, so the two are always equal and the copy
    costs 4 bytes per held element (a third of ZeRO-3's model states). 0.19.8's ZeRO-3 means to share it
    (stage3.py's _create_fp32_partitions, "we don't need another copy of the weights") but compares a
    torch.device with the device's name, which is never equal, so it copies; ZeRO-1/2 always copy. The master
    tensor objects stay (the optimizer's param group and state are keyed by them); only their storage becomes
    the weights'; ZeRO-1/2's per-parameter views of the master (safe_get_full_fp32_param) are relinked by its
    private _link_all_hp_params."""
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):  # ZeRO-3: the flat of each sub group's partitions
        pairs = list(zip(wrapper.fp32_partitioned_groups_flat, wrapper.fp16_partitioned_groups_flat))
    elif hasattr(wrapper, "single_partition_of_fp32_groups"):  # ZeRO-1/2: this rank's slice of the flat
        pairs = [(master, wrapper.parallel_partitioned_bit16_groups[i][
                      dist.get_rank(group=wrapper.real_dp_process_group[i])])
                 for i, master in enumerate(wrapper.single_partition_of_fp32_groups)]
    else:
        return
    if not all(m.dtype == w.dtype and m.shape == w.shape and m.device == w.device for m, w in pairs):
        return
    for master, weights in pairs:
        master.data = weights.data
    if hasattr(wrapper, "single_partition_of_fp32_groups"):
        wrapper._link_all_hp_params()


def reduced_gradients(wrapper) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(local, grads) between the last backward of a step and engine.step(): the tensors the wrapper will hand the
    client optimizer and, element for element, the reduced gradients it will set on them (in the gradient
    accumulation dtype; the optimizer reads them as fp32), so that the global gradient norm is known before the
    step (without a wrapper they are the parameters' .grad). 0.19.8 keeps them, after the boundary's reduction, in:
    - ZeRO-3 (stage3.py's ipg epilogue, flattened by _prepare_fp32_grad_for_sub_group): averaged_gradients[g], the
      list of each parameter's gradient partition of sub group g;
    - ZeRO-1/2 (stage_1_and_2.py's epilogue, flattened in step()): averaged_gradients[i], either a group with a
      flat_partition (fp32 accumulation of lower-precision weights) or a list of the pieces of the partition,
      zero-padded at the end to the partition's size on the last dp rank;
    - BF16_Optimizer (bf16_optimizer.py's step()): fp32_groups_gradient_flat_partition[i];
    - FP16_UnfusedOptimizer (bf16 weights and gradients at ZeRO-0; fp16/unfused_optimizer.py's step()): the .grad
      of each weight of fp16_groups, for its fp32 copy in fp32_groups."""
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):
        local = list(wrapper.fp32_partitioned_groups_flat)
        return local, [_flat(wrapper.averaged_gradients[g], t.numel()) for g, t in enumerate(local)]
    if hasattr(wrapper, "single_partition_of_fp32_groups"):
        local = list(wrapper.single_partition_of_fp32_groups)
        grads = []
        for i, t in enumerate(local):
            group = wrapper.averaged_gradients[i]
            flat = getattr(group, "flat_partition", None)
            grads.append(flat.view(-1) if flat is not None else _flat(group, t.numel()))
        return local, grads
    if hasattr(wrapper, "fp32_groups_gradient_flat_partition"):
        return list(wrapper.fp32_groups_flat_partition), list(wrapper.fp32_groups_gradient_flat_partition)
    if hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):
        local = [t for group in wrapper.fp32_groups for t in group]
        weights = [p for group in wrapper.fp16_groups for p in group]
        return local, [p.grad if p.grad is not None else torch.zeros_like(t) for p, t in zip(weights, local)]
    raise RuntimeError(f"DeepSpeed wrapped the optimizer in {type(wrapper).__name__}, whose reduced gradients "
                       f"megachat.deepspeed_internals.reduced_gradients cannot find (written for deepspeed"
                       f"{TESTED_VERSIONS}); the gradient norm would be wrong: use a ZeRO stage / precision of "
                       f"docs/training.md or teach reduced_gradients this wrapper")


def _flat(pieces, numel: int) -> torch.Tensor:
    """The pieces one after the other in one 1-D tensor of numel elements, zero-padded at the end."""
    flat = torch.cat([t.reshape(-1) for t in pieces])
    if flat.numel() > numel:
        raise RuntimeError(f"DeepSpeed's gradient partition holds {flat.numel()} elements, its master {numel}: "
                           f"this DeepSpeed's layout is not the one megachat.deepspeed_internals was written for")
    return torch.nn.functional.pad(flat, (0, numel - flat.numel())) if flat.numel() < numel else flat


def pipeline_train_batch_without_step(engine, data_iter):
    """PipelineEngine.train_batch without its last instruction, the optimizer step: forward and backward over the
    micro-batches and the gradients' reduction, returning the batch's loss; the caller then clips and calls
    `pipeline_optimizer_step`. 0.19.8's train_batch runs the whole schedule, OptimizerStep included, with no
    point in between; its instruction table (_INSTRUCTION_MAP) maps OptimizerStep to nothing for this call."""
    from deepspeed.runtime.pipe import schedule as S
    table = engine._INSTRUCTION_MAP  # the instance's own (time_pipeline_instructions) or the class's
    engine._INSTRUCTION_MAP = {**table, S.OptimizerStep: lambda self, **kwargs: None}
    try:
        return engine.train_batch(data_iter=data_iter)
    finally:
        if table is type(engine)._INSTRUCTION_MAP:
            del engine._INSTRUCTION_MAP
        else:
            engine._INSTRUCTION_MAP = table


def pipeline_optimizer_step(engine) -> None:
    """The OptimizerStep instruction that pipeline_train_batch_without_step left out (0.19.8's
    _exec_optimizer_step: DeepSpeed's wrapper steps the client optimizer and zeroes the gradients)."""
    from deepspeed.runtime.pipe import schedule as S
    engine._INSTRUCTION_MAP[S.OptimizerStep](engine)


def skip_single_rank_allreduce(engine) -> None:
    """One process at ZeRO-0: DeepSpeed's gradient all-reduce would only copy every gradient into flat buckets and
    back (an all-reduce over one rank, / 1); 0.19.8's engine skips it when enable_backward_allreduce is False."""
    engine.enable_backward_allreduce = False


# ---- what the memory census counts (0.19.8 attribute names of the ZeRO / bf16 wrappers)
_GRAD_ATTRS = ("averaged_gradients", "all_grad_tensors", "grads_in_partition", "fp32_groups_gradients_flat",
               "grad_partitions_flat_buffer")
_MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat")


def _tensors(obj, depth=0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)


def bucket_tensors(wrapper) -> list[torch.Tensor]:
    """The wrapper's gradient reduction buckets (ipg_buckets: one per communication dtype, ZeRO-2/3)."""
    return [t for bucket in getattr(wrapper, "ipg_buckets", {}).values() for t in _tensors(bucket.buffer)]


def gradient_tensors(wrapper) -> list[torch.Tensor]:
    """The wrapper's own gradient partitions and flat gradient buffers."""
    return [t for name in _GRAD_ATTRS for t in _tensors(getattr(wrapper, name, None))]


def master_tensors(wrapper) -> list[torch.Tensor]:
    """The wrapper's fp32 master partitions (ZeRO-1/2, BF16_Optimizer, ZeRO-3)."""
    return [t for name in _MASTER_ATTRS for t in _tensors(getattr(wrapper, name, None))]


# ---- communication

def without_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU backend on plain gloo. Call before deepspeed.init_distributed / deepspeed.initialize.
    0.19.8's CPU backend (deepspeed/comm/torch.py) JIT-compiles a shared-memory all-reduce op (about 35 s on a new
    machine) whose /dev/shm buffers (66 MB per rank) are never unlinked, so every CPU launch leaks that much RAM;
    gloo computes the same reductions. On CUDA nothing changes."""
    if torch.cuda.is_available():
        return
    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm's namespace holds PyTorch itself as `torch`
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def quiet_deprecated_all_gather() -> None:
    """0.19.8's ZeRO-1/2 gathers its updated partitions with torch.distributed.all_gather_into_tensor, which torch
    2.13 deprecates with a FutureWarning on every rank of every run: a warning the user can do nothing about. Hide
    that one warning; megachat's own gathers use all_gather_single."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


# ---- the pipeline (0.19.8 deepspeed/runtime/pipe, deepspeed/runtime/utils.py; not exported by deepspeed.pipe)

def partition_balanced(weights: list[int], num_parts: int) -> list[int]:
    """DeepSpeed's balanced partition of a list of weights: what PipelineModule(partition_method="type:...") uses,
    so that megachat's stage bounds are the engine's."""
    from deepspeed.runtime.utils import partition_balanced as balanced
    return balanced(weights=weights, num_parts=num_parts)


def pipe_topology(pp: int, tp: int, dp: int):
    """DeepSpeed's topology object (tp fastest, then dp, then pp) that PipelineModule takes."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)


def time_pipeline_instructions(engine, parts: dict, sync: Callable[[], None] = lambda: None) -> None:
    """Accumulate the wall time (ms) of each instruction of PipelineEngine `engine` into parts["fwd" / "bwd" /
    "optim" / "comm"] by wrapping 0.19.8's class-level instruction table (_INSTRUCTION_MAP) on this instance; sync
    runs after each instruction (a device synchronize)."""
    from deepspeed.runtime.pipe import schedule as S
    column = {S.ForwardPass: "fwd", S.BackwardPass: "bwd", S.OptimizerStep: "optim", S.ReduceGrads: "comm",
              S.ReduceTiedGrads: "comm", S.SendActivation: "comm", S.RecvActivation: "comm", S.SendGrad: "comm",
              S.RecvGrad: "comm"}

    def timed(fn, col):
        def run(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = fn(self, *args, **kwargs)
            sync()
            parts[col] += (time.perf_counter() - t0) * 1000
            return out
        return run

    engine._INSTRUCTION_MAP = {k: timed(v, column[k]) if k in column else v
                               for k, v in type(engine)._INSTRUCTION_MAP.items()}
