"""Launcher-variable mapping, digests and backend checks of pipeline.distributed (single process)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.distributed import Distributed, array_task_id, slurm_to_torch_env, tensor_digest


def test_slurm_variables_map_to_torch_ones():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu07",
           "SLURM_JOB_ID": "123456"}
    out = slurm_to_torch_env(env)
    assert out == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert slurm_to_torch_env({**env, "RANK": "0"}) == {}  # torchrun/accelerate already set ranks
    assert slurm_to_torch_env({}) == {}
    assert array_task_id({"SLURM_ARRAY_TASK_ID": "17"}) == 17 and array_task_id({}) is None


def test_digest_is_bit_exact():
    a = [torch.ones(3, 2), torch.zeros(4)]
    b = [torch.ones(3, 2), torch.zeros(4)]
    assert tensor_digest(a) == tensor_digest(b)
    b[1][2] = torch.finfo(torch.float32).tiny  # smallest change of one element
    assert tensor_digest(a) != tensor_digest(b)


def test_single_process_collectives_and_zero_stage_refusal(monkeypatch, caplog):
    dist = Distributed(cpu=True)
    assert (dist.rank, dist.world_size, dist.is_main) == (0, 1, True)
    g = [torch.full((2, 3), 2.0), torch.ones(5, dtype=torch.float64)]
    assert dist.all_reduce_mean_(g) == 11 * 8  # one flat fp64 buffer (an fp64 input promotes it)
    assert torch.equal(g[0], torch.full((2, 3), 2.0))
    assert dist.any(True) and not dist.any(False)
    assert dist.verify_identical(g) == tensor_digest(g)
    dist.check_backend(second_order=True)  # no DeepSpeed: nothing to refuse
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # asked for, but accelerate dropped it on the CPU
    with caplog.at_level(logging.WARNING, logger="pipeline.distributed"):
        dist.check_backend(second_order=True)
    assert "asks for DeepSpeed but accelerate runs without it" in caplog.text
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    state_cls = type(dist.accelerator.state)
    monkeypatch.setattr(state_cls, "deepspeed_plugin", property(lambda self: SimpleNamespace(zero_stage=3)))
    with pytest.raises(ConfigError, match="ZeRO-3"):
        dist.check_backend(second_order=True)
    for stage in (1, 2):  # accepted but doing nothing (no DeepSpeed engine): refused too
        monkeypatch.setattr(state_cls, "deepspeed_plugin", property(lambda self, s=stage: SimpleNamespace(zero_stage=s)))
        with pytest.raises(ConfigError, match=rf"ZeRO-{stage} \(zero_stage={stage} in accelerate's DeepSpeed plugin\) "
                           r"would be accepted and do nothing.*set zero_stage: 0"):
            dist.check_backend(second_order=True)
    monkeypatch.setattr(state_cls, "deepspeed_plugin", property(lambda self: SimpleNamespace(zero_stage=0)))
    with caplog.at_level(logging.WARNING, logger="pipeline.distributed"):
        dist.check_backend(second_order=True)  # DeepSpeed as launcher and process group only
    assert "DeepSpeed ZeRO-0" in caplog.text and "stays replicated" in caplog.text
