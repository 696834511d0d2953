"""The process grid: tensor (tp) x data (dp) x pipeline (pp) parallelism, and the checks on a layout.

Ranks are laid out exactly as DeepSpeed's `PipeModelDataParallelTopology(num_pp, num_mp=tp, num_dp)`:
tp varies fastest (so a tp group stays inside a node), then dp, then pp:

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

`Grid` also speaks Megatron's `mpu` interface, so `deepspeed.initialize(..., mpu=grid)` reduces gradients
over the dp group only, partitions ZeRO state over dp, and counts tensor-parallel shards once in the
gradient norm. The model only ever sees `grid.tp_group` / `grid.tp_rank`; DeepSpeed lives in the trainer.
`init_distributed` joins the launcher's world with a timeout on every collective (a lost rank never leaves the
others waiting forever), and `device` names this process's device.
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megachat import deepspeed_internals
from megachat.watchdog import collective_timeout_s


def check_layout(world: int, tp: int, pp: int, *, zero_stage: int = 0, n_layer: int | None = None,
                 n_head: int | None = None, n_kv_head: int | None = None, vocab_size: int | None = None,
                 total_batch_size: int | None = None, device_batch_size: int | None = None,
                 seq_len: int | None = None) -> int:
    """Validate a tp x pp x dp layout before any process group is created; returns dp.

    Raises ValueError naming the offending value and the fix. Optional arguments are checked when given.
    """
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp {tp} and --pp {pp} must both be >= 1")
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}: "
                         f"launch a multiple of {tp * pp} processes or change --tp/--pp")
    dp = world // (tp * pp)
    if pp > 1 and zero_stage > 1:
        raise ValueError(f"ZeRO stage {zero_stage} cannot be combined with pipeline parallelism (pp={pp}): "
                         f"DeepSpeed's pipeline engine supports ZeRO-0/1 only; use --zero 1 or --pp 1")
    if n_layer is not None and pp > n_layer:
        raise ValueError(f"--pp {pp} is larger than the number of layers ({n_layer}): every pipeline stage "
                         f"needs at least one block; use --pp <= {n_layer} or a deeper model")
    for name, value in (("n_head", n_head), ("vocab_size (padded)", vocab_size)):
        if value is not None and value % tp != 0:
            raise ValueError(f"--tp {tp} does not divide {name} = {value}: tensor parallelism splits it "
                             f"evenly over tp ranks; choose a tp that divides {value}")
    # KV heads either split over tp ranks, or (GQA with fewer KV heads than ranks) each KV head is
    # replicated on tp / n_kv_head ranks, as vLLM does.
    if n_kv_head is not None and n_kv_head % tp != 0 and tp % n_kv_head != 0:
        raise ValueError(f"--tp {tp} and n_kv_head = {n_kv_head} do not fit: tp must divide n_kv_head (KV heads "
                         f"split) or be a multiple of it (each KV head replicated on tp / n_kv_head ranks)")
    if total_batch_size is not None:
        tokens_per_micro_step = device_batch_size * seq_len * dp
        if total_batch_size % tokens_per_micro_step != 0:
            raise ValueError(
                f"--total-batch-size {total_batch_size} is not divisible by device_batch_size * seq_len * dp "
                f"= {device_batch_size} * {seq_len} * {dp} = {tokens_per_micro_step}: make it a multiple of "
                f"{tokens_per_micro_step} (gradient accumulation steps must be a whole number)")
    return dp


@dataclass
class Grid:
    """One process's place in the tp x dp x pp grid. `Grid()` is a single process with no groups."""
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    tp_group: Any = None  # torch.distributed ProcessGroup (size 1 when tp == 1); None without torch.distributed
    dp_group: Any = None
    pp_group: Any = None
    stage_group: Any = None  # the tp*dp ranks of this pipeline stage (the optimizer's whole-matrix exchange)
    dp_ranks: tuple[int, ...] = (0,)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def group_ranks(self, axis: str) -> list[list[int]]:
        """Every group along `axis` ("tp", "dp" or "pp") as lists of global ranks, in one fixed order."""
        tp, dp, pp = self.tp, self.dp, self.pp
        rank = lambda p, d, t: p * dp * tp + d * tp + t  # noqa: E731
        if axis == "tp":
            return [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)]
        if axis == "dp":
            return [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)]
        return [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)]

    # Megatron's `mpu` interface, as read by deepspeed.initialize(mpu=...).
    def get_model_parallel_rank(self):
        return self.tp_rank

    def get_model_parallel_world_size(self):
        return self.tp

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return self.rank - self.tp_rank

    def get_data_parallel_rank(self):
        return self.dp_rank

    def get_data_parallel_world_size(self):
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self):
        return list(self.dp_ranks)

    def get_pipe_parallel_rank(self):
        return self.pp_rank

    def get_pipe_parallel_world_size(self):
        return self.pp

    def get_pipe_parallel_group(self):
        return self.pp_group


