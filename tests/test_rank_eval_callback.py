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
from lightning_matlora.rank_validation import batch_rows, replicate_batch, step_loss

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
    assert [e for e, _ in cb_eval.history] == [0, 1]  # the sanity check is not an epoch
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
    assert "MatryoshkaLoRA rank curves (epoch 1, val" in text and "Advice (loss): rank" in text and "AURAC" in text


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
    assert "MatryoshkaLoRA rank curves (epoch 0, val" in caplog.text  # the table is printed at the end of validate
    assert cb.rank_eval.used_mixed is (returns in ("per_row", "dict_per_row"))
    ref = reference_curve(module.model, val, [1, 3, 8])
    got = {k: float(t.callback_metrics[f"val/loss@r{k}"]) for k in (1, 3, 8)}
    assert len(set(ref.values())) == 3
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5)


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_a_per_layer_setting_survives_the_per_rank_passes(tmp_path, adapted_lm, stage):
    """The user serves a rank per layer; validate/test sweep the uniform eval ranks and give the setting back."""
    from lightning_matlora import get_rank, set_rank

    _, val = loaders(n_val=10, batch_size=4)
    module, cb = adapted_lm("dict")
    seen = []
    step = module.validation_step

    def recording_step(batch, batch_idx):
        seen.append(get_rank(module))
        return step(batch, batch_idx)
    module.validation_step = module.test_step = recording_step
    set_rank(module, {"q_proj": 2, "*": 5})
    plan = get_rank(module)
    t = trainer(tmp_path, callbacks=[cb])
    getattr(t, stage)(module, val, verbose=False)
    # every batch: Lightning's own call at the user's setting, then the callback's passes at 1, 3, 8
    assert seen == [plan, 1, 3, 8] * 3
    assert get_rank(module) == plan
    ref = reference_curve(module.model, val, [1, 3, 8])
    for k in ref:
        assert float(t.callback_metrics[f"{'val' if stage == 'validate' else 'test'}/loss@r{k}"]) == \
            pytest.approx(ref[k], rel=1e-5)
    set_rank(module, 3)
    t.validate(module, val, verbose=False)
    assert get_rank(module) == 3


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
            assert cb.last_curves[0].score_at(k) == pytest.approx(ref, rel=1e-5)


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
    curve = RankCurve((1, 2, 4), (2.0, 1.5, float("nan")), "loss", higher_is_better=False)
    cb.rank_eval.history.append((0, [curve]))
    [saved] = cb.last_curves  # what the saved adapter records: the NaN rank stays, as null in JSON
    assert saved == curve and math.isnan(saved.aurac()) and saved.to_json()["scores"] == [2.0, 1.5, None]
    with caplog.at_level(logging.INFO):
        cb.rank_eval.report(None)
    assert "no rank advised: the scores at ranks [4] are NaN" in caplog.text
    assert [ln.split()[1] for ln in caplog.text.splitlines() if ln.strip().startswith("AURAC")] == ["nan"]


# ------------------------------------------------------------------------- RankCurveMetric on the module
import lightning as L  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402
from torchmetrics.functional.classification import multiclass_accuracy  # noqa: E402

from lightning_matlora import RankCurveMetric  # noqa: E402
from lightning_matlora.curve import RankCurve  # noqa: E402


def blobs(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """10-class data labelled by a fixed random linear teacher (learnable, not trivially)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(24, 10, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, 24, generator=g)
    return torch.utils.data.TensorDataset(x, (x @ teacher).argmax(-1))


class Classifier(L.LightningModule):
    """The user-facing snippet of docs/rank-curves.md, verbatim in its validation_step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        self.acc = RankCurveMetric(MulticlassAccuracy(num_classes=10))   # ranks: the callback's eval ranks

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        self.acc.update(self(x).argmax(-1), y)        # no rank argument, no loop
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=5e-2)


def classifier_loaders():
    return (DataLoader(blobs(512, 0), batch_size=32, shuffle=True),
            DataLoader(blobs(90, 1), batch_size=20))  # last batch of 10 rows: the loss weighs rows


def classifier_reference(module, val, ranks):
    """Each rank on its own over the whole validation set: accuracy (torchmetrics' functional form on all rows)
    and the row-weighted mean loss (float64)."""
    acc, loss = {}, {}
    with torch.no_grad():
        for k in ranks:
            with at_rank(module, k):
                logits = torch.cat([module(x) for x, _ in val])
            y = torch.cat([y for _, y in val])
            acc[k] = float(multiclass_accuracy(logits.argmax(-1), y, num_classes=10))
            loss[k] = float(F.cross_entropy(logits.double(), y, reduction="none").mean())
    return acc, loss


