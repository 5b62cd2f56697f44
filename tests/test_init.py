"""``init``: how ``lora_A`` starts. ``"shared"`` draws every row from U(−1/√r_max, 1/√r_max) (the reference code's);
``"per_rank"`` draws the rows that train rank r_b adds to the train rank below it from U(−1/√r_b, 1/√r_b), so that each
train rank's newest components start at the scale of a LoRA of that rank alone."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_matlora import MatLoRAConfig, MatryoshkaLoRA, adapted_layers, load_adapter, read_adapter, save_adapter


def _bounds_reference(ranks: list[int], r_max: int) -> list[float]:
    """Row i's bound, written out: the rows of the block (previous train rank, r_b] take 1/√r_b."""
    out, prev = [], 0
    for r in sorted(ranks):
        out += [1.0 / math.sqrt(r)] * (r - prev)
        prev = r
    return out + [1.0 / math.sqrt(r_max)] * (r_max - prev)


@pytest.mark.parametrize("ranks, r_max", [([1, 2, 4, 8, 16], 16), ([2, 6], 8), ([3], 3), ([1, 5, 7], 7)])
def test_per_rank_bounds_follow_the_train_ranks(ranks, r_max):
    got = MatLoRAConfig(r_max=r_max, ranks=ranks, init="per_rank").init_bounds
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(_bounds_reference(ranks, r_max), dtype=torch.float64))
    shared = MatLoRAConfig(r_max=r_max, ranks=ranks, init="shared").init_bounds
    torch.testing.assert_close(shared, torch.full((r_max,), r_max ** -0.5, dtype=torch.float64))


def test_the_default_is_per_rank_for_rowwise_and_the_papers_elsewhere():
    assert MatLoRAConfig(r_max=8).init == "per_rank"
    for mode in ("matryoshka", "dylora", "lora"):
        assert MatLoRAConfig(r_max=8, mode=mode).init == "shared"
    assert MatLoRAConfig(r_max=8, mode="matryoshka", init="per_rank").init == "per_rank"
    cfg = MatLoRAConfig(r_max=8)
    assert MatLoRAConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["init"] == "per_rank"


@pytest.mark.parametrize("bad", ["rank", "kaiming", 1, ""])
def test_an_unknown_init_is_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match="use 'per_rank'.*'shared'"):
        MatLoRAConfig(r_max=8, init=bad)
    with pytest.raises(ValueError, match="use 'per_rank'.*'shared'"):
        MatryoshkaLoRA(r_max=8, init=bad, verbose=False)


def _adapted(init: str, seed: int = 3, r_max: int = 16, mode: str = "rowwise") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 20))
    MatryoshkaLoRA(r_max=r_max, mode=mode, init=init, seed=seed, verbose=False).apply(model)
    return model


def test_per_rank_rows_are_the_shared_draw_rescaled_row_by_row():
    shared, per_rank = adapted_layers(_adapted("shared")), adapted_layers(_adapted("per_rank"))
    factor = torch.tensor(_bounds_reference([1, 2, 4, 8, 16], 16), dtype=torch.float64) * 4.0  # b_i·√r_max
    for name, layer in per_rank.items():
        want = shared[name].lora_A.detach().double() * factor[:, None]
        torch.testing.assert_close(layer.lora_A.detach().double(), want, rtol=1e-6, atol=0)
        assert float(layer.lora_A[0].detach().abs().max()) > 0.5  # rank 1's row spans U(−1, 1), not U(−1/4, 1/4)
        assert float(layer.lora_A[8:].detach().abs().max()) <= 0.25
        assert torch.count_nonzero(layer.lora_B) == 0  # still starts equal to the base


def test_rank_one_starts_as_a_lora_of_rank_one_alone():
    """The first row of a per_rank A is the A of a plain LoRA of rank 1 from the same seed (its bound is 1/√1)."""
    nested, alone = adapted_layers(_adapted("per_rank")), adapted_layers(_adapted("shared", r_max=1, mode="lora"))
    for name, layer in nested.items():
        torch.testing.assert_close(layer.lora_A[:1].detach(), alone[name].lora_A.detach(), rtol=1e-6, atol=1e-7)


def test_init_is_saved_and_an_adapter_written_before_it_reads_as_shared(tmp_path):
    model = _adapted("per_rank")
    out = save_adapter(model, tmp_path / "a")
    assert read_adapter(out).config.init == "per_rank"
    fresh = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 20))
    load_adapter(fresh, out)
    for name, layer in adapted_layers(fresh).items():
        torch.testing.assert_close(layer.lora_A, adapted_layers(model)[name].lora_A)
    # an adapter file written before init existed reads as "shared": tests/test_adapter_format.py
