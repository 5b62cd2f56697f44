"""Hostile inputs to `matlora export`, `merge` and `nest` (and their API): nothing is lost, nothing is built from a
base the adapter does not fit, nothing wrong is accepted silently, and every refusal is one line naming the file,
field or layer.

One table, one row per case: the files the case sets up, the command, the exit status and what its one error
line must name. Every refused case also leaves every file of the workspace exactly as it was (nothing written,
nothing deleted). Real transformers models built from small configs, real PEFT adapters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_gpt2, tiny_llama
from lightning_matlora import at_rank, export_peft, load_adapter, merge_to_base, save_adapter
from lightning_matlora.cli import main
from lightning_matlora.nest_peft import nest_adapter
from test_adapter_io import trained
from test_nest_peft import make_peft

peft = pytest.importorskip("peft")

X = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ workspace
@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: base models (Llama, GPT-2, a huge Llama and a huge GPT-2 of which only config.json exists), a
    nested Llama adapter, a PEFT Llama adapter, a project, data files."""
    root = tmp_path_factory.mktemp("ws")
    tiny_llama().save_pretrained(str(root / "llama"))
    tiny_gpt2().save_pretrained(str(root / "gpt2"))
    tiny_llama(num_hidden_layers=3).save_pretrained(str(root / "llama3"))
    from transformers import GPT2Config, LlamaConfig

    # config.json only: building either model for real would take tens of GB (the 19 GB Llama of the issue);
    # a refusal that names the difference proves the check ran on the config, before any model was built
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8).save_pretrained(str(root / "huge_llama"))
    GPT2Config(n_embd=4096, n_layer=48, n_head=32).save_pretrained(str(root / "huge_gpt2"))
    save_adapter(trained(tiny_llama(), r_max=4), root / "ad")
    make_peft(root, name="peft", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])  # random factors
    (root / "proj" / "src").mkdir(parents=True)
    (root / "proj" / "src" / "main.py").write_text("print('my work')\n")
    (root / "proj" / "README.md").write_text("my project\n")
    (root / "rows.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n")
    (root / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (root / "datadir").mkdir()
    (root / "loop").symlink_to(root / "loop")
    export_peft(root / "ad", root / "old_export", rank=2)  # an export, then made to look like one from before the mark
    (root / "old_export" / "matlora_output.json").unlink(missing_ok=True)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` → its SHA-256 (symlinks by their target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = "link:" + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def peft_copy(ws: Path, name: str, edit: Callable[[dict], None] | None = None,
              tensors: Callable[[dict], dict] | None = None, raw_config: bytes | None = None) -> str:
    """A copy of the workspace's PEFT adapter with its config and/or tensors edited."""
    dst = ws / name
    if not dst.exists():
        shutil.copytree(ws / "peft", dst)
        cfg_file = dst / "adapter_config.json"
        if edit is not None:
            cfg = json.loads(cfg_file.read_text())
            edit(cfg)
            cfg_file.write_text(json.dumps(cfg))
        if raw_config is not None:
            cfg_file.write_bytes(raw_config)
        if tensors is not None:
            f = dst / "adapter_model.safetensors"
            save_file(tensors(load_file(str(f))), str(f))
    return str(dst)


def setitem(key, value):
    return lambda cfg: cfg.__setitem__(key, value)


def nan_in_one_factor(t: dict) -> dict:
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    t[key] = t[key].clone()
    t[key][3, 1] = float("nan")
    return t


def embedding_lora(ws: Path) -> str:
    dst = ws / "peft_emb"
    if not dst.exists():
        m = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                              task_type="CAUSAL_LM"))
        m.save_pretrained(str(dst))
    return str(dst)


@dataclasses.dataclass
class Case:
    argv: Callable[[Path], list[str]]  # the command line, given the workspace
    names: tuple[str, ...]  # what the one error line must contain ("{ws}" is the workspace)
    out: str | None = None  # the --out directory the case must not create (relative to the workspace)


W = "{ws}"
CASES = {
    # ---- lost work: --overwrite replaces only what this library wrote; --out is never the base or the adapter
    "export_over_a_base_model": Case(
        lambda ws: ["export", f"{ws}/ad", "--rank", "2", "--out", f"{ws}/llama", "--overwrite"],
        ("Refusing to overwrite", f"{W}/llama", "config.json", "did not write")),
    "merge_out_is_the_base": Case(
        lambda ws: ["merge", f"{ws}/ad", "--base", f"{ws}/llama", "--rank", "2", "--out", f"{ws}/llama",
                    "--overwrite"],
        ("Refusing to write", "holds the base model")),
    "merge_into_a_project": Case(
        lambda ws: ["merge", f"{ws}/ad", "--base", f"{ws}/llama", "--rank", "2", "--out", f"{ws}/proj",
                    "--overwrite"],
        ("Refusing to overwrite", f"{W}/proj", "README.md", "src/main.py")),
    "export_all_into_a_project": Case(
        lambda ws: ["export", f"{ws}/ad", "--rank", "all", "--out", f"{ws}/proj", "--overwrite"],
        ("Refusing to overwrite", "src/main.py")),
    "export_out_is_the_adapter": Case(
        lambda ws: ["export", f"{ws}/ad", "--rank", "2", "--out", f"{ws}/ad", "--overwrite"],
        ("Refusing to write", "holds the source adapter")),
    "export_out_contains_the_adapter": Case(
        lambda ws: ["export", f"{ws}/ad", "--rank", "2", "--out", f"{ws}", "--overwrite"],
        ("Refusing to write", "holds")),
    "export_out_inside_the_adapter": Case(
        lambda ws: ["export", f"{ws}/ad", "--rank", "2", "--out", f"{ws}/ad/k2", "--overwrite"],
        ("Refusing to write", "inside the source adapter"), out="ad/k2"),
    "merge_out_contains_the_base": Case(
        lambda ws: ["merge", f"{ws}/ad", "--base", f"{ws}/proj/../llama", "--rank", "2", "--out", f"{ws}",
                    "--overwrite"],
        ("Refusing to write", "holds")),
    "nest_over_a_base_model": Case(
        lambda ws: ["nest", f"{ws}/peft", "--base", f"{ws}/llama", "--out", f"{ws}/gpt2", "--overwrite"],
        ("Refusing to overwrite", f"{W}/gpt2")),
    "nest_out_is_the_peft_adapter": Case(
        lambda ws: ["nest", f"{ws}/peft", "--base", f"{ws}/llama", "--out", f"{ws}/peft", "--overwrite"],
        ("holds the PEFT adapter",)),
    "merge_over_an_unmarked_model": Case(  # a merged model from before the mark looks exactly like a base
        lambda ws: ["merge", f"{ws}/ad", "--base", f"{ws}/llama", "--rank", "2", "--out", f"{ws}/gpt2",
                    "--overwrite"],
        ("Refusing to overwrite", "matlora_output.json")),
    "export_without_overwrite": Case(
        lambda ws: ["export", f"{ws}/ad", "--rank", "2", "--out", f"{ws}/proj"], ("already exists", "--overwrite")),
    # ---- the machine killed: a base that does not fit is refused before any model is built
    "merge_llama_adapter_gpt2_base": Case(
        lambda ws: ["merge", f"{ws}/ad", "--base", f"{ws}/huge_gpt2", "--rank", "2", "--out", f"{ws}/m"],
        ("'gpt2' model", "'llama' model", "LlamaForCausalLM"), out="m"),
    "merge_wider_llama_base": Case(
        lambda ws: ["merge", f"{ws}/ad", "--base", f"{ws}/huge_llama", "--rank", "2", "--out", f"{ws}/m"],
        ("Shape mismatch at layer 'model.layers.0.", "8192"), out="m"),
    "merge_into_a_deeper_base": Case(  # merged silently before, with the third layer un-adapted
        lambda ws: ["merge", f"{ws}/ad", "--base", f"{ws}/llama3", "--rank", "2", "--out", f"{ws}/m"],
        ("'model.layers.2.", "trained on a smaller model"), out="m"),
    "export_for_a_gpt2_base": Case(
        lambda ws: ["export", f"{ws}/ad", "--rank", "2", "--base", f"{ws}/huge_gpt2", "--out", f"{ws}/e"],
        ("'gpt2' model", "LlamaForCausalLM"), out="e"),
    "nest_llama_peft_gpt2_base": Case(
        lambda ws: ["nest", f"{ws}/peft", "--base", f"{ws}/huge_gpt2", "--out", f"{ws}/n"],
        ("has no layer 'model.layers.0.self_attn.q_proj'", f"{W}/huge_gpt2"), out="n"),
    "nest_wider_llama_base": Case(
        lambda ws: ["nest", f"{ws}/peft", "--base", f"{ws}/huge_llama", "--out", f"{ws}/n"],
        ("Shape mismatch at layer 'model.layers.0.self_attn.q_proj'", "8192 → 8192"), out="n"),
    # ---- nest options
    "max_rows_0": Case(lambda ws: ["nest", f"{ws}/peft", "--base", f"{ws}/llama", "--out", f"{ws}/n", "--data",
                                   f"{ws}/rows.jsonl", "--max-rows", "0"], ("--max-rows", "≥ 1", "0"), out="n"),
    "max_rows_negative": Case(lambda ws: ["nest", f"{ws}/peft", "--base", f"{ws}/llama", "--out", f"{ws}/n",
                                          "--data", f"{ws}/rows.jsonl", "--max-rows", "-1"], ("--max-rows", "-1"),
                              out="n"),
    "ranks_empty": Case(lambda ws: ["nest", f"{ws}/peft", "--base", f"{ws}/llama", "--out", f"{ws}/n", "--ranks", ""],
                        ("--ranks", "empty"), out="n"),
    # ---- PEFT configs real peft refuses, and fields whose errors named neither file nor field
    **{f"peft_{name}": Case(
        (lambda name, edit: lambda ws: ["nest", peft_copy(ws, f"peft_{name}", edit), "--base", f"{ws}/llama",
                                        "--out", f"{ws}/n"])(name, edit),
        ("adapter_config.json", f"field {field!r}", shown), out="n")
       for name, edit, field, shown in [
           ("r_float", setitem("r", 4.7), "r", "4.7"),
           ("r_string", setitem("r", "4"), "r", '"4"'),
           ("alpha_string", setitem("lora_alpha", "8"), "lora_alpha", '"8"'),
           ("alpha_null", setitem("lora_alpha", None), "lora_alpha", "null"),
           ("alpha_pattern_list", setitem("alpha_pattern", ["q_proj"]), "alpha_pattern", '["q_proj"]'),
           ("task_type", setitem("task_type", "FOO"), "task_type", '"FOO"'),
           ("modules_to_save_string", setitem("modules_to_save", "lm_head"), "modules_to_save", '"lm_head"'),
           ("dropout_string", setitem("lora_dropout", "abc"), "lora_dropout", '"abc"'),
           ("rank_pattern_regex", setitem("rank_pattern", {"(": 2}), "rank_pattern", "'('"),
       ]},
    "peft_config_not_utf8": Case(
        lambda ws: ["nest", peft_copy(ws, "peft_latin1", raw_config=b'{"r": 4, "x": "caf\xe9"}'), "--base",
                    f"{ws}/llama", "--out", f"{ws}/n"], ("adapter_config.json", "not UTF-8"), out="n"),
    "data_not_utf8": Case(
        lambda ws: ["nest", f"{ws}/peft", "--base", f"{ws}/llama", "--out", f"{ws}/n", "--data",
                    f"{ws}/latin1.jsonl"], (f"{W}/latin1.jsonl", "not UTF-8"), out="n"),
    "nan_in_one_factor": Case(
        lambda ws: ["nest", peft_copy(ws, "peft_nan", tensors=nan_in_one_factor), "--base", f"{ws}/llama", "--out",
                    f"{ws}/n"], ("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight", "NaN"), out="n"),
    # ---- misleading reasons
    "base_does_not_exist": Case(
        lambda ws: ["nest", f"{ws}/peft", "--base", "/nonexistent", "--out", f"{ws}/n"],
        ("No base model directory at /nonexistent",), out="n"),
    "merge_base_does_not_exist": Case(
        lambda ws: ["merge", f"{ws}/ad", "--base", "/nonexistent", "--rank", "2", "--out", f"{ws}/m"],
        ("No base model directory at /nonexistent",), out="m"),
    "data_is_a_directory": Case(
        lambda ws: ["nest", f"{ws}/peft", "--base", f"{ws}/llama", "--out", f"{ws}/n", "--data", f"{ws}/datadir"],
        (f"{W}/datadir is a directory",), out="n"),
    "embedding_lora": Case(
        lambda ws: ["nest", embedding_lora(ws), "--base", f"{ws}/llama", "--out", f"{ws}/n"],
        ("embed_tokens", "LoRA on an embedding layer, which is not supported"), out="n"),
    "symlink_loop_adapter": Case(
        lambda ws: ["nest", f"{ws}/loop", "--base", f"{ws}/llama", "--out", f"{ws}/n"],
        (f"{W}/loop", "link loop"), out="n"),
    "symlink_loop_base": Case(
        lambda ws: ["merge", f"{ws}/ad", "--base", f"{ws}/loop", "--rank", "2", "--out", f"{ws}/m"],
        (f"{W}/loop", "link loop"), out="m"),
    "symlink_loop_out": Case(
        lambda ws: ["export", f"{ws}/ad", "--rank", "2", "--out", f"{ws}/loop", "--overwrite"],
        (f"{W}/loop", "link loop")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refused_in_one_line_and_nothing_changes(ws, name, capsys):
    case = CASES[name]
    argv = case.argv(ws)  # builds the case's own inputs, before the snapshot
    before = snapshot(ws)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("matlora")]
    assert status == 2
    assert len(err) == 1, err
    for part in case.names:
        assert part.replace(W, str(ws)) in err[0], err[0]
    assert snapshot(ws) == before  # nothing written, nothing deleted
    if case.out:
        assert not (ws / case.out).exists()


# ------------------------------------------------------------------------------------- what --overwrite replaces
def run(argv: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(argv)


def test_overwrite_replaces_what_this_library_wrote(ws, tmp_path):
    ad = str(ws / "ad")
    out = tmp_path / "e"
    assert run(["export", ad, "--rank", "2", "--out", str(out)]) == 0
    assert run(["export", ad, "--rank", "3", "--out", str(out), "--overwrite"]) == 0  # re-export onto an export
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    assert run(["export", ad, "--rank", "all", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["matlora_output.json", "rank_1", "rank_2", "rank_4"]
    assert run(["merge", ad, "--base", str(ws / "llama"), "--rank", "2", "--out", str(out), "--overwrite"]) == 0
    assert run(["merge", ad, "--base", str(ws / "llama"), "--rank", "4", "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "rank_1").exists()
    old = tmp_path / "old"  # an export written before the mark existed is recognised by its files and card
    shutil.copytree(ws / "old_export", old)
    assert run(["export", ad, "--rank", "1", "--out", str(old), "--overwrite"]) == 0
    adapter_copy = tmp_path / "ad_copy"  # an adapter directory (ours by its strict format) may be replaced
    shutil.copytree(ws / "ad", adapter_copy)
    assert run(["export", ad, "--rank", "1", "--out", str(adapter_copy), "--overwrite"]) == 0
    (tmp_path / "empty").mkdir()
    assert run(["export", ad, "--rank", "1", "--out", str(tmp_path / "empty"), "--overwrite"]) == 0
    (out / "notes.txt").write_text("mine")  # a file the user added to a merged model: now it is theirs
    assert run(["merge", ad, "--base", str(ws / "llama"), "--rank", "2", "--out", str(out), "--overwrite"]) == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_api_refuses_the_same(ws, tmp_path):
    before = snapshot(ws)
    with pytest.raises(FileExistsError, match="Refusing to overwrite"):
        export_peft(ws / "ad", ws / "llama", rank=2, overwrite=True)
    with pytest.raises(ValueError, match="holds the base model"):
        merge_to_base(ws / "ad", ws / "llama", rank=2, base=ws / "llama", overwrite=True)
    with pytest.raises(ValueError, match="'gpt2' model"):
        merge_to_base(ws / "ad", tmp_path / "m", rank=2, base=ws / "huge_gpt2")
    with pytest.raises(ValueError, match="'gpt2' model"):
        export_peft(ws / "ad", tmp_path / "e", rank=2, base=str(ws / "huge_gpt2"))
    with pytest.raises(ValueError, match="has no layer 'model.layers.0"):
        load_adapter(tiny_gpt2(), ws / "ad")
    with pytest.raises(ValueError, match="max_rows"):
        nest_adapter(ws / "peft", ws / "llama", tmp_path / "n", eval_data=ws / "rows.jsonl", max_rows=0)
    with pytest.raises(ValueError, match="eval_ranks"):
        nest_adapter(ws / "peft", ws / "llama", tmp_path / "n", eval_ranks=[])
    assert snapshot(ws) == before and not any(tmp_path.iterdir())


def test_export_for_a_base_records_it(ws, tmp_path):
    out = export_peft(ws / "ad", tmp_path / "e", rank=2, base=str(ws / "llama"))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(ws / "llama")


# ------------------------------------------------------------------------------------------- negative lora_alpha
@pytest.mark.parametrize("alpha_pattern", [{}, {"v_proj": 12}])
def test_negative_lora_alpha_is_served_with_its_sign(ws, tmp_path, alpha_pattern):
    """PEFT serves lora_alpha=-8 as scale -8/r; the nested adapter keeps the sign (in lora_B): its r_max logits and
    its exported r_max adapter equal real PEFT's."""
    src = peft_copy(ws, f"peft_neg{len(alpha_pattern)}",
                    lambda cfg: cfg.update(lora_alpha=-8, alpha_pattern=alpha_pattern))
    from transformers import AutoModelForCausalLM

    def base():
        return AutoModelForCausalLM.from_pretrained(str(ws / "llama")).eval()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(base(), src).eval()
    with torch.no_grad():
        want = reference(X).logits
        assert not torch.allclose(want, base()(X).logits, atol=1e-3)  # the adapter does something
    result = nest_adapter(src, ws / "llama", tmp_path / "n")
    with torch.no_grad(), at_rank(result.model, 4):
        torch.testing.assert_close(result.model(X).logits, want, rtol=1e-5, atol=1e-5)
    exported = export_peft(result.path, tmp_path / "k4", rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(base(), str(exported)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(X).logits, want, rtol=1e-5, atol=1e-5)


def test_zero_lora_alpha_is_refused_naming_the_field(ws, tmp_path):
    src = peft_copy(ws, "peft_zero", setitem("lora_alpha", 0))
    with pytest.raises(ValueError, match="scale 0 .*lora_alpha"):
        nest_adapter(src, ws / "llama", tmp_path / "n")
    assert not (tmp_path / "n").exists()
