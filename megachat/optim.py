"""nanochat's optimizer: Muon for the block matrices, AdamW for the embedding and the LM head, exact under
tensor x pipeline x data parallelism and DeepSpeed ZeRO-0/1/2/3; its learning rates and the functions of its
schedules (lr_multiplier, muon_momentum), which the trainer evaluates at its step and hands to every step
(`HybridOptimizer.set_schedule`); the global gradient norm (`global_grad_norm`) and the clipping factor
(`clip_coefficient`) the trainer computes between the backward and the step. Which elements of which matrix a rank
holds under DeepSpeed's partitions, and the exchange that brings each matrix to the rank that orthogonalizes it,
are megachat.zero_partitions'.

What it computes (as nanochat's base_train.py), for every step `it` (0-based), with the schedule's lr multiplier
lrm = lr_multiplier(it) and Muon momentum m = muon_momentum(it) set by the trainer:
- gradients are first multiplied by the step's grad_scale: clip_coefficient(global_grad_norm(...), max_norm), the
  true global norm (every element of the unsharded model counted once, whatever tp / pp / dp / ZeRO stage), as
  torch.nn.utils.clip_grad_norm_ clips the single-process model.
- Muon (2-D block matrices, kind "matrix"): buf.lerp_(g, 1 - m); u = g.lerp(buf, m) (Nesterov); the update of
  the *whole* matrix is newton_schulz(u) * sqrt(max(1, rows / cols)) (rows, cols of the unsharded matrix);
  w -= lr * lrm * update. m warms from 0.85 to 0.95 over the first 300 steps.
- AdamW (torch.optim.AdamW's formula) for `wte` (kind "embedding") and `lm_head` (kind "lm_head"), betas
  (0.8, 0.95), eps 1e-10, weight decay 0, lr x lrm.
- The rates: `learning_rates(n_embd)`, from LEARNING_RATES (Muon 0.02; AdamW 0.2 and 0.004, both scaled by
  (n_embd/768)^-0.5).

Why our own optimizer and not DeepSpeed 0.19's built-in Muon (deepspeed/runtime/zero/muon):
- It decides Muon-or-Adam from parameter names: every >= 2-D parameter whose name lacks "embed" / "lm_head"
  becomes Muon, so nanochat's `transformer.wte.weight` would be orthogonalized.
- It orthogonalizes the tensor a rank holds. Under tensor parallelism that is a tp shard, and
  newton_schulz(cat(shards)) != cat(newton_schulz(shard)) (and its sqrt(rows/cols) scale uses the shard's
  shape); `resolve_per_head_muon_after_sharding` only re-derives head counts for its optional per-head mode,
  the full-matrix path still runs on the shard.
- BF16_Optimizer (bf16 + fp32 gradient accumulation at ZeRO-1, and bf16 under the pipeline engine: the
  trainer's default path) hands the base optimizer flat fp32 partitions and never runs Newton-Schulz
  (DeepSpeed issues #8442, #8461); ZeRO-1/2 with reduce_scatter orthogonalized partly-reduced gradients
  (#7807); ZeRO-1/2 orthogonalize every matrix on every rank that holds a piece of it (no spreading), and
  its default NS is a different ("gram") method.

How it works here. DeepSpeed still does data parallelism, gradient reduction and ZeRO partitioning; this
optimizer is the "basic optimizer" it wraps. At its first step it reads what the rank holds
(zero_partitions.build_plan). Norm, momentum and AdamW are elementwise, so each rank computes them on the
elements it holds; for Newton-Schulz every matrix has one owner among its pipeline stage's tp*dp ranks, which
receives the whole matrix of u, orthogonalizes and scales it, and sends each holder its part of the update
(two all_to_alls, the minimum volume for this scheme; `optimizer_stats` reports it per rank).

State: packed fp32 buffers (Muon momentum, Adam moments) of exactly the elements this rank holds, in
`state` of the tensor DeepSpeed handed us. held_state() hands them out by slices, with the fp32 master weights,
for megachat.sharded's layout-free checkpoints (each rank writes and reads only its own elements). The step count
is not the optimizer's: the trainer's step is the one counter (the schedule's position and Adam's bias
correction), set with set_schedule; full_optimizer_state() / load_full_optimizer_state() gather a stage's
state into unsharded per-parameter tensors on every rank and back (small models, tests).

DeepSpeed config the trainer needs with it: "gradient_clipping": 0 (the trainer clips, with the true global norm;
train_config.check_ds_config refuses a user's value), "zero_allow_untested_optimizer": true for ZeRO >= 1, no
"optimizer" / "scheduler" sections (the trainer owns the schedule), no fp16. ZeRO-3 also needs a sub_group_size
above the stage's parameter count, so that DeepSpeed calls step() once with every parameter (build.ds_config sets
it).
The class name avoids the word "muon": DeepSpeed's ZeRO-1/2 switch to their own Muon path for optimizers
whose class name contains it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megachat.deepspeed_internals import reduced_gradients, zero3_master_flats
from megachat.kernels import newton_schulz
from megachat.parallel import Grid
from megachat.zero_partitions import ExchangePlan, build_plan, shard_state_into, unshard_state, written_share

# nanochat's base learning rates per parameter kind (param_kind); learning_rates(n_embd) scales AdamW's
LEARNING_RATES = {"matrix": 0.02, "embedding": 0.2, "lm_head": 0.004}


def learning_rates(n_embd: int, base: dict[str, float] = LEARNING_RATES) -> dict[str, float]:
    """{kind: lr} for a model of width n_embd: Muon's "matrix" rate as it is, the AdamW rates ("embedding",
    "lm_head") x (n_embd / 768)^-0.5, as nanochat."""
    scale = (n_embd / 768) ** -0.5
    return {kind: lr if kind == "matrix" else lr * scale for kind, lr in base.items()}


def param_kind(name: str, p: torch.Tensor) -> str:
    """How nanochat optimizes a parameter: "embedding" (wte) and "lm_head" by AdamW, every other 2-D weight
    ("matrix") by Muon; raises ValueError for anything else."""
    if name.endswith("wte.weight"):
        return "embedding"
    if name.endswith("lm_head.weight"):
        return "lm_head"
    if p.dim() == 2:
        return "matrix"
    raise ValueError(f"parameter {name!r} of shape {tuple(p.shape)} has no optimizer: nanochat's model has only "
                     f"2-D weights (wte / lm_head -> AdamW, block matrices -> Muon); freeze it "
                     f"(requires_grad=False) or give it a 2-D shape")


def lr_multiplier(step: int, num_iterations: int, warmdown_ratio: float = 0.2) -> float:
    """nanochat's schedule: constant, then linear warmdown to 0 over the last `warmdown_ratio` of the run
    (1.0: over the whole run, as SFT); `step` is 0-based. Past the horizon (a step taken after num_iterations)
    it is 0, also for a run too short to have a warmdown step."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step <= num_iterations - warmdown_iters:
        return 1.0
    return max(0.0, (num_iterations - step) / warmdown_iters) if warmdown_iters else 0.0


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, warmup_steps: int = 300) -> float:
    """Muon momentum at 0-based `step`: linear from `start` to `end` over `warmup_steps`."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


# the packed state of each kind of parameter
_STATE_KEYS = {"matrix": ("momentum_buffer",), "embedding": ("exp_avg", "exp_avg_sq"),
               "lm_head": ("exp_avg", "exp_avg_sq")}


class HybridOptimizer(torch.optim.Optimizer):
    """Muon + AdamW over one param group (so DeepSpeed calls step() once with everything).

    named_parameters: (name, param) of this rank's model / pipeline stage (tp shards carry
    `tensor_model_parallel` and `partition_dim`). grid: this rank's Grid, from megachat.parallel.init_grid
    (Muon's exchange runs over its stage_group). matrix_lr / embedding_lr / lm_head_lr: the base rates, scaled by
    learning_rates(n_embd). ns_dtype: Newton-Schulz compute dtype (bf16 as nanochat; fp32 in tests);
    compile_newton_schulz: run it through torch.compile (kernels.newton_schulz(compiled=True)).
    Before each step the caller sets it (`set_schedule`: the 0-based step, the lr multiplier, Muon's momentum and
    the clipping factor); a step without it only creates the state.
    """

    def __init__(self, named_parameters, grid: Grid = Grid(), *, n_embd: int,
                 matrix_lr: float = LEARNING_RATES["matrix"], embedding_lr: float = LEARNING_RATES["embedding"],
                 lm_head_lr: float = LEARNING_RATES["lm_head"], betas: tuple[float, float] = (0.8, 0.95),
                 eps: float = 1e-10, ns_steps: int = 5, ns_dtype: torch.dtype = torch.bfloat16,
                 compile_newton_schulz: bool = False):
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        if not named:
            raise ValueError("HybridOptimizer got no trainable parameters: pass model.named_parameters()")
        if grid.tp * grid.dp > 1 and grid.stage_group is None:
            raise ValueError(f"HybridOptimizer: the grid (tp={grid.tp}, dp={grid.dp}) has no stage_group for "
                             f"Muon's exchange; build it with megachat.parallel.init_grid")
        self.grid = grid
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._kinds = [param_kind(n, p) for n, p in named]
        for (n, p), kind in zip(named, self._kinds):
            if kind == "matrix" and grid.tp > 1 and not hasattr(p, "tensor_model_parallel"):
                raise ValueError(f"matrix {n!r} has no tensor_model_parallel attribute with tp={grid.tp}: Muon needs "
                                 f"to know how the whole matrix is split; set tensor_model_parallel=True and "
                                 f"partition_dim on every tp-sharded weight, False on replicated ones")
        lrs = learning_rates(n_embd, {"matrix": matrix_lr, "embedding": embedding_lr, "lm_head": lm_head_lr})
        defaults = dict(lr=1.0, **{f"{kind}_lr": lr for kind, lr in lrs.items()}, betas=betas, eps=eps,
                        ns_steps=ns_steps)
        super().__init__([{"params": list(self._params)}], defaults)
        self.ns_dtype, self.compile_newton_schulz = ns_dtype, compile_newton_schulz
        self._next: tuple | None = None  # set_schedule's (step, lr multiplier, momentum, gradient scale)
        self._plan: ExchangePlan | None = None
        self.skipped = False  # whether the last step was skipped for a non-finite gradient scale
        self.last_step_seconds: float | None = None

    def set_schedule(self, step: int, lr_multiplier: float, momentum: float,
                     grad_scale: torch.Tensor | None = None) -> None:
        """The next step: its 0-based number (Adam's bias correction uses step + 1), the multiplier of every base
        rate, Muon's momentum and grad_scale, the factor on every gradient (clip_coefficient's, for global-norm
        clipping; None: 1). A non-finite grad_scale skips the step: no weight or state moves. A step() without a
        set_schedule before it only creates the state (DeepSpeed's wrappers call one at construction)."""
        self._next = (int(step), float(lr_multiplier), float(momentum), grad_scale)
        self.param_groups[0]["lr"] = float(lr_multiplier)  # what DeepSpeed's engine reports as the lr

    def _prepare(self, local: list[torch.Tensor] | None = None):
        """(plan, state): the layout of what this rank holds and its packed fp32 state (created zero on first
        use). local: the tensors DeepSpeed hands us, when the param group does not hold them right now (ZeRO-3
        empties it between steps; global_grad_norm runs before DeepSpeed's step)."""
        local = list(self.param_groups[0]["params"]) if local is None else list(local)
        plan = self._plan
        if plan is None or len(plan.local) != len(local) or any(a is not b for a, b in zip(plan.local, local)):
            plan = self._plan = build_plan(self.grid, self._names, self._params, self._kinds, local)
        state = self.state[plan.local[0]]
        if not state:
            device = plan.local[0].device
            state["momentum_buffer"] = torch.zeros(plan.matrix_numel, dtype=torch.float32, device=device)
            state["exp_avg"] = torch.zeros(plan.adam_numel, dtype=torch.float32, device=device)
            state["exp_avg_sq"] = torch.zeros(plan.adam_numel, dtype=torch.float32, device=device)
        return plan, state

    def _orthogonalize(self, plan: ExchangePlan, us: list[torch.Tensor]):
        """us: fp32 1-D, the momentum-updated gradient of each of this rank's Muon pieces (plan.matrix_pieces) ->
        [(piece, update, scale)]: the Newton-Schulz update of each piece (1-D, or the whole matrix's shape when the
        piece holds it whole), computed on whole matrices by their owners, to apply as w -= lr * scale * update
        (as nanochat's `p.add_(g, alpha=-lr * scale)`)."""
        here = self._held_whole(plan)
        if here:
            index = {id(piece): i for i, piece in enumerate(plan.matrix_pieces)}
            whole = {j: us[index[id(piece)]].view(plan.matrices[j].full_shape) for j, piece in here.items()}
        else:
            packed = torch.cat(us) if us else torch.zeros(0, device=plan.local[0].device)
            whole = plan.gather_owned(packed)
        by_shape: dict[tuple, list[int]] = {}
        for j, matrix in whole.items():
            by_shape.setdefault(tuple(matrix.shape), []).append(j)
        applied, updates = [], {}
        for shape, js in by_shape.items():
            # stacked straight in the compute dtype (one pass per matrix): newton_schulz's first cast is then a no-op
            stack = torch.empty((len(js), *shape), dtype=self.ns_dtype, device=whole[js[0]].device)
            for i, j in enumerate(js):
                stack[i].copy_(whole[j])
            out = newton_schulz(stack, steps=self.param_groups[0]["ns_steps"], compute_dtype=self.ns_dtype,
                                compiled=self.compile_newton_schulz)
            scale = max(1.0, shape[0] / shape[1]) ** 0.5
            for j, o in zip(js, out):
                if here:  # applied from the compute dtype: float(o) is exact, and scale joins lr as in nanochat
                    applied.append((here[j], o, scale))
                else:
                    updates[j] = o.float().mul_(scale)
        if not here:
            update = plan.scatter_updates(updates, packed)
            applied = [(piece, piece.of_packed(update), 1.0) for piece in plan.matrix_pieces]
        return applied

    def _held_whole(self, plan: ExchangePlan) -> dict | None:
        """{matrix index: the piece holding it whole} when this rank is its stage's only rank and holds every
        matrix in one run (one process; the exchange would only copy them), else None."""
        if len(plan.to_owner) != 1 or len(plan.owned) != len(plan.matrices):
            return None
        runs = {self._names[piece.param_index]: piece for piece in plan.matrix_pieces}
        here = {j: runs.get(plan.matrices[j].name) for j in plan.owned}
        if any(piece is None or piece.length != math.prod(plan.matrices[j].full_shape) for j, piece in here.items()):
            return None
        return here

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("HybridOptimizer.step takes no closure")
        t0 = time.perf_counter()
        group = self.param_groups[0]
        plan, state = self._prepare()
        if self._next is None:  # not a training step: DeepSpeed's wrappers call one at construction for the state
            return
        (it, lrm, mom, coef), self._next = self._next, None
        self.skipped = coef is not None and not math.isfinite(float(coef))
        if self.skipped:  # a non-finite loss or gradient: no weight or state moves
            self.last_step_seconds = time.perf_counter() - t0
            return
        flat = [t.view(-1) for t in plan.local]
        grads = _grads(plan.local)
        device = flat[0].device

        # 1. AdamW (elementwise: the pieces this rank holds are all it needs). In place, as torch's clipping and
        # nanochat's Muon: the gradient is scaled in its own buffer, which then holds the denominator; an fp32
        # weight is updated in place (the same ops as out of place, bitwise; on a CPU each fresh buffer costs page
        # faults on the order of the math)
        beta1, beta2 = group["betas"]
        t = it + 1
        bias1, bias2_sqrt = 1 - beta1 ** t, (1 - beta2 ** t) ** 0.5
        for piece in plan.adam_pieces:
            g = _scaled_fp32(piece.of_local(grads), coef)
            exp_avg, exp_avg_sq = piece.of_packed(state["exp_avg"]), piece.of_packed(state["exp_avg_sq"])
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            lr = group[f"{piece.kind}_lr"] * lrm
            denom = torch.sqrt(exp_avg_sq, out=g).div_(bias2_sqrt).add_(group["eps"])
            _add_into(piece.of_local(flat), lambda w: w.addcdiv_(exp_avg, denom, value=-lr / bias1))

        # 2. Muon: elementwise Nesterov momentum, then whole-matrix Newton-Schulz at each matrix's owner
        if plan.matrices:
            buf = state["momentum_buffer"]
            us = []
            for piece in plan.matrix_pieces:  # u = g.lerp(buf, m) in the gradient's buffer, as nanochat's Muon
                g, b = _scaled_fp32(piece.of_local(grads), coef), piece.of_packed(buf)
                b.lerp_(g, 1 - mom)
                us.append(g.lerp_(b, mom))
            lr = group["matrix_lr"] * lrm
            for piece, update, scale in self._orthogonalize(plan, us):
                _add_into(piece.of_local(flat).view(update.shape), lambda w: w.add_(update, alpha=-lr * scale))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.last_step_seconds = time.perf_counter() - t0

    def load_state_dict(self, state_dict):
        """torch casts loaded state to each parameter's dtype; ours stays fp32 whatever the weights' dtype."""
        super().load_state_dict(state_dict)
        group = self.param_groups[0]
        saved = state_dict["state"].get(state_dict["param_groups"][0]["params"][0], {})
        p0 = group["params"][0]
        for key, value in saved.items():
            if torch.is_tensor(value):
                self.state[p0][key] = value.to(device=p0.device, dtype=torch.float32).clone()
        self._plan = None


def global_grad_norm(engine_or_optimizer) -> torch.Tensor:
    """The norm of the whole model's gradient (fp32, 0-d, the same on every rank): every element of the unsharded
    model counted once, whatever tp / pp / dp / ZeRO stage, summed over the world; torch.nn.utils.clip_grad_norm_'s
    on the one-process model. Call it after the last backward of a step and before the optimizer step: DeepSpeed
    has reduced the gradients over dp by then and hands them to the optimizer in its step."""
    opt, wrapper = _wrapped(engine_or_optimizer)
    if wrapper is None:  # DeepSpeed hands the optimizer the parameters themselves, gradients in their .grad
        plan, _ = opt._prepare()
        grads = _grads(plan.local)
    else:
        local, grads = reduced_gradients(wrapper)
        plan, _ = opt._prepare(local)
        grads = [g.view(-1) for g in grads]
    sq = torch.zeros((), dtype=torch.float32, device=plan.local[0].device)
    for piece in plan.pieces:
        if piece.in_grad_norm:
            sq += piece.of_local(grads).float().pow(2).sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    return sq.sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor | None:
    """The factor that clips a gradient of global norm `norm` to max_norm (torch.nn.utils.clip_grad_norm_'s:
    max_norm / (norm + 1e-6), at most 1; None when max_norm is 0, no clipping), for HybridOptimizer.set_schedule.
    NaN when the norm is not finite, which the step skips on."""
    if not math.isfinite(float(norm)):
        return torch.full_like(norm, math.nan)
    return (max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm > 0 else None


def _grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradient of each tensor, 1-D (zeros where it has none)."""
    return [t.grad.view(-1) if t.grad is not None else torch.zeros_like(t).view(-1) for t in tensors]


def _scaled_fp32(g: torch.Tensor, coef: torch.Tensor | None) -> torch.Tensor:
    """The gradient g x the clipping coefficient, fp32, in g's own buffer (a copy only when g is not fp32)."""
    g = g if g.dtype == torch.float32 else g.float()
    return g if coef is None else g.mul_(coef)


def _add_into(w: torch.Tensor, update) -> None:
    """update(w) on an fp32 weight in place; a lower-precision weight is updated in fp32 and rounded once."""
    if w.dtype == torch.float32:
        update(w)
    else:
        w.copy_(update(w.float()))


def _wrapped(obj) -> tuple[HybridOptimizer, object | None]:
    """(our optimizer, the DeepSpeed wrapper around it or None) from an engine, a DeepSpeed wrapper or ours."""
    chain = [obj]
    for _ in range(3):  # engine -> ZeRO / BF16 wrapper -> ours
        if isinstance(chain[-1], HybridOptimizer):
            break
        chain.append(getattr(chain[-1], "optimizer", None))
    opt = chain[-1]
    if not isinstance(opt, HybridOptimizer):
        raise ValueError(f"{type(obj).__name__} does not wrap a megachat.optim.HybridOptimizer")
    outer = chain[-2] if len(chain) > 1 else None
    return opt, None if isinstance(outer, torch.nn.Module) else outer  # an engine is not a wrapper


def _unwrap(obj) -> tuple[HybridOptimizer, list[torch.Tensor] | None]:
    """(our optimizer, the tensors its wrapper hands it) from an engine, a DeepSpeed wrapper or ours."""
    opt, wrapper = _wrapped(obj)
    if not opt.param_groups[0]["params"] and wrapper is not None:  # ZeRO-3 empties the group between steps
        return opt, zero3_master_flats(wrapper)
    return opt, None


def full_optimizer_state(engine_or_optimizer) -> dict:
    """This pipeline stage's optimizer state, independent of tp / dp / ZeRO (collective over the grid):
    {"params": {name: {key: fp32 CPU tensor of the unsharded parameter's shape}}}; keys are
    momentum_buffer (Muon) or exp_avg / exp_avg_sq (AdamW). For saving under one layout and resuming under
    another with load_full_optimizer_state."""
    opt, local = _unwrap(engine_or_optimizer)
    plan, state = opt._prepare(local)
    params = {name: {key: unshard_state(plan, i, state[key]) for key in _STATE_KEYS[kind]}
              for i, (name, kind) in enumerate(zip(opt._names, opt._kinds))}
    return {"params": params}


def load_full_optimizer_state(engine_or_optimizer, full: dict) -> None:
    """Load full_optimizer_state's output into this rank's pieces, whatever this layout is; call it after
    deepspeed.initialize (and any checkpoint load) and before the next step. A tensor whose unsharded
    shape differs (the vocab padded for another tp) is cropped / zero-padded to this layout's shape."""
    opt, local = _unwrap(engine_or_optimizer)
    plan, state = opt._prepare(local)
    for i, (name, kind) in enumerate(zip(opt._names, opt._kinds)):
        if name not in full["params"]:
            raise ValueError(f"optimizer state has no entry for parameter {name!r}: it was saved from a "
                             f"different model (it holds {sorted(full['params'])[:3]}...)")
        for key in _STATE_KEYS[kind]:
            shard_state_into(plan, i, full["params"][name][key], state[key])


@dataclass(frozen=True)
class HeldRun:
    """Elements [start, start + length) of one parameter's flattened tp shard (shape shard_shape, tp rank tp_rank,
    split along partition_dim or None) that this rank holds, as 1-D views: tensors["weight"] (the fp32 master copy
    where DeepSpeed keeps one, ZeRO >= 1 and bf16; else the parameter) and the optimizer state of its kind
    ("momentum_buffer" for Muon; "exp_avg", "exp_avg_sq" for AdamW)."""
    name: str
    shard_shape: tuple[int, ...]
    partition_dim: int | None
    tp_rank: int
    start: int
    tensors: dict[str, torch.Tensor]


def held_state(engine_or_optimizer, *, once: bool) -> list[HeldRun]:
    """This rank's runs: the training state by slices, for megachat.sharded.
    once=True keeps only this rank's share of what several ranks hold alike (zero_partitions.written_share), so
    that over the grid every element appears once (to write); once=False keeps all it holds (to load into: writing
    into the views sets the weights DeepSpeed steps from and the optimizer state). Call after
    deepspeed.initialize."""
    opt, local = _unwrap(engine_or_optimizer)
    plan, state = opt._prepare(local)
    flats = [t.view(-1) for t in plan.local]
    runs = []
    for piece in plan.pieces:
        lo, length = written_share(plan, piece) if once else (0, piece.length)
        if length == 0:
            continue
        views = {"weight": piece.of_local(flats),
                 **{key: piece.of_packed(state[key]) for key in _STATE_KEYS[piece.kind]}}
        i = piece.param_index
        runs.append(HeldRun(opt._names[i], plan.shard_shapes[i], plan.partition_dims[i], plan.grid.tp_rank,
                            piece.param_offset + lo, {k: v[lo:lo + length] for k, v in views.items()}))
    return runs


def hybrid_optimizer(engine_or_optimizer) -> HybridOptimizer:
    """The HybridOptimizer inside a DeepSpeed engine or wrapper (or the optimizer itself)."""
    return _unwrap(engine_or_optimizer)[0]


def optimizer_stats(optimizer) -> dict:
    """Numbers of this rank's last optimizer step for the benchmark: step_seconds, bytes_sent (this rank,
    both all_to_alls), bytes_min (the scheme's minimum total volume / ranks of the stage), skipped (a non-finite
    gradient scale: the step changed nothing).
    Accepts the HybridOptimizer or a DeepSpeed engine / wrapper around it."""
    opt, _ = _unwrap(optimizer)
    if opt._plan is None:
        raise ValueError("optimizer_stats: no optimizer step taken yet; call it after engine.step()")
    return dict(step_seconds=opt.last_step_seconds, bytes_sent=opt._plan.bytes_sent,
                bytes_min=opt._plan.bytes_min, skipped=opt.skipped)
