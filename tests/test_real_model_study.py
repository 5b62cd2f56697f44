"""benchmarks/real_model_study.py end to end at a tiny size: a tiny GGUF Llama with a chat template stands in for
SmolLM2 (the figures are in docs/results.md, not asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_helpers import tiny_llama_for_gguf, write_gguf

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("gguf")


def _run(args: list[str], env: dict) -> str:
    proc = subprocess.run([sys.executable, "benchmarks/real_model_study.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _tiny_base(tmp_path: Path) -> tuple[Path, dict]:
    """A tiny GGUF Llama with a chat template, and the environment that keeps its conversion in ``tmp_path``."""
    base = write_gguf(tmp_path / "tiny.gguf", tiny_llama_for_gguf())
    return base, {**os.environ, "LIGHTNING_MATLORA_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
                  "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_study_runs_times_and_reports_at_tiny_size(tmp_path):
    base, env = _tiny_base(tmp_path)
    out = tmp_path / "runs.jsonl"
    common = ["--base", str(base), "--out", str(out), "--n-val", "4"]
    tiny = ["--steps", "4", "--r-max", "4", "--curve-n", "2", "--curve-at", "0.5"]
    _run(["base", *common], env)
    _run(["run", "paired", "--lr", "1e-3", *tiny, *common], env)
    _run(["run", "half_max_init", "--lr", "1e-3", *tiny, *common], env)
    _run(["timing", "--methods", "lora:4,uniform,paired", "--rounds", "1", "--r-max", "4", *common], env)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["method"] for d in records] == ["base", "paired", "half_max_init", "timing"]
    paired = records[1]
    assert paired["passes"] == 8 and sorted(map(int, paired["curve"])) == [1, 2, 4]
    assert [p["step"] for p in paired["training_curve"]] == [2] and set(paired["training_curve"][0]) >= {"1", "4"}
    assert paired["aurac_log2_em"] == pytest.approx(
        (1 * (paired["curve"]["1"]["exact_match"] + paired["curve"]["2"]["exact_match"]) / 2 +
         1 * (paired["curve"]["2"]["exact_match"] + paired["curve"]["4"]["exact_match"]) / 2) / 2)
    assert records[-1]["ratio_to_lora"]["lora:4"] == 1.0 and set(records[-1]["s_per_step"]) == {"lora:4", "uniform",
                                                                                                "paired"}
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    text = _run(["report", "--out", str(out), "--md", str(md), "--png", str(png)], env)
    assert md.read_text().strip() == text.strip()
    for want in ("Base model (no adapter)", "| paired passes (`max_pass=True`) | 0.001 | 4 | 8 | 1 |",
                 '| one pass, `half_max`, `init="per_rank"` (the default) | 0.001 | 4 | 4 | 1 |', "Time per training step", "Along training"):
        assert want in text, want
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_allocation_benchmark_runs_and_summarises_at_tiny_size(tmp_path):
    base, env = _tiny_base(tmp_path)
    out = tmp_path / "alloc.jsonl"
    proc = subprocess.run(
        [sys.executable, "benchmarks/real_model_allocation.py", "run", "--base", str(base), "--out", str(out),
         "--steps", "2", "--r-max", "4", "--budgets", "1,2", "--n-val", "4", "--calibration-rows", "8",
         "--calibration-batch", "4", "--time-threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kind"], r.get("budget_rank")) for r in records] == [("timing", 4), ("budget", 1), ("budget", 2)]
    one, two = records[1], records[2]
    # the sensitivities were measured once: 1 + 7 module types × (candidates 1, 2 below r_max 4) evaluations
    assert one["sensitivity_evaluations"] == two["sensitivity_evaluations"] == 1 + 7 * 2
    assert one["sensitivity_seconds"] == two["sensitivity_seconds"]
    assert 1 <= one["plan_evaluations"] <= 2 and 1 <= two["plan_evaluations"] <= 2
    assert one["chose"] == "uniform" and one["plan_parameters"] == one["budget"]
    assert two["plan_parameters"] <= two["budget"] == 2 * one["budget"]
    text = subprocess.run([sys.executable, "benchmarks/real_model_allocation.py", "summary", "--out", str(out),
                           "--grid", str(tmp_path / "none.jsonl")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env).stdout
    assert f"| rank 1 | {one['budget']:,} | 1 |" in text and "| rank 2 |" in text and "at 1 thread(s)" in text


@pytest.mark.slow
def test_study_takes_the_encode_task_and_keeps_tasks_apart(tmp_path):
    base, env = _tiny_base(tmp_path)
    out = tmp_path / "encode.jsonl"
    common = ["--base", str(base), "--out", str(out), "--n-val", "4"]
    _run(["base", "--task", "encode", *common], env)
    _run(["run", "lora:2", "--task", "encode", "--lr", "1e-3", "--steps", "2", "--curve-at", "", *common], env)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(d["method"], d["task"]) for d in records] == [("base", "encode"), ("lora:2", "encode")]
    png = tmp_path / "e.png"
    _run(["report", "--out", str(out), "--png", str(png)], env)
    assert png.stat().st_size > 1000
    # an ISO-dates run in the same file: the report refuses to mix tasks and names the fix
    _run(["base", *common], env)
    proc = subprocess.run([sys.executable, "benchmarks/real_model_study.py", "report", "--out", str(out), "--png",
                           str(png)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0 and "own --out" in proc.stderr
