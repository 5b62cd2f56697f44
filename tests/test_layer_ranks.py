"""A rank per layer: set_rank/at_rank/merge with a {name or pattern: k} mapping against a dense float64 reference,
the pattern rules (PEFT's rank_pattern matching, stricter on overlaps and unmapped layers), and the PEFT export
with rank_pattern/alpha_pattern checked against the real `peft` package."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from lightning_matlora import (adapted_layers, at_rank, export_peft, get_rank, merge, save_adapter, set_rank,
                               unmerge)
from lightning_matlora.layer_ranks import pattern_matches, resolve_layer_ranks
from test_adapter_io import X, trained

R = 8


def _mixed(names):
    """A rank per layer that varies over layers and module types (1…R)."""
    return {n: 1 + (i * 3) % R for i, n in enumerate(sorted(names))}


def _dense_reference(base, adapter_model, ranks, scaling="sqrt", alpha=1.0, rank_scale="rank"):
    """``base`` (an un-adapted copy) with each adapted layer's weight replaced by W0 + ΔW computed here in float64:
    ΔW = B[:, :k]·diag(c)·A[:k], c = s(k)·1 (the paper's rule) or p_1…p_k (the trained rule)."""
    ref = copy.deepcopy(base).double()
    layers = adapted_layers(adapter_model)
    ranks_train = [1, 2, 4, 8]
    s = {"sqrt": lambda r: alpha / math.sqrt(r), "rank": lambda r: alpha / r, "none": lambda r: alpha}[scaling]
    p = torch.tensor([sum(s(r) for r in ranks_train if r >= i) for i in range(1, R + 1)], dtype=torch.float64)
    with torch.no_grad():
        for name, k in ranks.items():
            layer = layers[name]
            A, B = layer.lora_A.double()[:k], layer.lora_B.double()[:, :k]
            c = p[:k] if rank_scale == "trained" else torch.full((k,), s(k), dtype=torch.float64)
            delta = (B * c) @ A
            mod = ref.get_submodule(name)
            mod.weight += delta.T if layer.is_conv1d else delta
    return ref


@pytest.mark.parametrize("arch,scaling,rank_scale", [("llama", "sqrt", "rank"), ("llama", "none", "trained"),
                                                     ("gpt2", "rank", "rank")])
def test_mixed_per_layer_ranks_equal_the_dense_float64_reference_forward_and_merge(arch, scaling, rank_scale):
    build = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    base = build(dtype=torch.float64)
    model = trained(build(dtype=torch.float64), r_max=R, scaling=scaling, rank_scale=rank_scale, mode="matryoshka")
    ranks = _mixed(adapted_layers(model))
    assert len(set(ranks.values())) > 3
    ref = _dense_reference(base, model, ranks, scaling=scaling, rank_scale=rank_scale)
    with torch.no_grad():
        want = ref(X).logits
        uniform = [model(X).logits for _ in [set_rank(model, k) for k in (1, R)]]
        set_rank(model, None)
        assert min((want - u).abs().max() for u in uniform) > 1e-3  # mixed ranks differ from any uniform one
        set_rank(model, ranks)
        got = model(X).logits
        assert get_rank(model) == ranks
        set_rank(model, None)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        merge(model, ranks)
        assert {n: m.merged_rank for n, m in adapted_layers(model).items()} == ranks
        torch.testing.assert_close(model(X).logits, want, rtol=0, atol=1e-10)
        unmerge(model)
        set_rank(model, R)
        torch.testing.assert_close(model(X).logits, uniform[1], rtol=0, atol=1e-10)


def test_patterns_follow_peft_rank_pattern_and_at_rank_restores():
    model = trained(tiny_llama(), r_max=R)
    names = list(adapted_layers(model))
    mapping = {"q_proj": 2, r"layers\.1\.mlp\..*": 4, "*": 1}
    resolved = {n: 2 if n.endswith(".q_proj") else 4 if ".layers.1.mlp." in n else 1 for n in names}
    assert all(pattern_matches(k, n) == bool(__import__("re").match(rf"(.*\.)?({k})$", n))
               for k in ("q_proj", "proj", r"layers\.1\.mlp\..*") for n in names)
    set_rank(model, 3)
    with torch.no_grad(), at_rank(model, mapping):
        assert get_rank(model) == resolved
        got = model(X).logits
    assert get_rank(model) == 3
    with torch.no_grad(), at_rank(model, resolved):  # the same ranks named layer by layer
        torch.testing.assert_close(model(X).logits, got, rtol=0, atol=0)


@pytest.mark.parametrize("mapping,match", [
    ({"o_proj_typo": 2, "*": 1}, r"'o_proj_typo' matches no adapted layer.*Adapted layers: model\.layers\.0"),
    ({"q_proj": 9, "*": 1}, r"rank 9 for 'q_proj' is outside 0…r_max=8"),
    ({"q_proj": -1, "*": 1}, r"rank -1 for 'q_proj' is outside 0…r_max=8.*0: the layer without its adapter"),
    ({"*": 2.5}, r"rank for '\*' must be an integer"),
    ({"q_proj": 2, r"layers\.0\..*": 4, "*": 1}, r"'model\.layers\.0\.self_attn\.q_proj' is matched by two .*'q_proj'"
                                                  r" and 'layers\\\\.0\\\\..\*'.*disjoint"),
    ({"q_proj": 2}, r"No per-layer rank key matches 'model\.layers\.0\.self_attn\.k_proj'.*add '\*': k"),
    ({"q_proj(": 2, "*": 1}, r"'q_proj\(' is not a valid regular expression"),
    ({}, r"non-empty mapping"),
])
def test_bad_per_layer_ranks_name_the_fix_and_change_nothing(mapping, match):
    model = trained(tiny_llama(), r_max=R)
    set_rank(model, 3)
    with pytest.raises(ValueError, match=match):
        set_rank(model, mapping)
    with pytest.raises(ValueError, match=match):
        with at_rank(model, mapping):
            pass
    assert get_rank(model) == 3
    set_rank(model, None)
    with pytest.raises(ValueError, match=match):
        merge(model, mapping)
    assert all(m.merged_rank is None for m in adapted_layers(model).values())


def test_per_row_ranks_and_the_per_layer_setting_coexist():
    model = trained(tiny_llama(), r_max=R)
    with torch.no_grad():
        rows = torch.tensor([1, 8])
        with at_rank(model, rows):
            per_row = model(X).logits
        for i, k in enumerate(rows.tolist()):
            with at_rank(model, {"*": k}):
                torch.testing.assert_close(per_row[i], model(X).logits[i], rtol=1e-5, atol=1e-5)


def test_resolving_keeps_layer_order_and_uses_the_default():
    assert resolve_layer_ranks(["b.v", "a.q"], {"q": 3, "*": 5}, r_max=8) == {"b.v": 5, "a.q": 3}


# ------------------------------------------------------------------------------------------------- PEFT export
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("arch,rank_scale,scaling,fold", [
    ("llama", "rank", "sqrt", False),   # use_rslora: one lora_alpha for every rank
    ("llama", "rank", "none", False),   # lora_alpha = α·k: alpha_pattern
    ("llama", "trained", "sqrt", False),  # folded: lora_alpha = k, alpha_pattern
    ("gpt2", "rank", "rank", True),     # Conv1D
])
def test_peft_loads_a_rank_pattern_export_with_our_logits(tmp_path, arch, rank_scale, scaling, fold):
    build = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    model = trained(build(), r_max=R, rank_scale=rank_scale, scaling=scaling, alpha=0.7, mode="matryoshka")
    names = sorted(adapted_layers(model))
    ranks = _mixed(names)
    save_adapter(model, tmp_path / "ad")
    out = export_peft(tmp_path / "ad", tmp_path / "peft", rank=ranks, fold_scale=fold)
    cfg = json.loads((out / "adapter_config.json").read_text())
    counts = {k: list(ranks.values()).count(k) for k in set(ranks.values())}
    assert cfg["r"] == max(counts, key=lambda k: (counts[k], k))
    assert len(cfg["rank_pattern"]) == sum(1 for k in ranks.values() if k != cfg["r"])
    if scaling == "sqrt" and not fold and rank_scale == "rank":
        assert cfg["use_rslora"] is True and cfg["alpha_pattern"] == {}
    else:
        assert cfg["alpha_pattern"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build(), str(out)).eval()
    peft_ranks = {n[len("base_model.model."):]: m.r["default"] for n, m in loaded.named_modules()
                  if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})}
    assert peft_ranks == ranks
    with torch.no_grad():
        want = loaded(X).logits
        with at_rank(model, ranks):
            ours = model(X).logits
        base = build()(X).logits
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(want, ours, rtol=0, atol=1e-5)
    # the same export from the live model, with patterns instead of names
    suffix = "q_proj" if arch == "llama" else "c_attn"
    out2 = export_peft(model, tmp_path / "peft2", rank={suffix: 2, "*": 5})
    cfg2 = json.loads((out2 / "adapter_config.json").read_text())
    assert cfg2["r"] == 5 and set(cfg2["rank_pattern"].values()) == {2} and len(cfg2["rank_pattern"]) == 2
    assert all(k.startswith("^") and k.endswith(suffix) for k in cfg2["rank_pattern"])


def test_a_bad_rank_mapping_is_refused_before_anything_is_written(tmp_path):
    model = trained(tiny_llama(), r_max=R)
    with pytest.raises(ValueError, match="matches no adapted layer"):
        export_peft(model, tmp_path / "out", rank={"nope": 2, "*": 1})
    assert not (tmp_path / "out").exists()
