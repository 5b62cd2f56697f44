"""RankCurve: the one value type of a rank curve (ordering, AURAC against the spec, rank choice, strict JSON)."""

import math

import pytest

from lightning_matlora.curve import RankCurve


def test_sorted_and_spec_aurac():
    c = RankCurve((32, 1, 2, 4, 8, 16), (48, 40, 44, 46, 47, 48), metric="acc")
    assert c.ranks == (1, 2, 4, 8, 16, 32)
    assert c.aurac() == pytest.approx(45.80, abs=5e-3)
    assert c.aurac("linear") == pytest.approx(47.29, abs=5e-3)


def test_select_rank_tolerance_and_budget():
    c = RankCurve((1, 2, 4, 8), (0.5, 0.8, 0.9, 0.91), metric="acc")
    assert c.select_rank(tolerance=0.02) == 4
    assert c.select_rank(tolerance=None, budget=2) == 2
    loss = RankCurve((1, 2, 4), (3.0, 2.0, 2.01), metric="loss", higher_is_better=False)
    assert loss.select_rank(tolerance=0.01) == 2
    with pytest.raises(ValueError, match="budget"):
        c.select_rank(budget=0)


def test_log_dict_keys_are_the_plain_rank_whatever_r_max():
    c = RankCurve((1, 8, 16), (3.0, 2.0, 1.0), metric="loss", higher_is_better=False)
    d = c.as_log_dict("val")
    assert list(d) == ["val/loss@r1", "val/loss@r8", "val/loss@r16", "val/aurac_loss"]
    # the key of a rank does not change with the curve's largest rank (dashboards survive a new r_max)
    small = RankCurve((1, 8), (3.0, 2.0), metric="loss", higher_is_better=False)
    big = RankCurve((1, 8, 128), (3.0, 2.0, 1.0), metric="loss", higher_is_better=False)
    assert small.log_key(8) == big.log_key(8) == "val/loss@r8" and big.log_key(128, "test") == "test/loss@r128"
    assert d["val/aurac_loss"] == pytest.approx((2.5 * 3 + 1.5 * 1) / 4)


def test_json_round_trip_keeps_nan_as_null():
    c = RankCurve((1, 2), (float("nan"), 1.0), metric="loss", higher_is_better=False)
    data = c.to_json()
    assert data["scores"] == [None, 1.0]
    back = RankCurve.from_json(data)
    assert back.ranks == c.ranks and math.isnan(back.scores[0]) and back.scores[1] == 1.0


@pytest.mark.parametrize("bad, field", [
    ({"higher_is_better": True, "ranks": [1], "scores": [1.0]}, "missing"),
    ({"metric": "a", "higher_is_better": True, "ranks": [1], "scores": [1.0], "x": 1}, "unknown"),
    ({"metric": "a", "higher_is_better": "false", "ranks": [1], "scores": [1.0]}, "higher_is_better"),
    ({"metric": "a", "higher_is_better": True, "ranks": ["1"], "scores": [1.0]}, "ranks"),
    ({"metric": "a", "higher_is_better": True, "ranks": [1], "scores": ["1"]}, "scores"),
    ({"metric": "a", "higher_is_better": True, "ranks": [1, 2], "scores": [1.0]}, "one score per rank"),
    ([1, 2], "object"),
])
def test_from_json_is_strict(bad, field):
    with pytest.raises(ValueError, match=field):
        RankCurve.from_json(bad)
