"""Typed configuration of stage 2, few-shot fine-tuning (docs/ARCHITECTURE.md sections 5 and 6).

The schema behind ``configs/finetune/*.yaml`` and ``python -m pipeline.finetune``'s command line, and
the method presets. Methods are presets: ``method=X`` sets the config fields listed in
:data:`METHOD_PRESETS` (and ``init=random`` those in :data:`INIT_PRESETS`) between the YAML file and
the command line. Setting one of those fields explicitly to another value is an error naming both,
never silently overridden. The loop that runs a config is :mod:`pipeline.finetune_loop`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.augment import AUGMENT_PRESETS
from pipeline.config import ConfigError, ModelConfig, flatten, load_config, user_layers
from pipeline.data.config import SUBSAMPLES, FewShotConfig
from pipeline.data.datasets_meta import DATASETS
from pipeline.meta.config import LossConfig, MetaConfig, RegulatorConfig, validate_meta_learning
from pipeline.tracking import TrackingConfig
from pipeline.zeroshot import resolve_templates

PUBLIC_OUTER_WEIGHT = 5e-4
"""``meta.outer_weight`` of ``method=prometar_public``: the public ProMetaR code (mlvlab/ProMetaR, ``train.py``)
multiplies its meta loss by ``TRAINER.PROMETAR.LR_RATIO = 0.0005`` before stepping the prompts' SGD, so its
meta step is 5e-4 x the size of the regularized step."""

# Building blocks of the presets. Each preset pins every field that tells it apart from its siblings, so a
# run's label (``method``) always means one recipe; tuned values (learning rates, loss weights, depths) stay
# free, and the full config is in every results.json.
_CE_ONLY = {"meta.meta_step": False, "meta.matched_step": False, "regulator.kind": "none",
            "loss.weight_text": 0.0, "loss.weight_image": 0.0}  # no regularizer, no regulator, no meta step
_META = {"meta.meta_step": True, "regulator.kind": "modulate", "meta.first_order": False}  # ProMetaR's meta step
_NO_META = {"meta.meta_step": False, "meta.matched_step": False}

METHOD_PRESETS: dict[str, dict[str, Any]] = {
    # frozen CLIP with the dataset's template; no prompts, so nothing is trained (optim.* is unused)
    "zeroshot": {"model.prompts.type": "none", "meta.meta_step": False},
    # CoOp: shallow text context, cross-entropy only
    "coop": {"model.prompts.type": "coop", **_CE_ONLY},
    # VPT-deep: vision prompts only (model.prompts.depth_vision rows), cross-entropy only
    "vpt_deep": {"model.prompts.type": "vpt", **_CE_ONLY},
    # IVLP: deep text + deep vision prompts, cross-entropy only
    "ivlp": {"model.prompts.type": "ivlp", **_CE_ONLY},
    # IVLP + PromptSRC's L1 consistency with fixed weight: G = g + constant_gamma * r, i.e. the gradient of
    # CE + 0.5 * (50 * L1_text + 20 * L1_image) = CE + 25 * L1_text + 10 * L1_image with the defaults
    "promptsrc_lite": {"model.prompts.type": "ivlp", **_NO_META, "regulator.kind": "constant"},
    # ProMetaR: regularized step + meta step, the learned (modulate) regulator, meta step as large as the
    # regularized one (outer_weight 1)
    "prometar": {**_META, "meta.outer_weight": 1.0},
    # ProMetaR with the public code's meta-loss weight: the meta step is 5e-4 x the prompt lr
    "prometar_public": {**_META, "meta.outer_weight": PUBLIC_OUTER_WEIGHT},
    # control: the regularized step with the (initial or loaded) modulate regulator, no meta step. From words
    # it equals promptsrc_lite (an untrained regulator is gamma_init = 0.5 everywhere); with init=artifact it
    # applies the stage-1 regulator
    "prometar_no_meta": {**_NO_META, "regulator.kind": "modulate"},
    # control: meta step with inner lr 0 -- the outer (mixup query) loss at the unadapted prompts, i.e.
    # multitask learning without adaptation; the regulator gets a zero meta-gradient
    "prometar_inner0": {**_META, "meta.inner_lr": 0.0},
    # control: as many prompt updates at the same learning rates as ProMetaR, without the meta-gradient: the
    # second update is a regularized step on the query split, scaled by meta.outer_weight
    "prometar_step_matched": {"meta.meta_step": False, "meta.matched_step": True, "regulator.kind": "modulate"},
    # control: meta step with a fixed gamma (regulator.constant_gamma): nothing is meta-learned but the prompts
    "prometar_constant_gamma": {**_META, "regulator.kind": "constant"},
    # control: meta step with the regulator off, G = g + r
    "prometar_no_regulator": {**_META, "regulator.kind": "none"},
    # control: first-order meta-gradient (no second-order terms; the regulator still learns through gamma)
    "prometar_first_order": {**_META, "meta.first_order": True},
}
"""Config fields each ``method`` sets (dotted keys); docs/ARCHITECTURE.md section 5 tabulates what each isolates."""

METHODS = tuple(METHOD_PRESETS)
INITS = ("words", "artifact", "random")
INIT_PARTS = ("prompts+regulator", "prompts+frozen_regulator", "prompts", "regulator")
"""What ``init=artifact`` takes from the stage-1 artifact (``init_parts``)."""
FROZEN_REGULATOR_PARTS = ("prompts+frozen_regulator", "regulator")
"""``init_parts`` values that need the artifact's regulator: refused for regulator kinds without parameters."""

