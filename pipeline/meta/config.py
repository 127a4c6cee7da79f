"""Typed configs of the meta-learning core: regulator, losses, and the bi-level step.

Frozen dataclasses in the style of :mod:`pipeline.config`: every default lives here once, with a
docstring per field; stage configs nest them (``regulator``, ``loss``, ``meta``) and YAML files only
hold deltas. Each class has a ``validate_*`` function for value checks that types cannot express;
:func:`validate_meta_learning` runs all three.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ConfigError

REGULATOR_KINDS = ("modulate", "transform", "none", "constant")
TASK_CLASSES = ("present", "all")


@dataclass(frozen=True)
class RegulatorConfig:
    """The gradient regulator (docs/ARCHITECTURE.md section 4); identical in stage 1 and stage 2."""

    kind: str = "modulate"
    """``modulate`` (``G = g + gamma(g, r) * r``, ProMetaR form), ``transform`` (norm-preserving learned
    direction change of ``g + r`` with a learned gate, GRAM form), ``none`` (``G = g + r``, regulator
    off) or ``constant`` (``G = g + constant_gamma * r``, fixed gamma)."""
    hidden: int = 256
    """Hidden width of the regulator MLP (shared across token positions, one MLP per prompt key).
    256 gives ~0.99M parameters for ViT-B/16 IVLP 4+4 tokens depth 9."""
    gamma_init: float = 0.5
    """``modulate``: gamma of every element at initialisation (last layer zero, bias ``logit(gamma_init)``),
    so an untrained regulator equals ``constant`` with this value."""
    constant_gamma: float = 0.5
    """``constant``: the fixed gamma multiplying the regularizer gradient."""
    gate_init: float = 0.5
    """``transform``: initial value of the per-layer gate ``c`` in (0, 1). The direction network starts
    as the identity, so the initial regulated gradient is ``g + r`` whatever this value."""
    eps: float = 1e-12
    """Added to gradient row norms before dividing (rows with zero gradient stay finite)."""
    lr: float = 1e-3
    """Outer (meta) learning rate of the regulator parameters: an explicit value, never tied to a
    warmup constant. The entry point's scheduler multiplies it."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) of the regulator parameters."""
    grad_clip: float = 1.0
    """Clip the global norm of the regulator's averaged meta-gradient to this value; 0 = off. Stage 1
    clips it apart from the prompts' gradient (``optim.grad_clip``): the regulator's meta-gradient is
    proportional to ``meta.inner_lr`` (``theta' = theta - inner_lr * G(phi)``), orders of magnitude
    below the prompts', and one joint clip would shrink it by the prompts' norm, a factor that changes
    from step to step. An absolute threshold against spikes: compare it with the logged
    ``regulator_grad_norm``."""
    adam_eps: float = 1e-12
    """AdamW ``eps`` of the regulator parameter group in stage 1 (the prompts keep torch's 1e-8). Adam's
    step is ``m / (sqrt(v) + eps)``: an element whose gradient is near ``eps`` moves at half speed, one
    far below it barely moves. Being scaled by ``meta.inner_lr`` (see ``grad_clip``), the regulator's
    meta-gradient is small: its median element is 1e-7 to 1e-6 on the tiny test run (inner_lr 5e-4), and
    ViT-B/16's regulator spreads its gradient over ~250x more parameters. 1e-12 is far below any fp32
    gradient that carries signal and still keeps the division finite where a gradient is exactly zero.
    The logged ``regulator_eps_dominated`` (share of elements with ``sqrt(v) < eps``) checks the choice
    on a real run."""


@dataclass(frozen=True)
class LossConfig:
    """Task loss, knowledge-preservation regularizer and mixup (docs/ARCHITECTURE.md sections 4 and 5)."""

    weight_text: float = 50.0
    """lambda_txt: weight of ``mean |g_theta(c) - g_0(c)|`` (normalised prompted vs frozen text features)."""
    weight_image: float = 20.0
    """lambda_img: weight of ``mean |f_theta(x) - f_0(x)|`` (normalised prompted vs frozen image features)."""
    mixup: bool = True
    """Outer loss on manifold-mixup virtual tasks (query image features mixed with support image
    features); plain query cross-entropy when false."""
    mixup_alpha: float = 0.5
    """First parameter a of the mixup coefficient distribution ``lambda ~ Beta(a, b)``."""
    mixup_beta: float = 0.5
    """Second parameter b of ``lambda ~ Beta(a, b)``."""
    outer_preservation_weight: float = 0.0
    """Weight of the knowledge-preservation regularizer ``R`` (``weight_text``/``weight_image`` inside)
    of the *adapted* prompts on the query set, added to the outer loss of the bi-level step (both
    stages run :func:`~pipeline.meta.step.bilevel_loss`): the meta-learned initialisation is then also
    asked to stay close to frozen CLIP after adaptation, not only to adapt well. 0 = the outer loss is
    the query (mixup) loss alone."""


