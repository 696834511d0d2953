"""megachat.trainer: the loop of every phase (base, mid, SFT, RL): the GPT under DeepSpeed on the tp x pp x dp
grid, its train step, evaluation, checkpoints and resume (megachat.build makes the Trainer).

- `Trainer.train_step(micro_batches)`: one optimizer step over this rank's micro-batches (x, y) [B, T], y = -1
  where a token is not trained; returns the loss averaged over the whole global batch (the same on every rank),
  the gradient norm, the schedule and the throughput.
- `Trainer.fit(batches, evaluate)`: the loop, with evaluation and checkpoint cadence, stop signals, bad steps and
  lost ranks.
- `Trainer.evaluate_bpb(batches, token_bytes)`: bits per byte through evaluation's forward (GridForward).
- `Trainer.save(step)`, `Trainer.save_weights(run_dir)`: checkpoints (megachat.checkpoint; background=True: written
  by a thread from a host copy while training goes on) and the final weights (RUN_DIR/model/), every rank writing
  its own slices; `Trainer.full_state_dict()` gathers the weights on rank 0
  (tests, small models).

deepspeed is imported in the function that uses it: importing it takes seconds, which the planner and the tools
that only read TrainConfig should not pay (the planner imports megachat.build, which imports this module).
"""
from __future__ import annotations

import math
import os
import platform
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata

import torch
import torch.distributed as dist

from megachat import checkpoint, sharded
from megachat.deepspeed_internals import pipeline_optimizer_step, pipeline_train_batch_without_step
from megachat.evaluation.loss_eval import evaluate_bpb
from megachat.evaluation.model_eval import GridForward
from megachat.fileio import atomic_write_json
from megachat.model import full_state_dict, nanochat_shapes
from megachat.monitor import memory_gib, peak_flops
from megachat.optim import clip_coefficient, global_grad_norm, learning_rates, lr_multiplier, muon_momentum
from megachat.parallel import Grid
from megachat.train_config import TrainConfig, num_params
from megachat.watchdog import Watchdog


