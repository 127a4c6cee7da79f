"""Everything distributed: the only module touching torch.distributed, accelerate and DeepSpeed.

The meta-learner is *not* wrapped in DDP: DDP does not all-reduce gradients taken with
``torch.autograd.grad`` or second-order gradients. Instead each rank computes its meta-gradient locally,
the trainable tensors' gradients are flattened into one buffer and all-reduced (mean) once per outer
step, and every rank applies the same optimizer step. Parameters are broadcast from rank 0 at start.

accelerate owns launching, device placement, mixed precision and the process group; this module also
maps SLURM's variables to the torch ones when a job starts one task per GPU with plain ``srun``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.config import ConfigError
from pipeline.inputs import require_file

log = logging.getLogger(__name__)


def slurm_to_torch_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Torch launcher variables derived from SLURM's, for ``srun python ...`` (one task per GPU).

    Returns only what is missing: nothing when RANK is already set (torchrun / accelerate launched us)
    or when not inside a SLURM step.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
    }
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = first_host(env.get("SLURM_JOB_NODELIST", "localhost"))
    if "MASTER_PORT" not in env:
        # a job-specific port, so two jobs sharing a node do not collide
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def array_task_id(environ: Mapping[str, str] | None = None) -> int | None:
    """This SLURM array task's index, or None outside an array job."""
    env = os.environ if environ is None else environ
    value = env.get("SLURM_ARRAY_TASK_ID")
    return int(value) if value not in (None, "") else None


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list (``node[01-04]`` -> ``node01``) via ``scontrol show hostnames``."""
    if not any(c in nodelist for c in "[],"):
        return nodelist
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def launcher_world_size(environ: Mapping[str, str]) -> int | None:
    """How many ranks the launcher starts, from ``WORLD_SIZE`` (accelerate, torchrun) or the SLURM
    variables; ``None`` when nothing says (a plain ``python`` run)."""
    world = environ.get("WORLD_SIZE") or slurm_to_torch_env(environ).get("WORLD_SIZE")
    if world and world.strip().isdigit() and int(world) > 0:
        return int(world)
    return None


def launcher_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank as the launcher says (``RANK``, else SLURM's), before any process
    group exists; 0 for a plain ``python`` run. For work that must happen once before training starts."""
    env = os.environ if environ is None else environ
    rank = env.get("RANK") or slurm_to_torch_env(env).get("RANK") or "0"
    if not rank.strip().isdigit():
        raise ConfigError(f"RANK={rank!r} from the launcher is not a non-negative integer")
    return int(rank)


def check_launcher(tasks_per_step: int, second_order: bool, environ: Mapping[str, str]) -> None:
    """The launcher's settings, read from the variables accelerate / torchrun / SLURM export, against
    stage 1's config, before a process group starts: ``tasks_per_step`` must split evenly over the ranks,
    and DeepSpeed is accepted only as the launcher and process group (``zero_stage: 0``,
    launch/accelerate/deepspeed.yaml). Stage 1 builds no DeepSpeed engine (it all-reduces its
    meta-gradients itself and steps its own AdamW), so everything DeepSpeed would add is refused rather
    than accepted and ignored: ZeRO stages 1 and 2 (nothing would be partitioned; accelerate's default
    when no stage is given is 2), ZeRO-3 (it partitions the parameters the functional inner loop reads;
    accelerate would otherwise fail on an unrelated import, or, with ``cpu=true``, silently drop
    DeepSpeed), gradient clipping, accumulation, offloading and a JSON ``optimizer``/``scheduler``
    (launch/README.md, DeepSpeed). ``Distributed.check_backend`` repeats these checks once the plugin
    exists, for launchers that export nothing."""
    world = launcher_world_size(environ)
    if world and tasks_per_step % world:
        raise ConfigError(f"tasks_per_step={tasks_per_step} is not divisible by the {world} ranks the "
                          f"launcher starts (WORLD_SIZE={world}); use a multiple of {world}")
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is None:
        stage, source = "2", "ACCELERATE_DEEPSPEED_ZERO_STAGE not set: accelerate's default is ZeRO-2"
    else:
        source = f"ACCELERATE_DEEPSPEED_ZERO_STAGE={stage}"
    # DeepSpeed settings the stage-1 loop would never apply (it builds no DeepSpeed engine), as (where, value)
    settings = {
        "gradient_clipping": ("ACCELERATE_GRADIENT_CLIPPING", environ.get("ACCELERATE_GRADIENT_CLIPPING")),
        "gradient_accumulation_steps": ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                                        environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")),
        "offload_optimizer_device": ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
                                     environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")),
        "offload_param_device": ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
                                 environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")),
    }
    ds_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if ds_file and ds_file != "none":  # a DeepSpeed JSON config file wins over the accelerate fields
        path = require_file(ds_file, "ACCELERATE_DEEPSPEED_CONFIG_FILE (deepspeed_config_file of the launcher "
                            "config)")
        try:
            ds = json.loads(path.read_text())
            zero = ds.get("zero_optimization", {})
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"deepspeed_config_file {path}: not a DeepSpeed JSON config ({e})") from None
        if isinstance(zero, dict) and str(zero.get("stage", "auto")) != "auto":
            stage = zero["stage"]
            source = f"zero_optimization.stage={stage} in {path}"
        for key in ("gradient_clipping", "gradient_accumulation_steps", "optimizer", "scheduler"):
            if key in ds:
                settings[key] = (f"{key} in {path}", ds[key])
        for key in ("offload_optimizer", "offload_param"):
            if isinstance(zero, dict) and isinstance(zero.get(key), dict):
                settings[f"{key}_device"] = (f"zero_optimization.{key}.device in {path}", zero[key].get("device"))
    if str(stage).strip() != "0":
        raise zero_stage_error(stage, source, second_order)
    ignored = [f"{where}={value}" for name, (where, value) in settings.items()
               if not _inert_deepspeed_setting(name, value)]
    if ignored:
        raise ConfigError(
            f"DeepSpeed settings {', '.join(ignored)} would have no effect: stage 1 keeps its trainable state "
            "(prompts + regulator) replicated, reduces its meta-gradients with one explicit all-reduce and steps "
            "its own AdamW, so DeepSpeed's optimizer, scheduler, clipping, accumulation and offloading never run. "
            "Use the stage-1 config instead (optim.grad_clip / regulator.grad_clip, tasks_per_step, "
            "optim.lr / regulator.lr) and remove them from the launcher config (launch/README.md, DeepSpeed)")


