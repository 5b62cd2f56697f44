"""The adapter format is strict: a table of corrupted adapters, each refused with AdapterFormatError naming the
field (and the CLI prints one line and exits 2); loads that would be silently wrong are refused."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_llama
from lightning_matlora import (AdapterFormatError, MatryoshkaLinear, adapted_layers, export_peft, load_adapter, merge,
                               read_adapter, save_adapter)
from lightning_matlora.adapter_format import sha256_file
from lightning_matlora.cli import main
from lightning_matlora.curve import RankCurve
from test_adapter_io import X, trained

LAYER = "model.layers.0.self_attn.q_proj"
CFG, WEIGHTS = "matlora_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A valid adapter with every optional part filled: modules_to_save, two curves, metadata."""
    model = trained(tiny_llama(num_hidden_layers=1), r_max=4, modules_to_save=["lm_head"])
    path = tmp_path_factory.mktemp("saved") / "ad"
    curves = [RankCurve((1, 2, 4), (0.5, 0.6, 0.7), "acc"), RankCurve((1, 2, 4), (2.0, 1.5, 1.2), "loss", False)]
    save_adapter(model, path, curves=curves, metadata={"step": 3})
    return path


def corrupt(saved, tmp_path, doc_edit=None, tensor_edit=None, rehash=True):
    """A copy of ``saved`` with its config JSON and/or tensors edited (the checksum updated unless ``rehash``)."""
    path = tmp_path / "bad"
    shutil.copytree(saved, path)
    doc = json.loads((path / CFG).read_text())
    if tensor_edit is not None:
        tensors = load_file(str(path / WEIGHTS))
        tensor_edit(tensors)
        save_file(tensors, str(path / WEIGHTS))
        if rehash:
            doc["weights_sha256"] = sha256_file(path / WEIGHTS)
    if doc_edit is not None:
        doc_edit(doc)
    (path / CFG).write_text(json.dumps(doc))
    return path


def refused(path, *needles, capsys=None):
    """read_adapter raises AdapterFormatError naming the file and every needle; the CLI prints one line, exits 2."""
    with pytest.raises(AdapterFormatError) as err:
        read_adapter(path)
    message = str(err.value)
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    if capsys is not None:
        capsys.readouterr()
        assert main(["info", str(path)]) == 2
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("matlora info: error: ") and out.out == "", out
        assert all(n in lines[0] for n in needles)
    return message


# ----------------------------------------------------------------------------------- every field, the table
def _paths(doc):
    """(path, container getter, key) of every field the writer writes, nested ones included."""
    out = [((k,), lambda d: d, k) for k in doc]
    out += [(("config", k), lambda d: d["config"], k) for k in doc["config"]]
    out += [(("adapted_layers", LAYER, k), lambda d: d["adapted_layers"][LAYER], k) for k in doc["adapted_layers"][LAYER]]
    out += [(("rank_curves[0]", k), lambda d: d["rank_curves"][0], k) for k in doc["rank_curves"][0]]
    return out


def _field_name(path):
    return ".".join(path)


WRONG = {  # a value of the wrong type for every field (bools are not numbers, strings are not lists, ...)
    "format": 1, "format_version": "2", "library_version": 0.1, "config": [], "adapted_layers": ["q_proj"],
    "modules_to_save": "abc", "base_model_name_or_path": 5, "base_model_class": ["LlamaForCausalLM"],
    "task_type": True, "peft_target_modules": "q_proj", "rank_curves": {"metric": "acc"}, "metadata": [],
    "weights_sha256": 123,
    "config.r_max": "4", "config.ranks": "1,2,4", "config.target_modules": 5, "config.exclude_modules": 5,
    "config.modules_to_save": "lm_head", "config.scaling": 1, "config.alpha": True, "config.dropout": None,
    "config.mode": None, "config.rank_scale": False, "config.p": "none", "config.eval_ranks": [1.0, 2.0],
    "config.adapter_dtype": 32, "config.seed": "0",
    "config.rank_weights": [1.5], "config.max_pass": 1, "config.distill": True, "config.distill_module": 3,
    "config.init": 3, "config.layer_draws": 1,
    f"adapted_layers.{LAYER}.in_features": "32", f"adapted_layers.{LAYER}.out_features": 32.0,
    f"adapted_layers.{LAYER}.conv1d": "false",
    "rank_curves[0].metric": 1, "rank_curves[0].higher_is_better": "true", "rank_curves[0].ranks": ["1"],
    "rank_curves[0].scores": "high",
}


