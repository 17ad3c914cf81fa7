"""Expert-parallel dispatch/combine with DeepEP's API on any torch.distributed backend.

Public face of the ``comm`` package (import it as ``from comm import all_to_all``):

- ``Buffer``: ``get_dispatch_layout``, ``dispatch``, ``combine`` (DeepEP names and return
  tuples; combine sums without weights), flat or node-limited (``ranks_per_node``).
- ``EventOverlap``: what ``async_finish=True`` returns; ``current_stream_wait()`` or ``with``.
- ``dispatch`` / ``combine``: autograd-aware functional forms (gradients to x and topk_weights).
- ``all_to_all_v``: the plain variable-size, differentiable all-to-all.
- ``permute`` / ``unpermute``: received tokens to expert-major rows aligned for the grouped
  GEMMs (``m_indices`` with -1 padding rows) and back with the top-k weighted sum.
- ``FLOAT_DTYPES``: the float dtypes all of the above accept (float32, bfloat16, float16,
  float64); sums run in FP32, or FP64 for float64 rows.

Nothing here imports ``model/``, ``dualpipe/`` or ``launch/``.
"""

from comm.autograd import combine, dispatch
from comm.buffer import Buffer
from comm.events import EventOverlap
from comm.kernels import FLOAT_DTYPES
from comm.layout import DispatchHandle
from comm.permute import PermuteHandle, permute, unpermute
from comm.primitives import CollectiveInputError, all_to_all_v

__all__ = [
    "FLOAT_DTYPES",
    "Buffer",
    "CollectiveInputError",
    "DispatchHandle",
    "EventOverlap",
    "PermuteHandle",
    "all_to_all_v",
    "combine",
    "dispatch",
    "permute",
    "unpermute",
]
