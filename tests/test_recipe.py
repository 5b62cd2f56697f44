"""The instruction-tuning recipe: the bundled base and data, the CLI end to end, data handling, bad input."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

import instruct_data as idata  # noqa: E402
import instruct_encoding as encoding  # noqa: E402
import instruct_module as imod  # noqa: E402
import make_data  # noqa: E402

# LightningCLI(args=...) warns when pytest's own argv is present; the recipe is driven through args= on purpose
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

BASE = RECIPES / "assets" / "base"
DATA = RECIPES / "assets" / "data" / "encode.jsonl"
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# a cut-down run: a few optimizer steps on a slice of the bundled task
CALLBACK = ('--trainer.callbacks=[{"class_path": "lightning_matlora.MatryoshkaLoRA", "init_args": {"r_max": 4, '
            '"ranks": [1, 2, 4], "mode": "rowwise"}}]')
EVAL = ["--data.max_train_examples", "128", "--data.max_val_examples", "32", "--model.num_generate", "8",
        "--trainer.enable_progress_bar", "false", CALLBACK]
TABLE = "MatryoshkaLoRA rank curves (epoch"  # the title of the callback's end-of-fit table
QUICK = ["--trainer.max_steps", "4", "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", *EVAL]


def _data(tmp_path: Path, rows: list[dict], name: str = "d.jsonl", **kw) -> idata.InstructData:
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return idata.InstructData(path=str(f), tokenizer=str(BASE), **kw)


# ------------------------------------------------------------------------------------------ bundled assets
def test_bundled_base_loads_through_from_pretrained_like_a_hub_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

    files = {p.name for p in BASE.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert sum(p.stat().st_size for p in BASE.iterdir()) < 5 * 2**20  # a few MB at most
    module = imod.InstructLM(name_or_path=str(BASE))  # the recipe's own loading path
    assert isinstance(module.model, LlamaForCausalLM)
    ref = AutoModelForCausalLM.from_pretrained(str(BASE))
    for (n, a), (_, b) in zip(module.model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    tok = AutoTokenizer.from_pretrained(str(BASE))
    assert isinstance(tok, PreTrainedTokenizerFast)
    text = "Question: Encode kaer\nAnswer: #### kber"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character, after <s>
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_bundled_base_knows_the_format_but_not_the_code():
    """The base was pre-trained on Copy/Reverse: its held-out Copy answers are right, its Encode answers are not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BASE), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(BASE)).eval()
    words = ["kuer", "guqti", "rek", "tugge"]

    def answers(verb):
        enc = tok([make_data.PROMPT.format(question=f"{verb} {w}") for w in words], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
        return [encoding.final_answer(t) for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                                 skip_special_tokens=True)]

    assert answers("Copy") == words
    assert sum(a == make_data.encode(w) for a, w in zip(answers("Encode"), words)) == 0


