"""allocate_ranks: never above its budget, spends it where truncation hurts, errors that name the fix; and the
command line (allocate → info --plan → export --rank-pattern → real peft)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from lightning_matlora import adapted_layers, allocate_ranks, at_rank, get_rank, save_adapter
from lightning_matlora.cli import main
from lightning_matlora.rank_allocation import budget_parameters, measure_sensitivities, plan_allocation
from test_adapter_io import X, trained

R = 8
BUNDLED = Path(__file__).resolve().parents[1] / "recipes" / "assets" / "base"


def _params(model, ranks):
    return sum(ranks[n] * (m.in_features + m.out_features) for n, m in adapted_layers(model).items())


def _batches():
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, 97, (2, 9), generator=g) for _ in range(2)]
    return [{"input_ids": x, "labels": x} for x in ids]


def _distance_to_full(model):
    """A metric: mean squared distance of the logits to the full adapter's (0 at r_max everywhere)."""
    with torch.no_grad(), at_rank(model, R):
        full = model(X).logits

    def metric(m, _batch):
        return (m(X).logits - full).pow(2).mean()
    return metric


@pytest.mark.parametrize("budget", ["rank:1", "rank:2", "rank:4", 3000, 5123, "rank:8"])
def test_the_allocation_never_exceeds_its_budget_and_restores_the_setting(budget):
    model = trained(tiny_llama(), r_max=R)
    names = adapted_layers(model)
    dims = {n: (m.in_features, m.out_features) for n, m in names.items()}
    limit = budget_parameters(budget, dims, R)
    ranks = allocate_ranks(model, budget, _batches())
    assert sorted(ranks) == sorted(names) and all(1 <= k <= R for k in ranks.values())
    assert _params(model, ranks) <= limit
    assert get_rank(model) is None


def test_the_budget_goes_to_the_only_layers_that_matter_and_beats_uniform():
    model = trained(tiny_llama(), r_max=R)
    with torch.no_grad():  # only q_proj carries an update: truncating any other layer changes nothing
        for name, m in adapted_layers(model).items():
            if not name.endswith("q_proj"):
                m.lora_B.zero_()
    metric = _distance_to_full(model)
    found = plan_allocation(model, "rank:2", [None], metric=metric)
    ranks = found.ranks
    assert ranks == allocate_ranks(model, "rank:2", [None], metric=metric) == found.greedy
    assert found.evaluations == 1 + 7 * 3 + 2 and found.metric_full == 0.0  # 7 module types, candidates 1, 2, 4
    assert all(v == 0.0 for g, d in found.sensitivity.items() if g != "q_proj" for v in d.values())
    assert all(v > 0 for v in found.sensitivity["q_proj"].values() if v != found.sensitivity["q_proj"][R])
    assert found.metric_greedy < found.metric_uniform and found.uniform_rank == 2
    assert all(k == R for n, k in ranks.items() if n.endswith("q_proj"))
    assert all(k == 1 for n, k in ranks.items() if not n.endswith("q_proj"))
    with torch.no_grad(), at_rank(model, ranks):
        allocated = float(metric(model, None))
    with torch.no_grad(), at_rank(model, 2):
        uniform = float(metric(model, None))
    assert allocated < 1e-12 < uniform


def test_per_layer_groups_and_a_custom_candidate_set():
    model = trained(tiny_llama(), r_max=R)
    ranks = allocate_ranks(model, "rank:2", _batches(), group="layer", candidates=[2, 4, 8])
    assert set(ranks.values()) <= {1, 2, 4, 8} and _params(model, ranks) <= _params(model, {n: 2 for n in ranks})


def test_sensitivities_measured_once_serve_every_budget():
    model = trained(tiny_llama(), r_max=R)
    calls = []
    loss = _distance_to_full(model)

    def metric(m, batch):
        calls.append(1)
        return loss(m, batch)
    budgets = ["rank:1", "rank:2", 3000, "rank:4"]
    alone = [plan_allocation(model, b, [None], metric) for b in budgets]
    assert len(calls) == sum(a.evaluations for a in alone) and all(a.evaluations >= 1 + 7 * 3 + 1 for a in alone)
    calls.clear()
    sens = measure_sensitivities(model, [None], metric)
    assert len(calls) == sens.evaluations == 1 + 7 * 3  # r_max everywhere, then 7 module types at ranks 1, 2, 4
    reused = [plan_allocation(model, b, [None], metric, sensitivities=sens) for b in budgets]
    # each budget costs only the final check: the uniform rank, and the greedy plan where it differs
    assert len(calls) == sens.evaluations + sum(r.evaluations for r in reused)
    assert [r.evaluations for r in reused] == [1 if r.greedy == {n: r.uniform_rank for n in r.greedy} else 2
                                              for r in reused]
    for a, r in zip(alone, reused):
        assert (r.ranks, r.greedy, r.metric_uniform, r.sensitivity) == (a.ranks, a.greedy, a.metric_uniform,
                                                                      a.sensitivity)
    assert allocate_ranks(model, "rank:2", [None], metric, sensitivities=sens) == alone[1].ranks
    four = reused[-1]  # the additive prediction of its greedy plan, from the sensitivities by hand
    by_type = {n.rsplit(".", 1)[-1]: k for n, k in four.greedy.items()}
    assert four.predicted_greedy() == pytest.approx(sens.metric_full + sum(sens.delta[g][k] for g, k in
                                                                           by_type.items()))
    assert four.record()["greedy_by_group"] == by_type and four.record()["metric"]["uniform"] == round(
        four.metric_uniform, 4)
    assert get_rank(model) is None
    with pytest.raises(ValueError, match="leave candidates and group out"):
        plan_allocation(model, "rank:2", [None], metric, sensitivities=sens, group="layer")
    other = trained(tiny_llama(), r_max=4)
    with pytest.raises(ValueError, match="measured on another adapter.*measure_sensitivities on this model"):
        plan_allocation(other, "rank:2", [None], metric, sensitivities=sens)


