"""The model state of an adapted model: its layers by name, its ``modules_to_save``, what is merged, the tensors
it owns and the distillation hook.

A :class:`ModelState` is attached to the module the adapter was injected into and holds that model's
:class:`~lightning_matlora.rank.RankController` (the rank state). Calls run one way: the model state acts on its
layers (merge, unmerge, per-layer ranks), and each layer asks the controller for the plan of its forward; the
controller knows no layer. Obtain it with :func:`lightning_matlora.adapted_model.model_state_of`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .distill import Distiller, make_distiller
from .layer import MatryoshkaLinear
from .layer_ranks import resolve_layer_ranks
from .rank import LayerRanks, RankController

#: The attribute of an adapted model that holds its model state (a plain attribute, not a submodule).
STATE_ATTR = "_matlora_state"

# the model state of each controller, so that an inner module of an adapted model finds it (weak: a model that is
# dropped takes its state and controller with it)
_STATES: "weakref.WeakKeyDictionary[RankController, ModelState]" = weakref.WeakKeyDictionary()


class ModelState:
    """The adapted model's layers and what they hold (not an ``nn.Module``).

    Attributes:
        controller: the model's rank state, shared by its layers.
        layers: adapted layers by name, relative to the module the adapter was injected into.
        saved_modules: the ``modules_to_save`` modules by name.
        distiller: the distillation hook (``distill`` > 0 and a distilled module found), else None.

    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> from lightning_matlora.adapted_model import model_state_of
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> state = model_state_of(model)
    >>> list(state.layers), state.merged_rank
    (['0'], None)
    >>> [name for name, _ in state.owned_tensors(model)]
    ['0.lora_A', '0.lora_B']
    """

    def __init__(self, controller: RankController, layers: Mapping[str, MatryoshkaLinear],
                 saved_modules: Mapping[str, nn.Module] | None = None) -> None:
        self.controller = controller
        self.layers: dict[str, MatryoshkaLinear] = dict(layers)
        self.saved_modules: dict[str, nn.Module] = dict(saved_modules or {})
        self.distiller: Distiller | None = None

    @property
    def config(self):
        return self.controller.config

    @classmethod
    def attach(cls, root: nn.Module, controller: RankController, layers: Mapping[str, MatryoshkaLinear],
               saved_modules: Mapping[str, nn.Module] | None = None) -> "ModelState":
        """The model state of ``root`` with these layers: created (or updated, when ``root`` already holds one of
        ``controller``) and stored on ``root``; ``root``'s training forwards then draw steps when ``begin_step`` is
        never called."""
        state = getattr(root, STATE_ATTR, None)
        if isinstance(state, ModelState) and state.controller is controller:
            state.layers = dict(layers)
            state.saved_modules = dict(saved_modules or {})
        else:
            state = cls(controller, layers, saved_modules)
            object.__setattr__(root, STATE_ATTR, state)
            root.register_forward_pre_hook(controller.auto_draw_hook)
        controller.set_layers(state.layers)
        _STATES[controller] = state
        return state

    @staticmethod
    def of_controller(controller: RankController) -> "ModelState | None":
        """The model state holding ``controller`` (None when its layers were never attached to a model)."""
        return _STATES.get(controller)

    # ----------------------------------------------------------------------------------------- distillation
    def enable_distillation(self, root: nn.Module) -> Distiller | None:
        """Register (or keep) the distillation hook on ``root``'s distilled module when ``distill`` > 0. Raises
        ``ValueError`` naming ``distill_module`` if there is none."""
        self.distiller = make_distiller(root, self.controller, self.distiller)
        return self.distiller

    # ------------------------------------------------------------------------------------------ per-layer ranks
    def layer_ranks(self, mapping: Mapping[str, object]) -> LayerRanks:
        """A rank per adapted layer from ``{layer name or pattern: k}`` (see :mod:`lightning_matlora.layer_ranks`);
        raises ``ValueError`` naming the fix before anything changes."""
        if isinstance(mapping, LayerRanks) and mapping.covers(self.layers):
            return mapping
        ranks = resolve_layer_ranks(self.layers, mapping, self.controller.r_max)
        return LayerRanks(ranks, self.layers)

    # ------------------------------------------------------------------------------------------------ merge
    @property
    def merged_rank(self) -> int | dict[str, int] | None:
        """The rank merged into the base weights: an int when every merged layer has the same one, a dict
        ``{name: k}`` of the merged layers otherwise, ``None`` if no layer is merged."""
        merged = {n: m.merged_rank for n, m in self.layers.items() if m.merged_rank is not None}
        if not merged:
            return None
        ranks = set(merged.values())
        return next(iter(ranks)) if len(ranks) == 1 else merged

    def check_unmerged(self, action: str) -> None:
        """Raise a ``RuntimeError`` naming the fix if the model is merged (``action``: what needs it unmerged)."""
        k = self.merged_rank
        if k is not None:
            raise RuntimeError(f"The model is merged at rank {k}: call unmerge(model) before {action}.")

    def merge_ranks(self, rank: object) -> dict[str, int]:
        """The rank of each layer that ``merge(rank)`` folds in: an int k in 1…r_max for every layer, or a
        ``{name or pattern: k}`` mapping. Raises naming the fix (also when the model is merged already)."""
        r_max = self.controller.r_max
        if isinstance(rank, Mapping):
            ranks = dict(self.layer_ranks(rank))
        elif isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_max:
            raise ValueError(f"merge needs an int rank in 1…r_max={r_max} or a {{layer name or pattern: rank}} "
                             f"mapping, got {rank!r}.")
        else:
            ranks = {n: rank for n in self.layers}
        k = self.merged_rank
        if k is not None:
            raise RuntimeError(f"The model is already merged at rank {k}: call unmerge(model) first.")
        return ranks

    def merge(self, rank: object) -> None:
        """Fold rank ``rank`` (an int, or a rank per layer) into every adapted layer's base weight (see
        :func:`lightning_matlora.merge`)."""
        for name, k in self.merge_ranks(rank).items():
            self.layers[name].merge(k)

    def unmerge(self) -> None:
        """Undo :meth:`merge` on every adapted layer (a no-op on layers that are not merged). A merged layer whose
        base is quantized refuses (its merge re-quantized the weights); that is checked before any layer changes."""
        for layer in self.layers.values():
            if layer.merged_rank and layer.quantized:  # rank 0 folded nothing in: nothing to undo
                layer.unmerge()  # raises, naming the fix
        for layer in self.layers.values():
            layer.unmerge()

    # ------------------------------------------------------------------------------------------- owned tensors
    def owned_tensors(self, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every tensor the adapter owns inside ``module``: ``lora_A``/``lora_B`` of each adapted
        layer, every parameter and persistent buffer of the ``modules_to_save`` modules.

        Names are the keys ``module.state_dict()`` gives those tensors (wrapper components included). A weight
        tied between an owned module and another one (GPT-2's ``lm_head.weight`` is ``wte.weight``) is listed
        under the owned module's name; the other name is not the adapter's. Walks the module tree once and never
        calls ``state_dict`` (whose hooks would gather a sharded model).
        """
        layer_ids = {id(m) for m in self.layers.values()}
        saved_ids = {id(m) for m in self.saved_modules.values()}
        seen: set[str] = set()
        for name, m in module.named_modules(remove_duplicate=False):
            if id(m) in layer_ids:
                items: Iterator[tuple[str, torch.Tensor]] = iter((("lora_A", m.lora_A), ("lora_B", m.lora_B)))
            elif id(m) in saved_ids:
                items = _state_tensors(m)
            else:
                continue
            prefix = f"{name}." if name else ""
            for key, t in items:
                if prefix + key not in seen:
                    seen.add(prefix + key)
                    yield prefix + key, t


def _state_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors ``module.state_dict()`` holds (parameters and persistent buffers), by key, without calling it."""
    for name, m in module.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        for key, t in m._parameters.items():
            if t is not None:
                yield prefix + key, t
        for key, t in m._buffers.items():
            if t is not None and key not in m._non_persistent_buffers_set:
                yield prefix + key, t
