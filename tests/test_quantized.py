"""Quantized (bitsandbytes 4-bit and 8-bit) base models: the forward, targeting, merge, a real fit and resume, save and
load across quantizations, PEFT export onto a 4-bit PeftModel, the summary and every error.

The bases are real: bitsandbytes layers quantized from float layers, and a tiny Llama saved with
``save_pretrained`` and reloaded with ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes",
                          reason="bitsandbytes is not importable: pip install 'lightning_matlora[quant]'")

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from conftest import tiny_llama  # noqa: E402
from dense_ref import p_vector, s  # noqa: E402
from lit_helpers import CausalLM, ListHandler, token_loader, trainer  # noqa: E402
from lightning_matlora import (MatLoRAConfig, MatryoshkaLinear, MatryoshkaLoRA,  # noqa: E402
                               adapted_layers, at_rank, begin_step, export_peft, load_adapter, merge,
                               merge_to_base, save_adapter, set_rank, unmerge)
from lightning_matlora.rank import RankController  # noqa: E402
from lightning_matlora.quantized import (base_memory, check_strategy_for_quantized, dequantize,  # noqa: E402
                                         quantization_config)

ROOT = Path(__file__).resolve().parents[1]
# 64-wide layers: bitsandbytes' 4-bit blocks hold 64 weights (narrower layers hit bitsandbytes' own CPU limits)
SIZES = dict(hidden_size=64, intermediate_size=128)
X = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(7))
QUANT = {  # name → BitsAndBytesConfig arguments
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-double-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    """A tiny float Llama written by save_pretrained (the unquantized base of every quantized one here)."""
    d = tmp_path_factory.mktemp("float_base")
    tiny_llama(**SIZES).save_pretrained(d)
    return d


def load(path, quant: str | None = None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant is None:
        return AutoModelForCausalLM.from_pretrained(path).eval()
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**QUANT[quant]),
                                                device_map="cpu").eval()


def randomize(model, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def quantized_layer(kind: str, d_in: int = 64, d_out: int = 96, bias: bool = True) -> tuple[nn.Module, nn.Linear]:
    """(a bitsandbytes layer quantized from a float layer, that float layer)."""
    torch.manual_seed(1)
    lin = nn.Linear(d_in, d_out, bias=bias)
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(d_in, d_out, bias=bias, has_fp16_weights=False, threshold=0.0)
    else:
        q = bnb.nn.Linear4bit(d_in, d_out, bias=bias, compute_dtype=torch.float32, quant_type=kind.split("-")[0],
                              compress_statistics=kind.endswith("double"))
    q.load_state_dict(lin.state_dict())
    return q.to("cpu"), lin


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("kind", ["nf4", "nf4-double", "fp4", "int8"])
@pytest.mark.parametrize("mode", ["matryoshka", "rowwise"])
def test_forward_is_bitsandbytes_base_plus_the_exact_adapter(kind, mode):
    q, lin = quantized_layer(kind)
    model = nn.Sequential(q)
    cb = MatryoshkaLoRA(r_max=8, mode=mode, verbose=False)
    cb.apply(model)
    layer = adapted_layers(model)["0"]
    assert layer.base_layer is q and (layer.in_features, layer.out_features) == (64, 96)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    x = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(3))
    model.train()
    with torch.no_grad():  # B = 0: the adapted layer is exactly bitsandbytes' layer
        assert torch.equal(model(x), q(x))
    randomize(model)
    A = layer.lora_A.detach().double().T  # spec orientation, float64
    B = layer.lora_B.detach().double().T
    xd = x.double()
    p = p_vector(cb.config.ranks, 8, "sqrt")
    with torch.no_grad():
        base = q(x).double()
        # the base part: bitsandbytes computes with the dequantized weight
        W = dequantize(q).double()
        tol = 1e-4 if kind != "int8" else 2e-2  # LLM.int8 also quantizes the activations
        torch.testing.assert_close(base, xd @ W.T + lin.bias.double(), rtol=0, atol=tol)
        assert (W - lin.weight.double()).abs().max() < 0.1  # the dequantized weight is the float one, to 4/8-bit error
        for k in (1, 3, 8):
            set_rank(model, k)
            want = base + s(k, "sqrt") * (xd @ A[:, :k]) @ B[:k, :]
            torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-5)
        ranks = torch.tensor([1, 8, 2, 5])
        set_rank(model, ranks)
        got = model(x).double()
        for i, k in enumerate(ranks.tolist()):
            want = base[i] + s(k, "sqrt") * (xd[i] @ A[:, :k]) @ B[:k, :]
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
        set_rank(model, None)
        if mode == "matryoshka":
            torch.testing.assert_close(model(x).double(), base + ((xd @ A) * p) @ B, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "dylora", "rowwise"])
def test_training_forward_of_every_mode_on_a_4bit_base(mode):
    from lightning_matlora import begin_step

    q, _ = quantized_layer("nf4-double")
    model = nn.Sequential(q)
    cb = MatryoshkaLoRA(r_max=8, mode=mode, verbose=False, seed=2)
    cb.apply(model)
    randomize(model)
    layer = adapted_layers(model)["0"]
    A, B = layer.lora_A.detach().double().T, layer.lora_B.detach().double().T
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
    model.train()
    with torch.no_grad():
        base = q(x).double()
        for step in range(3):
            begin_step(model, step)
            if mode == "lora":
                want = base + s(8, "sqrt") * (x.double() @ A) @ B
            elif mode == "dylora":
                b = cb.controller.step_rank
                want = base + s(b, "sqrt") * (x.double() @ A[:, :b]) @ B[:b, :]
            else:
                rows = cb.controller.rowwise_ranks(6).tolist()
                want = torch.stack([base[i] + s(k, "sqrt") * (x[i].double() @ A[:, :k]) @ B[:k, :]
                                    for i, k in enumerate(rows)])
            torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_the_quantized_base_after_an_eval_forward(float_dir):
    """bitsandbytes repacks 4-bit weights for a faster CPU kernel at an eval no-grad forward, a kernel without
    backward: the adapted layers must train the same after validation as before it."""
    model = load(float_dir, "nf4")
    MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    randomize(model)

    def grads():
        model.train()
        model.zero_grad()
        begin_step(model, 0)  # the same rowwise draw both times (without it each training forward draws anew)
        model(input_ids=X, labels=X).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=X)
    after = grads()
    first = "model.layers.0.self_attn.q_proj.lora_A"  # its gradient flows back through every quantized layer above
    assert before[first].abs().sum() > 0
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------- targeting
@pytest.mark.parametrize("quant, factor_dtype, kind", [
    ("nf4", torch.float32, "4-bit NF4"), ("nf4-double-bf16", torch.bfloat16, "4-bit NF4 (double quantization)"),
    ("fp4", torch.float32, "4-bit FP4"), ("int8", torch.float32, "8-bit (LLM.int8)")])
def test_all_linear_targets_quantized_layers_and_summary_reports_the_base(float_dir, quant, factor_dtype, kind):
    model = load(float_dir, quant)
    log = ListHandler()
    import logging

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(log)
    try:
        names = MatryoshkaLoRA(r_max=4).apply(model)
    finally:
        logger.removeHandler(log)
    assert len(names) == 14 and "lm_head" not in names
    wanted = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    for layer in adapted_layers(model).values():
        assert type(layer.base_layer) is wanted
        assert layer.lora_A.dtype == factor_dtype and layer.lora_B.dtype == factor_dtype  # never an int dtype
        assert not layer.base_layer.weight.requires_grad
    assert adapted_layers(model)["model.layers.0.self_attn.k_proj"].out_features == 32
    summary = "\n".join(log.messages)
    assert f"base quantized: {kind} ×14" in summary and "frozen base takes" in summary
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=X).logits).all()
    # adapter_dtype chooses the factors' dtype on a quantized base as on a float one
    other = load(float_dir, quant)
    MatryoshkaLoRA(r_max=4, adapter_dtype="float64", verbose=False).apply(other)
    assert all(m.lora_A.dtype == torch.float64 for m in adapted_layers(other).values())


def test_base_memory_counts_codes_scales_and_float_weights(float_dir):
    model = load(float_dir, "nf4")
    MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    mem = base_memory(model)
    layers = adapted_layers(model).values()
    codes = sum(m.in_features * m.out_features // 2 for m in layers)  # two 4-bit codes per byte
    blocks = sum(m.in_features * m.out_features // 64 for m in layers)  # one float32 scale per 64 weights
    assert mem.quantized_layers == 14 and mem.bits == (4,)
    assert mem.quantized_bytes == codes + 4 * blocks + 14 * 16 * 4  # + each layer's 16-entry float32 code book
    float_base = load(float_dir)
    unquantized = {n for n, m in float_base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    other = sum(p.numel() * 4 for n, p in float_base.named_parameters() if n.rsplit(".", 1)[0] not in unquantized)
    other += sum(b.numel() * b.element_size() for b in float_base.buffers())
    assert mem.other_bytes == other
    assert base_memory(float_base) is None


# -------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("quant", ["nf4-double-bf16", "int8"])
def test_merge_requantizes_with_a_warning_and_unmerge_is_refused(float_dir, quant):
    model = load(float_dir, quant)
    MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    randomize(model, std=0.05)
    layers = adapted_layers(model)
    with torch.no_grad():
        with at_rank(model, 2):
            unmerged = model(input_ids=X).logits.float()
        for m in layers.values():
            m.merged_rank = -1  # the base alone (a merged layer's forward skips the adapter)
        plain = model(input_ids=X).logits.float()
        for m in layers.values():
            m.merged_rank = None
        expected = {n: dequantize(m.base_layer) + m.delta_weight(2) for n, m in layers.items()}
    with pytest.warns(UserWarning, match="re-quantizes them: the merged model carries quantization error"):
        merge(model, 2)
    assert all(m.merged_rank == 2 for m in layers.values())
    # the merged weight is bitsandbytes' own quantization of (dequantized base + rank-2 delta)
    for name, want in expected.items():
        if quant == "int8":
            codes, scales, _ = bnb.functional.int8_vectorwise_quant(want.half())
            again = bnb.functional.int8_vectorwise_dequant(codes, scales)
        else:
            w4, state = bnb.functional.quantize_4bit(want, blocksize=64, compress_statistics=True, quant_type="nf4")
            again = bnb.functional.dequantize_4bit(w4, state)
        assert torch.equal(dequantize(layers[name].base_layer), again.float()), name
    with torch.no_grad():
        merged = model(input_ids=X).logits
    err = (merged.float() - unmerged).abs().max().item()
    change = (unmerged - plain).abs().max().item()
    assert 0 < err < change  # the merge moved towards the adapter, up to the re-quantization error (not exact)
    before = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    with pytest.raises(RuntimeError, match="cannot|Cannot unmerge.*Reload the base model"):
        unmerge(model)
    assert all(torch.equal(m.base_layer.weight, before[n]) and m.merged_rank == 2 for n, m in layers.items())
    with pytest.raises(RuntimeError, match="merged"):
        set_rank(model, 1)


def test_merge_to_base_from_a_quantized_run_writes_a_plain_float_model(float_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load(float_dir, "nf4")
    MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    randomize(model)
    with pytest.raises(ValueError, match="base is quantized.*pass base= the unquantized base"):
        merge_to_base(model, tmp_path / "m", 2)
    merge_to_base(model, tmp_path / "m", 2, base=str(float_dir))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert not any("Linear4bit" in type(m).__name__ for m in plain.modules())
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    # equal to the float base with the same adapter at rank 2
    ref = load_adapter(load(float_dir), save_adapter(model, tmp_path / "ad"))
    with torch.no_grad(), at_rank(ref, 2):
        torch.testing.assert_close(plain(input_ids=X).logits, ref(input_ids=X).logits, rtol=1e-5, atol=1e-5)
    # from the saved adapter, the base recorded in it (the float directory) is loaded unquantized
    merge_to_base(tmp_path / "ad", tmp_path / "m2", 2)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m2").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=X).logits, plain(input_ids=X).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="base is quantized.*pass the unquantized base"):
        merge_to_base(tmp_path / "ad", tmp_path / "m3", 2, base=load(float_dir, "nf4"))


# ------------------------------------------------------------------------------------- save, load, export
def test_adapter_from_a_4bit_base_loads_into_float_and_4bit_bases(float_dir, tmp_path):
    model = load(float_dir, "nf4")
    MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    randomize(model)
    path = save_adapter(model, tmp_path / "ad")
    four = load_adapter(load(float_dir, "nf4"), path)
    plain = load_adapter(load(float_dir), path)
    for name, layer in adapted_layers(model).items():
        for other in (four, plain):
            theirs = adapted_layers(other)[name]
            assert torch.equal(theirs.lora_A, layer.lora_A) and torch.equal(theirs.lora_B, layer.lora_B)
    assert all(type(m.base_layer) is nn.Linear for m in adapted_layers(plain).values())
    with torch.no_grad():  # the float base differs from its 4-bit quantization by the quantization error only:
        for name, layer in adapted_layers(plain).items():  # with the dequantized weights it is the same model
            layer.base_layer.weight.copy_(dequantize(adapted_layers(model)[name].base_layer))
        for k in (1, 4):
            with at_rank(model, k), at_rank(four, k), at_rank(plain, k):
                ours = model(input_ids=X).logits
                assert torch.equal(four(input_ids=X).logits, ours)  # same codes, same factors: the same model
                torch.testing.assert_close(plain(input_ids=X).logits, ours, rtol=1e-4, atol=1e-4)


def test_peft_export_loads_into_a_4bit_peft_model(float_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    model = load(float_dir, "nf4")
    MatryoshkaLoRA(r_max=8, verbose=False).apply(model)
    randomize(model)
    for k in (2, 8):
        out = export_peft(model, tmp_path / f"r{k}", k)
        pm = peft.PeftModel.from_pretrained(load(float_dir, "nf4"), str(out)).eval()
        layers = [m for m in pm.modules() if isinstance(m, PeftLinear4bit)]
        assert len(layers) == 14
        for m in layers:  # compare the same base computation: no CPU repacking in PEFT's layers either
            m.base_layer.support_avx512bf16_for_cpu = False
        with torch.no_grad(), at_rank(model, k):
            torch.testing.assert_close(pm(input_ids=X).logits, model(input_ids=X).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- fit and resume
def _adapter_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


class ValidatedLM(CausalLM):
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss


def test_trainer_fit_and_resume_on_a_4bit_llama(float_dir, tmp_path):
    def run(max_epochs, ckpt_path=None, ckpt_dir=None):
        L.seed_everything(0, verbose=False)
        module = ValidatedLM(load(float_dir, "nf4").train(), lr=5e-3)
        cb = MatryoshkaLoRA(r_max=4, seed=3, verbose=False)
        callbacks = [cb] + ([ModelCheckpoint(dirpath=ckpt_dir)] if ckpt_dir else [])
        t = trainer(callbacks, max_epochs=max_epochs, max_steps=-1, enable_checkpointing=bool(ckpt_dir),
                    limit_val_batches=1, check_val_every_n_epoch=1)
        data = token_loader(n=8, batch_size=4)
        t.fit(module, data, data, ckpt_path=ckpt_path)  # 2 steps per epoch, a validation after each epoch
        return module, t

    codes = {n: m.weight.detach().clone() for n, m in load(float_dir, "nf4").named_modules()
             if isinstance(m, bnb.nn.Linear4bit)}
    full, t_full = run(2)
    assert t_full.global_step == 4 and t_full.callback_metrics["val/aurac_loss"].isfinite()
    state = _adapter_state(full)
    assert len(state) == 28
    assert all(v.abs().sum() > 0 for n, v in state.items() if n.endswith("lora_B"))  # every layer trained
    for n, m in full.model.named_modules():  # the frozen base's 4-bit codes are untouched
        if isinstance(m, bnb.nn.Linear4bit):
            assert torch.equal(m.weight, codes[n.replace(".base_layer", "")])
    run(1, ckpt_dir=tmp_path)
    (ckpt,) = list(tmp_path.glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert saved and all(k.endswith((".lora_A", ".lora_B")) for k in saved)  # only the adapter: no codes, no scales
    resumed, t_res = run(2, ckpt_path=ckpt)
    assert t_res.global_step == 4
    got = _adapter_state(resumed)
    for n in state:
        torch.testing.assert_close(got[n], state[n], rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------- errors
def test_strategies_that_shard_a_quantized_base_are_refused_naming_ddp(float_dir):
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    model = load(float_dir, "nf4")
    for strategy, name in [(FSDPStrategy(), "FSDP"), (ModelParallelStrategy(), "FSDP2"),
                           (DeepSpeedStrategy(stage=3), "DeepSpeed ZeRO-3")]:
        with pytest.raises(ValueError, match=re.escape(name) + r".*cannot shard.*strategy='ddp'"):
            check_strategy_for_quantized(strategy, model)
    check_strategy_for_quantized(DDPStrategy(), model)
    check_strategy_for_quantized(DeepSpeedStrategy(stage=2), model)
    check_strategy_for_quantized(FSDPStrategy(), load(float_dir))  # an unquantized base shards as before
    # the callback's setup refuses before anything is adapted (FSDP needs a GPU in Lightning; ZeRO-3 builds on CPU)
    module = CausalLM(model)
    cb = MatryoshkaLoRA(r_max=4)
    t = trainer([cb], strategy=DeepSpeedStrategy(stage=3), max_steps=1)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3 cannot shard bitsandbytes' quantized weights"):
        cb.setup(t, module, "fit")
    assert not adapted_layers(module)


def test_integer_adapter_dtypes_are_refused():
    for dtype in ("int8", torch.int8, torch.uint8, "nf4"):
        with pytest.raises(ValueError, match="never quantized"):
            MatryoshkaLoRA(adapter_dtype=dtype)
    q, _ = quantized_layer("nf4")
    with pytest.raises(ValueError, match="not a floating dtype"):
        MatryoshkaLinear(q, RankController(MatLoRAConfig(r_max=4)), adapter_dtype=torch.int8)


def test_quantization_config_choices():
    cfg = quantization_config("fp4", compute_dtype=torch.bfloat16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "fp4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("int8").load_in_8bit and quantization_config(None) is None
    with pytest.raises(ValueError, match=r"quantize='q4' is not one of \('nf4', 'fp4', 'int8'\)"):
        quantization_config("q4")


MISSING = r"""
import sys
sys.modules["bitsandbytes"] = None  # bitsandbytes not installed: `import bitsandbytes` raises ImportError
sys.path.insert(0, "recipes")
import torch
from lightning_matlora import MatryoshkaLoRA
from lightning_matlora.quantized import quantization_config
model = torch.nn.Sequential(torch.nn.Linear(8, 8))
MatryoshkaLoRA(r_max=2, verbose=False).apply(model)  # an unquantized base never needs bitsandbytes
for call in (lambda: quantization_config("nf4"),
             lambda: __import__("instruct_module").InstructLM(quantize="nf4")):
    try:
        call()
    except ImportError as e:
        print("ERROR:", e)
