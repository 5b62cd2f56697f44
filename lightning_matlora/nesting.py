"""Nesting by SVD: reorder a trained adapter so that every prefix rank k is its layer's best rank-k approximation.

Per adapted layer, the update served at full rank R is ΔW = B·diag(c)·A (PEFT orientation: ``lora_A`` is
``R × in``, ``lora_B`` is ``out × R``; c = the controller's ``rank_coefficients(R)``). With its SVD
ΔW = U·Σ·Vᵀ (σ_1 ≥ σ_2 ≥ …), new factors

    B'[:, i] = u_i·√(σ_i / c'_i),   A'[i] = √(σ_i / c'_i)·v_iᵀ

under per-component coefficients c' that are *prefix-consistent* (rank k is served with c'_1…c'_k) make rank k
serve B'[:, :k]·diag(c'_1…c'_k)·A'[:k] = U_k·Σ_k·V_kᵀ, the best rank-k approximation of ΔW (Eckart–Young) for every
k, and rank R equal to ΔW. The SVD is computed in float64 from QR decompositions of the factors, never from the
dense ``out × in`` matrix. Components with σ_i = 0 (a layer of true rank < R) get B'[:, i] = 0 and an A' row
orthogonal to the others, so they add nothing to any output yet still receive gradients if training goes on (as a
fresh LoRA component does, B = 0).

Which rules are prefix-consistent, and what :func:`nest_by_svd` does with the others, is in docs/method.md,
"Nesting by SVD".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import MatLoRAConfig
from .inject import adapted_layers
from .adapted_model import controller_of, model_state_of
from .scaling import default_ranks

#: singular values at or below this fraction of a layer's largest are treated as zero (padding components)
ZERO_TOLERANCE = 1e-10


# ------------------------------------------------------------------------------------------------ the math
def svd_nest_factors(A: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, target: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nested factors of one layer, in float64.

    Args:
        A: ``r × in`` (``lora_A``), B: ``out × r`` (``lora_B``), any float dtype.
        coef: length r, the coefficients that serve the full update ΔW = B·diag(coef)·A.
        target: length R ≥ r, the per-component coefficients c' the nested factors will be served with
            (prefix-consistent: rank k uses c'_1…c'_k); entries may be 0 only where ΔW has no more singular values.

    Returns:
        (A' ``R × in``, B' ``out × R``, σ of length R, all float64), with B'[:, :k]·diag(target[:k])·A'[:k] equal to
        the best rank-k approximation of ΔW for every k, and σ the singular values of ΔW (zeros padded).
    """
    r, n_in = A.shape
    n_out = B.shape[0]
    if B.shape[1] != r or coef.numel() != r:
        raise ValueError(f"lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)} and {coef.numel()} coefficients do not "
                         f"describe one rank-{r} update.")
    R = target.numel()
    if R < r:
        raise ValueError(f"cannot nest a rank-{r} update into {R} components: give at least {r} target coefficients.")
    A64 = A.detach().to(torch.float64)
    BD = B.detach().to(torch.float64) * coef.detach().to(device=B.device, dtype=torch.float64)
    # ΔW = (B·D)·A = Q_b·R_b·R_aᵀ·Q_aᵀ with Q_b (out × m1), Q_a (in × m2) orthonormal; SVD of the small core
    Qb, Rb = torch.linalg.qr(BD)
    Qa, Ra = torch.linalg.qr(A64.T)
    X, S, Yh = torch.linalg.svd(Rb @ Ra.T, full_matrices=True)
    U = Qb @ X  # out × m1: left singular vectors
    V = Qa @ Yh.T  # in × m2: right singular vectors, then an orthonormal completion where m2 > len(S)
    sigma = torch.zeros(R, dtype=torch.float64, device=A64.device)
    sigma[:S.numel()] = S
    top = float(S.max()) if S.numel() else 0.0
    live = sigma > ZERO_TOLERANCE * top if top > 0 else torch.zeros(R, dtype=torch.bool, device=A64.device)
    t = target.detach().to(device=A64.device, dtype=torch.float64)
    if bool((live & (t <= 0)).any()):
        i = int(torch.nonzero(live & (t <= 0))[0])
        raise ValueError(f"component {i + 1} has singular value {float(sigma[i]):.3g} but coefficient {float(t[i])}: "
                         f"nested factors need a positive coefficient on every component that carries the update.")
    weight = torch.where(live, torch.sqrt(sigma / torch.where(t > 0, t, torch.ones_like(t))), torch.zeros_like(t))
    B_new = torch.zeros(n_out, R, dtype=torch.float64, device=A64.device)
    A_new = torch.zeros(R, n_in, dtype=torch.float64, device=A64.device)
    m1, m2 = U.shape[1], V.shape[1]
    B_new[:, :m1] = U * weight[:m1]
    A_new[:m2] = V.T * weight[:m2, None]
    # dead components: B column 0, A row along an unused right singular direction at the scale of a fresh init row
    dead = ~live
    dead[m2:] = False
    if bool(dead.any()):
        A_new[dead] = V.T[dead[:m2]] * math.sqrt(n_in / (3.0 * R))
    return A_new, B_new, sigma


