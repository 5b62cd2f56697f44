"""Self-distillation inside a ``max_pass`` step: the low pass's output matched to the max pass's.

With ``distill`` = w > 0, a paired step (:func:`lightning_matlora.paired_loss`, or the callback's wrapped
``training_step``) optimises ``(L_max + L_low + w·KL) / 2`` with

    KL = mean over positions of Σ_c p_max,c · (log p_max,c − log p_low,c),   p = softmax over the last dim,

where p_max comes from the *detached* output of the distilled module in the max pass (every row at r_max) and
p_low from its output in the low pass (the rows at their dealt lower ranks), on the same batch. The distilled
module is the output embedding of a transformers model inside the adapted module (its output: the logits), or
the submodule named by ``distill_module``; its output must be a tensor of logits with the classes on the last
dimension. Every position of that output counts (prompt and padding included: the module does not see labels).

A :class:`Distiller` is a forward hook on that module, registered when the adapter is injected
(:func:`make_distiller`, held by the model state), and idle outside a paired step opened with :func:`distill_step`. Between the two passes
it keeps the max pass's output (detached, float32 or wider): one more logits-sized tensor per step, released when
the step ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from .config import MatLoRAConfig
    from .rank import RankController

def output_embedding(root: nn.Module) -> tuple[str, nn.Module] | None:
    """(name relative to ``root``, module) of the output embedding of the first module of ``root``'s tree (root
    included) whose ``get_output_embeddings()`` returns a module, or None.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...                   num_attention_heads=2, num_key_value_heads=1)
    >>> output_embedding(nn.ModuleDict({"lm": LlamaForCausalLM(cfg)}))[0]
    'lm.lm_head'
    >>> output_embedding(nn.Linear(2, 2)) is None
    True
    """
    for module in root.modules():
        get = getattr(module, "get_output_embeddings", None)
        if not callable(get):
            continue
        try:
            head = get()
        except Exception:
            continue
        if isinstance(head, nn.Module):
            name = next((n for n, m in root.named_modules() if m is head), None)
            if name is not None:
                return name, head
    return None


def find_distill_module(root: nn.Module, name: str | None) -> tuple[str, nn.Module]:
    """The module whose output is distilled: ``name`` (a submodule of ``root``, relative to it) or, for None, the
    output embedding of a transformers model inside ``root``. Raises ``ValueError`` naming ``distill_module``."""
    if name is None:
        found = output_embedding(root)
        if found is None:
            raise ValueError(f"distill > 0 matches the logits of the model, but no module of this "
                             f"{type(root).__name__} has get_output_embeddings() (the output head of a transformers "
                             f"model): name the module whose output is the logits with distill_module='...' (its "
                             f"name relative to the adapted module), or set distill=0.")
        return found
    try:
        return name, root.get_submodule(name)
    except AttributeError:
        pass
    heads = [n for n, m in root.named_modules() if n and isinstance(m, nn.Linear)][-3:]
    raise ValueError(f"distill_module={name!r} is not a submodule of the adapted {type(root).__name__}: give the name "
                     f"of the module whose output is the logits, relative to the module the adapter was applied to "
                     f"(its last linear layers: {heads}), or None for a transformers model's output embedding.")


class Distiller:
    """The forward hook on the distilled module and the state of the current paired step.

    In the max pass each call's output is kept (detached, in float32 or wider); in the low pass the i-th call is
    matched to the max pass's i-th output: KL(p_max ‖ p_low) summed over the last dim and over positions. After
    both passes :meth:`kl` returns the mean over positions. Outside a paired step the hook does nothing.
    """

    def __init__(self, controller: "RankController", name: str, module: nn.Module) -> None:
        self.controller, self.name, self.module = controller, name, module
        self.handle = module.register_forward_hook(self._hook)
        self._open = False
        self._teachers: list[torch.Tensor] = []
        self._matched = 0
        self._kl_sum: torch.Tensor | None = None
        self._positions = 0

    def remove(self) -> None:
        """Remove the hook from the module."""
        self.handle.remove()

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        stage = self.controller.active_pass if self._open else None
        if stage is None:
            return
        if not isinstance(output, torch.Tensor) or output.dim() == 0 or not output.is_floating_point():
            raise TypeError(f"distill matches the output of {self.name!r} (distill_module) as logits with the classes "
                            f"on the last dim, but it returned {type(output).__name__}"
                            f"{'' if not isinstance(output, torch.Tensor) else ' of shape ' + str(tuple(output.shape))}"
                            f": set distill_module to the module whose output is the logits tensor.")
        dtype = torch.promote_types(output.dtype, torch.float32)
        if stage == "max":
            self._teachers.append(output.detach().to(dtype))
            return
        i = self._matched
        if i >= len(self._teachers):
            raise RuntimeError(f"distill: {self.name!r} (distill_module) ran {i + 1} time(s) in the low pass but "
                               f"{len(self._teachers)} time(s) in the max pass of the same step: both passes must "
                               f"run the same forward on the same batch.")
        teacher = self._teachers[i]
        if teacher.shape != output.shape:
            raise RuntimeError(f"distill: the output of {self.name!r} (distill_module) has shape "
                               f"{tuple(output.shape)} in the low pass but {tuple(teacher.shape)} in the max pass: "
                               f"both passes of a paired step must compute the same batch.")
        self._teachers[i] = teacher.new_empty(0)  # released: the low pass needs it no longer
        log_t = F.log_softmax(teacher, dim=-1)
        log_s = F.log_softmax(output.to(dtype), dim=-1)
        term = (log_t.exp() * (log_t - log_s)).sum()
        self._kl_sum = term if self._kl_sum is None else self._kl_sum + term
        self._positions += output.numel() // max(output.shape[-1], 1)
        self._matched += 1

    @contextlib.contextmanager
    def step(self) -> Iterator["Distiller"]:
        """Open a paired step: inside, the hook records (max pass) and matches (low pass); on exit, also on an
        exception, everything it kept is released."""
        self._reset()
        self._open = True
        try:
            yield self
        finally:
            self._open = False
            self._reset()

    def kl(self) -> torch.Tensor:
        """KL(p_max ‖ p_low) of the step so far, averaged over the positions of the distilled output (a 0-d tensor
        with a gradient through the low pass). Raises if the module did not run in both passes alike."""
        if not self._teachers:
            raise RuntimeError(f"distill: {self.name!r} (distill_module) did not run in the max pass of this paired "
                               f"step: set distill_module to a module the loss's forward calls (the one producing "
                               f"the logits).")
        if self._matched != len(self._teachers):
            raise RuntimeError(f"distill: {self.name!r} (distill_module) ran {len(self._teachers)} time(s) in the max "
                               f"pass but {self._matched} time(s) in the low pass: both passes of a paired step must "
                               f"run the same forward on the same batch.")
        assert self._kl_sum is not None
        return self._kl_sum / max(self._positions, 1)

    def _reset(self) -> None:
        self._teachers, self._matched, self._kl_sum, self._positions = [], 0, None, 0


def make_distiller(root: nn.Module, controller: "RankController", current: Distiller | None = None
                  ) -> Distiller | None:
    """The distillation hook of ``controller``'s adapter on ``root`` (the module the adapter was injected into) when
    its config has ``distill`` > 0, else None. ``current``: the hook registered before, kept when it is on the same
    module and removed otherwise. Raises ``ValueError`` naming ``distill_module`` if the module is not found. The
    model state (:class:`lightning_matlora.model_state.ModelState`) holds the result."""
    config = controller.config
    if not config.distill > 0:
        return current
    name, module = find_distill_module(root, config.distill_module)
    if current is not None:
        if current.module is module:
            return current
        current.remove()
    return Distiller(controller, name, module)


@contextlib.contextmanager
def distill_step(distiller: Distiller | None, config: "MatLoRAConfig") -> Iterator[Distiller | None]:
    """Open a paired step on the model's :class:`Distiller` (yields None when ``config`` does not distill)."""
    if not config.distill > 0:
        yield None
        return
    if distiller is None:
        raise RuntimeError(f"distill={config.distill!r} but no distillation hook is registered: the adapter's layers "
                           f"were not injected by MatryoshkaLoRA(...).apply(model) or the callback, which register it, "
                           f"or load_adapter() found no distill_module={config.distill_module!r} in the model it "
                           f"loaded into (a serving model needs none); to train on, resume the run's checkpoint with "
                           f"the callback.")
    with distiller.step():
        yield distiller
