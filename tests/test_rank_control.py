"""Training modes (lora vs PEFT, dylora, rowwise), merge/unmerge, fresh adapters and at_rank."""

from __future__ import annotations

import collections
import copy

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from dense_ref import adapt_single, base_weights, make_base, p_vector, rank_forward_ref, s, spec_factors
from lightning_matlora import (MatryoshkaLoRA, adapted_layers, at_rank, begin_step, get_rank, merge,
                               set_rank, unmerge)
from lightning_matlora.adapted_model import controller_of


def _tokens(seed=0, shape=(3, 9)):
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


def _randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


# ------------------------------------------------------------------------------------------ mode="lora" vs PEFT
def _copy_factors_into_peft(ours_model, peft_model, names):
    """Give PEFT's LoRA layers our factors (same orientation: a copy, no transpose); returns PEFT's modules."""
    peft_layers = dict(peft_model.named_modules())
    for name in names:
        ours, theirs = ours_model.get_submodule(name), peft_layers["base_model.model." + name]
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(ours.lora_A)
            theirs.lora_B["default"].weight.copy_(ours.lora_B)
    return peft_layers


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("scaling, alpha, peft_kwargs", [
    ("none", 1.0, dict(lora_alpha=6)),  # s(R)=1 ⇔ PEFT lora_alpha/r = 1
    ("rank", 2.0, dict(lora_alpha=2)),  # s(R)=2/R ⇔ lora_alpha=2
    ("sqrt", 1.0, dict(lora_alpha=1, use_rslora=True)),  # s(R)=1/√R ⇔ rsLoRA lora_alpha/√r
])
def test_lora_mode_equals_peft_lora(family, scaling, alpha, peft_kwargs):
    from peft import LoraConfig, get_peft_model

    R = 6
    targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["c_attn", "c_fc", "c_proj"]
    base = tiny_llama() if family == "llama" else tiny_gpt2()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, target_modules=targets, lora_dropout=0.0,
                                                                 **peft_kwargs))
    cb = MatryoshkaLoRA(r_max=R, mode="lora", target_modules=targets, scaling=scaling, alpha=alpha, verbose=False)
    names = cb.apply(base)
    assert cb.config.ranks == [R]
    _randomise_adapters(base, seed=3)
    peft_layers = _copy_factors_into_peft(base, peft_model, names)
    peft_adapted = {n.removeprefix("base_model.model.") for n, m in peft_layers.items() if hasattr(m, "lora_A")
                    and hasattr(m, "base_layer")}
    assert set(names) == peft_adapted and len(names) >= 2 * len(targets)

    ids = _tokens(1)
    out = base(input_ids=ids, labels=ids)
    ref = peft_model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for name in names:
        ours, theirs = base.get_submodule(name), peft_layers["base_model.model." + name]
        torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ mode="dylora"
def test_dylora_trains_only_the_sampled_prefix():
    R, d_in, d_out = 8, 10, 7
    model, cb, layer = adapt_single(make_base("linear", d_in, d_out), r_max=R, mode="dylora", scaling="sqrt")
    W0, b = base_weights(layer.base_layer)
    x = torch.randn(4, 3, d_in, generator=torch.Generator().manual_seed(5))
    seen = set()
    for step in range(12):
        begin_step(model, step)
        bsz = cb.controller.step_rank
        assert bsz in cb.config.ranks
        seen.add(bsz)
        layer.zero_grad(set_to_none=True)
        y = model(x)
        A, B = spec_factors(layer)
        ref = rank_forward_ref(x.double(), W0, b, A.detach(), B.detach(), bsz, "sqrt")
        torch.testing.assert_close(y.double(), ref, rtol=2e-5, atol=2e-5)
        (y ** 2).sum().backward()
        gA, gB = layer.lora_A.grad, layer.lora_B.grad
        assert torch.count_nonzero(gA[bsz:]) == 0 and torch.count_nonzero(gB[:, bsz:]) == 0
        assert torch.count_nonzero(gA[:bsz]) == gA[:bsz].numel()
        assert torch.count_nonzero(gB[:, :bsz]) == gB[:, :bsz].numel()
    assert len(seen) >= 3


def test_dylora_draws_are_uniform_and_reproducible():
    ranks = [1, 2, 4, 8, 16, 32, 64]
    model, cb, _ = adapt_single(make_base("linear", 4, 4), r_max=64, mode="dylora", seed=7)
    draws = []
    for step in range(1400):
        begin_step(model, step)
        draws.append(cb.controller.step_rank)
    counts = collections.Counter(draws)
    assert set(counts) == set(ranks)
    assert all(140 <= c <= 260 for c in counts.values()), counts  # expected 200 each
    # same step → same rank, whatever the micro-batch; a second callback with the same seed agrees
    model2, cb2, _ = adapt_single(make_base("linear", 4, 4), r_max=64, mode="dylora", seed=7)
    for step in (0, 5, 999):
        begin_step(model, step, micro_step=3)
        begin_step(model2, step)
        assert cb.controller.step_rank == cb2.controller.step_rank == draws[step]