def _doc(saved):
    return json.loads((saved / CFG).read_text())


def test_the_table_covers_every_written_field(saved):
    assert sorted(_field_name(p) for p, _, _ in _paths(_doc(saved))) == sorted(WRONG)


def test_the_schema_types_every_config_field():
    """A new MatLoRAConfig field changes the format: give it a type in CONFIG_FIELDS (and think about the version)."""
    import dataclasses

    from lightning_matlora.adapter_format import CONFIG_FIELDS
    from lightning_matlora.config import MatLoRAConfig

    assert set(CONFIG_FIELDS) == {f.name for f in dataclasses.fields(MatLoRAConfig)}


def _needles(path):
    if path[0] == "rank_curves[0]":
        return ("rank_curves[0]", path[1])
    if path[0] in ("format", "format_version"):
        return (path[0],)
    return (_field_name(path),)


@pytest.mark.parametrize("field", sorted(set(WRONG) - {"config.rank_weights", "config.max_pass", "config.distill",
                                                        "config.distill_module", "config.init",
                                                        "config.layer_draws"}))
def test_every_field_deleted_is_refused_naming_it(saved, tmp_path, capsys, field):
    [(path, get, key)] = [(p, g, k) for p, g, k in _paths(_doc(saved)) if _field_name(p) == field]
    bad = corrupt(saved, tmp_path, doc_edit=lambda d: get(d).pop(key))
    message = refused(bad, *_needles(path), capsys=capsys)
    if path[0] not in ("format", "format_version", "rank_curves[0]"):
        assert "missing field" in message


def test_a_config_without_rank_weights_reads_with_the_default(saved, tmp_path):
    """rank_weights (training only) came after format version 2: a file written without it (and so without
    max_pass, which came later) reads with the rule it was trained with, uniform rows in one pass."""
    assert "rank_weights" in _doc(saved)["config"] and "max_pass" in _doc(saved)["config"]
    older = corrupt(saved, tmp_path, doc_edit=lambda d: [d["config"].pop(f) for f in ("rank_weights", "max_pass")])
    read = read_adapter(older).config
    assert read.rank_weights == "uniform" and read.max_pass is False


def test_a_config_without_max_pass_reads_as_false(saved, tmp_path):
    """max_pass (training only) came after format version 2: a file written without it reads with False (its
    one-pass training), not with today's default."""
    assert "max_pass" in _doc(saved)["config"]

    def before_max_pass(d: dict) -> None:
        d["config"].pop("max_pass")
        d["config"]["rank_weights"] = "half_max"  # the default of that time

    read = read_adapter(corrupt(saved, tmp_path, doc_edit=before_max_pass)).config
    assert read.max_pass is False and read.rank_weights == "half_max"


def test_a_config_without_init_reads_as_shared(saved, tmp_path):
    """init came after format version 2: a file written without it was initialised with every row of A at
    1/√r_max ("shared"), whatever today's default is."""
    assert _doc(saved)["config"]["init"] == "per_rank"  # today's default for rowwise
    older = corrupt(saved, tmp_path, doc_edit=lambda d: d["config"].pop("init"))
    assert read_adapter(older).config.init == "shared"


def test_a_config_without_layer_draws_reads_as_one_draw_for_every_layer(saved, tmp_path):
    """layer_draws came after format version 2: a file written without it trained every layer with the same row
    ranks ("none")."""
    assert _doc(saved)["config"]["layer_draws"] == "none"
    older = corrupt(saved, tmp_path, doc_edit=lambda d: d["config"].pop("layer_draws"))
    assert read_adapter(older).config.layer_draws == "none"


def test_a_config_without_distill_reads_as_off(saved, tmp_path):
    """distill and distill_module (training only) came after format version 2: a file without them reads with
    distill=0 and the automatic module."""
    assert _doc(saved)["config"]["distill"] == 0.0 and _doc(saved)["config"]["distill_module"] is None
    older = corrupt(saved, tmp_path, doc_edit=lambda d: [d["config"].pop(f) for f in ("distill", "distill_module")])
    read = read_adapter(older).config
    assert read.distill == 0.0 and read.distill_module is None


