"""Meta-learning core, shared by both stages (docs/ARCHITECTURE.md sections 4 and 5).

Modules, lowest first (each imports only the ones above it):

- :mod:`pipeline.meta.config`: ``RegulatorConfig``, ``LossConfig``, ``MetaConfig`` and their checks;
- :mod:`pipeline.meta.losses`: task loss, knowledge-preservation regularizer, manifold mixup;
- :mod:`pipeline.meta.regulator`: the gradient regulator network;
- :mod:`pipeline.meta.objective`: task loss + regularizer of a batch under given prompts;
- :mod:`pipeline.meta.inner`: the regulated gradient and the pure functional inner loop;
- :mod:`pipeline.meta.step`: the bi-level meta-step (stage 1);
- :mod:`pipeline.meta.prometar`: one ProMetaR iteration (stage 2).

Import from the submodules; this package re-exports nothing.
"""
