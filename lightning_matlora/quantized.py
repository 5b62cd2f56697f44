"""Quantized (bitsandbytes) base layers: detection, dequantization, re-quantization, strategy checks, memory.

The one home of everything bitsandbytes-specific. A base model loaded with transformers'
``BitsAndBytesConfig(load_in_4bit=True)`` holds ``bitsandbytes.nn.Linear4bit`` layers (NF4 or FP4 codes, optionally
with double quantization of the block scales); ``load_in_8bit=True`` gives ``bitsandbytes.nn.Linear8bitLt``
(LLM.int8: int8 rows with one float scale per output row). Both subclass ``nn.Linear``, so they are detected by
type, as PEFT does, and adapted like any linear layer; the adapter factors stay in a floating dtype and are never
quantized.

bitsandbytes is an optional dependency (``pip install 'lightning_matlora[quant]'``). It is imported only when a
function here needs it; a model without bitsandbytes layers never imports it.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from torch import nn

from .zero_stage import zero_stage

QUANT_EXTRA = "pip install 'lightning_matlora[quant]'"
QUANTIZE_CHOICES = ("nf4", "fp4", "int8")


def require_bitsandbytes() -> Any:
    """The ``bitsandbytes`` module, or an ``ImportError`` naming the extra that installs it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"Quantized base models need bitsandbytes, which is not importable here ({e}). Install it "
                          f"with `{QUANT_EXTRA}` (or `pip install 'bitsandbytes>=0.45'`).") from None
    return bitsandbytes


def _bnb_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(4-bit layer types, 8-bit layer types); empty when bitsandbytes was never imported (then no model can hold
    its layers, and it is not imported just to find that out)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return (), ()
    nn_mod = getattr(bnb, "nn", None)
    four = tuple(t for t in (getattr(nn_mod, "Linear4bit", None),) if t is not None)
    eight = tuple(t for t in (getattr(nn_mod, "Linear8bitLt", None),) if t is not None)
    return four, eight


def is_4bit(module: nn.Module) -> bool:
    four, _ = _bnb_types()
    return bool(four) and isinstance(module, four)


