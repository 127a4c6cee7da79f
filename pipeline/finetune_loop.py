"""Stage 2 as a library: start-up checks, the skip-or-train decision of a run folder, the training loop."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.augment import train_transform
from pipeline.backbone import check_backbone, load_backbone
from pipeline.checkpoint import (
    CHECKPOINT_DIR,
    artifact_metadata,
    check_compatible,
    load_artifact,
    save_artifact,
)
from pipeline.config import ConfigError, to_dict
from pipeline.data.config import FewShotConfig
from pipeline.data.datasets_meta import augment_for
from pipeline.data.fewshot import ImageListDataset, build_fewshot, classnames_of, subsample_classes
from pipeline.distributed import Distributed, launcher_world_size
from pipeline.evaluation import PROMPTS_FILE, RESULTS_FILE, check_dataset, evaluate, write_results
from pipeline.finetune_config import FinetuneConfig, FinetuneOptimConfig
from pipeline.inputs import require_file
from pipeline.meta.objective import Batch, Objective
from pipeline.meta.prometar import prometar_iteration
from pipeline.meta.regulator import Regulator
from pipeline.prompts import PromptedCLIP
from pipeline.run_lock import RunLock
from pipeline.tracking import Tracker, progress
from pipeline.train_state import TrainState, config_changes, is_under
from pipeline.zeroshot import resolve_templates


def prompt_lr_lambda(optim: FinetuneOptimConfig):
    """Multiplier of ``optim.lr`` at an epoch: constant ``warmup_lr`` for ``warmup_epochs``, then cosine
    over all epochs (stepped once per epoch)."""

    def f(epoch: int) -> float:
        if epoch < optim.warmup_epochs:
            return optim.warmup_lr / optim.lr if optim.lr > 0 else 0.0
        return 0.5 * (1 + math.cos(math.pi * epoch / max(1, optim.epochs)))

    return f


def regulator_lr_lambda(optim: FinetuneOptimConfig):
    """Multiplier of ``regulator.lr`` at an epoch: linear warmup, then cosine (its own schedule)."""

    def f(epoch: int) -> float:
        if epoch < optim.regulator_warmup_epochs:
            return (epoch + 1) / (optim.regulator_warmup_epochs + 1)
        return 0.5 * (1 + math.cos(math.pi * epoch / max(1, optim.epochs)))

    return f


def init_from_artifact(cfg: FinetuneConfig, model_meta: dict, prompts: dict, regulator: Regulator) -> dict:
    """Copy what ``cfg.init_parts`` names from ``cfg.artifact`` into ``prompts`` and ``regulator``; returns
    what was taken (recorded in results.json).

    Whatever the parts, the artifact must have been made for this run's backbone, prompt type and prompt
    shapes (the regulator's shapes follow the prompts'); a loaded regulator must also have this run's
    ``regulator.kind`` and shapes. Each mismatch raises ``ValueError`` naming it. With
    ``prompts+frozen_regulator`` the regulator's parameters stop requiring gradients, so no optimizer is
    built for them and the meta step computes no gradient for them.
    """
    art = load_artifact(cfg.artifact)
    check_compatible(art.metadata, model_meta)
    parts = cfg.init_parts
    take_prompts = parts != "regulator"
    # the regulator part of the default is skipped for parameter-free kinds (init=artifact's old meaning);
    # the parts that name the regulator explicitly are refused for them by FinetuneConfig.validate
    take_regulator = parts != "prompts" and any(True for _ in regulator.parameters())
    if take_prompts:
        with torch.no_grad():
            for k, v in prompts.items():
                v.copy_(art.prompts[k].to(v))
    if take_regulator:
        kind = art.metadata.get("regulator.kind")
        if kind != cfg.regulator.kind:
            raise ValueError(f"incompatible artifact: its regulator.kind={kind!r} but this run uses "
                             f"{cfg.regulator.kind!r} (init_parts={parts}; init_parts=prompts leaves the "
                             "regulator fresh)")
        want = {k: tuple(v.shape) for k, v in regulator.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in art.regulator_state.items()}
        if want != have:
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            raise ValueError(f"incompatible artifact: regulator shapes differ at {diff[:4]} (check "
                             f"regulator.hidden; artifact {[have.get(k) for k in diff[:2]]}, run "
                             f"{[want.get(k) for k in diff[:2]]})")
        regulator.load_state_dict(art.regulator_state)
    frozen = take_regulator and parts == "prompts+frozen_regulator"
    if frozen:
        regulator.requires_grad_(False)
    return {"artifact": str(cfg.artifact), "artifact_sha256": file_sha256(cfg.artifact),
            "artifact_steps": art.metadata.get("steps"), "init_parts": parts,
            "prompts_from_artifact": take_prompts, "regulator_from_artifact": take_regulator,
            "regulator_frozen": frozen}


def preflight(cfg: FinetuneConfig, environ: Mapping[str, str] | None = None) -> None:
    """Checks that need files or the launcher, run before a process, a backbone or a file of the run
    exists (docs/ARCHITECTURE.md section 9); each raises :class:`ConfigError` naming the key and the path.

    One process, the backbone's architecture and checkpoint, the artifact of ``init=artifact``, the
    dataset's files and shots per class, and every evaluation target (so a missing target fails now,
    not after training).
    """
    world = launcher_world_size(os.environ if environ is None else environ)
    if world is not None and world > 1:
        raise ConfigError(f"stage 2 runs in one process but the launcher starts {world} (WORLD_SIZE); "
                          "launch one job per run")
    check_backbone(cfg.model.backbone, cfg.model.prompts, key="model.backbone", prompts_key="model.prompts")
    if cfg.init == "artifact":
        require_file(cfg.artifact, "artifact", "init=artifact needs the artifact.pt written by pipeline.pretrain")
    trains = cfg.method != "zeroshot" and cfg.optim.epochs > 0
    held_out = cfg.eval.split  # test, or val when choosing settings
    splits = check_dataset(cfg.data, "data", need=("train", held_out) if trains else (held_out,))
    if trains and cfg.data.k_shot > 0 and not cfg.allow_fewer_shots:
        check_shots(cfg.data, splits)
    for name in cfg.eval.targets:
        check_dataset(replace(cfg.data, dataset=name, subsample="all", k_shot=0, split_file=""),
                      f"eval.targets ({name})", need=("test",))


def check_shots(data: FewShotConfig, splits) -> None:
    """Every trained class (``data.subsample``) has at least ``data.k_shot`` training images."""
    try:
        sub, names = subsample_classes(splits, classnames_of(splits), data.subsample)
    except ValueError as e:
        raise ConfigError(f"data: dataset {data.dataset} under data.root={data.root} has bad labels: {e}") from None
    counts = Counter(x.label for x in sub["train"])
    short = sorted((counts.get(y, 0), name) for y, name in enumerate(names) if counts.get(y, 0) < data.k_shot)
    if short:
        have, name = short[0]
        raise ConfigError(
            f"data.k_shot={data.k_shot} but {len(short)} of the {len(names)} {data.subsample} classes of "
            f"{data.dataset} have fewer training images (fewest: {name!r} with {have}); lower data.k_shot, or set "
            "allow_fewer_shots=true to train those classes on all their images (CoOp's behaviour)")


RESUME_APPLIED = ("tracking", "workers", "threads", "force", "eval", "optim.max_nonfinite")
"""Settings that may change when a run resumes from an epoch checkpoint (each change is logged); any other
change is refused: the checkpoint's state and the recorded config would disagree."""

