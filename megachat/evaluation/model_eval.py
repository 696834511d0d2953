"""The megachat GPT on any tp x pp x dp grid as the two functions the metrics take.

- token_loss(x, y) -> fp32 [B, T] per-token nats (loss_eval.evaluate_bpb): the vocab-parallel softcapped
  cross-entropy (GPT.loss), never gathering logits;
- core_forward(ids) -> (losses [B, T], predictions [B, T]) (core_eval): the same losses against the next token
  and a vocab-parallel argmax of the softcapped logits (each tp rank's best (value, global id), all-gathered:
  [B, T] numbers, not [B, T, V]);
- letter_logits(ids, token_ids) -> the last position's logits of a few ids (chat_tasks.evaluate_categorical);
- greedy_samples(model, grid, tokenizer, prompts): greedy continuations (base_train, base_eval): the inference
  engine's (megachat.engine, KV cache) where it runs (pp = 1), else a full recompute per token.

The forward across pipeline stages is megachat.pipeline.StageForward; only tp rank 0 of the last stage returns
results, every other rank returns None (it took part in the collectives), so each dp slice is counted exactly
once when the metrics all-reduce over the world. The trainer's validation bpb runs through token_loss too.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megachat import kernels
from megachat.engine import Engine, Row, Sampling, Tools
from megachat.model import SOFTCAP
from megachat.parallel import Grid
from megachat.pipeline import StageForward


class GridForward(StageForward):
    """The metrics' forward functions on this rank's part of the grid; see the module docstring."""

    def __init__(self, model, grid: Grid | None = None):
        super().__init__(model, grid or Grid())

    @torch.no_grad()
    def token_loss(self, x, y):
        """Per-token nats fp32 [B, T] (0 where y == -1), on the reporting rank; None elsewhere."""
        logits = self.raw_logits(x)
        if logits is None:
            return None
        loss = self.model.loss(logits, y, reduction="none")
        return loss if self.reports else None

    @torch.no_grad()
    def core_forward(self, ids):
        """(losses fp32 [B, T] of the next token, greedy predictions int64 [B, T]) on the reporting rank."""
        logits = self.raw_logits(ids)
        if logits is None:
            return None
        head = self.model.lm_head
        targets = torch.roll(ids, -1, dims=1)  # the last column is never scored
        losses = self.model.loss(logits, targets, reduction="none")
        # argmax of the softcapped logits, as nanochat takes it (tanh can tie values the raw logits separate)
        value, index = kernels.softcap(logits.float(), SOFTCAP).max(dim=-1)
        index = index + head.vocab_start
        if head.group is not None and self.grid.tp > 1:
            values = [torch.empty_like(value) for _ in range(self.grid.tp)]
            indices = [torch.empty_like(index) for _ in range(self.grid.tp)]
            dist.all_gather(values, value.contiguous(), group=head.group)
            dist.all_gather(indices, index.contiguous(), group=head.group)
            # max over ranks; torch.max returns the first maximum = the lowest vocab id, as one process does
            best = torch.stack(values).max(dim=0).indices
            index = torch.stack(indices).gather(0, best.unsqueeze(0)).squeeze(0)
        return (losses, index) if self.reports else None

    @torch.no_grad()
    def letter_logits(self, ids, token_ids):
        """Softcapped logits [len(token_ids)] of the given global ids at the last position of ids [1, T], on the
        reporting rank (categorical scoring): each tp rank fills the ids of its shard, one small all-reduce."""
        logits = self.raw_logits(ids)
        if logits is None:
            return None
        head = self.model.lm_head
        want = torch.as_tensor(token_ids, device=logits.device) - head.vocab_start
        here = (want >= 0) & (want < logits.size(-1))
        last = kernels.softcap(logits[0, -1].float(), SOFTCAP)
        picked = torch.where(here, last[want.clamp(0, logits.size(-1) - 1)], 0.0)
        if head.group is not None and self.grid.tp > 1:
            dist.all_reduce(picked, group=head.group)
        return picked if self.reports else None


@torch.no_grad()
def greedy_samples(model, grid, tokenizer, prompts, n_tokens=16):
    """[(prompt, greedy continuation of at most n_tokens)] on any grid (collective: every rank calls it). Each
    prompt (after <|bos|>) alone, through the inference engine at temperature 0 where it runs (pp = 1): the
    continuation ends before <|bos|> (the document's end) or <|assistant_end|>, a calculator call gets its result.
    Under pp > 1 the same tokens from a full recompute of the context per token (_recomputed_greedy)."""
    encoded = [tokenizer.encode(prompt, prepend=tokenizer.bos_id) for prompt in prompts]
    if grid.pp == 1:
        engine, greedy = Engine(model, tokenizer), Sampling(max_tokens=n_tokens, temperature=0)
        rows = [engine.generate_batch([ids], greedy)[0][0] for ids in encoded]
    else:
        rows = [_recomputed_greedy(model, grid, tokenizer, ids, n_tokens) for ids in encoded]
    return [(prompt, tokenizer.decode(row)) for prompt, row in zip(prompts, rows)]


def _recomputed_greedy(model, grid, tokenizer, ids, n_tokens) -> list[int]:
    """The engine's greedy continuation of ids where the engine cannot run (pp > 1): the argmax of the softcapped
    logits of the whole context per token (GridForward.core_forward), from dp slice 0's reporting rank, broadcast
    to every rank; the engine's Tools end the row and force the calculator's results in."""
    limit = model.transformer.h[0].attn.cos.size(0)  # the RoPE tables bound positions, as in the engine
    if len(ids) + n_tokens > limit:
        raise ValueError(f"prompt of {len(ids)} tokens + {n_tokens} sample tokens exceeds the model's maximum length "
                         f"{limit}; sample fewer tokens")
    fwd = GridForward(model, grid)
    src = (grid.pp - 1) * grid.tp * grid.dp  # tp rank 0, dp rank 0, last stage
    dev = next(p.device for p in model.parameters() if not p.is_meta)
    tools, row, out = Tools(tokenizer), Row(), []
    for _ in range(n_tokens):
        if row.forced:  # the same on every rank: no forward needed (the engine discards its token)
            token = row.forced.popleft()
        else:  # eager, as the engine's forwards (Engine._logits): each length would be a compilation of its own
            with torch.compiler.set_stance("force_eager"):
                res = fwd.core_forward(torch.tensor([ids + out], device=dev))
            nxt = torch.tensor([res[1][0, -1].item() if res is not None else 0], device=dev)
            dist.broadcast(nxt, src=src)
            token = int(nxt.item())
        tools.advance(row, token)
        if row.done:
            break
        out.append(token)
    return out
