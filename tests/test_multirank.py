"""One-pass multi-rank evaluation: rows of one batch at different ranks equal separate single-rank passes.

The core's own tests cover the per-row plan of one layer; these pin the evaluation path the rank curves use:
a batch replicated once per eval rank through whole Linear (Llama) and Conv1D (GPT-2) models, 2-D and 3-D
inputs, both ``rank_scale`` rules, against single-rank passes and a hand-written float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import tiny_gpt2, tiny_llama
from lightning_matlora import MatryoshkaLoRA, adapted_layers, set_rank
from lightning_matlora.rank_validation import replicate_batch

EVAL = [1, 3, 4, 8]


def randomise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype) * 0.3)


def hand_coefficients(k: int, rule: str, r_max: int = 8, ranks=(1, 2, 4, 8)) -> torch.Tensor:
    """float64 coefficients of rank k written from the spec: s(k)·1 ("rank") or p_1…p_k ("trained"), sqrt."""
    if rule == "rank":
        return torch.full((k,), 1 / math.sqrt(k), dtype=torch.float64)
    p = [sum(1 / math.sqrt(r) for r in ranks if r >= i) for i in range(1, r_max + 1)]
    return torch.tensor(p[:k], dtype=torch.float64)


@pytest.mark.parametrize("rule", ["rank", "trained"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama-linear", "gpt2-conv1d"])
def test_replicated_batch_equals_single_rank_passes(build, rule):
    model = build(dtype=torch.float64)
    MatryoshkaLoRA(r_max=8, rank_scale=rule, verbose=False).apply(model)
    randomise(model)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 97, (3, 7), generator=g)}
    with torch.no_grad():
        singles = []
        for k in EVAL:
            set_rank(model, k)
            singles.append(model(**batch).logits)
        big = replicate_batch(batch, len(EVAL))
        set_rank(model, torch.tensor(EVAL).repeat_interleave(3))
        mixed = model(**big).logits.view(len(EVAL), 3, 7, -1)
        set_rank(model, None)
    for i in range(len(EVAL)):
        torch.testing.assert_close(mixed[i], singles[i], rtol=1e-10, atol=1e-10)
    assert (singles[0] - singles[-1]).abs().max() > 1e-3  # the ranks really differ


@pytest.mark.parametrize("rule", ["rank", "trained"])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("shape", [(6,), (6, 5)], ids=["2d", "3d"])
def test_layer_rows_at_different_ranks_match_float64_formula(rule, conv1d, shape):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(12, 10) if conv1d else nn.Linear(10, 12)
    base = base.double()
    with torch.no_grad():
        base.bias.normal_()
    model = nn.Sequential(base)
    MatryoshkaLoRA(r_max=8, rank_scale=rule, target_modules="all-linear", exclude_modules=None,
                   verbose=False).apply(model)
    randomise(model)
    layer = model[0]
    x = torch.randn(*shape, 10, dtype=torch.float64)
    row_ranks = torch.tensor([1, 2, 3, 5, 8, 8])
    with torch.no_grad():
        set_rank(model, row_ranks)
        y = model(x)
        set_rank(model, None)
    W0 = base.weight.T if conv1d else base.weight  # out × in
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    for i, k in enumerate(row_ranks.tolist()):
        c = hand_coefficients(k, rule)
        ref = x[i] @ W0.T + base.bias + ((x[i] @ A[:k].T) * c) @ B[:, :k].T
        # the controller's coefficients are float64: a float64 model is exact to float64 rounding
        torch.testing.assert_close(y[i], ref, rtol=1e-12, atol=1e-12)


def test_wrong_number_of_row_ranks_is_a_clear_error():
    model = tiny_llama()
    MatryoshkaLoRA(r_max=8, verbose=False).apply(model)
    set_rank(model, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="given 2 per-row ranks but an adapted layer received an input with 3 rows"):
        model(input_ids=torch.zeros(3, 4, dtype=torch.long))