def test_rank_curve_metric_on_the_module_needs_no_loop(tmp_path, caplog):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    train, val = classifier_loaders()
    module = Classifier()
    cb = MatryoshkaLoRA(r_max=16, verbose=True)
    assert cb.last_curves == []
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val/aurac_acc", mode="max")
    stop = EarlyStopping(monitor="val/acc@r16", mode="max", patience=5)
    with caplog.at_level(logging.INFO):
        t = trainer(tmp_path, callbacks=[cb, ckpt, stop], max_epochs=3, enable_checkpointing=True,
                    num_sanity_val_steps=2)
        t.fit(module, train, val)
    ranks = [1, 2, 4, 8, 16]
    acc, loss = classifier_reference(module, val, ranks)
    assert len(set(acc.values())) > 2, "the ranks score differently: the test can tell them apart"
    m = t.callback_metrics
    for k in ranks:
        assert float(m[f"val/acc@r{k}"]) == pytest.approx(acc[k], abs=1e-6)
        assert float(m[f"val/loss@r{k}"]) == pytest.approx(loss[k], rel=1e-5)
    assert float(m["val/aurac_acc"]) == pytest.approx(aurac(ranks, [acc[k] for k in ranks]), abs=1e-6)
    assert float(m["val/aurac_loss"]) == pytest.approx(aurac(ranks, [loss[k] for k in ranks]), rel=1e-5)
    # monitorable: the checkpoint callback ranked epochs by the AURAC of accuracy
    assert ckpt.best_model_score is not None and float(ckpt.best_model_score) >= float(m["val/aurac_acc"]) - 1e-9
    # the callback's curves: one RankCurve per metric, the loss first; three epochs (the sanity check is not one)
    curves = cb.last_curves
    assert [c.metric for c in curves] == ["loss", "acc"] and all(isinstance(c, RankCurve) for c in curves)
    assert curves[1].higher_is_better and not curves[0].higher_is_better
    assert curves[1].scores == pytest.approx([acc[k] for k in ranks], abs=1e-6)
    assert [e for e, _ in cb.rank_eval.history] == [0, 1, 2]
    from lightning_matlora import read_adapter

    assert read_adapter(cb.adapter_path).curves == curves  # the saved adapter records every metric's curve
    # one PNG per metric, one table with a column per metric
    for name in ("loss", "acc"):
        assert os.path.getsize(tmp_path / f"rank_curve_{name}.png") > 1000
    table = caplog.text[caplog.text.index("MatryoshkaLoRA rank curves (epoch 2"):]
    assert "loss ↓" in table and "acc ↑" in table and "Advice (acc):" in table and "Advice (loss):" in table
    # metrics were reset per epoch: a fresh validate gives the same curve (not an accumulation over epochs)
    t.validate(module, val, verbose=False)
    for k in ranks:
        assert float(t.callback_metrics[f"val/acc@r{k}"]) == pytest.approx(acc[k], abs=1e-6)


def test_named_metric_in_a_moduledict_with_explicit_subset_of_ranks(tmp_path):
    """name= sets the log key; a ModuleDict and a MetricCollection are searched; ranks= a subset of the eval ranks
    counts only those."""
    train, val = classifier_loaders()
    module = Classifier()
    del module.acc
    module.extra = torch.nn.ModuleDict({
        "top1": RankCurveMetric(MulticlassAccuracy(num_classes=10, average="micro"), ranks=[2, 16],
                                name="exact_match")})

    from torchmetrics import MetricCollection

    module.coll = MetricCollection({"err": RankCurveMetric(MulticlassAccuracy(num_classes=10, average="micro"),
                                                           higher_is_better=False)})

    def step(batch):  # no batch_idx: Lightning allows it, and so do the callback's calls
        module.extra["top1"].update(module(batch[0]).argmax(-1), batch[1])
        module.coll.update((module(batch[0]).argmax(-1) + 1) % 10, batch[1])  # through a MetricCollection
        return F.cross_entropy(module(batch[0]), batch[1])
    module.validation_step = step
    cb = MatryoshkaLoRA(r_max=16, verbose=False, save_adapter=False)
    cb.apply(module)
    randomise_adapter(module)
    t = trainer(tmp_path, callbacks=[cb])
    t.validate(module, val, verbose=False)
    with torch.no_grad():
        y = torch.cat([y for _, y in val])
        for k in (2, 16):
            with at_rank(module, k):
                pred = torch.cat([module(x) for x, _ in val]).argmax(-1)
            assert float(t.callback_metrics[f"val/exact_match@r{k}"]) == pytest.approx(
                float((pred == y).float().mean()), abs=1e-6)
        for k in (1, 2, 4, 8, 16):
            with at_rank(module, k):
                pred = torch.cat([module(x) for x, _ in val]).argmax(-1)
            assert float(t.callback_metrics[f"val/err@r{k}"]) == pytest.approx(
                float(((pred + 1) % 10 == y).float().mean()), abs=1e-6)
    assert "val/exact_match@r4" not in t.callback_metrics and "val/aurac_exact_match" in t.callback_metrics
    assert [c.metric for c in cb.last_curves] == ["loss", "err", "exact_match"]


