"""DeepSpeed ZeRO executing stage 1's outer step on the CPU (gloo), against the plain path.

What is checked: two ranks, each computing its task's second-order meta-gradient with the pipeline's own
``meta_step`` (prompts + regulator, tiny backbone), hand the gradients to a DeepSpeed engine wrapping the
prompts and the regulator (``deepspeed.initialize`` with the pipeline's two-group AdamW as client
optimizer); DeepSpeed reduces them over the ranks (ZeRO-1: all-reduce, optimizer state partitioned;
ZeRO-2: reduce-scatter, gradients and optimizer state partitioned) and takes the optimizer step. The
result must equal one process computing both tasks and stepping a plain AdamW (the pipeline's plain
path: N ranks equal one rank, docs/ARCHITECTURE.md section 7), on both ranks.

How the meta-gradient reaches DeepSpeed: the meta-step takes ``torch.autograd.grad`` (second order)
outside the engine; ``engine.backward`` is then called on ``sum(p * g.detach())``, whose gradient with
respect to ``p`` is exactly ``g`` (one multiply by 1.0), so DeepSpeed's gradient hooks, reduction and
optimizer run on the true meta-gradient. Calling the engine's forward inside the meta-step does not work:
its backward hooks fire during the inner ``autograd.grad`` (stage 0: "Direct calls to tensor.backward()
are not supported in this configuration"; stages 1-2: ``IndexError`` in ``reduce_ipg_grads``), recorded
in launch/README.md.

Tolerance: the state is fp32. With two ranks the results are bit-identical (measured: difference 0):
halving is exact in binary floating point, so DeepSpeed's ``g0 / 2 + g1 / 2`` equals the loop's
``0.5 * g0 + 0.5 * g1``. A backend that sums in another order (more ranks, a ring all-reduce) may differ in
the last bits of the averaged gradient (relative ~1e-7), which AdamW's normalised update keeps at that
level; 1e-6 absolute allows a few ulps of the ~0.1-1 magnitudes here and is 3e4x below the ~3e-2 the three
steps move the parameters (checked, so an update that never happened cannot pass).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS, TASKS, LR = 3, 2, 1e-2


def build(seed: int = 0):
    """Tiny prompted model, objective, prompts and regulator; identical in every process for a seed."""
    from pipeline.backbone import load_backbone
    from pipeline.config import BackboneConfig, PromptConfig
    from pipeline.meta.config import LossConfig, RegulatorConfig
    from pipeline.meta.objective import Objective
    from pipeline.meta.regulator import Regulator
    from pipeline.prompts import PromptedCLIP

    backbone = load_backbone(BackboneConfig(arch="tiny-vit-s", pretrained=""), seed=seed)
    model = PromptedCLIP(backbone, PromptConfig(type="ivlp", depth_text=2, depth_vision=2),
                         generator=torch.Generator().manual_seed(seed))
    prompts = model.initial_prompts()
    torch.manual_seed(seed)
    regulator = Regulator.for_prompts(prompts, RegulatorConfig(hidden=16))
    return Objective(model, LossConfig(), templates=("{}",)), prompts, regulator


def task(step: int, slot: int, size: int):
    """Support and query of task ``slot`` at ``step``: a function of (step, slot) only, never of the rank."""
    from pipeline.meta.objective import Batch

    g = torch.Generator().manual_seed(1000 * step + slot)
    names = tuple(f"thing {i}" for i in range(2))
    labels = torch.tensor([0, 0, 1, 1])
    support = Batch(torch.randn(4, 3, size, size, generator=g), labels, names)
    query = Batch(torch.randn(4, 3, size, size, generator=g), labels, names)
    return support, query


def meta_gradients(objective, prompts, regulator, step: int, slots) -> list[torch.Tensor]:
    """Mean over ``slots`` of the meta-gradients (prompts, then regulator parameters), as the stage-1 loop
    accumulates them (the mean over this rank's tasks; the mean over ranks follows)."""
    from pipeline.meta.config import MetaConfig
    from pipeline.meta.step import meta_step

    size = objective.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    params = list(prompts.values()) + [p for p in regulator.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    for slot in slots:
        support, query = task(step, slot, size)
        gen = torch.Generator().manual_seed(step * 1_009 + slot)
        r = meta_step(objective, prompts, regulator, support, query, MetaConfig(inner_lr=0.01), gen)
        flat = [r.prompt_grads[k] for k in prompts] + [r.regulator_grads[n] for n, p in regulator.named_parameters()
                                                       if p.requires_grad]
        for a, g in zip(acc, flat):
            a.add_(g.detach(), alpha=1.0 / len(slots))
    return acc


def optimizer(prompts, regulator) -> torch.optim.AdamW:
    return torch.optim.AdamW([{"params": list(prompts.values()), "lr": LR, "weight_decay": 0.0},
                              {"params": list(regulator.parameters()), "lr": LR, "weight_decay": 0.0}])


def state_of(prompts, regulator) -> dict[str, list]:
    out = {f"prompts.{k}": v.detach().reshape(-1).tolist() for k, v in prompts.items()}
    out.update({f"regulator.{k}": v.detach().reshape(-1).tolist() for k, v in regulator.state_dict().items()})
    return out


def plain(steps: int = STEPS) -> dict[str, list]:
    """One process, every task, a plain AdamW step: the reference."""
    objective, prompts, regulator = build()
    opt = optimizer(prompts, regulator)
    params = list(prompts.values()) + list(regulator.parameters())
    for step in range(steps):
        for p, g in zip(params, meta_gradients(objective, prompts, regulator, step, range(TASKS))):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
    return state_of(prompts, regulator)


def worker(stage: int, out: Path) -> None:
    """One rank of the DeepSpeed run (started by torchrun)."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    objective, prompts, regulator = build()

    class MetaState(torch.nn.Module):  # the trainable state as one module, for deepspeed.initialize
        def __init__(self):
            super().__init__()
            self.prompts = torch.nn.ParameterDict(prompts)
            self.regulator = regulator

    state = MetaState()
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine, ds_opt, _, _ = deepspeed.initialize(model=state, optimizer=optimizer(prompts, regulator), config=cfg)
    params = list(prompts.values()) + list(regulator.parameters())
    for step in range(STEPS):
        grads = meta_gradients(objective, prompts, regulator, step, range(rank, TASKS, world))
        engine.backward(sum((p * g).sum() for p, g in zip(params, grads)))
        engine.step()
    record = {"rank": rank, "world": world, "optimizer": type(ds_opt).__name__, "state": state_of(prompts, regulator)}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in a)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return plain(), plain(steps=0)


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_step_equals_the_plain_path(stage, reference, tmp_path):
    want, start = reference
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(_port()), __file__, "--stage", str(stage),
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert ranks[0]["state"] == ranks[1]["state"]  # both ranks hold the same state, bit for bit
    moved = _max_diff(want, start)
    diff = _max_diff(ranks[0]["state"], want)
    assert moved > 1e-3, "the steps did not change the parameters: the comparison would prove nothing"
    per_key = {k: _max_diff({k: ranks[0]["state"][k]}, {k: want[k]}) for k in want}
    assert diff < 1e-6, f"ZeRO-{stage} differs from the plain path by {diff:.3g} (moved by {moved:.3g}): {per_key}"


def test_deepspeed_settings_the_loop_would_ignore_are_refused(tmp_path):
    """Launcher settings that stage 1 would silently not apply are refused before launch, naming the key."""
    from pipeline.config import ConfigError
    from pipeline.distributed import check_launcher

    base = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}  # the stage accepted
    check_launcher(4, True, {**base, "ACCELERATE_GRADIENT_CLIPPING": "auto",
                             "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
                             "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none"})
    for key, value in [("ACCELERATE_GRADIENT_CLIPPING", "1.0"), ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4"),
                       ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu"),
                       ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "nvme")]:
        with pytest.raises(ConfigError, match=f"{key}={value} would have no effect.*optim.grad_clip"):
            check_launcher(4, True, {**base, key: value})
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}},
                              "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError) as e:
        check_launcher(4, True, {**base, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)})
    assert f"optimizer in {ds}=" in str(e.value) and f"zero_optimization.offload_optimizer.device in {ds}=cpu" in str(e.value)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    worker(a.stage, a.out)
