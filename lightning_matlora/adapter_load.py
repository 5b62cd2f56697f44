"""Loading a saved adapter into a model: find where it belongs, check the base, then fill the factors.

Everything is checked before the model is touched, so a failed load leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch
from torch import nn

from .adapter_format import SavedAdapter, read_adapter
from .adapter_save import model_root
from .base_model import check_fits, record_of
from .config import MatLoRAConfig, rule_fields
from .inject import adapted_layers, find_targets, freeze_base, inject
from .layer import MatryoshkaLinear
from .adapted_model import controller_of, model_state_of
from .rank import RankController


def uncovered_layers(adapter: SavedAdapter, root: nn.Module) -> list[str]:
    """Layers of ``root`` that the adapter's own ``target_modules`` select but that it has no factors for (e.g. the
    third layer of a 3-layer model, for an adapter trained on a 2-layer model of the same widths)."""
    try:
        selected = find_targets(root, adapter.config)
    except TypeError:  # the targets select a module of an unsupported type: check_fits names real mismatches
        return []
    return sorted(set(selected) - set(adapter.layers))


def load_adapter(model: nn.Module, adapter: str | os.PathLike | SavedAdapter, *, strict: bool = True,
                 allow_nonfinite: bool = False) -> nn.Module:
    """Load a saved adapter into ``model`` and return ``model``.

    ``model`` is either a fresh base model (a transformers model or a module holding one): the adapter's layers
    are injected (as :class:`MatryoshkaLinear` sharing a new :class:`RankController` built from the saved
    config), filled, and every other parameter but ``modules_to_save`` is frozen; or a model already adapted with
    the same r_max, layers and rank rule (e.g. by the callback), whose adapter is overwritten. A merged model is
    refused (``unmerge`` it first).

    Args:
        model: the model to load into.
        adapter: a saved adapter directory or a :class:`SavedAdapter`.
        strict: when the model has layers that the adapter's ``target_modules`` select but the adapter has no
            factors for (an adapter of a 2-layer model loaded into a 3-layer one), ``True`` refuses with their list
            and ``False`` loads and warns with it (those layers stay un-adapted).
        allow_nonfinite: read an adapter with NaN/inf values anyway.

    Everything is validated before the model is touched: a corrupted file, a different base (a missing layer or a
    shape mismatch, named in the error), a different r_max or rank rule leave ``model`` unchanged.

    Example:
        >>> import tempfile, torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lightning_matlora import MatryoshkaLoRA, at_rank, load_adapter, save_adapter
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(cfg)
        >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
        >>> path = save_adapter(model, tempfile.mkdtemp() + "/ad")
        >>> fresh = load_adapter(LlamaForCausalLM(cfg), path)
        >>> with at_rank(fresh, 2):
        ...     fresh(torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 64])
    """
    adapter = adapter if isinstance(adapter, SavedAdapter) else read_adapter(adapter, allow_nonfinite=allow_nonfinite)
    existing = adapted_layers(model)
    if existing:
        model_state_of(model).check_unmerged("loading an adapter into it (loading into merged weights would serve the "
                                            "old adapter and corrupt the base at the next unmerge)")
    if existing:
        root, layers = _check_adapted(adapter, model)
    else:
        _, root = check_fits(record_of(adapter), model)
        left = uncovered_layers(adapter, root)
        if left:
            what = (f"{len(left)} layers of the model that the adapter's target_modules select have no adapter "
                    f"({', '.join(repr(n) for n in left[:6])}{', …' if len(left) > 6 else ''}): the adapter was "
                    f"trained on a smaller model ({record_of(adapter).made_for()})")
            if strict:
                raise ValueError(f"{what}. Load it into the model it was trained on, or pass strict=False to load it "
                                 f"anyway and leave those layers un-adapted.")
            warnings.warn(f"{what}; loaded with strict=False, those layers stay un-adapted.", stacklevel=2)
        names = sorted(adapter.layers)
        load_cfg = dataclasses.replace(adapter.config, target_modules=names, exclude_modules=None,
                                       modules_to_save=list(adapter.saved_modules) or None)
        controller = RankController(MatLoRAConfig.from_dict(adapter.config.to_dict()))
        with torch.random.fork_rng(devices=[]):  # the fresh factors' random init must not move the user's RNG
            injected = inject(root, load_cfg, controller, distill_required=False)
        if sorted(injected) != names:  # pragma: no cover - check_fits guarantees the names exist
            raise RuntimeError(f"Injected layers {sorted(injected)[:3]}… differ from the adapter's {names[:3]}….")
        freeze_base(root, load_cfg)
        layers = adapted_layers(root)
    with torch.no_grad():
        for name, layer in layers.items():
            A, B = adapter.factors(name)
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        state = root.state_dict(keep_vars=True)
        for key in adapter.saved_keys:
            state[key].data.copy_(adapter.tensors[key])
    return model


def _check_adapted(adapter: SavedAdapter, model: nn.Module) -> tuple[nn.Module, dict[str, MatryoshkaLinear]]:
    ctrl = controller_of(model)
    mine, saved = ctrl.config.to_dict(), adapter.config.to_dict()
    if mine["r_max"] != saved["r_max"]:
        raise ValueError(f"The adapter has r_max={saved['r_max']} but the model is adapted with r_max={mine['r_max']}: "
                         f"load it into a fresh base model, or adapt with r_max={saved['r_max']}.")
    diff = [f"{f}: adapter {saved[f]!r}, model {mine[f]!r}" for f in rule_fields() if saved[f] != mine[f]]
    if diff:
        raise ValueError(f"The adapter's rank rule differs from the model's adapter ({'; '.join(diff)}): load it into a "
                         f"fresh base model so that it keeps its own settings.")
    layers = adapted_layers(model)

    def fits(_name: str, root: nn.Module) -> bool:
        return set(adapted_layers(root)) == set(adapter.layers)

    found = model_root(model, fits)
    if found is None:
        found_names = sorted(layers)
        missing = sorted(set(adapter.layers) - {n.split(".", 1)[-1] for n in found_names} - set(found_names))
        raise ValueError(f"The model's adapted layers ({len(layers)}, e.g. {found_names[0]!r}) differ from the adapter's "
                         f"({len(adapter.layers)}, e.g. missing {missing[:2] or sorted(adapter.layers)[:2]}): "
                         f"load it into a fresh base model.")
    _, root = found
    check_fits(record_of(adapter), root, adapted=True)
    return root, adapted_layers(root)
