"""Which elements of which whole matrix this rank holds under DeepSpeed's ZeRO / bf16 flat partitions, and the
exchange plan that brings each Muon matrix to its owner and each piece of its update back.

DeepSpeed hands the optimizer (its "basic optimizer") one of three layouts; `build_plan` reads which at the
first step (deepspeed_internals.partition_layout):
- the parameters themselves (fp32 ZeRO-0, replicated over dp), or DeepSpeed's fp32 copies of them (bf16 ZeRO-0
  with bf16 accumulation: FP16_UnfusedOptimizer);
- one flat fp32 partition (BF16_Optimizer, ZeRO-1/2): the model's weights are views into one flat buffer of
  dp * P elements, so a weight's storage offset is its place in the flat, and dp rank d holds [d*P, (d+1)*P);
- ZeRO-3: the concatenation of every weight's own partition: dp rank d holds elements [d*ps, (d+1)*ps) of each
  weight (ps = ceil(numel / dp)).
What a rank holds is a list of `Piece`s; the optimizer keeps its state packed, one buffer per kind of update
(Muon's, AdamW's), holding exactly those elements.

Every matrix of a pipeline stage gets one owner among the stage's tp*dp ranks (`Grid.stage_group`), greedy by
Newton-Schulz cost so that no rank does them all. `ExchangePlan.gather_owned` sends each element of the packed
momentum-updated gradient to its matrix's owner (one all_to_all), which concatenates the tp shards (along
`partition_dim`, in tp-rank order) into the whole matrix; `ExchangePlan.scatter_updates` returns to every rank exactly
the elements it holds (a second all_to_all). Each element reaches its owner once and each holder receives its
part of the update once: the minimum for this scheme (`ExchangePlan.bytes_min`).

`unshard_state` / `shard_state_into` move one parameter's packed state to and from its unsharded tensor, so
that optimizer state saved under one tp / dp / ZeRO layout resumes under another; `written_share` says which part
of what a rank holds it writes to a sharded checkpoint (megachat.sharded), so that replicas are written once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megachat.deepspeed_internals import partition_layout
from megachat.parallel import Grid

ELEMENT_BYTES = 4  # the gradients and updates exchanged travel in fp32


@dataclass(frozen=True)
class Piece:
    """A run of elements this rank holds of one parameter, and where the optimizer keeps its state."""
    param_index: int  # which parameter, in the optimizer's order
    param_offset: int  # where the run starts in that parameter (its flattened tp shard)
    tensor_index: int  # which of the tensors DeepSpeed handed the optimizer holds the run
    offset: int  # where the run starts in that tensor (flattened)
    length: int
    packed_offset: int  # where the run starts in the packed state buffer of its kind (Muon's or AdamW's)
    kind: str  # the parameter's kind: "matrix" (Muon), "embedding" or "lm_head" (AdamW)
    in_grad_norm: bool  # counted in the global gradient norm on this rank (what ranks hold alike counts once)

    def of_local(self, flats: list[torch.Tensor]) -> torch.Tensor:
        """The run, a view into the flattened tensors DeepSpeed handed the optimizer (or their gradients)."""
        return flats[self.tensor_index][self.offset:self.offset + self.length]

    def of_packed(self, packed: torch.Tensor) -> torch.Tensor:
        """The run, a view into a packed buffer of its kind."""
        return packed[self.packed_offset:self.packed_offset + self.length]

    def of_param(self, flat: torch.Tensor) -> torch.Tensor:
        """The run, a view into the flattened tp shard of its parameter."""
        return flat[self.param_offset:self.param_offset + self.length]


@dataclass(frozen=True)
class Span:
    """Elements [start, start + length) of a flattened tp shard."""
    start: int
    length: int


@dataclass(frozen=True)
class ShardSpan:
    """What an owner receives from one rank: elements [start, start + length) of tp shard `tp_shard` of the
    stage's matrix number `matrix_index`."""
    matrix_index: int
    tp_shard: int
    start: int
    length: int


@dataclass
class Matrix:
    """One Muon matrix of this pipeline stage, as every rank of the stage sees it."""
    name: str
    shard_shape: tuple[int, int]
    partition_dim: int | None  # None: whole on every tp rank (tp == 1, or tensor_model_parallel=False)
    full_shape: tuple[int, int]
    owner: int = 0  # the stage rank that orthogonalizes it
    held: list[list[Span]] = field(default_factory=list)  # per stage rank: the spans of its tp shard it holds

    @property
    def shard_numel(self) -> int:
        return self.shard_shape[0] * self.shard_shape[1]


