"""AURAC, rank choice, advice sentence, table and plot of rank curves."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_matlora import aurac, describe_rank_choice, format_curve_table, plot_rank_curves, select_rank
from lightning_matlora.curve import size_fraction

RANKS = [1, 2, 4, 8, 16, 32]
ACC = [40, 44, 46, 47, 48, 48]


def test_spec_worked_example():
    assert aurac(RANKS, ACC) == pytest.approx(45.80, abs=0.005)
    assert aurac(RANKS, ACC, axis="linear") == pytest.approx(47.29, abs=0.005)


def reference_aurac(ranks, values, axis):
    """The spec's formula written out with Python floats."""
    pts = sorted(zip(ranks, values))
    t = [math.log2(r) if axis == "log2" else float(r) for r, _ in pts]
    a = [float(v) for _, v in pts]
    if len(pts) == 1:
        return a[0]
    area = sum((t[i + 1] - t[i]) * (a[i] + a[i + 1]) / 2 for i in range(len(pts) - 1))
    return area / (t[-1] - t[0])


@pytest.mark.parametrize("axis", ["log2", "linear"])
def test_aurac_matches_formula_on_unsorted_irregular_ranks(axis):
    g = torch.Generator().manual_seed(0)
    ranks = [3, 64, 1, 12, 5]
    values = torch.rand(5, generator=g, dtype=torch.float64).tolist()
    assert aurac(ranks, values, axis) == pytest.approx(reference_aurac(ranks, values, axis), rel=1e-12)
    # tensors in, same number out; a (m, c) tensor gives one AURAC per column
    want = reference_aurac(ranks, values, axis)
    assert aurac(ranks, torch.tensor(values, dtype=torch.float64), axis) == pytest.approx(want, rel=1e-12)
    v64 = torch.tensor(values, dtype=torch.float64)
    cols = torch.stack([v64, 2 * v64], dim=1)
    out = aurac(ranks, cols, axis)
    assert out.shape == (2,) and float(out[1]) == pytest.approx(2 * reference_aurac(ranks, values, axis), rel=1e-9)


def test_one_rank_is_its_value_and_constant_curve_is_the_constant():
    assert aurac([8], [0.7]) == 0.7
    assert aurac(RANKS, [3.0] * 6) == pytest.approx(3.0)


def test_nan_propagates():
    assert math.isnan(aurac(RANKS, [40, 44, float("nan"), 47, 48, 48]))
    assert math.isnan(aurac([4], [float("nan")]))


@pytest.mark.parametrize("ranks, values, match", [
    ([], [], "empty"), ([1, 2], [1.0], "one value per rank"), ([0, 2], [1.0, 2.0], "integers ≥ 1"),
    ([2, 2], [1.0, 2.0], "duplicates"), ([1.5, 2], [1.0, 2.0], "integers"),
])
def test_aurac_bad_input(ranks, values, match):
    with pytest.raises(ValueError, match=match):
        aurac(ranks, values)


def test_aurac_bad_axis():
    with pytest.raises(ValueError, match="'log2'"):
        aurac(RANKS, ACC, axis="log")


def test_select_rank_accuracy_and_loss():
    acc = dict(zip(RANKS, [0.40, 0.44, 0.46, 0.476, 0.48, 0.479]))
    assert select_rank(acc) == 8  # 0.476 ≥ 0.48·0.99 = 0.4752
    assert select_rank(acc, tolerance=0.0) == 16
    assert select_rank(acc, tolerance=0.05, relative=False) == 2  # 0.44 ≥ 0.43 > 0.40
    loss = {1: 2.5, 2: 2.4, 4: 2.31, 8: 2.30, 16: 2.295}
    assert select_rank(loss, higher_is_better=False) == 4  # 2.31 ≤ 2.295·1.01 = 2.318
    assert select_rank(loss, tolerance=0.0, higher_is_better=False) == 16
    assert select_rank({4: 1.0}) == 4


def test_select_rank_bad_input():
    with pytest.raises(ValueError, match="NaN scores at ranks \\[2\\]"):
        select_rank({1: 0.1, 2: float("nan")})
    with pytest.raises(ValueError, match="tolerance must be a number ≥ 0"):
        select_rank({1: 0.1}, tolerance=-0.1)


def test_advice_sentences():
    acc = {4: 0.8, 8: torch.tensor(0.902), 16: 0.905, 64: 0.91}
    assert describe_rank_choice(acc) == ("rank 8 keeps 99.1% of rank 64's accuracy (0.902 vs 0.91) at an eighth of "
                                         "the adapter size.")
    loss = {1: 2.5, 4: 2.31, 16: 2.30}
    assert describe_rank_choice(loss, higher_is_better=False, name="loss") == (
        "rank 4's loss is within 0.43% of rank 16's (2.31 vs 2.3) at a quarter of the adapter size.")
    assert describe_rank_choice({1: 0.1, 2: 0.5}).startswith("rank 2 scores best")
    assert "NaN" in describe_rank_choice({1: float("nan"), 2: 0.5})
    assert size_fraction(3, 64) == "3/64" and size_fraction(32, 64) == "half" and size_fraction(6, 12) == "half"


