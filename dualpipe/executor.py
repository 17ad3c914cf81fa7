"""Runs one rank's action list of a ``Schedule`` over P2P: the engine under every pipeline class.

Per step: ``transfer_plan`` lists, from the schedule alone, what this rank sends (in order) and
what each peer sends it (in that peer's order); ``P2P`` posts receives strictly in those orders
(NCCL's matching rule); ``transfer_rounds`` puts every transfer in a round and gives it a
payload slot, the same on every rank. Before each action the rank posts its rounds (one group
each, see ``dualpipe.comm``) up to the one holding its previous action's sends (so they run while
this action computes) and this action's inputs. The action then waits only for the transfers
it consumes, packs its results for their round, and frees a sent output's storage (the send holds
a packed copy; autograd keeps only the graph).

Errors: a rank that fails sends an abort for every transfer it still owes, drains what it was
going to receive, and re-raises; its peers get the abort instead of data, do the same, and every
rank raises. ``Pipeline.step`` then agrees on the outcome with one small collective, so even a
rank that finished its own actions raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dualpipe.comm import ACT, GRAD, P2P, Key, Round, RoundPlan
from dualpipe.schedules import Action, Schedule
from dualpipe.simulator import TimelineEvent
from dualpipe.weight_grad import WeightGradStore

Tensors = list[torch.Tensor | None]


def run_backward(tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """Backward from ``tensors`` with ``grads`` (pairs with a None grad or no graph are skipped).

    Works on outputs whose storage the executor already freed after sending them (it calls the
    autograd engine directly, which checks no shapes); use it in ``overlapped_forward_backward``.
    """
    if len(tensors) != len(grads):
        raise ValueError(f"run_backward: {len(tensors)} tensors but {len(grads)} gradients")
    pairs = [(t, g) for t, g in zip(tensors, grads, strict=True) if g is not None and t is not None and t.requires_grad]
    if not pairs:
        return
    torch.autograd.Variable._execution_engine.run_backward(
        tuple(t for t, _ in pairs), tuple(g for _, g in pairs), False, False, (), True, True
    )


def as_tensor_list(out: object, what: str) -> list[torch.Tensor]:
    """A stage's output as a list of tensors, or a clear TypeError."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    kind = type(out).__name__ if not isinstance(out, (tuple, list)) else f"{type(out).__name__} of {[type(t).__name__ for t in out]}"
    raise TypeError(f"{what} returned {kind}; a pipeline stage must return a Tensor or a non-empty tuple of Tensors")


def step_actions(schedule: Schedule, rank: int, training: bool) -> list[Action]:
    """The actions ``rank`` runs: all of them when training, else the forward half of each F and
    F&B, in the same order."""
    if training:
        return list(schedule.actions[rank])
    return [Action("F", a.stage, a.chunk) for a in schedule.actions[rank] if a.kind in ("F", "FB")]


def _sends_of(schedule: Schedule, rank: int, training: bool) -> list[tuple[Key, int]]:
    """``rank``'s P2P sends ``(key, destination rank)`` in the order the executor makes them:
    per action, the forward's activations (F and the F half of F&B), then the backward's input
    gradients (B and the B half of F&B). Transfers between two stages on one rank are local."""
    out: list[tuple[Key, int]] = []
    last = schedule.num_stages - 1
    for a in step_actions(schedule, rank, training):
        halves = [] if a.kind == "W" else [("F" if a.kind in ("F", "FB") else "B", a.stage, a.chunk)]
        if a.kind == "FB":
            assert a.bwd is not None
            halves.append(("B", *a.bwd))
        for kind, st, c in halves:
            if kind == "F" and st < last:
                dst = schedule.place(st + 1, c).rank
                if dst != rank:
                    out.append(((ACT, st + 1, c), dst))
            elif kind == "B" and st > 0:
                dst = schedule.place(st - 1, c).rank
                if dst != rank:
                    out.append(((GRAD, st - 1, c), dst))
    return out


def transfer_plan(schedule: Schedule, rank: int, training: bool) -> tuple[dict[int, list[Key]], list[tuple[Key, int]]]:
    """``(incoming, outgoing)`` of ``rank`` for one step: ``incoming[p]`` the transfers rank ``p``
    sends to ``rank`` in ``p``'s send order, ``outgoing`` ``rank``'s own sends in order. Every rank
    derives both from the schedule, so sender and receiver agree without exchanging anything."""
    incoming: dict[int, list[Key]] = {}
    for p in range(schedule.num_ranks):
        if p != rank:
            keys = [k for k, dst in _sends_of(schedule, p, training) if dst == rank]
            if keys:
                incoming[p] = keys
    return incoming, _sends_of(schedule, rank, training)


