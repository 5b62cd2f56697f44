"""The one-screen summary printed when a model is adapted."""

from __future__ import annotations

from collections import Counter

from torch import nn

from .config import MatLoRAConfig
from .quantized import base_memory, format_base_memory, is_quantized, logical_numel


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared parameter counted once (a quantized layer's packed weight
    counts as the ``in × out`` weights it holds)."""
    packed = {id(m.weight): logical_numel(m) for m in model.modules() if is_quantized(m)}
    seen: dict[int, tuple[int, bool]] = {}
    for p in model.parameters():
        numel = packed.get(id(p)) or int(getattr(p, "ds_numel", p.numel()))
        seen[id(p)] = (numel, p.requires_grad)
    total = sum(n for n, _ in seen.values())
    trainable = sum(n for n, t in seen.values() if t)
    return trainable, total


def format_summary(model: nn.Module, config: MatLoRAConfig, names: list[str]) -> str:
    trainable, total = count_parameters(model)
    kinds = Counter(n.rsplit(".", 1)[-1] for n in names)
    kinds_text = ", ".join(f"{k} ×{c}" for k, c in sorted(kinds.items()))
    share = 100.0 * trainable / max(total, 1)
    lines = [
        f"MatryoshkaLoRA: adapted {len(names)} layers ({kinds_text})",
        f"  r_max={config.r_max}  train ranks={config.ranks}  eval ranks={config.eval_ranks}",
        f"  mode={config.mode}  scaling={config.scaling} (alpha={config.alpha:g})  rank_scale={config.rank_scale}"
        + ("  p=explicit" if config.p is not None else "")
        + (f"  rank_weights={config.rank_weights}" if config.mode == "rowwise" else "")
        + ("  max_pass=True" if config.max_pass else "")
        + (f"  init={config.init}" if len(config.ranks) > 1 else "")
        + (f"  distill={config.distill:g} ({config.distill_module or 'output embedding'})" if config.distill > 0
           else ""),
        f"  trainable parameters: {trainable:,} of {total:,} ({share:.2f}%)"
        + (f"  modules_to_save={config.modules_to_save}" if config.modules_to_save else ""),
    ]
    memory = base_memory(model)
    if memory is not None:  # a bitsandbytes base
        lines.append(format_base_memory(memory))
    return "\n".join(lines)
