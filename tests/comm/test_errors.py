"""Bad input raises a clear exception on every rank, never a hang, and the group stays usable."""

from __future__ import annotations

import pytest
import torch

from comm import all_to_all
from comm.primitives import CollectiveInputError
from tests.harness.distributed import run_distributed


def _outcome(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as err:  # the test reports whatever was raised
        return type(err).__name__, str(err)
    return "ok", ""


def bad_inputs(rank: int, world: int) -> dict:
    buf = all_to_all.Buffer()
    E, T, H = 2 * world, 20 + rank, 16
    x = torch.randn(T, H, dtype=torch.bfloat16)
    idx = torch.randint(-1, E, (T, 3))
    w = torch.rand(T, 3)
    out = {}
    bad_idx = idx.clone()
    if rank == 0:
        bad_idx[0, 0] = E  # out of range on rank 0 only
    out["topk_out_of_range"] = _outcome(lambda: buf.dispatch(x, topk_idx=bad_idx, topk_weights=w, num_experts=E))
    out["layout_not_divisible"] = _outcome(lambda: buf.get_dispatch_layout(idx, E + 1))
    out["dispatch_not_divisible"] = _outcome(lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E + 1))
    xt = x[:-1] if rank == world - 1 else x  # mismatched T on the last rank only
    out["mismatched_t"] = _outcome(lambda: buf.dispatch(xt, topk_idx=idx, topk_weights=w, num_experts=E))
    out["wrong_dtype_x"] = _outcome(lambda: buf.dispatch(x.int(), topk_idx=idx, topk_weights=w, num_experts=E))
    out["wrong_dtype_topk"] = _outcome(lambda: buf.dispatch(x, topk_idx=idx.int(), topk_weights=w, num_experts=E))
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E)
    # A handle from another layout: rank 0 combines rows of a different size.
    z = recv_x if rank else torch.randn(recv_x.shape[0] + 1, H, dtype=torch.bfloat16)
    out["combine_other_layout"] = _outcome(lambda: buf.combine(z, handle))
    other = all_to_all.Buffer()
    out["handle_other_buffer"] = _outcome(lambda: other.dispatch(x, handle=handle))
    # The group still works: a good combine afterwards.
    combined, _, _ = buf.combine(recv_x, handle)
    out["after"] = bool(torch.isfinite(combined.float()).all())
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_raises_on_every_rank(world: int) -> None:
    results = run_distributed(bad_inputs, world, timeout=120)
    collective = CollectiveInputError.__name__
    for rank, out in enumerate(results):
        kind, msg = out["topk_out_of_range"]
        assert (kind, "topk_idx" in msg) == (("ValueError", True) if rank == 0 else (collective, False)), out
        assert out["layout_not_divisible"][0] == "ValueError" and "divisible" in out["layout_not_divisible"][1]
        assert out["dispatch_not_divisible"][0] == "ValueError"
        kind, msg = out["mismatched_t"]
        assert kind == ("ValueError" if rank == world - 1 else collective), out
        assert out["wrong_dtype_x"][0] == "TypeError" and "x must have dtype" in out["wrong_dtype_x"][1]
        assert out["wrong_dtype_topk"][0] == "TypeError" and "topk_idx" in out["wrong_dtype_topk"][1]
        kind, msg = out["combine_other_layout"]
        assert kind == ("ValueError" if rank == 0 else collective) and (rank or "handle" in msg), out
        assert out["handle_other_buffer"][0] == "ValueError" and "another Buffer" in out["handle_other_buffer"][1]
        assert out["after"] is True