@dataclass
class Trainer:
    cfg: TrainConfig
    grid: Grid
    model: torch.nn.Module  # the GPT (with pp > 1 only this stage's layers are materialized, the rest is meta)
    ds_engine: object  # DeepSpeed's DeepSpeedEngine or PipelineEngine (not megachat's inference engine)
    device: torch.device
    ckpt_dir: str | None = None
    step: int = 0  # optimizer steps taken (after a resume: the checkpoint's): the one step counter
    flops_per_token: float = 0.0  # model_flops_per_token(cfg)
    optimizer: object = None  # the HybridOptimizer DeepSpeed steps (megachat.optim), which train_step schedules
    save_group: object = None  # the process group of asynchronous saves (enable_async_save)
    _writer: threading.Thread | None = None  # the asynchronous save being written
    _writer_error: list = field(default_factory=list)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.cfg.global_batch // (self.cfg.device_batch_size * self.grid.dp)

    @property
    def layout(self) -> dict:
        return {"tp": self.cfg.tp, "pp": self.cfg.pp, "dp": self.grid.dp, "zero": self.cfg.zero}

    def train_step(self, micro_batches) -> dict:
        """One optimizer step over this rank's `grad_accum` micro-batches: (x, y) long [B, T] with y = -1 where a
        token is not trained, or (x, y, w) with per-token weights w fp32 [B, T] (RL's advantages). The loss is
        sum(w * cross-entropy) / (trained tokens of the whole global batch): every trained token weighs the same
        across micro-batches and dp ranks, exactly as one process holding the global batch would weigh it (for
        packed pretraining data, the mean of the micro-batch means). Returns loss (the same on every rank),
        grad_norm (before clipping), lrm (the schedule's multiplier this step), lr (the block matrices' lr) and
        the throughput. In order: forward and backward over the micro-batches (DeepSpeed reduces the gradients
        over dp after the last); the global gradient norm over tp / pp / dp and the clipping factor; the optimizer
        step (HybridOptimizer: Muon and AdamW on the clipped gradient, at this step's schedule); the schedule's
        step (self.step + 1)."""
        t0 = time.perf_counter()
        batches = [tuple(t.to(self.device) for t in mb) for mb in micro_batches]
        if len(batches) != self.grad_accum:
            raise ValueError(f"train_step got {len(batches)} micro-batches, the config needs {self.grad_accum} "
                             f"(global batch / (device batch x dp))")
        trained = torch.stack([(mb[1] >= 0).sum() for mb in batches]).sum().float()
        dist.all_reduce(trained, group=self.grid.dp_group)  # every pipeline stage counts the same samples
        if trained.item() == 0:
            raise ValueError("a global batch without a single trained token (every target is -1): check the "
                             "data's masks")
        scale = self.grad_accum * self.grid.dp / trained  # DeepSpeed averages over micro-batches and dp ranks
        weighted = [(x, (y, (y >= 0).float() * scale * (rest[0] if rest else 1.0))) for x, y, *rest in batches]

        # 1. forward and backward
        if self.cfg.pp > 1:
            loss = pipeline_train_batch_without_step(self.ds_engine, iter(weighted)).detach().float()
        else:
            loss = torch.zeros((), device=self.device)
            for i, (x, y) in enumerate(weighted):
                micro_loss = self.ds_engine(x, y)
                self.ds_engine.backward(micro_loss)
                if i < len(weighted) - 1:
                    self.ds_engine.step()  # DeepSpeed counts micro-batches here; the last one is the real step
                loss += micro_loss.detach().float()
            loss /= self.grad_accum
            dist.all_reduce(loss, group=self.grid.dp_group)
            loss /= self.grid.dp

        # 2. global gradient norm and clipping; 3. the optimizer step at this step's schedule
        norm = global_grad_norm(self.ds_engine)
        lrm = lr_multiplier(self.step, self.cfg.num_iterations, warmdown_ratio=self.cfg.warmdown_ratio)
        self.optimizer.set_schedule(self.step, lrm, muon_momentum(self.step),
                                    grad_scale=clip_coefficient(norm, self.cfg.grad_clip))
        if self.cfg.pp > 1:
            pipeline_optimizer_step(self.ds_engine)
        else:
            self.ds_engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        loss, grad_norm = loss.item(), float(norm)

        # 4. the schedule's step
        self.step += 1
        tokens_per_s = self.cfg.total_batch_size / dt
        flops_per_s = self.flops_per_token * tokens_per_s
        rec = {"loss": loss, "lr": learning_rates(self.cfg.model_config().n_embd)["matrix"] * self.cfg.lr_scale * lrm,
               "lrm": lrm, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "model_flops_per_s": flops_per_s,
               "step_time_s": dt, "memory_gib": memory_gib()}
        if not math.isfinite(grad_norm) or not math.isfinite(loss):
            rec["skipped"] = 1  # a non-finite loss or gradient norm: HybridOptimizer changed nothing
        peak = peak_flops(self.cfg.dtype)
        if peak:
            rec["mfu"] = flops_per_s / (peak * self.grid.world)
        return rec

    def fit(self, batches, evaluate=None, *, monitor=None, eval_every: int = 0, save_every: int = 0,
            keep: int = 3, max_bad_steps: int = 10, spike_factor: float = 5.0,
            collective_timeout: float | None = None, async_save: bool = False) -> None:
        """The loop of every phase, from self.step to cfg.num_iterations. batches(i): this rank's micro-batches of
        global batch i (0-based; a pure function of i, so a resume continues the same stream). evaluate(step):
        a dict of metrics, run at step 0 of a fresh start, every eval_every steps and at the end. A checkpoint
        every save_every steps and at the end. Every record goes to `monitor` (megachat.monitor.Monitor) and a line
        to stdout on rank 0. What clusters do to runs:
        - SIGTERM / SIGUSR1 (a scheduler's notice before the kill): every rank finishes its step, the step is
          checkpointed, and the process exits 0 (SystemExit); `--resume auto` continues it.
        - A bad step (non-finite loss or gradient norm) changes nothing and is logged; max_bad_steps of them in a
          row stop the run naming the last good checkpoint.
        - A loss above spike_factor x the median of the last 50 is logged with the global sample numbers of its
          batch (samples (step - 1) * global_batch ... step * global_batch - 1), to look at with
          tools/inspect_data.py.
        - A lost rank (dead or stalled): megachat.watchdog ends every rank within collective_timeout (None: sized
          from the measured steps), naming the rank, the step and the checkpoint to resume from."""
        talk = dist.get_rank() == 0
        stop = []
        handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                    for sig in (signal.SIGTERM, signal.SIGUSR1)}

        def run_eval(step):
            if evaluate is not None:
                metrics = evaluate(step)
                if monitor is not None:
                    monitor.log(step, **metrics)
                if talk and metrics:
                    print(f"step {step:6d} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)

        if async_save:
            self.enable_async_save()
        last, bad, recent = self.cfg.num_iterations, 0, []
        dog = Watchdog(os.path.dirname(self.ckpt_dir) if self.ckpt_dir else None, dist.get_rank(),
                       dist.get_world_size(), collective_timeout)
        dog.start()
        start = self.step
        try:
            if self.step == 0:
                dog.beat(0, slow=True)
                run_eval(0)
            for step in range(start + 1, last + 1):  # global batch step-1; after it, `step` steps are done
                dog.beat(step)
                rec = self.train_step(batches(step - 1))
                bad = bad + 1 if rec.get("skipped") else 0
                median = sorted(recent)[len(recent) // 2] if len(recent) >= 10 else None
                if not bad and median is not None and rec["loss"] > spike_factor * median:
                    rec["spike"] = 1
                    if talk:
                        G = self.cfg.global_batch
                        print(f"step {step}: loss spike {rec['loss']:.4f} > {spike_factor} x median {median:.4f}; the "
                              f"batch is global samples {(step - 1) * G}..{step * G - 1}", flush=True)
                if not bad:
                    recent = (recent + [rec["loss"]])[-50:]
                if monitor is not None:
                    monitor.log(step, **rec)
                if talk:
                    print(f"step {step:6d}/{last} | loss {rec['loss']:.6f} | grad norm {rec['grad_norm']:.3f} | "
                          f"lrm {rec['lrm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s | {rec['step_time_s'] * 1000:.0f} "
                          f"ms" + (" | skipped: non-finite loss or gradient" if bad else ""), flush=True)
                if bad >= max_bad_steps:
                    latest = checkpoint.latest_tag(self.ckpt_dir) if self.ckpt_dir and os.path.isdir(self.ckpt_dir) \
                        else None
                    raise FloatingPointError(
                        f"loss is {rec['loss']} at step {step}: {bad} bad step(s) in a row, each skipped "
                        f"(--max-bad-steps {max_bad_steps}): training diverged; no checkpoint was written for it (latest intact "
                        f"checkpoint: {os.path.join(self.ckpt_dir, latest) if latest else 'none'}); lower the "
                        f"learning rate or check the data, then --resume")
                if step != last and eval_every > 0 and step % eval_every == 0:
                    dog.beat(step, slow=True)
                    run_eval(step)
                if step != last and save_every > 0 and step % save_every == 0 and not bad:
                    dog.beat(step, slow=True)
                    # not during a run of bad steps: the last good one stays in charge
                    self.save(step, keep=keep, background=async_save)
                if step != last and self._stop_requested(stop):
                    self.save(step, keep=keep)
                    if talk:
                        print(f"step {step}: stopping on a signal; checkpoint saved, continue with --resume auto",
                              flush=True)
                    dist.barrier()
                    raise SystemExit(0)
            if start < last:
                dog.beat(last, slow=True)
                run_eval(last)
                self.save(last, keep=keep)
        except BaseException as error:
            dog.failed(error)  # a collective failed because a rank was lost: reports it and exits
            raise
        finally:
            dog.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _stop_requested(self, stop: list) -> bool:
        """Whether any rank got a stop signal (all ranks agree: one tiny all-reduce per step)."""
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def write_run_config(self, run_dir: str, **extra) -> None:
        """RUN_DIR/config.json (rank 0): the training config, the model's, the grid, and `extra` (phase, tokenizer,
        data, parent run, ...), which scripts/report.py and the chat scripts read; RUN_DIR/env.json: where it ran."""
        if dist.get_rank() != 0:
            return
        os.makedirs(run_dir, exist_ok=True)
        atomic_write_json(os.path.join(run_dir, "config.json"),
                          {"train": self.cfg.to_json(), "model": vars(self.cfg.model_config()), "dp": self.grid.dp,
                           "world": self.grid.world, "num_params": num_params(self.cfg),
                           "flops_per_token": self.flops_per_token, **extra})
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        atomic_write_json(os.path.join(run_dir, "env.json"),
                          {"hostname": socket.gethostname(), "platform": platform.platform(),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "deepspeed": metadata.version("deepspeed"), "cuda": torch.version.cuda, "gpus": gpus,
                           "cpu_count": os.cpu_count(), "world": self.grid.world})

    def finish(self, run_dir: str, monitor=None) -> None:
        """The end of every phase: the final weights into RUN_DIR/model/, the monitor closed, the process group
        left together (collective)."""
        self.wait_for_save()
        self.save_weights(run_dir)
        if monitor is not None:
            monitor.close()
        dist.barrier()
        dist.destroy_process_group()

    def save_weights(self, run_dir: str) -> None:
        """RUN_DIR/model/: the final fp32 weights under nanochat's names, every rank writing its own slices in
        parallel (megachat.sharded; collective). checkpoint.load_weights reads them, tools/export_checkpoint.py
        turns them into one safetensors file or a nanochat checkpoint."""
        sharded.save(os.path.join(run_dir, checkpoint.WEIGHTS_DIR), self.ds_engine, self.cfg.model_config(),
                     self.step, self.layout, optimizer=False)

    def evaluate_bpb(self, batches, token_bytes: torch.Tensor) -> float:
        """Bits per byte over this rank's evaluation batches (x, y), summed over the grid: the same forward and
        formula as base_eval (evaluation.model_eval.GridForward, evaluation.loss_eval.evaluate_bpb)."""
        fwd = GridForward(self.model, self.grid)
        return evaluate_bpb(fwd.token_loss, ((x.to(self.device), y.to(self.device)) for x, y in batches),
                            token_bytes)

    def save(self, step: int, keep: int = 3, background: bool = False) -> str:
        """Checkpoint the state after `step` optimizer steps into ckpt_dir (collective): the layout-free state
        (step_NNNNNN/state/, each rank writing its own slices), which a resume under any layout reads. background
        (after enable_async_save): copy this rank's state into host memory and return; a thread writes and fsyncs
        it and switches `latest` last, on a process group of its own, while training goes on (wait_for_save)."""
        self.wait_for_save()  # one save at a time, in order
        meta = {"step": step, "consumed_samples": step * self.cfg.global_batch, "layout": self.layout,
                "config": self.cfg.to_json()}
        if not background:
            return checkpoint.save(self.ds_engine, self.ckpt_dir, step, meta, self.cfg.model_config(), keep=keep)
        staged = sharded.stage(self.ds_engine, nanochat_shapes(self.cfg.model_config()), optimizer=True, copy=True)
        self.staged_bytes = sum(v.numel() * v.element_size() for *_, v in staged.values())

        def write():
            try:
                checkpoint.save(self.ds_engine, self.ckpt_dir, step, meta, self.cfg.model_config(), keep=keep,
                                staged=staged, group=self.save_group)
            except BaseException as e:  # raised in the training thread by wait_for_save
                self._writer_error.append(e)
        self._writer = threading.Thread(target=write, name=f"save-{step}", daemon=True)
        self._writer.start()
        return checkpoint.tag_for(step)

    def enable_async_save(self) -> None:
        """Create the process group asynchronous saves communicate on (collective: every rank calls it), so that
        their collectives never interleave with training's."""
        if self.save_group is None:
            self.save_group = dist.new_group(backend="gloo")

    def wait_for_save(self) -> None:
        """Wait until the asynchronous save in flight (if any) is on disk and `latest` names it; raise its error."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._writer_error:
            raise self._writer_error.pop()

    def full_state_dict(self) -> dict | None:
        """Unsharded weights (the model's, as fp32) under nanochat's names on rank 0 (None elsewhere); collective
        over the world. The whole model goes to rank 0: for tests and small models; checkpoints and the final
        weights are written by every rank without it (save, save_weights)."""
        import deepspeed
        if self.cfg.zero == 3:
            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                sd = full_state_dict(self.model)
        else:
            sd = full_state_dict(self.model)
        # with pp > 1 each stage holds its own layers (the rest of the GPT is on meta): one rank per stage sends
        first_of_stage = self.grid.tp_rank == 0 and self.grid.dp_rank == 0
        return _gather_on_rank0({k: v.float().cpu() for k, v in sd.items()} if first_of_stage else {})


def _gather_on_rank0(part: dict) -> dict | None:
    """The union of every rank's dict on rank 0, None elsewhere."""
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(part, out, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for p in out:
        merged.update(p)
    return merged
