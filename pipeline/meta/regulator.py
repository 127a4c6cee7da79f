"""The gradient regulator: turns the task gradient ``g`` and regularizer gradient ``r`` of each prompt
tensor into the regulated gradient ``G`` used by the inner step (docs/ARCHITECTURE.md section 4).

Kinds (``RegulatorConfig.kind``):

- ``modulate`` (ProMetaR form): ``G = g + gamma_phi(g, r) * r`` with ``gamma`` in (0, 1), one value per
  prompt element;
- ``transform`` (GRAM form): ``G = (1 - c) * T_phi(v) * |v| / |T_phi(v)| + c * v`` with ``v = g + r``,
  a norm-preserving learned change of direction and a learned gate ``c`` in (0, 1) per layer;
- ``none``: ``G = g + r`` (regulator off); ``constant``: ``G = g + constant_gamma * r``.

Architecture. Per prompt key (``text``, ``vision``; widths differ) one small MLP shared across all
token positions and layers, applied to each *row* (one token's vector at one layer), plus a learned
per-layer embedding added to the hidden pre-activation so layers can be treated differently:
``out(gelu(inp(x) + layer_embedding[l]))``. Inputs are scale-normalised so the regulator sees
directions, not magnitudes that shrink during training or differ across backbones: each row is divided
by its RMS (``x * sqrt(W) / |x|``), and ``modulate`` also gets the row's log norm ratio
``log(|g| / |r|)`` (clamped to [-10, 10]) so it can still weigh the two terms. Input size is
``2W + 1`` (modulate) or ``W`` (transform), output ``W``.

Neutral initialisation. The output layer is zero-initialised, so

- ``modulate`` starts with ``gamma = sigmoid(bias) = gamma_init`` everywhere: an untrained regulator is
  exactly ``constant`` with ``gamma_init`` (0.5 by default);
- ``transform`` uses the residual form ``T_phi(v) = v_hat + out(...)``, so ``T_phi`` starts as the
  identity direction and ``G = g + r`` exactly (whatever the gate; ``gate_init`` only sets where the
  gate starts learning from).

The zero output layer still receives a gradient (its input, the hidden activation, is non-zero), so
learning starts at the first meta step. Everything runs in the regulator's own dtype (fp32; fp64 only
when a gradient check converts it with ``.double()``): gradients are cast in, results cast back.

Size for ViT-B/16 (text width 512, vision width 768), 4+4 tokens, depth 9, hidden 256: 989,952
parameters for ``modulate`` (``tests/test_regulator.py`` builds it from those shapes and checks <= 1.6M).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.meta.config import RegulatorConfig, validate_regulator
from pipeline.prompts import Prompts

# Clamp of the log norm ratio input: beyond e^10 one gradient dominates anyway.
_LOG_RATIO_CLAMP = 10.0


class _RowMLP(nn.Module):
    """``out(gelu(inp(x) + layer_embedding[l]))`` applied to rows ``x: [depth, n_ctx, d_in]``."""

    def __init__(self, d_in: int, hidden: int, d_out: int, depth: int, out_bias: float):
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.layer_embedding = nn.Parameter(torch.zeros(depth, hidden))
        self.out = nn.Linear(hidden, d_out)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.fill_(out_bias)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.inp(x) + self.layer_embedding[:, None, :])  # [depth, n_ctx, hidden]
        return self.out(h)  # [depth, n_ctx, d_out]


def _row_norm(x: Tensor, eps: float) -> Tensor:
    """Smooth row norm ``sqrt(|x|^2 + eps^2)``: ``[..., 1]`` (differentiable at zero, for second order)."""
    return torch.sqrt(x.pow(2).sum(dim=-1, keepdim=True) + eps * eps)


def _rms_normalize(x: Tensor, eps: float) -> Tensor:
    """Each row divided by its RMS, so entries are O(1) whatever the gradient's scale."""
    return x * math.sqrt(x.shape[-1]) / _row_norm(x, eps)


