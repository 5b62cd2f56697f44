"""A serving box without Lightning: the package imports, loads a saved adapter into a transformers model, runs it at
a rank, merges it, saves it again, exports it to PEFT and writes a merged base, with every ``lightning`` import
blocked (a meta-path finder that refuses them, in a fresh interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent('''
    import sys

    class NoLightning:
        """Refuse lightning and pytorch_lightning, as on a machine where they are not installed."""
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("lightning", "pytorch_lightning"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoLightning())
''')

SERVE = BLOCKER + textwrap.dedent('''
    import json
    import torch
    from transformers import AutoModelForCausalLM

    import lightning_matlora as lm

    base_dir, adapter_dir, out_dir = sys.argv[1:4]
    x = torch.tensor([[1, 5, 7, 2, 9]])
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lm.load_adapter(model, adapter_dir)
    with torch.no_grad():
        lm.set_rank(model, 2)
        at2 = model(x).logits
        lm.set_rank(model, None)
        lm.merge(model, 2)
        merged = model(x).logits
    lm.export_peft(adapter_dir, out_dir, rank=2)
    lm.unmerge(model)
    resaved = lm.read_adapter(lm.save_adapter(model, out_dir + "_resaved"))
    merged_dir = lm.merge_to_base(adapter_dir, out_dir + "_merged", rank=2, base=base_dir)
    with torch.no_grad():
        from_merged = AutoModelForCausalLM.from_pretrained(merged_dir)(x).logits
    try:
        lm.MatryoshkaLoRA
    except ImportError as err:
        trainer_part = str(err)
    torch.save({"at2": at2, "merged": merged, "from_merged": from_merged,
                "resaved_layers": sorted(resaved.layers)}, out_dir + "/logits.pt")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))
    print(json.dumps({"lightning_modules": loaded, "trainer_part": trainer_part}))
''')


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)


def test_the_blocker_blocks_lightning():
    out = _run(BLOCKER + "import lightning.pytorch\n")
    assert out.returncode != 0 and "No module named 'lightning" in out.stderr


def test_load_run_merge_and_export_without_lightning(tmp_path):
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    import lightning_matlora as lm

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    lm.MatryoshkaLoRA(r_max=4, target_modules=["q_proj", "v_proj"], verbose=False).apply(model)
    with torch.no_grad():
        for layer in lm.adapted_layers(model).values():
            layer.lora_B.normal_()
    lm.save_adapter(model, tmp_path / "adapter")
    x = torch.tensor([[1, 5, 7, 2, 9]])
    with torch.no_grad(), lm.at_rank(model, 2):
        expected = model(x).logits

    out = _run(SERVE, str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "peft"))
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["lightning_modules"] == []
    assert "No module named 'lightning" in report["trainer_part"]
    got = torch.load(tmp_path / "peft" / "logits.pt")
    torch.testing.assert_close(got["at2"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["merged"], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["from_merged"], expected, rtol=1e-4, atol=1e-4)  # merge_to_base's directory
    assert got["resaved_layers"] == sorted(lm.adapted_layers(model))  # save_adapter without Lightning
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