_UNIT_COST = {"F": 1.0, "B": 2.0, "W": 1.0, "FB": 3.0}


def _unit_clock(schedule: Schedule, training: bool) -> tuple[list[list[Action]], dict[Key, float]]:
    """Every rank's actions and the time each transfer's data is produced when the schedule runs
    with unit costs (F 1, B 2, split B 1, W 1, F&B 3, free transfers): a clock every rank computes
    alike, which orders the rounds."""
    acts = [step_actions(schedule, r, training) for r in range(schedule.num_ranks)]
    last = schedule.num_stages - 1
    produced: dict[Key, float] = {}
    ends: list[list[float]] = [[] for _ in acts]
    free = [0.0] * len(acts)
    moved = True
    while moved:
        moved = False
        for r, actions in enumerate(acts):
            while len(ends[r]) < len(actions):
                a = actions[len(ends[r])]
                ins, outs = _halves(schedule, a, last)
                if any(k not in produced for k in ins):
                    break
                start = max([free[r], *(produced[k] for k in ins)])
                cost = 1.0 if (a.kind == "B" and a.split) else _UNIT_COST[a.kind]
                free[r] = start + cost
                ends[r].append(free[r])
                for k in outs:
                    produced[k] = free[r]
                moved = True
    if any(len(e) < len(a) for e, a in zip(ends, acts, strict=True)):
        raise RuntimeError(f"{schedule.name}: the actions' data dependencies form a cycle")
    return acts, produced


def _rank_rounds(schedule: Schedule, rank: int, training: bool, acts: list[list[Action]],
                 produced: dict[Key, float]) -> tuple[list[Round], list[float], list[int], dict[Key, int]]:
    """``rank``'s rounds (in clock order), their clock times, ``post_before`` and, per transfer it
    receives, the index of the action that consumes it."""
    last = schedule.num_stages - 1
    incoming, outgoing = transfer_plan(schedule, rank, training)
    times = sorted({produced[k] for k, _ in outgoing} | {produced[k] for keys in incoming.values() for k in keys})
    index = {t: i for i, t in enumerate(times)}
    rounds: list[Round] = [([], []) for _ in times]
    for k, dst in outgoing:
        rounds[index[produced[k]]][0].append((k, dst))
    for src in sorted(incoming):
        for k in incoming[src]:
            rounds[index[produced[k]]][1].append((k, src))
    round_of = {k: index[produced[k]] for r in rounds for k, _ in (*r[0], *r[1])}
    post_before, upto = [], 0
    prev_sends: list[Key] = []
    consumer: dict[Key, int] = {}
    for i, a in enumerate(acts[rank]):
        ins, outs = _halves(schedule, a, last)
        due = [round_of[k] + 1 for k in (*prev_sends, *ins) if k in round_of]
        upto = max([upto, *due])
        post_before.append(upto)
        prev_sends = outs
        consumer.update((k, i) for k in ins if k in round_of)
    return rounds, [float(t) for t in times], post_before, consumer


def transfer_rounds(schedule: Schedule, rank: int, training: bool) -> RoundPlan:
    """``rank``'s P2P rounds, in the global order, and when to post them (see ``dualpipe.comm``).

    A transfer's round is the time its data is produced on the unit-cost clock (``_unit_clock``).
    Before action i a rank posts its rounds up to the later of its previous action's sends and
    action i's inputs (``post_before[i]`` of them); no send of action i or later is due by then
    (its data comes later on that clock). A transfer's payload slot is the clock time of the last
    round its receiver posts before the action that consumes it: the receiver needs the
    transfer's header only by then, so it never waits for a header before that action runs.
    """
    acts, produced = _unit_clock(schedule, training)
    rounds, times, post_before, consumer = _rank_rounds(schedule, rank, training, acts, produced)
    slots: dict[Key, float] = {}
    for key, _ in (r for _, recvs in rounds for r in recvs):
        slots[key] = times[post_before[consumer[key]] - 1]
    # A send's slot is its receiver's: computed once per destination, in one pass over the sends.
    receivers: dict[int, tuple[list[float], list[int], dict[Key, int]]] = {}
    for key, dst in (s for sends, _ in rounds for s in sends):
        if dst not in receivers:
            receivers[dst] = _rank_rounds(schedule, dst, training, acts, produced)[1:]
        d_times, d_post, d_consumer = receivers[dst]
        slots[key] = d_times[d_post[d_consumer[key]] - 1]
    return RoundPlan(rounds, times, post_before, slots)