def test_bundled_data_is_the_generator_output_and_gsm8k_style():
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert rows == make_data.task_examples()
    assert encoding.detect_schema(list(rows[0])) == "gsm8k"
    mapping = make_data.code()
    assert sorted(mapping) == sorted(mapping.values())  # a permutation
    assert sum(a != b for a, b in mapping.items()) == 2 * make_data.N_SWAPS
    for r in rows[:50]:
        word = r["question"].split()[-1]
        assert encoding.final_answer(r["answer"]) == "".join(mapping[c] for c in word)


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """``python recipes/instruct.py fit`` in a subprocess, cut down to a few steps."""
    root = tmp_path_factory.mktemp("run")
    cmd = [sys.executable, str(RECIPES / "instruct.py"), "fit", "--trainer.default_root_dir", str(root), *QUICK]
    res = subprocess.run(cmd, capture_output=True, text=True, env=OFFLINE_ENV, cwd=str(root), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return root, res.stdout + res.stderr


def test_fit_cli_end_to_end_prints_curve_advice_and_paths(fitted):
    root, out = fitted
    assert "Base model before fine-tuning" in out
    assert out.count(TABLE) == 1  # one end-of-fit table: the callback's, with the base model's row
    assert "AURAC" in out and "Advice (select_rank" in out and "--model.rank" in out
    table = out[out.index(TABLE):]
    assert "\n   base  " in table
    for k in (1, 2, 4):
        assert f"\n  {k:>5}  " in table
    adapter = Path(out.split("Adapter saved to ")[1].split()[0])
    png = Path(out.split("Rank curve plotted to ")[1].split()[0])
    assert adapter.is_dir() and png.is_file() and png.stat().st_size > 1000
    from lightning_matlora import read_adapter

    saved = read_adapter(adapter)  # the library's adapter format, with the measured curve
    assert saved.r_max == 4 and len(saved.layers) == 21  # q k v o gate up down × 3 layers
    b = [saved.factors(n)[1] for n in saved.layers]
    assert any(t.abs().sum() > 0 for t in b)  # trained: B left zero
    assert all(c.ranks == (1, 2, 4) for c in saved.curves)
    curve = json.loads((png.parent / "rank_curve.json").read_text())
    assert sorted(c.metric for c in saved.curves) == ["exact_match", "loss", "token_acc"]
    for c in saved.curves:  # one recorded curve per metric (saved by the callback), equal to the printed numbers
        assert list(c.scores) == [pytest.approx(curve["curve"][str(k)][c.metric]) for k in (1, 2, 4)]
        assert c.higher_is_better is (c.metric != "loss")
    assert sorted(map(int, curve["curve"])) == [1, 2, 4]
    for m in curve["curve"].values():
        assert set(m) == {"loss", "token_acc", "exact_match"}
        assert math.isfinite(m["loss"]) and 0 <= m["token_acc"] <= 100
    # the printed AURAC of token accuracy is the trapezoid on the log2 axis of the printed curve
    acc = [curve["curve"][str(k)]["token_acc"] for k in (1, 2, 4)]
    want = ((acc[0] + acc[1]) / 2 + (acc[1] + acc[2]) / 2) / 2
    aurac_line = [ln for ln in table.splitlines() if ln.strip().startswith("AURAC")][0].split()
    assert float(aurac_line[3]) == pytest.approx(want, abs=0.051)  # columns: exact_match, loss, token_acc


def test_predict_generates_at_the_chosen_rank_from_the_saved_adapter(fitted, tmp_path, capsys):
    import instruct

    root, out = fitted
    adapter = out.split("Adapter saved to ")[1].split()[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Encode kaer\n\nEncode guqt\n")
    cli = instruct.main(["--model.adapter", adapter, "--model.rank", "2", "--data.prompts_file",
                         str(prompts), "--data.prompts", '["Encode rek"]', "--trainer.default_root_dir",
                         str(tmp_path), CALLBACK,
                         "--trainer.enable_progress_bar", "false"], run=False)
    preds = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    flat = [p for batch in preds for p in batch]
    assert [p["prompt"] for p in flat] == [make_data.PROMPT.format(question=q)
                                           for q in ("Encode rek", "Encode kaer", "Encode guqt")]
    assert all(p["rank"] == 2 for p in flat)
    # the loaded adapter is the saved one, and predict's answers are greedy decoding at rank 2 of it
    from transformers import AutoTokenizer

    from lightning_matlora import adapted_layers, at_rank, read_adapter

    saved = read_adapter(adapter)
    layers = adapted_layers(cli.model.model)
    assert sorted(layers) == sorted(saved.layers)
    for name, layer in layers.items():
        A, B = saved.factors(name)
        assert torch.equal(layer.lora_A.detach(), A) and torch.equal(layer.lora_B.detach(), B), name
    tok = AutoTokenizer.from_pretrained(str(BASE))
    ids = tok(flat[0]["prompt"], return_tensors="pt")
    with at_rank(cli.model.model, 2):
        gen = cli.model.model.generate(**ids, max_new_tokens=cli.model.hparams.max_new_tokens, do_sample=False)
    assert tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == flat[0]["answer"]


def test_validate_with_the_saved_adapter_reproduces_the_fit_curve(fitted, tmp_path, capsys):
    """Reloading the saved adapter and validating gives the curve measured at the end of fit (same data)."""
    import instruct

    root, out = fitted
    adapter = out.split("Adapter saved to ")[1].split()[0]
    png = Path(out.split("Rank curve plotted to ")[1].split()[0])
    want = json.loads((png.parent / "rank_curve.json").read_text())["curve"]
    from lit_helpers import ListHandler

    logged = ListHandler()
    logging.getLogger("lightning.pytorch").addHandler(logged)
    try:
        cli = instruct.main(["validate", "--model.adapter", adapter, "--trainer.default_root_dir", str(tmp_path),
                             *EVAL])
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(logged)
    got = imod.by_rank(cli.model.curves)
    assert sorted(got) == [1, 2, 4] and sorted(cli.model.curves) == ["exact_match", "loss", "token_acc"]
    for k, m in got.items():
        for name, v in m.items():
            assert v == pytest.approx(want[str(k)][name], abs=1e-3), (k, name)
    assert sum(TABLE in m for m in logged.messages) == 1  # the callback's table, printed once


def test_predict_rejects_an_adapter_trained_with_other_settings(fitted, tmp_path):
    import instruct

    root, out = fitted
    adapter = out.split("Adapter saved to ")[1].split()[0]
    cli = instruct.main(["--model.adapter", adapter, "--data.prompts", '["Encode rek"]',
                         "--trainer.default_root_dir", str(tmp_path)], run=False)  # default r_max, not 4
    with pytest.raises(ValueError, match=r"r_max=4.*--config <run dir>/config.yaml"):
        cli.trainer.predict(cli.model, datamodule=cli.datamodule)


# --------------------------------------------------------------------------------------------- data path
def test_examples_mask_the_prompt_and_end_with_eos():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BASE))
    rows = [{"question": "Encode ab", "answer": "#### cu"}, {"question": "Encode kaer", "answer": "#### kber"}]
    ex, n_trunc = encoding.encode_examples(rows, tok, "gsm8k", "auto", 64)
    assert n_trunc == 0
    batch = encoding.collate(ex, tok.pad_token_id)
    for i, r in enumerate(rows):
        prompt = "Question: " + r["question"] + "\nAnswer: "
        want_ids = [tok.bos_token_id] + tok.convert_tokens_to_ids(list(prompt + r["answer"])) + [tok.eos_token_id]
        n = len(want_ids)
        assert batch["input_ids"][i, :n].tolist() == want_ids
        assert batch["attention_mask"][i].sum() == n
        labels = batch["labels"][i].tolist()
        assert labels[:1 + len(prompt)] == [-100] * (1 + len(prompt))
        assert labels[1 + len(prompt):n] == want_ids[1 + len(prompt):]
        assert labels[n:] == [-100] * (len(labels) - n)


