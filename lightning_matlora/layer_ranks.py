"""Per-layer ranks: a ``{layer name or pattern: k}`` mapping resolved against a model's adapted layer names.

Keys follow PEFT's ``rank_pattern`` rule (``peft.utils.other.get_pattern_key``): a key matches layer ``name`` when
``re.match(rf"(.*\\.)?({key})$", name)`` does, i.e. the key is a regular expression for the whole name or for a
dotted suffix of it (``"q_proj"``, ``"layers.0.self_attn.q_proj"``, ``r"layers\\.\\d+\\.mlp\\..*"``). Two rules are
stricter than PEFT's, which silently takes the first matching key and gives unmatched layers ``r``:

- a layer matched by two keys is an error (name the layer in one key only), and
- every adapted layer needs a rank: give the rest with the key ``"*"`` (the default rank of every layer no
  other key matches), or the error lists the layers left over.

Every key other than ``"*"`` must match at least one adapted layer, and every rank must lie in 0…r_max: rank 0
serves a layer without its adapter (the base layer alone; what :func:`~lightning_matlora.allocate_ranks` chooses
for a group it drops).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

#: the key of a mapping that gives every layer no other key matches its rank
DEFAULT_KEY = "*"


def pattern_matches(key: str, name: str) -> bool:
    """PEFT's ``rank_pattern`` rule: ``key`` is a regex for ``name`` or for a dotted suffix of it.

    >>> pattern_matches("q_proj", "model.layers.0.self_attn.q_proj"), pattern_matches("proj", "model.q_proj")
    (True, False)
    >>> pattern_matches(r"layers\\.1\\..*", "model.layers.1.mlp.up_proj")
    True
    """
    return re.match(rf"(.*\.)?({key})$", name) is not None


def check_rank_value(k: object, r_max: int, where: str, lowest: int = 1) -> int:
    """``k`` as an int in ``lowest``…r_max, or a ``ValueError`` naming ``where`` (the key it was given for) and the
    range (``lowest`` = 0 for a per-layer rank: rank 0 serves the layer without its adapter)."""
    if isinstance(k, str) and k.strip().isdigit():
        k = int(k)
    if isinstance(k, bool) or not hasattr(k, "__index__"):
        raise ValueError(f"The rank for {where} must be an integer in {lowest}…r_max={r_max}, got {k!r}.")
    k = int(k.__index__())  # type: ignore[union-attr]
    if not lowest <= k <= r_max:
        raise ValueError(f"The rank {k} for {where} is outside {lowest}…r_max={r_max}: the adapter has components "
                         f"1…{r_max} only{' (0: the layer without its adapter)' if lowest == 0 else ''}; choose a "
                         f"rank in that range.")
    return k


def resolve_layer_ranks(names: Iterable[str], mapping: Mapping[str, object], r_max: int) -> dict[str, int]:
    """The rank of every layer in ``names`` under ``mapping`` (keys: see the module docstring), in ``names``'s order.

    Raises ``ValueError`` naming the fix for an empty mapping, a key that is not a string or not a valid regex, a
    key that matches no layer, a rank outside 0…r_max, a layer that two keys match, and layers no key matches when
    there is no ``"*"``.

    >>> resolve_layer_ranks(["a.q_proj", "a.v_proj", "b.q_proj"], {"a.q_proj": 2, "*": 4}, r_max=8)
    {'a.q_proj': 2, 'a.v_proj': 4, 'b.q_proj': 4}
    """
    names = list(names)
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError("Per-layer ranks need a non-empty mapping {layer name or pattern: rank}, e.g. "
                         "{'q_proj': 8, '*': 2} ('*' gives every other layer its rank).")
    ranks: dict[str, int] = {}
    matched_by: dict[str, str] = {}
    default: int | None = None
    for key, value in mapping.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"A per-layer rank key must be a layer name or pattern (a non-empty string), got {key!r}.")
        k = check_rank_value(value, r_max, repr(key), lowest=0)
        if key == DEFAULT_KEY:
            default = k
            continue
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"The per-layer rank key {key!r} is not a valid regular expression ({e}): write a layer "
                             f"name, a dotted suffix such as 'q_proj', or a regex such as r'layers\\.0\\..*'.") from None
        hits = [n for n in names if pattern_matches(key, n)]
        if not hits:
            shown = ", ".join(names[:6]) + (f", … ({len(names)} in all)" if len(names) > 6 else "")
            raise ValueError(f"The per-layer rank key {key!r} matches no adapted layer: keys are matched as PEFT's "
                             f"rank_pattern (the whole name or a dotted suffix of it, as a regex). Adapted layers: "
                             f"{shown}.")
        for n in hits:
            if n in matched_by:
                raise ValueError(f"Layer {n!r} is matched by two per-layer rank keys, {matched_by[n]!r} and {key!r}: "
                                 f"make the patterns disjoint (name the layer in one key only).")
            matched_by[n] = key
            ranks[n] = k
    left = [n for n in names if n not in ranks]
    if left:
        if default is None:
            shown = ", ".join(repr(n) for n in left[:6]) + (f", … ({len(left)} in all)" if len(left) > 6 else "")
            raise ValueError(f"No per-layer rank key matches {shown}: every adapted layer needs a rank; add "
                             f"'{DEFAULT_KEY}': k to give the remaining layers rank k.")
        for n in left:
            ranks[n] = default
    return {n: ranks[n] for n in names}


def layer_parameters(dims: Mapping[str, tuple[int, int]], ranks: Mapping[str, int] | int) -> int:
    """The parameter count of the adapter cut to ``ranks`` (a rank per layer, or one rank for all): Σ k·(in + out)
    over the layers, with ``dims`` the (in_features, out_features) of each layer.

    >>> layer_parameters({"a": (8, 4), "b": (4, 4)}, {"a": 2, "b": 1})
    32
    """
    return sum((ranks if isinstance(ranks, int) else ranks[n]) * (i + o) for n, (i, o) in dims.items())


def group_key(name: str, group: str | Callable[[str], str]) -> str:
    """The group of layer ``name``: ``"type"`` (its last name part), ``"block"`` (its first number, e.g. the
    transformer block), ``"layer"`` (itself), or a function of the name."""
    if callable(group):
        return str(group(name))
    if group == "type":
        return name.rsplit(".", 1)[-1]
    if group == "block":
        found = re.search(r"\.(\d+)\.", f".{name}.")
        return found.group(1) if found else name
    if group == "layer":
        return name
    raise ValueError(f"group must be 'type', 'block', 'layer' or a function of the layer name, got {group!r}.")
