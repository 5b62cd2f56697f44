"""nest_adapter on adapters written by the real `peft` package: rank r_max equals the PEFT adapter, every prefix is
each layer's best rank-k approximation (float64 SVD of PEFT's own update), exported ranks load in PEFT, and what
cannot be nested is refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from lightning_matlora import adapted_layers, at_rank, export_peft, load_adapter, read_adapter
from lightning_matlora.nest_peft import nest_adapter
from lightning_matlora.peft_lora import NotNestable

peft = pytest.importorskip("peft")

X = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def base_dir(tmp_path, arch="llama"):
    path = tmp_path / f"base_{arch}"
    if not path.exists():
        BUILD[arch]().save_pretrained(str(path))
    return path


def load_base(path, arch="llama"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def make_peft(tmp_path, arch="llama", name="peft", seed=0, **lora):
    """A PEFT LoRA adapter with random non-zero factors, saved with save_pretrained; returns its directory."""
    lora.setdefault("target_modules", TARGETS[arch])
    lora.setdefault("r", 8)
    lora.setdefault("lora_alpha", 16)
    if arch == "gpt2":
        lora.setdefault("fan_in_fan_out", True)
    model = peft.get_peft_model(load_base(base_dir(tmp_path, arch)), peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    out = tmp_path / name
    model.save_pretrained(str(out))
    return out


def peft_model(tmp_path, peft_dir, arch="llama"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(load_base(base_dir(tmp_path, arch)), str(peft_dir)).eval()


def peft_updates(model) -> dict[str, torch.Tensor]:
    """PEFT's own update of each LoRA layer, scaling·B·A (out × in), float64, from PEFT's modules and scaling."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
            A = module.lora_A["default"].weight.detach().double()
            B = module.lora_B["default"].weight.detach().double()
            out[name.removeprefix("base_model.model.")] = module.scaling["default"] * (B @ A)
    return out


def best_rank_k(W, k):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def ours(tmp_path, nested_dir, arch="llama"):
    return load_adapter(load_base(base_dir(tmp_path, arch)), nested_dir)


def logits(model, k=None):
    with torch.no_grad():
        if k is None:
            return model(X).logits
        with at_rank(model, k):
            return model(X).logits