def prefix_consistent(config: MatLoRAConfig) -> bool:
    """Whether rank k is served with the first k of rank R's coefficients for every k (so that one factorisation
    can make every prefix exact): ``rank_scale="trained"`` (p_1…p_k) or scaling ``"none"`` (α at every rank)."""
    return config.rank_scale == "trained" or config.scaling == "none"


def nested_serving(config: MatLoRAConfig, coef: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """The configuration changes nesting makes and the coefficients c' (float64, length r_max) it serves with.

    A prefix-consistent rule with every coefficient positive is kept. Otherwise (the paper's rule with scaling
    ``"sqrt"`` or ``"rank"``, whose s(k) differs per k; or a ``"trained"`` p with zeros) the adapter is switched to
    ``scaling="none"``, ``rank_scale="rank"`` and α = the mean positive coefficient of rank R (= s(R) under the
    paper's rule), so every rank is served with α.
    """
    c = coef.to(torch.float64)
    if prefix_consistent(config) and bool((c > 0).all()):
        return {}, c
    positive = c[c > 0]
    alpha = float(positive.mean()) if positive.numel() else 1.0
    changes = {"scaling": "none", "alpha": alpha, "rank_scale": "rank"}
    return changes, torch.full_like(c, alpha)


def _frobenius_gap(A1: torch.Tensor, B1: torch.Tensor, A2: torch.Tensor, B2: torch.Tensor) -> tuple[float, float]:
    """(‖B1·A1 − B2·A2‖_F, ‖B1·A1‖_F) from the factors (float64, no dense out × in matrix): with QR decompositions
    B = Q_b·R_b and Aᵀ = Q_a·R_a of the stacked factors, ‖B·A‖_F = ‖R_b·R_aᵀ‖_F, free of cancellation."""
    def norm(Bm: torch.Tensor, Am: torch.Tensor) -> float:
        return float(torch.linalg.norm(torch.linalg.qr(Bm)[1] @ torch.linalg.qr(Am.T)[1].T))

    return norm(torch.cat([B1, -B2], dim=1), torch.cat([A1, A2])), norm(B1, A1)


# ------------------------------------------------------------------------------------------------ the report
@dataclasses.dataclass
class NestReport:
    """What :func:`nest_by_svd` did.

    singular_values: per layer, the singular values σ_1 ≥ … ≥ σ_R of its full update (float64, zeros padded).
    changes: the configuration fields changed to make the serving rule prefix-consistent (empty if none).
    max_relative_error: the largest ‖ΔW'_R − ΔW_R‖_F / ‖ΔW_R‖_F over layers, measured on the stored factors (in
        their dtype): how far the nested adapter at r_max is from the original (float rounding only).

    See :func:`nest_by_svd` for an example.
    >>> NestReport(singular_values={}, changes={}, max_relative_error=0.0).changes
    {}
    """

    singular_values: dict[str, torch.Tensor]
    changes: dict[str, Any]
    max_relative_error: float

    @property
    def r_max(self) -> int:
        return next(iter(self.singular_values.values())).numel() if self.singular_values else 0

    def energy(self, k: int) -> dict[str, float]:
        """Per layer, the fraction Σ_{i≤k} σ_i² / Σ_i σ_i² of the update's squared Frobenius norm kept at rank k
        (1.0 for a zero update)."""
        out = {}
        for name, s in self.singular_values.items():
            total = float((s ** 2).sum())
            out[name] = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
        return out

    def mean_energy(self, ranks: Sequence[int] | None = None) -> dict[int, float]:
        """The mean over layers of :meth:`energy` at each rank (default: powers of two up to r_max, and r_max)."""
        ranks = list(ranks) if ranks is not None else default_ranks(self.r_max)
        out = {}
        for k in ranks:
            e = self.energy(k)
            out[int(k)] = sum(e.values()) / len(e) if e else 1.0
        return out

    def to_dict(self, ranks: Sequence[int] | None = None) -> dict[str, Any]:
        """JSON-ready summary: layers, changes, error, and the mean energy per rank."""
        energy = self.mean_energy(ranks)
        return {"layers": len(self.singular_values), "changes": dict(self.changes),
                "max_relative_error": self.max_relative_error,
                "energy_ranks": list(energy), "mean_energy": [round(v, 6) for v in energy.values()]}

    def __str__(self) -> str:
        energy = self.mean_energy()
        lines = [f"Nested {len(self.singular_values)} layers by SVD (r_max={self.r_max}); rank r_max differs from the "
                 f"original by {self.max_relative_error:.2e} (relative Frobenius, worst layer)."]
        if self.changes:
            lines.append("Serving rule changed to keep every prefix exact: "
                         + ", ".join(f"{k}={v!r}" for k, v in self.changes.items()))
        lines.append("rank  mean energy kept")
        lines += [f"{k:>4}  {v:.4f}" for k, v in energy.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- in place
@torch.no_grad()
def nest_by_svd(model: nn.Module) -> NestReport:
    """Reorder every adapted layer of ``model`` in place so that each prefix rank k serves that layer's best
    rank-k approximation of its full update, and rank r_max serves the same update as before (to float rounding).

    The update at r_max is taken under the adapter's current rule (``rank_coefficients(r_max)``). If that rule is
    not prefix-consistent (the paper's rule with scaling ``"sqrt"`` or ``"rank"``), the configuration is changed to
    ``scaling="none"``, ``rank_scale="rank"``, ``alpha`` = s(r_max), which serves every rank with that one scale;
    the change is written into the shared configuration (a callback holding it sees it) and listed in the report.
    ``modules_to_save`` and the training mode are left as they are. The model must not be merged.

    Returns a :class:`NestReport` (singular values per layer, the configuration changes, the error at r_max).

    >>> import torch
    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, mode="lora", verbose=False).apply(model)
    >>> _ = torch.nn.init.normal_(model[0].lora_B)   # a "trained" update
    >>> report = nest_by_svd(model)
    >>> report.changes                        # the paper's sqrt rule is not prefix-consistent: one scale for all ranks
    {'scaling': 'none', 'alpha': 0.5, 'rank_scale': 'rank'}
    >>> s = report.singular_values["0"]
    >>> bool((s[:-1] >= s[1:]).all()), report.max_relative_error < 1e-5
    (True, True)
    """
    ctrl = controller_of(model)
    layers = adapted_layers(model)
    model_state_of(model).check_unmerged("nesting its adapter")
    R = ctrl.r_max
    partial = sorted(n for n, m in layers.items() if tuple(m.lora_A.shape) != (R, m.in_features))
    if partial:
        shape = tuple(layers[partial[0]].lora_A.shape)
        raise RuntimeError(f"Layer {partial[0]!r} holds a shard of its factors (lora_A {shape}): nest the full adapter, e.g. load the saved adapter into an unsharded model with "
                           f"load_adapter() and call nest_by_svd there.")
    coef = ctrl.rank_coefficients(R).to(torch.float64)
    changes, target = nested_serving(ctrl.config, coef)
    sigmas: dict[str, torch.Tensor] = {}
    worst = 0.0
    for name, layer in layers.items():
        A, B = layer.lora_A, layer.lora_B
        c = coef.to(A.device)
        A_new, B_new, sigma = svd_nest_factors(A, B, c, target.to(A.device))
        A64, B64 = A.detach().to(torch.float64, copy=True), B.detach().to(torch.float64) * c  # before the copy_
        A.copy_(A_new.to(A.dtype))
        B.copy_(B_new.to(B.dtype))
        gap, norm = _frobenius_gap(A64, B64, A.to(torch.float64), B.to(torch.float64) * target.to(A.device))
        worst = max(worst, gap / norm if norm > 0 else gap)
        sigmas[name] = sigma.cpu()
    if changes:
        ctrl.reconfigure(**changes)
    return NestReport(singular_values=sigmas, changes=changes, max_relative_error=worst)

