"""s(r) and the training diagonal P (Algorithm 1) against the spec's worked example and a naive formula."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lightning_matlora import MatLoRAConfig, build_p, default_ranks, scale_of_rank


def naive_p(ranks, r_max, scaling, alpha=1.0) -> torch.Tensor:
    """p_i = Σ_{r∈S, r≥i} s(r), written directly from the spec in float64 (no shared code with build_p)."""
    def s(r):
        return alpha * {"none": 1.0, "rank": 1.0 / r, "sqrt": 1.0 / math.sqrt(r)}[scaling]

    return torch.tensor([sum(s(r) for r in ranks if r >= i) for i in range(1, r_max + 1)], dtype=torch.float64)


BLOCKS_32 = [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 32)]  # 1-based inclusive component ranges


@pytest.mark.parametrize("scaling, values", [
    ("sqrt", [2.9874, 1.9874, 1.2803, 0.7803, 0.4268, 0.1768]),
    ("none", [6, 5, 4, 3, 2, 1]),
])
def test_worked_example_r32(scaling, values):
    p = build_p([1, 2, 4, 8, 16, 32], 32, scaling)
    assert p.shape == (32,)
    for (lo, hi), v in zip(BLOCKS_32, values):
        block = p[lo - 1:hi].double()
        torch.testing.assert_close(block, torch.full_like(block, v), atol=5e-5, rtol=0)


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_algorithm1_matches_naive_formula_random_sets(scaling):
    rng = random.Random(1234 + len(scaling))
    for _ in range(25):
        r_max = rng.randint(1, 70)
        n = rng.randint(1, min(r_max, 9))
        ranks = rng.sample(range(1, r_max + 1), n)  # unsorted on purpose
        alpha = rng.choice([1.0, 0.5, 3.0, 16.0])
        got = build_p(ranks, r_max, scaling, alpha)
        assert got.dtype == torch.float64 and got.shape == (r_max,)  # float64: layers cast it once to their dtype
        torch.testing.assert_close(got, naive_p(ranks, r_max, scaling, alpha), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_single_rank_set_is_standard_lora(scaling):
    r_max = 12
    expected = {"none": 1.0, "rank": 1 / 12, "sqrt": 1 / math.sqrt(12)}[scaling] * 2.0
    p = build_p([r_max], r_max, scaling, alpha=2.0)
    torch.testing.assert_close(p, torch.full((r_max,), expected, dtype=torch.float64), rtol=1e-14, atol=0)


def test_default_ranks():
    assert default_ranks(64) == [1, 2, 4, 8, 16, 32, 64]
    assert default_ranks(1) == [1]
    assert default_ranks(48) == [1, 2, 4, 8, 16, 32, 48]
    assert default_ranks(3) == [1, 2, 3]
    cfg = MatLoRAConfig(r_max=48)
    assert cfg.ranks == [1, 2, 4, 8, 16, 32, 48] and cfg.eval_ranks == cfg.ranks
    assert MatLoRAConfig(r_max=8, mode="lora").ranks == [8]


def test_rank_scale_values_int_and_tensor():
    ks = torch.arange(1, 40)
    for scaling in ("none", "rank", "sqrt"):
        for alpha in (1.0, 2.5):
            t = scale_of_rank(ks, scaling, alpha)
            assert t.dtype == torch.float64
            ref = torch.tensor([alpha * {"none": 1.0, "rank": 1 / k, "sqrt": k ** -0.5}[scaling] for k in range(1, 40)],
                               dtype=torch.float64)
            torch.testing.assert_close(t, ref, rtol=1e-14, atol=0)
            assert [scale_of_rank(k, scaling, alpha) for k in range(1, 40)] == pytest.approx(ref.tolist(), rel=1e-12)


def test_config_train_diagonal_uses_explicit_p_or_algorithm1():
    cfg = MatLoRAConfig(r_max=8, ranks=[2, 8], scaling="rank", alpha=2.0)
    torch.testing.assert_close(cfg.train_diagonal.double(), naive_p([2, 8], 8, "rank", 2.0), rtol=1e-6, atol=0)
    explicit = [0.5] * 4 + [0.0] * 4
    cfg = MatLoRAConfig(r_max=8, p=explicit, mode="matryoshka")
    assert cfg.train_diagonal.tolist() == explicit
    assert MatLoRAConfig.from_dict(cfg.to_dict()) == cfg