CASES = {
    "alpha_over_r": ("llama", dict(r=8, lora_alpha=16)),
    "rslora": ("llama", dict(r=8, lora_alpha=4, use_rslora=True)),
    "alpha_ne_r_odd_rank": ("llama", dict(r=6, lora_alpha=3)),
    "rank_and_alpha_pattern": ("llama", dict(r=8, lora_alpha=8, rank_pattern={"v_proj": 4, "down_proj": 2},
                                              alpha_pattern={"q_proj": 32})),
    "modules_to_save": ("llama", dict(r=4, lora_alpha=8, modules_to_save=["lm_head"])),
    "gpt2_conv1d": ("gpt2", dict(r=8, lora_alpha=8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_nested_equals_peft_at_r_max_and_every_prefix_is_best(tmp_path, case):
    arch, lora = CASES[case]
    src = make_peft(tmp_path, arch, **lora)
    reference = peft_model(tmp_path, src, arch)
    updates = peft_updates(reference)
    result = nest_adapter(src, base_dir(tmp_path, arch), tmp_path / "nested")
    R = lora["r"]
    assert result.report.r_max == R and result.report.max_relative_error < 1e-6
    saved = read_adapter(result.path)
    cfg = saved.config
    assert (cfg.r_max, cfg.scaling, cfg.rank_scale, cfg.mode) == (R, "none", "rank", "rowwise")
    assert sorted(saved.layers) == sorted(updates)
    assert saved.metadata["nested_from"]["r"] == R

    model = ours(tmp_path, result.path, arch)
    base_logits = logits(load_base(base_dir(tmp_path, arch)))
    want = logits(reference)
    assert (want - base_logits).abs().max() > 1e-2  # the adapter matters, so the equality is a real check
    torch.testing.assert_close(logits(model, R), want, rtol=1e-5, atol=1e-5)

    # each prefix: the best rank-k approximation of PEFT's update (Eckart–Young, float64 SVD)
    for name, layer in adapted_layers(model).items():
        W = updates[name]
        assert W.shape == (layer.out_features, layer.in_features)  # PEFT's orientation, Conv1D included
        sigma = torch.linalg.svdvals(W)
        for k in range(1, R + 1):
            # scaling 'none', rule 'rank': every rank is served with α
            Wk = cfg.alpha * layer.lora_B[:, :k].detach().double() @ layer.lora_A[:k].detach().double()
            assert float((Wk - best_rank_k(W, k)).norm()) <= 2e-6 * float(W.norm()), (name, k)
            tail = float(sigma[k:].pow(2).sum().sqrt())
            assert float((W - Wk).norm()) == pytest.approx(tail, abs=2e-6 * float(W.norm()))

    # a rank exported back to PEFT loads in PEFT and equals ours at that rank
    for k in (1, R // 2):
        exported = export_peft(result.path, tmp_path / f"rank{k}", rank=k)
        assert json.loads((exported / "adapter_config.json").read_text())["r"] == k
        torch.testing.assert_close(logits(peft_model(tmp_path, exported, arch)), logits(model, k),
                                   rtol=1e-5, atol=1e-5)
    if lora.get("modules_to_save"):
        torch.testing.assert_close(model.lm_head.weight, reference.base_model.model.lm_head.modules_to_save["default"]
                                   .weight)


def test_merge_writes_the_base_plus_the_best_rank_k_update(tmp_path):
    from lightning_matlora import merge_to_base

    src = make_peft(tmp_path, r=8, lora_alpha=16)
    updates = peft_updates(peft_model(tmp_path, src))
    nested = nest_adapter(src, base_dir(tmp_path), tmp_path / "nested").path
    merged = load_base(merge_to_base(nested, tmp_path / "merged", rank=3, base=base_dir(tmp_path)))
    base = dict(load_base(base_dir(tmp_path)).named_modules())
    for name, W in updates.items():
        delta = merged.get_submodule(name).weight.detach().double() - base[name].weight.detach().double()
        assert float((delta - best_rank_k(W, 3)).norm()) <= 2e-6 * float(W.norm()) + 1e-6, name


def test_bfloat16_peft_factors_are_nested_into_float32(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_peft(tmp_path, r=4, lora_alpha=8)
    weights = src / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    result = nest_adapter(src, base_dir(tmp_path), tmp_path / "nested")
    saved = read_adapter(result.path)
    assert saved.config.adapter_dtype == "float32" and result.report.max_relative_error < 1e-6
    for name in saved.layers:
        A, B = saved.factors(name)
        assert A.dtype == B.dtype == torch.float32
        W = 2.0 * tensors[f"base_model.model.{name}.lora_B.weight"].double() @ \
            tensors[f"base_model.model.{name}.lora_A.weight"].double()
        assert float((saved.config.alpha * B.double() @ A.double() - W).norm()) <= 1e-6 * float(W.norm())


def test_pattern_layers_are_padded_with_zero_components(tmp_path):
    src = make_peft(tmp_path, r=8, lora_alpha=8, rank_pattern={"v_proj": 2})
    result = nest_adapter(src, base_dir(tmp_path), tmp_path / "nested")
    saved = read_adapter(result.path)
    for name in saved.layers:
        A, B = saved.factors(name)
        assert A.shape[0] == 8 and B.shape[1] == 8
        if name.endswith("v_proj"):
            assert torch.count_nonzero(B[:, 2:]) == 0 and torch.count_nonzero(B[:, :2]) > 0
            assert float(result.report.singular_values[name][2:].abs().max()) < 1e-9


def test_eval_data_measures_and_stores_both_curves(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Encode abc", "answer": "#### xyz"}, {"text": "a b c d e f"},
        {"prompt": "say ", "completion": "hello"}]))
    from pathlib import Path

    bundled = Path(__file__).resolve().parents[1] / "recipes" / "assets" / "base"
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(bundled))
    targets = ["q_proj", "v_proj"]
    pm = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=4, target_modules=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(tmp_path / "peft"))
    result = nest_adapter(tmp_path / "peft", bundled, tmp_path / "nested", eval_data=rows)
    assert list(result.curve) == [1, 2, 4] and list(result.unnested_curve) == [1, 2, 4]
    assert result.curve[4] == pytest.approx(result.unnested_curve[4], rel=1e-5)  # r_max unchanged by nesting
    saved = read_adapter(result.path)
    (stored,) = saved.curves
    assert stored.metric == "loss" and not stored.higher_is_better and list(stored.ranks) == [1, 2, 4]
    assert list(stored.scores) == pytest.approx([result.curve[k] for k in (1, 2, 4)])
    assert stored.aurac() > 0 and saved.metadata["eval_data"]["rows"] == 3
    assert saved.metadata["unnested_loss"]["scores"] == pytest.approx([result.unnested_curve[k] for k in (1, 2, 4)])
    # the reference: PEFT's own model on the same rows gives the rank-4 loss
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(bundled)), str(tmp_path / "peft"))
        from lightning_matlora.text_loss import encode_rows, rank_losses, read_rows
        from transformers import AutoTokenizer

        enc = encode_rows(read_rows(rows), AutoTokenizer.from_pretrained(str(bundled)))
        total = count = 0.0
        for ids, labels in enc:
            out = ref(input_ids=torch.tensor([ids])).logits[0, :-1]
            lab = torch.tensor(labels[1:])
            total += float(torch.nn.functional.cross_entropy(out, lab, ignore_index=-100, reduction="sum"))
            count += int((lab != -100).sum())
    assert result.curve[4] == pytest.approx(total / count, rel=1e-5)