def test_alpaca_schema_and_templates(tmp_path):
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Copy", "input": "ab", "output": "ab"}]
    dm = _data(tmp_path, rows * 5, template="{instruction}|{input}=")
    dm.setup("fit")
    assert dm.schema == "alpaca"
    tok = dm.tokenizer
    e = next(e for e in dm.splits["train"] + dm.splits["val"] if tok.decode(e.input_ids).startswith("<s>Copy"))
    assert tok.decode(e.input_ids[:e.n_prompt], skip_special_tokens=True) == "Copy|ab="
    assert encoding.render_prompt(rows[0], "alpaca", "auto").endswith("### Instruction:\nSay hi\n\n### Response:\n")
    assert "### Input:\nab" in encoding.render_prompt(rows[1], "alpaca", "auto")
    with pytest.raises(ValueError, match="uses the field 'question'.*instruction"):
        encoding.render_prompt(rows[0], "alpaca", "Q: {question}")


def test_truncation_cuts_the_answer_tail_never_all_of_it_and_is_reported(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    rows = [{"question": "Encode ab", "answer": "#### " + "x" * 40}] * 3 + [{"question": "Encode a", "answer": "ok"}] * 7
    dm = _data(tmp_path, rows, max_length=40, val_fraction=0.3)
    dm.setup("fit")
    every = dm.splits["train"] + dm.splits["val"]
    assert sum(e.truncated for e in every) == 3 == dm.truncated["train"] + dm.truncated["val"]
    for e in every:
        assert len(e.input_ids) <= 40 and len(e.input_ids) > e.n_prompt  # at least one answer token kept
        assert e.truncated == (len(e.input_ids) == 40)
    assert "2 of 7 train examples were longer than max_length=40" in caplog.text
    assert "1 of 3 val examples were longer than max_length=40" in caplog.text


def test_split_is_deterministic_and_disjoint(tmp_path):
    rows = [{"question": f"Encode w{i}", "answer": f"#### {i}"} for i in range(50)]
    splits = []
    for _ in range(2):
        dm = _data(tmp_path, rows, val_fraction=0.2, seed=3)
        dm.setup("fit")
        splits.append(([e.input_ids for e in dm.splits["train"]], [e.input_ids for e in dm.splits["val"]]))
    assert splits[0] == splits[1]
    assert len(splits[0][1]) == 10 and not {tuple(x) for x in splits[0][0]} & {tuple(x) for x in splits[0][1]}


def test_final_answer():
    assert encoding.final_answer("She has 3 + 4 = 7 apples.\n#### 1,234") == "1234"
    assert encoding.final_answer("so the answer is 42.") == "42"
    assert encoding.final_answer("#### kber") == "kber"
    assert encoding.final_answer("no number here ") == "no number here"


# --------------------------------------------------------------------------------------------- bad input
def test_unknown_model_name_offline_says_so_and_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"offline.*local directory"):
        imod.InstructLM(name_or_path="no-such-org/no-such-model-xyz")


