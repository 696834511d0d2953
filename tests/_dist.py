"""Real gloo process groups for the tests: `run_gloo` spawns ranks on a free port and returns what each rank's
function returned; `vocab_split_softcap_ce` is the 2-rank vocab-parallel cross-entropy (`vocab_parallel_loss`) that
tests/test_tensor_parallel.py and tests/_kernels_interp.py check (its local statistics from the torch reference, or
from the Triton kernels when the environment dispatches to them)."""
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megachat.parallel import free_port  # noqa: F401  (the tests' launches take their ports from here)
from megachat.tensor_parallel import vocab_parallel_loss


def _rank_main(rank, world, port, fn, args, out_dir, timeout_s):
    # the launcher's variables too: DeepSpeed (PipelineModule, the engine) reads LOCAL_RANK from the environment
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))  # a rank that dies fails the others in time
    try:
        torch.save(fn(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world, *args, timeout_s=60):
    """fn(rank, *args) (a module-level function) on `world` processes in one gloo group -> its results by rank.

    Each rank's environment is the deepspeed launcher's on one node, so fn may call deepspeed.init_distributed /
    deepspeed.initialize (after megachat.parallel.without_deepspeed_shm_allreduce()): they adopt this group."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(world, free_port(), fn, args, out_dir, timeout_s), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def vocab_split_softcap_ce(rank, logits, targets, weights):
    """Rank `rank` of 2 holds half the vocab of logits [N, V]: its per-token loss and the gradient of its shard."""
    v = logits.size(1) // 2
    shard = logits[:, rank * v:(rank + 1) * v].clone().requires_grad_()
    loss = vocab_parallel_loss(shard, targets, rank * v, dist.group.WORLD, reduction="none")
    (loss * weights).sum().backward()
    return {"loss": loss.detach(), "grad": shard.grad}
