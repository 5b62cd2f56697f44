"""``layer_draws="type"``: in ``mode="rowwise"`` training each module type draws its own row→rank assignment, so
mixed per-type prefixes are trained; ``"none"`` (the default) keeps one assignment for every layer."""

from __future__ import annotations

import collections
import copy
import math

import pytest
import torch

from conftest import tiny_llama
from lightning_matlora import MatLoRAConfig, MatryoshkaLoRA, adapted_layers, begin_step, load_adapter, save_adapter
from lightning_matlora.adapted_model import controller_of
from lightning_matlora.rank import RankController

R = 8
TYPES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _adapted(seed: int = 0, layer_draws: str = "type", dtype=torch.float64, **kw):
    model = tiny_llama(dtype=dtype)
    MatryoshkaLoRA(r_max=R, mode="rowwise", layer_draws=layer_draws, seed=seed, verbose=False,
                   save_adapter=False, **kw).apply(model)
    return model


def _reference_offsets(seed: int, step: int, micro_step: int, cycle_len: int, groups: int) -> list[int]:
    """The documented draw: one offset per module type (sorted by name) from a generator seeded with
    (seed, step, micro-step)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + micro_step)
    return torch.randint(cycle_len, (groups,), generator=g).tolist()


def _type_ranks(ctrl: RankController, rows: int) -> dict[str, list[int]]:
    return {t: ctrl.rowwise_ranks(rows, i).tolist() for t, i in ctrl.draw_groups.items()}


# -------------------------------------------------------------------------------------------------- the option
def test_layer_draws_defaults_to_none_and_is_refused_outside_rowwise_naming_the_fix():
    assert MatLoRAConfig(r_max=8).layer_draws == "none"
    assert MatLoRAConfig(r_max=8, layer_draws="type").layer_draws == "type"
    for mode in ("matryoshka", "lora", "dylora"):
        with pytest.raises(ValueError, match=f"only mode='rowwise'.*mode={mode!r}.*drop layer_draws"):
            MatLoRAConfig(r_max=8, mode=mode, layer_draws="type")
        assert MatLoRAConfig(r_max=8, mode=mode).layer_draws == "none"
    with pytest.raises(ValueError, match="Unknown layer_draws 'layer'.*'none'.*'type'"):
        MatLoRAConfig(r_max=8, layer_draws="layer")


def test_without_layer_draws_every_layer_shares_the_single_draw_of_before():
    model = _adapted(layer_draws="none")
    ctrl = controller_of(model)
    assert ctrl.draw_groups == {}
    cycle = ctrl.config.row_cycle
    for step in range(5):
        begin_step(model, step, micro_step=1)
        g = torch.Generator().manual_seed((0 * 1_000_003 + step) * 1009 + 1)
        offset = int(torch.randint(len(cycle), (1,), generator=g))  # the draw of earlier versions
        assert ctrl._row_offset == offset
        for layer in adapted_layers(model).values():
            assert ctrl.draw_group(layer) == 0


def test_each_module_type_draws_its_own_cyclic_assignment_deterministically():
    model = _adapted(seed=3)
    ctrl = controller_of(model)
    assert list(ctrl.draw_groups) == TYPES
    layers = adapted_layers(model)
    for name, layer in layers.items():
        assert ctrl.draw_group(layer) == TYPES.index(name.rsplit(".", 1)[-1])
    cycle = ctrl.config.row_cycle  # [1, 2, 4, 8, 8, 8]
    rows = 2 * len(cycle)
    differing = 0
    seen_pairs = collections.Counter()
    for step in range(60):
        begin_step(model, step)
        offsets = _reference_offsets(3, step, 0, len(cycle), len(TYPES))
        by_type = _type_ranks(ctrl, rows)
        for t, ranks in by_type.items():
            assert ranks == [cycle[(offsets[TYPES.index(t)] + i) % len(cycle)] for i in range(rows)]
            assert collections.Counter(ranks) == collections.Counter(cycle * 2)  # each type's shares unchanged
        differing += len({tuple(r) for r in by_type.values()}) > 1
        seen_pairs.update(zip(by_type["q_proj"], by_type["down_proj"]))
    assert differing >= 55  # the types almost always take different ranks on a row
    assert set(seen_pairs) == {(a, b) for a in set(cycle) for b in set(cycle)}  # every mix of two types is trained
    # the same seed draws the same; another seed does not; the micro-step of gradient accumulation redraws
    twin, other = controller_of(_adapted(seed=3)), controller_of(_adapted(seed=4))
    for c in (ctrl, twin, other):
        c.begin_step(7, micro_step=2)
    assert _type_ranks(ctrl, rows) == _type_ranks(twin, rows) != _type_ranks(other, rows)
    before = _type_ranks(ctrl, rows)
    ctrl.begin_step(7, micro_step=3)
    assert _type_ranks(ctrl, rows) != before


def test_under_data_parallelism_each_type_deals_over_the_global_batch():
    """Row i of process g is global row i·world + g: per module type, the processes' rows interleaved equal the
    single-process assignment of the global batch."""
    world, rows = 2, 6
    single = controller_of(_adapted(seed=1))
    procs = []
    for g in range(world):
        ctrl = controller_of(_adapted(seed=1))
        ctrl.set_process(g, world)
        procs.append(ctrl)
    for step in range(5):
        for c in [single, *procs]:
            c.begin_step(step)
        for t, i in single.draw_groups.items():
            interleaved = torch.stack([c.rowwise_ranks(rows, i) for c in procs], dim=1).reshape(-1)
            assert torch.equal(interleaved, single.rowwise_ranks(world * rows, i)), t


def _dense_rowwise_reference(base, model, ranks_by_type, rows, scaling="sqrt"):
    """``base`` in float64 with each adapted linear replaced by x·W0ᵀ + b + s(k_i)·x·A[:k_i]ᵀ·B[:, :k_i]ᵀ, k_i the
    rank of row i for that layer's module type (computed here, sharing no code with the library)."""
    ref = copy.deepcopy(base).double()
    s = {"sqrt": lambda r: 1 / math.sqrt(r), "rank": lambda r: 1 / r, "none": lambda r: 1.0}[scaling]

    class RowRanked(torch.nn.Module):
        def __init__(self, lin, A, B, ks):
            super().__init__()
            self.lin, self.A, self.B, self.ks = lin, A, B, ks

        def forward(self, x):
            y = self.lin(x)
            out = []
            for i, k in enumerate(self.ks):
                out.append(y[i] + s(k) * (x[i] @ self.A[:k].T) @ self.B[:, :k].T)
            return torch.stack(out)

    for name, layer in adapted_layers(model).items():
        parent, child = name.rsplit(".", 1)
        A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        mod = ref.get_submodule(parent)
        setattr(mod, child, RowRanked(getattr(mod, child), A, B, ranks_by_type[child]))
    return ref


