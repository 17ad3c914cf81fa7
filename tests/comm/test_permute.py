"""Expert-major permutation (comm.all_to_all.permute / unpermute) against a plain Python
reference: segment order, alignment padding with m_indices -1, FP8 bytes, the weighted FP32
reduction and both gradients."""

from __future__ import annotations

import random

import pytest
import torch

import ops
from comm import all_to_all
from tests.harness.tensors import randn


def _routing(n: int, k: int, num_local: int) -> torch.Tensor:
    """Local expert per slot, -1 for about a third of the slots (experts elsewhere)."""
    idx = torch.randint(0, num_local, (n, k))
    return idx.masked_fill(torch.rand(n, k) < 0.35, -1)


def _reference_layout(idx: torch.Tensor, num_local: int, alignment: int):
    """Rows per expert in token order, each segment padded to the alignment."""
    m_indices, sources = [], []
    for e in range(num_local):
        toks = [n for n in range(idx.shape[0]) for j in range(idx.shape[1]) if idx[n, j] == e]
        pad = -(-len(toks) // alignment) * alignment - len(toks)
        m_indices += [e] * len(toks) + [-1] * pad
        sources += toks + [-1] * pad
    return torch.tensor(m_indices, dtype=torch.int32), sources


@pytest.mark.parametrize("alignment", [1, 4, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_permute_layout_and_fp8_bytes(alignment: int, dtype: torch.dtype) -> None:
    n, k, num_local, h = random.randint(0, 300), random.randint(1, 9), random.randint(1, 8), random.choice([1, 100, 256])
    idx = _routing(n, k, num_local)
    x = randn(n, h, dtype=dtype)
    xp, m_indices, handle = all_to_all.permute(x, idx, num_local, alignment)
    want_m, sources = _reference_layout(idx, num_local, alignment)
    assert torch.equal(m_indices, want_m)
    want = torch.stack([x[s] if s >= 0 else torch.zeros(h, dtype=x.dtype) for s in sources]) if sources \
        else torch.empty(0, h, dtype=x.dtype)
    assert torch.equal(xp, want)
    q, sf = ops.per_token_cast_to_fp8(x.float())
    (qp, sfp), m8, _ = all_to_all.permute((q, sf), idx, num_local, alignment)
    assert torch.equal(m8, want_m)
    assert torch.equal(qp.view(torch.uint8), torch.stack([q[s].view(torch.uint8) if s >= 0 else
                                                          torch.zeros(h, dtype=torch.uint8) for s in sources])
                       if sources else torch.empty(0, h, dtype=torch.uint8))
    assert torch.equal(sfp[m8 >= 0], sf[[s for s in sources if s >= 0]])
    assert handle.num_rows == len(sources)


def test_unpermute_weighted_sum_and_gradients() -> None:
    n, k, num_local, h = random.randint(1, 200), random.randint(1, 9), random.randint(1, 6), 64
    idx = _routing(n, k, num_local)
    x = randn(n, h).requires_grad_()
    w = torch.rand(n, k).requires_grad_()
    xp, m_indices, handle = all_to_all.permute(x, idx, num_local, 8)
    scale = randn(num_local, h)
    y = xp * torch.where(m_indices >= 0, 1.0, 0.0).unsqueeze(1) * scale[m_indices.clamp(min=0).long()]
    out = all_to_all.unpermute(y, w, handle)
    g = randn(n, h)
    (out * g).sum().backward()

    # float64 reference: out[n] = sum over local slots of w * x[n] * scale[expert]
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    valid = (idx >= 0).double()
    ref = (x64.unsqueeze(1) * scale.double()[idx.clamp(min=0)] * (w64 * valid).unsqueeze(-1)).sum(1)
    (ref * g.double()).sum().backward()
    assert ops.calc_diff(out, ref) < 1e-10
    assert ops.calc_diff(x.grad, x64.grad) < 1e-10
    assert ops.calc_diff(w.grad, w64.grad * valid) < 1e-10

    bf = all_to_all.unpermute(y.detach().bfloat16(), w.detach(), handle)
    assert bf.dtype == torch.bfloat16 and ops.calc_diff(bf, ref) < 5e-6
    # float64 rows are summed in float64. calc_diff cannot tell (it bottoms out at ~1e-16), so
    # compare against the float64 sum of exactly these rows (y's float32 products, widened) by the
    # largest relative error: ~1e-16 in float64, ~1e-7 had any step been float32.
    f64 = all_to_all.unpermute(y.detach().double(), w.detach(), handle)
    rows64 = (x.detach().unsqueeze(1) * scale[idx.clamp(min=0)]).double()  # [n, k, h], as y holds them
    ref64 = (rows64 * (w.detach().double() * valid).unsqueeze(-1)).sum(1)
    assert f64.dtype == torch.float64
    assert float((f64 - ref64).abs().max()) <= 1e-13 * float(ref64.abs().max()), "float64 unpermute not summed in float64"


def test_permute_rejects_bad_input() -> None:
    idx = torch.tensor([[0, 3]])
    with pytest.raises(ValueError, match="topk_idx"):
        all_to_all.permute(torch.randn(1, 4), idx, 2)
    with pytest.raises(ValueError, match="alignment"):
        all_to_all.permute(torch.randn(1, 4), idx, 4, alignment=0)
    _, _, handle = all_to_all.permute(torch.randn(1, 4), idx, 4)
    with pytest.raises(ValueError, match="row count"):
        all_to_all.unpermute(torch.randn(5, 4), torch.rand(1, 2), handle)