def test_eval_data_through_the_command_line(tmp_path, capsys):
    from pathlib import Path

    from lightning_matlora.cli import main
    from transformers import AutoModelForCausalLM

    bundled = Path(__file__).resolve().parents[1] / "recipes" / "assets" / "base"
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "Encode abc", "answer": "#### xyz"}) + "\n")
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(str(bundled)),
                             peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=2, target_modules=["q_proj"],
                                             init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "peft"))
    capsys.readouterr()
    assert main(["nest", str(tmp_path / "peft"), "--base", str(bundled), "--out", str(tmp_path / "n"), "--data",
                 str(rows), "--ranks", "1,2"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("rank  loss (nested)"):].splitlines()[1:3]
    assert [line.split()[0] for line in table] == ["1", "2"]
    assert float(table[1].split()[1]) == pytest.approx(float(table[1].split()[2]), rel=1e-5)  # r_max unchanged
    assert list(read_adapter(tmp_path / "n").curves[0].ranks) == [1, 2]


# ------------------------------------------------------------------------------------------------ refusals
def test_refuses_dora(tmp_path):
    src = make_peft(tmp_path, use_dora=True)
    with pytest.raises(NotNestable, match="DoRA"):
        nest_adapter(src, base_dir(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_other_peft_methods(tmp_path):
    model = peft.get_peft_model(load_base(base_dir(tmp_path)),
                                peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"],
                                               feedforward_modules=["down_proj"]))
    model.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(NotNestable, match="'IA3' adapter, not LoRA"):
        nest_adapter(tmp_path / "ia3", base_dir(tmp_path), tmp_path / "out")


def test_refuses_embedding_lora_and_biases(tmp_path):
    src = make_peft(tmp_path, name="emb", target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(NotNestable, match="embedding"):
        nest_adapter(src, base_dir(tmp_path), tmp_path / "out")
    src = make_peft(tmp_path, name="lbias", lora_bias=True)
    with pytest.raises(NotNestable, match="lora_bias"):
        nest_adapter(src, base_dir(tmp_path), tmp_path / "out")
    cfg_file = src / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(lora_bias=False, bias="all")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(NotNestable, match="bias='all'"):
        nest_adapter(src, base_dir(tmp_path), tmp_path / "out")


def test_refuses_wrong_base_missing_files_and_existing_output(tmp_path):
    src = make_peft(tmp_path)
    other = tmp_path / "other_base"
    tiny_llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2).save_pretrained(str(other))
    with pytest.raises(ValueError, match="Shape mismatch at layer"):
        nest_adapter(src, other, tmp_path / "out")
    with pytest.raises(ValueError, match="has no layer"):
        nest_adapter(src, tiny_gpt2(), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        nest_adapter(tmp_path, base_dir(tmp_path), tmp_path / "out")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        nest_adapter(src, base_dir(tmp_path), tmp_path / "exists")
    with pytest.raises(ValueError, match="holds the PEFT adapter"):
        nest_adapter(src, base_dir(tmp_path), src, overwrite=True)
    from safetensors.torch import load_file, save_file

    norm = make_peft(tmp_path, name="norm")  # factors pointed at a normalisation layer
    tensors = {k.replace("layers.0.self_attn.q_proj", "layers.0.input_layernorm"): v
               for k, v in load_file(str(norm / "adapter_model.safetensors")).items()}
    save_file(tensors, str(norm / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="is a LlamaRMSNorm; only LoRA on Linear"):
        nest_adapter(norm, base_dir(tmp_path), tmp_path / "out")
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["r"] = 4  # the file says 4, the tensors are rank 8
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="corrupted"):
        nest_adapter(src, base_dir(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_eval_data_fails_before_loading(tmp_path):
    src = make_peft(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "x"}) + "\n")
    with pytest.raises(ValueError, match="'text', 'question' and 'answer'"):
        nest_adapter(src, "/nonexistent/base", tmp_path / "out", eval_data=bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nest_adapter(src, "/nonexistent/base", tmp_path / "out", eval_data=tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------- command line
def error_lines(capsys) -> list[str]:
    """The lines of stderr the command itself wrote (transformers' progress bars left out)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("matlora")]


def test_cli_nest_then_info_and_export(tmp_path, capsys):
    from lightning_matlora.cli import main

    src = make_peft(tmp_path, r=4, lora_alpha=8)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "a b c d"}) + "\n")
    out = tmp_path / "nested"
    # the tiny base has no tokenizer: --data needs one, and the failure is one line, exit 2, nothing written
    assert main(["nest", str(src), "--base", str(base_dir(tmp_path)), "--out", str(out), "--data", str(rows)]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("matlora nest: error: Could not load a tokenizer")
    assert not out.exists()
    assert main(["nest", str(src), "--base", str(base_dir(tmp_path)), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Wrote the nested adapter (r_max=4) to {out}" in printed and "mean energy kept" in printed
    assert main(["info", str(out)]) == 0
    assert "scaling none   alpha 2" in capsys.readouterr().out
    assert main(["export", str(out), "--rank", "2", "--out", str(tmp_path / "k2")]) == 0
    assert json.loads((tmp_path / "k2" / "adapter_config.json").read_text())["r"] == 2
    assert main(["nest", str(src), "--base", str(base_dir(tmp_path)), "--out", str(out)]) == 2
    assert "already exists" in error_lines(capsys)[0]
    assert main(["nest", str(src), "--base", str(base_dir(tmp_path)), "--out", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize("extra,message", [
    (["--ranks", "1,x"], "--ranks must be comma-separated integers"),
    (["--ranks", "1,9"], "outside 1…r_max=8"),
])
def test_cli_nest_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, message):
    from lightning_matlora.cli import main

    src = make_peft(tmp_path)
    assert main(["nest", str(src), "--base", str(base_dir(tmp_path)), "--out", str(tmp_path / "o"), *extra]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_nest_refusals_exit_2_with_one_line(tmp_path, capsys):
    from lightning_matlora.cli import main

    dora = make_peft(tmp_path, name="dora", use_dora=True)
    capsys.readouterr()
    assert main(["nest", str(dora), "--base", str(base_dir(tmp_path)), "--out", str(tmp_path / "o")]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "DoRA" in err[0]
    assert main(["nest", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "adapter_config.json" in error_lines(capsys)[0]
    assert not (tmp_path / "o").exists()


def test_every_refused_config_option_is_named(tmp_path):
    from lightning_matlora.peft_lora import _REFUSED

    src = make_peft(tmp_path)
    cfg_file = src / "adapter_config.json"
    original = json.loads(cfg_file.read_text())
    for field in _REFUSED:
        cfg_file.write_text(json.dumps({**original, field: [1] if field != "use_dora" else True}))
        with pytest.raises(NotNestable, match=f"Found {field}="):
            nest_adapter(src, "/nonexistent/base", tmp_path / "out")  # refused before any model is loaded
    cfg_file.write_text(json.dumps({**original, "peft_type": "LOKR"}))
    with pytest.raises(NotNestable, match="'LOKR' adapter, not LoRA"):
        nest_adapter(src, "/nonexistent/base", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_nest_num_threads_sets_torchs_threads_and_is_checked(tmp_path, capsys):
    """`matlora nest --num-threads N` runs torch with N threads (a busy machine's fix); N < 1 is one line, exit 2."""
    from lightning_matlora.cli import main

    src = make_peft(tmp_path, r=4, lora_alpha=8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["nest", str(src), "--base", str(base_dir(tmp_path)), "--out", str(tmp_path / "n"),
                     "--num-threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["nest", str(src), "--base", str(base_dir(tmp_path)), "--out", str(tmp_path / "o"),
                 "--num-threads", "0"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "--num-threads must be ≥ 1" in err[-1]
    assert not (tmp_path / "o").exists()
