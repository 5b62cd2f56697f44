"""``rank_weights``: how ``mode="rowwise"`` shares a batch's rows among the train ranks."""

from __future__ import annotations

import collections

import pytest
import torch

from conftest import tiny_llama
from dense_ref import adapt_single, base_weights, make_base, rank_forward_ref, spec_factors
from lit_helpers import CausalLM, token_loader, trainer
from lightning_matlora import MatLoRAConfig, MatryoshkaLoRA, RankController, adapted_layers, begin_step


# ------------------------------------------------------------------------------------------------- the cycle
def test_row_cycle_of_each_rule():
    half = MatLoRAConfig(r_max=16, max_pass=False)  # the one-pass default: half of the rows at r_max
    assert half.rank_weights == "half_max"
    assert half.row_cycle == [1, 2, 4, 8, 16, 16, 16, 16]
    assert MatLoRAConfig(r_max=16, rank_weights="uniform").row_cycle == [1, 2, 4, 8, 16]
    assert MatLoRAConfig(r_max=8, rank_weights=[3, 1, 1, 2]).row_cycle == [1, 1, 1, 2, 4, 8, 8]
    assert MatLoRAConfig(r_max=1).row_cycle == [1]  # one train rank: nothing to share
    # the other modes keep the default rule and never use it
    assert MatLoRAConfig(r_max=8, mode="matryoshka").rank_weights == "half_max"


@pytest.mark.parametrize("bad, match", [
    ("heavy", "Unknown rank_weights"),
    ([1, 1, 1], "one positive integer per train rank"),
    ([1, 1, 0, 1, 1], "one positive integer per train rank"),
    ([1, 1, 1.5, 1, 1], "one positive integer per train rank"),
    ([1, True, 1, 1, 1], "one positive integer per train rank"),
])
def test_bad_rank_weights_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        MatLoRAConfig(r_max=16, rank_weights=bad)


def test_explicit_rank_weights_need_rowwise():
    with pytest.raises(ValueError, match="only applies to mode='rowwise'"):
        MatLoRAConfig(r_max=16, mode="dylora", rank_weights=[1, 1, 1, 1, 4])


def test_rank_weights_round_trip_through_the_config_dict():
    cfg = MatLoRAConfig(r_max=8, rank_weights=[1, 2, 2, 3])
    back = MatLoRAConfig.from_dict(cfg.to_dict())
    assert back.rank_weights == [1, 2, 2, 3] and back.row_cycle == cfg.row_cycle
    old = cfg.to_dict()
    del old["rank_weights"]  # a config written before the field existed reads with the default rule
    assert MatLoRAConfig.from_dict(old).rank_weights == "half_max"


@pytest.mark.parametrize("weights, rows", [("half_max", 8), ("half_max", 32), ([1, 1, 1, 1, 4], 24),
                                           ([4, 3, 2, 1, 1], 11), ("uniform", 10)])
