"""The MatryoshkaLoRA callback's per-rank validation: logged curve, AURAC, table, PNG, TensorBoard, both paths."""

from __future__ import annotations

import logging
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric

from lightning_matlora import MatryoshkaLoRA, adapted_layers, at_rank, aurac
from lightning_matlora.evaluation import batch_rows, replicate_batch, step_loss

from conftest import tiny_llama

V = 97


class Progressions(Dataset):
    """Token sequences a, a+d, a+2d, … (mod 97): a small, learnable language."""

    def __init__(self, n: int, length: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, V, (n, 1), generator=g)
        step = torch.randint(1, 6, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(length)[None, :]) % V

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


def per_row_losses(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row (float32, shape (rows,))."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


class LM(pl.LightningModule):
    """A plain user module: no MatryoshkaLoRA-specific code. ``returns`` picks what validation_step returns."""

    def __init__(self, returns: str = "scalar", seed: int = 0) -> None:
        super().__init__()
        self.model = tiny_llama(seed).train()
        self.returns = returns
        self.val_mean = MeanMetric()

    def training_step(self, batch, batch_idx):
        return per_row_losses(self.model, batch["input_ids"]).mean()

    def validation_step(self, batch, batch_idx):
        per = per_row_losses(self.model, batch["input_ids"])
        self.val_mean.update(per.mean(), per.numel())
        self.log("val_loss", per.mean(), batch_size=per.numel())
        self.log("val_mean", self.val_mean)
        if self.returns == "scalar":
            return per.mean()
        if self.returns == "dict":
            return {"loss": per.mean()}
        if self.returns == "per_row":
            return per
        if self.returns == "dict_per_row":
            return {"loss": per.mean(), "per_row_loss": per}
        return None

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-2)


def loaders(n_train: int = 32, n_val: int = 12, batch_size: int = 4):
    return (DataLoader(Progressions(n_train, seed=1), batch_size=batch_size, shuffle=False),
            DataLoader(Progressions(n_val, seed=2), batch_size=batch_size, shuffle=False))


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, max_epochs=2, enable_checkpointing=False, enable_model_summary=False,
                enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path), logger=False)
    args.update(kw)
    return pl.Trainer(**args)


def reference_curve(model: torch.nn.Module, loader: DataLoader, ranks: list[int]) -> dict[int, float]:
    """Each rank evaluated on its own, rows averaged over the whole validation set (float64 accumulation)."""
    out = {}
    with torch.no_grad():
        for k in ranks:
            with at_rank(model, k):
                per = torch.cat([per_row_losses(model, b["input_ids"]) for b in loader])
            out[k] = float(per.double().mean())
    return out


def randomise_adapter(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(module).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)


# --------------------------------------------------------------------------------------------------------- fit
def test_fit_logs_curve_aurac_table_png_and_tensorboard(tmp_path, caplog):
    from lightning.pytorch.loggers import TensorBoardLogger

    train, val = loaders(n_train=16, n_val=8)
    module = LM("scalar")
    cb = MatryoshkaLoRA(r_max=8, verbose=True)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    with caplog.at_level(logging.INFO):
        t = trainer(tmp_path, callbacks=[cb], logger=logger, log_every_n_steps=1, num_sanity_val_steps=1)
        t.fit(module, train, val)
    names = ["val/loss@r1", "val/loss@r2", "val/loss@r4", "val/loss@r8"]
    metrics = t.callback_metrics
    assert all(n in metrics for n in names) and "val/aurac_loss" in metrics
    assert "val/aurac_loss" in t.progress_bar_metrics
    # the last epoch's curve is the trained model's curve, each rank evaluated on its own
    ref = reference_curve(module.model, val, [1, 2, 4, 8])
    for k, n in zip([1, 2, 4, 8], names):
        assert float(metrics[n]) == pytest.approx(ref[k], rel=1e-5)
    assert float(metrics["val/aurac_loss"]) == pytest.approx(aurac(list(ref), list(ref.values())), rel=1e-5)
    assert len(set(ref.values())) == 4  # training moved the ranks apart: the test can tell them apart
    # the user's own logs and torchmetrics state saw only the normal (training-forward) validation pass
    with torch.no_grad():
        p_loss = float(torch.cat([per_row_losses(module.model, b["input_ids"]) for b in val]).double().mean())
    assert float(metrics["val_loss"]) == pytest.approx(p_loss, rel=1e-5)
    assert float(metrics["val_mean"]) == pytest.approx(p_loss, rel=1e-5)
    # one curve per epoch, a PNG next to the logs, a figure in TensorBoard, a table with advice at fit end
    cb_eval = cb.rank_eval
    assert [e for e, _, _ in cb_eval.history] == [0, 1]  # the sanity check is not an epoch
    png = os.path.join(logger.log_dir, "rank_curve_loss.png")
    assert os.path.getsize(png) > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert "val/rank_curve_loss" in acc.Tags()["images"]
    assert len(acc.Images("val/rank_curve_loss")) == 2
    assert "val/loss@r8" in acc.Tags()["scalars"]
    # the adapter saved at the end of fit records the last curve and its AURAC
    from lightning_matlora import read_adapter

    saved = read_adapter(cb.adapter_path)
    [curve] = saved.curves
    assert curve.ranks == (1, 2, 4, 8) and curve.metric == "loss" and curve.higher_is_better is False
    assert list(curve.scores) == pytest.approx([ref[k] for k in (1, 2, 4, 8)], rel=1e-5)
    assert curve.aurac() == pytest.approx(float(metrics["val/aurac_loss"]), rel=1e-6)
    text = caplog.text
    assert "MatryoshkaLoRA rank curve after epoch 1" in text and "Advice: rank" in text and "AURAC" in text


