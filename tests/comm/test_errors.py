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


def bad_input_rides_on_the_exchange(rank: int, world: int, bad: int) -> dict:
    """The flat combine and dispatch-with-handle carry the error flags in a header launched with
    the payload (comm/guarded.py): a bad rank takes part in its peers' exchanges with the byte
    counts they announce, so none blocks, and every rank raises."""
    import ops

    buf = all_to_all.Buffer()
    E, T, H = 2 * world, 30 + 7 * rank, 200  # H > 128: FP8 scales have 2 columns
    x = torch.randn(T, H, dtype=torch.bfloat16)
    idx = torch.randint(-1, E, (T, 3))
    w = torch.rand(T, 3)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E)
    z = torch.randn(recv_x.shape, dtype=torch.bfloat16)
    want_x, want_w, _ = buf.combine(z, handle, topk_weights=recv_w)
    want_x, want_w = want_x.clone(), want_w.clone()
    out = {}
    # A handle that is no handle at all: the bad rank knows no split size, its peers announce them.
    out["combine_no_handle"] = _outcome(lambda: buf.combine(z, "nope" if rank == bad else handle, topk_weights=recv_w))
    wrong_w = recv_w.double() if rank == bad else recv_w  # two exchanges mirrored (rows and weights)
    out["combine_bad_weights"] = _outcome(lambda: buf.combine(z, handle, topk_weights=wrong_w))

    def async_combine() -> None:
        zz = z[:-1] if rank == bad else z
        _, _, event = buf.combine(zz, handle, topk_weights=recv_w, async_finish=True)
        out["async_returned"] = True  # good ranks get here, the bad one raised in the call
        try:
            event.current_stream_wait()
        finally:
            out["async_rewait"] = _outcome(event.current_stream_wait)

    out["async_combine"] = _outcome(async_combine)
    q, sf = ops.per_token_cast_to_fp8(x)
    want_q, want_sf = buf.dispatch((q, sf), handle=handle)[0]
    bad_sf = sf[:, :1] if rank == bad else sf  # FP8 with a handle: side (scales) + main exchanges
    out["dispatch_handle_fp8"] = _outcome(lambda: buf.dispatch((q, bad_sf), handle=handle))
    # The group still works and gives the same bytes / sums as before the failures.
    got_q, got_sf = buf.dispatch((q, sf), handle=handle)[0]
    got_x, got_w, _ = buf.combine(z, handle, topk_weights=recv_w)
    out["after"] = (torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(got_sf, want_sf)
                    and torch.equal(got_x, want_x) and torch.equal(got_w, want_w))
    return out


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_bad_input_on_one_rank_raises_everywhere_without_a_round_trip(world: int) -> None:
    bad = world - 1 if world > 2 else 0
    results = run_distributed(bad_input_rides_on_the_exchange, world, bad, timeout=180)
    collective = CollectiveInputError.__name__
    for rank, out in enumerate(results):
        mine = rank == bad
        kind, msg = out["combine_no_handle"]
        assert (kind == "TypeError" and "handle" in msg) if mine else kind == collective, (rank, out)
        kind, msg = out["combine_bad_weights"]
        assert (kind == "TypeError" and "topk_weights" in msg) if mine else kind == collective, (rank, out)
        kind, msg = out["async_combine"]
        if mine:
            assert kind == "ValueError" and "rows" in msg and "async_returned" not in out, (rank, out)
        else:  # returned before the data arrived; the wait raises, and so does a second wait
            assert out["async_returned"] and kind == collective and out["async_rewait"][0] == collective, (rank, out)
        kind, msg = out["dispatch_handle_fp8"]
        assert (kind == "ValueError" and "scales" in msg) if mine else kind == collective, (rank, out)
        assert out["after"] is True, (rank, out)


