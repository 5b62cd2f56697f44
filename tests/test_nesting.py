"""nest_by_svd against a float64 reference: every prefix k of every layer is the best rank-k approximation of the
layer's full update (Eckart–Young), and rank r_max serves what the adapter served before."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from dense_ref import p_vector, s
from lightning_matlora import adapted_layers, controller_of, merge, unmerge
from lightning_matlora.nesting import NestReport, nest_by_svd, svd_nest_factors
from test_adapter_io import X, logits, trained


def full_update(layer, cfg) -> torch.Tensor:
    """ΔW at r_max (out × in, float64) under the configuration's rule, from the spec's formulas."""
    R = cfg["r_max"]
    if cfg["rank_scale"] == "trained":
        c = p_vector(cfg["ranks"], R, cfg["scaling"], cfg["alpha"])
    else:
        c = torch.full((R,), s(R, cfg["scaling"], cfg["alpha"]), dtype=torch.float64)
    return (layer.lora_B.detach().double() * c) @ layer.lora_A.detach().double()


def served_update(layer, cfg, k: int) -> torch.Tensor:
    """ΔW served at rank k (out × in, float64) under the configuration's rule, from the spec's formulas."""
    if cfg["rank_scale"] == "trained":
        c = p_vector(cfg["ranks"], cfg["r_max"], cfg["scaling"], cfg["alpha"])[:k]
    else:
        c = torch.full((k,), s(k, cfg["scaling"], cfg["alpha"]), dtype=torch.float64)
    return (layer.lora_B[:, :k].detach().double() * c) @ layer.lora_A[:k].detach().double()


def best_rank_k(W: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


CASES = [  # (builder, settings, whether nesting must change the serving rule)
    (tiny_llama, dict(r_max=8), True),                                            # default: rowwise, rank, sqrt
    (tiny_llama, dict(r_max=8, mode="lora"), True),                               # plain LoRA at r_max, then nest
    (tiny_llama, dict(r_max=8, mode="matryoshka", rank_scale="trained"), False),  # p_1…p_k: kept
    (tiny_llama, dict(r_max=8, scaling="none", alpha=0.5), False),                # α at every rank: kept
    (tiny_llama, dict(r_max=6, scaling="rank", alpha=2.0), True),                 # r_max not a power of two
    (tiny_gpt2, dict(r_max=8, mode="lora", rank_scale="trained"), False),         # Conv1D layers
]


@pytest.mark.parametrize("build,settings,changes", CASES)
def test_every_prefix_is_the_best_rank_k_approximation(build, settings, changes):
    model = trained(build(), **settings)
    before_cfg = controller_of(model).config.to_dict()
    updates = {n: full_update(m, before_cfg) for n, m in adapted_layers(model).items()}
    R = before_cfg["r_max"]
    before = logits(model, R)
    report = nest_by_svd(model)
    after_cfg = controller_of(model).config.to_dict()
    assert bool(report.changes) is changes
    if changes:  # the paper's rule at sqrt/rank scaling is not prefix-consistent: one scale s(R) for every rank
        assert after_cfg["scaling"] == "none" and after_cfg["rank_scale"] == "rank"
        assert after_cfg["alpha"] == pytest.approx(s(R, before_cfg["scaling"], before_cfg["alpha"]))
        assert torch.equal(controller_of(model).p, p_vector(after_cfg["ranks"], R, "none", after_cfg["alpha"]).float())
    else:
        assert after_cfg == before_cfg
    assert {k: v for k, v in after_cfg.items() if k not in ("scaling", "alpha", "rank_scale")} == \
        {k: v for k, v in before_cfg.items() if k not in ("scaling", "alpha", "rank_scale")}
    assert report.max_relative_error < 1e-6
    for name, layer in adapted_layers(model).items():
        W = updates[name]
        sigma = torch.linalg.svdvals(W)[:R]  # ΔW has rank ≤ R
        # the library's coefficients are float32 (s(R) rounded): agreement to that precision
        torch.testing.assert_close(report.singular_values[name], sigma, rtol=1e-7, atol=1e-7 * float(sigma[0]))
        for k in range(1, R + 1):
            Wk = served_update(layer, after_cfg, k)
            err = float((Wk - best_rank_k(W, k)).norm() / W.norm())
            assert err < 1e-6, (name, k, err)  # float32 factors
            tail = float(sigma[k:].pow(2).sum().sqrt())  # Eckart–Young: the error of the best rank-k approximation
            assert float((W - Wk).norm()) == pytest.approx(tail, abs=1e-6 * float(W.norm()))
        energy = report.energy(3)[name]
        assert energy == pytest.approx(float(sigma[:3].pow(2).sum() / sigma.pow(2).sum()), rel=1e-7)
    torch.testing.assert_close(logits(model, R), before, rtol=1e-5, atol=1e-5)


def test_rank_k_logits_merge_and_lower_ranks_change():
    model = trained(tiny_llama(), r_max=8, mode="lora")
    before = {k: logits(model, k) for k in (2, 8)}
    nest_by_svd(model)
    torch.testing.assert_close(logits(model, 8), before[8], rtol=1e-5, atol=1e-5)
    assert (logits(model, 2) - before[2]).abs().max() > 1e-3  # truncation now keeps the top components
    for k in (1, 4):
        served = logits(model, k)
        merge(model, k)
        with torch.no_grad():
            merged = model(X).logits
        unmerge(model)
        torch.testing.assert_close(merged, served, rtol=1e-5, atol=1e-5)


def test_modules_to_save_and_other_parameters_are_untouched():
    model = trained(tiny_llama(), r_max=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    state = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    nest_by_svd(model)
    after = model.state_dict()
    for k, v in state.items():
        assert torch.equal(after[k], v), k


def test_zero_and_rank_deficient_updates_pad_with_trainable_zero_components():
    model = trained(tiny_llama(), r_max=8, scaling="none")
    layers = list(adapted_layers(model).values())
    with torch.no_grad():
        layers[0].lora_B.zero_()  # an untrained layer: ΔW = 0
        layers[1].lora_A[3:].zero_()  # true rank 3
    W1 = full_update(layers[1], controller_of(model).config.to_dict())
    report = nest_by_svd(model)
    names = list(adapted_layers(model))
    assert torch.equal(report.singular_values[names[0]], torch.zeros(8, dtype=torch.float64))
    assert report.energy(1)[names[0]] == 1.0
    assert torch.count_nonzero(layers[0].lora_B) == 0
    # the zero components keep A rows (orthonormal directions at a fresh init's scale), so training can grow them
    A0 = layers[0].lora_A.detach().double()
    gram = A0 @ A0.T
    scale = math.sqrt(layers[0].in_features / (3 * 8))
    torch.testing.assert_close(gram, torch.eye(8, dtype=torch.float64) * scale**2, rtol=0, atol=1e-5)
    assert torch.count_nonzero(layers[1].lora_B[:, 3:]) == 0 and torch.count_nonzero(layers[1].lora_A[3:]) > 0
    assert float(report.singular_values[names[1]][3:].abs().max()) < 1e-9
    cfg = controller_of(model).config.to_dict()
    for k in (3, 8):
        torch.testing.assert_close(served_update(layers[1], cfg, k), W1, rtol=0, atol=1e-6 * float(W1.norm()))


def test_factors_in_float64_reach_float64_precision():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 40, generator=g, dtype=torch.float64), torch.randn(30, 6, generator=g, dtype=torch.float64)
    coef = torch.full((6,), 0.25, dtype=torch.float64)
    p = torch.tensor([3.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5], dtype=torch.float64)  # 8 components for a rank-6 update
    A2, B2, sigma = svd_nest_factors(A, B, coef, p)
    W = (B * coef) @ A
    for k in range(1, 9):
        Wk = (B2[:, :k] * p[:k]) @ A2[:k]
        assert float((Wk - best_rank_k(W, min(k, 6))).norm() / W.norm()) < 1e-12
    assert torch.equal(sigma[6:], torch.zeros(2, dtype=torch.float64))
    # a layer narrower than r_max (out = 5 < 8): at most 5 singular values, the rest padded
    A, B = torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    coef, target = torch.ones(8, dtype=torch.float64), torch.full((8,), 0.5, dtype=torch.float64)
    A2, B2, sigma = svd_nest_factors(A, B, coef, target)
    W = B @ A
    for k in range(1, 9):
        Wk = (B2[:, :k] * target[:k]) @ A2[:k]
        assert float((Wk - best_rank_k(W, min(k, 5))).norm() / W.norm()) < 1e-12
    assert torch.count_nonzero(sigma[5:]) == 0 and torch.count_nonzero(B2[:, 5:]) == 0


def test_float64_model_nests_to_float64_precision():
    model = trained(tiny_llama(dtype=torch.float64), r_max=16)  # s(16) = 1/4 is exact in float32 too
    cfg = controller_of(model).config.to_dict()
    updates = {n: full_update(m, cfg) for n, m in adapted_layers(model).items()}
    report = nest_by_svd(model)
    assert report.max_relative_error < 1e-13
    after = controller_of(model).config.to_dict()
    for name, layer in adapted_layers(model).items():
        W = updates[name]
        for k in (1, 5, 16):
            assert float((served_update(layer, after, k) - best_rank_k(W, k)).norm() / W.norm()) < 1e-12


def test_refuses_a_merged_model_and_a_model_without_adapters():
    model = trained(tiny_llama(), r_max=4)
    merge(model, 2)
    with pytest.raises(RuntimeError, match="unmerge"):
        nest_by_svd(model)
    with pytest.raises(ValueError, match="no MatryoshkaLoRA layers"):
        nest_by_svd(tiny_llama())


def test_report_summary():
    model = trained(tiny_llama(), r_max=8)
    report = nest_by_svd(model)
    assert isinstance(report, NestReport) and report.r_max == 8
    energy = report.mean_energy()
    assert list(energy) == [1, 2, 4, 8] and energy[8] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(list(energy.values()), list(energy.values())[1:]))
    d = report.to_dict()
    assert d["layers"] == len(adapted_layers(model)) and d["changes"]["scaling"] == "none"
    assert "rank  mean energy kept" in str(report)


def test_lora_run_nested_then_trained_on_with_rowwise():
    """The study's two phases: plain LoRA at r_max, nest by SVD, then more steps of rowwise from the nested factors
    with the same callback (reconfigure changes the shared config)."""
    from lit_helpers import CausalLM, token_loader, trainer

    from lightning_matlora import MatryoshkaLoRA

    cb = MatryoshkaLoRA(r_max=8, mode="lora", verbose=False, save_adapter=False, rank_eval=None)
    module = CausalLM(tiny_llama())
    trainer([cb]).fit(module, token_loader())
    report = nest_by_svd(module)
    assert report.changes == {"scaling": "none", "alpha": pytest.approx(8 ** -0.5), "rank_scale": "rank"}
    assert cb.config.scaling == "none"  # the callback holds the same configuration
    ctrl = controller_of(module)
    ctrl.reconfigure(mode="rowwise", ranks=None)
    assert cb.config.mode == "rowwise" and cb.config.ranks == [1, 2, 4, 8]
    assert ctrl.plan(4, torch.device("cpu"), torch.float32).coef.shape == (4, 8)  # one rank per row
    before = {n: m.lora_B.detach().clone() for n, m in adapted_layers(module).items()}
    trainer([cb]).fit(module, token_loader())
    assert any(not torch.equal(before[n], m.lora_B) for n, m in adapted_layers(module).items())
    with pytest.raises(ValueError, match="reconfigure changes only"):
        ctrl.reconfigure(r_max=4)
    with pytest.raises(ValueError, match="mode='lora'"):
        ctrl.reconfigure(mode="lora")  # keeps ranks [1, 2, 4, 8]: plain LoRA needs ranks=None
