"""The callback writes the deployable adapter at the end of fit (and the best one by a monitored metric)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import tiny_llama
from lightning_matlora import MatryoshkaLoRA, at_rank, load_adapter, read_adapter
from test_adapter_io import X, logits


class LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama()

    def training_step(self, batch, batch_idx):
        return self.model(batch, labels=batch).loss

    def validation_step(self, batch, batch_idx):
        # the "validation score" of successive validations (steps 2, 4, 6): best at step 4
        self.log("val_score", {2: 0.5, 4: 0.75, 6: 0.1}.get(self.trainer.global_step, 0.0))
        return self.model(batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class CurveSource(pl.Callback):
    """Stands in for a rank-curve evaluation: exposes the latest curve as ``last_curve``."""

    def on_validation_end(self, trainer, pl_module):
        self.last_curve = {1: 0.1 * trainer.global_step, 4: 0.2 * trainer.global_step}
        self.last_aurac = 0.15 * trainer.global_step


def data():
    g = torch.Generator().manual_seed(0)
    return DataLoader(torch.randint(0, 97, (8, 8), generator=g), batch_size=2)


def fit(tmp_path, cb, *extra, steps=6):
    trainer = pl.Trainer(max_steps=steps, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[cb, *extra], accelerator="cpu")
    module = LM()
    trainer.fit(module, data(), data())
    return module


def test_fit_saves_final_adapter_with_rank_curve_and_best_by_aurac(tmp_path):
    cb = MatryoshkaLoRA(r_max=4, verbose=False, save_best=True)  # monitors val/aurac_loss, minimised
    module = fit(tmp_path, cb, steps=4)
    final = tmp_path / "checkpoints" / "matlora_adapter"
    saved = read_adapter(final)
    curve = cb.last_curves[0]
    assert saved.rank_curve == {"metric": "val/loss", "ranks": [1, 2, 4], "scores": list(curve.scores)}
    assert saved.aurac == curve.aurac()
    best_area = min(curves[0].aurac() for _, curves in cb.rank_eval.history)
    best = read_adapter(tmp_path / "checkpoints" / "matlora_adapter_best")
    assert cb.best_score == pytest.approx(best_area, rel=1e-6) and best.aurac == pytest.approx(best_area, rel=1e-6)
    assert best.metadata["monitor"] == "val/aurac_loss"
    assert best.metadata["monitor_value"] == pytest.approx(best_area, rel=1e-6)
    fresh = load_adapter(tiny_llama(), final)
    with torch.no_grad(), at_rank(module.model, 2):
        torch.testing.assert_close(logits(fresh, 2), module.model(X).logits, rtol=0, atol=0)


def test_fit_saves_final_and_best_adapter_by_any_metric(tmp_path):
    cb = MatryoshkaLoRA(r_max=4, verbose=False, save_best="val_score", rank_eval=None)  # maximised
    module = fit(tmp_path, cb, CurveSource(), steps=6)
    final = tmp_path / "checkpoints" / "matlora_adapter"  # next to the Lightning checkpoints
    assert cb.adapter_path == str(final)
    saved = read_adapter(final)
    assert sorted(saved.metadata) == ["epoch", "global_step"] and saved.metadata["global_step"] == 6
    assert saved.rank_curve == {"metric": "score", "ranks": [1, 4], "scores": [0.6000000000000001, 1.2000000000000002]}
    assert saved.aurac == 0.15 * 6
    fresh = load_adapter(tiny_llama(), final)
    for k in (1, 3, 4):
        with torch.no_grad(), at_rank(module.model, k):
            ref = module.model(X).logits
        torch.testing.assert_close(logits(fresh, k), ref, rtol=0, atol=0)
    # the best validation was the second one (0.75, at step 4)
    best = read_adapter(tmp_path / "checkpoints" / "matlora_adapter_best")
    assert cb.best_score == 0.75 and best.metadata["global_step"] == 4
    assert best.metadata["monitor"] == "val_score" and best.metadata["monitor_value"] == 0.75
    assert not torch.equal(best.tensors["model.layers.0.self_attn.q_proj.lora_B"],
                           saved.tensors["model.layers.0.self_attn.q_proj.lora_B"])


def test_save_adapter_path_and_off(tmp_path):
    for setting, expected in ((str(tmp_path / "mine"), tmp_path / "mine"), (False, None)):
        cb = MatryoshkaLoRA(r_max=2, verbose=False, save_adapter=setting, rank_eval=None)
        trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path / "run", callbacks=[cb],
                             accelerator="cpu")
        trainer.fit(LM(), data())
        assert cb.adapter_path == (str(expected) if expected else None)
        if expected:
            assert read_adapter(expected).config.r_max == 2
    assert not (tmp_path / "run" / "matlora_adapter").exists()


def test_resumed_run_keeps_its_best_score():
    """The best score travels in the callback's checkpoint state, so a resumed run does not overwrite the best
    adapter with a worse one."""
    cb = MatryoshkaLoRA(r_max=2, verbose=False, save_best="val_score", rank_eval=None)
    cb.best_score = 0.75  # as after a validation that saved the best adapter
    state = cb.state_dict()
    resumed = MatryoshkaLoRA(r_max=2, verbose=False, save_best="val_score", rank_eval=None)
    resumed.load_state_dict(state)
    assert resumed.best_score == 0.75


def test_bad_save_settings_fail_at_construction():
    import pytest

    with pytest.raises(ValueError, match="save_adapter must be True"):
        MatryoshkaLoRA(r_max=2, save_adapter="")
    with pytest.raises(ValueError, match="save_adapter must be True"):
        MatryoshkaLoRA(r_max=2, save_adapter=3)
    with pytest.raises(ValueError, match="save_best_mode must be 'auto'"):
        MatryoshkaLoRA(r_max=2, save_best="val/acc", save_best_mode="bigger")