def disagreeing_dispatch(rank: int, world: int, odd: int) -> dict:
    """Rank ``odd`` passes arguments that are valid on their own but differ from its peers'."""
    import ops

    buf = all_to_all.Buffer(agree_on_errors=False)  # the signature check does not depend on it
    E, T, H = 2 * world, 17 + rank, 160
    x = torch.randn(T, H, dtype=torch.bfloat16)
    idx = torch.randint(-1, E, (T, 3))
    mine = rank == odd
    cases = {
        "dtype": lambda: buf.dispatch(x.half() if mine else x, topk_idx=idx, num_experts=E),
        "hidden": lambda: buf.dispatch(x[:, :128] if mine else x, topk_idx=idx, num_experts=E),
        "form": lambda: buf.dispatch(ops.per_token_cast_to_fp8(x) if mine else x, topk_idx=idx, num_experts=E),
        "num_experts": lambda: buf.dispatch(x, topk_idx=idx, num_experts=2 * E if mine else E),
        "topk": lambda: buf.dispatch(x, topk_idx=idx[:, :2] if mine else idx, num_experts=E),
    }
    out = {name: _outcome(case) for name, case in cases.items()}
    # The group still works: each token comes back once from every rank it reached (exact sums).
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_experts=E)
    reached = buf.get_dispatch_layout(idx, E)[3].sum(1, keepdim=True)
    want = (x.float() * reached).bfloat16()
    out["after"] = torch.equal(buf.combine(recv_x, handle)[0], want)
    # The guarded transfer puts its header on the payload's device when none is named.
    from comm import transfer
    from comm.guarded import Guard

    got, _, _ = transfer.send_back([recv_x, None], handle.send_pos, handle.send_splits, handle.recv_splits,
                                   handle.num_tokens, None, False, guarded=Guard.HEADER)
    out["after"] &= torch.equal(got, want)
    return out


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_ranks_that_disagree_on_dispatch_arguments_all_raise(world: int) -> None:
    odd = world // 2
    results = run_distributed(disagreeing_dispatch, world, odd, timeout=180)
    words = {"dtype": ("dtypes of x", "torch.float16", "torch.bfloat16"), "hidden": ("hidden sizes", "128", "160"),
             "form": ("forms of x", "an (x_fp8, scales) pair", "a tensor"),
             "num_experts": ("num_experts", str(4 * world), str(2 * world)), "topk": ("top-k widths", "2", "3")}
    for rank, out in enumerate(results):
        for case, (field, odd_value, usual) in words.items():
            kind, msg = out[case]
            assert kind == CollectiveInputError.__name__, (rank, case, out[case])
            assert field in msg and f"{odd_value} on rank(s) [{odd}]" in msg and usual in msg, (rank, case, msg)
        assert out["after"] is True


def strict_disagreements(rank: int, world: int) -> dict:
    """check_consistency: ranks that pass valid but mutually inconsistent combine / dispatch-with-
    handle arguments all raise before any payload moves (without it gloo aborts the process)."""
    import ops

    buf = all_to_all.Buffer(check_consistency=True)
    E, T, H = 2 * world, 600 + rank, 512  # buffers large enough to come from the pool
    x = torch.randn(T, H, dtype=torch.bfloat16)
    idx = torch.randint(-1, E, (T, 3))
    idx[:, 0], idx[:, 1] = 0, E - 1  # every token reaches rank 0 and the last rank: rows flow both ways
    w = torch.rand(T, 3)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E)
    last = rank == world - 1
    z = torch.randn(recv_x.shape[0], 2 * H if last else H, dtype=torch.bfloat16)
    out = {
        "combine_hidden": _outcome(lambda: buf.combine(z, handle)),
        "combine_hidden_async": _outcome(lambda: buf.combine(z, handle, async_finish=True)),
        "combine_weights_on_rank_0": _outcome(lambda: buf.combine(recv_x, handle, topk_weights=recv_w if rank == 0
                                                                  else None)),
        "dispatch_handle_dtype": _outcome(lambda: buf.dispatch(x.float() if last else x, handle=handle)),
        "combine_same_size_dtypes": _outcome(lambda: buf.combine(recv_x.half() if last else recv_x, handle)),
        "dispatch_handle_fp8_form": _outcome(lambda: buf.dispatch(ops.per_token_cast_to_fp8(x) if last else x,
                                                                  handle=handle)),
        "bad_input": _outcome(lambda: buf.combine(torch.randn(recv_x.shape[0] + 1, H) if last else recv_x, handle)),
    }
    from comm import memory

    out["pool_released"] = not any(slot.busy for slot in memory._pool)  # refused calls hand their buffers back
    # The group still works, and the strict mode's results are the default mode's, bit for bit.
    strict = buf.combine(recv_x, handle, topk_weights=recv_w)[:2] + buf.dispatch(x, handle=handle)[:1]
    buf.check_consistency = False
    plain = buf.combine(recv_x, handle, topk_weights=recv_w)[:2] + buf.dispatch(x, handle=handle)[:1]
    out["after"] = all(torch.equal(a, b) for a, b in zip(strict, plain, strict=True))
    return out


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_strict_mode_ranks_that_disagree_on_combine_all_raise(world: int) -> None:
    results = run_distributed(strict_disagreements, world, timeout=180)
    collective = CollectiveInputError.__name__
    for rank, out in enumerate(results):
        for case in ("combine_hidden", "combine_hidden_async"):
            kind, msg = out[case]
            assert kind == collective and "bytes, but rank" in msg and "hidden sizes or dtypes" in msg, (rank, case, msg)
        for case, names in (("dispatch_handle_dtype", ("torch.bfloat16", "torch.float32")),
                            ("combine_same_size_dtypes", ("torch.bfloat16", "torch.float16"))):
            kind, msg = out[case]
            assert kind == collective and "different dtypes" in msg and all(n in msg for n in names), (rank, case, msg)
        kind, msg = out["combine_weights_on_rank_0"]
        assert kind == collective and "rank 0 launches exchange 1" in msg, (rank, msg)
        kind, msg = out["dispatch_handle_fp8_form"]
        assert kind == collective and f"rank {world - 1} launches exchange 0" in msg, (rank, msg)
        assert out["pool_released"] is True, (rank, out)
        kind, msg = out["bad_input"]
        if rank == world - 1:
            assert kind == "ValueError" and "rows" in msg, (rank, msg)
        else:
            assert kind == collective and f"[{world - 1}]" in msg, (rank, msg)
        assert out["after"] is True, (rank, out)


