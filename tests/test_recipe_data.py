"""The recipe's data files are checked before training: every bad row is refused with its file, line and field."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

import instruct_data as idata  # noqa: E402
import instruct_data_checks as checks  # noqa: E402

# LightningCLI(args=...) warns when pytest's own argv is present; the recipe is driven through args= on purpose
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

BASE = RECIPES / "assets" / "base"
GOOD = [{"question": f"Encode w{i}", "answer": f"#### v{i}"} for i in range(20)]
GOOD_LINES = [json.dumps(r) for r in GOOD]
ALPACA = [json.dumps({"instruction": f"Copy w{i}", "input": "", "output": f"w{i}"}) for i in range(20)]


def _file(tmp_path: Path, lines: list[str], name: str = "bad.jsonl") -> Path:
    f = tmp_path / name
    f.write_text("\n".join(lines) + "\n")
    return f


def _setup(path: Path, **kw) -> idata.InstructData:
    dm = idata.InstructData(path=str(path), tokenizer=str(BASE), **kw)
    dm.setup("fit")
    return dm


# Each case: the lines of a .jsonl file, and what the error must say (the file name is checked for all of them).
BAD_JSONL = {
    "null question (trained on 'Question: None' before)": (
        GOOD_LINES[:3] + ['{"question": null, "answer": "#### x"}'] + GOOD_LINES[3:],
        r"bad\.jsonl, line 4: field 'question' is null"),
    "null answer": (
        GOOD_LINES[:5] + ['{"question": "Encode a", "answer": null}'],
        r"line 6: field 'answer' is null"),
    "malformed JSON line": (
        GOOD_LINES[:2] + ['{"question": "Encode a", "answer": "#### b"'] + GOOD_LINES[2:],
        r"line 3: not valid JSON \(Expecting ',' delimiter at column 44\): '\{\"question\": \"Encode a\""),
    "row missing the answer": (
        GOOD_LINES[:1] + ['{"question": "Encode a"}'] + GOOD_LINES[1:],
        r"line 2: the field 'answer' is missing \(the row has \['question'\]\); every gsm8k-style example needs "
        r"'question' and 'answer'"),
    "integer answer": (
        GOOD_LINES[:4] + ['{"question": "Encode a", "answer": 7}'] + GOOD_LINES[4:],
        r"line 5: field 'answer' is a number \(7\), not text: write it as a string \(\"answer\": \"7\"\)"),
    "list answer": (
        GOOD_LINES + ['{"question": "Encode a", "answer": ["b"]}'],
        r"line 21: field 'answer' is a list \(\"\['b'\]\"\), not text"),
    "a line that is not an object": (
        GOOD_LINES[:1] + ['["Encode a", "#### b"]'],
        r"line 2: a list \('\[\"Encode a\", \"#### b\"\]'\), not a JSON object"),
    "line numbers count blank lines": (
        ["", ""] + GOOD_LINES[:2] + ["", "   "] + ['{"question": "Encode a", "answer": false}'],
        r"line 7: field 'answer' is a boolean \(False\), not text"),
    "alpaca: input of the wrong type": (
        ALPACA[:3] + ['{"instruction": "Copy a", "input": 3, "output": "a"}'],
        r"line 4: field 'input' is a number \(3\)"),
    "alpaca: null output": (
        ALPACA[:3] + ['{"instruction": "Copy a", "input": "", "output": null}'],
        r"line 4: field 'output' is null"),
    "fields of no schema": (
        ['{"prompt": "a", "completion": "b"}'] * 3,
        r"bad\.jsonl has columns \['completion', 'prompt'\], which match no accepted schema"),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_bad_jsonl_row_is_refused_with_file_line_and_field(tmp_path, case):
    lines, want = BAD_JSONL[case]
    f = _file(tmp_path, lines)
    with pytest.raises(ValueError, match=want) as err:
        _setup(f)
    assert str(f) in str(err.value)


def test_ten_megabyte_non_json_line_is_quoted_briefly(tmp_path):
    f = _file(tmp_path, GOOD_LINES[:3] + ["x" * 10 * 2**20] + GOOD_LINES[3:])
    with pytest.raises(ValueError, match=r"line 4: not valid JSON .*'x{60}'… \(10,485,760 characters\)") as err:
        _setup(f)
    assert len(str(err.value)) < 500


def test_a_line_longer_than_the_cap_is_refused_after_reading_the_cap(tmp_path, monkeypatch):
    """Memory stays bounded: a line is read up to MAX_LINE_BYTES + 1 bytes, never whole."""
    monkeypatch.setattr(checks, "MAX_LINE_BYTES", 4096)
    f = _file(tmp_path, GOOD_LINES[:2] + ['{"question": "' + "y" * 100_000 + '", "answer": "#### b"}'])
    with pytest.raises(ValueError, match=r"line 3: longer than 4,096 bytes \(it starts '\{\"question\": \"yyy") as err:
        checks.check_json_lines(f)
    assert len(str(err.value)) < 500
    checks.check_json_lines(_file(tmp_path, GOOD_LINES, "good.jsonl"))  # lines under the cap pass


def test_not_utf8_is_refused_with_its_line(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(("\n".join(GOOD_LINES[:2]) + "\n").encode() + '{"question": "Encode é", "answer": "b"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl, line 3: not UTF-8 text .*save the file as UTF-8"):
        _setup(f)


def test_blank_lines_are_skipped_not_empty(tmp_path):
    """A .jsonl that starts (and ends, and is interleaved) with blank lines holds its rows: all 80 are read."""
    rows = [{"question": f"Encode w{i}", "answer": f"#### v{i}"} for i in range(80)]
    lines = ["", "", "  "] + [json.dumps(r) for r in rows[:40]] + [""] + [json.dumps(r) for r in rows[40:]] + ["", ""]
    f = _file(tmp_path, lines, "blanks.jsonl")
    assert checks.check_json_lines(f) == 80
    dm = _setup(f, val_fraction=0.25)
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (60, 20)
    tok = dm.tokenizer
    seen = {tok.decode(e.input_ids[e.n_prompt:], skip_special_tokens=True) for e in dm.splits["train"] + dm.splits["val"]}
    assert seen == {r["answer"] for r in rows}
    only_blank = _file(tmp_path, ["", "  ", ""], "blank.jsonl")
    with pytest.raises(ValueError, match="holds no examples"):
        _setup(only_blank)


def test_csv_starting_with_blank_lines_is_read(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("\n\nquestion,answer\n" + "".join(f"Encode w{i},#### v{i}\n" for i in range(10)))
    dm = _setup(f, val_fraction=0.2)
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 10
    empty = tmp_path / "e.csv"
    empty.write_text("\n\nquestion,answer\n\n")
    with pytest.raises(ValueError, match="holds no examples"):
        _setup(empty)


def test_csv_that_datasets_cannot_parse_is_one_sentence_naming_the_file(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("question,answer\nEncode a,#### b\nEncode c,#### d,extra\nEncode e,#### f\n")
    with pytest.raises(ValueError, match=r"datasets could not read the data in .*bad\.csv: ParserError: .*"
                                         r"Expected 2 fields in line 3, saw 3"):
        _setup(f)


def test_files_of_a_directory_are_checked(tmp_path):
    (tmp_path / "data").mkdir()
    _file(tmp_path / "data", GOOD_LINES, "train.jsonl")
    _file(tmp_path / "data", GOOD_LINES[:3] + ['{"question": "Encode a", "answer": null}'], "test.jsonl")
    with pytest.raises(ValueError, match=r"data/test\.jsonl, line 4: field 'answer' is null"):
        _setup(tmp_path / "data")
    with pytest.raises(ValueError, match=r"test\.jsonl, line 4: field 'answer' is null"):
        _setup(tmp_path / "data" / "*.jsonl")


def test_json_array_element_is_named(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(GOOD[:2] + [{"question": "Encode a", "answer": None}] + GOOD[2:], indent=1))
    with pytest.raises(ValueError, match=r"d\.json, element 3: field 'answer' is null"):
        _setup(f)
    f.write_text("[\n" + json.dumps(GOOD[0]) + ",\n{\"question\": \n]")
    with pytest.raises(ValueError, match=r"d\.json, line 4, column 1: not valid JSON \(Expecting value\)"):
        _setup(f)
    f.write_text(json.dumps(GOOD, indent=1))  # a well-formed array loads
    assert len(_setup(f).splits["train"]) == 18
    f.write_text("\n".join(GOOD_LINES[:3] + ['{"question": 1, "answer": "b"}']))  # .json with one example per line
    with pytest.raises(ValueError, match=r"d\.json, line 4: field 'question' is a number"):
        _setup(f)


def test_parquet_null_cell_is_named_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["Encode a", "Encode b", "Encode c"], "answer": ["#### a", None, "#### c"]}), f)
    with pytest.raises(ValueError, match=r"d\.parquet \(split 'train'\), row 2: field 'answer' is null"):
        _setup(f)
    pq.write_table(pa.table({"question": ["Encode a", "Encode b"], "answer": [1, 2]}), f)
    with pytest.raises(ValueError, match=r"row 1: field 'answer' is a number \(1\)"):
        _setup(f)


def test_every_row_of_the_bundled_data_passes():
    assert checks.check_json_lines(Path(idata.DEFAULT_DATA)) == 4000


def test_bad_row_fails_in_the_cli_before_training(tmp_path):
    import instruct

    bad = _file(tmp_path, GOOD_LINES + ['{"question": "Encode a", "answer": 3}'])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 21: field 'answer' is a number"):
        instruct.main(["fit", "--data.path", str(bad), "--trainer.default_root_dir", str(tmp_path),
                       "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"])
    assert not list(tmp_path.rglob("*.ckpt"))


# --------------------------------------------------------------------------------------- module structure
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_recipe_modules_import_each_other_without_a_cycle():
    from test_import_graph import find_cycle

    modules = {p.stem: p for p in RECIPES.glob("*.py")}
    graph = {m: (_imports(p) & set(modules)) - {m} for m, p in modules.items()}
    assert graph["instruct"] >= {"instruct_data", "instruct_module"}  # the graph sees the imports
    cycle = find_cycle(graph)
    assert cycle is None, " → ".join(cycle)
    assert "instruct_module" not in graph["instruct_data"]


# ------------------------------------------------------------------------------------------- data order
def test_training_order_is_seeded_and_independent_of_workers(tmp_path):
    """Shuffling is drawn in the main process from ``data.seed``: worker processes give the same batches as none
    (and the collate function pickles, as worker processes started by ``spawn`` on macOS and Windows need), and a
    new loader repeats the first epoch's order."""
    import pickle

    import torch

    f = _file(tmp_path, GOOD_LINES, "d.jsonl")

    def epochs(dm: idata.InstructData, n: int = 2) -> list[list[torch.Tensor]]:
        loader = dm.train_dataloader()
        pickle.dumps(loader.collate_fn)
        return [[b["input_ids"] for b in loader] for _ in range(n)]

    dm = _setup(f, batch_size=4, seed=5)
    ref = epochs(dm)
    assert [len(e) for e in ref] == [5, 5]  # 18 training rows, batch 4 (last batch 2)
    assert any(not torch.equal(a, b) for a, b in zip(*ref))  # each epoch reshuffles...
    assert all(torch.equal(a, b) for a, b in zip(ref[0], epochs(dm, 1)[0]))  # ...the same way every run
    workers = _setup(f, batch_size=4, seed=5, num_workers=2)
    for got, want in zip(epochs(workers), ref):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    other = epochs(_setup(f, batch_size=4, seed=6), 1)[0]
    assert any(not torch.equal(a, b) for a, b in zip(other, ref[0]))