def _inert_deepspeed_setting(name: str, value) -> bool:
    """Whether a DeepSpeed setting the loop does not apply is unset or at a value that changes nothing."""
    text = str(value).strip().lower() if value is not None else "none"
    if name in ("optimizer", "scheduler"):
        return value is None
    if name == "gradient_clipping":
        return text in ("none", "auto", "", "0", "0.0")
    if name == "gradient_accumulation_steps":
        return text in ("none", "auto", "", "1")
    return text in ("none", "")  # offload devices


def zero_stage_error(stage: int | str, source: str, second_order: bool) -> ConfigError:
    """The refusal of a DeepSpeed ZeRO stage other than 0 (launch/README.md, DeepSpeed), before launch
    and at run time alike. ZeRO-3 cannot work; ZeRO-1/2 would be accepted and do nothing."""
    stage = str(stage).strip()
    if stage == "3":
        why = ("partitions parameters across ranks and cannot be combined with the meta-learner's functional "
               "inner loop" + (" (second-order meta-gradients: meta.first_order=false)" if second_order else ""))
    else:
        why = ("would be accepted and do nothing: stage 1 builds no DeepSpeed engine (it all-reduces its "
               "meta-gradients itself and steps its own AdamW), and its trainable state (prompts + regulator) "
               "is ~4 MB fp32, so partitioning it would save at most ~12 MB per GPU")
    return ConfigError(
        f"DeepSpeed ZeRO-{stage} ({source}) {why}; set zero_stage: 0 in the launcher config (DeepSpeed as "
        "launcher and process group only: launch/accelerate/deepspeed.yaml) or use launch/accelerate/multi_gpu.yaml "
        "(launch/README.md, DeepSpeed)")


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer rank died, hung or lost its connection."""


@contextlib.contextmanager
def _collective(name: str, rank: int, world_size: int, timeout_s: float):
    """Turn the backends' errors (gloo/NCCL timeouts, closed connections) into one clear message."""
    try:
        yield
    except (RuntimeError, dist.DistError) as err:
        if isinstance(err, CollectiveError):
            raise
        raise CollectiveError(
            f"rank {rank}/{world_size}: collective {name} failed: a peer rank died, hung or lost its connection "
            f"(collective_timeout_s={timeout_s:g}); the job stops here rather than hang. The newest complete "
            f"checkpoint is intact: rerun the same command to resume. Backend error: {str(err).splitlines()[0]}"
        ) from err


