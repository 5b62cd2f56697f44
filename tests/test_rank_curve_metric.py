"""RankCurveMetric: routing, AURAC, reset, errors, plot, and reduction across 2 real processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.functional.classification import multiclass_accuracy
from torchmetrics.regression import MeanSquaredError

from lightning_matlora import RankCurveMetric, aurac
from lightning_matlora.curve import RankCurve
from lightning_matlora.metric import WeightedMean

RANKS = [1, 2, 8]


def data(seed: int, n: int = 40, classes: int = 5):
    """Predictions that get better with rank: rank k keeps the true label with probability k/10."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(classes, (n,), generator=g)
    preds = {}
    for k in RANKS:
        noise = torch.randint(classes, (n,), generator=g)
        keep = torch.rand(n, generator=g) < k / 10 + 0.1
        preds[k] = torch.where(keep, target, noise)
    return preds, target


def test_each_rank_copy_is_the_base_metric_on_its_own_data():
    preds, target = data(0)
    curve = RankCurveMetric(MulticlassAccuracy(num_classes=5), ranks=RANKS)
    for k in RANKS:
        for chunk in range(0, 40, 16):  # several updates per rank
            curve.update(k, preds[k][chunk:chunk + 16], target[chunk:chunk + 16])
    out = curve.compute()
    ref = {k: float(multiclass_accuracy(preds[k], target, num_classes=5)) for k in RANKS}
    assert isinstance(out, RankCurve) and list(out.ranks) == RANKS and out.higher_is_better is True
    assert out.metric == "MulticlassAccuracy"  # no name given and not found on a module: the base metric's class
    for k in RANKS:
        assert out.score_at(k) == pytest.approx(ref[k], abs=1e-6)
    assert out.aurac() == pytest.approx(aurac(RANKS, [ref[k] for k in RANKS]), abs=1e-6)
    assert curve.higher_is_better is True and curve.select_rank(tolerance=1.0) == 1


def test_default_is_a_weighted_mean_that_keeps_nan_and_resets():
    curve = RankCurveMetric(ranks=[1, 4])
    assert curve.higher_is_better is False
    curve.update(1, torch.tensor(2.0), 3)
    curve.update(1, 4.0, 1)  # weighted: (2·3 + 4·1) / 4
    curve.update(4, torch.tensor([1.0, 3.0]))
    out = curve.compute()
    assert out.metric == "loss" and out.higher_is_better is False
    assert out.score_at(1) == pytest.approx(2.5) and out.score_at(4) == pytest.approx(2.0)
    assert out.aurac() == pytest.approx(2.25)
    curve.update(4, float("nan"))
    out = curve.compute()
    assert math.isnan(out.score_at(4)) and math.isnan(out.aurac())
    curve.reset()
    curve.update(1, 1.0)
    curve.update(4, 2.0)
    assert curve.compute().score_at(4) == 2.0  # reset cleared the NaN


def test_forward_returns_the_batch_value_and_accumulates():
    curve = RankCurveMetric(ranks=[2])
    assert float(curve(2, torch.tensor([1.0, 3.0]))) == 2.0
    assert float(curve(2, torch.tensor([5.0]))) == 5.0
    assert curve.compute().score_at(2) == 3.0


def test_higher_is_better_comes_from_the_base_metric_or_the_argument():
    assert RankCurveMetric(MeanSquaredError(), ranks=[1]).higher_is_better is False
    assert RankCurveMetric(MeanSquaredError(), ranks=[1], higher_is_better=True).higher_is_better is True
    with pytest.raises(ValueError, match="higher_is_better=True"):  # unknown direction: refused when built
        RankCurveMetric(WeightedMean(), ranks=[1, 2])


def test_bad_input():
    curve = RankCurveMetric(ranks=[1, 2, 4])
    with pytest.raises(ValueError, match=r"built for ranks \[1, 2, 4\] and got update for rank 3"):
        curve.update(3, 1.0)
    with pytest.raises(ValueError, match="got update for rank 8"):
        curve.forward(8, 1.0)
    # only a Python int first argument is a rank: anything else is the base metric's input, which needs a callback
    with pytest.raises(RuntimeError, match="no MatryoshkaLoRA callback is evaluating ranks"):
        curve.update(torch.tensor(4), 1.0)
    with pytest.raises(TypeError, match="torchmetrics Metric"):
        RankCurveMetric(torch.nn.MSELoss(), ranks=[1])
    with pytest.raises(ValueError, match="duplicates"):
        RankCurveMetric(ranks=[1, 1])
    with pytest.raises(ValueError, match="'log2'"):
        RankCurveMetric(ranks=[1], axis="ln")


def test_linear_axis_and_plot():
    curve = RankCurveMetric(ranks=[1, 2, 4], axis="linear")
    for k, v in zip([1, 2, 4], [3.0, 2.0, 1.0]):
        curve.update(k, v)
    out = curve.compute()
    assert curve.axis == "linear"
    assert out.aurac("linear") == pytest.approx(aurac([1, 2, 4], [3.0, 2.0, 1.0], axis="linear"))
    fig, ax = curve.plot()
    assert len(ax.lines) == 1 and ax.get_xscale() == "linear"
    fig, ax = curve.plot([out, out])  # one line per result, e.g. per epoch
    assert len(ax.lines) == 2


# ----------------------------------------------------------------------------------------- two processes
def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        preds, target = data(0)
        acc = RankCurveMetric(MulticlassAccuracy(num_classes=5), ranks=RANKS)
        loss = RankCurveMetric(ranks=RANKS)
        for k in RANKS:  # process r sees rows r, r+2, r+4, … (uneven chunks per update)
            acc.update(k, preds[k][rank::world], target[rank::world])
            per_row = (preds[k] != target).float()[rank::world] * k
            loss.update(k, per_row[:7].mean(), 7)
            loss.update(k, per_row[7:], 1)
        first = {"acc": acc.compute().to_json(), "loss": loss.compute().to_json()}
        acc.reset()
        loss.reset()
        for k in RANKS:  # second "epoch": only process 1 has data for the loss, and its values are k
            acc.update(k, target[rank::world], target[rank::world])
            if rank == 1:
                loss.update(k, float(k), 2)
            else:
                loss.update(k, 0.0, 0)
        second = {"acc": acc.compute().to_json(), "loss": loss.compute().to_json()}
        torch.save({"first": first, "second": second}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_states_reduce_across_two_processes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    preds, target = data(0)
    ref_acc = {k: float(multiclass_accuracy(preds[k], target, num_classes=5)) for k in RANKS}
    ref_loss = {k: float((preds[k] != target).float().mean() * k) for k in RANKS}
    for r in (0, 1):
        res = torch.load(tmp_path / f"r{r}.pt")
        first = {n: RankCurve.from_json(c) for n, c in res["first"].items()}
        second = {n: RankCurve.from_json(c) for n, c in res["second"].items()}
        for k in RANKS:
            assert first["acc"].score_at(k) == pytest.approx(ref_acc[k], abs=1e-6)
            assert first["loss"].score_at(k) == pytest.approx(ref_loss[k], abs=1e-6)
            assert second["acc"].score_at(k) == 1.0  # reset between epochs
            assert second["loss"].score_at(k) == pytest.approx(k)
        assert first["loss"].aurac() == pytest.approx(aurac(RANKS, [ref_loss[k] for k in RANKS]), abs=1e-6)
