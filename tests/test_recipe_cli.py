"""The recipe's command line as a user sees it: where files land, what is printed (and what is not), errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

import instruct_module as imod  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
SMALL = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.check_val_every_n_epoch", "1", "--model.num_generate", "4"]
# the messages lightning_matlora.quiet hides in our entry points (all harmless; see that module)
NOISE = ("Failed to load CPU gemm_4bit_forward", "Setting accelerator to CPU", "LeafSpec")


def recipe(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RECIPES / "instruct.py"), *args], capture_output=True, text=True,
                          env=ENV, cwd=str(cwd), timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small ``fit`` with ``--model.output_dir``, run like the docs run it (progress bar on)."""
    cwd = tmp_path_factory.mktemp("recipe")
    res = recipe(cwd, "fit", "--model.output_dir", "out", *SMALL)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return cwd, res


def test_output_dir_holds_the_adapter_next_to_the_curve(run):
    """``--model.output_dir DIR``: the adapter is ``DIR/adapter``, where the docs' next command looks."""
    from lightning_matlora import read_adapter

    cwd, res = run
    out = cwd / "out"
    assert (out / "rank_curve.json").is_file()  # the plots are the callback's, one PNG per metric (CHANGELOG)
    plotted = [line.split("Rank curve plotted to ", 1)[1] for line in res.stdout.splitlines()
               if line.startswith("Rank curve plotted to ")]
    assert len(plotted) == 1 and (cwd / plotted[0]).is_file(), res.stdout[-2000:]
    saved = read_adapter(out / "adapter")
    assert saved.r_max == 16 and saved.curves
    assert f"Adapter saved to {Path('out') / 'adapter'}" in res.stdout
    assert not list(cwd.rglob("matlora_adapter"))  # not also in the logger's directory


def test_the_table_comes_after_the_progress_bar_and_the_noise_is_gone(run):
    _, res = run
    out = res.stdout
    # the one rank-curve table is the callback's (Lightning's log, on stderr), with the base model's row
    assert "MatryoshkaLoRA rank curves" in res.stderr and "\n   base " in res.stderr
    advice = out.index("Advice (select_rank")
    assert "Epoch 0/0" in out and out.rindex("Epoch 0/0") < advice  # the last frame of the bar, then the advice
    assert out.rstrip().splitlines()[-1].startswith("Rank curve plotted to")
    for message in NOISE:
        assert message not in out + res.stderr, message


def test_the_bundled_base_is_recorded_relative_to_the_checkout(run):
    """Never this machine's absolute path (a temporary clone's, say) in a shareable adapter."""
    from lightning_matlora import read_adapter

    cwd, _ = run
    assert read_adapter(cwd / "out" / "adapter").base_model_name_or_path == "recipes/assets/base"
    assert imod.DEFAULT_BASE_NAME == "recipes/assets/base" and imod.DEFAULT_BASE != imod.DEFAULT_BASE_NAME


def test_predict_takes_no_run_version(run):
    """``predict`` writes nothing under the run directory, so the next ``fit`` gets version 1 after version 0."""
    cwd, _ = run
    logs = cwd / "runs" / "instruct" / "lightning_logs"
    before = sorted(p.name for p in logs.iterdir())
    assert before == ["version_0"]
    res = recipe(cwd, "predict", "--model.adapter", "out/adapter", "--model.rank", "4", "--data.prompts",
                 '["Encode kaer"]')
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[rank 4] " in res.stdout + res.stderr
    assert sorted(p.name for p in logs.iterdir()) == before
    assert not (logs / "version_0" / "predict").exists() and not list(cwd.glob("lightning_logs"))


