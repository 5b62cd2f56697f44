"""The recipe on chat models: the tokenizer's chat template, answer-only labels, and a GGUF file as the base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_helpers import tiny_llama_for_gguf, write_gguf

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

import instruct_data as idata  # noqa: E402
import instruct_encoding as encoding  # noqa: E402
import make_iso_dates  # noqa: E402

pytest.importorskip("gguf")
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
BUNDLED = RECIPES / "assets" / "base"


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny GGUF Llama with a byte-level tokenizer and a chat template, the cache it is converted into)."""
    d = tmp_path_factory.mktemp("chat")
    return write_gguf(d / "tiny-chat.gguf", tiny_llama_for_gguf()), d / "cache"


@pytest.fixture
def chat_tok(chat_base, monkeypatch):
    from transformers import AutoTokenizer

    from lightning_matlora.gguf_base import resolve_base

    path, cache = chat_base
    monkeypatch.setenv("LIGHTNING_MATLORA_CACHE", str(cache))
    return AutoTokenizer.from_pretrained(resolve_base(path))


def _rows(tmp_path: Path, rows: list[dict]) -> Path:
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_chat_labels_are_the_answer_and_end_of_turn_of_an_independent_tokenization(chat_tok):
    rows = [{"question": "the date 1 May", "answer": "#### 05-01"}, {"question": "hi", "answer": "the cat"}]
    for template in ("chat", "auto"):  # auto: the tokenizer has a chat template, so it is used
        encoded, _ = encoding.encode_examples(rows, chat_tok, "gsm8k", template, max_length=200)
        batch = encoding.collate(encoded, chat_tok.pad_token_id)
        for i, r in enumerate(rows):
            # independent: the whole conversation, answer included, rendered and tokenized by the tokenizer
            whole = chat_tok.apply_chat_template([{"role": "user", "content": r["question"]},
                                                  {"role": "assistant", "content": r["answer"]}], tokenize=True)
            whole = list(whole["input_ids"] if isinstance(whole, dict) or hasattr(whole, "keys") else whole)
            n = len(encoded[i].input_ids)
            assert encoded[i].input_ids == whole[:n] and chat_tok.decode(whole[n:]) == "\n"
            labels = batch["labels"][i].tolist()
            answer = [t for t in labels if t != -100]
            assert labels[:encoded[i].n_prompt] == [-100] * encoded[i].n_prompt
            assert chat_tok.decode(answer) == r["answer"] + "<|im_end|>"
            assert answer[-1] == chat_tok.eos_token_id
            prompt = chat_tok.decode(encoded[i].input_ids[:encoded[i].n_prompt])
            assert prompt == f"<|im_start|>user\n{r['question']}<|im_end|>\n<|im_start|>assistant\n"


def test_system_message_and_alpaca_input_in_the_chat(chat_tok):
    ex = {"instruction": "Sort", "input": "b a"}
    text = encoding.render_prompt(ex, "alpaca", "chat", chat_tok, system="")
    assert text == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nSort\n\nb a<|im_end|>\n<|im_start|>assistant\n"
    assert "Sort<|im_end|>" in encoding.render_prompt({"instruction": "Sort"}, "alpaca", "chat", chat_tok)


def test_auto_keeps_the_schema_template_without_a_chat_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BUNDLED))
    assert not tok.chat_template
    assert encoding.render_prompt({"question": "Encode ab"}, "gsm8k", "auto", tok) == "Question: Encode ab\nAnswer: "
    with pytest.raises(ValueError, match="tokenizer's chat template, but this tokenizer has none: choose"):
        encoding.render_prompt({"question": "Encode ab"}, "gsm8k", "chat", tok)


def test_data_module_encodes_with_the_chat_template(chat_base, chat_tok, tmp_path, monkeypatch):
    from lightning_matlora.gguf_base import resolve_base

    f = _rows(tmp_path, make_iso_dates.examples(20))
    dm = idata.InstructData(path=str(f), tokenizer=resolve_base(chat_base[0]), template="chat", max_length=200,
                            val_fraction=0.25)
    dm.setup("fit")
    e = dm.splits["val"][0]
    assert chat_tok.decode(e.input_ids[:e.n_prompt]).startswith("<|im_start|>user\nConvert the date to ISO format: ")
    assert e.reference.count("-") == 2 and len(e.reference) == 10  # the ISO date after ####
    assert dm.prompt_ids(["<|im_start|>user\nx"]) == [chat_tok("<|im_start|>user\nx", add_special_tokens=False)
                                                      ["input_ids"]]


def test_iso_dates_file_is_the_generator_output():
    rows = [json.loads(line) for line in make_iso_dates.DATA_FILE.read_text().splitlines()]
    assert rows == make_iso_dates.examples()
    not_may = [r["question"] for r in rows if "May" not in r["question"]]  # "May 1, 2000" is both form 0 and 2
    assert len(set(not_may)) == len(not_may)
    import datetime

    for r in rows[:200]:
        date = encoding.final_answer(r["answer"])
        d = datetime.date.fromisoformat(date)
        assert make_iso_dates.MONTHS[d.month - 1][:3] in r["question"] and str(d.year) in r["question"]


def test_fit_from_a_gguf_file_with_the_chat_template(chat_base, tmp_path):
    """``fit`` with ``--model.name_or_path FILE.gguf``: the file is converted into the cache once, the run uses the
    chat template and prints the rank table."""
    path, _ = chat_base
    cache = tmp_path / "cache"
    data = _rows(tmp_path, make_iso_dates.examples(40))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "LIGHTNING_MATLORA_CACHE": str(cache)}
    cmd = [sys.executable, str(RECIPES / "instruct.py"), "fit", "--trainer.default_root_dir", str(tmp_path / "run"),
           "--model.name_or_path", str(path), "--data.path", str(data), "--data.template", "chat",
           "--data.max_length", "80", "--data.batch_size", "4", "--model.num_generate", "4",
           "--model.max_new_tokens", "4", "--data.max_train_examples", "8", "--trainer.max_epochs", "1",
           "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
           '--trainer.callbacks=[{"class_path": "lightning_matlora.MatryoshkaLoRA", "init_args": {"r_max": 4, '
           '"ranks": [1, 2, 4]}}]']
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "AURAC" in out and "Advice (select_rank" in out and "Rank curve plotted to " in out
    assert [p.name.startswith("tiny-chat") for p in (cache / "gguf").iterdir()] == [True]
    config = (tmp_path / "run" / "lightning_logs" / "version_0" / "config.yaml").read_text()
    assert "template: chat" in config


def test_smollm2_config_validates_at_the_end_of_its_run():
    """The config's one epoch must end with a validation, or the run prints no rank table (the default config
    validates every 2 epochs)."""
    import yaml

    cfg = yaml.safe_load((RECIPES / "configs" / "smollm2.yaml").read_text())
    assert cfg["trainer"]["max_epochs"] % cfg["trainer"]["check_val_every_n_epoch"] == 0
    assert cfg["model"]["name_or_path"] == "smollm2" and cfg["data"]["template"] == "chat"
    assert cfg["data"]["max_train_examples"] // cfg["data"]["batch_size"] == 20  # the study's 20 steps