def test_each_rank_gets_its_share_of_every_batch(weights, rows):
    model, cb, _ = adapt_single(make_base("linear", 4, 4), r_max=16, mode="rowwise", rank_weights=weights)
    cycle = cb.config.row_cycle
    expected = collections.Counter(cycle)
    assert rows % len(cycle) == 0
    offsets = set()
    for step in range(12):
        begin_step(model, step)
        r = cb.controller.rowwise_ranks(rows)
        counts = collections.Counter(r.tolist())
        assert counts == {k: v * rows // len(cycle) for k, v in expected.items()}
        offsets.add(tuple(r.tolist()))
    assert len(offsets) > 1  # the offset is redrawn per step
    if weights == "half_max":
        assert collections.Counter(r.tolist())[16] == rows // 2


@pytest.mark.parametrize("weights, world, rows, counts", [
    ("uniform", 2, 2, {1: 1, 2: 1, 4: 1, 8: 1}),  # S = 1, 2, 4, 8, one share each
    ([1, 1, 1, 3], 3, 4, {1: 2, 2: 2, 4: 2, 8: 6}),  # cycle of 6: r_max on half of the rows
])
def test_train_ranks_are_spread_over_the_global_batch_of_all_processes(weights, world, rows, counts):
    """Under DDP each process sees a slice of the global batch (DistributedSampler interleaves: row i of process g
    is global row i·world + g). Every train rank must get its share of the global batch, and the assignment must
    equal the single-process one on the same global batch."""
    cfg = MatLoRAConfig(r_max=8, mode="rowwise", rank_weights=weights)
    for step in range(6):
        single = RankController(cfg)
        single.begin_step(step)
        global_ranks = single.rowwise_ranks(world * rows)
        per_process = []
        for g in range(world):
            ctrl = RankController(cfg)
            ctrl.set_process(g, world)
            ctrl.begin_step(step)
            per_process.append(ctrl.rowwise_ranks(rows))
        interleaved = torch.stack(per_process, dim=1).reshape(-1)  # global row i·world + g
        assert torch.equal(interleaved, global_ranks)
        assert collections.Counter(interleaved.tolist()) == counts


# ------------------------------------------------------------------------------- the forward, float64 reference
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_weighted_rowwise_rows_equal_their_rank_k_forward(kind):
    """Every row of a weighted rowwise training forward (and its gradient) is the dense float64 rank-k forward of
    the paper's rule at the rank the cycle dealt it."""
    R, d_in, d_out, rows = 8, 9, 6, 12
    model, cb, layer = adapt_single(make_base(kind, d_in, d_out), r_max=R, mode="rowwise", scaling="sqrt",
                                    rank_weights=[2, 1, 1, 2])
    W0, b = base_weights(layer.base_layer)
    x = torch.randn(rows, 3, d_in, generator=torch.Generator().manual_seed(8))
    g = torch.randn(rows, 3, d_out, generator=torch.Generator().manual_seed(9))
    begin_step(model, 3)
    row_ranks = cb.controller.rowwise_ranks(rows).tolist()
    assert collections.Counter(row_ranks) == {1: 4, 2: 2, 4: 2, 8: 4}
    for i, k in enumerate(row_ranks):
        layer.zero_grad(set_to_none=True)
        y = model(x)
        (y[i] * g[i]).sum().backward()
        A, B = spec_factors(layer)
        ref = rank_forward_ref(x[i].double(), W0, b, A, B, k, "sqrt")
        torch.testing.assert_close(y[i].double(), ref.detach(), rtol=2e-5, atol=2e-5)
        (ref * g[i].double()).sum().backward()
        torch.testing.assert_close(layer.lora_A.grad.double(), A.grad.T, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(layer.lora_B.grad.double(), B.grad.T, rtol=2e-5, atol=2e-5)


def test_weighted_batch_loss_equals_the_weighted_sum_of_per_rank_losses():
    """The mean loss of a weighted rowwise batch is Σ_r (share of r)·(mean loss of r's rows at rank r): the
    objective the weights set, against a float64 per-rank computation."""
    R, d_in, d_out, rows = 4, 5, 3, 16
    model, cb, layer = adapt_single(make_base("linear", d_in, d_out), r_max=R, mode="rowwise", scaling="sqrt",
                                    rank_weights="half_max")  # S = 1, 2, 4
    assert cb.config.row_cycle == [1, 2, 4, 4]
    x = torch.randn(rows, d_in, generator=torch.Generator().manual_seed(1))
    t = torch.randn(rows, d_out, generator=torch.Generator().manual_seed(2))
    begin_step(model, 0)
    ranks = cb.controller.rowwise_ranks(rows)
    loss = ((model(x) - t) ** 2).sum(-1).mean()
    W0, b = base_weights(layer.base_layer)
    A, B = spec_factors(layer)
    ref = 0.0
    for k, share in ((1, 0.25), (2, 0.25), (4, 0.5)):
        sel = ranks == k
        per_row = ((rank_forward_ref(x[sel].double(), W0, b, A, B, k, "sqrt") - t[sel].double()) ** 2).sum(-1)
        ref = ref + share * per_row.mean()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- Trainer
def test_weighted_rowwise_in_a_lightning_fit():
    import lightning as L

    module = CausalLM(tiny_llama())
    cb = MatryoshkaLoRA(r_max=4, target_modules=["q_proj", "down_proj"], seed=3, rank_weights=[1, 1, 2])

    class Recorder(L.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # after the MatryoshkaLoRA hook
            self.rows.append(cb.controller.rowwise_ranks(batch.shape[0]).tolist())

    rec = Recorder()
    t = trainer([cb, rec], max_steps=4)
    t.fit(module, token_loader(n=32, batch_size=4))
    assert cb.config.row_cycle == [1, 2, 4, 4]
    assert len(rec.rows) == 4
    assert all(collections.Counter(r) == {1: 1, 2: 1, 4: 2} for r in rec.rows)  # r_max on half of every batch
    assert len({tuple(r) for r in rec.rows}) > 1
    layers = adapted_layers(module)
    assert layers and all(torch.count_nonzero(m.lora_B) > 0 for m in layers.values())
