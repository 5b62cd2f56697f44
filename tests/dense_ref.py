"""Independent dense float64 references for the nested adapter (written from the method spec, sharing no code
with lightning_matlora), and small helpers to build adapted single layers."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_matlora import MatryoshkaLoRA, adapted_layers


def s(r: int, scaling: str, alpha: float = 1.0) -> float:
    """The per-rank scale s(r) of the spec."""
    return alpha * {"none": 1.0, "rank": 1.0 / r, "sqrt": 1.0 / math.sqrt(r)}[scaling]


def p_vector(ranks, r_max: int, scaling: str, alpha: float = 1.0) -> torch.Tensor:
    """p_i = Σ_{r∈S, r≥i} s(r), float64."""
    return torch.tensor([sum(s(r, scaling, alpha) for r in ranks if r >= i) for i in range(1, r_max + 1)],
                        dtype=torch.float64)


def base_weights(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W0 as an ``in × out`` float64 matrix so that y = x·W0 + b, bias float64 or None)."""
    if isinstance(base, Conv1D):
        w = base.weight.detach().double()  # in × out already
    else:
        w = base.weight.detach().double().T
    b = None if base.bias is None else base.bias.detach().double()
    return w, b


def spec_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's A (in × R) and B (R × out), float64 leaf tensors with grad, from a MatryoshkaLinear."""
    A = layer.lora_A.detach().double().T.clone().requires_grad_(True)
    B = layer.lora_B.detach().double().T.clone().requires_grad_(True)
    return A, B


def base_out(x: torch.Tensor, W0: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x @ W0
    return y if b is None else y + b


def train_forward_ref(x, W0, b, A, B, ranks, scaling, alpha=1.0):
    """x·W0 + Σ_{r∈S} s(r)·x·A[:, :r]·B[:r, :] (term by term, float64)."""
    y = base_out(x, W0, b)
    for r in ranks:
        y = y + s(r, scaling, alpha) * (x @ A[:, :r]) @ B[:r, :]
    return y


def rank_forward_ref(x, W0, b, A, B, k, scaling, alpha=1.0, rule="rank", p=None):
    """Rank-k inference: 'rank' → x·W0 + s(k)·x·A[:, :k]·B[:k, :]; 'trained' → x·W0 + x·A[:, :k]·diag(p[:k])·B[:k, :]."""
    if rule == "trained":
        return base_out(x, W0, b) + ((x @ A[:, :k]) * p[:k]) @ B[:k, :]
    return base_out(x, W0, b) + s(k, scaling, alpha) * (x @ A[:, :k]) @ B[:k, :]


def make_base(kind: str, d_in: int, d_out: int, dtype=torch.float32, bias: bool = True) -> nn.Module:
    if kind == "conv1d":
        m = Conv1D(d_out, d_in)
        with torch.no_grad():
            m.weight.normal_(0, 0.3)
            m.bias.normal_(0, 0.3)
        return m.to(dtype)
    return nn.Linear(d_in, d_out, bias=bias).to(dtype)


def adapt_single(base: nn.Module, nonzero_b: bool = True, seed: int = 0, **cfg):
    """Wrap ``base`` in an ``nn.Sequential`` and adapt it; returns (model, callback, layer). B is randomised unless
    ``nonzero_b`` is False, so that every identity involves both factors. ``mode`` defaults to "matryoshka"."""
    model = nn.Sequential(base)
    cfg.setdefault("mode", "matryoshka")  # the identities here are those of the P forward (the paper's mode)
    cb = MatryoshkaLoRA(verbose=False, **cfg)
    torch.manual_seed(seed)
    cb.apply(model)
    layer = adapted_layers(model)["0"]
    if nonzero_b:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
    return model, cb, layer