def test_the_size_curve_after_fit(tmp_path):
    """``--size_curve.budgets``: after fit, one row per budget with the uniform rank's and the allocated plan's
    parameter count and scores, and the figure."""
    from lightning_matlora import read_adapter
    from lightning_matlora.rank_plan import plan_parameters

    res = recipe(tmp_path, "fit", "--model.output_dir", "out", *SMALL, "--size_curve.budgets", "[2, 1]",
                 "--size_curve.calibration_rows", "8", "--size_curve.plot", "size.png")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    table = out[out.index("Quality against adapter size"):].splitlines()
    assert table[1].split()[:5] == ["budget", "parameters", "loss", "token", "acc"]
    adapter = read_adapter(tmp_path / "out" / "adapter")
    rows = {}
    for line in table[2:4]:
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        rows[int(cells[0].split()[1])] = cells
    assert sorted(rows) == [1, 2]  # sorted by budget
    for k, cells in rows.items():
        uniform, allocated = (int(x.replace(",", "")) for x in cells[1].split(" | "))
        assert uniform == plan_parameters(adapter, k) and allocated <= uniform
    # at rank 1 every layer keeps rank 1: the plan is the uniform rank and the scores are the same
    assert rows[1][-1] == "the uniform rank"
    assert all(a == b for a, b in (c.split(" | ") for c in rows[1][1:-1]))
    assert "Size curve plotted to size.png" in out and (tmp_path / "size.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--model.lr", "0"], "instruct.py fit: error: --model.lr must be > 0, got 0.0."),
    (["--size_curve.budgets", "[1, 32]"], "instruct.py fit: error: --size_curve.budgets [1, 32]: give budgets as "
                                          "uniform ranks in 1…r_max=16"),
    (['--trainer.callbacks=[{"class_path": "lightning_matlora.MatryoshkaLoRA", "init_args": {"r_max": 4, '
      '"ranks": [1, 8]}}]'], "instruct.py fit: error: "),
])
def test_a_bad_option_is_one_line_and_exit_2(tmp_path, args, message):
    res = recipe(tmp_path, "fit", *args)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("instruct.py")]
    assert len(lines) == 1 and lines[0].startswith(message), res.stderr[-2000:]
    assert "Does not validate against any of the Union subtypes" not in lines[0]  # the cause, not the wrapper
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("matlora_adapter"))


def test_the_library_import_silences_nothing():
    """Only the entry points quiet the known messages: importing the package leaves logging and warnings alone."""
    # in a fresh interpreter: an entry point run earlier in this test process (test_cli.py) has quieted them here
    code = ("import logging, warnings, lightning_matlora; from lightning_matlora.quiet import KNOWN_LOG_MESSAGES; "
            "assert all(not logging.getLogger(n).filters for n, _ in KNOWN_LOG_MESSAGES); "
            "assert not any('LeafSpec' in str(getattr(f[1], 'pattern', f[1])) for f in warnings.filters)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_matlora_nest_output_is_quiet(tmp_path):
    """``matlora nest`` imports peft (and with it bitsandbytes and DeepSpeed): their known messages are hidden."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    res = subprocess.run([sys.executable, "-m", "lightning_matlora", "nest", str(tmp_path / "peft"), "--base",
                          str(tmp_path / "base"), "--out", str(tmp_path / "n")], capture_output=True, text=True,
                         env=ENV, cwd=str(tmp_path), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for message in NOISE:
        assert message not in res.stdout + res.stderr, message


# ------------------------------------------------------------------------------------------ report and plot
def test_report_says_when_exact_match_cannot_tell_ranks_apart():
    """The issue's 30-row case: 3 vs 2 right answers is no evidence for rank 1; token accuracy decides instead."""
    from lightning_matlora.curve import RankCurve

    curves = {"loss": RankCurve((1, 16), (1.2, 0.9), "loss", False),
              "token_acc": RankCurve((1, 16), (70.0, 80.0), "token_acc", True),
              "exact_match": RankCurve((1, 16), (10.0, 6.7), "exact_match", True)}
    text = imod.format_advice(curves, n_generated=30)
    assert "cannot tell the ranks apart on 30 examples" in text
    assert "Serve it with --model.rank 16." in text and "--model.rank 1." not in text
    # on 200 examples a 19 % → 73.5 % curve is real: the advice follows exact match as before
    curves["exact_match"] = RankCurve((1, 16), (19.0, 73.5), "exact_match", True)
    text = imod.format_advice(curves, n_generated=200)
    assert "cannot tell" not in text and "Advice (select_rank, exact match)" in text


def test_plot_keeps_a_zero_base_line_visible(tmp_path):
    """A base that scores 0 (or 100) is drawn inside the axes, not on the frame: the plot the callback writes per
    metric (``plot_rank_curves`` with ``base``)."""
    pytest.importorskip("matplotlib")
    from lightning_matlora.curve import plot_rank_curves

    for base, curve in ((0.0, {1: 10.0, 4: 30.0}), (100.0, {1: 40.0, 4: 60.0})):
        fig, ax = plot_rank_curves([curve], labels=["exact match"], base=base)
        fig.savefig(tmp_path / "c.png")
        low, high = ax.get_ylim()
        base_lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("base model")]
        assert [float(ln.get_ydata()[0]) for ln in base_lines] == [base]
        span = high - low  # at least 3 % of the axis height away from the frame
        assert low + 0.03 * span <= base <= high - 0.03 * span
