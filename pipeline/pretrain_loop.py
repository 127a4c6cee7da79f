"""Stage 1 as a library: start-up checks, the learning-rate schedule and the distributed training loop."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from pipeline.backbone import check_backbone, load_backbone
from pipeline.checkpoint import PreemptionHandler, artifact_metadata, list_checkpoints, save_artifact
from pipeline.config import ConfigError, to_dict
from pipeline.data.clustering import TEXT_SPECIAL_TOKENS, name_token_budget, token_counter
from pipeline.data.episodes import ConceptTable, Episode
from pipeline.data.task_checks import check_task_data
from pipeline.data.task_stream import COUNTERS, slot_loader
from pipeline.distributed import Distributed, check_launcher
from pipeline.meta.objective import Batch, Objective
from pipeline.meta.prometar import all_finite
from pipeline.meta.regulator import Regulator
from pipeline.meta.step import grad_norm, meta_step
from pipeline.pretrain_config import OptimConfig, PretrainConfig
from pipeline.prompts import PromptedCLIP
from pipeline.run_lock import RunDirLocked, RunLock
from pipeline.tracking import Tracker, progress
from pipeline.train_state import TrainState
from pipeline.zeroshot import resolve_templates

log = logging.getLogger(__name__)


RESUME_APPLIED = ("tracking", "checkpoint.every", "checkpoint.keep_last", "checkpoint.resume", "optim.steps",
                  "threads", "data.workers", "collective_timeout_s", "max_nonfinite", "artifact",
                  # stage-2 settings that stage 1 never reads (the meta config is shared by both stages)
                  "meta.n_query_classes", "meta.task_classes", "meta.matched_step")
"""Settings that may change when a run resumes (each change is logged): where and how often things are
written, how long the run goes on (the cosine schedule then spans the new ``optim.steps``), and how the
work is executed. Any other change to the config is refused on resume: it would make the checkpoint's
state and the recorded config disagree."""


def lr_lambda(cfg: OptimConfig):
    """Multiplier of the peak learning rate at a step: linear warmup, then cosine to ``min_lr_ratio``."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def preflight(cfg: PretrainConfig, environ: Mapping[str, str] | None = None) -> None:
    """Checks that need files or the launcher, run before a process group, a backbone or a file in
    ``run_dir`` exists (docs/ARCHITECTURE.md section 9); each raises :class:`ConfigError` naming the key and the path.

    The launcher's world size and DeepSpeed stage against the config, the backbone's architecture and
    checkpoint, the shards, the clustering against ``episodes`` (a task that can never be formed would
    otherwise wait forever in the episode sampler), and ``run_dir`` against ``checkpoint.resume``.
    """
    check_launcher(cfg.tasks_per_step, cfg.meta.meta_step and not cfg.meta.first_order,
                   os.environ if environ is None else environ)
    check_backbone(cfg.model.backbone, cfg.model.prompts, key="model.backbone", prompts_key="model.prompts")
    check_task_data(cfg.data, cfg.episodes)
    if not cfg.checkpoint.resume and list_checkpoints(cfg.run_dir):
        raise ConfigError(f"checkpoint.resume=false but run_dir={cfg.run_dir} already holds checkpoints of another "
                          "run; use a new run_dir (a fresh run would overwrite them)")


def check_concept_names(cfg: PretrainConfig, model: PromptedCLIP) -> None:
    """Refuse concept names too long for this model's text context (docs/ARCHITECTURE.md section 4).

    A class text is ``"X .. X <name>."`` (one placeholder per text prompt token); a name longer than
    ``context length - SOS/EOT - n_ctx_text - 1`` tokens would be cut by the tokenizer, and the class would
    be learned from a truncated text without its ``.``. The frozen texts ``g_0`` (``frozen_templates``
    around the name) must fit the context as well. ``pipeline cluster`` fits the names to the budget its
    ``name_tokenizer`` and ``name_prompt_tokens`` give; this check catches a clustering made for another
    model or prompt length, before training.
    """
    table = ConceptTable(cfg.data.clusters_dir, cfg.episodes.k_shot + cfg.episodes.q_query)
    names = sorted({table.name[c] for c in table.eligible})
    count = token_counter(model.tokenizer)
    budget = name_token_budget(model.context_length, model.n_ctx_text)
    frozen_budget = model.context_length - TEXT_SPECIAL_TOKENS  # the template's text is all there is
    templates = resolve_templates(cfg.frozen_templates, "{}")
    long = {}  # name -> (its tokens, tokens of its longest frozen text)
    for name in names:
        n_name, n_frozen = count(name), max(count(t.format(name)) for t in templates)
        if n_name > budget or n_frozen > frozen_budget:
            long[name] = (n_name, n_frozen)
    if long:
        example, (tokens, frozen_tokens) = next(iter(long.items()))
        raise ConfigError(
            f"data.clusters_dir: {len(long)} of the {len(names)} usable concept names in {cfg.data.clusters_dir}/"
            f"concepts.json do not fit this model's text context (a name may have {budget} tokens: context length "
            f"{model.context_length} - SOS/EOT - {model.n_ctx_text} prompt tokens - '.'; a frozen_templates text "
            f"{frozen_budget}), e.g. {example!r} has {tokens} (its longest frozen text {frozen_tokens}); they would "
            "be cut by the tokenizer. Re-run `pipeline "
            f"cluster mode=summarize name_tokenizer={cfg.model.backbone.arch} "
            f"name_prompt_tokens={model.n_ctx_text}` with that clustering's features_dir and out_dir (it rewrites "
            "concepts.json only)")