def test_the_training_forward_equals_a_dense_float64_reference_with_a_rank_per_row_and_type():
    base = tiny_llama(dtype=torch.float64)
    model = copy.deepcopy(base)
    MatryoshkaLoRA(r_max=R, mode="rowwise", layer_draws="type", seed=2, verbose=False,
                   save_adapter=False).apply(model)
    with torch.no_grad():  # a trained-looking adapter: B ≠ 0
        for layer in adapted_layers(model).values():
            layer.lora_B.normal_(0, 0.3, generator=torch.Generator().manual_seed(layer.in_features))
    ctrl = controller_of(model)
    cycle = ctrl.config.row_cycle
    rows = 5
    x = torch.randint(0, 97, (rows, 7), generator=torch.Generator().manual_seed(0))
    model.train()
    begin_step(model, 11)
    offsets = _reference_offsets(2, 11, 0, len(cycle), len(TYPES))
    ranks_by_type = {t: [cycle[(offsets[j] + i) % len(cycle)] for i in range(rows)] for j, t in enumerate(TYPES)}
    assert len({tuple(r) for r in ranks_by_type.values()}) > 2  # the types really differ on this step
    got = model(input_ids=x).logits
    ref = _dense_rowwise_reference(base, model, ranks_by_type, rows)
    with torch.no_grad():
        want = ref(input_ids=x).logits
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-10)
    # and it is not the shared assignment of layer_draws="none"
    same = {t: ranks_by_type["q_proj"] for t in TYPES}
    with torch.no_grad():
        shared = _dense_rowwise_reference(base, model, same, rows)(input_ids=x).logits
    assert (shared - want).abs().max() > 1e-3


def test_layer_draws_is_saved_with_the_adapter_and_restored(tmp_path):
    model = _adapted(seed=0, dtype=torch.float32)
    path = save_adapter(model, tmp_path / "ad")
    other = tiny_llama()
    load_adapter(other, path)
    ctrl = controller_of(other)
    assert ctrl.config.layer_draws == "type" and list(ctrl.draw_groups) == TYPES


def test_in_fit_with_gradient_accumulation_each_micro_batch_draws_per_type_from_seed_step_and_batch():
    import lightning as L

    from lit_helpers import CausalLM, token_loader, trainer

    class Recorder(L.Callback):
        def __init__(self, cb):
            self.cb, self.records = cb, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # after the MatryoshkaLoRA hook
            self.records.append((trainer.global_step, batch_idx, _type_ranks(self.cb.controller, batch.shape[0])))

    module = CausalLM(tiny_llama())
    cb = MatryoshkaLoRA(r_max=4, mode="rowwise", layer_draws="type", target_modules=["q_proj", "down_proj"], seed=5,
                        verbose=False, save_adapter=False, rank_eval=None)
    rec = Recorder(cb)
    trainer([cb, rec], max_steps=4, accumulate_grad_batches=2).fit(module, token_loader(n=32, batch_size=4))
    assert [r[0] for r in rec.records] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert list(cb.controller.draw_groups) == ["down_proj", "q_proj"]
    cycle = cb.config.row_cycle
    for step, batch_idx, by_type in rec.records:
        offsets = _reference_offsets(5, step, batch_idx, len(cycle), 2)
        assert by_type == {t: [cycle[(offsets[j] + i) % len(cycle)] for i in range(4)]
                           for j, t in enumerate(["down_proj", "q_proj"])}
    assert any(r[2]["q_proj"] != r[2]["down_proj"] for r in rec.records)
    assert all(torch.count_nonzero(m.lora_B) > 0 for m in adapted_layers(module).values())
