"""Attention backend: fused SDPA kernels in single-backward passes, the math backend in second-order ones.

``pipeline.prompts.first_order_attention`` lets SDPA pick its fused kernels with gradients on; the code
enters it where a graph is differentiated once (the regularized / plain step, first-order meta passes) and
forces the math backend again where the meta-gradient is second order. On the CPU the fused kernel is
``_scaled_dot_product_flash_attention_for_cpu``, which torch selects for these shapes (fp32 and fp64) and
which has no double backward, so a leak into a second-order pass raises rather than passing silently.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import PromptConfig
from pipeline.meta.config import LossConfig, MetaConfig, RegulatorConfig
from pipeline.meta.objective import Batch, Objective
from pipeline.meta.prometar import prometar_iteration
from pipeline.meta.regulator import Regulator
from pipeline.meta.step import bilevel_loss, meta_step
from pipeline.prompts import PromptedCLIP, double_backward_needed, first_order_attention

from .conftest import make_backbone

CLASSES = ("cat", "dog", "car", "tree", "boat")
FUSED = "ScaledDotProductFlashAttentionForCpuBackward0"


def _model(backbone, seed=0):
    cfg = PromptConfig(type="ivlp", depth_text=3, depth_vision=3)
    return PromptedCLIP(backbone, cfg, generator=torch.Generator().manual_seed(seed))


def _batch(dtype=torch.float32, labels=(0, 1, 2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(labels)
    return Batch(torch.randn(len(labels), 3, 32, 32, generator=g).to(dtype), labels, CLASSES)


class Recorder:
    """Wraps ``F.scaled_dot_product_attention`` (what ``nn.MultiheadAttention`` calls) and records, per
    call with gradients on, the backward node of its output: the fused CPU kernel's, or a math op's."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        original = F.scaled_dot_product_attention

        def sdpa(*args, **kwargs):
            out = original(*args, **kwargs)
            if torch.is_grad_enabled() and out.grad_fn is not None:
                self.calls.append(type(out.grad_fn).__name__)
            return out

        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls

    @staticmethod
    def all_fused(calls) -> bool:
        return bool(calls) and all(c == FUSED for c in calls)

    @staticmethod
    def all_math(calls) -> bool:
        return bool(calls) and FUSED not in calls


@pytest.fixture(scope="module")
def backbone64():
    return make_backbone("tiny-vit-s", precision="fp64")


def test_context_is_scoped_and_nests():
    assert double_backward_needed()  # safe by default
    with first_order_attention():
        assert not double_backward_needed()
        with first_order_attention(False):  # a second-order pass inside a first-order region
            assert double_backward_needed()
        assert not double_backward_needed()
    assert double_backward_needed()
    with pytest.raises(KeyError), first_order_attention():
        raise KeyError("reset on error too")
    assert double_backward_needed()


def _plain_loss(model, prompts, batch):
    """The plain iteration's loss: cross-entropy of the prompted logits."""
    return F.cross_entropy(model.logits(batch.images, batch.classnames, prompts), batch.labels)


def _plain_grads(model, prompts, batch):
    return torch.autograd.grad(_plain_loss(model, prompts, batch), list(prompts.values()))


@pytest.mark.parametrize(("arch", "dtype", "rtol"), [("tiny-vit", torch.float32, 1e-5),
                                                     ("tiny-vit-s", torch.float64, 1e-10)])
def test_plain_iteration_gradients_equal_under_fused_and_math(monkeypatch, arch, dtype, rtol):
    """The fused kernel computes the same softmax(QK^T / sqrt(d)) V and its exact backward, only in
    another summation order (blocked, online-softmax rescaling); in fp32 that moves each value by a few
    ulps (~1e-7) per attention call, and the 12 + 12 layers of tiny-vit plus the backward accumulate it to
    ~2e-6 of the largest gradient element (measured). 1e-5 leaves room for that and still catches any real
    difference (a wrong mask, scale or kernel is O(1)). fp64 (measured ~1e-14) shows the same to 1e-10."""
    backbone = make_backbone(arch, precision="fp64" if dtype == torch.float64 else "fp32")
    model = _model(backbone)
    prompts = model.initial_prompts()
    batch = _batch(dtype)
    rec = Recorder(monkeypatch)
    math_grads = _plain_grads(model, prompts, batch)
    assert rec.all_math(rec.take())
    with first_order_attention():
        fused_grads = _plain_grads(model, prompts, batch)
    assert rec.all_fused(rec.take())  # the fused kernel really ran, in both towers
    for m, f in zip(math_grads, fused_grads):
        assert m.dtype == dtype
        scale = m.abs().max()
        assert scale > 0
        assert (m - f).abs().max() <= rtol * scale, float((m - f).abs().max() / scale)


