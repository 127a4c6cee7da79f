"""Metrics tracking: a local ``metrics.jsonl`` always, Weights & Biases optionally, main rank only.

``run_dir/metrics.jsonl`` is the record of truth: one JSON object per :meth:`Tracker.log` call,
``{"step": ..., "time": <unix seconds>, <metric>: <number>, ...}``. It needs no service and is what
tests and plots read. On resume from a checkpoint at step ``s``, lines with ``step > s`` (logged after
that checkpoint, before the job died) are dropped, so every step appears once, from the timeline that
continues. W&B cannot rewind a run: it ignores points at steps at or below the last one it received, so
its history keeps the pre-preemption values for those steps; compare against the jsonl when in doubt.

The W&B run id is kept in ``run_dir/wandb_run_id.txt`` so a requeued job continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import platform
import secrets
import string
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.checkpoint import git_revision
from pipeline.config import ConfigError
from pipeline.fileio import atomic_write

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RUN_INFO_FILE = "run_info.json"
RUN_ID_FILE = "wandb_run_id.txt"
_RESERVED = ("step", "time")


@dataclass(frozen=True)
class TrackingConfig:
    """Where metrics go (``metrics.jsonl`` is always written on the main rank)."""

    wandb_mode: str = "offline"
    """``online``, ``offline`` or ``disabled``. Default ``offline``: it needs no account and no network
    (compute nodes often have neither), yet keeps a full W&B record under ``run_dir/wandb`` that
    ``wandb sync`` uploads later; ``online`` must be asked for explicitly so nothing leaves the machine
    by surprise. Use ``disabled`` in tests and quick runs to skip the W&B start-up cost."""
    project: str = "clip-meta-prompts"
    """W&B project name."""
    entity: str = ""
    """W&B entity (user or team); empty = the account's default entity."""
    group: str = ""
    """W&B group, to see the runs of one sweep or of several seeds together; empty = no group."""
    name: str = ""
    """W&B display name; empty = W&B picks one."""
    tags: tuple[str, ...] = ()
    """W&B tags (each at most 64 characters)."""
    log_every: int = 10
    """Log training metrics every this many steps (see :meth:`Tracker.should_log`)."""
    progress_every_s: float = 60.0
    """When stderr is not a terminal (SLURM logs), print one progress line (step, rate, ETA, loss) every this
    many seconds instead of a progress bar; 0 = none. On a terminal a tqdm bar is shown."""

    def validate(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"tracking.wandb_mode={self.wandb_mode!r}: expected one of {WANDB_MODES}")
        if self.log_every < 1:
            raise ConfigError(f"tracking.log_every={self.log_every} must be >= 1")
        if self.progress_every_s < 0:
            raise ConfigError(f"tracking.progress_every_s={self.progress_every_s} must be >= 0 (0 = no lines)")
        if self.wandb_mode != "disabled" and not self.project:
            raise ConfigError("tracking.project must not be empty unless tracking.wandb_mode=disabled")
        for tag in self.tags:
            if not tag or len(tag) > 64:
                raise ConfigError(f"tracking.tags: {tag!r} must have 1 to 64 characters")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, where ``platform.processor()`` is usually empty);
    ``platform.processor()`` elsewhere, ``""`` when neither knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _new_run_id() -> str:
    # Same alphabet and length as W&B's own ids, without depending on its internal helpers.
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _scalar(key: str, value: Any) -> Any:
    """A JSON/W&B-friendly number for a metric value (tensors and numpy scalars become floats)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r}: tensor with shape {tuple(value.shape)} is not a scalar")
        return float(value.detach().cpu().item())
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalars / 0-d arrays
        return float(value.item())
    raise TypeError(f"metric {key!r}: unsupported type {type(value).__name__}")


class Tracker:
    """Logs metrics on the main rank to ``metrics.jsonl`` and, unless disabled, to W&B.

    Args:
        run_dir: the run folder (checkpoints, metrics and the W&B folder live here).
        cfg: tracking settings.
        config_dict: the resolved run config, logged as the W&B config and in ``run_info.json``.
        is_main: only the main rank writes anything; on other ranks every method is a no-op.
        resume: continue a previous run in ``run_dir`` (append to its jsonl, reuse its W&B run id).
            Without it an existing ``metrics.jsonl`` is replaced: it is a new run.
        resume_step: with ``resume``, the checkpoint step resumed from: jsonl lines with a later step
            are dropped. ``None`` keeps every line.
    """

    def __init__(self, run_dir: str | Path, cfg: TrackingConfig, config_dict: dict[str, Any],
                 is_main: bool = True, resume: bool = False, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.is_main = is_main
        self.run = None  # the wandb Run, when W&B is on
        self._file = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / METRICS_FILE
        if resume:
            self._rewind(metrics, resume_step)
        elif metrics.exists():
            log.warning("%s exists but resume=False: starting a new metrics file", metrics)
            metrics.unlink()
        self._file = open(metrics, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self.git_revision = git_revision()
        self.run_id = self._run_id(resume) if cfg.wandb_mode != "disabled" else None
        info = {"config": config_dict, "git_revision": self.git_revision, "wandb_run_id": self.run_id,
                "resumed": resume, "resume_step": resume_step, "started": time.time()}
        atomic_write(self.run_dir / RUN_INFO_FILE, lambda f: f.write(json.dumps(info, indent=1).encode()))
        if cfg.wandb_mode != "disabled":
            import wandb  # imported here: it takes ~1 s and is not needed when disabled

            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity or None, group=cfg.group or None,
                name=cfg.name or None, tags=list(cfg.tags) or None, dir=str(self.run_dir),
                mode=cfg.wandb_mode, id=self.run_id, resume="allow",
                config={**config_dict, "git_revision": self.git_revision},
            )

    # -------------------------------------------------------------- setup helpers
    def _run_id(self, resume: bool) -> str:
        path = self.run_dir / RUN_ID_FILE
        if resume and path.exists():
            return path.read_text(encoding="utf-8").strip()
        if resume:
            log.warning("resume=True but %s is missing: starting a new W&B run", path)
        run_id = _new_run_id()
        # Persisted before wandb.init so a job killed during start-up still resumes the same run.
        atomic_write(path, lambda f: f.write(run_id.encode() + b"\n"))
        return run_id

    @staticmethod
    def _rewind(metrics: Path, resume_step: int | None) -> None:
        """Keep the lines up to ``resume_step``; drop a torn last line of a killed writer."""
        if not metrics.exists():
            return
        kept, dropped = [], 0
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if resume_step is None or step <= resume_step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            log.info("%s: dropped %d lines after step %s or unreadable", metrics, dropped, resume_step)
            atomic_write(metrics, lambda f: f.write("".join(x + "\n" for x in kept).encode()))

    # -------------------------------------------------------------- logging
    def should_log(self, step: int) -> bool:
        """Whether ``step`` is a logging step. The same on every rank, so ranks can all-reduce metrics
        in lockstep before the main rank logs them."""
        return step % self.cfg.log_every == 0

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record ``metrics`` at ``step`` (tensors/numpy scalars converted to floats)."""
        if not self.is_main:
            return
        if self._file is None:
            raise RuntimeError("Tracker.log after finish()")
        clean = {k: _scalar(k, v) for k, v in metrics.items()}
        for key in _RESERVED:
            if key in clean:
                raise ValueError(f"metric name {key!r} is reserved in {METRICS_FILE}")
        # Python's json writes NaN/Infinity, which its reader accepts: a diverged loss stays visible.
        self._file.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        self._file.flush()  # a killed job keeps everything logged so far
        if self.run is not None:
            self.run.log(clean, step=int(step))

    def summary(self, values: dict[str, Any]) -> None:
        """Final/best values of the run: merged into ``summary.json`` and the W&B summary."""
        if not self.is_main:
            return
        clean = {k: _scalar(k, v) for k, v in values.items()}
        path = self.run_dir / SUMMARY_FILE
        merged = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        merged.update(clean)
        atomic_write(path, lambda f: f.write(json.dumps(merged, indent=1).encode()))
        if self.run is not None:
            self.run.summary.update(clean)

    def finish(self, exit_code: int = 0) -> None:
        """Close the jsonl and end the W&B run; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


class LineProgress:
    """Progress for logs that are not a terminal: one line on stderr every ``every_s`` seconds,
    ``<desc>: step 120/2000 (6%), 3.1 steps/s, ETA 10m07s, outer_loss=1.234``, and one at the end.

    Offers the part of tqdm's interface the loops use (``update``, ``set_postfix``, ``close``).
    """

    def __init__(self, total: int, desc: str, every_s: float, stream=None):
        self.total, self.desc, self.every_s = total, desc, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.n, self._start_n = 0, None
        self._t0 = self._last = time.monotonic()
        self.postfix: dict[str, Any] = {}

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps. The first call sets the starting position (the loops pass the step they
        resume from, often 0), so a resumed run's rate and ETA count only the steps it ran itself."""
        self.n += n
        now = time.monotonic()
        if self._start_n is None:
            self._start_n, self._t0, self._last = self.n, now, now
            return
        if now - self._last >= self.every_s:
            self._last = now
            self._print(now)

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the next line (e.g. the latest loss)."""
        self.postfix.update(values)

    def _print(self, now: float) -> None:
        done = self.n - (self._start_n or 0)
        rate = done / max(now - self._t0, 1e-9)
        parts = [f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)",
                 f"{rate:.2f} steps/s"]
        if rate > 0 and self.total > self.n:
            eta = int((self.total - self.n) / rate)
            parts.append(f"ETA {eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s")
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.postfix.items()]
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self.n:
            self._print(time.monotonic())


def progress(iterable_or_total: Iterable | int, is_main: bool, desc: str = "", force: bool = False,
             every_s: float = 0.0, **kwargs: Any) -> tqdm | LineProgress:
    """A tqdm bar on the main rank only; also off when stderr is not a terminal (SLURM logs) unless
    ``force``. Pass an iterable to wrap it, or an int for a bar updated by hand (``bar.update(n)``).

    With ``every_s > 0`` and an ``int`` total, a non-terminal stderr gets :class:`LineProgress` lines on
    the main rank instead of nothing.
    """
    tty = force or sys.stderr.isatty()
    if isinstance(iterable_or_total, int) and is_main and not tty and every_s > 0:
        return LineProgress(iterable_or_total, desc, every_s)
    disable = not is_main or not tty
    if isinstance(iterable_or_total, int):
        return tqdm(total=iterable_or_total, desc=desc, disable=disable, **kwargs)
    return tqdm(iterable_or_total, desc=desc, disable=disable, **kwargs)
