"""DualPipe, DualPipeV, 1F1B and ZB1P pipeline parallelism on any torch.distributed backend.

- ``schedules``: pure functions (ranks, chunks) -> per-rank action lists, with validation.
- ``simulator``: ``simulate(schedule, costs)`` -> timelines, bubbles, makespan, peak activations.
- ``executor`` / ``comm``: one engine that runs any schedule over non-blocking, self-describing P2P.
- ``pipelines``: ``DualPipe``, ``DualPipeV``, ``OneFOneB``, ``ZB1P`` and ``sum_mirror_grads``.
- ``weight_grad``: ``WeightGradStore`` and ``WeightGradLinear`` (zero-bubble B/W split).
- ``timeline``: Chrome/Perfetto JSON and PNG pictures of simulated or measured runs.
"""

from dualpipe.comm import set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dualpipe.executor import run_backward
from dualpipe.pipelines import ZB1P, DualPipe, DualPipeV, OneFOneB, Pipeline, sum_mirror_grads
from dualpipe.schedules import (
    Action,
    Schedule,
    dualpipe_schedule,
    dualpipev_schedule,
    one_f_one_b_schedule,
    validate_schedule,
    zb1p_schedule,
)
from dualpipe.simulator import Costs, SimResult, TimelineEvent, simulate
from dualpipe.timeline import save_png, to_chrome_trace
from dualpipe.weight_grad import WeightGradLinear, WeightGradStore

__all__ = [
    "ZB1P",
    "Action",
    "Costs",
    "DualPipe",
    "DualPipeV",
    "OneFOneB",
    "Pipeline",
    "Schedule",
    "SimResult",
    "TimelineEvent",
    "WeightGradLinear",
    "WeightGradStore",
    "dualpipe_schedule",
    "dualpipev_schedule",
    "one_f_one_b_schedule",
    "run_backward",
    "save_png",
    "set_p2p_tensor_dtype",
    "set_p2p_tensor_shapes",
    "simulate",
    "sum_mirror_grads",
    "to_chrome_trace",
    "validate_schedule",
    "zb1p_schedule",
]
