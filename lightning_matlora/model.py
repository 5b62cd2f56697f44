"""Rank control on a whole model: ``set_rank``, ``at_rank``, ``merge``, ``unmerge``."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import nn

from .inject import adapted_layers
from .quantized import merge_warning
from .rank import RankController, RankSetting


def controller_of(model: nn.Module) -> RankController:
    """The one :class:`RankController` shared by the adapted layers of ``model``."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("The model has no MatryoshkaLoRA layers: adapt it first with MatryoshkaLoRA(...).apply(model), "
                         "the MatryoshkaLoRA callback, or load_adapter().")
    controllers = {id(m.controller): m.controller for m in layers.values()}
    if len(controllers) > 1:
        raise ValueError(f"The model holds layers of {len(controllers)} different MatryoshkaLoRA adapters; "
                         "rank control needs a model adapted once.")
    return next(iter(controllers.values()))


def set_rank(model: nn.Module, rank: RankSetting) -> None:
    """Select the forward of every adapted layer of ``model``.

    Args:
        rank: ``None`` for the training forward; an ``int`` k in 1…r_max for inference at rank k (the
            configured ``rank_scale`` rule); a 1-D integer tensor with one rank per row of the batch (rows are
            the first dimension of each adapted layer's input), evaluated in one forward.
    """
    ctrl = controller_of(model)
    merged = {m.merged_rank for m in adapted_layers(model).values()} - {None}
    if merged:
        raise RuntimeError(f"The model is merged at rank {merged.pop()}: call unmerge(model) before changing the rank.")
    ctrl.set(rank)


def get_rank(model: nn.Module) -> RankSetting:
    return controller_of(model).setting


@contextlib.contextmanager
def at_rank(model: nn.Module, rank: RankSetting) -> Iterator[nn.Module]:
    """Context manager: run ``model`` at ``rank`` inside the block and restore the previous setting after."""
    ctrl = controller_of(model)
    previous = ctrl.setting
    set_rank(model, rank)
    try:
        yield model
    finally:
        ctrl.set(previous)


def set_rank_scale(model: nn.Module, rank_scale: str) -> None:
    """Serve the same trained weights under another inference rule: ``"rank"`` (the paper's, s(k) on the rank-k
    prefix) or ``"trained"`` (the prefix p_1…p_k of the training diagonal). Evaluation, merging, saving and
    export all follow the new rule (it is part of the adapter's configuration)."""
    layers = adapted_layers(model).values()
    if any(m.merged_rank is not None for m in layers):
        raise RuntimeError("The model is merged: call unmerge(model) before changing its inference rule.")
    controller_of(model).set_rule(rank_scale)


def merge(model: nn.Module, rank: int) -> None:
    """Fold rank ``rank`` (under the ``rank_scale`` rule) into every adapted layer's base weight.

    Afterwards each adapted layer costs what its base layer costs; ``unmerge(model)`` restores the weights. On a
    quantized (bitsandbytes) base each weight is dequantized, the delta added and the sum re-quantized, as PEFT
    does: a warning says that the merged weights carry quantization error, and ``unmerge`` is refused there.
    """
    ctrl = controller_of(model)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= ctrl.r_max:
        raise ValueError(f"merge needs an int rank in 1…r_max={ctrl.r_max}, got {rank!r}.")
    layers = adapted_layers(model).values()
    if any(m.merged_rank is not None for m in layers):
        raise RuntimeError("The model is already merged: call unmerge(model) first.")
    quantized = [m for m in layers if m.quantized]
    if quantized:
        warnings.warn(merge_warning(quantized[0].base_layer), UserWarning, stacklevel=2)
    for m in layers:
        m.merge(rank)


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` on every adapted layer (a no-op on layers that are not merged).

    Refused, before any layer changes, when a merged layer's base is quantized (bitsandbytes): the merge
    re-quantized its weights, which cannot be undone exactly; reload the base model instead.
    """
    layers = adapted_layers(model).values()
    for m in layers:
        if m.merged_rank is not None and m.quantized:
            m.unmerge()  # raises, naming the fix
    for m in layers:
        m.unmerge()


def begin_step(model: nn.Module, step: int, micro_step: int = 0, process_index: int = 0,
               num_processes: int = 1) -> None:
    """Draw the per-step randomness of ``"dylora"`` and ``"rowwise"`` training (the callback does this for you;
    call it in a hand-written training loop before each micro-batch). Under data parallelism pass this
    process's index and the number of processes, so that ``"rowwise"`` spreads the ranks over the global batch."""
    ctrl = controller_of(model)
    if (ctrl.process_index, ctrl.num_processes) != (process_index, num_processes):
        ctrl.set_process(process_index, num_processes)
    ctrl.begin_step(step, micro_step)