# ------------------------------------------------------------------------------------------- the two paths
@pytest.fixture
def adapted_lm():
    """An LM adapted (r_max=8) with a random non-zero adapter, so that every rank gives a different loss."""
    def build(returns: str):
        module = LM(returns)
        cb = MatryoshkaLoRA(r_max=8, eval_ranks=[1, 3, 8], verbose=False)
        cb.apply(module)
        randomise_adapter(module)
        return module, cb
    return build


@pytest.mark.parametrize("returns", ["dict", "dict_per_row"])
def test_validate_curve_matches_reference_on_both_paths(tmp_path, adapted_lm, returns, caplog):
    _, val = loaders(n_val=10, batch_size=4)  # last batch has 2 rows: weighting by rows matters
    module, cb = adapted_lm(returns)
    cb.rank_eval.verbose = True
    t = trainer(tmp_path, callbacks=[cb])
    with caplog.at_level(logging.INFO):
        t.validate(module, val, verbose=False)
    assert "MatryoshkaLoRA rank curve after epoch 0" in caplog.text  # the table is printed at the end of validate
    assert cb.rank_eval.used_mixed is (returns in ("per_row", "dict_per_row"))
    ref = reference_curve(module.model, val, [1, 3, 8])
    got = {k: float(t.callback_metrics[f"val/loss@r{k}"]) for k in (1, 3, 8)}
    assert len(set(ref.values())) == 3
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5)


def test_mixed_and_sequential_paths_give_the_same_curve(tmp_path, adapted_lm):
    _, val = loaders(n_val=10, batch_size=4)
    module, cb = adapted_lm("per_row")
    curves = {}
    for mode in ("mixed", "sequential", "auto"):
        cb.rank_eval.mode = mode
        t = trainer(tmp_path, callbacks=[cb])
        t.validate(module, val, verbose=False)
        curves[mode] = {k: float(t.callback_metrics[f"val/loss@r{k}"]) for k in (1, 3, 8)}
        assert cb.rank_eval.used_mixed is (mode != "sequential")
    for k in (1, 3, 8):
        assert curves["mixed"][k] == pytest.approx(curves["sequential"][k], rel=1e-6)


def test_rank_eval_off_logs_nothing(tmp_path, adapted_lm):
    _, val = loaders(n_val=8)
    module = LM("none")
    cb = MatryoshkaLoRA(r_max=4, verbose=False, rank_eval=None)
    cb.apply(module)
    t = trainer(tmp_path, callbacks=[cb])
    t.validate(module, val, verbose=False)
    assert not any("@r" in n for n in t.callback_metrics)