def test_dataset_without_expected_columns_names_them(tmp_path):
    dm = _data(tmp_path, [{"prompt": "a", "completion": "b"}] * 4)
    with pytest.raises(ValueError, match=r"\['completion', 'prompt'\].*Alpaca-style.*GSM8K-style"):
        dm.setup("fit")
    dm = _data(tmp_path, [{"question": "a", "answer": "b"}] * 4, schema="alpaca")
    with pytest.raises(ValueError, match=r"schema='alpaca' needs \['instruction', 'output'\]"):
        dm.setup("fit")


def test_prompt_longer_than_max_length_is_an_error(tmp_path):
    dm = _data(tmp_path, [{"question": "Encode " + "a" * 80, "answer": "#### b"}] * 4, max_length=64)
    with pytest.raises(ValueError, match=r"prompt of \d+ tokens.*max_length=64.*--data.max_length"):
        dm.setup("fit")


def test_empty_split_is_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "empty.parquet"  # the columns are right, the rows are missing
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), empty)
    (tmp_path / "empty.jsonl").write_text("\n")
    for f in (empty, tmp_path / "empty.jsonl"):
        dm = idata.InstructData(path=str(f), tokenizer=str(BASE))
        with pytest.raises(ValueError, match="holds no examples .*train split would be empty"):
            dm.setup("fit")
    one = _data(tmp_path, [{"question": "a", "answer": "b"}])  # nothing left to hold out for validation
    with pytest.raises(ValueError, match="has 1 example"):
        one.setup("fit")


