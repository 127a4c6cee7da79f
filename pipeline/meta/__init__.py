"""Meta-learning core: pure inner loop, regulated gradients, stage-1 meta-step, stage-2 ProMetaR iteration.

Configs are importable from here directly; the rest is loaded on first attribute access (the
regulator module imports this package's config, so eager imports here would be circular).
"""

from __future__ import annotations

import importlib

from pipeline.meta.config import (
    REGULATOR_KINDS,
    LossConfig,
    MetaConfig,
    RegulatorConfig,
    validate_loss,
    validate_meta,
    validate_meta_learning,
    validate_regulator,
)

_LAZY = {
    "Batch": "pipeline.meta.objective",
    "LossTerms": "pipeline.meta.objective",
    "Objective": "pipeline.meta.objective",
    "InnerResult": "pipeline.meta.inner",
    "RegulatedGradient": "pipeline.meta.inner",
    "inner_loop": "pipeline.meta.inner",
    "regulated_gradient": "pipeline.meta.inner",
    "BilevelOutput": "pipeline.meta.step",
    "MetaMetrics": "pipeline.meta.step",
    "MetaStepResult": "pipeline.meta.step",
    "bilevel_loss": "pipeline.meta.step",
    "meta_step": "pipeline.meta.step",
    "outer_gradients": "pipeline.meta.step",
    "union_label_space": "pipeline.meta.step",
    "ProMetaRResult": "pipeline.meta.prometar",
    "RegularizedMetrics": "pipeline.meta.prometar",
    "prometar_iteration": "pipeline.meta.prometar",
    "split_by_class": "pipeline.meta.prometar",
}

__all__ = [
    "REGULATOR_KINDS",
    "LossConfig",
    "MetaConfig",
    "RegulatorConfig",
    "validate_loss",
    "validate_meta",
    "validate_meta_learning",
    "validate_regulator",
    *_LAZY,
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.meta' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