def test_a_metric_named_loss_replaces_the_returned_loss(tmp_path):
    """A RankCurveMetric called `loss` is the loss curve (token-weighted here); the step may return nothing."""
    _, val = loaders(n_val=10, batch_size=4)
    module = LM("none")
    module.loss = RankCurveMetric()  # a weighted mean

    def step(self_or_batch, batch=None):  # Lightning reads the first parameter of an attribute function as self
        batch = batch if batch is not None else self_or_batch
        per = per_row_losses(module.model, batch["input_ids"])
        module.loss.update(per.sum() / 100, 100)  # a different weighting than rows: visible in the result
    module.validation_step = step
    cb = MatryoshkaLoRA(r_max=8, eval_ranks=[1, 8], verbose=False, save_adapter=False)
    cb.apply(module)
    randomise_adapter(module)
    t = trainer(tmp_path, callbacks=[cb])
    t.validate(module, val, verbose=False)
    with torch.no_grad():
        for k in (1, 8):
            with at_rank(module.model, k):
                per = torch.cat([per_row_losses(module.model, b["input_ids"]) for b in val])
            # mean over batches of (sum/100), each weighted 100 = total / (100 · batches)
            assert float(t.callback_metrics[f"val/loss@r{k}"]) == pytest.approx(float(per.double().sum()) / 300,
                                                                               rel=1e-5)
    assert [c.metric for c in cb.last_curves] == ["loss"]


def test_updates_outside_validation_or_without_callback_say_why(tmp_path):
    train, val = classifier_loaders()
    # no callback at all: the metric has no ranks and nothing evaluates them
    alone = RankCurveMetric(MulticlassAccuracy(num_classes=10))
    with pytest.raises(RuntimeError, match=r"no MatryoshkaLoRA callback is evaluating ranks.*update\(k, \.\.\.\)"):
        alone.update(torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="has no ranks yet"):
        alone.update(4, torch.tensor([1]), torch.tensor([1]))

    class UpdatesInTraining(Classifier):
        def training_step(self, batch, i):
            x, y = batch
            self.acc.update(self(x).argmax(-1), y)
            return super().training_step(batch, i)

    with pytest.raises(RuntimeError, match="outside validation"):
        trainer(tmp_path, callbacks=[MatryoshkaLoRA(r_max=4, verbose=False, save_adapter=False)],
                max_epochs=1).fit(UpdatesInTraining(), train, val)
    # the callback's evaluation turned off: the update in validation_step has no rank to go to
    with pytest.raises(RuntimeError, match="no MatryoshkaLoRA callback is evaluating ranks"):
        trainer(tmp_path, callbacks=[MatryoshkaLoRA(r_max=4, verbose=False, save_adapter=False, rank_eval=None)],
                max_epochs=1).fit(Classifier(), train, val)