@dataclass(frozen=True)
class MetaConfig:
    """The bi-level step: inner adaptation on the support set, outer loss on the query set."""

    meta_step: bool = True
    """Run the meta step. False (ablation): stage 2 is the regularized step alone (followed by the
    ``matched_step`` when set); stage 1 evaluates the outer loss at the unadapted prompts (no inner
    step, the regulator gets no gradient)."""
    inner_steps: int = 1
    """Number of inner gradient steps ``theta <- theta - inner_lr * G(theta; S)``."""
    inner_lr: float = 5e-4
    """Inner learning rate alpha."""
    first_order: bool = False
    """Treat inner gradients as constants (no second-order terms; cheaper). The regulator still gets a
    meta-gradient through ``gamma`` (the inner update depends on it)."""
    outer_weight: float = 1.0
    """Multiplier of the outer (query) loss, i.e. a learning-rate ratio in stage 2: the meta step's
    prompt update is ``outer_weight`` x the prompt learning rate (``optim.lr``) times the outer gradient,
    beside the regularized step's full-size one. 1.0: every iteration takes two full-size prompt steps.
    The public ProMetaR code multiplies its meta loss by 5e-4 (``TRAINER.PROMETAR.LR_RATIO``; preset
    ``method=prometar_public``). Exact for plain SGD; with momentum the scaled gradient enters the shared
    momentum buffer, and SGD weight decay is not scaled (as in the public code, which steps the same
    optimizer twice). The regulator's AdamW step is invariant to this scale (up to its epsilon)."""
    n_query_classes: int = 1
    """Stage 2: classes of the batch held out as the query set (capped so the support keeps one class)."""
    task_classes: str = "all"
    """Stage 2 label space of the virtual tasks. ``all`` (default, as the public ProMetaR code): support
    and query are both scored among all the training (base) classes, like the regularized step. Why
    not ``present``: a batch of 4 holds 1-3 classes, so the support often holds a single class, and the
    cross-entropy over one class is identically zero -- its inner step would follow the regularizer
    alone. ``present`` (episodic, as a stage-1 task): the inner step classifies among the support's
    classes and the outer loss among support + query classes."""
    matched_step: bool = False
    """Stage 2 step-matched control (needs ``meta_step=false``): after the regularized step, a second
    regularized step ``G(theta; query)`` on the query split (same class split as the meta step would
    draw), its gradient scaled by ``outer_weight``. As many prompt updates, at the same learning rates, as
    ProMetaR, without adaptation, meta-gradient, mixup or regulator learning."""
    log_query_before: bool = False
    """Also compute the query loss at the unadapted prompts (one extra no-grad forward) for logging."""


def validate_regulator(cfg: RegulatorConfig, prefix: str = "regulator") -> None:
    if cfg.kind not in REGULATOR_KINDS:
        raise ConfigError(f"{prefix}.kind={cfg.kind!r}: expected one of {REGULATOR_KINDS}")
    if cfg.hidden < 1:
        raise ConfigError(f"{prefix}.hidden={cfg.hidden} must be >= 1")
    for key in ("gamma_init", "gate_init"):
        value = getattr(cfg, key)
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{prefix}.{key}={value} must be in (0, 1)")
    if not 0.0 <= cfg.constant_gamma:
        raise ConfigError(f"{prefix}.constant_gamma={cfg.constant_gamma} must be >= 0")
    if cfg.eps <= 0:
        raise ConfigError(f"{prefix}.eps={cfg.eps} must be > 0")
    if cfg.lr < 0 or cfg.weight_decay < 0:
        raise ConfigError(f"{prefix}.lr and {prefix}.weight_decay must be >= 0")
    if cfg.grad_clip < 0:
        raise ConfigError(f"{prefix}.grad_clip={cfg.grad_clip} must be >= 0 (0 = off)")
    if cfg.adam_eps <= 0:
        raise ConfigError(f"{prefix}.adam_eps={cfg.adam_eps} must be > 0")


def validate_loss(cfg: LossConfig, prefix: str = "loss") -> None:
    for key in ("weight_text", "weight_image"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{prefix}.{key}={getattr(cfg, key)} must be >= 0")
    for key in ("mixup_alpha", "mixup_beta"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{prefix}.{key}={getattr(cfg, key)} must be > 0")
    if cfg.outer_preservation_weight < 0:
        raise ConfigError(f"{prefix}.outer_preservation_weight={cfg.outer_preservation_weight} must be >= 0")


def validate_meta(cfg: MetaConfig, prefix: str = "meta") -> None:
    if cfg.inner_steps < 0:
        raise ConfigError(f"{prefix}.inner_steps={cfg.inner_steps} must be >= 0")
    if cfg.meta_step and cfg.inner_steps < 1:
        raise ConfigError(f"{prefix}.inner_steps must be >= 1 when {prefix}.meta_step is true")
    if cfg.inner_lr < 0:
        raise ConfigError(f"{prefix}.inner_lr={cfg.inner_lr} must be >= 0")
    if cfg.outer_weight < 0:
        raise ConfigError(f"{prefix}.outer_weight={cfg.outer_weight} must be >= 0")
    if cfg.task_classes not in TASK_CLASSES:
        raise ConfigError(f"{prefix}.task_classes={cfg.task_classes!r}: expected one of {TASK_CLASSES}")
    if cfg.n_query_classes < 1:
        raise ConfigError(f"{prefix}.n_query_classes={cfg.n_query_classes} must be >= 1")
    if cfg.matched_step and cfg.meta_step:  # the control replaces the meta step, it does not add to it
        raise ConfigError(f"{prefix}.matched_step=true is the step-matched control of the meta step; it needs "
                          f"{prefix}.meta_step=false")


def validate_meta_learning(regulator: RegulatorConfig, loss: LossConfig, meta: MetaConfig) -> None:
    """All three checks, with the default key prefixes."""
    validate_regulator(regulator)
    validate_loss(loss)
    validate_meta(meta)