def test_comm_check_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from comm.buffer import _env_check

    for value, want in (("1", True), ("0", False)):
        monkeypatch.setenv("DSV3_COMM_CHECK", value)
        assert _env_check() is want
    monkeypatch.delenv("DSV3_COMM_CHECK")
    assert _env_check() is False
    monkeypatch.setenv("DSV3_COMM_CHECK", "yes")
    with pytest.raises(ValueError, match="DSV3_COMM_CHECK must be 0 or 1"):
        _env_check()


def _table(launched: list[int], sends: list[list[int]], expects: list[list[int]], dtypes: list[int],
           flags: list[int] | None = None) -> torch.Tensor:
    """A gathered strict-mode header table [sender, peer, columns] with one exchange."""
    r = len(launched)
    t = torch.zeros(r, r, 5, dtype=torch.int64)
    for i in range(r):
        t[i, :, 0] = 0 if flags is None else flags[i]
        t[i, :, 1] = launched[i]
        t[i, :, 2] = torch.tensor(sends[i])
        t[i, :, 3] = torch.tensor(expects[i])
        t[i, :, 4] = dtypes[i]
    return t


def test_check_headers_verdicts() -> None:
    """The strict check on hand-made tables: consistent ones pass (zero-byte splits and an exchange
    no rank launches included), each kind of disagreement raises naming the ranks."""
    from comm.guarded import check_headers

    sends = [[0, 12, 0], [4, 0, 8], [0, 0, 0]]  # sends[r][p]: bytes r sends p
    expects = [[0, 4, 0], [12, 0, 0], [0, 8, 0]]  # expects[p][r] == sends[r][p]
    check_headers(_table([1, 1, 1], sends, expects, [2, 2, 2]), "combine")
    check_headers(_table([0, 0, 0], [[0] * 3] * 3, [[0] * 3] * 3, [0, 0, 0]), "combine")
    with pytest.raises(CollectiveInputError, match=r"rank 1 sends rank 2 8 bytes, but rank 2 expects 16"):
        check_headers(_table([1, 1, 1], sends, [[0, 4, 0], [12, 0, 0], [0, 16, 0]], [2, 2, 2]), "combine")
    with pytest.raises(CollectiveInputError, match=r"rank 0 sends torch.bfloat16 and rank 2 sends torch.float16"):
        check_headers(_table([1, 1, 1], sends, expects, [2, 2, 3]), "combine")
    with pytest.raises(CollectiveInputError, match=r"rank 2 launches exchange 0 and rank 0 does not"):
        check_headers(_table([0, 0, 1], sends, expects, [2, 2, 2]), "dispatch")
    with pytest.raises(CollectiveInputError, match=r"rank\(s\) \[1\]"):
        check_headers(_table([1, 1, 1], sends, expects, [2, 2, 2], flags=[0, 1, 0]), "combine")