def test_fused_kernel_has_no_double_backward(backbone64):
    """Why the math backend is the default: a gradient built with create_graph=True under the fused
    kernel cannot be differentiated again. The same pass on the default backend can."""
    model = _model(backbone64)
    prompts = model.initial_prompts()
    batch = _batch(torch.float64)

    def grad_of_grad():
        (g,) = torch.autograd.grad(_plain_loss(model, prompts, batch), [prompts["vision"]], create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), [prompts["vision"]])[0]

    with first_order_attention(), pytest.raises(RuntimeError, match="derivative for .*flash_attention.* not implemented"):
        grad_of_grad()
    assert grad_of_grad().abs().sum() > 0  # default: math backend, second order works


def _meta_setup(backbone, kind="modulate"):
    model = _model(backbone)
    prompts = model.initial_prompts()
    regulator = Regulator.for_prompts(prompts, RegulatorConfig(kind=kind, hidden=8)).to(torch.float64)
    objective = Objective(model, LossConfig())
    return model, prompts, regulator, objective


def test_meta_passes_pick_the_backend_their_order_needs(monkeypatch, backbone64):
    """Second-order bilevel loss: math in every forward with gradients, even inside an enclosing
    first_order_attention (and its meta-gradient goes through); first order or no meta step: fused."""
    _, prompts, regulator, objective = _meta_setup(backbone64)
    support, query = objective.with_frozen(_batch(torch.float64, (0, 0, 1, 2))), _batch(torch.float64, (3, 4), 1)
    rec = Recorder(monkeypatch)
    for outer_first_order in (False, True):
        with first_order_attention(outer_first_order):
            res = meta_step(objective, prompts, regulator, support, query, MetaConfig())
        assert rec.all_math(rec.take())
        assert all(torch.isfinite(g).all() for g in res.prompt_grads.values())
        assert sum(float(g.abs().sum()) for g in res.regulator_grads.values()) > 0
    for cfg in (MetaConfig(first_order=True), MetaConfig(meta_step=False)):
        out = bilevel_loss(objective, prompts, regulator, support, query, cfg)
        torch.autograd.grad(out.loss, list(prompts.values()))  # one backward through the fused kernel
        assert rec.all_fused(rec.take()), cfg


@pytest.mark.parametrize(("kind", "cfg", "second"), [
    ("modulate", MetaConfig(), "math"),  # ProMetaR
    ("modulate", MetaConfig(first_order=True), "fused"),
    ("none", MetaConfig(meta_step=False), None),  # ivlp / coop / vpt_deep: the plain iteration
    ("modulate", MetaConfig(meta_step=False), None),  # prometar_no_meta (promptsrc_lite: kind constant)
    ("constant", MetaConfig(meta_step=False, matched_step=True), "fused"),  # step-matched control
])
def test_iteration_uses_fused_kernels_outside_second_order_passes(monkeypatch, backbone64, kind, cfg, second):
    """prometar_iteration: the regularized step always runs fused; the second step as its order allows."""
    _, prompts, regulator, objective = _meta_setup(backbone64, kind)
    prompts = {k: torch.nn.Parameter(v.detach().clone()) for k, v in prompts.items()}
    sgd = torch.optim.SGD(list(prompts.values()), lr=0.01)
    params = [p for p in regulator.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(params, lr=1e-3) if params else None
    batch = objective.with_frozen(_batch(torch.float64))
    rec = Recorder(monkeypatch)
    # reference: the regularized step alone, to split the recorded calls at the step boundary
    prometar_iteration(objective, prompts, regulator, batch, MetaConfig(meta_step=False), sgd, adamw)
    first = rec.take()
    assert rec.all_fused(first)
    result = prometar_iteration(objective, prompts, regulator, batch, cfg, sgd, adamw,
                                torch.Generator().manual_seed(0))
    calls = rec.take()
    assert calls[: len(first)] == first
    rest = calls[len(first):]
    if second is None:
        assert not rest and result.prompt_updates == 1
    else:
        assert (rec.all_math if second == "math" else rec.all_fused)(rest), rest
        assert result.prompt_updates == 2 and not [s for s in result.skipped if s.startswith("nonfinite")]
