"""The pipeline classes users hold: DualPipe, DualPipeV, OneFOneB, ZB1P (one step = one batch).

Each class only says which schedule it runs and how many stage modules a rank holds; ``step``
(shared) cuts the batch into micro-batches, agrees with the other ranks that the call is valid,
runs the ``Executor`` and returns ``(loss, outputs)`` on the rank(s) that compute the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dualpipe.comm import P2P, PeerAbort
from dualpipe.executor import Executor, StepData, transfer_plan, transfer_rounds
from dualpipe.schedules import (
    Schedule,
    dualpipe_schedule,
    dualpipev_schedule,
    one_f_one_b_schedule,
    zb1p_schedule,
)
from dualpipe.simulator import TimelineEvent
from dualpipe.weight_grad import WeightGradStore

_ERROR_TYPES = {"ValueError": ValueError, "TypeError": TypeError}


class Pipeline(nn.Module):
    """Common machinery; use a subclass. ``modules[slot]`` are this rank's stage modules.

    ``process_group`` (default: the world) holds the pipeline's ranks; ``rank_mapping[g]`` is the
    pipeline rank of group rank ``g`` (default: the identity). ``batch_dim`` is the dimension
    along which inputs and labels are cut into micro-batches (``torch.tensor_split``, so the last
    micro-batches may be smaller when the batch does not split evenly).

    After a step: ``hook_calls`` lists the (F stage, F chunk, B stage, B chunk) of every
    ``overlapped_forward_backward`` call on this rank; with ``record_timeline = True``,
    ``timeline`` holds this rank's measured actions (see ``gather_timeline``); with
    ``record_p2p = True``, ``p2p_groups`` lists the step's posted P2P groups, each a list of
    ``(op, peer pipeline rank, bytes)`` (what the NCCL model test checks).
    """

    num_slots = 1
    schedule_fn: Callable[[int, int], Schedule] = staticmethod(one_f_one_b_schedule)

    def __init__(self, modules: nn.Module | Sequence[nn.Module], batch_dim: int = 0,
                 process_group: dist.ProcessGroup | None = None, rank_mapping: Sequence[int] | None = None):
        super().__init__()
        mods = [modules] if isinstance(modules, nn.Module) else list(modules)
        if len(mods) != self.num_slots or not all(isinstance(m, nn.Module) for m in mods):
            raise TypeError(f"{type(self).__name__} needs {self.num_slots} nn.Module stage(s) per rank, got "
                            f"{[type(m).__name__ for m in mods]}")
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__}: torch.distributed is not initialised (init_process_group first)")
        if not isinstance(batch_dim, int):
            raise TypeError(f"batch_dim must be an int, got {type(batch_dim).__name__}")
        self.module = nn.ModuleList(mods)
        self.batch_dim = batch_dim
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.num_ranks = dist.get_world_size(self.group)
        group_rank = dist.get_rank(self.group)
        mapping = list(range(self.num_ranks)) if rank_mapping is None else [int(r) for r in rank_mapping]
        if sorted(mapping) != list(range(self.num_ranks)):
            raise ValueError(f"rank_mapping must be a permutation of range({self.num_ranks}), got {mapping}")
        self.rank = mapping[group_rank]
        inverse = {p: g for g, p in enumerate(mapping)}
        self.peers = [dist.get_global_rank(self.group, inverse[p]) if self.group is not dist.group.WORLD else inverse[p]
                      for p in range(self.num_ranks)]
        param = next(self.module.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.overlap = True  # call overlapped_forward_backward when the stage class defines it
        self.record_timeline = False
        self.timeline: list[TimelineEvent] = []
        self.hook_calls: list[tuple[int, int, int, int]] = []
        self.record_p2p = False
        self.p2p_groups: list[list[tuple[str, int, int]]] = []
        self._p2p_cache: dict = {}  # transfer shapes of the last step (see dualpipe.comm.P2P)
        self._plans: dict[tuple[int, bool], tuple] = {}  # (num_chunks, training) -> transfer_plan

    def schedule(self, num_chunks: int) -> Schedule:
        """The schedule this pipeline runs for ``num_chunks`` micro-batches."""
        return _cached_schedule(type(self).schedule_fn, self.num_ranks, num_chunks)

    # ------------------------------------------------------------------ step
    def step(self, *inputs: torch.Tensor | None, num_chunks: int, criterion: Callable[..., torch.Tensor] | None = None,
             labels: Sequence[torch.Tensor] = (), return_outputs: bool = False):
        """Runs one batch through the pipeline; forward only when grad is disabled.

        ``inputs``: the batch, on the rank(s) that feed stage 0 (others pass nothing or None).
        ``labels`` and ``criterion``: on the rank(s) that compute the loss; the loss of a micro-batch
        is ``criterion(*outputs, *labels)`` and gradients are the SUM over micro-batch losses.
        Returns ``(loss, outputs)``: on a loss rank the per-micro-batch losses stacked (None
        without criterion) and, with ``return_outputs``, the last stage's outputs concatenated
        along ``batch_dim``; ``(None, None)`` elsewhere. Bad arguments on any rank raise on
        every rank (ValueError/TypeError naming the rank and argument).
        """
        training = torch.is_grad_enabled()
        error: BaseException | None = None
        data = sched = None
        try:
            sched = self.schedule(num_chunks)
            data = self._prepare(sched, inputs, labels, criterion, training, return_outputs)
        except (ValueError, TypeError) as e:
            error = e
        self._agree_on_start(error, num_chunks if isinstance(num_chunks, int) else -1, training)
        assert sched is not None and data is not None
        plan_key = (sched.num_chunks, training)
        if plan_key not in self._plans:
            self._plans[plan_key] = (*transfer_plan(sched, self.rank, training),
                                     transfer_rounds(sched, self.rank, training))
        incoming, outgoing, plan = self._plans[plan_key]
        groups: list | None = [] if self.record_p2p else None
        p2p = P2P(self.group, self.peers, self.device, sched.num_chunks, incoming, outgoing, plan,
                  self._p2p_cache, groups)
        ex = Executor(sched, self.rank, list(self.module), p2p, data, overlap=self.overlap,
                      record=self.record_timeline, post_before=plan.post_before)
        try:
            ex.run()
        except Exception as e:
            error = e
        finally:
            WeightGradStore.clear()
        self._agree_on_end(error)
        self.hook_calls = ex.hook_calls
        self.timeline = ex.events
        self.p2p_groups = groups or []
        return self._results(sched, data)

    def _prepare(self, sched: Schedule, inputs: tuple, labels: Sequence[torch.Tensor], criterion: Callable | None,
                 training: bool, return_outputs: bool) -> StepData:
        r = self.rank
        data = StepData(criterion=criterion, training=training, return_outputs=bool(return_outputs))
        inputs = tuple(x for x in inputs if x is not None)
        dirs = range(len(sched.routes))
        in_dirs = [d for d in dirs if sched.input_rank(d) == r]
        loss_dirs = [d for d in dirs if sched.loss_rank(d) == r]
        if not in_dirs and inputs:
            raise ValueError(f"pipeline rank {r} does not run stage 0: call step(num_chunks=...) without inputs "
                             f"(inputs go to pipeline rank(s) {sorted({sched.input_rank(d) for d in dirs})})")
        for d in in_dirs:
            if not inputs:
                raise ValueError(f"pipeline rank {r} runs stage 0: step needs the batch as inputs")
            data.inputs.update(self._split(inputs, sched.chunks_of_direction(d), "inputs"))
        for d in loss_dirs:
            if criterion is None and training:
                raise ValueError(f"criterion is required on pipeline rank {r}, which computes the loss "
                                 f"(grad is enabled, so the step runs the backward from that loss)")
            if criterion is not None and not callable(criterion):
                raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")
            if criterion is not None and labels:
                data.labels.update(self._split(tuple(labels), sched.chunks_of_direction(d), "labels"))
        return data

    def _split(self, tensors: tuple, chunks: list[int], what: str) -> dict[int, tuple[torch.Tensor, ...]]:
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{what}[{i}] must be a Tensor, got {type(t).__name__}")
            if t.dim() <= self.batch_dim or t.shape[self.batch_dim] < len(chunks):
                raise ValueError(f"{what}[{i}] of shape {tuple(t.shape)} cannot be cut into {len(chunks)} micro-batches "
                                 f"along batch_dim={self.batch_dim}")
        parts = [torch.tensor_split(t, len(chunks), dim=self.batch_dim) for t in tensors]
        return {c: tuple(p[i] for p in parts) for i, c in enumerate(chunks)}

    def _agree_on_start(self, error: BaseException | None, num_chunks: int, training: bool) -> None:
        """One all_reduce: raises on every rank if any rank's arguments were bad or differ."""
        flags = torch.tensor([int(error is not None), num_chunks, -num_chunks, int(training), -int(training)],
                             dtype=torch.int64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        f = flags.tolist()
        if f[0] == 0 and f[1] == -f[2] and f[3] == -f[4]:
            return
        msgs = self._gather_errors(error)
        if error is not None:
            raise error
        if msgs:
            r, kind, text = msgs[0]
            raise _ERROR_TYPES.get(kind, RuntimeError)(f"pipeline rank {r}: {text}")
        raise ValueError("every pipeline rank must call step with the same num_chunks and the same grad mode "
                         f"(num_chunks from {-f[2]} to {f[1]}, grad enabled on some ranks only: {f[3] != -f[4]})")

    def _agree_on_end(self, error: BaseException | None) -> None:
        flag = torch.tensor([int(error is not None)], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if flag.item() == 0:
            return
        self._p2p_cache.clear()  # a failed step may leave sender and receiver caches different
        msgs = self._gather_errors(error)
        root = [m for m in msgs if m[1] != "PeerAbort"] or msgs
        if error is not None and not isinstance(error, PeerAbort):
            raise error
        r, kind, text = root[0]
        raise RuntimeError(f"pipeline rank {r} failed during the step: {kind}: {text}")

    def _gather_errors(self, error: BaseException | None) -> list[tuple[int, str, str]]:
        mine = None if error is None else (self.rank, type(error).__name__, str(error))
        out: list = [None] * self.num_ranks
        dist.all_gather_object(out, mine, group=self.group)
        return [m for m in out if m is not None]

    def _results(self, sched: Schedule, data: StepData):
        loss_dirs = [d for d in range(len(sched.routes)) if sched.loss_rank(d) == self.rank]
        if not loss_dirs:
            return None, None
        chunks = [c for d in loss_dirs for c in sched.chunks_of_direction(d)]
        loss = torch.stack([data.losses[c] for c in chunks]) if data.losses else None
        outputs = None
        if data.return_outputs:
            per_chunk = [data.outputs[c] for c in chunks]
            outputs = tuple(torch.cat([o[i] for o in per_chunk], dim=self.batch_dim) for i in range(len(per_chunk[0])))
            if len(outputs) == 1:
                outputs = outputs[0]
        return loss, outputs

    # ------------------------------------------------------------------ timeline
    def gather_timeline(self) -> list[list[TimelineEvent]]:
        """Every rank's measured actions of the last step (``record_timeline = True``), on every
        rank (a collective), as seconds from the earliest start. Clocks of one host agree; across
        hosts they are as synchronised as the hosts' clocks."""
        out: list = [None] * self.num_ranks
        dist.all_gather_object(out, self.timeline, group=self.group)
        t0 = min((e.start for evs in out for e in evs), default=0.0)
        return [[TimelineEvent(e.rank, e.label, e.kind, e.start - t0, e.end - t0) for e in evs] for evs in out]


@functools.lru_cache(maxsize=64)
def _cached_schedule(fn: Callable[[int, int], Schedule], num_ranks: int, num_chunks: int) -> Schedule:
    return fn(num_ranks, num_chunks)


class DualPipeV(Pipeline):
    """DualPipeV ("cut-in-half" DualPipe) over N ranks: rank r holds ``modules = (stage r, stage
    2N-1-r)``. Inputs, labels and criterion go to rank 0, which gets the loss (per micro-batch,
    stacked); other ranks call ``step(num_chunks=...)`` and get ``(None, None)``. Needs
    ``num_chunks >= 2 * N``.

    The overlap hook, the same contract as ``DualPipe``: if both stage modules are of one class
    that defines ``overlapped_forward_backward``, each F&B pair of the schedule calls it (see
    ``DualPipe`` for the exact contract).
    """

    num_slots = 2
    schedule_fn = staticmethod(dualpipev_schedule)


class DualPipe(Pipeline):
    """DualPipe (bidirectional) over PP ranks (even): rank r holds ``modules = (stage r, stage PP-1-r)``.

    Half of the micro-batches enter on rank 0 (its ``inputs``), run stages 0..PP-1 over ranks
    0..PP-1 in slot 0 and their loss is computed on rank PP-1; the other half enter on rank PP-1
    and run the same stages over ranks PP-1..0 in slot 1, loss on rank 0. So, as in DeepSeek's
    DualPipe, rank 0's ``labels`` belong to rank PP-1's inputs and the reverse; both end ranks
    pass ``criterion``; each gets the losses of the micro-batches whose loss it computed. Rank r
    and rank PP-1-r hold the same stages: call ``sum_mirror_grads(pipe)`` after ``step`` and
    before the optimizer (then apply the same update on both). Needs ``num_chunks`` even and
    ``>= 2 * PP``.

    **The overlap hook.** If both stage modules of a rank are instances of one class that
    defines ``overlapped_forward_backward`` (a static- or classmethod), every F&B pair of the
    schedule calls::

        outputs0, loss0 = cls.overlapped_forward_backward(
            module0, inputs0, criterion0, labels0,       # the forward half
            module1, loss1, outputs1, output_grads1)     # the backward half

    - ``module0(*inputs0)`` is the forward to run (``inputs0`` a list of tensors). If
      ``criterion0`` is not None, module0 is the last stage: compute and return
      ``loss0 = criterion0(*outputs0, *labels0)``; otherwise return ``loss0 = None``.
      ``outputs0``: a Tensor or a tuple of Tensors, exactly what ``module0`` returns.
    - The backward half: if ``loss1`` is not None, run ``loss1.backward()``; otherwise run
      ``dualpipe.run_backward(outputs1, output_grads1)`` (lists; the outputs' storage may already
      be freed, which ``run_backward`` handles and ``torch.autograd.backward`` does not). Do not
      split it into B and W: the executor does not run W for these pairs.
    - Interleave the two as you like (e.g. run the forward's attention while the backward's
      combine all-to-all is in flight); both must be complete on return. The executor sends
      outputs0 and the input gradients of module1 afterwards.
    """

    num_slots = 2
    schedule_fn = staticmethod(dualpipe_schedule)


class OneFOneB(Pipeline):
    """1F1B over P ranks, one stage per rank (``modules``: one module, stage = rank). Inputs on
    rank 0; criterion and labels on rank P-1, which gets the loss; others get (None, None)."""

    num_slots = 1
    schedule_fn = staticmethod(one_f_one_b_schedule)


class ZB1P(Pipeline):
    """ZB1P (ZB-H1): 1F1B with backwards split into B (input gradient) and W (weight gradient,
    deferred). Same placement and arguments as ``OneFOneB``; layers that support the split
    (``WeightGradLinear``) defer their weight gradients, others compute them during B."""

    num_slots = 1
    schedule_fn = staticmethod(zb1p_schedule)


def sum_mirror_grads(pipe: DualPipe) -> None:
    """Adds the gradients of DualPipe's mirror rank (PP-1-r holds the same stages, swapped) to
    this rank's, so that both hold the full gradient of their two stages (bit-identical on both).
    Call it on every rank after ``step``. Parameters without a gradient count as zero.

    A parameter shared by this rank's two stage modules (e.g. the embedding tied between stage 0
    and an MTP head on the last stage) holds ONE gradient, already the sum of both uses here, so
    it is exchanged and added once. Both mirrors list the parameters in stage order (the lower
    stage's module first), each once, and check that their lists have the same sizes.
    """
    if not isinstance(pipe, DualPipe):
        raise TypeError(f"sum_mirror_grads needs a DualPipe, got {type(pipe).__name__}")
    m0, m1 = pipe.module
    lower_first = pipe.rank < pipe.num_ranks // 2  # m0 holds stage r, m1 stage PP-1-r
    params = _unique_params((m0, m1) if lower_first else (m1, m0))
    mirror = pipe.peers[pipe.num_ranks - 1 - pipe.rank]
    sizes = torch.tensor([len(params), sum(p.numel() for p in params)], dtype=torch.int64, device=pipe.device)
    their_sizes = torch.empty_like(sizes)
    _exchange(sizes, their_sizes, mirror, pipe.group)
    if not torch.equal(sizes, their_sizes):
        raise RuntimeError(f"sum_mirror_grads: pipeline rank {pipe.rank} holds {sizes.tolist()} (parameters, "
                           f"elements) of its two stages, its mirror {pipe.num_ranks - 1 - pipe.rank} holds "
                           f"{their_sizes.tolist()}: the mirrors must hold the same stages (and the same ties)")
    if not params:
        return
    mine = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                      for p in params])
    theirs = torch.empty_like(mine)
    _exchange(mine, theirs, mirror, pipe.group)
    total = mine + theirs  # float64, and the same sum on both mirrors
    i = 0
    for p in params:
        g = total[i : i + p.numel()].view_as(p).to(p.dtype)
        i += p.numel()
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def _unique_params(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    """Parameters of ``modules`` in order, each once (a shared one where it first appears)."""
    seen: set[int] = set()
    out = []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _exchange(send: torch.Tensor, recv: torch.Tensor, peer: int, group: dist.ProcessGroup) -> None:
    """Swaps two same-sized tensors with ``peer`` (global rank), as one batch: NCCL needs the send
    and the receive grouped, since each alone would wait for the other."""
    ops = [dist.P2POp(dist.irecv, recv, peer, group), dist.P2POp(dist.isend, send, peer, group)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