@dataclass
class ExchangePlan:
    """What this rank holds under the layout DeepSpeed chose, and the exchange that brings matrices to owners."""
    grid: Grid
    local: list[torch.Tensor]  # the tensors DeepSpeed handed the optimizer (the parameters, or one flat partition)
    pieces: list[Piece]  # every run this rank holds, in parameter order
    matrix_pieces: list[Piece]  # the Muon pieces, in order: their packed offsets cover [0, matrix_numel)
    adam_pieces: list[Piece]  # the AdamW pieces, in order: their packed offsets cover [0, adam_numel)
    matrix_numel: int
    adam_numel: int
    replicated: bool  # every dp rank holds every parameter whole (ZeRO-0)
    shard_shapes: list[tuple[int, ...]]  # per parameter: this rank's tp shard's shape
    partition_dims: list[int | None]  # per parameter: the dim its tp shards are concatenated along, or None
    matrices: list[Matrix]
    owned: list[int]  # indices of the matrices this rank orthogonalizes
    to_owner: list[list[Piece]]  # per stage rank: the pieces of the gradient this rank sends it
    from_holders: list[list[ShardSpan]]  # per stage rank: what it sends this rank of the matrices this rank owns
    from_owner: list[list[Piece]]  # per stage rank: the pieces of the update it sends back to this rank
    bytes_sent: int  # by this rank, both all_to_alls
    bytes_min: int  # the scheme's minimum total volume / ranks of the stage

    def pieces_of(self, param_index: int) -> list[Piece]:
        return [p for p in self.pieces if p.param_index == param_index]

    def _all_to_all(self, sends: list[torch.Tensor], recv_sizes: list[int], like: torch.Tensor) -> torch.Tensor:
        send = torch.cat(sends) if sends else like.new_empty(0)
        if len(sends) == 1:
            return send
        recv = like.new_empty(sum(recv_sizes))
        dist.all_to_all_single(recv, send, recv_sizes, [t.numel() for t in sends], group=self.grid.stage_group)
        return recv

    def gather_owned(self, packed: torch.Tensor) -> dict[int, torch.Tensor]:
        """packed: fp32 (matrix_numel,), this rank's Muon pieces -> {matrix index: the whole matrix, full_shape}
        for the matrices this rank owns, in `owned` order. Collective over the stage."""
        sends = [torch.cat([p.of_packed(packed) for p in pieces]) if pieces else packed.new_empty(0)
                 for pieces in self.to_owner]
        recv_sizes = [sum(s.length for s in spans) for spans in self.from_holders]
        recv = self._all_to_all(sends, recv_sizes, packed)
        shards = {}
        pos = 0
        for spans in self.from_holders:
            for s in spans:
                if (s.matrix_index, s.tp_shard) not in shards:
                    shards[(s.matrix_index, s.tp_shard)] = packed.new_empty(self.matrices[s.matrix_index].shard_numel)
                shards[(s.matrix_index, s.tp_shard)][s.start:s.start + s.length] = recv[pos:pos + s.length]
                pos += s.length
        whole = {}
        for j in self.owned:
            m = self.matrices[j]
            n_shards = self.grid.tp if m.partition_dim is not None else 1
            parts = [shards[(j, t)].view(m.shard_shape) for t in range(n_shards)]
            whole[j] = torch.cat(parts, dim=m.partition_dim) if m.partition_dim is not None else parts[0]
        return whole

    def scatter_updates(self, updates: dict[int, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """updates: {matrix index: whole update} for every matrix this rank owns -> fp32 (matrix_numel,), the
        update of this rank's Muon pieces. Collective over the stage."""
        tp = self.grid.tp
        shard_flats = {}  # (matrix index, tp shard) -> the flattened tp shard of its update
        for j in self.owned:
            m = self.matrices[j]
            shards = updates[j].chunk(tp, dim=m.partition_dim) if m.partition_dim is not None else [updates[j]]
            shard_flats.update(((j, t), s.reshape(-1)) for t, s in enumerate(shards))
        back = []
        for r in range(len(self.from_owner)):
            items = []
            for j in self.owned:
                flat = shard_flats[(j, r % tp if self.matrices[j].partition_dim is not None else 0)]
                items.extend(flat[s.start:s.start + s.length] for s in self.matrices[j].held[r])
            back.append(torch.cat(items) if items else like.new_empty(0))
        back_sizes = [sum(p.length for p in pieces) for pieces in self.from_owner]
        got = self._all_to_all(back, back_sizes, like)
        update = torch.empty_like(like)
        pos = 0
        for pieces in self.from_owner:
            for p in pieces:
                p.of_packed(update)[:] = got[pos:pos + p.length]
                pos += p.length
        return update


def partition_dim(p: torch.Tensor, tp: int) -> int | None:
    """The dim p's tp shards are concatenated along, or None when p is whole on every tp rank."""
    return p.partition_dim if tp > 1 and getattr(p, "tensor_model_parallel", False) else None


def build_plan(grid: Grid, names: list[str], params: list[torch.Tensor], kinds: list[str],
               local: list[torch.Tensor]) -> ExchangePlan:
    """The plan of this rank: `params` (named `names`, of kind "matrix" / "embedding" / "lm_head") are this
    rank's model parameters (tp shards), `local` the tensors DeepSpeed handed the optimizer for them."""
    tp, dp = grid.tp, grid.dp
    stage_size, stage_rank = tp * dp, grid.dp_rank * tp + grid.tp_rank
    layout = partition_layout(names, params, local, dp)
    replicated, shard_shapes, held = layout.kind == "replicated", layout.shard_shapes, layout.held
    if (grid.stage_group is not None and local[0].device.type == "cpu"
            and dist.get_backend(grid.stage_group) == "nccl"):
        raise ValueError("HybridOptimizer: DeepSpeed keeps the optimizer's tensors on the CPU (ZeRO "
                         "offload_optimizer), but Muon exchanges them over NCCL; remove offload_optimizer")

    pieces, matrices = [], []
    packed_numel = {"matrix": 0, "adam": 0}
    for i, (n, p, kind) in enumerate(zip(names, params, kinds)):
        buffer = "matrix" if kind == "matrix" else "adam"
        in_grad_norm = (not replicated or grid.dp_rank == 0) and (
            tp == 1 or getattr(p, "tensor_model_parallel", False) or grid.tp_rank == 0)
        for start, length, offset in held(i, grid.dp_rank):
            pieces.append(Piece(param_index=i, param_offset=start, tensor_index=i if replicated else 0,
                                offset=offset, length=length, packed_offset=packed_numel[buffer], kind=kind,
                                in_grad_norm=in_grad_norm))
            packed_numel[buffer] += length
        if kind == "matrix":
            pdim = partition_dim(p, tp)
            full = list(shard_shapes[i])
            if pdim is not None:
                full[pdim] *= tp
            m = Matrix(n, shard_shapes[i], pdim, tuple(full))
            # same flat offsets on every tp rank: the shards have equal shapes and DeepSpeed flattens alike
            m.held = [[Span(s, l) for s, l, _ in held(i, r // tp)] for r in range(stage_size)]
            matrices.append(m)
    matrix_pieces = [p for p in pieces if p.kind == "matrix"]

    # owners: greedy longest-first; Newton-Schulz costs ~ rows * cols * min(rows, cols)
    load = [0] * stage_size
    order = sorted(range(len(matrices)), key=lambda j: (-math.prod(matrices[j].full_shape)
                                                        * min(matrices[j].full_shape), j))
    for j in order:
        k = min(range(stage_size), key=lambda r: (load[r], r))
        matrices[j].owner = k
        load[k] += math.prod(matrices[j].full_shape) * min(matrices[j].full_shape)

    def provides(m: Matrix, r: int) -> bool:
        # what several ranks hold alike comes from one of them: replicated over dp, the owner's dp slice;
        # a matrix replicated over tp (tensor_model_parallel=False), the owner's tp rank
        return ((not replicated or r // tp == m.owner // tp)
                and (m.partition_dim is not None or r % tp == m.owner % tp))

    to_owner = [[] for _ in range(stage_size)]
    from_holders = [[] for _ in range(stage_size)]
    from_owner = [[] for _ in range(stage_size)]
    mine = iter(matrix_pieces)
    for j, m in enumerate(matrices):
        my_pieces = [next(mine) for _ in m.held[stage_rank]]
        if provides(m, stage_rank):
            to_owner[m.owner].extend(my_pieces)
        from_owner[m.owner].extend(my_pieces)
        if m.owner == stage_rank:
            for r in range(stage_size):
                if provides(m, r):
                    shard = r % tp if m.partition_dim is not None else 0
                    from_holders[r].extend(ShardSpan(j, shard, s.start, s.length) for s in m.held[r])
    owned = [j for j, m in enumerate(matrices) if m.owner == stage_rank]
    sent = sum(p.length for k in range(stage_size) if k != stage_rank for p in to_owner[k])
    sent += sum(s.length for j in owned for r in range(stage_size) if r != stage_rank for s in matrices[j].held[r])
    total_min = 0
    for m in matrices:
        # gradient: what the owner does not hold must reach it; update: what others hold must reach them
        total_min += math.prod(m.full_shape) - sum(s.length for s in m.held[m.owner])
        total_min += sum(s.length for r in range(stage_size) if r != m.owner for s in m.held[r])
    return ExchangePlan(grid=grid, local=local, pieces=pieces, matrix_pieces=matrix_pieces,
                adam_pieces=[p for p in pieces if p.kind != "matrix"], matrix_numel=packed_numel["matrix"],
                adam_numel=packed_numel["adam"], replicated=replicated, shard_shapes=shard_shapes,
                partition_dims=[partition_dim(p, tp) for p in params], matrices=matrices, owned=owned,
                to_owner=to_owner, from_holders=from_holders, from_owner=from_owner,
                bytes_sent=sent * ELEMENT_BYTES, bytes_min=(total_min * ELEMENT_BYTES) // stage_size)


def unshard_state(plan: ExchangePlan, param_index: int, packed: torch.Tensor) -> torch.Tensor:
    """One parameter's state from this rank's packed fp32 buffer of its kind -> an fp32 CPU tensor of the
    unsharded parameter's shape. Collective over the dp and tp groups (every rank, the same parameter)."""
    grid, shape, pdim = plan.grid, plan.shard_shapes[param_index], plan.partition_dims[param_index]
    flat = torch.zeros(math.prod(shape), dtype=torch.float32, device=packed.device)
    for p in plan.pieces_of(param_index):
        p.of_param(flat)[:] = p.of_packed(packed)
    if not plan.replicated and grid.dp > 1:  # the dp ranks hold disjoint pieces
        dist.all_reduce(flat, group=grid.dp_group)
    t = flat.view(shape)
    if pdim is not None:
        parts = [torch.empty_like(t) for _ in range(grid.tp)]
        dist.all_gather(parts, t.contiguous(), group=grid.tp_group)
        t = torch.cat(parts, dim=pdim)
    return t.cpu()


def shard_state_into(plan: ExchangePlan, param_index: int, full: torch.Tensor, packed: torch.Tensor) -> None:
    """Write this rank's elements of one parameter's unsharded state `full` into its packed buffer `packed`.
    A `full` of another unsharded shape (the vocab padded for another tp) is cropped / zero-padded to this one."""
    grid, pdim = plan.grid, plan.partition_dims[param_index]
    want = list(plan.shard_shapes[param_index])
    if pdim is not None:
        want[pdim] *= grid.tp
    t = torch.zeros(want, dtype=torch.float32)
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(want, full.shape))
    t[overlap] = full[overlap].float()
    if pdim is not None:
        t = t.chunk(grid.tp, dim=pdim)[grid.tp_rank]
    flat = t.reshape(-1).to(packed.device)
    for p in plan.pieces_of(param_index):
        p.of_packed(packed)[:] = p.of_param(flat)


def written_share(plan: ExchangePlan, piece: Piece) -> tuple[int, int]:
    """(start within `piece`, length): the part of it this rank writes to a layout-free checkpoint. What several
    ranks hold alike (every dp rank at ZeRO-0; every tp rank for a weight that tp does not split) is split evenly
    among them, so that over the stage each element is written once and the bytes are spread."""
    grid = plan.grid
    tp_alike = grid.tp if plan.partition_dims[piece.param_index] is None else 1
    dp_alike = grid.dp if plan.replicated else 1
    share = (grid.dp_rank if dp_alike > 1 else 0) * tp_alike + (grid.tp_rank if tp_alike > 1 else 0)
    alike = tp_alike * dp_alike
    lo, hi = piece.length * share // alike, piece.length * (share + 1) // alike
    return lo, hi - lo
