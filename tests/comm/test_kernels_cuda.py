"""The CUDA comm kernels give the CPU kernels' results (bytes exact; FP32 sums within rounding).
Skipped without a GPU (compiled in CI, run when a GPU is lent)."""

from __future__ import annotations

import random

import pytest
import torch

import ops
from comm import kernels
from tests.harness.tensors import randn

pytestmark = pytest.mark.cuda


def _routing(t: int, k: int, num_experts: int) -> torch.Tensor:
    idx = torch.rand(t, num_experts).topk(min(k, num_experts), dim=1).indices
    return idx.masked_fill(torch.rand(idx.shape) < 0.2, -1).contiguous()


def test_layout_pack_unpack_reduce_match_cpu() -> None:
    t, k, ranks, epr, h = random.randint(0, 500), random.randint(1, 9), random.choice([2, 3, 8]), 4, 100
    idx = _routing(t, k, ranks * epr)
    cpu = kernels.dispatch_layout(idx, ranks * epr, ranks, 1 if ranks == 3 else 2)
    gpu = kernels.dispatch_layout(idx.cuda(), ranks * epr, ranks, 1 if ranks == 3 else 2)
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.equal(a, b.cpu())
    x, w = randn(t, h, dtype=torch.bfloat16), torch.rand(t, k)
    q, sf = ops.per_token_cast_to_fp8(x)
    buf_c, pos_c = kernels.pack([x, q, sf], cpu[3], idx, w, epr)
    buf_g, pos_g = kernels.pack([x.cuda(), q.cuda(), sf.cuda()], gpu[3], idx.cuda(), w.cuda(), epr)
    assert torch.equal(buf_c, buf_g.cpu()) and torch.equal(pos_c, pos_g.cpu())
    outs = [torch.empty(buf_g.shape[0], h, dtype=torch.bfloat16, device="cuda"),
            torch.empty(buf_g.shape[0], buf_g.shape[1] - 2 * h, dtype=torch.uint8, device="cuda")]
    kernels.unpack_into(buf_g, outs)
    outs_c = [torch.empty(o.shape, dtype=o.dtype) for o in outs]
    kernels.unpack_into(buf_c, outs_c)
    assert all(torch.equal(a.view(torch.uint8), b.cpu().view(torch.uint8)) for a, b in zip(outs_c, outs, strict=True))
    z = randn(buf_c.shape[0], h, dtype=torch.bfloat16)
    out_c, out_g = torch.empty(t, h, dtype=torch.bfloat16), torch.empty(t, h, dtype=torch.bfloat16, device="cuda")
    kernels.combine_reduce_into(z, pos_c, out_c)
    kernels.combine_reduce_into(z.cuda(), pos_g, out_g)
    assert ops.calc_diff(out_c, out_g.cpu()) < 1e-6


def test_permute_unpermute_match_cpu() -> None:
    n, k, num_local, h = random.randint(0, 400), random.randint(1, 9), random.randint(1, 8), 64
    idx = torch.randint(-1, num_local, (n, k))
    x = randn(n, h, dtype=torch.bfloat16)
    (pc,), mc, rc = kernels.permute([x], idx, num_local, 128)
    (pg,), mg, rg = kernels.permute([x.cuda()], idx.cuda(), num_local, 128)
    assert torch.equal(pc, pg.cpu()) and torch.equal(mc, mg.cpu()) and torch.equal(rc, rg.cpu())
    w = torch.rand(n, k)
    yc = kernels.unpermute(pc, rc, w)
    yg = kernels.unpermute(pg, rg, w.cuda())
    assert ops.calc_diff(yc, yg.cpu()) < 1e-6