def test_table_lists_every_rank_with_aurac_and_advice():
    loss = {1: 2.5, 2: 2.4, 4: 2.31, 8: 2.30, 16: 2.295}
    text = format_curve_table(loss, name="val/loss")
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[2:7]] == ["1", "2", "4", "8", "16"]
    assert f"{aurac(list(loss), list(loss.values())):.5g}" in text
    assert "Advice: rank 4's val/loss is within" in text


def test_plot_draws_one_line_per_curve_on_log2_axis(tmp_path):
    curves = [{1: 3.0, 2: 2.5, 4: 2.2}, {1: 2.5, 2: 2.1, 4: 2.0}]
    fig, ax = plot_rank_curves(curves, labels=["epoch 0", "epoch 1"], ylabel="loss")
    assert len(ax.lines) == 2 and ax.get_xscale() == "log"
    assert list(ax.lines[1].get_xdata()) == [1, 2, 4] and list(ax.lines[1].get_ydata()) == [2.5, 2.1, 2.0]
    fig.savefig(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    fig2, ax2 = plot_rank_curves(curves[0], ax=ax)  # draws into a given axes, torchmetrics-style
    assert fig2 is fig and len(ax.lines) == 3


# ------------------------------------------------------------------------ the evaluation set's size (Wilson)
@pytest.mark.parametrize("hits, n", [(0, 30), (2, 30), (3, 30), (30, 30), (147, 200), (38, 200), (1, 1)])
def test_wilson_interval_matches_scipy(hits, n):
    from scipy.stats import binomtest

    from lightning_matlora.curve import wilson_interval

    ref = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(hits / n, n)
    assert (low, high) == (pytest.approx(ref.low, abs=1e-9), pytest.approx(ref.high, abs=1e-9))
    low100, high100 = wilson_interval(100 * hits / n, n, max_score=100)  # percentages: the same interval × 100
    assert (low100, high100) == (pytest.approx(100 * ref.low, abs=1e-7), pytest.approx(100 * ref.high, abs=1e-7))


def _overlap_reference(scores: dict[int, int], n: int) -> bool:
    """Independent reference: scipy's Wilson intervals of hit counts; can the curve tell its ranks apart?"""
    from scipy.stats import binomtest

    ci = {r: binomtest(h, n).proportion_ci(method="wilson") for r, h in scores.items()}
    top = max(scores, key=scores.get)
    return all(ci[r].high >= ci[top].low for r in scores)


@pytest.mark.parametrize("hits, n, want_indistinct", [
    ({1: 3, 2: 0, 4: 1, 8: 2, 16: 2}, 30, True),           # the 30-row split: 10 % vs 6.7 % is one example
    ({1: 38, 2: 70, 4: 110, 8: 140, 16: 147}, 200, False),  # the recipe's default run: a real curve
    ({1: 20, 16: 30}, 100, True),
    ({1: 10, 16: 30}, 100, False),
])
def test_select_rank_with_n_says_when_ranks_cannot_be_told_apart(hits, n, want_indistinct):
    from lightning_matlora.curve import ranks_indistinguishable

    curve = {r: 100.0 * h / n for r, h in hits.items()}
    assert ranks_indistinguishable(curve, n, max_score=100) is _overlap_reference(hits, n) is want_indistinct
    chosen = select_rank(curve, n=n, max_score=100)
    text = describe_rank_choice(curve, name="exact match", n=n, max_score=100)
    if want_indistinct:  # never the small rank the noise favoured: the adapter as trained, and the sentence says so
        assert chosen == max(curve) and f"cannot tell the ranks apart on {n} examples" in text
        assert select_rank(curve) != chosen or curve[min(curve)] < curve[max(curve)]  # without n: the old answer
    else:  # a real difference: the usual tolerance rule, as without n
        assert chosen == select_rank(curve) and "cannot tell" not in text


def test_n_is_checked():
    with pytest.raises(ValueError, match="n must be the number of evaluated examples"):
        select_rank({1: 0.5, 2: 0.6}, n=0)
    with pytest.raises(ValueError, match="accuracy-like"):
        select_rank({1: 2.0, 2: 1.0}, higher_is_better=False, n=30)
    with pytest.raises(ValueError, match="max_score=100 for percentages"):
        select_rank({1: 10.0, 2: 60.0}, n=30)  # percentages given as fractions


def test_panel_figure_labels_every_panel_alike_and_saves_only_a_finished_figure(tmp_path):
    from lightning_matlora.curve import panel_figure

    png = tmp_path / "p.png"
    with panel_figure(png, ["at r = 1", "at r = 16"], xlabel="steps", ylabel="exact match %", suptitle="study",
                      legend_fontsize=7) as axes:
        for i, ax in enumerate(axes):
            ax.plot([1, 2, 4], [10.0 * i, 20.0, 30.0], label="rowwise")
    assert [ax.get_title() for ax in axes] == ["at r = 1", "at r = 16"]
    assert {(ax.get_xlabel(), ax.get_ylabel()) for ax in axes} == {("steps", "exact match %")}
    assert [t.get_text() for t in axes[1].get_legend().get_texts()] == ["rowwise"]
    assert axes[0].figure.get_suptitle() == "study" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    broken = tmp_path / "broken.png"
    with pytest.raises(RuntimeError, match="no data"):
        with panel_figure(broken, ["one"], xlabel="x", ylabel="y", suptitle="s"):
            raise RuntimeError("no data")
    assert not broken.exists()
