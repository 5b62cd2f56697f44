"""The callback writes the deployable adapter at the end of fit (and the best one by a monitored metric)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import tiny_llama
from lightning_matlora import AdapterCheckpoint, MatryoshkaLoRA, at_rank, load_adapter, read_adapter
from lightning_matlora.curve import RankCurve
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
    """Stands in for a rank-curve evaluation: exposes the latest curves as ``last_curves``."""

    def on_validation_end(self, trainer, pl_module):
        self.last_curves = [RankCurve.from_mapping({1: 0.1 * trainer.global_step, 4: 0.2 * trainer.global_step})]


def data():
    g = torch.Generator().manual_seed(0)
    return DataLoader(torch.randint(0, 97, (8, 8), generator=g), batch_size=2)


def fit(tmp_path, cb, *extra, steps=6, logger=False, **kw):
    trainer = pl.Trainer(max_steps=steps, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=logger, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[cb, *extra], accelerator="cpu", **kw)
    module = LM()
    trainer.fit(module, data(), data())
    return module


def test_fit_saves_final_adapter_with_rank_curve_and_best_by_aurac(tmp_path):
    cb = MatryoshkaLoRA(r_max=4, verbose=False, save_best=True)  # monitors val/aurac_loss, minimised
    module = fit(tmp_path, cb, steps=4)
    final = tmp_path / "matlora_adapter" / "version_0"  # no logger: a versioned directory of its own
    assert cb.adapter_path == str(final)
    saved = read_adapter(final)
    curve = cb.last_curves[0]
    assert saved.curves == [curve] and curve.metric == "loss" and curve.ranks == (1, 2, 4)
    best_area = min(curves[0].aurac() for _, curves in cb.rank_eval.history)
    best = read_adapter(tmp_path / "matlora_adapter" / "version_0_best")
    assert cb.best_score == pytest.approx(best_area, rel=1e-6)
    assert best.curves[0].aurac() == pytest.approx(best_area, rel=1e-6)
    assert best.metadata["monitor"] == "val/aurac_loss"
    assert best.metadata["monitor_value"] == pytest.approx(best_area, rel=1e-6)
    fresh = load_adapter(tiny_llama(), final)
    with torch.no_grad(), at_rank(module.model, 2):
        torch.testing.assert_close(logits(fresh, 2), module.model(X).logits, rtol=0, atol=0)


def test_fit_saves_final_and_best_adapter_by_any_metric(tmp_path):
    cb = MatryoshkaLoRA(r_max=4, verbose=False, save_best="val_score", rank_eval=None)  # maximised
    module = fit(tmp_path, cb, CurveSource(), steps=6)
    final = tmp_path / "matlora_adapter" / "version_0"
    assert cb.adapter_path == str(final)
    saved = read_adapter(final)
    assert sorted(saved.metadata) == ["epoch", "global_step"] and saved.metadata["global_step"] == 6
    assert saved.curves == [RankCurve((1, 4), (0.6000000000000001, 1.2000000000000002), "score")]
    assert saved.curves[0].aurac() == pytest.approx(0.15 * 6)
    fresh = load_adapter(tiny_llama(), final)
    for k in (1, 3, 4):
        with torch.no_grad(), at_rank(module.model, k):
            ref = module.model(X).logits
        torch.testing.assert_close(logits(fresh, k), ref, rtol=0, atol=0)
    # the best validation was the second one (0.75, at step 4)
    best = read_adapter(tmp_path / "matlora_adapter" / "version_0_best")
    assert cb.best_score == 0.75 and best.metadata["global_step"] == 4
    assert best.metadata["monitor"] == "val_score" and best.metadata["monitor_value"] == 0.75
    assert not torch.equal(best.tensors["model.layers.0.self_attn.q_proj.lora_B"],
                           saved.tensors["model.layers.0.self_attn.q_proj.lora_B"])


def test_saved_epoch_is_the_index_the_tables_and_checkpoints_use(tmp_path):
    """Two whole epochs: the tables say "epoch 1" for the last one, and so must the adapter (and matlora info)."""
    from lightning_matlora.cli import format_info

    cb = MatryoshkaLoRA(r_max=4, verbose=False)
    trainer = pl.Trainer(max_epochs=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[cb], accelerator="cpu")
    trainer.fit(LM(), data(), data())
    assert trainer.current_epoch == 2  # Lightning has moved on past the last epoch
    assert cb.rank_eval.history[-1][0] == 1  # the callback's table: "epoch 1"
    saved = read_adapter(cb.adapter_path)
    assert saved.metadata["epoch"] == 1
    assert "epoch=1," in format_info(cb.adapter_path)


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


def test_resumed_run_keeps_its_best_score_and_directory(tmp_path):
    """The best score and the run's adapter directory travel in the callback's checkpoint state, so a resumed run
    neither overwrites the best adapter with a worse one nor starts a new version directory."""
    cb = MatryoshkaLoRA(r_max=2, verbose=False, save_best="val_score", rank_eval=None)
    fit(tmp_path, cb, steps=4)
    assert cb.best_score == 0.75
    resumed = MatryoshkaLoRA(r_max=2, verbose=False, save_best="val_score", rank_eval=None)
    resumed.load_state_dict(cb.state_dict())
    assert resumed.best_score == 0.75 and resumed.best_adapter_path == cb.best_adapter_path
    fit(tmp_path, resumed, steps=6)  # the same run going on: it re-saves its own adapters in place
    assert resumed.adapter_path == cb.adapter_path == str(tmp_path / "matlora_adapter" / "version_0")
    assert resumed.best_score == 0.75 and read_adapter(resumed.best_adapter_path).metadata["global_step"] == 4
    assert sorted(p.name for p in (tmp_path / "matlora_adapter").iterdir()) == ["version_0", "version_0_best"]


def test_bad_save_settings_fail_at_construction():
    with pytest.raises(ValueError, match="save_adapter must be True"):
        MatryoshkaLoRA(r_max=2, save_adapter="")
    with pytest.raises(ValueError, match="save_adapter must be True"):
        MatryoshkaLoRA(r_max=2, save_adapter=3)
    with pytest.raises(ValueError, match="save_best_mode must be 'auto'"):
        MatryoshkaLoRA(r_max=2, save_best="val/acc", save_best_mode="bigger")


# ------------------------------------------------------------------------------- runs never overwrite each other
def test_two_runs_without_logger_get_their_own_versions(tmp_path):
    first = MatryoshkaLoRA(r_max=4, verbose=False, rank_eval=None)
    fit(tmp_path, first, steps=2)
    second = MatryoshkaLoRA(r_max=2, verbose=False, rank_eval=None)  # another run, another r_max, same directory
    fit(tmp_path, second, steps=2)
    assert first.adapter_path == str(tmp_path / "matlora_adapter" / "version_0")
    assert second.adapter_path == str(tmp_path / "matlora_adapter" / "version_1")
    assert read_adapter(first.adapter_path).r_max == 4 and read_adapter(second.adapter_path).r_max == 2


def test_two_runs_with_a_logger_save_in_their_version_dirs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    paths = []
    for r_max in (4, 2):
        cb = MatryoshkaLoRA(r_max=r_max, verbose=False, rank_eval=None)
        fit(tmp_path, cb, steps=2, logger=CSVLogger(tmp_path))
        paths.append(cb.adapter_path)
    assert paths == [str(tmp_path / "lightning_logs" / f"version_{v}" / "matlora_adapter") for v in (0, 1)]
    assert [read_adapter(p).r_max for p in paths] == [4, 2]


def test_another_runs_adapter_is_refused_before_training_unless_told(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    fit(tmp_path, MatryoshkaLoRA(r_max=4, verbose=False, rank_eval=None), steps=2,
        logger=CSVLogger(tmp_path, version="fixed"))
    final = tmp_path / "lightning_logs" / "fixed" / "matlora_adapter"
    before = (final / "adapter_model.safetensors").read_bytes()
    module = LM()
    w0 = module.model.model.layers[0].self_attn.q_proj.weight.clone()
    trainer = pl.Trainer(max_steps=2, logger=CSVLogger(tmp_path, version="fixed"), enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                         callbacks=[MatryoshkaLoRA(r_max=2, verbose=False, rank_eval=None)])
    with pytest.raises(FileExistsError, match="already holds an adapter of another run"):
        trainer.fit(module, data())
    assert trainer.global_step == 0 and (final / "adapter_model.safetensors").read_bytes() == before
    assert torch.equal(w0, module.model.model.layers[0].self_attn.q_proj.base_layer.weight)
    # told to: the same run layout with overwrite=True replaces it
    told = AdapterCheckpoint(overwrite=True, verbose=False)
    fit(tmp_path, MatryoshkaLoRA(r_max=2, verbose=False, rank_eval=None), told, steps=2,
        logger=CSVLogger(tmp_path, version="fixed"))
    assert told.last_adapter_path == str(final) and read_adapter(final).r_max == 2


def test_adapter_checkpoint_in_the_trainer_replaces_the_callbacks_own(tmp_path):
    ckpt = AdapterCheckpoint(dirpath=tmp_path / "mine", monitor="val_score", mode="min", verbose=False)
    cb = MatryoshkaLoRA(r_max=2, verbose=False, rank_eval=None)  # save_adapter=True by default: not used
    fit(tmp_path, cb, ckpt, CurveSource(), steps=6)
    assert cb.adapter_path is None and not (tmp_path / "matlora_adapter").exists()
    assert ckpt.last_adapter_path == str(tmp_path / "mine") and ckpt.best_score == pytest.approx(0.1)  # minimised: step 6
    best = read_adapter(tmp_path / "mine_best")
    assert best.metadata["monitor_value"] == ckpt.best_score and best.metadata["global_step"] == 6
    assert read_adapter(tmp_path / "mine").curves[0].ranks == (1, 4)
    with pytest.raises(ValueError, match="mode must be 'auto'"):
        AdapterCheckpoint(mode="bigger")
