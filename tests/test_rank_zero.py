"""Rank 0 for a layer: served without its adapter (set_rank/at_rank/merge), exported by leaving the layer out of
PEFT's target_modules (PEFT's r must be positive), and a candidate of allocate_ranks that can drop a group."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from lightning_matlora import (adapted_layers, allocate_ranks, at_rank, export_peft, get_rank, merge, save_adapter,
                               set_rank, unmerge)
from lightning_matlora.rank_allocation import budget_parameters, plan_allocation
from test_adapter_io import X, trained
from test_layer_ranks import _dense_reference
from test_rank_allocation import _distance_to_full, _params

R = 8


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rank_zero_serves_the_base_layer_forward_and_merge_against_a_dense_float64_reference(arch):
    build = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    base = build(dtype=torch.float64)
    model = trained(build(dtype=torch.float64), r_max=R, mode="matryoshka")
    names = sorted(adapted_layers(model))
    ranks = {n: (0 if i % 3 == 0 else 1 + i % R) for i, n in enumerate(names)}
    assert 0 < sum(k == 0 for k in ranks.values()) < len(ranks)
    # the reference: the base with W0 + ΔW on the layers at a rank ≥ 1, the base weight untouched elsewhere
    ref = _dense_reference(base, model, {n: k for n, k in ranks.items() if k > 0})
    with torch.no_grad():
        want = ref(X).logits
        set_rank(model, ranks)
        got = model(X).logits
        assert get_rank(model) == ranks
        set_rank(model, None)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        with at_rank(model, {**{n: 1 for n in names}, **{n: 0 for n in names}}):  # every layer at 0: the base
            torch.testing.assert_close(model(X).logits, base(X).logits, rtol=0, atol=1e-12)
        weights = {n: m.base_layer.weight.clone() for n, m in adapted_layers(model).items()}
        merge(model, ranks)
        assert {n: m.merged_rank for n, m in adapted_layers(model).items()} == ranks
        for n, m in adapted_layers(model).items():
            if ranks[n] == 0:
                assert torch.equal(m.base_layer.weight, weights[n])
        torch.testing.assert_close(model(X).logits, want, rtol=0, atol=1e-10)
        unmerge(model)
        assert all(m.merged_rank is None for m in adapted_layers(model).values())
        for n, m in adapted_layers(model).items():
            torch.testing.assert_close(m.base_layer.weight, weights[n], rtol=0, atol=1e-12)


def test_an_int_rank_zero_is_still_refused():
    model = trained(tiny_llama(), r_max=R)
    with pytest.raises(ValueError, match="outside 1…r_max=8"):
        set_rank(model, 0)
    with pytest.raises(ValueError, match=r"merge needs an int rank in 1…r_max=8"):
        merge(model, 0)


def _peft_logits(build, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build(), str(out)).eval()
    with torch.no_grad():
        logits = loaded(X).logits
    lora = {n[len("base_model.model."):]: m.r["default"] for n, m in loaded.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})}
    return logits, lora


@pytest.mark.parametrize("arch,drop,targets", [
    ("llama", lambda n: n.endswith(("gate_proj", "k_proj")), "suffixes"),  # whole module types dropped
    ("llama", lambda n: n == "model.layers.1.self_attn.q_proj", "names"),  # one layer of a type dropped
    ("gpt2", lambda n: n.endswith("c_fc"), "suffixes"),
])
def test_peft_loads_an_export_with_layers_at_rank_zero_left_out_with_our_logits(tmp_path, arch, drop, targets):
    build = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    model = trained(build(), r_max=R, mode="matryoshka", scaling="none", alpha=0.7)
    names = sorted(adapted_layers(model))
    ranks = {n: 0 if drop(n) else 1 + (i * 3) % R for i, n in enumerate(names)}
    kept = {n: k for n, k in ranks.items() if k > 0}
    assert 0 < len(kept) < len(ranks)
    save_adapter(model, tmp_path / "ad")
    out = export_peft(tmp_path / "ad", tmp_path / "peft", rank=ranks)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert all(v > 0 for v in cfg["rank_pattern"].values()) and cfg["r"] > 0
    if targets == "suffixes":
        assert cfg["target_modules"] == sorted({n.rsplit(".", 1)[-1] for n in kept})
    else:
        assert cfg["target_modules"] == sorted(kept)
    assert "rank 0" in (out / "README.md").read_text()
    want, peft_ranks = _peft_logits(build, out)
    assert peft_ranks == kept  # the layers at rank 0 carry no LoRA in PEFT
    with torch.no_grad(), at_rank(model, ranks):
        ours = model(X).logits
    torch.testing.assert_close(want, ours, rtol=0, atol=1e-5)


def test_an_export_with_every_layer_at_rank_zero_is_refused_before_anything_is_written(tmp_path):
    model = trained(tiny_llama(), r_max=R)
    with pytest.raises(ValueError, match="Every layer is at rank 0.*give at least one layer a rank ≥ 1"):
        export_peft(model, tmp_path / "out", rank={"*": 0})
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- allocation
def test_rank_zero_lets_the_budget_of_rank_one_everywhere_be_reallocated():
    model = trained(tiny_llama(), r_max=R)
    with torch.no_grad():  # only q_proj carries an update: every other type can be dropped for free
        for name, m in adapted_layers(model).items():
            if not name.endswith("q_proj"):
                m.lora_B.zero_()
    metric = _distance_to_full(model)
    without = plan_allocation(model, "rank:1", [None], metric=metric)
    assert set(without.ranks.values()) == {1}  # without rank 0 there is nothing to reallocate at rank 1
    found = plan_allocation(model, "rank:1", [None], metric=metric, candidates=[0, 1, 2, 4, 8])
    assert found.evaluations == 1 + 7 * 4 + 2  # candidates 0, 1, 2, 4 measured for each of 7 types
    assert found.ranks == found.greedy and found.metric_greedy < found.metric_uniform
    assert all(k == 0 for n, k in found.ranks.items() if not n.endswith("q_proj"))
    assert all(k == R for n, k in found.ranks.items() if n.endswith("q_proj"))  # q_proj's 2·32 of 6·32+... fit
    assert found.parameters <= found.budget
    assert found.metric_greedy < 1e-12


@pytest.mark.parametrize("budget", ["rank:1", "rank:2", 3000, "rank:4"])
@pytest.mark.parametrize("group", ["type", "layer"])
def test_with_rank_zero_the_allocation_never_exceeds_its_budget(budget, group):
    model = trained(tiny_llama(), r_max=R)
    dims = {n: (m.in_features, m.out_features) for n, m in adapted_layers(model).items()}
    limit = budget_parameters(budget, dims, R)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    ranks = allocate_ranks(model, budget, [{"input_ids": ids, "labels": ids}], candidates=[0, 1, 2, 4, 8],
                           group=group)
    assert sorted(ranks) == sorted(dims) and all(0 <= k <= R for k in ranks.values())
    assert _params(model, ranks) <= limit
    assert get_rank(model) is None


def test_a_negative_candidate_is_refused_naming_the_range():
    model = trained(tiny_llama(), r_max=R)
    with pytest.raises(ValueError, match=r"candidates must be ranks in 0…r_max=8 \(0: a group without its adapter\)"):
        allocate_ranks(model, "rank:2", [None], metric=lambda m, b: torch.tensor(0.0), candidates=[-1, 2])
