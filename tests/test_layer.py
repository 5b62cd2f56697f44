"""MatryoshkaLinear against dense float64 references: training forward and gradients, rank-k forward under both
rank_scale rules, and per-row ranks (Linear and Conv1D, 2-D and 3-D inputs)."""

from __future__ import annotations

import pytest
import torch

from dense_ref import (adapt_single, base_weights, make_base, p_vector, rank_forward_ref, spec_factors,
                       train_forward_ref)
from lightning_matlora import set_rank

# float32 layers compared with float64 math; float64 layers are float64 throughout (p and s(k) are built in float64)
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}

CASES = [  # (kind, d_in, d_out, r_max, ranks, scaling, alpha, dtype)
    ("linear", 12, 10, 8, None, "sqrt", 1.0, torch.float32),
    ("linear", 9, 7, 6, [1, 3, 6], "rank", 2.0, torch.float64),
    ("linear", 16, 5, 11, [2, 5, 7, 11], "none", 0.5, torch.float32),
    ("conv1d", 10, 12, 8, [1, 2, 4, 8], "sqrt", 1.0, torch.float32),
    ("conv1d", 6, 9, 5, [5, 1, 3], "none", 1.0, torch.float64),
]


def _input(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("kind, d_in, d_out, r_max, ranks, scaling, alpha, dtype", CASES)
@pytest.mark.parametrize("lead", [(5,), (3, 4)])
def test_training_forward_and_gradients(kind, d_in, d_out, r_max, ranks, scaling, alpha, dtype, lead):
    model, cb, layer = adapt_single(make_base(kind, d_in, d_out, dtype), r_max=r_max, ranks=ranks,
                                    scaling=scaling, alpha=alpha)
    S = cb.config.ranks
    x = _input((*lead, d_in), dtype, seed=11)
    W0, b = base_weights(layer.base_layer)
    A, B = spec_factors(layer)

    y = model(x)
    ref = train_forward_ref(x.double(), W0, b, A, B, S, scaling, alpha)
    torch.testing.assert_close(y.double(), ref.detach(), **TOL[dtype])

    g = _input(y.shape, dtype, seed=12)
    (y * g).sum().backward()
    (ref * g.double()).sum().backward()
    # lora_A is A.T and lora_B is B.T (PEFT orientation)
    torch.testing.assert_close(layer.lora_A.grad.double(), A.grad.T, **TOL[dtype])
    torch.testing.assert_close(layer.lora_B.grad.double(), B.grad.T, **TOL[dtype])
    assert layer.lora_B.grad.abs().sum() > 0 and layer.lora_A.grad.abs().sum() > 0
    for prm in layer.base_layer.parameters():
        assert not prm.requires_grad and prm.grad is None


@pytest.mark.parametrize("kind, d_in, d_out, r_max, ranks, scaling, alpha, dtype", CASES)
@pytest.mark.parametrize("rule", ["rank", "trained"])
def test_rank_k_forward_every_k(kind, d_in, d_out, r_max, ranks, scaling, alpha, dtype, rule):
    model, cb, layer = adapt_single(make_base(kind, d_in, d_out, dtype), r_max=r_max, ranks=ranks,
                                    scaling=scaling, alpha=alpha, rank_scale=rule)
    S = cb.config.ranks
    p = p_vector(S, r_max, scaling, alpha)
    x = _input((2, 3, d_in), dtype, seed=21)
    W0, b = base_weights(layer.base_layer)
    A, B = spec_factors(layer)
    with torch.no_grad():
        train = model(x)
        for k in range(1, r_max + 1):  # every k, train rank or not
            set_rank(model, k)
            y = model(x)
            ref = rank_forward_ref(x.double(), W0, b, A.detach(), B.detach(), k, scaling, alpha, rule=rule, p=p)
            torch.testing.assert_close(y.double(), ref, **TOL[dtype], msg=lambda m: f"k={k}: {m}")
        if rule == "trained":  # at k = R the trained rule is the training forward
            torch.testing.assert_close(y, train, **TOL[dtype])
        set_rank(model, None)
        torch.testing.assert_close(model(x), train, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rule", ["rank", "trained"])
@pytest.mark.parametrize("lead", [(), (4,)])  # 2-D input (rows, in) and 3-D (rows, seq, in)
def test_per_row_ranks_equal_single_rank_passes(kind, rule, lead):
    r_max, d_in, d_out, rows = 8, 10, 6, 7
    model, cb, layer = adapt_single(make_base(kind, d_in, d_out), r_max=r_max, ranks=[1, 2, 4, 8],
                                    scaling="sqrt", rank_scale=rule)
    p = p_vector(cb.config.ranks, r_max, "sqrt")
    x = _input((rows, *lead, d_in), torch.float32, seed=31)
    row_ranks = torch.tensor([3, 8, 1, 5, 8, 2, 7])
    W0, b = base_weights(layer.base_layer)
    A, B = spec_factors(layer)
    with torch.no_grad():
        set_rank(model, row_ranks)
        y = model(x)
        assert y.shape == (rows, *lead, d_out)
        for i, k in enumerate(row_ranks.tolist()):
            set_rank(model, k)
            single = model(x[i:i + 1])[0]
            torch.testing.assert_close(y[i], single, rtol=1e-5, atol=1e-5)
            ref = rank_forward_ref(x[i].double(), W0, b, A.detach(), B.detach(), k, "sqrt", rule=rule, p=p)
            torch.testing.assert_close(y[i].double(), ref, **TOL[torch.float32])


def test_per_row_rank_count_mismatch_is_a_clear_error():
    model, _, _ = adapt_single(make_base("linear", 4, 3), r_max=4)
    set_rank(model, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="one rank per row"):
        model(torch.randn(5, 4))


def test_adapter_dtype_float32_on_bfloat16_base():
    model, cb, layer = adapt_single(make_base("linear", 16, 8, torch.bfloat16), r_max=4, adapter_dtype="float32")
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16
    x = _input((3, 16), torch.bfloat16, seed=41)
    y = model(x)
    assert y.dtype == torch.bfloat16
    W0, b = base_weights(layer.base_layer)
    A, B = spec_factors(layer)
    ref = train_forward_ref(x.double(), W0, b, A, B, cb.config.ranks, "sqrt")
    torch.testing.assert_close(y.double(), ref.detach(), rtol=2e-2, atol=2e-2)
    (y.float() ** 2).sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_default_adapter_dtype_follows_base_and_init():
    model, cb, layer = adapt_single(make_base("linear", 20, 30, torch.bfloat16), nonzero_b=False, r_max=16)
    assert layer.lora_A.dtype == torch.bfloat16 and layer.lora_A.shape == (16, 20) and layer.lora_B.shape == (30, 16)
    assert torch.count_nonzero(layer.lora_B) == 0
    a = layer.lora_A.float()
    assert a.abs().max() <= 1 / 16 ** 0.5 + 1e-3 and a.std() > 0.1 / 4  # U(-1/sqrt(R), 1/sqrt(R)), not degenerate


def test_explicit_adapter_dtype_survives_module_conversion():
    model, cb, layer = adapt_single(make_base("linear", 6, 5), r_max=4, adapter_dtype="float32")
    x = _input((3, 6), torch.bfloat16, seed=51)
    (model(x.float()) ** 2).sum().backward()  # a stale float32 grad must follow its parameter
    model.to(torch.bfloat16)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert layer.lora_A.grad.dtype == torch.float32
    (model(x).float() ** 2).sum().backward()
    model.double()
    assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.float64
    # without an explicit adapter_dtype the adapter follows the module
    model2, _, layer2 = adapt_single(make_base("linear", 6, 5), r_max=4)
    model2.to(torch.bfloat16)
    assert layer2.lora_A.dtype == torch.bfloat16


def test_set_rank_scale_switches_the_rule_of_the_same_weights():
    """One trained matryoshka adapter served under both rules: each equals its dense float64 reference."""
    from lightning_matlora import at_rank, set_rank_scale

    model, cb, layer = adapt_single(make_base("linear", 12, 10, torch.float64), r_max=8, mode="matryoshka")
    x = _input((4, 12), torch.float64, seed=7)
    W0, b = base_weights(layer.base_layer)
    A, B = spec_factors(layer)
    p = p_vector(cb.config.ranks, 8, "sqrt")
    for rule in ("trained", "rank", "trained"):
        set_rank_scale(model, rule)
        assert cb.config.rank_scale == rule
        for k in (1, 3, 8):
            with at_rank(model, k):
                y = model(x)
            ref = rank_forward_ref(x, W0, b, A, B, k, "sqrt", rule=rule, p=p)
            torch.testing.assert_close(y, ref.detach())
    with pytest.raises(ValueError, match="rank_scale"):
        set_rank_scale(model, "paper")