"""


def test_missing_bitsandbytes_names_the_extra():
    proc = subprocess.run([sys.executable, "-c", MISSING], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 2
    for e in errors:
        assert "need bitsandbytes" in e and "pip install 'lightning_matlora[quant]'" in e


# ------------------------------------------------------------------------------------------------- recipe
@pytest.mark.parametrize("quant, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_recipe_loads_the_base_quantized(quant, layer):
    sys.path.insert(0, str(ROOT / "recipes"))
    import instruct_module

    module = instruct_module.InstructLM(quantize=quant)
    types = {type(m).__name__ for m in module.model.modules()}
    assert layer in types and "Linear" in types  # the output head stays unquantized
    assert module.hparams.quantize == quant


@pytest.mark.slow
def test_recipe_cli_fits_on_a_4bit_base(tmp_path):
    import os

    callback = ('--trainer.callbacks=[{"class_path": "lightning_matlora.MatryoshkaLoRA", "init_args": {"r_max": 4, '
                '"ranks": [1, 2, 4]}}]')
    cmd = [sys.executable, str(ROOT / "recipes" / "instruct.py"), "fit", "--model.quantize", "nf4",
           "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
           "--trainer.check_val_every_n_epoch", "1",
           "--data.max_train_examples", "64", "--data.max_val_examples", "16", "--model.num_generate", "0",
           "--trainer.enable_progress_bar", "false", callback]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "base quantized: 4-bit NF4 (double quantization) ×21" in out and "MatryoshkaLoRA rank curves (epoch" in out
    adapter = Path(out.split("Adapter saved to ")[1].split()[0])
    from lightning_matlora import read_adapter

    assert len(read_adapter(adapter).layers) == 21


@pytest.mark.slow
def test_ddp_on_a_4bit_base_equals_one_process(float_dir, tmp_path):
    """DDP (what works with a quantized base) on two CPU processes trains the same adapter as one process on the
    same global batches, identical on both processes."""
    import socket

    import quant_ddp_worker as W

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--master-addr=127.0.0.1", f"--master-port={port}",
           "--nnodes=1", "--nproc-per-node=2", str(ROOT / "tests" / "quant_ddp_worker.py"), str(float_dir),
           str(tmp_path)]
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    ranks = [tmp_path / f"rank{r}.pt" for r in range(2)]
    assert all(r.exists() for r in ranks), proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(r, weights_only=False) for r in ranks)
    single = W.run(str(float_dir), devices=1)
    assert set(r0["adapter"]) == set(single) and len(single) == 28
    for k, v in single.items():
        assert torch.equal(r0["adapter"][k], r1["adapter"][k]), k
        torch.testing.assert_close(r0["adapter"][k], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert any(v.abs().max() > 0 for k, v in single.items() if k.endswith("lora_B"))


def test_nest_by_svd_on_a_4bit_base_keeps_the_full_rank_model(float_dir):
    from lightning_matlora import nest_by_svd

    model = load(float_dir, "nf4")
    MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    randomize(model)
    with torch.no_grad(), at_rank(model, 4):
        before = model(input_ids=X).logits
    nest_by_svd(model)  # only the factors change: the quantized base is not touched
    with torch.no_grad(), at_rank(model, 4):
        torch.testing.assert_close(model(input_ids=X).logits, before, rtol=1e-5, atol=1e-5)
