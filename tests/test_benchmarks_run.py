"""The benchmark scripts run end to end at a tiny size (their figures are in docs/, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_speed_benchmark_runs_and_reports_every_target(tmp_path):
    out = tmp_path / "speed.md"
    _run(["benchmarks/speed.py", "--hidden", "32", "--inter", "64", "--layers", "1", "--heads", "2", "--kv-heads",
          "2", "--vocab", "97", "--batch", "2", "--seq", "8", "--r", "4", "--ranks", "1", "4", "--reps", "2",
          "--warmup", "1", "--no-memory", "--out", str(out)])
    text = out.read_text()
    for ratio in ("matryoshka / PEFT", "matryoshka / lora", "rowwise / matryoshka", "merged / base"):
        assert ratio in text


@pytest.mark.slow
def test_accuracy_study_runs_at_tiny_size(tmp_path):
    out = tmp_path / "study.md"
    _run(["benchmarks/accuracy.py", "--size", "tiny", "--out", str(out), "--regimes", "small", "chain",
          "--methods", "grid", "lora-truncated", "rowwise-half", "paired", "--curve-steps", "5"])
    text = out.read_text()
    assert "grid" in text and "rowwise-half" in text and "AURAC" in text and "Regime `chain`" in text
    # paired takes two forward-backward passes per step: 10 steps are 20 passes, and at equal compute it gets the
    # grid's 3 × 10 = 30 passes in 15 steps
    assert "| paired | 0.01 |" in text and "| 1 × 10 | 20 |" in text and "| 1 × 15 | 30 |" in text
    assert "plain LoRA at r_max" in text
    assert "Accuracy against training compute" in text and (tmp_path / "study_steps.png").stat().st_size > 0
    runs = [json.loads(ln) for ln in (tmp_path / "study_runs.jsonl").read_text().splitlines()]
    assert {r["passes"] for r in runs if r["method"] == "paired"} == {2}
    assert {r["steps"] for r in runs if r["method"] == "paired"} == {5, 10, 15}
    assert all(r["passes"] == 1 for r in runs if r["method"] != "paired")


@pytest.mark.slow
def test_multirank_eval_benchmark_runs(tmp_path):
    stdout = _run(["benchmarks/multirank_eval.py", "--hidden", "32", "--layers", "1", "--vocab", "97", "--seq", "8",
                   "--r-max", "8", "--batch-sizes", "1", "2", "--reps", "2"])
    assert "mixed" in stdout.lower()


@pytest.mark.slow
def test_quantized_benchmark_runs_every_variant():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not importable: pip install 'lightning_matlora[quant]'")
    stdout = _run(["benchmarks/quantized.py", "--hidden", "64", "--inter", "128", "--layers", "1", "--heads", "2",
                   "--kv-heads", "2", "--vocab", "97", "--batch", "2", "--seq", "8", "--r", "4", "--reps", "2",
                   "--warmup", "1"], timeout=600)
    for row in ("| float |", "| nf4 |", "| peft-qlora |", "nf4 / float", "PEFT QLoRA"):
        assert row in stdout


@pytest.mark.slow
def test_encode_study_runs_summarises_and_plots(tmp_path):
    runs = tmp_path / "runs.jsonl"
    for method in ("distillall:1", "lora:4"):
        _run(["recipes/encode_study.py", method, "--epochs", "0.01", "--num-generate", "2", "--out", str(runs)])
    table = _run(["recipes/encode_study.py", "summary", "--out", str(runs)])
    assert "distillall:1" in table and "lora:4" in table
    png = tmp_path / "steps.png"
    _run(["recipes/encode_study.py", "plot", "--out", str(runs), "--png", str(png)])
    assert png.stat().st_size > 0


@pytest.mark.slow
def test_rank_allocation_study_runs_and_summarises(tmp_path):
    runs = tmp_path / "runs.jsonl"
    _run(["recipes/rank_allocation_study.py", "run", "--epochs", "0.01", "--num-generate", "2", "--out", str(runs)])
    recs = [json.loads(line) for line in runs.read_text().splitlines()]
    assert [r["budget_rank"] for r in recs] == [1, 2, 4, 8]
    assert all(r["plan_parameters"] <= r["budget"] for r in recs)
    table = _run(["recipes/rank_allocation_study.py", "summary", "--out", str(runs)])
    assert "| rank 1 |" in table and "| rank 8 |" in table


@pytest.mark.slow
def test_gradient_share_traces_a_paired_run(tmp_path):
    out = tmp_path / "share.md"
    _run(["recipes/gradient_share.py", "--epochs", "0.02", "--every", "1", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2
    low_share = float(rows[1].split("|")[4])
    assert low_share == 1.0  # the low pass (ranks 1, 2, 4, 8) never touches components 9-16