INIT_PRESETS: dict[str, dict[str, Any]] = {
    "words": {},
    "artifact": {},
    "random": {"model.prompts.init_words": ""},
}
"""Config fields each ``init`` sets (``artifact`` copies what ``init_parts`` names from ``artifact``)."""


@dataclass(frozen=True)
class FinetuneOptimConfig:
    """SGD on the prompts with a constant warmup then cosine decay, per epoch (the public recipe)."""

    epochs: int = 10
    """Training epochs over the few-shot set (0 = evaluate only)."""
    batch_size: int = 4
    """Images per iteration."""
    lr: float = 0.0025
    """Peak SGD learning rate of the prompts."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay of the prompts."""
    warmup_epochs: int = 1
    """Epochs at the constant ``warmup_lr`` before the cosine schedule starts."""
    warmup_lr: float = 1e-5
    """Learning rate of the prompts during warmup."""
    regulator_warmup_epochs: int = 0
    """Epochs of linear warmup of the regulator's learning rate (``regulator.lr``) before its own cosine
    decay; its scheduler is stepped every epoch like the prompts' one."""
    max_nonfinite: int = 10
    """Abort after this many consecutive iterations whose update was skipped as non-finite."""


@dataclass(frozen=True)
class EvalConfig:
    """What is evaluated at the end of training (:mod:`pipeline.evaluate`)."""

    subsets: tuple[str, ...] = ("base", "new")
    """Class subsets of the training dataset, each in its own label space (``base``, ``new``, ``all``)."""
    targets: tuple[str, ...] = ()
    """Other datasets evaluated on all their test classes (domain generalization: ``ImageNetV2``...;
    cross-dataset: the other 10), read from ``data.root``."""
    batch_size: int = 100
    """Test images per forward."""
    workers: int = 0
    """DataLoader workers for test images."""
    split: str = "test"
    """Which held-out split is evaluated: ``test`` (reported results) or ``val`` (choosing settings: the
    test split is then never read)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage-2 few-shot fine-tuning and its evaluation (docs/ARCHITECTURE.md sections 5 and 6)."""

    method: str = "prometar"
    """A method or control: a preset of fields (:data:`METHOD_PRESETS`), e.g. ``prometar``, ``ivlp``,
    ``promptsrc_lite``, ``coop``, ``vpt_deep``, ``zeroshot``, ``prometar_step_matched``."""
    init: str = "words"
    """Prompt initialisation: ``words`` (``model.prompts.init_words``), ``random``, or ``artifact``
    (what ``init_parts`` names from the stage-1 artifact at ``artifact``)."""
    init_parts: str = "prompts+regulator"
    """With ``init=artifact``: ``prompts+regulator`` (the prompts, and the regulator when this run's
    ``regulator.kind`` has parameters, trained on by the meta step), ``prompts+frozen_regulator`` (the
    regulator is loaded and never updated: no optimizer for it), ``prompts`` (the regulator starts
    fresh) or ``regulator`` (prompts from ``model.prompts.init_words``, or random when that is empty).
    ``prompts+frozen_regulator`` and ``regulator`` need a kind with parameters (``modulate``, ``transform``)."""
    artifact: str = ""
    """Stage-1 artifact for ``init=artifact``; refused when made for another backbone or prompt shape."""
    name: str = ""
    """Label of the run in its path, W&B and result tables; empty = ``method``."""
    run_root: str = "runs/finetune"
    """Runs go to ``<run_root>/<data.dataset>/<name or method>/seed_<seed>``."""
    seed: int = 1
    """The protocol seed (1-3): shot sampling, prompt init, batch order, mixup. ``data.seed`` and
    ``model.seed`` follow it (setting them to another value is an error)."""
    force: bool = False
    """Run even when ``results.json`` exists (the old run folder's checkpoints are discarded)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Frozen backbone and prompt learner."""
    data: FewShotConfig = field(default_factory=FewShotConfig)
    """Few-shot dataset; train on ``data.subsample`` (``base`` for base-to-new)."""
    regulator: RegulatorConfig = field(default_factory=RegulatorConfig)
    """Gradient regulator (``regulator.lr`` is its AdamW learning rate)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Regularizer weights (lambda_txt 50, lambda_img 20) and mixup Beta(0.5, 0.5)."""
    meta: MetaConfig = field(default_factory=MetaConfig)
    """Meta step (inner lr 5e-4)."""
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    """Prompt optimiser and schedules."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation after training."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """W&B (one run per dataset, seed and method; set ``tracking.group`` per sweep) and metrics.jsonl."""
    frozen_templates: tuple[str, ...] = ()
    """Templates of the frozen text teacher g_0 (averaged): literal templates with ``{}`` for the class
    name, or named sets ``@imagenet`` (CLIP's 80), ``@imagenet7`` (CoOp's 7), ``@promptsrc`` (the 60 the
    PromptSRC / ProMetaR code averages), ``@dataset`` (the dataset's CoOp template); empty = the dataset's
    template alone (:func:`pipeline.zeroshot.resolve_templates`)."""
    workers: int = 0
    """DataLoader workers for training images."""
    mixed_precision: str = "no"
    """``no`` or ``bf16`` (autocast on GPU)."""
    cpu: bool = False
    """Run on the CPU even when a GPU is visible."""
    threads: int = 0
    """CPU intra-op threads (``torch.set_num_threads``); 0 = torch's default. Tiny models run faster
    with 1 on a small, shared CPU."""
    allow_fewer_shots: bool = False
    """Train classes with fewer than ``data.k_shot`` training images on all of them (CoOp's behaviour,
    one warning per class). False: such a run is refused before it starts, naming the class, so a
    "16-shot" result never silently comes from fewer shots."""

    def validate(self) -> None:
        validate_meta_learning(self.regulator, self.loss, self.meta)
        if not self.run_root.strip():  # an empty root would put run folders under the working directory
            raise ConfigError("run_root is empty: give the folder that holds the runs (runs/finetune by default)")
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}: expected one of {METHODS}")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r}: expected one of {INITS}")
        for preset, owner in ((METHOD_PRESETS[self.method], f"method={self.method}"),
                              (INIT_PRESETS[self.init], f"init={self.init}")):
            for key, value in preset.items():
                have = _get(self, key)
                if have != value:
                    raise ConfigError(f"{owner} needs {key}={value!r} but the config has {have!r} "
                                      "(load it with pipeline.finetune_config.load_finetune_config to apply presets)")
        if self.init == "artifact" and not self.artifact:
            raise ConfigError("init=artifact needs artifact=<path of a stage-1 artifact.pt>")
        if self.init != "artifact" and self.artifact:
            raise ConfigError(f"artifact={self.artifact!r} is set but init={self.init!r}; use init=artifact")
        if self.method == "zeroshot" and self.init == "artifact":
            raise ConfigError("method=zeroshot trains no prompts; init=artifact makes no sense")
        if self.init_parts not in INIT_PARTS:
            raise ConfigError(f"init_parts={self.init_parts!r}: expected one of {INIT_PARTS}")
        if self.init_parts != INIT_PARTS[0] and self.init != "artifact":
            raise ConfigError(f"init_parts={self.init_parts} takes parts of a stage-1 artifact but init={self.init}; "
                              "use init=artifact artifact=<path>")
        if self.init_parts in FROZEN_REGULATOR_PARTS and self.regulator.kind in ("none", "constant"):
            raise ConfigError(f"init_parts={self.init_parts} loads the artifact's regulator, but method={self.method} "
                              f"uses regulator.kind={self.regulator.kind}, which has no parameters; use init_parts=prompts "
                              "or a method with a learned regulator (regulator.kind=modulate|transform)")
        if self.method != "zeroshot" and self.model.prompts.type == "none":
            raise ConfigError(f"model.prompts.type=none has nothing to train for method={self.method}")
        for key, value in (("data.seed", self.data.seed), ("model.seed", self.model.seed)):
            if value != self.seed:
                raise ConfigError(f"{key}={value} disagrees with seed={self.seed}; set only seed")
        if self.optim.epochs < 0 or self.optim.batch_size < 1 or self.optim.warmup_epochs < 0:
            raise ConfigError("optim.epochs and optim.warmup_epochs must be >= 0, optim.batch_size >= 1")
        if self.optim.max_nonfinite < 1:
            raise ConfigError(f"optim.max_nonfinite={self.optim.max_nonfinite} must be >= 1")
        if self.eval.split not in ("test", "val"):
            raise ConfigError(f"eval.split={self.eval.split!r}: expected 'test' or 'val'")
        if self.eval.split == "val" and self.eval.targets:
            raise ConfigError("eval.split=val evaluates the training dataset's validation split; eval.targets are "
                              "other datasets' test splits: run them with eval.split=test")
        for s in self.eval.subsets:
            if s not in ("all", "base", "new"):
                raise ConfigError(f"eval.subsets: {s!r} is not one of all/base/new")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r}: expected 'no' or 'bf16'")
        if self.data.dataset != "folder" and self.data.dataset not in DATASETS:
            raise ConfigError(f"data.dataset={self.data.dataset!r}: expected 'folder' or one of {sorted(DATASETS)}")
        if self.data.subsample not in SUBSAMPLES:
            raise ConfigError(f"data.subsample={self.data.subsample!r}: expected one of {SUBSAMPLES}")
        for name in self.eval.targets:  # checked now, not after hours of training
            if name not in DATASETS:
                raise ConfigError(f"eval.targets: {name!r} is not a dataset; expected some of {sorted(DATASETS)}")
        try:
            resolve_templates(self.frozen_templates, "{}")
        except ValueError as e:
            raise ConfigError(f"frozen_templates: {e}") from None
        if self.data.augment and self.data.augment not in AUGMENT_PRESETS:
            raise ConfigError(f"data.augment={self.data.augment!r}: expected one of {AUGMENT_PRESETS} or empty "
                              "(the dataset's choice)")

    @property
    def label(self) -> str:
        return self.name or self.method

    @property
    def run_dir(self) -> Path:
        """Deterministic output folder of this (dataset, method/name, seed)."""
        return Path(self.run_root) / self.data.dataset / self.label / f"seed_{self.seed}"


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _dotlist(values: dict[str, Any]) -> list[str]:
    def text(v):
        return "''" if v == "" else str(v).lower() if isinstance(v, bool) else str(v)

    return [f"{k}={text(v)}" for k, v in values.items()]


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """Defaults <- YAML <- method/init presets <- overrides; ``seed`` fills ``data.seed`` and ``model.seed``.

    A preset field set explicitly (YAML or override) to another value raises :class:`ConfigError`.
    """
    # safe YAML, known keys, plain values (no interpolation can run while presets are looked up below)
    layers = user_layers(FinetuneConfig, path, overrides)
    explicit: dict[str, Any] = {}
    for _, data in layers:
        explicit.update(flatten(data))
    try:  # typed view of what the user wrote, before presets (errors name the key via load_config below)
        merged = OmegaConf.merge(OmegaConf.structured(FinetuneConfig), *(OmegaConf.create(d) for _, d in layers))
    except OmegaConfBaseException:
        return load_config(FinetuneConfig, path, overrides)  # raises with the offending key
    method, init, seed = merged.method, merged.init, merged.seed
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: expected one of {METHODS}")
    if init not in INITS:
        raise ConfigError(f"init={init!r}: expected one of {INITS}")
    preset = {**METHOD_PRESETS[method], **INIT_PRESETS[init]}
    for key, value in preset.items():
        if key in explicit and OmegaConf.select(merged, key) != value:
            raise ConfigError(f"{key}={OmegaConf.select(merged, key)!r} conflicts with method={method} / "
                              f"init={init}, which sets {key}={value!r}; drop the setting or change the method")
    derived = {}
    for key in ("data.seed", "model.seed"):
        if key not in explicit:
            derived[key] = seed
    return load_config(FinetuneConfig, path, [*_dotlist(preset), *_dotlist(derived), *overrides])