def build_optimizer(prompts: list[torch.Tensor], regulator_params: list[torch.Tensor],
                    cfg: PretrainConfig) -> torch.optim.AdamW:
    """The outer AdamW: group 0 the prompts (``optim.lr``, ``optim.weight_decay``, torch's ``eps``),
    group 1 the regulator when it has parameters (``regulator.lr``, ``regulator.weight_decay``,
    ``regulator.adam_eps``: its meta-gradient is ``meta.inner_lr`` times smaller, see ``RegulatorConfig``)."""
    groups = [{"params": prompts, "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay}]
    if regulator_params:
        groups.append({"params": regulator_params, "lr": cfg.regulator.lr,
                       "weight_decay": cfg.regulator.weight_decay, "eps": cfg.regulator.adam_eps})
    return torch.optim.AdamW(groups)


def clip_gradients_(params: list[torch.Tensor], max_norm: float) -> float:
    """Scale the ``.grad`` of ``params`` so their global norm is at most ``max_norm`` (0 = leave them);
    returns the norm before clipping. Each parameter group is clipped on its own (prompts with
    ``optim.grad_clip``, the regulator with ``regulator.grad_clip``), so one group's norm never shrinks
    the other's gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(grad_norm(grads))
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / norm)
    return norm


def regulator_diagnostics(regulator_params: list[torch.Tensor], phi_0: torch.Tensor | None,
                          optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Whether the regulator learns: ``regulator_relative_change`` ``|phi_t - phi_0| / |phi_0|`` against its
    initialisation, and ``regulator_eps_dominated``, the share of the elements that have had a gradient
    whose Adam denominator ``sqrt(v_hat)`` is below ``eps`` (their step is damped by more than half);
    empty without parameters."""
    if not regulator_params or phi_0 is None:
        return {}
    phi = torch.cat([p.detach().reshape(-1).double() for p in regulator_params])
    out = {}
    base = float(phi_0.norm())
    if base > 0:
        out["regulator_relative_change"] = float((phi - phi_0.to(phi.device)).norm()) / base
    group = optimizer.param_groups[-1]  # the regulator's (build_optimizer puts it last)
    beta2, eps = group["betas"][1], group["eps"]
    below, total = 0, 0
    for p in regulator_params:
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            continue
        v_hat = state["exp_avg_sq"] / (1.0 - beta2 ** float(state["step"]))
        seen = v_hat > 0  # elements that never had a gradient (e.g. at step 1) are not damped, just idle
        below += int((v_hat[seen].sqrt() < eps).sum())
        total += int(seen.sum())
    if total:
        out["regulator_eps_dominated"] = below / total
    return out


def episode_batches(ep: Episode, device: torch.device) -> tuple[Batch, Batch]:
    """Support and query :class:`Batch` es of an episode (the query in its own class list)."""
    n = ep.n_way
    support = Batch(ep.support_images.to(device), ep.support_labels.to(device), tuple(ep.classnames[:n]))
    if ep.cross_domain:  # query classes are classnames[n:], labels n..2n-1
        query = Batch(ep.query_images.to(device), (ep.query_labels - n).to(device), tuple(ep.classnames[n:]))
    else:
        query = Batch(ep.query_images.to(device), ep.query_labels.to(device), tuple(ep.classnames[:n]))
    return support, query


class Streams:
    """This rank's task slots for the current data epoch; rebuilt (reseeded) at each epoch boundary.

    Counters are kept per slot, so a checkpoint can record each slot's counts of the data epochs before
    the resume point and a resumed run (any world size) reports exactly what an uninterrupted run does:
    the replay of the current epoch's tasks recounts that epoch from zero.
    """

    def __init__(self, cfg: PretrainConfig, preprocess, rank: int, world_size: int):
        self.cfg, self.preprocess = cfg, preprocess
        self.slots = list(range(rank, cfg.tasks_per_step, world_size))
        self.epoch: int | None = None
        self.iters: list = []
        self.finished: dict[int, Counter] = {s: Counter() for s in self.slots}  # counters of earlier epochs
        self.current: dict[tuple[int, int], dict[str, int]] = {}  # (slot, worker) -> latest running counters

    def at(self, step: int):
        """Make the streams match ``step``: rebuild at epoch starts, fast-forward after a resume."""
        epoch, within = divmod(step, self.cfg.data.epoch_steps)
        if epoch != self.epoch:
            self._fold()
            self.iters = [slot_loader(self.cfg.data, self.cfg.episodes, self.preprocess, self.cfg.seed, epoch, s)
                          for s in self.slots]
            self.epoch = epoch
            for _ in range(within):  # resume mid-epoch: replay the tasks already used (and recount them)
                self.next()

    def _fold(self) -> None:
        for (slot, _), snap in self.current.items():
            self.finished[slot].update(snap)
        self.current = {}

    def next(self) -> list[tuple[int, Episode]]:
        out = []
        for slot, it in zip(self.slots, self.iters):
            episode, counts = next(it)
            self.current[(slot, counts.get("worker", 0))] = {k: counts.get(k, 0) for k in COUNTERS}
            out.append((slot, episode))
        return out

    def counters(self) -> dict[str, int]:
        """This rank's counters over every data epoch so far."""
        total: Counter = Counter()
        for c in self.finished.values():
            total.update(c)
        for snap in self.current.values():
            total.update(snap)
        return {k: int(total.get(k, 0)) for k in COUNTERS}

    def before_epoch_of(self, step: int) -> dict[str, dict[str, int]]:
        """Per slot (as text), the counts of the data epochs before the one ``step`` falls in: what a run
        resumed at ``step`` starts from before it replays that epoch's tasks."""
        out = {}
        for slot in self.slots:
            c = Counter(self.finished[slot])
            if self.epoch is not None and step // self.cfg.data.epoch_steps > self.epoch:  # saved at a boundary
                for (s, _), snap in self.current.items():
                    if s == slot:
                        c.update(snap)
            out[str(slot)] = {k: int(c.get(k, 0)) for k in COUNTERS}
        return out

    def restore(self, data: dict, is_main: bool) -> None:
        """Counters from a checkpoint's ``data`` (:meth:`before_epoch_of` of every slot)."""
        by_slot = data.get("before_epoch_by_slot")
        if by_slot is not None:
            for slot in self.slots:
                self.finished[slot] = Counter(by_slot.get(str(slot), {}))
        elif data.get("counters") and is_main:  # older checkpoints: one total, on the main rank only
            log.warning("checkpoint records data counters as one total (older layout): counters of the resumed "
                        "data epoch are counted again by the replay")
            self.finished[self.slots[0]] = Counter(data["counters"])


def train(cfg: PretrainConfig, cfg_dict: dict | None = None) -> dict:
    """Run stage 1 to ``optim.steps`` (or until preempted); returns a summary dict with ``status``.

    ``cfg_dict`` is the config as recorded in checkpoints, the artifact and W&B (default ``to_dict(cfg)``).
    """
    cfg_dict = to_dict(cfg) if cfg_dict is None else cfg_dict
    dist = Distributed(cfg.mixed_precision, cpu=cfg.cpu, timeout_s=cfg.collective_timeout_s)
    lock = RunLock(cfg.run_dir)
    try:
        refused = None
        if dist.is_main:  # one holder per run: the main rank, for the life of the job
            try:
                lock.acquire()
            except RunDirLocked as e:
                refused = e
        if dist.any(refused is not None):
            raise refused or RunDirLocked(f"run folder {cfg.run_dir} is in use by another run (see rank 0's error)")
        return _train(cfg, cfg_dict, dist)
    finally:
        if dist.is_main:
            lock.release()
        dist.shutdown()


def _train(cfg: PretrainConfig, cfg_dict: dict, dist: Distributed) -> dict:
    dist.check_backend(second_order=cfg.meta.meta_step and not cfg.meta.first_order)
    if cfg.tasks_per_step % dist.world_size:
        raise ConfigError(f"tasks_per_step={cfg.tasks_per_step} is not divisible by the {dist.world_size} ranks")
    run_dir = Path(cfg.run_dir)
    device = dist.device
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    backbone = load_backbone(cfg.model.backbone, device=device, seed=cfg.model.seed)
    model = PromptedCLIP(backbone, cfg.model.prompts, generator=torch.Generator().manual_seed(cfg.model.seed))
    check_concept_names(cfg, model)
    prompts = model.initial_prompts()
    torch.manual_seed(cfg.model.seed)  # the regulator's init draws from the global RNG: make runs repeatable
    regulator = Regulator.for_prompts(prompts, cfg.regulator).to(device)
    reg_params = [p for p in regulator.parameters() if p.requires_grad]
    prompt_params = list(prompts.values())
    params = prompt_params + reg_params
    dist.broadcast_(params)  # identical start on every rank, whatever each rank's RNG did
    # phi_0 for regulator_relative_change: taken before a resume loads later weights, so a resumed run
    # measures from the same initialisation (it is a function of model.seed and the config)
    phi_0 = torch.cat([p.detach().reshape(-1).double() for p in reg_params]) if reg_params else None
    optimizer = build_optimizer(prompt_params, reg_params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim))
    objective = Objective(model, cfg.loss, templates=resolve_templates(cfg.frozen_templates, "{}"))
    streams = Streams(cfg, backbone.preprocess_train, dist.rank, dist.world_size)

    if not cfg.checkpoint.resume and list_checkpoints(run_dir):
        raise ConfigError(f"checkpoint.resume=false but {run_dir} already holds checkpoints of another run; "
                          "use a new run_dir (a fresh run would overwrite them)")
    state = TrainState(prompts, regulator, {"meta": optimizer}, {"meta": scheduler},
                       counters={"nonfinite_steps": 0}, data={"counters": {}})
    ckpt = state.resume(run_dir, cfg_dict, RESUME_APPLIED) if cfg.checkpoint.resume else None
    streams.restore(state.data, dist.is_main)
    step, nonfinite_total, consecutive = state.step, state.counters["nonfinite_steps"], 0
    resumed_at = step
    tracker = Tracker(run_dir, cfg.tracking, cfg_dict, is_main=dist.is_main, resume=ckpt is not None,
                      resume_step=step if ckpt is not None else None)

    def save() -> None:
        digest = dist.verify_identical(params)  # ranks must hold bit-identical state at every checkpoint
        by_slot: dict[str, dict[str, int]] = {}
        totals: Counter = Counter()
        for before, counts in dist.gather_objects((streams.before_epoch_of(step), streams.counters())):
            by_slot.update(before)
            totals.update(counts)
        if dist.is_main:
            state.step, state.counters["nonfinite_steps"] = step, nonfinite_total
            state.data = {"counters": {k: int(totals.get(k, 0)) for k in COUNTERS}, "before_epoch_by_slot": by_slot}
            state.save(run_dir, cfg.checkpoint.keep_last, config=cfg_dict, digest=digest,
                       world_size=dist.world_size)
        dist.barrier()

    status = "done"
    samples_per_task = cfg.episodes.n_way * (cfg.episodes.k_shot + cfg.episodes.q_query)
    bar = progress(cfg.optim.steps, dist.is_main, desc="meta-pretrain", every_s=cfg.tracking.progress_every_s)
    bar.update(step)
    with PreemptionHandler() as preemption, tracker:
        while step < cfg.optim.steps:
            t0 = time.perf_counter()
            streams.at(step)
            tasks = streams.next()
            t_data = time.perf_counter() - t0
            grads = [torch.zeros_like(p) for p in params]
            metrics: list[dict[str, float]] = []
            for slot, episode in tasks:
                support, query = episode_batches(episode, device)
                # mixup randomness is a function of (seed, step, slot): identical for any world size and resume
                gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step * 1_009 + slot) % 2**62)
                with dist.autocast():
                    result = meta_step(objective, prompts, regulator, support, query, cfg.meta, gen)
                flat = [result.prompt_grads[k] for k in prompts] + [
                    result.regulator_grads[n] for n, p in regulator.named_parameters() if p.requires_grad]
                for acc, g in zip(grads, flat):
                    acc.add_(g.detach().to(acc.dtype), alpha=1.0 / len(tasks))
                metrics.append(result.metrics.as_dict())
            bad = dist.any(not all_finite(grads) or any(not math.isfinite(m["outer_loss"]) for m in metrics))
            update = math.nan
            payload = 0
            norms: dict[str, float] = {}
            if bad:  # every rank skips together, so parameters stay identical
                nonfinite_total += 1
                consecutive += 1
                if consecutive >= cfg.max_nonfinite:
                    raise RuntimeError(f"{consecutive} consecutive outer steps had a non-finite loss or "
                                       f"meta-gradient (max_nonfinite={cfg.max_nonfinite}); last step {step}")
            else:
                consecutive = 0
                payload = dist.all_reduce_mean_(grads)
                before = [p.detach().clone() for p in reg_params]
                for p, g in zip(params, grads):
                    p.grad = g
                # norms of the averaged meta-gradients (identical on every rank), before clipping
                norms["prompts_grad_norm"] = clip_gradients_(prompt_params, cfg.optim.grad_clip)
                if reg_params:
                    norms["regulator_grad_norm"] = clip_gradients_(reg_params, cfg.regulator.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                update = float(sum((p.detach() - b).pow(2).sum() for p, b in zip(reg_params, before)) ** 0.5) \
                    if reg_params else 0.0
            scheduler.step()
            step += 1
            bar.update(1)
            if tracker.should_log(step) or step == cfg.optim.steps:
                log = _reduce_metrics(metrics, dist)
                counters = Counter()
                for c in dist.gather_objects(streams.counters()):
                    counters.update(c)
                elapsed = time.perf_counter() - t0
                log.update(norms)
                log.update(regulator_diagnostics(reg_params, phi_0, optimizer))
                log.update(
                    lr=scheduler.get_last_lr()[0], regulator_update=update, nonfinite_steps=nonfinite_total,
                    samples_per_s=cfg.tasks_per_step * samples_per_task / max(elapsed, 1e-9),
                    data_wait_fraction=t_data / max(elapsed, 1e-9), allreduce_bytes=payload,
                    **{f"data/{k}": v for k, v in counters.items()},
                )
                tracker.log(log, step=step)
                if "outer_loss" in log:
                    bar.set_postfix(outer_loss=log["outer_loss"])
            if step % cfg.checkpoint.every == 0 or step == cfg.optim.steps:
                save()
            if dist.any(preemption.requested):
                if step % cfg.checkpoint.every:
                    save()
                status = "preempted"
                break
        bar.close()
        out = Path(cfg.artifact or run_dir / "artifact.pt")
        if status == "done" and dist.is_main and resumed_at == step == cfg.optim.steps and out.is_file():
            # a rerun of a finished run trains nothing: keep the artifact the finishing call wrote. Rewriting it
            # would change its bytes (new git revision in the metadata), and stage-2 runs that recorded its
            # sha256 would no longer count as made from it
            print(f"pretrain: the run had finished ({step} steps); kept its artifact {out}", flush=True)
        elif status == "done" and dist.is_main:
            meta = artifact_metadata(cfg_dict, {k: v.detach() for k, v in prompts.items()},
                                     {"stage": "pretrain", "steps": step, "regulator.kind": cfg.regulator.kind})
            save_artifact(out, prompts, regulator.state_dict(), meta)
            tracker.summary({"artifact": str(out), "steps": step, "nonfinite_steps": nonfinite_total})
    return {"status": status, "step": step, "nonfinite_steps": nonfinite_total,
            "prompts": {k: v.detach().cpu() for k, v in prompts.items()},
            "regulator": {k: v.detach().cpu() for k, v in regulator.state_dict().items()}}


EXTREMES = {"gamma_min": min, "gamma_max": max}
"""Per-task metrics reduced over tasks and ranks by their extreme value rather than the mean."""


def _reduce_metrics(metrics: list[dict[str, float]], dist: Distributed) -> dict[str, float]:
    """Mean of each metric over this rank's tasks, then over ranks (NaN = not computed); the keys of
    :data:`EXTREMES` by their minimum or maximum over every task of the step."""
    keys = sorted(metrics[0])
    local = torch.tensor([[m[k] for k in keys] for m in metrics], dtype=torch.float64).mean(0)  # [n_metrics]
    dist.all_reduce_mean_([local])
    out = {k: float(v) for k, v in zip(keys, local.tolist()) if not math.isnan(v)}
    ranks = dist.gather_objects({key: [m[key] for m in metrics if key in m] for key in EXTREMES})  # one collective
    for key, pick in EXTREMES.items():
        values = [v for part in ranks for v in part[key] if not math.isnan(v)]
        if values:
            out[key] = float(pick(values))
    return out