@pytest.mark.parametrize("field", sorted(WRONG))
def test_every_field_with_a_wrong_type_is_refused_naming_it(saved, tmp_path, capsys, field):
    [(path, get, key)] = [(p, g, k) for p, g, k in _paths(_doc(saved)) if _field_name(p) == field]
    bad = corrupt(saved, tmp_path, doc_edit=lambda d: get(d).__setitem__(key, WRONG[field]))
    refused(bad, *_needles(path), capsys=capsys)


@pytest.mark.parametrize("where", ["", "config", "adapted_layers", "rank_curves[0]"])
def test_unknown_fields_are_refused_naming_them_not_as_newer(saved, tmp_path, capsys, where):
    def add(d):
        target = {"": d, "config": d["config"], "adapted_layers": d["adapted_layers"][LAYER],
                  "rank_curves[0]": d["rank_curves"][0]}[where]
        target["surprise"] = 1

    message = refused(corrupt(saved, tmp_path, doc_edit=add), "surprise", capsys=capsys)
    assert "newer" not in message and "upgrade" not in message


def test_unknown_field_of_a_newer_version_says_upgrade(saved, tmp_path):
    bad = corrupt(saved, tmp_path, doc_edit=lambda d: d.update(format_version=3, surprise=1))
    refused(bad, "format version 3, newer", "upgrade lightning_matlora")


@pytest.mark.parametrize("case", ["embedding", "unlisted_layer", "missing_factor", "wrong_shape", "int_dtype"])
def test_tensors_not_described_by_the_config_are_refused(saved, tmp_path, capsys, case):
    key = {"embedding": "model.embed_tokens.weight", "unlisted_layer": "model.layers.7.mlp.up_proj.lora_A",
           "missing_factor": f"{LAYER}.lora_B", "wrong_shape": f"{LAYER}.lora_A", "int_dtype": f"{LAYER}.lora_A"}[case]

    def edit(t):
        if case in ("embedding", "unlisted_layer"):
            t[key] = torch.ones(97, 32)
        elif case == "missing_factor":
            del t[key]
        elif case == "wrong_shape":
            t[key] = torch.ones(3, 32)
        else:
            t[key] = t[key].to(torch.int32)

    bad = corrupt(saved, tmp_path, tensor_edit=edit)
    refused(bad, WEIGHTS, key, capsys=capsys)
    model = tiny_llama(num_hidden_layers=1)
    embed = model.model.embed_tokens.weight.clone()
    with pytest.raises(AdapterFormatError):
        load_adapter(model, bad)
    assert torch.equal(model.model.embed_tokens.weight, embed)  # the base is never overwritten
    assert not any(isinstance(m, MatryoshkaLinear) for m in model.modules())
    with pytest.raises(AdapterFormatError):
        export_peft(bad, tmp_path / "peft", rank=2)
    assert not (tmp_path / "peft").exists()