RESULT_NEUTRAL = ("tracking", "workers", "threads", "force", "eval.batch_size", "eval.workers", "optim.max_nonfinite")
"""Settings that cannot change a finished run's results: a run folder whose ``results.json`` was written
under a config that differs only in these counts as done. Any other difference (``data.root``, ``init``,
``artifact``, ``eval.targets``...) is refused rather than silently answered with the old results."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (identifies the stage-1 artifact a run started from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finished_results(cfg: FinetuneConfig, cfg_dict: dict) -> dict | None:
    """The results of an earlier run of this very config in ``cfg.run_dir``, or ``None`` when it has none.

    Raises :class:`ConfigError` when ``results.json`` exists but was produced under a config that differs in
    a setting that can change the result (or from another artifact file at the same path), or is unreadable.
    """
    path = cfg.run_dir / RESULTS_FILE
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        stored = old["config"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(f"{path} is unreadable or has no config ({type(e).__name__}: {e}); rerun with "
                          "force=true to replace it") from None
    changes = {k: v for k, v in config_changes(stored, cfg_dict).items()
               if not is_under(k, RESULT_NEUTRAL)}
    if changes:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:6])
        raise ConfigError(f"{path} holds the results of another config ({listed}); its results do not answer this "
                          "run. Use another name=, or force=true to replace them (python -m pipeline.evaluate "
                          "re-evaluates a finished run on other targets)")
    if cfg.init == "artifact":
        had = old.get("train", {}).get("artifact_sha256")
        now = file_sha256(cfg.artifact) if Path(cfg.artifact).is_file() else None
        if had != now:
            raise ConfigError(f"{path} was trained from another artifact file than the one now at {cfg.artifact} "
                              f"(sha256 {had} != {now}); use another name=, or force=true to retrain")
    return old


def run(cfg: FinetuneConfig) -> dict:
    """Train (unless done) and evaluate one run; returns its results (read back when skipped).

    A finished run is skipped only when it was made by the same config (:func:`finished_results`); training
    holds the run folder (:class:`pipeline.run_lock.RunLock`).
    """
    cfg_dict = to_dict(cfg)
    if not cfg.force and (done := finished_results(cfg, cfg_dict)) is not None:
        print(f"finetune: {cfg.run_dir / RESULTS_FILE} exists for this config; skipping (force=true reruns)")
        return {**done, "skipped": True}
    preflight(cfg)
    return train(cfg, cfg_dict)


def train(cfg: FinetuneConfig, cfg_dict: dict | None = None) -> dict:
    """Train one run, save its prompts, evaluate; returns the results dict written to results.json.

    ``cfg_dict`` is the config as recorded in results, checkpoints and W&B (default ``to_dict(cfg)``).
    """
    cfg_dict = to_dict(cfg) if cfg_dict is None else cfg_dict
    dist = Distributed(cfg.mixed_precision, cpu=cfg.cpu)
    try:
        if dist.world_size > 1:
            raise ConfigError(f"stage 2 runs in one process (got {dist.world_size}); launch one job per run")
        with RunLock(cfg.run_dir):  # one process per run folder, for the whole run
            return _train(cfg, cfg_dict, dist)
    finally:
        dist.shutdown()


def _train(cfg: FinetuneConfig, cfg_dict: dict, dist: Distributed) -> dict:
    run_dir, device = cfg.run_dir, dist.device
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    backbone = load_backbone(cfg.model.backbone, device=device, seed=cfg.model.seed)
    model = PromptedCLIP(backbone, cfg.model.prompts, generator=torch.Generator().manual_seed(cfg.seed))
    prompts = model.initial_prompts()
    torch.manual_seed(cfg.seed)  # the regulator's init draws from the global RNG
    regulator = Regulator.for_prompts(prompts, cfg.regulator).to(device)
    model_meta = artifact_metadata(cfg_dict, {k: v.detach() for k, v in prompts.items()})
    init_info = init_from_artifact(cfg, model_meta, prompts, regulator) if cfg.init == "artifact" else {}
    # only now, with the backbone built and the artifact accepted, may force=true drop the old run's state
    if cfg.force and (run_dir / CHECKPOINT_DIR).exists():
        shutil.rmtree(run_dir / CHECKPOINT_DIR)

    fs = build_fewshot(cfg.data)
    templates = resolve_templates(cfg.frozen_templates, fs.template)
    objective = Objective(model, cfg.loss, templates=templates)
    reg_params = [p for p in regulator.parameters() if p.requires_grad]
    train_prompts = bool(prompts) and cfg.optim.epochs > 0
    sgd = torch.optim.SGD(list(prompts.values()) or [torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr,
                          momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    # the regulator learns only from the meta step, and only when it has trainable parameters (not when
    # parameter-free or loaded frozen: init_parts=prompts+frozen_regulator)
    adamw = torch.optim.AdamW(reg_params, lr=cfg.regulator.lr, weight_decay=cfg.regulator.weight_decay) \
        if reg_params and cfg.meta.meta_step else None
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, prompt_lr_lambda(cfg.optim))
    reg_sched = torch.optim.lr_scheduler.LambdaLR(adamw, regulator_lr_lambda(cfg.optim)) if adamw else None
    augment = cfg.data.augment or augment_for(cfg.data.dataset)
    dataset = ImageListDataset(fs.train, train_transform(backbone, augment))
    iters_per_epoch = math.ceil(len(dataset) / cfg.optim.batch_size)
    total = iters_per_epoch * cfg.optim.epochs if train_prompts else 0

    state = TrainState(prompts, regulator, {"prompts": sgd, "regulator": adamw},
                       {"prompts": sched, "regulator": reg_sched}, counters={"nonfinite_steps": 0})
    # at the start of the epoch after the last saved one
    ckpt = state.resume(run_dir, cfg_dict, RESUME_APPLIED) if train_prompts else None
    epoch, step, nonfinite, consecutive = state.epoch, state.step, state.counters["nonfinite_steps"], 0
    tracker = Tracker(run_dir, _tracking(cfg), cfg_dict, resume=ckpt is not None,
                      resume_step=step if ckpt is not None else None)
    t_start = time.perf_counter()
    with tracker:
        bar = progress(total, True, desc=f"{cfg.data.dataset}/{cfg.label}/seed{cfg.seed}",
                       every_s=cfg.tracking.progress_every_s)
        bar.update(step)
        while train_prompts and epoch < cfg.optim.epochs:
            order = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # same batches on resume
            loader = DataLoader(dataset, batch_size=cfg.optim.batch_size, shuffle=True, generator=order,
                                num_workers=cfg.workers)
            for images, labels in loader:
                t0 = time.perf_counter()
                batch = Batch(images.to(device), labels.to(device), tuple(fs.classnames))
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + 7)
                with dist.autocast():
                    result = prometar_iteration(objective, prompts, regulator, batch, cfg.meta, sgd, adamw, gen)
                bad = any(s.startswith("nonfinite") for s in result.skipped)
                nonfinite, consecutive = nonfinite + bad, (consecutive + 1) if bad else 0
                if consecutive >= cfg.optim.max_nonfinite:
                    raise RuntimeError(f"{consecutive} consecutive iterations had non-finite gradients "
                                       f"(optim.max_nonfinite={cfg.optim.max_nonfinite}); last step {step}")
                step += 1
                bar.update(1)
                if tracker.should_log(step) or step == total:
                    log = {k: v for k, v in result.as_dict().items() if not math.isnan(v)}
                    log.update(epoch=epoch, lr=sgd.param_groups[0]["lr"], nonfinite_steps=nonfinite,
                               iter_s=time.perf_counter() - t0)
                    if adamw is not None:
                        log["regulator_lr"] = adamw.param_groups[0]["lr"]
                    tracker.log(log, step=step)
                    if "reg_step/task" in log:
                        bar.set_postfix(task_loss=log["reg_step/task"])
            epoch += 1
            sched.step()
            if reg_sched is not None:
                reg_sched.step()
            state.step, state.epoch, state.counters["nonfinite_steps"] = step, epoch, nonfinite
            state.save(run_dir, keep_last=1, config=cfg_dict)
        bar.close()
        train_s = time.perf_counter() - t_start
        if prompts:
            meta = artifact_metadata(cfg_dict, {k: v.detach() for k, v in prompts.items()},
                                     {"stage": "finetune", "method": cfg.method, "steps": step,
                                      "regulator.kind": cfg.regulator.kind})
            save_artifact(run_dir / PROMPTS_FILE, prompts, regulator.state_dict(), meta)
        t0 = time.perf_counter()
        model.eval()
        results = evaluate(cfg, model, {k: v.detach() for k, v in prompts.items()} if prompts else None,
                           backbone.preprocess_val)
        summary = {"steps": step, "epochs": epoch, "nonfinite_steps": nonfinite, "train_seconds": train_s,
                   "eval_seconds": time.perf_counter() - t0, **init_info}
        path = write_results(run_dir, cfg, cfg_dict, results, {"train": summary})
        final = {f"test/{s}_accuracy": results[s]["accuracy"] for s in cfg.eval.subsets}
        if "hm" in results:
            final["test/hm"] = results["hm"]
        for name, t in results.get("targets", {}).items():
            final[f"test/{name}_accuracy"] = t["accuracy"]
        tracker.summary({**final, **{k: v for k, v in summary.items() if isinstance(v, int | float)},
                         "results": str(path)})
    return results


def _tracking(cfg: FinetuneConfig):
    """The run's tracking settings with a W&B name identifying (dataset, method, seed) when none is set."""
    t = cfg.tracking
    return t if t.name else replace(t, name=f"{cfg.data.dataset}-{cfg.label}-seed{cfg.seed}")