def test_encoding_and_file_checks_stand_apart_from_the_datamodule():
    """The recipe's three data concerns live in three modules: the encoding needs no other recipe module, the file
    checks only the encoding (for the schemas), and neither needs Lightning or the DataModule."""
    modules = {p.stem: p for p in RECIPES.glob("*.py")}
    assert _imports(modules["instruct_encoding"]) & set(modules) == set()
    assert _imports(modules["instruct_data_checks"]) & set(modules) == {"instruct_encoding"}
    assert _imports(modules["instruct_data"]) & set(modules) >= {"instruct_encoding", "instruct_data_checks"}
    for name in ("instruct_encoding", "instruct_data_checks"):
        assert "lightning" not in _imports(modules[name])


def test_no_script_edits_sys_path():
    """Recipes and benchmarks import their sibling modules by name (Python puts a script's own folder first on its
    path) and the library as an installed package: none of them edits ``sys.path``."""
    for path in sorted([*RECIPES.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        tree = ast.parse(path.read_text())
        edits = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
                 and isinstance(node.value, ast.Name) and node.value.id == "sys"]
        assert not edits, f"{path.relative_to(ROOT)} touches sys.path at line(s) {edits}"


def test_scripts_define_no_name_of_the_library():
    """A script that needs the library's AURAC or SVD nesting imports it; a study's own variant has its own name."""
    import lightning_matlora

    public = set(lightning_matlora.__all__)
    for path in sorted([*RECIPES.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        defined = {node.name for node in ast.parse(path.read_text()).body
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & public, f"{path.relative_to(ROOT)} redefines {sorted(defined & public)}"