class Distributed:
    """Process group, device and precision for one run, plus the explicit collectives we need.

    Args:
        mixed_precision: ``no`` | ``bf16`` | ``fp16`` (accelerate's names); bf16 autocast on GPU.
        cpu: force the CPU even when a GPU is visible.
        timeout_s: collective timeout; a dead rank ends the job with an error instead of a hang.
    """

    def __init__(self, mixed_precision: str = "no", cpu: bool = False, timeout_s: float = 600.0):
        for key, value in slurm_to_torch_env().items():
            os.environ[key] = value
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        handler = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))
        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=[handler])
        self.mixed_precision = mixed_precision
        self.timeout_s = timeout_s

    def _guard(self, name: str):
        return _collective(name, self.rank, self.world_size, self.timeout_s)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def local_rank(self) -> int:
        return self.accelerator.local_process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def distributed_type(self) -> str:
        return str(self.accelerator.distributed_type).split(".")[-1]

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def autocast(self):
        """bf16/fp16 autocast on accelerators when configured; a no-op on CPU and in fp32."""
        if self.mixed_precision == "no" or self.device.type == "cpu":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def check_backend(self, second_order: bool) -> None:
        """Fail fast on combinations that cannot work or would do nothing (docs/ARCHITECTURE.md section 7):
        with accelerate's DeepSpeed plugin active, only ZeRO stage 0 without clipping, accumulation or
        offloading is accepted, as in ``check_launcher``."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and self.is_main:
                # accelerate drops DeepSpeed without a word on the CPU (cpu=true or no GPU): say so
                log.warning("the launcher config asks for DeepSpeed but accelerate runs without it here (%s, "
                            "device %s); the run continues with plain all-reduced data parallelism",
                            self.distributed_type, self.device)
            return
        stage = getattr(plugin, "zero_stage", 0)
        if str(stage if stage is not None else 0).strip() != "0":
            raise zero_stage_error(stage, f"zero_stage={stage} in accelerate's DeepSpeed plugin", second_order)
        ignored = [f"{name}={getattr(plugin, name, None)}" for name in
                   ("gradient_clipping", "gradient_accumulation_steps", "offload_optimizer_device",
                    "offload_param_device") if not _inert_deepspeed_setting(name, getattr(plugin, name, None))]
        if ignored:  # the same refusal as check_launcher, for launchers that export nothing
            raise ConfigError(f"DeepSpeed plugin settings {', '.join(ignored)} would have no effect: stage 1 "
                              "builds no DeepSpeed engine; use optim.grad_clip / regulator.grad_clip and "
                              "tasks_per_step instead (launch/README.md, DeepSpeed)")
        if self.is_main:  # bench/gpu_check.py reads this line to tell that the plugin was active
            log.warning("DeepSpeed ZeRO-0: DeepSpeed provides the launcher and process group only; the "
                        "meta-learner's state (prompts + regulator) stays replicated, is reduced by one explicit "
                        "all-reduce and stepped by the pipeline's AdamW (launch/README.md, DeepSpeed)")

    # ------------------------------------------------------------------ collectives
    @torch.no_grad()
    def broadcast_(self, tensors: Iterable[Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values (one flat collective)."""
        tensors = list(tensors)
        if not self.active or not tensors:
            return
        device = self._collective_device()  # NCCL only moves CUDA tensors, gloo only CPU ones
        flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
        with self._guard("broadcast"):
            dist.broadcast(flat, src=src)
        _unflatten_into(flat, tensors)

    @torch.no_grad()
    def all_reduce_mean_(self, tensors: Iterable[Tensor]) -> int:
        """Average ``tensors`` (e.g. meta-gradients) over ranks in place; returns the payload in bytes.

        One flat fp32 (or fp64, when any input is fp64) buffer means one collective per outer step.
        """
        tensors = list(tensors)
        if not tensors:
            return 0
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        # on the backend's device: metrics live on the CPU, gradients on the accelerator, NCCL takes CUDA only
        device = self._collective_device() if self.active else tensors[0].device
        flat = torch.cat([t.reshape(-1).to(device=device, dtype=dtype) for t in tensors])  # [sum of numels]
        if self.active:
            with self._guard("all_reduce"):
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            _unflatten_into(flat, tensors)
        return flat.numel() * flat.element_size()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (e.g. a preemption signal on one node)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        with self._guard("any"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (small picklable values such as counters), on every rank."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world_size
        with self._guard("all_gather_object"):
            dist.all_gather_object(out, obj)
        return out

    def verify_identical(self, tensors: Iterable[Tensor]) -> str:
        """SHA-256 of the tensors' bytes, checked equal on every rank; raises when ranks diverged."""
        digest = tensor_digest(tensors)
        digests = self.gather_objects(digest)
        if len(set(digests)) > 1:
            raise RuntimeError(f"ranks diverged: parameter digests differ across ranks {digests}")
        return digest

    def barrier(self) -> None:
        if self.active:
            with self._guard("barrier"):
                dist.barrier()

    def shutdown(self) -> None:
        """Tear down the process group (idempotent)."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def tensor_digest(tensors: Iterable[Tensor]) -> str:
    """SHA-256 over the exact bytes of ``tensors`` (bit-level identity check)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _unflatten_into(flat: Tensor, tensors: list[Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
        offset += n
