"""pytest set-up shared by tests/ and bench/: a fresh seed per test, the cuda marker's skip, and
the CPU instruction sets to test."""

from __future__ import annotations

import os
import random

import pytest
import torch

import ops


@pytest.fixture(autouse=True)
def fresh_seed(request: pytest.FixtureRequest) -> int:
    """Seeds torch and random with a new seed for every test; reported on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"torch.manual_seed({seeds[0]})"))


def cuda_ready() -> bool:
    return torch.cuda.is_available() and ops.built_with_cuda()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cuda_ready():
        return
    reason = "needs a CUDA GPU and ops._C built with CUDA" if not torch.cuda.is_available() else "ops._C built without CUDA"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cpu_isas() -> list[str]:
    """Every CPU instruction set this machine can run, for testing each kernel path."""
    order = ["portable", "avx2", "avx512", "amx"]
    return order[: order.index(ops.detected_cpu_isa()) + 1]