class TokenMLP(pl.LightningModule):
    """Flattens (batch, tokens, features) to (batch·tokens, features) before its Linear layers, so per-row ranks
    (one per batch row) cannot reach them: the one-pass evaluation must fall back to one pass per rank."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def per_row(self, batch):
        x, y = batch
        logits = self.net(x.reshape(-1, x.shape[-1]))
        return F.cross_entropy(logits, y.reshape(-1), reduction="none").view(y.shape).mean(1)

    def validation_step(self, batch, batch_idx):
        return self.per_row(batch)


def test_auto_falls_back_when_layers_see_flattened_rows(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(10, 5, 6, generator=g), torch.randint(3, (10, 5), generator=g))
    val = DataLoader(data, batch_size=4)
    module = TokenMLP()
    cb = MatryoshkaLoRA(r_max=8, eval_ranks=[1, 2, 8], exclude_modules=None, verbose=False)
    cb.apply(module)
    randomise_adapter(module)
    with pytest.warns(UserWarning, match="falls back to one validation pass per eval rank"):
        trainer(tmp_path, callbacks=[cb]).validate(module, val, verbose=False)
    assert cb.rank_eval.used_mixed is False
    with torch.no_grad():
        for k in (1, 2, 8):
            with at_rank(module, k):
                ref = float(torch.cat([module.per_row(b) for b in val]).double().mean())
            assert float(cb.rank_eval.history[-1][1][k]) == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
def test_step_without_loss_explains_rank_curve_metric(tmp_path):
    _, val = loaders(n_val=8)
    module = LM("none")
    cb = MatryoshkaLoRA(r_max=4, verbose=False)
    cb.apply(module)
    with pytest.raises(ValueError, match="RankCurveMetric") as err:
        trainer(tmp_path, callbacks=[cb]).validate(module, val, verbose=False)
    assert "rank_eval=None" in str(err.value) and "returned NoneType" in str(err.value)


def test_mixed_with_scalar_loss_is_an_error(tmp_path, adapted_lm):
    _, val = loaders(n_val=8)
    module, cb = adapted_lm("scalar")
    cb.rank_eval.mode = "mixed"
    with pytest.raises(ValueError, match="rank_eval='mixed' cannot run"):
        trainer(tmp_path, callbacks=[cb]).validate(module, val, verbose=False)


@pytest.mark.parametrize("eval_ranks", [[0, 2], [2, 9]])
def test_eval_rank_outside_r_max_fails_at_construction(eval_ranks):
    with pytest.raises(ValueError, match="outside 1…r_max=8"):
        MatryoshkaLoRA(r_max=8, eval_ranks=eval_ranks)


def test_unknown_rank_eval_mode_fails_at_construction():
    with pytest.raises(ValueError, match="rank_eval must be one of"):
        MatryoshkaLoRA(r_max=8, rank_eval="fast")


# ------------------------------------------------------------------------------------------ batch helpers
def test_step_loss_reads_every_supported_return():
    per = torch.tensor([1.0, 2.0, 3.0])
    assert step_loss(per.mean())[1] is None and float(step_loss(per.mean())[0]) == 2.0
    assert step_loss({"loss": per.mean(), "logits": None})[1] is None
    assert step_loss(per)[1] is per
    assert step_loss({"loss": per.mean(), "per_row_loss": per})[1] is per
    assert step_loss({"per_row_loss": per})[1] is per
    for bad, what in [(None, "NoneType"), ({"acc": per}, "a dict with keys ['acc']"),
                      (torch.zeros(2, 2), "a tensor of shape (2, 2)"), (torch.tensor(3), "a tensor of shape ()")]:
        with pytest.raises(ValueError, match="RankCurveMetric") as err:
            step_loss(bad)
        assert what in str(err.value)


def test_replicate_batch_and_rows():
    batch = {"input_ids": torch.arange(6).view(3, 2), "mask": torch.ones(3, 2), "name": "x"}
    assert batch_rows(batch) == 3
    big = replicate_batch(batch, 2)
    assert torch.equal(big["input_ids"], torch.cat([batch["input_ids"]] * 2)) and big["name"] == "x"
    assert batch_rows({"a": torch.zeros(3), "b": torch.zeros(4)}) is None
    assert batch_rows(["no tensors"]) is None


# ------------------------------------------------------------------------------------------ two processes
@pytest.mark.slow
def test_curve_reduces_across_two_ddp_processes(tmp_path):
    """Each process validates half of the rows; the logged curve is the whole set's (Lightning DDP, gloo)."""
    _, val = loaders(n_val=12, batch_size=3)
    module = LM("per_row")
    cb = MatryoshkaLoRA(r_max=8, eval_ranks=[1, 3, 8], verbose=False)
    cb.apply(module)
    randomise_adapter(module)
    ref = reference_curve(module.model, val, [1, 3, 8])
    t = trainer(tmp_path, callbacks=[cb], strategy="ddp_spawn", devices=2)
    t.validate(module, val, verbose=False)
    for k in (1, 3, 8):
        assert float(t.callback_metrics[f"val/loss@r{k}"]) == pytest.approx(ref[k], rel=1e-5)
    assert float(t.callback_metrics["val/aurac_loss"]) == pytest.approx(aurac(list(ref), list(ref.values())), rel=1e-5)


def test_nan_rank_is_reported_not_hidden_and_does_not_block_saving(caplog):
    """A diverged rank: the AURAC is NaN, the table says so, the saved metadata keeps the curve without an AURAC."""
    import math

    cb = MatryoshkaLoRA(r_max=4, verbose=True)
    curve = {1: 2.0, 2: 1.5, 4: float("nan")}
    cb.rank_eval.history.append((0, curve, aurac(list(curve), list(curve.values()))))
    assert math.isnan(cb.rank_eval.history[-1][2]) and cb.last_aurac is None
    [saved] = cb.last_curves  # what the saved adapter records: the NaN rank stays, as null in JSON
    assert math.isnan(saved.scores[2]) and saved.to_json()["scores"] == [2.0, 1.5, None]
    with caplog.at_level(logging.INFO):
        cb.rank_eval.report(None)
    assert "no rank advised: the scores at ranks [4] are NaN" in caplog.text and "AURAC (log2 axis): nan" in caplog.text