def test_flipped_weight_byte_is_refused_by_the_checksum(saved, tmp_path, capsys):
    bad = corrupt(saved, tmp_path)
    data = bytearray((bad / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: safetensors still parses the file
    (bad / WEIGHTS).write_bytes(bytes(data))
    refused(bad, "weights_sha256", "corrupted", capsys=capsys)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_factors_are_refused_unless_asked_for(saved, tmp_path, capsys, value):
    def edit(t):
        t[f"{LAYER}.lora_B"][0, 0] = value

    bad = corrupt(saved, tmp_path, tensor_edit=edit)
    refused(bad, f"{LAYER}.lora_B", "allow_nonfinite=True", capsys=capsys)
    a = read_adapter(bad, allow_nonfinite=True)
    assert not torch.isfinite(a.factors(LAYER)[1]).all()
    model = load_adapter(tiny_llama(num_hidden_layers=1), bad, allow_nonfinite=True)
    assert not torch.isfinite(adapted_layers(model)[LAYER].lora_B).all()


def test_saving_nonfinite_factors_warns_and_the_file_needs_the_flag(tmp_path):
    model = trained(tiny_llama(num_hidden_layers=1), r_max=2)
    with torch.no_grad():
        adapted_layers(model)[LAYER].lora_A[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN or infinite values in 1 tensors"):
        save_adapter(model, tmp_path / "ad")
    with pytest.raises(AdapterFormatError, match="allow_nonfinite"):
        read_adapter(tmp_path / "ad")


@pytest.mark.parametrize("text,needle", [("{not json", "not valid JSON"), ('"a string"', "'format'"),
                                         ("NaN", "not valid JSON")])
def test_unreadable_config_json(saved, tmp_path, capsys, text, needle):
    bad = corrupt(saved, tmp_path)
    (bad / CFG).write_text(text)
    refused(bad, needle, capsys=capsys)


def test_nan_token_inside_the_config_is_refused(saved, tmp_path):
    bad = corrupt(saved, tmp_path)
    (bad / CFG).write_text((bad / CFG).read_text().replace('"alpha": 1.0', '"alpha": NaN'))
    refused(bad, "not valid JSON")


def test_bad_values_and_structure(saved, tmp_path):
    refused(corrupt(saved, tmp_path, doc_edit=lambda d: d["config"].update(r_max=0)), "config.r_max")
    shutil.rmtree(tmp_path / "bad")
    refused(corrupt(saved, tmp_path, doc_edit=lambda d: d.update(adapted_layers={})), "adapted_layers", "empty")
    shutil.rmtree(tmp_path / "bad")
    refused(corrupt(saved, tmp_path, doc_edit=lambda d: d["rank_curves"].append(d["rank_curves"][0])),
            "rank_curves", "more than one curve")
    shutil.rmtree(tmp_path / "bad")
    refused(corrupt(saved, tmp_path, doc_edit=lambda d: d["config"].update(mode="sideways")), "config", "sideways")


def test_missing_weights_file(saved, tmp_path, capsys):
    bad = corrupt(saved, tmp_path)
    (bad / WEIGHTS).unlink()
    refused(bad, WEIGHTS, "missing", capsys=capsys)


def test_format_version_1_is_read_with_its_own_fields(saved, tmp_path):
    def to_v1(d):
        d["format_version"] = 1
        del d["rank_curves"]
        d["rank_curve"] = {"metric": "val/loss", "ranks": [1, 2, 4], "scores": [2.0, 1.5, None]}
        d["aurac"] = None

    a = read_adapter(corrupt(saved, tmp_path, doc_edit=to_v1))
    [curve] = a.curves
    assert curve.metric == "val/loss" and curve.higher_is_better is False and curve.ranks == (1, 2, 4)
    assert curve.scores[:2] == (2.0, 1.5) and curve.scores[2] != curve.scores[2]  # null: a diverged rank (NaN)
    shutil.rmtree(tmp_path / "bad")
    refused(corrupt(saved, tmp_path, doc_edit=lambda d: (to_v1(d), d.pop("aurac"))), "missing field 'aurac'")
    shutil.rmtree(tmp_path / "bad")
    refused(corrupt(saved, tmp_path, doc_edit=lambda d: (to_v1(d), d.update(rank_curves=[]))),
            "unknown field 'rank_curves'", "version 1")


# ------------------------------------------------------------------------------------- loads that were wrong
def test_load_into_a_merged_model_is_refused_and_changes_nothing(tmp_path):
    source = trained(tiny_llama(), r_max=4)
    save_adapter(source, tmp_path / "ad")
    model = trained(tiny_llama(), seed=9, r_max=4)
    merge(model, 2)
    weight = adapted_layers(model)[LAYER].base_layer.weight.clone()
    with torch.no_grad():
        before = model(X).logits
    with pytest.raises(RuntimeError, match="merged at rank 2: call unmerge"):
        load_adapter(model, tmp_path / "ad")
    assert torch.equal(adapted_layers(model)[LAYER].base_layer.weight, weight)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, before, rtol=0, atol=0)


def test_adapter_of_a_smaller_model_is_refused_with_the_uncovered_layers(tmp_path):
    save_adapter(trained(tiny_llama(num_hidden_layers=2), r_max=4), tmp_path / "ad")
    bigger = tiny_llama(num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"7 layers of the model .* have no adapter \('model\.layers\.2\.mlp\.down_proj'"
                                         r".*strict=False"):
        load_adapter(bigger, tmp_path / "ad")
    assert not any(isinstance(m, MatryoshkaLinear) for m in bigger.modules())
    with pytest.warns(UserWarning, match=r"'model\.layers\.2\.self_attn\.q_proj'.*stay un-adapted"):
        load_adapter(bigger, tmp_path / "ad", strict=False)
    layers = adapted_layers(bigger)
    assert len(layers) == 14 and not any(n.startswith("model.layers.2.") for n in layers)