class Regulator(nn.Module):
    """Gradient regulator over prompt tensors of the given shapes ``{key: (depth, n_ctx, width)}``."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], cfg: RegulatorConfig):
        super().__init__()
        validate_regulator(cfg)
        self.cfg = cfg
        self.kind = cfg.kind
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
        self.nets = nn.ModuleDict()
        self.gates = nn.ParameterDict()
        for key, (depth, _n_ctx, width) in self.shapes.items():
            if cfg.kind == "modulate":
                bias = math.log(cfg.gamma_init / (1.0 - cfg.gamma_init))
                self.nets[key] = _RowMLP(2 * width + 1, cfg.hidden, width, depth, out_bias=bias)
            elif cfg.kind == "transform":
                self.nets[key] = _RowMLP(width, cfg.hidden, width, depth, out_bias=0.0)
                gate = math.log(cfg.gate_init / (1.0 - cfg.gate_init))
                self.gates[key] = nn.Parameter(torch.full((depth,), gate))

    @classmethod
    def for_prompts(cls, prompts: Mapping[str, Tensor], cfg: RegulatorConfig) -> Regulator:
        """A regulator matching a prompts dict (``PromptedCLIP.initial_prompts()``), on its device."""
        reg = cls({k: tuple(v.shape) for k, v in prompts.items()}, cfg)
        device = next(iter(prompts.values())).device if prompts else torch.device("cpu")
        return reg.to(device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def needs_separate_gradients(self) -> bool:
        """Only ``modulate`` needs ``g`` and ``r`` apart; the other kinds are functions of
        ``g + w * r`` (:attr:`sum_weight`), which one backward pass of ``L_task + w * R`` gives."""
        return self.kind == "modulate"

    @property
    def sum_weight(self) -> float:
        """``w`` such that the kinds other than ``modulate`` read ``v = g + w * r``."""
        return self.cfg.constant_gamma if self.kind == "constant" else 1.0

    def _dtype(self, like: Tensor) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return like.dtype

    # ------------------------------------------------------------------ the two entry points
    def modulate(self, g: Prompts, r: Prompts) -> tuple[Prompts, Prompts]:
        """``G = g + gamma(g, r) * r`` per key; returns ``(G, gamma)`` (gamma has the prompts' shapes)."""
        if self.kind != "modulate":
            raise RuntimeError(f"modulate() called on a {self.kind!r} regulator; use from_sum()")
        out: Prompts = {}
        gammas: Prompts = {}
        eps = self.cfg.eps
        for key, gk in g.items():
            dtype = self._dtype(gk)
            g32, r32 = gk.to(dtype), r[key].to(dtype)  # [depth, n_ctx, width]
            ng, nr = _row_norm(g32, eps), _row_norm(r32, eps)  # [depth, n_ctx, 1]
            log_ratio = (torch.log(ng) - torch.log(nr)).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
            x = torch.cat([_rms_normalize(g32, eps), _rms_normalize(r32, eps), log_ratio], dim=-1)  # [.., 2W+1]
            gamma = torch.sigmoid(self.nets[key](x))  # [depth, n_ctx, width]
            gammas[key] = gamma
            out[key] = gk + gamma.to(gk.dtype) * r[key]
        return out, gammas

    def from_sum(self, v: Prompts) -> tuple[Prompts, Prompts]:
        """Regulated gradient from ``v = g + sum_weight * r`` for ``none``/``constant``/``transform``.

        Returns ``(G, stats)``: for ``transform`` the per-layer gates ``c``; otherwise the constant gamma.
        """
        if self.kind == "modulate":
            raise RuntimeError("a 'modulate' regulator needs g and r apart; use modulate()")
        if self.kind in ("none", "constant"):
            gamma = next(iter(v.values())).new_tensor(self.sum_weight)
            return dict(v), {k: gamma for k in v}
        out: Prompts = {}
        gates: Prompts = {}
        eps = self.cfg.eps
        for key, vk in v.items():
            dtype = self._dtype(vk)
            v32 = vk.to(dtype)  # [depth, n_ctx, width]
            v_hat = _rms_normalize(v32, eps)
            direction = v_hat + self.nets[key](v_hat)  # residual: identity at init
            rotated = direction * (_row_norm(v32, eps) / _row_norm(direction, eps))  # norm of v
            c = torch.sigmoid(self.gates[key])[:, None, None]  # [depth, 1, 1]
            out[key] = ((1.0 - c) * rotated + c * v32).to(vk.dtype)
            gates[key] = c.flatten()
        return out, gates

    def forward(self, g: Prompts, r: Prompts) -> tuple[Prompts, Prompts]:
        """Any kind from separate ``g`` and ``r`` (reference path; the inner loop avoids the second
        backward pass where the kind allows)."""
        if self.kind == "modulate":
            return self.modulate(g, r)
        w = self.sum_weight
        return self.from_sum({k: g[k] + w * r[k] for k in g})


def gamma_statistics(gammas: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Mean / std / min / max over every gamma (or gate) value, detached 0-dim tensors."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in gammas.values()])
    std = flat.std() if flat.numel() > 1 else flat.new_zeros(())
    return {"gamma_mean": flat.mean(), "gamma_std": std, "gamma_min": flat.min(), "gamma_max": flat.max()}