def without_deepspeed_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU backend on plain gloo (deepspeed_internals.without_shm_allreduce says why); call before
    deepspeed.init_distributed / deepspeed.initialize."""
    deepspeed_internals.without_shm_allreduce()


def init_grid(tp: int = 1, pp: int = 1) -> Grid:
    """Build the grid of this process from an initialized torch.distributed world (or a single process).

    Every rank must call this with the same tp and pp: creating process groups is collective.
    """
    if not (dist.is_available() and dist.is_initialized()):
        check_layout(1, tp, pp)
        return Grid()
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = check_layout(world, tp, pp)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)  # torchrun / deepspeed
    if world > per_node and per_node % tp != 0:
        raise ValueError(f"--tp {tp} does not divide the {per_node} processes per node: a tensor-parallel group "
                         f"({tp} consecutive ranks) would span nodes; use a --tp that divides {per_node}")
    grid = Grid(tp=tp, pp=pp, dp=dp, rank=rank)
    # new_group is collective over the whole world: every rank creates every group, in the same order.
    for axis in ("tp", "dp", "pp"):
        for ranks in grid.group_ranks(axis):
            group = dist.new_group(ranks, timeout=_timeout)
            if rank in ranks:
                setattr(grid, f"{axis}_group", group)
                if axis == "dp":
                    grid.dp_ranks = tuple(ranks)
    for stage in range(pp):
        ranks = list(range(stage * dp * tp, (stage + 1) * dp * tp))
        group = dist.new_group(ranks, timeout=_timeout)
        if rank in ranks:
            grid.stage_group = group
    return grid


_timeout = None  # the process-group timeout init_distributed chose; init_grid gives its groups the same


def init_distributed(world_of_one: bool = True, timeout_s: float | None = None, grace: bool = True) -> None:
    """Join the world the launcher (deepspeed / torchrun) describes in the environment; nccl on CUDA, gloo on
    CPU. A plain `python` run (no RANK in the environment) becomes a world of one (the DeepSpeed engine needs
    a process group), or with world_of_one=False stays without one and leaves os.environ alone (evaluation,
    whose code runs with or without a group and is also called in-process by the tests). DeepSpeed adopts
    this process group when the trainer initializes it.

    Every collective of the world and of init_grid's groups fails after `watchdog.collective_timeout_s(timeout_s,
    grace)` (--collective-timeout plus a grace, so that in training megachat.watchdog names the lost rank first; 630 s
    by default; grace=False for jobs without steps, where this timeout is the bound) instead of waiting forever on a
    lost rank: gloo honours it per collective; on GPUs the NCCL settings
    below make PyTorch's NCCL watchdog end the process when a collective passes it (docs/multinode.md)."""
    global _timeout
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        # every rank started by srun itself (no torchrun / deepspeed launcher): SLURM's names for the same facts
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ValueError("started by srun without a launcher: export MASTER_ADDR (the first node's address) and "
                             "MASTER_PORT (a free port) before srun, as scripts/slurm_train.sbatch does")
    if "RANK" not in os.environ and not world_of_one:
        return
    if "RANK" not in os.environ:  # plain `python script.py`: one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    _timeout = timedelta(seconds=collective_timeout_s(timeout_s, grace))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # a timed-out or failed collective tears the process down (3: without aborting the communicator first, which
        # can hang itself); the monitor thread ends a process whose NCCL watchdog stops beating for longer than that
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        os.environ.setdefault("TORCH_NCCL_ENABLE_MONITORING", "1")
        os.environ.setdefault("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", str(int(_timeout.total_seconds()) + 60))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=_timeout)


def device():
    """This process's device: its CUDA device under a GPU launcher, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing holds now, for a rendezvous (MASTER_PORT) or a local server. Chosen at
    random below the kernel's ephemeral range (ip_local_port_range), never in it: the kernel hands ports of that
    range to every outgoing connection (gloo opens many), so a port picked there can be taken by another
    process's connect() before the rendezvous listens on it, which then fails with EADDRINUSE."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the IANA range's start
        ephemeral = 49152
    pick = random.SystemRandom()  # not the random module's state, which a seeded run shares between processes
    for _ in range(200):
        port = pick.randrange(max(1024, ephemeral // 2), ephemeral)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # held by another process
                continue
            return port
    raise RuntimeError(f"no free TCP port between {max(1024, ephemeral // 2)} and {ephemeral} on 127.0.0.1 after "
                       f"200 tries: set MASTER_PORT to a port nothing holds")
