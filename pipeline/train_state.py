"""One training state for both stages: what a checkpoint holds and how a run resumes from it.

Stage 1 (:mod:`pipeline.pretrain_loop`) and stage 2 (:mod:`pipeline.finetune_loop`) keep their live
training objects in a :class:`TrainState` and save and restore them through it, so resume has a single
implementation and one set of keys (docs/ARCHITECTURE.md section 9)::

    {"format": 2, "step": int, "epoch": int,
     "prompts": {name: Tensor}, "regulator": state_dict,
     "optimizers": {name: state_dict}, "schedulers": {name: state_dict},
     "rng": rng_state(), "counters": {name: int}, "data": {plain data: stream counters, position},
     ...extra (config, digest, world_size)}

Checkpoints written before this layout (``format`` absent: stage 1's ``optimizer``/``scheduler``/
``nonfinite_total``/``data_counters`` keys, stage 2's ``sgd``/``sched``/``adamw``/``reg_sched``/
``nonfinite`` keys) are upgraded on load by :func:`upgrade_state`, so runs started by older code resume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pipeline.config import ConfigError, flatten

log = logging.getLogger(__name__)

STATE_FORMAT = 2
"""Version of the checkpoint key layout; 1 is the pair of per-stage layouts :func:`upgrade_state` reads."""


@dataclass
class TrainState:
    """The live objects of a training run, saved and restored together.

    ``prompts``, ``regulator``, ``optimizers`` and ``schedulers`` are the run's own objects (restored in
    place); ``step``, ``epoch``, ``counters`` (e.g. ``nonfinite_steps``) and ``data`` (plain data such as
    the stream counters) are the loop's position and bookkeeping. An optimizer or scheduler of ``None``
    (absent in this configuration) is neither saved nor expected.
    """

    prompts: dict[str, Tensor]
    regulator: nn.Module
    optimizers: dict[str, torch.optim.Optimizer | None] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint payload (tensors and plain data only: loadable with ``weights_only=True``)."""
        return {
            "format": STATE_FORMAT, "step": int(self.step), "epoch": int(self.epoch),
            "prompts": {k: v.detach() for k, v in self.prompts.items()},
            "regulator": self.regulator.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items() if o is not None},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items() if s is not None},
            "rng": rng_state(), "counters": {k: int(v) for k, v in self.counters.items()},
            "data": self.data,
        }

    def load_state_dict(self, state: dict[str, Any], where: str = "checkpoint") -> None:
        """Restore everything from ``state`` (either layout); raises :class:`ConfigError` naming the key
        when the checkpoint does not fit this run (prompt shapes, regulator, optimizers present)."""
        state = upgrade_state(state)
        self._check_fits(state, where)
        with torch.no_grad():
            for k, v in self.prompts.items():
                v.copy_(state["prompts"][k])
        self.regulator.load_state_dict(state["regulator"])
        for kind, objects in (("optimizers", self.optimizers), ("schedulers", self.schedulers)):
            for name, obj in objects.items():
                if obj is not None:
                    obj.load_state_dict(state[kind][name])
        set_rng_state(state["rng"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.counters = {k: int(v) for k, v in state["counters"].items()}
        self.data = dict(state["data"])

    def _check_fits(self, state: dict[str, Any], where: str) -> None:
        have = {k: tuple(v.shape) for k, v in state["prompts"].items()}
        want = {k: tuple(v.shape) for k, v in self.prompts.items()}
        for key in sorted(set(have) | set(want)):
            if have.get(key) != want.get(key):
                raise ConfigError(f"{where}: prompts.{key} has shape {have.get(key, '(absent)')} in the checkpoint "
                                  f"but {want.get(key, '(absent)')} in this run's config (model.prompts.*); "
                                  "resume with the config the run started with, or use a new run folder")
        reg_have = {k: tuple(v.shape) for k, v in state["regulator"].items() if isinstance(v, Tensor)}
        reg_want = {k: tuple(v.shape) for k, v in self.regulator.state_dict().items()}
        if reg_have != reg_want:
            diff = sorted(k for k in set(reg_have) | set(reg_want) if reg_have.get(k) != reg_want.get(k))
            raise ConfigError(f"{where}: the regulator differs from this run's (regulator.kind / regulator.hidden?) "
                              f"at {diff[:3]}: checkpoint {[reg_have.get(k) for k in diff[:3]]}, run "
                              f"{[reg_want.get(k) for k in diff[:3]]}")
        for kind, objects in (("optimizers", self.optimizers), ("schedulers", self.schedulers)):
            saved = set(state[kind])
            wanted = {k for k, v in objects.items() if v is not None}
            if saved != wanted:
                raise ConfigError(f"{where}: holds {kind} {sorted(saved)} but this run has {sorted(wanted)} "
                                  "(a setting such as meta.meta_step changed since the run started); resume with "
                                  "the original config or use a new run folder")

    def save(self, run_dir: str | Path, keep_last: int, **extra: Any) -> Path:
        """Atomically write the state (plus ``extra`` plain data) as the checkpoint of ``self.step``."""
        return save_checkpoint(run_dir, self.step, {**extra, **self.state_dict()}, keep_last)

    def resume(self, run_dir: str | Path, config: dict[str, Any] | None = None,
               applied: tuple[str, ...] = ()) -> Path | None:
        """Restore from the newest loadable checkpoint in ``run_dir``; returns its path, or ``None``.

        With ``config`` (this run's config dict), the config the checkpoint was written under is compared
        first: keys under the ``applied`` prefixes may change on resume (each change is logged and takes
        effect from here on); any other change raises :class:`ConfigError` listing the keys, so the
        recorded config is always the one in effect.
        """
        path = latest_checkpoint(run_dir)
        if path is None:
            return None
        state = load_checkpoint(path, map_location="cpu")
        if config is not None:
            if isinstance(state.get("config"), dict):
                check_resume_config(state["config"], config, applied, where=str(path))
            else:
                log.warning("%s records no config (written by an older version): config changes since the run "
                            "started cannot be checked", path)
        self.load_state_dict(state, where=str(path))
        log.info("resumed from %s (step %d)", path, self.step)
        return path


ABSENT = "(absent)"
"""How :func:`config_changes` shows a setting one of the two configs does not have."""


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` of every setting that differs (:data:`ABSENT` where a
    config lacks the key). Lists and tuples compare equal when their items do (JSON turns tuples into lists).
    """
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
            if k not in a or k not in b or _plain(a[k]) != _plain(b[k])}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def is_under(key: str, prefixes: tuple[str, ...]) -> bool:
    """True when dotted ``key`` is one of ``prefixes`` or lies below one (``optim.lr`` under ``optim``)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_resume_config(old: dict[str, Any], new: dict[str, Any], applied: tuple[str, ...], where: str) -> None:
    """Refuse a resume whose config changed outside the ``applied`` keys; log the applied changes."""
    changes = config_changes(old, new)
    # a setting the checkpoint's config does not have was added by a newer version of this code: it takes
    # its value from now on (logged below), since the old run had no such choice to disagree with
    refused = {k: v for k, v in changes.items() if not is_under(k, applied) and v[0] is not ABSENT}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:8])
        raise ConfigError(f"{where} was written under another config, and these settings cannot change when a run "
                          f"resumes: {listed}. Resume with the original values, or start a new run folder "
                          f"(settings that may change on resume: {', '.join(applied) or 'none'})")
    for k, (a, b) in changes.items():
        log.warning("resume: %s changed %r -> %r (applied from the resumed step on)", k, a, b)


def upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` in the current key layout; checkpoints of either stage's earlier layout are converted."""
    fmt = state.get("format", 1)
    if fmt == STATE_FORMAT:
        return state
    if fmt != 1:
        raise CheckpointError(f"checkpoint format {fmt!r} is not one this code reads (<= {STATE_FORMAT}); "
                              "update the pipeline package")
    base = {k: v for k, v in state.items() if k not in _LEGACY_KEYS}
    if "optimizer" in state:  # stage 1: one AdamW over prompts and regulator
        return {**base, "format": STATE_FORMAT, "epoch": 0,
                "optimizers": {"meta": state["optimizer"]}, "schedulers": {"meta": state["scheduler"]},
                "counters": {"nonfinite_steps": int(state.get("nonfinite_total", 0))},
                "data": {"counters": dict(state.get("data_counters", {}))}}
    if "sgd" in state:  # stage 2: SGD on the prompts, AdamW on the regulator when it meta-learns
        optimizers, schedulers = {"prompts": state["sgd"]}, {"prompts": state["sched"]}
        if "adamw" in state:
            optimizers["regulator"], schedulers["regulator"] = state["adamw"], state["reg_sched"]
        return {**base, "format": STATE_FORMAT, "epoch": int(state["epoch"]), "optimizers": optimizers,
                "schedulers": schedulers, "counters": {"nonfinite_steps": int(state.get("nonfinite", 0))},
                "data": {}}
    raise CheckpointError("checkpoint has neither the stage-1 nor the stage-2 layout (no optimizer state)")


_LEGACY_KEYS = ("optimizer", "scheduler", "nonfinite_total", "data_counters", "sgd", "sched", "adamw", "reg_sched",
                "nonfinite")
