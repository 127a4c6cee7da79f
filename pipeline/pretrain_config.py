"""Typed configuration of stage 1, meta-pretraining (docs/ARCHITECTURE.md section 4).

The schema behind ``configs/pretrain/*.yaml`` and ``pipeline/pretrain.py``'s command line; the loop that
runs it is :mod:`pipeline.pretrain_loop`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import ConfigError, ModelConfig
from pipeline.data.episodes import EpisodeConfig
from pipeline.data.task_stream import TaskDataConfig
from pipeline.meta.config import LossConfig, MetaConfig, RegulatorConfig, validate_meta_learning
from pipeline.tracking import TrackingConfig
from pipeline.zeroshot import resolve_templates


@dataclass(frozen=True)
class OptimConfig:
    """Outer optimisation of the prompts (one AdamW with a prompts group and a regulator group, whose
    ``lr``, ``weight_decay``, clip and ``eps`` are under ``regulator``; linear warmup then cosine decay)."""

    steps: int = 2000
    """Outer steps."""
    lr: float = 2e-3
    """Peak learning rate of the prompts (the regulator has its own, ``regulator.lr``)."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the prompts."""
    warmup_steps: int = 100
    """Linear warmup from 0 to the peak learning rates."""
    min_lr_ratio: float = 0.0
    """Cosine decay ends at this fraction of the peak learning rates."""
    grad_clip: float = 1.0
    """Clip the global norm of the prompts' averaged meta-gradient; 0 = off. The regulator's is clipped
    apart (``regulator.grad_clip``), so the prompts' much larger norm never shrinks it."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpointing and resume."""

    every: int = 200
    """Save every this many outer steps (and at the end, and on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Checkpoints kept on disk."""
    resume: bool = True
    """Continue from the newest loadable checkpoint in ``run_dir`` when there is one."""


@dataclass(frozen=True)
class PretrainConfig:
    """Stage-1 meta-pretraining (docs/ARCHITECTURE.md section 4)."""

    run_dir: str = "runs/pretrain"
    """Run folder: checkpoints, metrics.jsonl, W&B files and the artifact."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Frozen backbone and prompt learner."""
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    """Shards and their clustering."""
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    """N-way K-shot task sampling."""
    regulator: RegulatorConfig = field(default_factory=RegulatorConfig)
    """Gradient regulator (identical in stage 2)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights and mixup."""
    meta: MetaConfig = field(default_factory=MetaConfig)
    """Inner/outer step settings."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Outer optimiser and schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """W&B and the local metrics file."""
    tasks_per_step: int = 4
    """Tasks per outer step over all ranks (must be divisible by the number of ranks)."""
    frozen_templates: tuple[str, ...] = ("{}",)
    """Templates of the frozen text teacher g_0 of concept names (``{}`` = the name itself, a caption), or
    named sets such as ``@imagenet7`` (:func:`pipeline.zeroshot.resolve_templates`)."""
    mixed_precision: str = "no"
    """``no`` or ``bf16`` (autocast on GPU; regulator and optimizer state stay fp32)."""
    cpu: bool = False
    """Run on the CPU even when a GPU is visible."""
    threads: int = 0
    """CPU intra-op threads per process (``torch.set_num_threads``); 0 = torch's default (``OMP_NUM_THREADS``,
    else every core). More threads than free cores is catastrophic with these small operators: give each
    process its share of the cores."""
    max_nonfinite: int = 10
    """Abort after this many consecutive steps with a non-finite loss or meta-gradient (each is skipped)."""
    collective_timeout_s: float = 600.0
    """A collective waiting longer than this (a rank died) ends the job with an error instead of a hang."""
    seed: int = 0
    """Seed of the task streams and mixup."""
    artifact: str = ""
    """Where to write the artifact; empty = ``<run_dir>/artifact.pt``."""

    def validate(self) -> None:
        validate_meta_learning(self.regulator, self.loss, self.meta)
        if not self.run_dir.strip():  # an empty path would scatter run files over the working directory
            raise ConfigError("run_dir is empty: give the run folder (checkpoints, metrics, artifact go there)")
        if self.tasks_per_step < 1:
            raise ConfigError(f"tasks_per_step={self.tasks_per_step} must be >= 1")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r}: expected 'no' or 'bf16' (fp16 would "
                              "need loss scaling around autograd.grad)")
        if self.model.prompts.type == "none":
            raise ConfigError("model.prompts.type=none has nothing to meta-learn")
        for key in ("steps", "warmup_steps"):
            if getattr(self.optim, key) < 0:
                raise ConfigError(f"optim.{key} must be >= 0")
        if self.checkpoint.every < 1 or self.checkpoint.keep_last < 1:
            raise ConfigError("checkpoint.every and checkpoint.keep_last must be >= 1")
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads} must be >= 0 (0 = torch's default)")
        if self.max_nonfinite < 1:
            raise ConfigError(f"max_nonfinite={self.max_nonfinite} must be >= 1")
        try:  # a template without {} would give every concept the same text
            resolve_templates(self.frozen_templates, "{}")
        except ValueError as e:
            raise ConfigError(f"frozen_templates: {e}") from None