# ----------------------------------------------------------------------------------------------- mode="rowwise"
@pytest.mark.parametrize("rows", [5, 7, 12])
def test_rowwise_assigns_every_train_rank(rows):
    model, cb, _ = adapt_single(make_base("linear", 4, 4), r_max=16, mode="rowwise", rank_weights="uniform")
    ranks = cb.config.ranks  # 5 ranks, one share each (other shares: tests/test_rank_weights.py)
    assignments = set()
    for step in range(10):
        begin_step(model, step)
        r = cb.controller.rowwise_ranks(rows)
        assert r.shape == (rows,)
        counts = collections.Counter(r.tolist())
        assert set(counts) == set(ranks)
        assert max(counts.values()) - min(counts.values()) <= 1
        assignments.add(tuple(r.tolist()))
    assert len(assignments) > 1  # the offset is redrawn per step


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_rowwise_row_gradient_equals_its_rank_k_forward(kind):
    R, d_in, d_out, rows = 8, 9, 6, 6
    model, cb, layer = adapt_single(make_base(kind, d_in, d_out), r_max=R, mode="rowwise", scaling="sqrt",
                                    rank_scale="trained")  # rowwise trains the "rank" rule whatever rank_scale is
    W0, b = base_weights(layer.base_layer)
    x = torch.randn(rows, 3, d_in, generator=torch.Generator().manual_seed(8))
    g = torch.randn(rows, 3, d_out, generator=torch.Generator().manual_seed(9))
    begin_step(model, 4)
    row_ranks = cb.controller.rowwise_ranks(rows).tolist()
    assert set(row_ranks) == set(cb.config.ranks)
    for i, k in enumerate(row_ranks):
        layer.zero_grad(set_to_none=True)
        y = model(x)  # the whole batch, training forward
        (y[i] * g[i]).sum().backward()
        A, B = spec_factors(layer)
        ref = rank_forward_ref(x[i].double(), W0, b, A, B, k, "sqrt")
        torch.testing.assert_close(y[i].double(), ref.detach(), rtol=2e-5, atol=2e-5)
        (ref * g[i].double()).sum().backward()
        torch.testing.assert_close(layer.lora_A.grad.double(), A.grad.T, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(layer.lora_B.grad.double(), B.grad.T, rtol=2e-5, atol=2e-5)
        assert torch.count_nonzero(layer.lora_A.grad[k:]) == 0


# ------------------------------------------------------------------------------------------------ merge/unmerge
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("rule", ["rank", "trained"])
def test_merge_equals_rank_k_and_unmerge_restores(family, rule):
    model = tiny_llama() if family == "llama" else tiny_gpt2()
    cb = MatryoshkaLoRA(r_max=8, rank_scale=rule, verbose=False)
    cb.apply(model)
    _randomise_adapters(model, seed=2)
    layers = adapted_layers(model)
    assert any(m.is_conv1d for m in layers.values()) == (family == "gpt2")
    originals = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    ids = _tokens(4)
    with torch.no_grad():
        for k in (1, 3, 8):
            with at_rank(model, k):
                expected = model(input_ids=ids).logits
            merge(model, k)
            assert all(m.merged_rank == k for m in layers.values())
            with pytest.raises(RuntimeError, match="unmerge"):
                set_rank(model, 2)
            with pytest.raises(RuntimeError, match="unmerge"):
                merge(model, 2)
            merged = model(input_ids=ids).logits
            torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
            assert not torch.allclose(merged, model_base_logits(model, ids), atol=1e-3)
            unmerge(model)
            for n, m in layers.items():
                torch.testing.assert_close(m.base_layer.weight, originals[n], rtol=0, atol=1e-6)
                assert m.merged_rank is None


def model_base_logits(model, ids):
    """Logits of the base model alone (adapters zeroed temporarily) — for checking that merging changed something."""
    layers = adapted_layers(model).values()
    saved = [m.lora_B.detach().clone() for m in layers]
    merged = {m: m.merged_rank for m in layers}
    try:
        for m in layers:
            if m.merged_rank is not None:
                m.unmerge()
            m.lora_B.data.zero_()
        return model(input_ids=ids).logits
    finally:
        for m, b in zip(layers, saved):
            m.lora_B.data.copy_(b)
            if merged[m] is not None:
                m.merge(merged[m])


def test_merged_layer_delta_matches_dense_reference():
    for kind in ("linear", "conv1d"):
        model, cb, layer = adapt_single(make_base(kind, 7, 5), r_max=6, scaling="rank", alpha=3.0)
        A, B = spec_factors(layer)
        W0 = base_weights(layer.base_layer)[0]
        merge(model, 4)
        W = base_weights(layer.base_layer)[0]
        torch.testing.assert_close(W, W0 + s(4, "rank", 3.0) * A.detach()[:, :4] @ B.detach()[:4], rtol=1e-5,
                                   atol=1e-6)
        unmerge(model)


@pytest.mark.parametrize("rule", ["rank", "trained"])
def test_float64_merge_at_rank_8_equals_dense_float64_reference(rule):
    """P and s(k) are float64, so a float64 model merges exactly (to float64 rounding), not to float32's 1e-7."""
    for kind in ("linear", "conv1d"):
        model, cb, layer = adapt_single(make_base(kind, 12, 10, dtype=torch.float64), r_max=10, scaling="sqrt",
                                        alpha=0.7, rank_scale=rule)
        A, B = spec_factors(layer)
        W0 = base_weights(layer.base_layer)[0]
        coef = p_vector(cb.config.ranks, 10, "sqrt", 0.7)[:8] if rule == "trained" else s(8, "sqrt", 0.7)
        assert layer.delta_weight(8).dtype == torch.float64
        merge(model, 8)
        W = base_weights(layer.base_layer)[0]
        torch.testing.assert_close(W, W0 + (A.detach()[:, :8] * coef) @ B.detach()[:8], rtol=0, atol=1e-12)
        x = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            merged = model(x)
            unmerge(model)
            with at_rank(model, 8):
                torch.testing.assert_close(merged, model(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(base_weights(layer.base_layer)[0], W0, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------- fresh adapter, at_rank
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fresh_adapter_leaves_outputs_unchanged(family):
    model = tiny_llama(seed=3) if family == "llama" else tiny_gpt2(seed=3)
    ids = _tokens(6)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        MatryoshkaLoRA(r_max=8, verbose=False).apply(model)
        assert len(adapted_layers(model)) > 0
        assert torch.equal(model(input_ids=ids).logits, before)
        for k in (1, 5, 8):
            with at_rank(model, k):
                assert torch.equal(model(input_ids=ids).logits, before)


def test_at_rank_restores_previous_setting_even_after_exception():
    model, _, _ = adapt_single(make_base("linear", 4, 4), r_max=8)
    assert get_rank(model) is None
    with at_rank(model, 3):
        assert get_rank(model) == 3
        with at_rank(model, 8):
            assert controller_of(model).setting == 8
        assert get_rank(model) == 3
    assert get_rank(model) is None
    set_rank(model, 2)
    with pytest.raises(KeyError):
        with at_rank(model, 5):
            raise KeyError("boom")
    assert get_rank(model) == 2
    per_row = torch.tensor([1, 2])
    with at_rank(model, per_row):
        assert torch.equal(get_rank(model), per_row)
    assert get_rank(model) == 2
    with pytest.raises(ValueError):
        with at_rank(model, 9):  # invalid: raises on entry, leaves the setting alone
            pass
    assert get_rank(model) == 2


def test_lora_mode_with_dropout_equals_peft_in_train_mode():
    """Dropout acts on the adapter input only, as PEFT's lora_dropout (same RNG stream ⇒ same masks)."""
    from peft import LoraConfig, get_peft_model

    R, targets = 4, ["q_proj", "up_proj"]
    base = tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=R, target_modules=targets,
                                                                 lora_dropout=0.3))
    names = MatryoshkaLoRA(r_max=R, mode="lora", target_modules=targets, scaling="none", dropout=0.3,
                           verbose=False).apply(base)
    _randomise_adapters(base, seed=4)
    peft_layers = _copy_factors_into_peft(base, peft_model, names)
    base.train()
    peft_model.train()
    ids = _tokens(2)
    torch.manual_seed(11)
    ours = base(input_ids=ids).logits
    torch.manual_seed(11)
    theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.manual_seed(12)
    assert not torch.allclose(base(input_ids=ids).logits, ours, atol=1e-4)  # dropout is active
    base.eval()
    with torch.no_grad(), at_rank(base, R):
        eval_a, eval_b = base(input_ids=ids).logits, base(input_ids=ids).logits
    assert torch.equal(eval_a, eval_b)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("rule", ["rank", "trained"])
def test_per_row_ranks_on_whole_models(family, rule):
    model = tiny_llama() if family == "llama" else tiny_gpt2()
    MatryoshkaLoRA(r_max=8, rank_scale=rule, verbose=False).apply(model)
    _randomise_adapters(model, seed=6)
    ids = _tokens(7, shape=(4, 6))
    ranks = torch.tensor([8, 1, 3, 6])
    with torch.no_grad():
        with at_rank(model, ranks):
            batched = model(input_ids=ids).logits
        for i, k in enumerate(ranks.tolist()):
            with at_rank(model, k):
                torch.testing.assert_close(batched[i], model(input_ids=ids[i:i + 1]).logits[0], rtol=1e-4, atol=1e-5)
        with at_rank(model, 1):  # the ranks really differ
            assert not torch.allclose(model(input_ids=ids[:1]).logits[0], batched[0], atol=1e-3)
