"""Shared fixtures: tiny open_clip backbones built in-process (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.backbone import load_backbone
from pipeline.config import BackboneConfig

# Tiny models are dominated by thread start-up costs; one thread is several times faster on 2 cores and
# keeps timings stable when test files run next to other work.
torch.set_num_threads(1)

# In CI (CI=true) these capabilities must be present: a test that would skip for lack of them fails.
REQUIRED_IN_CI = {"multiproc", "slurm"}


def require(ok: bool, kind: str, reason: str) -> None:
    """Skip when ``ok`` is false, except in CI for capabilities CI must have: then fail."""
    if ok:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and kind in REQUIRED_IN_CI:
        pytest.fail(f"required in CI ({kind}): {reason}")
    pytest.skip(reason)


def make_backbone(arch: str = "tiny-vit", precision: str = "fp32", seed: int = 0):
    """A tiny backbone with random weights; deterministic for a given seed."""
    torch.manual_seed(seed)
    return load_backbone(BackboneConfig(arch=arch, pretrained="", precision=precision))


@pytest.fixture(scope="session")
def tiny_backbone():
    return make_backbone("tiny-vit")


@pytest.fixture(scope="session")
def tiny_backbone_s():
    return make_backbone("tiny-vit-s")
