"""`MatryoshkaLinear`: a frozen linear layer plus a nested low-rank adapter.

Factors use PEFT's orientation so that export and comparison with PEFT are slicing, not transposing:
``lora_A`` is ``r_max × in_features`` (row i is column i of the spec's A) and ``lora_B`` is
``out_features × r_max``. The forward is

    y = base(x) + ((dropout(x) · A[:k]ᵀ) ⊙ coef) · B[:, :k]ᵀ

where k and coef come from the model's shared :class:`~lightning_matlora.rank.RankController`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .quantized import (compute_dtype, dequantize, is_quantized, prepare_base_layer, quantized_dims, requantize,
                        unmerge_refusal)
from .rank import RankController

try:  # transformers' GPT-2 style Conv1D: weight is in_features × out_features, y = x·W + b
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency, this only guards odd installs
    Conv1D = None

SUPPORTED_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_TYPES) and not isinstance(module, MatryoshkaLinear)


def _weight_shape(weight: torch.Tensor) -> tuple[int, ...]:
    # DeepSpeed ZeRO-3 partitions parameters in place and keeps the full shape in `ds_shape`.
    return tuple(getattr(weight, "ds_shape", weight.shape))


def layer_dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    if is_quantized(base):  # bitsandbytes packs the weight: its shape is not the layer's
        return quantized_dims(base)
    shape = _weight_shape(base.weight)
    if Conv1D is not None and isinstance(base, Conv1D):
        return shape[0], shape[1]
    return shape[1], shape[0]


class MatryoshkaLinear(nn.Module):
    """A base ``nn.Linear`` or ``Conv1D`` (kept as ``.base_layer``, frozen) with nested adapter factors.

    Args:
        base_layer: the layer to adapt.
        controller: the model's shared rank state (decides k and the coefficients of each forward).
        dropout: dropout probability on the adapter's input (as PEFT's ``lora_dropout``).
        adapter_dtype: dtype of ``lora_A``/``lora_B`` (a floating dtype); ``None`` uses the base weight's dtype, or
            for a bitsandbytes quantized base its compute dtype (the factors are never quantized).
        init_seed: seed of ``lora_A``'s random initialisation (a generator of its own); ``None`` draws from torch's
            global generator. Injection passes one derived from the config's ``seed`` and the layer's name.

    Usually created by :meth:`MatryoshkaLoRA.apply <lightning_matlora.MatryoshkaLoRA.apply>`, not by hand:

    >>> import torch
    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA, adapted_layers
    >>> model = nn.Sequential(nn.Linear(16, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> layer = adapted_layers(model)["0"]
    >>> tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)   # PEFT's orientation: r_max × in, out × r_max
    ((4, 16), (8, 4))
    >>> bool(layer.lora_B.abs().sum() == 0)   # B = 0: the adapted model starts equal to the base
    True
    """

    def __init__(self, base_layer: nn.Module, controller: RankController, dropout: float = 0.0,
                 adapter_dtype: torch.dtype | None = None, init_seed: int | None = None) -> None:
        super().__init__()
        if not is_supported(base_layer):
            raise TypeError(f"MatryoshkaLinear wraps nn.Linear or transformers' Conv1D, not "
                            f"{type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_dims(base_layer)
        self.is_conv1d = Conv1D is not None and isinstance(base_layer, Conv1D)
        self.controller = controller
        r = controller.r_max
        weight = base_layer.weight
        if adapter_dtype is not None and not adapter_dtype.is_floating_point:
            raise ValueError(f"adapter_dtype={adapter_dtype} is not a floating dtype: the adapter factors are trained "
                             f"and stay in floating point (quantize the base instead, e.g. with transformers' "
                             f"BitsAndBytesConfig); use None or float32/bfloat16/float16.")
        self.adapter_dtype = adapter_dtype  # None: follow the base weight's dtype, also through .to(dtype)
        self.quantized = is_quantized(base_layer)
        if self.quantized:
            prepare_base_layer(base_layer)
        dtype = adapter_dtype or (compute_dtype(base_layer) if self.quantized else weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=weight.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged_rank: int | None = None
        self.init_seed = init_seed
        self.reset_parameters()

    @property
    def r_max(self) -> int:
        return self.controller.r_max

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's (frozen) weight: some models read ``layer.weight`` directly (T5 checks its dtype)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def reset_parameters(self) -> None:
        """B = 0 (the adapted model equals the base) and row i of A ~ U(−b_i, b_i) with b_i from the config's
        ``init`` rule (:attr:`~lightning_matlora.config.MatLoRAConfig.init_bounds`; ``"shared"``: 1/√R every row,
        the reference code's).

        A is drawn from U(−1/√R, 1/√R), then row i is multiplied by b_i·√R (1 for ``"shared"``). With
        ``init_seed``, A is drawn in float32 on the CPU from a generator seeded with it (the same values on every
        device and process, whatever torch's global generator holds), then copied into ``lora_A``.
        """
        bound = 1.0 / math.sqrt(self.r_max)
        with torch.no_grad():
            if self.init_seed is None:
                nn.init.uniform_(self.lora_A, -bound, bound)
            else:
                g = torch.Generator().manual_seed(self.init_seed)
                self.lora_A.copy_(torch.empty(self.lora_A.shape).uniform_(-bound, bound, generator=g))
            if self.controller.config.init != "shared":
                factor = self.controller.config.init_bounds * math.sqrt(self.r_max)
                self.lora_A.mul_(factor.to(self.lora_A.dtype)[:, None])
            nn.init.zeros_(self.lora_B)

    def _apply(self, fn, recurse: bool = True):
        """``Module.to(dtype)``/``.half()``/``.bfloat16()`` convert every parameter; an explicit ``adapter_dtype``
        is kept (Lightning's ``"bf16-true"`` precision converts the whole model after the callback's setup)."""
        super()._apply(fn, recurse)
        if self.adapter_dtype is not None:
            for param in (self.lora_A, self.lora_B):
                if param.dtype != self.adapter_dtype:
                    param.data = param.data.to(self.adapter_dtype)
                    if param.grad is not None:
                        param.grad = param.grad.to(self.adapter_dtype)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r_max={self.r_max}"
                + (f", merged_rank={self.merged_rank}" if self.merged_rank is not None else ""))

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged_rank is not None:
            return result
        A, B = self.lora_A, self.lora_B
        plan = self.controller.plan(x.shape[0], x.device, A.dtype, self.training, layer=self)
        k = plan.k
        if k == 0:  # a per-layer rank of 0: this layer runs without its adapter
            return result
        if k != A.shape[0]:
            A, B = A[:k], B[:, :k]
        h = F.linear(self.dropout(x.to(A.dtype)), A)
        coef = plan.coef
        if coef.dim() == 2 and h.dim() > 2:  # per-row coefficients on a (rows, ..., k) activation
            coef = coef.view(coef.shape[0], *([1] * (h.dim() - 2)), k)
        return result + F.linear(h * coef, B).to(result.dtype)

    # ------------------------------------------------------------------------------------------------- merge
    def merge_dtype(self) -> torch.dtype:
        """The dtype merging computes in: float64 if the base weight or the factors are float64, else float32."""
        return torch.float64 if torch.float64 in (self.lora_A.dtype, self.base_layer.weight.dtype) else torch.float32

    def delta_weight(self, k: int) -> torch.Tensor:
        """ΔW at rank k in the base weight's layout (``out × in`` for Linear, ``in × out`` for Conv1D), in
        :meth:`merge_dtype`: ``B[:, :k] · diag(coef_k) · A[:k]`` with coef_k from the rank_scale rule."""
        dtype = self.merge_dtype()
        coef = self.controller.rank_coefficients(k).to(self.lora_A.device, dtype)
        delta = (self.lora_B[:, :k].to(dtype) * coef) @ self.lora_A[:k].to(dtype)
        return delta.T if self.is_conv1d else delta

    @torch.no_grad()
    def merge(self, k: int) -> None:
        """Fold rank k into the base weight; the layer then costs what the base layer costs. k = 0 (a per-layer
        rank of 0) leaves the base weight as it is and only marks the layer merged."""
        if self.merged_rank is not None:
            raise RuntimeError(f"Layer is already merged at rank {self.merged_rank}: call unmerge() first.")
        if k == 0:
            self.merged_rank = 0
            return
        if self.quantized:  # dequantize, add, re-quantize (as PEFT does): lossy; lightning_matlora.merge warns
            w = dequantize(self.base_layer)
            requantize(self.base_layer, w + self.delta_weight(k).to(w.device))
            self.merged_rank = k
            return
        w = self.base_layer.weight
        w.data = (w.data.to(self.merge_dtype()) + self.delta_weight(k)).to(w.dtype)
        self.merged_rank = k

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged rank from the base weight again (exact up to float rounding). Refused on a quantized
        base, where the merge re-quantized the weights and cannot be undone exactly (reload the base instead)."""
        if self.merged_rank is None:
            return
        if self.merged_rank == 0:  # nothing was folded in
            self.merged_rank = None
            return
        if self.quantized:
            raise RuntimeError(unmerge_refusal(self.base_layer, self.merged_rank))
        w = self.base_layer.weight
        w.data = (w.data.to(self.merge_dtype()) - self.delta_weight(self.merged_rank)).to(w.dtype)
        self.merged_rank = None
