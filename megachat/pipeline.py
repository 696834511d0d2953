"""megachat.pipeline: the GPT split over pipeline stages; the one place that knows how.

The model is the list `GPT.layers()` = [EmbeddingStage, Block x n_layer, HeadStage] (model.py; `GPT.forward` is
the loop over it). Here:
- `stage_bounds(n_layer, pp)`: stage s runs layers[bounds[s]:bounds[s+1]], the blocks balanced exactly as
  DeepSpeed's PipelineModule(partition_method="type:Block") balances them;
- `stage_layers(model, grid)`: this rank's layers (all of them with pp = 1); `build_model` allocates only these;
- `pipeline_module(model, grid)`: DeepSpeed's PipelineModule over the same module objects with the model's own
  LM head and loss fused (`GPT.head_loss`), for the trainer's PipelineEngine (training);
- `StageForward`: the forward across stages without DeepSpeed's engine (evaluation, sampling, the trainer's
  validation): the hidden state [B, T, C] goes from stage to stage with point-to-point messages.
deepspeed is imported in pipeline_module only: megachat.model imports this module, and importing deepspeed takes
seconds that inference and the tools should not pay.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megachat.deepspeed_internals import partition_balanced, pipe_topology


def stage_bounds(n_layer: int, pp: int) -> list[int]:
    """[0, ..., n_layer + 2]: stage s owns layers bounds[s]:bounds[s + 1] of GPT.layers(); the embedding rides
    with the first stage's blocks and the head with the last stage's (pp = 1: one stage, no DeepSpeed needed)."""
    if pp == 1:
        return [0, n_layer + 2]
    return partition_balanced(weights=[0] + [1] * n_layer + [0], num_parts=pp)


def stage_layers(model, grid) -> list:
    """The layers of GPT.layers() that this rank's pipeline stage runs."""
    layers = model.layers()
    if grid.pp == 1:
        return layers
    bounds = stage_bounds(model.config.n_layer, grid.pp)
    return layers[bounds[grid.pp_rank]:bounds[grid.pp_rank + 1]]


def topology(grid):
    """DeepSpeed's topology object with the grid's rank layout (tp fastest, then dp, then pp)."""
    return pipe_topology(pp=grid.pp, tp=grid.tp, dp=grid.dp)


def pipeline_module(model, grid):
    """DeepSpeed's PipelineModule over model.layers(fused_loss=True) (shared weights) with GPT.head_loss as its
    loss_fn: the last stage ends in the normalised hidden state and its loss_fn is the LM head and the loss fused,
    never holding the logits (labels are the trainer's (targets, weights) pairs; DeepSpeed averages the loss over
    micro-batches and dp ranks)."""
    from deepspeed.pipe import PipelineModule
    module = PipelineModule(layers=model.layers(fused_loss=True), loss_fn=model.head_loss, topology=topology(grid),
                            partition_method="type:Block")
    expected = stage_bounds(model.config.n_layer, grid.pp)
    if module.parts != expected:  # build_model allocated exactly these layers
        raise RuntimeError(f"DeepSpeed split the pipeline as {module.parts}, megachat expected {expected}; "
                           f"the deepspeed version changed its partitioning")
    return module


class StageForward:
    """The model's raw-logit forward on this rank's pipeline stage. Every rank of a dp slice gets the same ids;
    stage s runs its layers and sends the hidden state to stage s + 1; the last stage holds the logits.
    `reports` is True on one rank per dp slice (tp rank 0 of the last stage): the rank whose results count."""

    def __init__(self, model, grid):
        self.model, self.grid = model, grid
        self.layers = stage_layers(model, grid)
        self.first = grid.pp_rank == 0
        self.last = grid.pp_rank == grid.pp - 1
        stage = grid.tp * grid.dp  # global rank distance between neighbouring pipeline stages
        self.prev_rank, self.next_rank = grid.rank - stage, grid.rank + stage
        self.reports = self.last and grid.tp_rank == 0

    def raw_logits(self, ids):
        """ids [B, T] -> this rank's raw logits [B, T, V_local] on the last stage, None elsewhere."""
        if self.first:
            h = ids
        else:
            param = next(p for layer in self.layers for p in layer.parameters())
            h = torch.empty(*ids.shape, self.model.config.n_embd, dtype=param.dtype, device=param.device)
            dist.recv(h, src=self.prev_rank)
        for layer in self.layers:
            h = layer(h)
        if not self.last:
            dist.send(h.contiguous(), dst=self.next_rank)
            return None
        return h