def is_8bit(module: nn.Module) -> bool:
    _, eight = _bnb_types()
    return bool(eight) and isinstance(module, eight)


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` layer."""
    return is_4bit(module) or is_8bit(module)


def quant_type(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"``, ``"int8"`` (LLM.int8 weights) or None (not a quantized layer)."""
    if is_4bit(module):
        return str(getattr(module.weight, "quant_type", "fp4"))
    if is_8bit(module):
        return "int8" if not _has_float_weights(module) else None
    return None


def _has_float_weights(module: nn.Module) -> bool:
    # Linear8bitLt(has_fp16_weights=True) trains float weights and quantizes on the fly: its weight is a float tensor
    return module.weight.dtype.is_floating_point


def quantized_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a quantized layer: its packed weight's shape is not the logical one."""
    return int(module.in_features), int(module.out_features)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a quantized layer computes in, the default dtype of its adapter factors.

    4-bit: the layer's ``compute_dtype`` (``bnb_4bit_compute_dtype``), else the dtype the weights had before
    quantization. 8-bit: the bias's dtype, else float32 (LLM.int8 returns its input's dtype; there is no compute
    dtype to follow).
    """
    if is_4bit(module):
        dtype = getattr(module, "compute_dtype", None)
        if dtype is None:
            state = getattr(module.weight, "quant_state", None)
            dtype = getattr(state, "original_dtype", None) or getattr(state, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    bias = getattr(module, "bias", None)
    if bias is not None and bias.dtype.is_floating_point:
        return bias.dtype
    return torch.float32


# ------------------------------------------------------------------------------------------ dequantize
def _unpack_cpu_layout(module: nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights into a CPU-specific layout at the first no-grad eval forward on CPUs with
    AVX512-BF16; restore the standard layout (as bitsandbytes' own ``state_dict`` does) so the codes can be read."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        module.quant_state = weight.quant_state


def prepare_base_layer(module: nn.Module) -> None:
    """Make a 4-bit layer compute the same function in training and in evaluation, before it is adapted.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights at its first no-grad eval forward into a
    layout whose kernel has no backward and rounds the block scales to bfloat16; the packed layout stays for later
    training steps, whose gradients through the base layer are then silently dropped. The repacking is turned off
    for adapted layers (and a layer already repacked is restored), so validation and training see the same base."""
    if is_4bit(module):
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        _unpack_cpu_layout(module)


def _int8_scales(module: nn.Module) -> torch.Tensor:
    scb = getattr(module.weight, "SCB", None)
    if scb is None:  # after the first forward, bitsandbytes keeps the row scales in the layer's state
        scb = getattr(module.state, "SCB", None)
    if scb is None:
        raise RuntimeError("This Linear8bitLt layer has no row scales (SCB): its weights were never quantized; move it "
                           "to its device (module.to(device)) first.")
    return scb


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """The weight a quantized layer computes with, as a float32 ``out × in`` tensor on the weight's device."""
    bnb = require_bitsandbytes()
    weight = module.weight
    if is_4bit(module):
        if not getattr(weight, "bnb_quantized", True):
            return weight.data.float()  # not quantized yet (before the layer was moved to a device)
        _unpack_cpu_layout(module)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if is_8bit(module):
        if _has_float_weights(module):
            return weight.data.float()
        scb = _int8_scales(module)
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).float()
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized layer.")


@torch.no_grad()
def requantize(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace a quantized layer's weight by the quantization of ``weight`` (``out × in``, float), with the layer's
    own settings (quantization type, block size, double quantization, storage dtype). Lossy: the layer then
    computes with ``dequantize(module)``, not with ``weight``."""
    bnb = require_bitsandbytes()
    old = module.weight
    device = old.device
    if is_4bit(module):
        if not getattr(old, "bnb_quantized", True):
            old.data = weight.to(old.dtype)
            return
        _unpack_cpu_layout(module)
        dtype = module.weight.quant_state.dtype  # the dtype the codes decode to
        new = bnb.nn.Params4bit(weight.to("cpu", dtype), requires_grad=False, blocksize=old.blocksize,
                                compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                quant_storage=old.quant_storage, module=module)
        module.weight = new.to(device)
        return
    if is_8bit(module):
        if _has_float_weights(module):
            old.data = weight.to(old.dtype)
            return
        module.weight = bnb.nn.Int8Params(weight.to("cpu", torch.float16), requires_grad=False,
                                          has_fp16_weights=False).to(device)
        module.state.reset_grads()
        module.state.CB = module.state.SCB = None  # the next forward takes the new codes and scales from the weight
        return
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized layer.")


def merge_warning(module: nn.Module) -> str:
    return (f"Merging into {describe_layer(module)} weights re-quantizes them: the merged model carries quantization "
            f"error (its outputs differ from the unmerged model's by more than float rounding), and unmerge() cannot "
            f"restore the original weights. For exact merged weights, merge into the unquantized base: "
            f"merge_to_base(adapter, out_dir, rank, base=<the unquantized model or its directory>).")


def unmerge_refusal(module: nn.Module, rank: int) -> str:
    return (f"Cannot unmerge rank {rank} from {describe_layer(module)} weights: the merge re-quantized them, so "
            f"subtracting the adapter again would not give back the original quantized weights. Reload the base model "
            f"(and load_adapter() into it) to get the unmerged model back.")


def describe_layer(module: nn.Module) -> str:
    if is_8bit(module):
        return "8-bit (LLM.int8)"
    kind = quant_type(module)
    double = getattr(module.weight, "compress_statistics", False)
    return f"4-bit {kind.upper() if kind else ''}" + (" (double quantization)" if double else "")


# ------------------------------------------------------------------------------------------- strategy
def check_strategy_for_quantized(strategy: Any, model: nn.Module) -> None:
    """Refuse strategies that shard parameters when ``model`` holds quantized layers: FSDP, FSDP2
    (``ModelParallelStrategy``) and DeepSpeed ZeRO-3 cannot shard bitsandbytes' packed weights and their
    quantization state. DDP (and a single device) replicate the frozen quantized base and work."""
    layers = [n for n, m in model.named_modules() if is_quantized(m)]
    if not layers:
        return
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    what = None
    if isinstance(strategy, FSDPStrategy):
        what = "FSDP"
    elif isinstance(strategy, ModelParallelStrategy):
        what = "FSDP2 (ModelParallelStrategy)"
    elif zero_stage(strategy) == 3:
        what = "DeepSpeed ZeRO-3"
    if what is not None:
        kind = describe_layer(model.get_submodule(layers[0]))
        raise ValueError(f"The base model is quantized ({kind}, {len(layers)} layers, e.g. {layers[0]!r}) and {what} "
                         f"cannot shard bitsandbytes' quantized weights. Use strategy='ddp' (each process holds the "
                         f"whole quantized base, which is what quantization makes small) or a single device; the "
                         f"adapter trains the same way.")


# --------------------------------------------------------------------------------------------- memory
@dataclasses.dataclass(frozen=True)
class BaseMemory:
    """What a model's frozen base holds in memory, in bytes.

    ``quantized_bytes``: the quantized layers' codes plus their quantization state (block scales, code books);
    ``other_bytes``: every other frozen parameter and buffer (embeddings, norms, the output head, ...).
    ``kinds``: the quantization of the quantized layers, e.g. ``{"4-bit NF4 (double quantization)": 14}``.
    """

    quantized_layers: int
    quantized_bytes: int
    other_bytes: int
    kinds: dict[str, int]
    compute_dtypes: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(sorted({8 if k.startswith("8-bit") else 4 for k in self.kinds}))


def _tensor_bytes(t: Any) -> int:
    return int(t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else 0


def _quant_state_bytes(module: nn.Module) -> int:
    weight = module.weight
    if is_4bit(module):
        state = getattr(weight, "quant_state", None)
        total = 0
        while state is not None:
            total += _tensor_bytes(getattr(state, "absmax", None)) + _tensor_bytes(getattr(state, "code", None))
            total += _tensor_bytes(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
        return total
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    return _tensor_bytes(scb)


def logical_numel(module: nn.Module) -> int:
    """The number of weights a quantized layer's packed weight holds (``in × out``)."""
    return int(module.in_features) * int(module.out_features)


def base_memory(model: nn.Module) -> BaseMemory | None:
    """The frozen base's memory split into quantized layers and the rest; None if ``model`` has no quantized layer.

    Counts every frozen parameter once (tied ones too) and every buffer, plus the quantized layers' quantization
    state, which bitsandbytes keeps outside the parameters.
    """
    quantized = {id(m): m for _, m in model.named_modules() if is_quantized(m)}
    if not quantized:
        return None
    quant_params = {id(m.weight) for m in quantized.values()}
    quant_bytes = sum(_quant_state_bytes(m) for m in quantized.values())
    other = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) in quant_params:
            quant_bytes += _tensor_bytes(p)
        else:
            other += _tensor_bytes(p)
    other += sum(_tensor_bytes(b) for b in model.buffers())
    kinds: dict[str, int] = {}
    for m in quantized.values():
        kinds[describe_layer(m)] = kinds.get(describe_layer(m), 0) + 1
    dtypes = tuple(sorted({str(compute_dtype(m)).replace("torch.", "") for m in quantized.values() if is_4bit(m)}))
    return BaseMemory(len(quantized), quant_bytes, other, kinds, dtypes)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 / 100 else f"{n / 1024:.1f} KiB"


def format_base_memory(mem: BaseMemory) -> str:
    """One summary line: the quantization (type, bits) and the frozen base's memory."""
    kinds = ", ".join(f"{k} ×{c}" for k, c in sorted(mem.kinds.items()))
    dtype = f"; compute dtype {'/'.join(mem.compute_dtypes)}" if mem.compute_dtypes else ""
    return (f"  base quantized: {kinds}{dtype}; frozen base takes {_mib(mem.total_bytes)} "
            f"({_mib(mem.quantized_bytes)} quantized layers + {_mib(mem.other_bytes)} other weights)")


def quantization_config(quantize: str | None, compute_dtype: torch.dtype | None = None,
                        double_quant: bool = True) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``quantize`` = ``"nf4"``, ``"fp4"``, ``"int8"`` (None → None).

    4-bit: ``bnb_4bit_quant_type=quantize``, double quantization on, ``bnb_4bit_compute_dtype=compute_dtype`` (default
    float32). Raises ``ImportError`` naming the extra if bitsandbytes is not installed, ``ValueError`` for another
    ``quantize``.
    """
    if quantize is None:
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r} is not one of {QUANTIZE_CHOICES} (or None for an unquantized base).")
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype or torch.float32)