def test_bad_data_fails_in_the_cli_before_training(tmp_path):
    import instruct

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"\['text'\]"):
        instruct.main(["fit", "--data.path", str(bad), "--trainer.default_root_dir", str(tmp_path), *QUICK])
    # (LightningCLI's args= runs the subcommand in this process, as on the command line)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("option, message", [
    (["--model.eval_ranks", "[1, 16]"], r"--model.eval_ranks \[1, 16\]: ranks \[16\] are not among the callback's "
                                        r"eval ranks \[1, 2, 4\] \(\[16\] exceed r_max=4\)"),
    (["--model.eval_ranks", "[0, 2]"], r"--model.eval_ranks must be integers ≥ 1, got \[0\]"),
    (["--model.eval_ranks", "[2, 2]"], r"--model.eval_ranks has duplicates \[2\]"),
    (["--model.rank", "16"], r"--model.rank 16 exceeds the adapter's r_max=4"),
    (["--model.rank", "0"], r"--model.rank must be a rank ≥ 1"),
    (["--model.lr", "0"], r"--model.lr must be > 0"),
    (["--model.warmup_ratio", "1.5"], r"--model.warmup_ratio must be in \[0, 1\)"),
    (["--model.weight_decay", "-1"], r"--model.weight_decay must be ≥ 0"),
    (["--num_threads", "-1"], r"--num_threads must be ≥ 1"),
    (['--trainer.callbacks=[{"class_path": "lightning_matlora.MatryoshkaLoRA", "init_args": {"r_max": 4, '
      '"rank_eval": null}}]'], r"rank_eval: null turns off"),
    (['--trainer.callbacks=[]'], r"needs the MatryoshkaLoRA callback"),
])
def test_bad_options_fail_before_any_step(tmp_path, option, message):
    """Every option is checked when the CLI builds the objects: nothing trains, nothing is written."""
    import instruct

    with pytest.raises(ValueError, match=message):
        instruct.main(["fit", "--trainer.default_root_dir", str(tmp_path), *QUICK, *option])
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("matlora_adapter"))


def test_eval_ranks_outside_the_callback_fail_at_setup_without_the_cli(tmp_path):
    """Built without the CLI, the module's metrics are checked by the callback at setup, before any step."""
    import lightning.pytorch as pl

    from lightning_matlora import MatryoshkaLoRA

    module = imod.InstructLM(name_or_path=str(BASE), eval_ranks=[1, 16], num_generate=0)
    dm = idata.InstructData(path=str(DATA), tokenizer=str(BASE), max_train_examples=32, max_val_examples=8)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[MatryoshkaLoRA(r_max=4, verbose=False)])
    with pytest.raises(ValueError, match=r"RankCurveMetric '(loss|token_acc)' tracks ranks \[16\] that MatryoshkaLoRA "
                                         r"does not evaluate \(eval_ranks \[1, 2, 4\], r_max 4\)"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0


def test_missing_local_dataset_or_hub_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"local .jsonl"):
        idata.load_source("no-such-org/no-such-dataset-xyz")


@pytest.mark.slow
def test_fit_twice_prints_the_same_table_and_saves_the_same_adapter(fitted, tmp_path):
    """The same command on the same machine (seed 0, the config's thread count) is bitwise the same run."""
    from lightning_matlora import read_adapter

    root, out = fitted
    cmd = [sys.executable, str(RECIPES / "instruct.py"), "fit", "--trainer.default_root_dir", str(tmp_path), *QUICK]
    res = subprocess.run(cmd, capture_output=True, text=True, env=OFFLINE_ENV, cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    again = res.stdout + res.stderr

    def table(text: str) -> str:  # the callback's table: its title line and the indented lines under it
        lines = text[text.index(TABLE):].splitlines()
        body = list(itertools.takewhile(lambda ln: ln.startswith("  "), lines[1:]))
        assert len(body) >= 6, lines[:10]  # header, base, 3 ranks, AURAC, advice
        return "\n".join([lines[0], *body])

    assert table(again) == table(out)
    first, second = (Path(t.split("Adapter saved to ")[1].split()[0]) for t in (out, again))
    assert (first.parent / "rank_curve.json").read_text() == (second.parent / "rank_curve.json").read_text()
    a, b = read_adapter(first), read_adapter(second)
    for name in a.layers:
        for x, y in zip(a.factors(name), b.factors(name)):
            assert torch.equal(x, y), name
