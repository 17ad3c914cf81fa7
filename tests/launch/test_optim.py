"""launch/optim.py: the LR schedule, ZeRO-1 AdamW against torch.optim.AdamW, sharded over ranks."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.distributed as dist

from launch.optim import AdamWHyper, FlatShard, ZeroAdamW, clip_coefficient, lr_at
from ops import calc_diff
from tests.harness.distributed import run_distributed


def test_lr_schedule_warmup_then_cosine() -> None:
    lr, warm, total, floor = 3e-3, 10, 100, 0.1
    lrs = [lr_at(s, lr, warm, total, floor) for s in range(1, total + 1)]
    assert lrs[0] == pytest.approx(lr / warm) and lrs[warm - 1] == pytest.approx(lr)
    assert all(a < b for a, b in itertools.pairwise(lrs[:warm]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[warm:]))
    assert lrs[-1] == pytest.approx(lr * floor)
    mid = warm + (total - warm) // 2
    assert lrs[mid - 1] == pytest.approx(lr * (floor + (1 - floor) * 0.5), rel=1e-9)


def test_clip_coefficient() -> None:
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(4.0, 1.0) == pytest.approx(0.25, rel=1e-5)
    assert clip_coefficient(4.0, 0.0) == 1.0 and clip_coefficient(math.inf, 1.0) == 1.0


def _params(seed: int, dtype=torch.float64) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (11,), (1, 13)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _grads(seed: int, step: int, rank: int, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + step * 10 + rank)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _reference(seed: int, world: int, steps: int, hp: AdamWHyper, clip: float) -> tuple[list[torch.Tensor], list[float]]:
    """torch.optim.AdamW on the mean gradient over ``world`` ranks, no decay on 1-D tensors."""
    params = _params(seed)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps)
    norms = []
    for step in range(steps):
        per_rank = [_grads(seed, step, r, params) for r in range(world)]
        for i, p in enumerate(params):
            p.grad = sum(gr[i] for gr in per_rank) / world
        norms.append(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf).item())
        opt.step()
    return [p.detach() for p in params], norms


def _zero_run(rank: int, world: int, seed: int, steps: int, hp: AdamWHyper, clip: float, moments: str):
    params = _params(seed)
    group = dist.group.WORLD if world > 1 else None
    mdt = torch.bfloat16 if moments == "bf16" else torch.float32
    shard = FlatShard("dense", params, group, world, mdt, reduce_scatter=False)
    opt = ZeroAdamW([shard], AdamWHyper(**vars(hp)), norm_group=group)
    norms = []
    for step in range(steps):
        for p, g in zip(params, _grads(seed, step, rank, params), strict=True):
            p.grad = g
        opt.reduce_grads()
        norm = opt.global_grad_norm()
        norms.append(norm)
        opt.step(hp.lr, clip_coefficient(norm, clip))
    assert shard.master.numel() == -(-sum(p.numel() for p in params) // world)  # only a shard is kept
    return [p.detach().clone() for p in params], norms


@pytest.mark.parametrize("world", [1, 2, 3])
def test_zero_adamw_equals_torch_adamw_on_mean_gradients(world: int) -> None:
    seed = random.randint(0, 10**6)
    hp = AdamWHyper(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    clip = random.choice([0.0, 1.0])
    want, want_norms = _reference(seed, world, 6, hp, clip)
    if world == 1:
        results = [_zero_run(0, 1, seed, 6, hp, clip, "fp32")]
    else:
        results = run_distributed(_zero_run, world, seed, 6, hp, clip, "fp32")
    for got, norms in results:  # every replica ends with the same parameters
        for a, b in zip(got, want, strict=True):
            assert calc_diff(a, b) < 1e-14 and torch.allclose(a, b, rtol=1e-12, atol=1e-14)
        assert norms == pytest.approx(want_norms, rel=1e-12)


def test_bf16_moments_stay_close_to_fp32() -> None:
    seed = random.randint(0, 10**6)
    hp = AdamWHyper(lr=1e-3)
    a, _ = _zero_run(0, 1, seed, 5, hp, 1.0, "fp32")
    b, _ = _zero_run(0, 1, seed, 5, hp, 1.0, "bf16")
    start = _params(seed)
    for x, y, p0 in zip(a, b, start, strict=True):
        assert calc_diff(x - p0.detach(), y - p0.detach()) < 1e-3  # the updates agree to bf16 accuracy


def _plain_adamw_fp32(params: list[torch.Tensor], grads_per_step: list[list[torch.Tensor]], hp: AdamWHyper, clip: float,
                      moments: torch.dtype) -> tuple[list[torch.Tensor], list[float]]:
    """The ZeRO-1 arithmetic written plainly on one flat FP32 vector with fresh temporaries (the
    form FlatShard had before it kept its buffers): FlatShard must reproduce it bit for bit."""
    master = torch.cat([p.detach().reshape(-1) for p in params]).float()
    mask = torch.cat([torch.full((p.numel(),), 1.0 if p.ndim >= 2 else 0.0) for p in params])
    m = torch.zeros_like(master, dtype=moments)
    v = torch.zeros_like(m)
    norms = []
    for step, grads in enumerate(grads_per_step, start=1):
        g = torch.cat([x.reshape(-1) for x in grads]).float()
        norm = math.sqrt(g.double().square().sum().item())
        norms.append(norm)
        coef = clip_coefficient(norm, clip)
        g = g if coef == 1.0 else g * coef
        m32 = m.float().mul_(hp.beta1).add_(g, alpha=1 - hp.beta1)
        v32 = v.float().mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)
        m, v = m32.to(moments), v32.to(moments)
        master = master * (1 - hp.lr * hp.weight_decay * mask)
        denom = (v32.sqrt() / math.sqrt(1 - hp.beta2 ** step)).add_(hp.eps)
        master = master.addcdiv(m32, denom, value=-hp.lr / (1 - hp.beta1 ** step))
    out, offset = [], 0
    for p in params:
        out.append(master[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return out, norms


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_flat_shard_is_bit_exact_with_the_plain_arithmetic(moments: torch.dtype, clip: float) -> None:
    """Persistent buffers, in-place clipping and range-wise weight decay change no bit (FP32,
    where any reordering or extra rounding would show)."""
    seed = random.randint(0, 10**6)
    params = _params(seed, torch.float32)
    start = [p.detach().clone() for p in params]
    grads_per_step = [_grads(seed, step, 0, params) for step in range(5)]
    hp = AdamWHyper(lr=3e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    opt = ZeroAdamW([FlatShard("dense", params, None, 1, moments, reduce_scatter=False)], AdamWHyper(**vars(hp)),
                    norm_group=None)
    norms = []
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.reduce_grads()
        norms.append(opt.global_grad_norm())
        opt.step(hp.lr, clip_coefficient(norms[-1], clip))
    want, want_norms = _plain_adamw_fp32(start, grads_per_step, hp, clip, moments)
    assert norms == want_norms
    for p, w, p0 in zip(params, want, start, strict=True):
        assert not torch.equal(p.detach(), p0)  # it moved
        assert torch.equal(p.detach(), w)