def _halves(schedule: Schedule, a: Action, last: int) -> tuple[list[Key], list[Key]]:
    """The transfers an action consumes and produces (local ones too)."""
    halves = [] if a.kind == "W" else [("F" if a.kind in ("F", "FB") else "B", a.stage, a.chunk)]
    if a.kind == "FB":
        assert a.bwd is not None
        halves.append(("B", *a.bwd))
    ins: list[Key] = []
    outs: list[Key] = []
    for kind, st, c in halves:
        if kind == "F":
            if st > 0:
                ins.append((ACT, st, c))
            if st < last:
                outs.append((ACT, st + 1, c))
        else:
            if st < last:
                ins.append((GRAD, st, c))
            if st > 0:
                outs.append((GRAD, st - 1, c))
    return ins, outs


@dataclass
class StepData:
    """What one rank brings to a step and takes from it (chunk ids are the schedule's)."""

    inputs: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # stage-0 chunks here
    labels: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # last-stage chunks here
    criterion: Callable[..., torch.Tensor] | None = None
    training: bool = True
    return_outputs: bool = False
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)


class Executor:
    """Runs ``schedule``'s actions for pipeline rank ``rank`` with stage ``modules`` (by slot)."""

    def __init__(self, schedule: Schedule, rank: int, modules: Sequence[nn.Module], p2p: P2P, data: StepData,
                 overlap: bool = True, record: bool = False, post_before: Sequence[int] | None = None):
        self.s, self.rank, self.modules, self.p2p, self.d = schedule, rank, list(modules), p2p, data
        self.last = schedule.num_stages - 1
        self.inputs: dict[tuple[int, int], Tensors] = {}
        self.outputs: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.local_grads: dict[tuple[int, int], Tensors] = {}
        self.loss_tensors: dict[int, torch.Tensor] = {}
        self.events: list[TimelineEvent] = []
        self.record = record
        m0 = self.modules[0]
        self.hook = None
        if overlap and len(self.modules) == 2 and type(m0) is type(self.modules[1]):
            self.hook = getattr(type(m0), "overlapped_forward_backward", None)
        self.hook_calls: list[tuple[int, int, int, int]] = []
        self.actions = step_actions(schedule, rank, data.training)
        # Rounds of P2P groups to have posted before each action (transfer_rounds; all at once if None).
        self.post_before = list(post_before) if post_before is not None else [10**9] * len(self.actions)

    # ------------------------------------------------------------------ placement helpers
    def _rank_of(self, stage: int, chunk: int) -> int:
        return self.s.place(stage, chunk).rank

    def _module(self, stage: int, chunk: int) -> nn.Module:
        return self.modules[self.s.place(stage, chunk).slot]

    # ------------------------------------------------------------------ forward
    def _forward_inputs(self, st: int, c: int) -> Tensors:
        if st == 0:
            return list(self.d.inputs[c])
        if (st, c) in self.inputs:  # handed over locally by the previous stage on this rank
            return self.inputs[(st, c)] if self.d.training else self.inputs.pop((st, c))
        ins = self.p2p.recv((ACT, st, c))
        if self.d.training:
            self.inputs[(st, c)] = ins
        return ins

    def _forward_finish(self, st: int, c: int, outs: list[torch.Tensor], loss: torch.Tensor | None) -> None:
        if st == self.last:
            if self.d.return_outputs:
                self.d.outputs[c] = [o.detach() for o in outs]
            if loss is not None:
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TypeError(f"criterion must return a one-element loss tensor, got "
                                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
                self.d.losses[c] = loss.detach().reshape(())
                if self.d.training:
                    self.loss_tensors[c] = loss
            return
        nxt = self._rank_of(st + 1, c)
        if nxt == self.rank:
            self.inputs[(st + 1, c)] = [o.detach().requires_grad_(o.requires_grad and self.d.training) for o in outs]
        else:
            self.p2p.send((ACT, st + 1, c), nxt, outs)
            if self.d.training:
                for o in outs:  # the receiver has its own copy: keep only the autograd graph
                    if o.grad_fn is not None and o._base is None:
                        o.data = torch.empty(0, dtype=o.dtype, device=o.device)
        if self.d.training:
            self.outputs[(st, c)] = outs

    def _loss(self, st: int, c: int, outs: list[torch.Tensor]) -> torch.Tensor | None:
        if st != self.last or self.d.criterion is None:
            return None
        return self.d.criterion(*outs, *self.d.labels.get(c, ()))

    def _forward(self, st: int, c: int) -> None:
        ins = self._forward_inputs(st, c)
        outs = as_tensor_list(self._module(st, c)(*ins), f"stage {st} (pipeline rank {self.rank})")
        self._forward_finish(st, c, outs, self._loss(st, c, outs))

    # ------------------------------------------------------------------ backward
    def _backward_targets(self, st: int, c: int) -> tuple[torch.Tensor | None, list[torch.Tensor], Tensors]:
        """(loss, outputs, output grads) for B(st, c): the loss on the last stage, else outputs."""
        if st == self.last:
            if c not in self.loss_tensors:
                raise RuntimeError(f"backward of chunk {c} on the last stage needs a loss: pass criterion on "
                                   f"pipeline rank {self.rank}")
            return self.loss_tensors.pop(c), [], []
        outs = self.outputs.pop((st, c))
        grads = self.local_grads.pop((st, c)) if (st, c) in self.local_grads else self.p2p.recv((GRAD, st, c))
        return None, outs, grads

    def _backward_finish(self, st: int, c: int) -> None:
        ins = self.inputs.pop((st, c), None)
        self.outputs.pop((st, c), None)
        if st == 0 or ins is None:
            return
        grads = [t.grad if (t is not None and t.requires_grad) else None for t in ins]
        prev = self._rank_of(st - 1, c)
        if prev == self.rank:
            self.local_grads[(st - 1, c)] = grads
        else:
            self.p2p.send((GRAD, st - 1, c), prev, grads)

    def _backward(self, st: int, c: int, split: bool) -> None:
        loss, outs, grads = self._backward_targets(st, c)
        WeightGradStore.enabled = split
        try:
            if loss is not None:
                loss.backward()
            else:
                run_backward(outs, grads)
        finally:
            WeightGradStore.enabled = False
        if split:
            WeightGradStore.flush()
        self._backward_finish(st, c)

    # ------------------------------------------------------------------ F&B pair
    def _forward_backward(self, a: Action) -> None:
        fs, fc = a.stage, a.chunk
        bs, bc = a.bwd
        if self.hook is None:
            self._forward(fs, fc)
            self._backward(bs, bc, split=False)
            return
        ins = self._forward_inputs(fs, fc)
        loss1, outs1, grads1 = self._backward_targets(bs, bc)
        m0, m1 = self._module(fs, fc), self._module(bs, bc)
        criterion0 = self.d.criterion if fs == self.last else None
        labels0 = list(self.d.labels.get(fc, ())) if fs == self.last else []
        self.hook_calls.append((fs, fc, bs, bc))
        result = self.hook(m0, ins, criterion0, labels0, m1, loss1, outs1 or None, grads1 or None)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError(f"{type(m0).__name__}.overlapped_forward_backward must return (outputs0, loss0), "
                            f"got {type(result).__name__}")
        outs0 = as_tensor_list(result[0], f"{type(m0).__name__}.overlapped_forward_backward (stage {fs})")
        if criterion0 is not None and result[1] is None:
            raise TypeError(f"{type(m0).__name__}.overlapped_forward_backward returned no loss for the last stage")
        self._forward_finish(fs, fc, outs0, result[1] if criterion0 is not None else None)
        self._backward_finish(bs, bc)

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        try:
            for a, num_rounds in zip(self.actions, self.post_before, strict=True):
                self.p2p.poll()
                t0 = time.perf_counter() if self.record else 0.0
                waited = self.p2p.wait_s
                self.p2p.post(num_rounds)
                if a.kind == "F":
                    self._forward(a.stage, a.chunk)
                elif a.kind == "B":
                    self._backward(a.stage, a.chunk, a.split)
                elif a.kind == "W":
                    WeightGradStore.pop()
                else:
                    self._forward_backward(a)
                if self.record:
                    # Start once the inputs were there: waiting for P2P is shown as idle time.
                    start = t0 + (self.p2p.wait_s - waited)
                    self.events.append(TimelineEvent(self.rank, str(a), a.kind, start, time.perf_counter()))
            self.p2p.finish()
        except BaseException as e:
            self.p2p.send_aborts(f"{type(e).__name__}: {e}")
            self.p2p.drain()
            raise
        finally:
            WeightGradStore.enabled = False
