"""Rank control on a whole adapted model: ``set_rank``, ``at_rank``, ``merge``, ``unmerge``, ``begin_step``,
``paired_loss``.

Each function finds the model's :class:`~lightning_matlora.model_state.ModelState` (attached to the model when the
adapter was injected) with :func:`model_state_of`, and acts through it or through its
:class:`~lightning_matlora.rank.RankController` (:func:`controller_of`); none of them searches the module tree.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ContextManager, Union

import torch
from torch import nn

from .distill import distill_step
from .inject import adapted_layers
from .model_state import STATE_ATTR, ModelState
from .quantized import merge_warning
from .rank import RankController, RankSetting

#: what ``set_rank``/``at_rank`` accept: a :data:`~lightning_matlora.rank.RankSetting` or ``{name or pattern: k}``
RankArg = Union[RankSetting, Mapping[str, int]]


def model_state_of(model: nn.Module) -> ModelState:
    """The one :class:`~lightning_matlora.model_state.ModelState` of the adapted ``model`` (its layers by name, what
    is merged, the tensors it owns; its ``controller`` is the rank state).

    A lookup for the module the adapter was injected into (``MatryoshkaLoRA.apply``, the callback,
    ``load_adapter``); for an enclosing or inner module, or a model adapted by hand, one scan of its module tree.

    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> list(model_state_of(model).layers)
    ['0']
    """
    state = getattr(model, STATE_ATTR, None)
    if isinstance(state, ModelState):
        return state
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("The model has no MatryoshkaLoRA layers: adapt it first with MatryoshkaLoRA(...).apply(model), "
                         "the MatryoshkaLoRA callback, or load_adapter().")
    controllers = {id(m.controller): m.controller for m in layers.values()}
    if len(controllers) > 1:
        raise ValueError(f"The model holds layers of {len(controllers)} different MatryoshkaLoRA adapters; "
                         "rank control needs a model adapted once.")
    ctrl = next(iter(controllers.values()))
    state = ModelState.of_controller(ctrl)
    if state is None:  # layers built by hand, never injected: this model is the one they belong to
        state = ModelState.attach(model, ctrl, layers)
    return state


def controller_of(model: nn.Module) -> RankController:
    """The one :class:`~lightning_matlora.rank.RankController` (the rank state) of the adapted ``model``.

    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> controller_of(model).r_max
    4
    """
    return model_state_of(model).controller


def _setting(state: ModelState, rank: RankArg) -> RankSetting:
    """``rank`` as a controller setting: a mapping becomes a rank per layer (checked before anything changes)."""
    return state.layer_ranks(rank) if isinstance(rank, Mapping) else rank


def set_rank(model: nn.Module, rank: RankArg) -> None:
    """Select the forward of every adapted layer of ``model``.

    Args:
        rank: ``None`` for the training forward; an ``int`` k in 1…r_max for inference at rank k (the
            configured ``rank_scale`` rule); a 1-D integer tensor with one rank per row of the batch (rows are
            the first dimension of each adapted layer's input), evaluated in one forward; or a mapping
            ``{layer name or pattern: k}`` for a rank per layer. Keys are matched as PEFT's ``rank_pattern`` (a
            regex for the whole layer name or a dotted suffix of it, e.g. ``"q_proj"``); a layer matched by two
            keys is an error, and every layer needs a rank: ``"*": k`` gives it to the layers no other key
            matches (see :mod:`lightning_matlora.layer_ranks`). ``get_rank`` then returns the rank of every
            layer by name.

    >>> import torch
    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> set_rank(model, 2); get_rank(model)
    2
    >>> set_rank(model, torch.tensor([1, 4, 2])); y = model(torch.ones(3, 8))   # one rank per row
    >>> set_rank(model, {"0": 3}); get_rank(model)   # a rank per layer, by name or pattern
    LayerRanks({'0': 3})
    >>> set_rank(model, None)   # back to the training forward
    """
    state = model_state_of(model)
    state.check_unmerged("changing the rank")
    state.controller.set(_setting(state, rank))


def get_rank(model: nn.Module) -> RankSetting:
    """The active rank setting of ``model`` (``None``: the training forward).

    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> get_rank(model) is None
    True
    """
    return controller_of(model).setting


@contextlib.contextmanager
def at_rank(model: nn.Module, rank: RankArg) -> Iterator[nn.Module]:
    """Context manager: run ``model`` at ``rank`` (anything :func:`set_rank` takes, per-layer ranks included)
    inside the block and restore the previous setting after.

    >>> import torch
    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> with at_rank(model, 2):
    ...     y = model(torch.ones(1, 8))
    ...     get_rank(model)
    2
    >>> get_rank(model) is None
    True
    """
    state = model_state_of(model)
    state.check_unmerged("changing the rank")
    ctrl = state.controller
    setting = _setting(state, rank)
    previous = ctrl.setting
    ctrl.set(setting)
    try:
        yield model
    finally:
        ctrl.set(previous)


def set_rank_scale(model: nn.Module, rank_scale: str) -> None:
    """Serve the same trained weights under another inference rule: ``"rank"`` (the paper's, s(k) on the rank-k
    prefix) or ``"trained"`` (the prefix p_1…p_k of the training diagonal). Evaluation, merging, saving and
    export all follow the new rule (it is part of the adapter's configuration). Warns if the adapter's training
    mode never trained the new rule (``"trained"`` after ``"rowwise"`` or ``"dylora"``).

    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> cb = MatryoshkaLoRA(r_max=4, mode="matryoshka", verbose=False)
    >>> _ = cb.apply(model)
    >>> set_rank_scale(model, "trained"); cb.config.rank_scale
    'trained'
    """
    model_state_of(model).check_unmerged("changing its inference rule")
    controller_of(model).set_rule(rank_scale)


def merge(model: nn.Module, rank: int | Mapping[str, int]) -> None:
    """Fold rank ``rank`` (under the ``rank_scale`` rule) into every adapted layer's base weight: one int k for every
    layer, or a ``{layer name or pattern: k}`` mapping as :func:`set_rank` takes it (each layer at its own rank).

    Afterwards each adapted layer costs what its base layer costs; ``unmerge(model)`` restores the weights. The
    merge computes in float32, or in float64 for float64 weights. On a quantized (bitsandbytes) base each weight
    is dequantized, the delta added and the sum re-quantized, as PEFT does: a warning says that the merged weights
    carry quantization error, and ``unmerge`` is refused there.

    >>> import torch
    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> merge(model, 2)
    >>> model[0]
    MatryoshkaLinear(
      in_features=8, out_features=8, r_max=4, merged_rank=2
      (base_layer): Linear(in_features=8, out_features=8, bias=True)
      (dropout): Identity()
    )
    >>> unmerge(model)
    """
    state = model_state_of(model)
    state.merge_ranks(rank)  # checked before any layer changes
    quantized = [m for m in state.layers.values() if m.quantized]
    if quantized:
        warnings.warn(merge_warning(quantized[0].base_layer), UserWarning, stacklevel=2)
    state.merge(rank)


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` on every adapted layer (a no-op on layers that are not merged).

    Refused, before any layer changes, when a merged layer's base is quantized (bitsandbytes): the merge
    re-quantized its weights, which cannot be undone exactly; reload the base model instead.

    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> unmerge(model)   # nothing merged: nothing to do
    """
    model_state_of(model).unmerge()


def begin_step(model: nn.Module, step: int, micro_step: int = 0, process_index: int = 0,
               num_processes: int = 1) -> None:
    """Draw the per-step randomness of ``"dylora"`` and ``"rowwise"`` training for optimizer step ``step``.

    The callback does this for you. In a hand-written loop, either call it before each micro-batch (then the draws
    follow your step numbers), or never call it: each training-mode forward of the model the adapter was applied
    to then draws steps 0, 1, 2, … by itself. Under data parallelism pass this process's index and the number of
    processes, so that ``"rowwise"`` spreads the ranks over the global batch.

    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, mode="dylora", seed=0, verbose=False).apply(model)
    >>> begin_step(model, 0)
    >>> controller_of(model).step_rank in (1, 2, 4)
    True
    """
    ctrl = controller_of(model)
    if (ctrl.process_index, ctrl.num_processes) != (process_index, num_processes):
        ctrl.set_process(process_index, num_processes)
    ctrl.begin_step(step, micro_step)


def paired_loss(model: nn.Module, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The loss of one ``max_pass`` training step: ``(L_max + L_low) / 2``, or ``(L_max + L_low + distill·KL) / 2``
    with ``distill`` > 0.

    Runs ``compute()`` twice on the same batch: first in the max pass (every row of the batch at r_max, the
    ``"rank"`` rule: s(r_max)·x·A·B), then in the low pass (the rows dealt cyclically over the train ranks below
    r_max, as ``"rowwise"`` deals them), and returns the mean of the two losses; call ``backward()`` on it. With
    ``distill`` > 0 the adapter's hook on the distilled module (the logits) adds ``distill`` times KL(p_max ‖ p_low),
    p_max from the max pass's detached output, averaged over the output's positions (see
    :mod:`lightning_matlora.distill`); ``compute`` must run the same forward in both passes. For
    hand-written loops (the :class:`~lightning_matlora.MatryoshkaLoRA` callback does this for a LightningModule's
    ``training_step``)::

        loss = paired_loss(model, lambda: model(**batch).loss)
        loss.backward()

    It costs two forwards and two backwards' worth of compute and keeps both passes' activations until the
    backward. Needs an adapter built with ``max_pass=True`` (``mode="rowwise"``) and the training setting
    (``set_rank(model, None)``); ``compute`` returns the loss tensor (or a mapping with it under ``"loss"``) and
    must not call ``paired_loss`` itself. The pass state is restored even if ``compute`` raises.

    >>> import torch
    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, max_pass=True, verbose=False).apply(model)
    >>> x, target = torch.randn(6, 8), torch.randn(6, 8)
    >>> loss = paired_loss(model, lambda: ((model(x) - target) ** 2).mean())
    >>> loss.backward()
    >>> model[0].lora_B.grad is not None
    True
    """
    ctrl = controller_of(model)
    if not ctrl.config.max_pass:
        raise ValueError("paired_loss runs the max pass and the low pass of an adapter trained with max_pass=True, "
                         "but this model's adapter has max_pass=False: build it with MatryoshkaLoRA(..., "
                         "mode='rowwise', max_pass=True), or compute the loss directly (one pass) without "
                         "paired_loss.")
    if ctrl.active_pass is not None:
        raise RuntimeError(f"paired_loss was called inside a paired step (its {ctrl.active_pass} pass is running): "
                           f"inside paired_loss's own compute, or inside a training_step that the MatryoshkaLoRA "
                           f"callback already runs twice (automatic optimization). Compute the plain loss there; "
                           f"call paired_loss only around one step's loss, in a hand-written loop or under manual "
                           f"optimization.")
    state = model_state_of(model)
    state.check_unmerged("training")
    if ctrl.setting is not None:
        raise ValueError(f"paired_loss trains the training forward, but the model is set to rank {ctrl.setting!r}: "
                         f"call set_rank(model, None) first.")
    high, low, kl = run_paired_passes(state, compute)
    return combine_pass_losses(pass_loss(high, "max", "compute"), pass_loss(low, "low", "compute"), kl,
                               ctrl.config.distill)


def run_paired_passes(state: ModelState, compute: Callable[[], Any],
                      low_context: Callable[[], ContextManager] = contextlib.nullcontext) -> tuple[Any, Any, Any]:
    """The two passes of one ``max_pass`` step (the one home of their order): ``compute()`` in the max pass, then
    inside ``low_context()`` in the low pass. Returns ``(high, low, kl)``: the two results and the distillation
    term (a tensor), which is None when the adapter does not distill or a pass returned None."""
    ctrl = state.controller
    with distill_step(state.distiller, ctrl.config) as distiller:
        with ctrl.in_pass("max"):
            high = compute()
        with ctrl.in_pass("low"), low_context():
            low = compute()
        kl = distiller.kl() if distiller is not None and high is not None and low is not None else None
    return high, low, kl


def pass_loss(out: Any, which: str, what: str = "training_step") -> torch.Tensor:
    """The loss tensor of one pass's result ``out`` (a tensor, or a mapping with the loss under ``"loss"``);
    raises a ``TypeError`` naming the fix otherwise. ``which``: ``"max"`` or ``"low"``; ``what``: the code that
    returned ``out``."""
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, torch.Tensor):
        got = "a dict without a loss tensor under 'loss'" if isinstance(out, Mapping) else type(out).__name__
        raise TypeError(f"max_pass=True combines the losses of the two passes of {what}, but its {which} pass "
                        f"returned {got}: return the loss tensor"
                        + (", a dict with the loss under 'loss', or None to skip the step." if what == "training_step"
                           else " (or a dict with the loss under 'loss')."))
    return loss


def combine_pass_losses(high: torch.Tensor, low: torch.Tensor, kl: torch.Tensor | None = None,
                        weight: float = 0.0) -> torch.Tensor:
    """The loss of a paired step (the one home of the formula): ``(L_max + L_low) / 2``, plus ``weight·kl / 2`` with
    a distillation term ``kl``."""
    total = high + low
    if kl is not None:
        total = total + weight * kl
    return total / 2