def test_bad_metric_setups_fail_at_setup_before_training(tmp_path):
    train, val = classifier_loaders()

    class Counting(Classifier):
        steps = 0

        def training_step(self, batch, i):
            Counting.steps += 1
            return super().training_step(batch, i)

    m = Counting()
    m.acc = RankCurveMetric(MulticlassAccuracy(num_classes=10), ranks=[1, 16])
    with pytest.raises(ValueError, match=r"tracks ranks \[16\] that MatryoshkaLoRA does not evaluate.*r_max 4"):
        trainer(tmp_path, callbacks=[MatryoshkaLoRA(r_max=4, verbose=False)]).fit(m, train, val)
    m = Counting()
    m.other = torch.nn.ModuleDict({"acc": RankCurveMetric(MulticlassAccuracy(num_classes=10))})
    with pytest.raises(ValueError, match=r"Two RankCurveMetrics of the module are named 'acc'.*name="):
        trainer(tmp_path, callbacks=[MatryoshkaLoRA(r_max=4, verbose=False)]).fit(m, train, val)
    with pytest.raises(ValueError, match="rank_eval='mixed'.*cannot be split by rank"):
        trainer(tmp_path, callbacks=[MatryoshkaLoRA(r_max=4, verbose=False, rank_eval="mixed")]).fit(
            Counting(), train, val)
    assert Counting.steps == 0
    with pytest.raises(ValueError, match="higher_is_better=True"):
        RankCurveMetric(WeightedMeanForTest())
    with pytest.raises(ValueError, match="letters, digits"):
        RankCurveMetric(name="val/acc")


def WeightedMeanForTest():
    from lightning_matlora.metric import WeightedMean

    return WeightedMean()


def test_test_stage_logs_test_curves(tmp_path, caplog):
    train, val = classifier_loaders()
    module = Classifier()
    cb = MatryoshkaLoRA(r_max=8, verbose=True, save_adapter=False)
    cb.apply(module)
    randomise_adapter(module)
    module.test_step = module.validation_step
    with caplog.at_level(logging.INFO):
        t = trainer(tmp_path, callbacks=[cb])
        t.test(module, val, verbose=False)
    acc, _ = classifier_reference(module, val, [1, 2, 4, 8])
    for k in (1, 2, 4, 8):
        assert float(t.callback_metrics[f"test/acc@r{k}"]) == pytest.approx(acc[k], abs=1e-6)
    assert "MatryoshkaLoRA rank curves (test" in caplog.text
    assert cb.last_curves == []  # validation curves only


@pytest.mark.slow
def test_module_metrics_under_ddp_equal_one_process(tmp_path):
    """The snippet's module under Lightning DDP (2 CPU processes, gloo): each process validates half of the rows;
    the logged curves equal one process's curves on all the rows."""
    _, val = classifier_loaders()

    def build():  # the same adapted module each time (a module that went through a Trainer is not re-spawned)
        module, cb = Classifier(), MatryoshkaLoRA(r_max=8, verbose=False, save_adapter=False)
        cb.apply(module)
        randomise_adapter(module)
        return module, cb

    module, cb = build()
    t = trainer(tmp_path, callbacks=[cb], strategy="ddp_spawn", devices=2)
    t.validate(module, val, verbose=False)
    module, cb = build()
    acc, loss = classifier_reference(module, val, [1, 2, 4, 8])
    single = trainer(tmp_path, callbacks=[cb])
    single.validate(module, val, verbose=False)
    one = {k: float(v) for k, v in single.callback_metrics.items()}
    assert {k for k in one if "@r" in k} == {k for k in t.callback_metrics if "@r" in k}
    for key, value in one.items():
        assert float(t.callback_metrics[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for k in (1, 2, 4, 8):
        assert one[f"val/acc@r{k}"] == pytest.approx(acc[k], abs=1e-6)
        assert one[f"val/loss@r{k}"] == pytest.approx(loss[k], rel=1e-5)


def test_metric_built_in_configure_model_is_found(tmp_path):
    """A RankCurveMetric created in configure_model (after the callback's setup) is found before the first
    validation and measured like one built in __init__."""
    train, val = classifier_loaders()

    class Late(Classifier):
        def __init__(self):
            super().__init__()
            del self.acc

        def configure_model(self):
            if not hasattr(self, "acc"):
                self.acc = RankCurveMetric(MulticlassAccuracy(num_classes=10))

    module = Late()
    cb = MatryoshkaLoRA(r_max=4, verbose=False, save_adapter=False)
    t = trainer(tmp_path, callbacks=[cb], max_epochs=1, num_sanity_val_steps=1)
    t.fit(module, train, val)
    acc, _ = classifier_reference(module, val, [1, 2, 4])
    for k in (1, 2, 4):
        assert float(t.callback_metrics[f"val/acc@r{k}"]) == pytest.approx(acc[k], abs=1e-6)
    assert module.acc.ranks == [1, 2, 4]
