"""GGUF base models: converted once into a cached local directory, with clear errors for what cannot be a base."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gguf_helpers import tiny_llama_for_gguf, write_gguf

pytest.importorskip("gguf")

from lightning_matlora import gguf_base  # noqa: E402
from lightning_matlora.gguf_base import GGUFError, cache_root, resolve_base  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LIGHTNING_MATLORA_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = tiny_llama_for_gguf()
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model), model


def test_gguf_file_becomes_a_cached_directory_with_the_same_logits_and_tokenizer(cache, tiny_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model = tiny_file
    out = Path(resolve_base(str(path)))
    assert out.parent == cache / "gguf" and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # an ordinary directory: no gguf_file needed
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-6)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.decode(tok("the cat")["input_ids"]) == "the cat"
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)
    assert [p.name for p in (cache / "gguf").iterdir()] == [out.name]  # no temporary directory left
    assert getattr(loaded.config, "quantization_config", None) is None  # dequantized: saves like any model
    loaded.save_pretrained(cache.parent / "again")


def test_second_use_reads_the_cache_without_converting(cache, tiny_file, monkeypatch):
    path, _ = tiny_file
    first = resolve_base(path)

    def no_conversion(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_base, "convert_gguf", no_conversion)
    assert resolve_base(path) == first
    assert resolve_base(path.parent, gguf_file=path.name) == first  # the directory + file name form


def test_a_changed_file_gets_a_new_cache_directory(cache, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_llama_for_gguf(0))
    first = resolve_base(path)
    write_gguf(path, tiny_llama_for_gguf(1))
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    second = resolve_base(path)
    assert second != first and Path(first).is_dir() and Path(second).is_dir()


def test_other_names_pass_through(cache, tmp_path):
    assert resolve_base("some-org/some-model") == "some-org/some-model"
    assert resolve_base(str(tmp_path)) == str(tmp_path)
    assert not cache.exists()


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LIGHTNING_MATLORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lightning_matlora"
    monkeypatch.setenv("LIGHTNING_MATLORA_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_adapter_gguf_is_refused_before_anything_is_written(cache, tmp_path):
    path = write_gguf(tmp_path / "lora.gguf", tiny_llama_for_gguf(), kind="adapter")
    with pytest.raises(GGUFError, match="holds a LoRA adapter .*general.type = 'adapter'.* base model"):
        resolve_base(path)
    assert not cache.exists()


def test_architecture_transformers_cannot_load_is_refused(cache, tmp_path):
    path = write_gguf(tmp_path / "rwkv.gguf", tiny_llama_for_gguf(), arch="rwkv6")
    with pytest.raises(GGUFError, match="'rwkv6' model, which this version of transformers cannot load from GGUF.*"
                                        "llama.*Convert the original model"):
        resolve_base(path)
    assert not cache.exists()


def test_missing_and_unreadable_files(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_base(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="No GGUF file 'x.gguf'"):
        resolve_base(tmp_path, gguf_file="x.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        resolve_base(bad)
    assert not cache.exists() or not any((cache / "gguf").iterdir())


def test_interrupted_conversion_leaves_no_cache_entry(cache, tiny_file, monkeypatch):
    path, _ = tiny_file

    def half_written(src, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_base, "convert_gguf", half_written)
    with pytest.raises(KeyboardInterrupt):
        resolve_base(path)
    assert list((cache / "gguf").iterdir()) == []


def test_merge_and_nest_take_a_gguf_base(cache, tiny_file, tmp_path, capsys):
    """`matlora merge/nest --base FILE.gguf`: the base is the converted file (converted once, then from the cache);
    the merged model gives the adapter's logits at the merged rank on that base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lightning_matlora import MatryoshkaLoRA, at_rank, save_adapter
    from lightning_matlora.cli import main

    path, _ = tiny_file
    base_dir = resolve_base(str(path))
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    MatryoshkaLoRA(r_max=4, target_modules=["q_proj", "v_proj"], verbose=False).apply(model)
    with torch.no_grad():
        for layer in [m for m in model.modules() if hasattr(m, "lora_B")]:
            layer.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    adapter = save_adapter(model, tmp_path / "adapter")
    assert main(["merge", str(adapter), "--base", str(path), "--rank", "2", "--out", str(tmp_path / "m")]) == 0
    x = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad(), at_rank(model, 2):
        torch.testing.assert_close(merged(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    assert [p.name for p in (cache / "gguf").iterdir()] == [Path(base_dir).name]  # one conversion, reused

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    assert main(["nest", str(tmp_path / "peft"), "--base", str(path), "--out", str(tmp_path / "nested")]) == 0
    from lightning_matlora import read_adapter
    assert read_adapter(tmp_path / "nested").r_max == 2

    adapter_gguf = write_gguf(tmp_path / "lora.gguf", tiny_llama_for_gguf(), kind="adapter")
    assert main(["merge", str(adapter), "--base", str(adapter_gguf), "--rank", "2", "--out", str(tmp_path / "m2")]) == 2
    assert "holds a LoRA adapter" in capsys.readouterr().err and not (tmp_path / "m2").exists()
