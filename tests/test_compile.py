"""torch.compile captures the adapter layer whole: no graph breaks in training mode or at a fixed rank.

Graph capture is checked with ``fullgraph=True`` on the ``"eager"`` backend (dynamo traces the Python, no C++
compiler is needed), and the compiled outputs and gradients are compared with the eager layer's.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

from lightning_matlora import MatLoRAConfig, MatryoshkaLinear, MatryoshkaLoRA, begin_step, set_rank
from lightning_matlora.rank import RankController


def _layer(mode: str, setting, seed: int = 0) -> MatryoshkaLinear:
    torch.manual_seed(seed)
    ctrl = RankController(MatLoRAConfig(r_max=8, mode=mode))
    ctrl.set(setting)
    ctrl.begin_step(3)
    layer = MatryoshkaLinear(nn.Linear(16, 12), ctrl)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide a wrong adapter path
    return layer.train()


@pytest.mark.parametrize("mode", ["matryoshka", "lora", "dylora", "rowwise"])
@pytest.mark.parametrize("setting", [None, 3], ids=["train-forward", "rank-3"])
def test_layer_compiles_fullgraph_and_matches_eager(mode, setting):
    dynamo.reset()
    layer = _layer(mode, setting)
    x = torch.randn(10, 5, 16, requires_grad=True)
    y_eager = layer(x)
    gA, gx = torch.autograd.grad(y_eager.square().sum(), (layer.lora_A, x))
    layer.controller._cache.clear()  # trace the plan's cold path too, not only the cached one
    compiled = torch.compile(layer, fullgraph=True, backend="eager")  # raises on any graph break
    y = compiled(x)
    cA, cx = torch.autograd.grad(y.square().sum(), (layer.lora_A, x))
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(cA, gA)
    torch.testing.assert_close(cx, gx)


def test_explain_reports_no_break_in_adapted_llama(llama):
    dynamo.reset()
    model = llama
    MatryoshkaLoRA(r_max=8, max_pass=False, verbose=False).apply(model)  # one pass: a max_pass step is paired_loss
    model.train()
    begin_step(model, 0)
    ids = torch.randint(97, (2, 9))
    for rank in (None, 4):
        set_rank(model, rank)
        explanation = dynamo.explain(model)(input_ids=ids)
        in_adapter = [str(r) for r in explanation.break_reasons if "lightning_matlora" in str(r)]
        assert in_adapter == [], in_adapter
        assert explanation.graph_break_count == 0, [str(r)[:300] for r in explanation.break_reasons]
