"""The adapted model's handles: its model state (layers, merged rank, owned tensors) holding its RankController
(the rank state); per-step draws in a hand-written loop; the seeded initialisation; the inference rule a training
mode trained."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import tiny_gpt2, tiny_llama
from lightning_matlora import (MatryoshkaLoRA, adapted_layers, at_rank, begin_step, get_rank, load_adapter, merge,
                               save_adapter, set_rank, set_rank_scale, unmerge)
from lightning_matlora.adapted_model import controller_of, model_state_of
from lightning_matlora.model_state import STATE_ATTR, ModelState
from lightning_matlora.rank import RankController


def _ids(seed=0, shape=(4, 7)):
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- the handle
def test_controller_is_attached_once_and_knows_layers_and_saved_modules():
    model = tiny_llama()
    cb = MatryoshkaLoRA(r_max=4, modules_to_save=["lm_head"], verbose=False)
    cb.apply(model)
    state = getattr(model, STATE_ATTR)
    assert state is model_state_of(model) and state.controller is cb.controller is controller_of(model)
    scanned = adapted_layers(model)
    assert list(state.layers) == list(scanned) and all(state.layers[n] is m for n, m in scanned.items())
    assert list(state.saved_modules) == ["lm_head"] and state.saved_modules["lm_head"] is model.lm_head
    # owned tensors: exactly the trainable parameters, under their state_dict keys
    owned = dict(state.owned_tensors(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(owned) == trainable and set(owned) <= set(model.state_dict())
    # the controller is not a submodule: the model's state and parameters are unchanged by attaching it
    assert not any(isinstance(m, (RankController, ModelState)) for m in model.modules())
    # the rank state knows no layer and no model: calls run model state → layers → controller
    assert not any(isinstance(v, (nn.Module, ModelState, dict)) and v for k, v in vars(cb.controller).items()
                   if k not in ("_cache",))


class _CountsScans(nn.Sequential):
    """A model that counts walks of its module tree (``modules()``, ``named_modules()``, ``state_dict``-free)."""

    scans = 0

    def named_modules(self, *args, **kwargs):
        type(self).scans += 1
        return super().named_modules(*args, **kwargs)


def test_rank_control_on_the_adapted_model_never_walks_its_module_tree():
    model = _CountsScans(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    MatryoshkaLoRA(r_max=4, mode="matryoshka", verbose=False).apply(model)
    _CountsScans.scans = 0
    x = torch.ones(2, 8)
    with at_rank(model, 2):
        model(x)
    set_rank(model, 3)
    assert get_rank(model) == 3
    set_rank(model, None)
    merge(model, 4)
    model(x)
    unmerge(model)
    begin_step(model, 1)
    assert _CountsScans.scans == 0


def test_an_enclosing_module_finds_the_same_controller_and_merges_every_layer():
    inner = tiny_llama()
    MatryoshkaLoRA(r_max=4, verbose=False).apply(inner)
    outer = nn.ModuleDict({"lm": inner})
    assert controller_of(outer) is controller_of(inner)
    merge(outer, 2)
    assert model_state_of(inner).merged_rank == 2 and model_state_of(outer) is model_state_of(inner)
    assert all(m.merged_rank == 2 for m in adapted_layers(inner).values())
    with pytest.raises(RuntimeError, match=r"merged at rank 2: call unmerge\(model\)"):
        set_rank(inner, 3)
    unmerge(inner)
    assert model_state_of(outer).merged_rank is None


def test_a_callback_applied_to_a_second_model_gives_it_its_own_controller():
    cb = MatryoshkaLoRA(r_max=4, verbose=False)
    a, b = tiny_llama(), tiny_llama()
    cb.apply(a)
    cb.apply(b)
    assert controller_of(a) is not controller_of(b) and controller_of(b) is cb.controller
    set_rank(a, 2)
    assert get_rank(b) is None
    merge(a, 3)
    assert model_state_of(b).merged_rank is None and all(m.merged_rank is None for m in adapted_layers(b).values())
    unmerge(a)


def test_models_adapted_by_hand_are_found_by_a_scan_and_attached():
    from lightning_matlora import MatLoRAConfig, MatryoshkaLinear

    ctrl = RankController(MatLoRAConfig(r_max=3, mode="matryoshka"))
    model = nn.Sequential(MatryoshkaLinear(nn.Linear(5, 5), ctrl), nn.Tanh(), MatryoshkaLinear(nn.Linear(5, 2), ctrl))
    assert controller_of(model) is ctrl and list(model_state_of(model).layers) == ["0", "2"]
    assert getattr(model, STATE_ATTR) is model_state_of(model) and model_state_of(model).controller is ctrl
    with at_rank(model, 1):
        assert model(torch.ones(2, 5)).shape == (2, 2)


# ------------------------------------------------------------------------------------ draws in a hand-written loop
def _loop(mode: str, steps: int, explicit: bool):
    """A hand-written training loop (no Trainer); returns the rank state of every step."""
    model = tiny_llama().train()
    cb = MatryoshkaLoRA(r_max=8, mode=mode, target_modules=["q_proj"], seed=3, verbose=False, max_pass=False)
    cb.apply(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    seen = []
    for step in range(steps):
        if explicit:
            begin_step(model, step)
        ids = _ids(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        ctrl = cb.controller
        seen.append(ctrl.step_rank if mode == "dylora" else tuple(ctrl.rowwise_ranks(4).tolist()))
    return seen


@pytest.mark.parametrize("mode", ["dylora", "rowwise"])
def test_draws_advance_by_themselves_without_begin_step(mode):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no step has been drawn" warning: the forward drew the step
        auto = _loop(mode, 8, explicit=False)
    assert auto == _loop(mode, 8, explicit=True)  # the draws of begin_step(model, 0), (model, 1), ...
    assert len(set(auto)) > 1  # not one fixed rank / assignment for the whole run
    if mode == "dylora":
        assert set(auto) != {8}  # not plain LoRA at r_max


def test_no_automatic_draw_once_begin_step_was_called_or_outside_training():
    model = tiny_llama().train()
    cb = MatryoshkaLoRA(r_max=8, mode="dylora", target_modules=["q_proj"], seed=1, verbose=False)
    cb.apply(model)
    begin_step(model, 5)
    b = cb.controller.step_rank
    for i in range(4):
        model(input_ids=_ids(i))
    assert cb.controller.step_rank == b  # explicit draws are never overridden by the forward
    fresh = tiny_llama().eval()
    cb2 = MatryoshkaLoRA(r_max=8, mode="dylora", target_modules=["q_proj"], seed=1, verbose=False)
    cb2.apply(fresh)
    with torch.no_grad():
        fresh(input_ids=_ids())
        with at_rank(fresh, 2):
            fresh.train()(input_ids=_ids())
    assert cb2.controller.step_rank is None  # eval mode and explicit ranks draw nothing


def test_training_forward_without_any_draw_warns_once():
    model = tiny_llama().train()
    cb = MatryoshkaLoRA(r_max=4, mode="dylora", target_modules=["q_proj"], verbose=False)
    cb.apply(model)
    with pytest.warns(UserWarning, match=r"mode='dylora'.*no step has been drawn.*begin_step\(model, step\)"):
        model.model(input_ids=_ids())  # an inner module: the adapted model's own forward never runs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.model(input_ids=_ids(1))  # once


# ------------------------------------------------------------------------------------------ seeded initialisation
def _factors(model):
    return {n: m.lora_A.detach().clone() for n, m in adapted_layers(model).items()}


def test_seed_makes_the_initial_factors_reproducible_and_independent_of_the_global_rng():
    from lightning_matlora import MatLoRAConfig

    torch.manual_seed(0)
    a = tiny_llama()
    MatryoshkaLoRA(r_max=4, seed=7, verbose=False).apply(a)
    torch.manual_seed(123)  # another global RNG state
    b = tiny_llama()
    torch.rand(1000)
    MatryoshkaLoRA(r_max=4, seed=7, verbose=False).apply(b)
    c = tiny_llama()
    MatryoshkaLoRA(r_max=4, seed=8, verbose=False).apply(c)
    fa, fb, fc = _factors(a), _factors(b), _factors(c)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[n], fb[n]) for n in fa)
    assert all(not torch.equal(fa[n], fc[n]) for n in fa)
    assert len({tuple(t.flatten()[:4].tolist()) for t in fa.values()}) == len(fa)  # every layer its own draw
    bound = 1 / 4 ** 0.5
    rows = MatLoRAConfig(r_max=4).init_bounds.float()[:, None]  # the default init (per_rank): row i in ±b_i
    assert all((t.abs() <= rows).all() and t.std() > 0.2 * bound for t in fa.values())
    assert all(torch.count_nonzero(m.lora_B) == 0 for m in adapted_layers(a).values())


def test_initial_factors_do_not_depend_on_which_other_layers_are_adapted():
    every = tiny_llama()
    MatryoshkaLoRA(r_max=4, seed=2, verbose=False).apply(every)
    some = tiny_llama()
    MatryoshkaLoRA(r_max=4, seed=2, target_modules=["v_proj"], verbose=False).apply(some)
    fe, fs = _factors(every), _factors(some)
    assert fs and all(torch.equal(fs[n], fe[n]) for n in fs)


def test_seeded_init_leaves_the_global_rng_alone():
    model = tiny_gpt2()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------- the rule a training mode trained
@pytest.mark.parametrize("mode", ["rowwise", "dylora"])
def test_serving_a_rank_trained_mode_with_the_trained_rule_warns(mode, tmp_path):
    with pytest.warns(UserWarning, match=rf"mode='{mode}' trains every rank k under rank_scale='rank'"):
        MatryoshkaLoRA(r_max=4, mode=mode, rank_scale="trained")
    model = tiny_llama()
    MatryoshkaLoRA(r_max=4, mode=mode, verbose=False).apply(model)
    with pytest.warns(UserWarning, match=r"use rank_scale='rank', or mode='matryoshka'"):
        set_rank_scale(model, "trained")
    save_adapter(model, tmp_path / "ad")
    with pytest.warns(UserWarning, match=rf"mode='{mode}' trains every rank k under rank_scale='rank'"):
        load_adapter(tiny_llama(), tmp_path / "ad")


@pytest.mark.parametrize("mode, rule", [("matryoshka", "trained"), ("matryoshka", "rank"), ("lora", "trained"),
                                        ("rowwise", "rank"), ("dylora", "rank")])
def test_rules_a_mode_trained_do_not_warn(mode, rule):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MatryoshkaLoRA(r_max=4, mode=mode, rank_scale=rule)
