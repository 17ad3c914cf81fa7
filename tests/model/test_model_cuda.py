"""The model on a GPU: the same weights and tokens on CUDA and on the CPU give the same loss,
logits and gradients. float64 pins the CUDA code paths (attention, routing, SwiGLU experts,
MTP) to the CPU's float64 result; FP8 mode runs every MLA/MoE/FFN linear through the CUDA FP8
GEMMs (Fprop, Dgrad, m-grouped experts, k-grouped Wgrad) against the CPU FP8 kernels, which
quantize bit for bit alike. All tests need a GPU and skip elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from model import ModelArgs, Transformer
from ops import calc_diff

pytestmark = pytest.mark.cuda


def _on_both(args: ModelArgs) -> dict[str, dict[str, torch.Tensor]]:
    """Loss, logits and every gradient of one model on the CPU and on CUDA (same weights, tokens)."""
    model = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (2, 48))
    targets = torch.randint(0, args.vocab_size, (2, 48))
    out = {}
    for device in ("cpu", "cuda"):
        replica = Transformer(args).to(device)
        replica.load_state_dict(model.state_dict())
        loss, _ = replica.compute_loss(tokens.to(device), targets.to(device))
        loss.backward()
        result = {"loss": loss.detach().reshape(1), "logits": replica(tokens.to(device)).detach()}
        result.update({name: p.grad for name, p in replica.named_parameters() if p.grad is not None})
        out[device] = {name: t.detach().cpu() for name, t in result.items()}
    assert out["cpu"].keys() == out["cuda"].keys()
    return out


def test_float64_model_on_cuda_matches_cpu() -> None:
    out = _on_both(ModelArgs.preset("tiny", dtype="float64"))
    for name, want in out["cpu"].items():
        assert calc_diff(out["cuda"][name], want) < 1e-10, name


def test_fp8_model_on_cuda_matches_cpu() -> None:
    out = _on_both(ModelArgs.preset("tiny", dtype="float32", fp8=True))
    # both devices quantize alike; their FP32 sums differ in order only (~1e-7 per GEMM), which
    # can flip a near-tie in routing: judged on the loss, the logits and all gradients together
    assert calc_diff(out["cuda"]["loss"], out["cpu"]["loss"]) < 1e-6
    assert calc_diff(out["cuda"]["logits"], out["cpu"]["logits"]) < 1e-4
    grads = [name for name in out["cpu"] if name not in ("loss", "logits")]
    flat = {d: torch.cat([out[d][name].flatten() for name in grads]) for d in ("cpu", "cuda")}
    assert calc_diff(flat["cuda"], flat["cpu"]) < 1e-3
