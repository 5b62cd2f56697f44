"""The `matlora` command line: info, export, merge, errors and --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from lightning_matlora import save_adapter
from lightning_matlora.curve import RankCurve
from lightning_matlora.cli import main
from test_adapter_io import X, logits, trained


@pytest.fixture
def adapter(tmp_path):
    model = trained(tiny_llama(), r_max=8)
    curves = [RankCurve.from_mapping({1: 0.25, 2: 0.5, 4: 0.625, 8: 0.75}),
              RankCurve.from_mapping({1: 3.0, 2: 2.5, 4: 2.25, 8: 2.0}, metric="loss", higher_is_better=False)]
    save_adapter(model, tmp_path / "ad", curves=curves, metadata={"step": 12})
    return model, tmp_path / "ad"


def test_info_prints_config_and_curve_table(adapter, capsys):
    _, path = adapter
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "r_max           8" in out and "train ranks     [1, 2, 4, 8]" in out
    assert "layers          14 (down_proj ×2, gate_proj ×2" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert rows == [["1", "0.2500"], ["2", "0.5000"], ["4", "0.6250"], ["8", "0.7500"],  # every recorded curve
                    ["1", "3.0000"], ["2", "2.5000"], ["4", "2.2500"], ["8", "2.0000"]]
    assert "Measured rank curve: score (higher is better)" in out and "Measured rank curve: loss (lower is better)" in out
    # trapezoids on the log2 axis: (0.375 + 0.5625 + 0.6875) / 3 and (2.75 + 2.375 + 2.125) / 3
    assert "AURAC  0.5417" in out and "AURAC  2.4167" in out and "step=12" in out


def test_export_and_overwrite(adapter, tmp_path, capsys):
    model, path = adapter
    out = tmp_path / "k3"
    assert main(["export", str(path), "--rank", "3", "--out", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    assert main(["export", str(path), "--rank", "2", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(path), "--rank", "2", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


@pytest.mark.parametrize("rank", ["0", "9", "two"])
def test_export_bad_rank(adapter, tmp_path, capsys, rank):
    _, path = adapter
    assert main(["export", str(path), "--rank", rank, "--out", str(tmp_path / "o")]) == 2
    assert "rank must be an integer in 1…r_max=8" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_export_all_and_merge(adapter, tmp_path):
    model, path = adapter
    assert main(["export", str(path), "--rank", "all", "--out", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["matlora_output.json", "rank_1", "rank_2", "rank_4",
                                                                    "rank_8"]
    card = (tmp_path / "all" / "rank_4" / "README.md").read_text()
    assert "measured score at rank 4: 0.625" in card and "measured loss at rank 4: 2.25" in card
    tiny_llama().save_pretrained(tmp_path / "base")
    assert main(["merge", str(path), "--base", str(tmp_path / "base"), "--rank", "5", "--out",
                 str(tmp_path / "m")]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(X).logits, logits(model, 5), rtol=1e-5, atol=1e-5)
    assert main(["merge", str(path), "--base", str(tmp_path / "base"), "--rank", "5", "--out",
                 str(tmp_path / "m")]) == 2


def test_missing_adapter_and_usage(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "No adapter directory" in capsys.readouterr().err
    assert main([]) == 2
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path)])  # --rank and --out are required


def test_python_dash_m_help():
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "lightning_matlora", "export", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=root)
    assert r.returncode == 0 and "--rank K|all" in r.stdout and "--overwrite" in r.stdout


class Payload:
    """Unpickling this runs code: a weights-only load must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_merge_with_a_pickled_base_is_one_line(adapter, tmp_path, capsys):
    """transformers refuses a pickle it would have to unpickle (weights-only): one line naming the base, exit 2."""
    _, path = adapter
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    (base / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload()}, base / "pytorch_model.bin")
    assert main(["merge", str(path), "--base", str(base), "--rank", "2", "--out", str(tmp_path / "m")]) == 2
    captured = capsys.readouterr()
    [err] = [line for line in captured.err.splitlines() if line.startswith("matlora")]  # (progress bars aside)
    assert "\n" not in err and "Traceback" not in err and "unpickled!" not in captured.out
    assert err.startswith("matlora merge: error: Cannot load the base model") and str(base) in err
    assert not (tmp_path / "m").exists()


def test_base_path_is_recorded_as_given_like_peft_and_export_can_rename_it(tmp_path, monkeypatch):
    """A base loaded from a relative directory is recorded as that relative path (what real PEFT records), never
    as this machine's absolute path; `export --base-name` writes the name the adapter's users can load."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lightning_matlora import MatryoshkaLoRA, read_adapter

    monkeypatch.chdir(tmp_path)
    tiny_llama().save_pretrained("base")
    model = AutoModelForCausalLM.from_pretrained("base")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained("base"), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_name = peft_model.peft_config["default"].base_model_name_or_path
    MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    save_adapter(model, "ad")
    assert read_adapter("ad").base_model_name_or_path == peft_name == "base"
    assert main(["export", "ad", "--rank", "2", "--out", "k2"]) == 0
    assert json.loads(Path("k2/adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    assert main(["export", "ad", "--rank", "2", "--out", "k2h", "--base-name", "my-org/tiny-llama"]) == 0
    assert json.loads(Path("k2h/adapter_config.json").read_text())["base_model_name_or_path"] == "my-org/tiny-llama"
    assert "`my-org/tiny-llama`" in Path("k2h/README.md").read_text()
    assert main(["export", "ad", "--rank", "all", "--out", "all", "--base-name", "my-org/tiny-llama"]) == 0
    assert {json.loads(p.read_text())["base_model_name_or_path"] for p in Path("all").glob("*/adapter_config.json")} \
        == {"my-org/tiny-llama"}