@pytest.mark.parametrize("budget,match", [
    (100, r"below the adapter at rank 1 everywhere \(1,024\).*at least 1,024"),
    (10**9, r"above the adapter at r_max=8 everywhere \(8,192\).*at most 8,192"),
    ("rank:9", r"outside rank:1…rank:8"),
    ("lots", r"parameter count or 'rank:k'"),
])
def test_bad_budgets_name_the_fix(budget, match):
    model = trained(tiny_llama(), r_max=R)
    with pytest.raises(ValueError, match=match):
        allocate_ranks(model, budget, _batches())
    with pytest.raises(ValueError, match="group must be"):
        allocate_ranks(model, "rank:2", _batches(), group="nope")


# ------------------------------------------------------------------------------------------------ command line
def test_allocate_info_and_export_through_the_command_line(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = trained(AutoModelForCausalLM.from_pretrained(str(BUNDLED)), r_max=R, target_modules=["q_proj", "v_proj"])
    save_adapter(model, tmp_path / "ad")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in [{"question": "Encode abc", "answer": "#### xyz"},
                                                           {"text": "a b c d e f"}]))
    plan = tmp_path / "plan.json"
    capsys.readouterr()
    # errors: one line, exit 2, nothing written
    assert main(["allocate", str(tmp_path / "ad"), "--base", str(BUNDLED), "--data", str(rows), "--budget",
                 "999999999", "--out", str(plan)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "above the adapter at r_max=8 everywhere" in err[0] and not plan.exists()
    assert main(["allocate", str(tmp_path / "ad"), "--base", str(BUNDLED), "--data", str(rows), "--budget", "rank:2",
                 "--out", str(plan)]) == 0
    doc = json.loads(plan.read_text())
    assert doc["format"] == "matlora-rank-plan" and doc["parameters"] <= doc["budget"]
    assert doc["parameters"] == _params(model, doc["ranks"]) and sorted(doc["ranks"]) == sorted(adapted_layers(model))
    assert main(["allocate", str(tmp_path / "ad"), "--data", str(rows), "--budget", "rank:2", "--out",
                 str(plan)]) == 2  # exists
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ad"), "--plan", str(plan)]) == 0
    out = capsys.readouterr().out
    assert f"{doc['parameters']:,} adapter parameters" in out
    assert f"{_params(model, {n: 2 for n in doc['ranks']}):,}" in out
    assert main(["export", str(tmp_path / "ad"), "--rank-pattern", str(plan), "--out", str(tmp_path / "peft")]) == 0
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(BUNDLED)),
                                            str(tmp_path / "peft")).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad(), at_rank(model, doc["ranks"]):
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    # rank 0 among the candidates: the plan may drop a type; the export leaves it out and PEFT still agrees
    zero = tmp_path / "zero.json"
    assert main(["allocate", str(tmp_path / "ad"), "--data", str(rows), "--budget", "rank:1", "--zero-rank",
                 "--out", str(zero)]) == 0
    doc0 = json.loads(zero.read_text())
    assert doc0["parameters"] <= doc0["budget"] == _params(model, {n: 1 for n in doc0["ranks"]})
    assert main(["export", str(tmp_path / "ad"), "--rank-pattern", str(zero), "--out", str(tmp_path / "peft0")]) == 0
    loaded0 = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(BUNDLED)),
                                             str(tmp_path / "peft0")).eval()
    with torch.no_grad(), at_rank(model, doc0["ranks"]):
        torch.testing.assert_close(loaded0(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nope": 2}))
    assert main(["export", str(tmp_path / "ad"), "--rank-pattern", str(bad), "--out", str(tmp_path / "p2")]) == 2
    assert "matches no adapted layer" in capsys.readouterr().err and not (tmp_path / "p2").exists()


def test_data_given_as_a_one_shot_iterator_is_read_once():
    """``data`` may be any iterable (the docs say a list or a DataLoader): a generator is read once and serves both
    the sensitivities and the final check, with the plan a list gives."""
    model = trained(tiny_llama(), r_max=R)
    found = plan_allocation(model, "rank:2", iter(_batches()))
    assert found == plan_allocation(model, "rank:2", _batches())
