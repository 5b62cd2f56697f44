"""The instruction-tuning data of the recipe: any ``datasets`` source, Alpaca- or GSM8K-style, answer-only loss.

Schemas (detected from the columns, or forced with ``schema``):

- ``"alpaca"``: columns ``instruction``, ``output`` and optionally ``input``;
- ``"gsm8k"``: columns ``question`` and ``answer`` (the final answer follows the last ``####``).

Each example becomes ``prompt + answer + eos``; the loss (labels ≠ -100) covers the answer tokens and the eos
only. Examples longer than ``max_length`` keep their whole prompt and lose the tail of the answer (never all
of it): they are counted and reported. A prompt that leaves no room for a single answer token is an error.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from instruct_base import load_or_explain

RECIPES = Path(__file__).resolve().parent
DEFAULT_DATA = str(RECIPES / "assets" / "data" / "encode.jsonl")

SCHEMAS = {"alpaca": ("instruction", "output"), "gsm8k": ("question", "answer")}
OPTIONAL = {"alpaca": ("input",), "gsm8k": ()}  # may be missing or null; a string when given
TEMPLATES = {
    "gsm8k": "Question: {question}\nAnswer: ",
    "alpaca": ("Below is an instruction that describes a task, paired with an input that provides further context. "
               "Write a response that appropriately completes the request.\n\n"
               "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "alpaca_no_input": ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
}
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
MAX_LINE_BYTES = 16 * 2**20  # a JSON line longer than this is refused unread (no example is that long)
QUOTE_CHARS = 60  # at most this much of a bad line or value is quoted in an error


def final_answer(text: str) -> str:
    """The final answer of a GSM8K-style answer: the text after the last ``####`` (commas and a trailing period
    dropped), else the last number in the text, else the stripped text."""
    if "####" in text:
        ans = text.rsplit("####", 1)[1].strip().split("\n")[0].strip()
    else:
        nums = _NUMBER.findall(text)
        ans = nums[-1] if nums else text.strip()
    return ans.replace(",", "").rstrip(".").strip()


def detect_schema(columns: list[str], schema: str = "auto", source: str = "") -> str:
    """``"alpaca"`` or ``"gsm8k"`` from the column names; a clear error naming what was found otherwise."""
    accepted = "Alpaca-style (instruction, input [optional], output) or GSM8K-style (question, answer)"
    if schema != "auto":
        if schema not in SCHEMAS:
            raise ValueError(f"schema={schema!r} is not one of 'auto', 'alpaca', 'gsm8k'.")
        missing = [c for c in SCHEMAS[schema] if c not in columns]
        if missing:
            raise ValueError(f"The dataset {source} has columns {sorted(columns)} but schema={schema!r} needs "
                             f"{list(SCHEMAS[schema])} (missing {missing}). Accepted schemas: {accepted}; rename the "
                             f"columns (e.g. dataset.rename_column) or choose the matching --data.schema.")
        return schema
    for name, cols in SCHEMAS.items():
        if all(c in columns for c in cols):
            return name
    raise ValueError(f"The dataset {source} has columns {sorted(columns)}, which match no accepted schema: {accepted}. "
                     f"Rename the columns to one of these schemas.")


def render_prompt(example: dict[str, Any], schema: str, template: str) -> str:
    """The prompt text of one example under ``template`` ("auto", a template name, or a format string)."""
    if template == "auto":
        template = schema
    if schema == "alpaca":
        fields = {"instruction": example["instruction"], "input": example.get("input") or ""}
        if template == "alpaca":
            template = "alpaca" if fields["input"].strip() else "alpaca_no_input"
    else:
        fields = {"question": example["question"]}
    fmt = TEMPLATES.get(template, template)
    try:
        return fmt.format(**fields)
    except KeyError as e:
        raise ValueError(f"The prompt template {template!r} uses the field {e} but a {schema}-style example has only "
                         f"{sorted(fields)}: use one of those placeholders or a template name "
                         f"({', '.join(k for k in TEMPLATES if k != 'alpaca_no_input')}).") from None


def answer_text(example: dict[str, Any], schema: str) -> str:
    return example["output"] if schema == "alpaca" else example["answer"]


@dataclass
class Encoded:
    """One tokenised example: ``input_ids`` (prompt + answer + eos), ``n_prompt`` (prompt tokens), the reference
    final answer (GSM8K-style) and whether the answer was truncated."""

    input_ids: list[int]
    n_prompt: int
    reference: str
    truncated: bool


def encode_examples(rows: list[dict[str, Any]], tokenizer, schema: str, template: str, max_length: int,
                    split: str = "train") -> tuple[list[Encoded], int]:
    """Tokenise ``rows``; returns the examples and how many had their answer truncated to fit ``max_length``."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos token: set one (tokenizer.eos_token) so that answers can end.")
    prompts = [render_prompt(r, schema, template) for r in rows]
    answers = [answer_text(r, schema) for r in rows]
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    out, n_trunc = [], 0
    for i, (p, a, ans) in enumerate(zip(p_ids, a_ids, answers)):
        if len(p) >= max_length:
            raise ValueError(f"Example {i} of the {split} split has a prompt of {len(p)} tokens, which leaves no room "
                             f"for its answer within max_length={max_length}: raise --data.max_length (above "
                             f"{len(p)}) or shorten/filter the long prompts.")
        full = a + [eos]
        room = max_length - len(p)
        truncated = len(full) > room
        n_trunc += truncated
        out.append(Encoded(list(p) + full[:room], len(p), final_answer(ans) if schema == "gsm8k" else ans.strip(),
                           truncated))
    return out, n_trunc


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding),
    each ``(batch, longest)``."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        t = torch.tensor(e.input_ids, dtype=torch.long)
        ids[i, :len(t)] = t
        mask[i, :len(t)] = 1
        labels[i, e.n_prompt:len(t)] = t[e.n_prompt:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def load_source(path: str, name: str | None = None, revision: str | None = None, schema: str = "auto"):
    """A ``datasets.DatasetDict`` from a hub name, a local data file (json/jsonl/parquet/csv) or directory.

    Local data files are checked before ``datasets`` reads them (:func:`check_data_file`): a bad row fails with
    one error naming the file, the line (or row) and the problem, instead of deep inside ``datasets``."""
    import datasets

    p = Path(path)
    try:
        if p.is_file():
            builder = _FILE_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise ValueError(f"Cannot read {path}: give a .json, .jsonl, .parquet or .csv file, a directory, or a "
                                 f"dataset name on the hub.")
            check_data_file(p, schema)
            return _load_files(lambda: datasets.load_dataset(builder, data_files={"train": str(p)}), path)
        if p.is_dir():
            if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
                ds = datasets.load_from_disk(str(p))
                return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})
            for f in _data_files_under(p):
                check_data_file(f, schema)
            return _load_files(lambda: datasets.load_dataset(str(p), name), path)
        if any(ch in path for ch in "*?"):
            builder = _FILE_BUILDERS.get(Path(path.replace("*", "x")).suffix.lower(), "json")
            for f in sorted(glob.glob(path)):
                if Path(f).is_file() and Path(f).suffix.lower() in _FILE_BUILDERS:
                    check_data_file(Path(f), schema)
            return _load_files(lambda: datasets.load_dataset(builder, data_files={"train": path}), path)
        return datasets.load_dataset(path, name, revision=revision)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        if p.exists():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        raise ValueError(f"Cannot load the dataset {path!r}: it is not a local file or directory, and the hub "
                         f"{'is switched off on this machine (HF_HUB_OFFLINE=1)' if offline else 'could not be reached'}"
                         f". Point --data.path at a local .jsonl/.json/.parquet/.csv file or a directory "
                         f"(e.g. one written by dataset.save_to_disk). ({type(e).__name__}: {e})") from None


def _load_files(load, path: str):
    """``load()``, with what ``datasets`` could not read reported as one sentence naming ``path``."""
    from datasets.exceptions import DatasetGenerationError

    try:
        return load()
    except DatasetGenerationError as e:
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [""])[0]
        raise ValueError(f"datasets could not read the data in {path}: {type(cause).__name__}: "
                         f"{_cut(first, 4 * QUOTE_CHARS)}") from e


def _data_files_under(directory: Path) -> list[Path]:
    """The data files (json/jsonl/parquet/csv) ``datasets`` may read from ``directory`` (hidden folders skipped)."""
    return [f for f in sorted(directory.rglob("*")) if f.is_file() and f.suffix.lower() in _FILE_BUILDERS
            and not any(part.startswith(".") for part in f.relative_to(directory).parts)]


# --------------------------------------------------------------------------------------- checking the rows
def _cut(text: str, limit: int = QUOTE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _quote(text: str) -> str:
    """``text`` for an error message: its repr, cut to ``QUOTE_CHARS`` characters (and its length said) if longer."""
    if len(text) <= QUOTE_CHARS:
        return repr(text)
    return f"{text[:QUOTE_CHARS]!r}… ({len(text):,} characters)"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _names(keys: Iterable[str]) -> str:
    keys = sorted(map(str, keys))
    return str(keys) if len(keys) <= 10 else str(keys[:10])[:-1] + f", … ({len(keys)} fields)]"


def value_problem(field: str, value: Any, required: bool = True) -> str | None:
    """What is wrong with the value of one field of an example, or ``None`` (a string; optional fields may be null)."""
    if isinstance(value, str) or (value is None and not required):
        return None
    if value is None:
        return f"field {field!r} is null, but it must be text"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (f"field {field!r} is a number ({value}), not text: write it as a string "
                f"(\"{field}\": \"{value}\")")
    shown = value if isinstance(value, bool) else _quote(repr(value))
    return f"field {field!r} is {_kind(value)} ({shown}), not text (a string)"


def field_problem(row: dict[str, Any], schema: str) -> str | None:
    """What is wrong with the fields that ``schema`` reads from one example (``row``), or ``None``: each required
    field present and a string, each optional one (Alpaca's ``input``) a string or null."""
    need = SCHEMAS[schema]
    for field in need + OPTIONAL[schema]:
        required = field in need
        if field not in row:
            if required:
                return (f"the field {field!r} is missing (the row has {_names(row)}); every {schema}-style example "
                        f"needs {' and '.join(map(repr, need))}")
            continue
        problem = value_problem(field, row[field], required)
        if problem:
            return problem
    return None


class _RowCheck:
    """Collects the fields seen in a file and the first bad example of each schema, so that one pass suffices
    whatever schema the file's fields turn out to name (as ``datasets`` sees them: their union)."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path, self.schema, self.rows = path, schema, 0
        self.keys: set[str] = set()
        self.first_problem: dict[str, tuple[str, str]] = {}

    def add(self, row: Any, where: str, shown: str) -> None:
        if not isinstance(row, dict):
            raise ValueError(f"{self.path}, {where}: {_kind(row)} ({shown}), not a JSON object: each example is an "
                             f'object with named fields, e.g. {{"question": "...", "answer": "..."}}.')
        self.rows += 1
        if len(self.keys) < 1000:
            self.keys.update(map(str, row))
        for schema in (SCHEMAS if self.schema == "auto" else [self.schema]):
            if schema not in self.first_problem:
                problem = field_problem(row, schema)
                if problem:
                    self.first_problem[schema] = (where, problem)

    def finish(self) -> int:
        if self.rows == 0:
            _raise_empty(self.path)
        schema = detect_schema(sorted(self.keys), self.schema, str(self.path))
        if schema in self.first_problem:
            where, problem = self.first_problem[schema]
            raise ValueError(f"{self.path}, {where}: {problem}. Fix or remove that row.")
        return self.rows


def _raise_empty(path: Path) -> None:
    raise ValueError(f"The data file {path} holds no examples (its train split would be empty): give a file with "
                     f"at least one example per line (JSONL) or row (Parquet/CSV).")


def _lines(f: BinaryIO):
    """``(line number, bytes)`` of each line of ``f``, each read with at most ``MAX_LINE_BYTES + 1`` bytes in memory:
    a longer line comes back cut (without its newline), and the caller refuses it."""
    n = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        n += 1
        yield n, line


def _decode(raw: bytes, where: str, path: Path, first: bool) -> str:
    if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
        head = raw[:4 * QUOTE_CHARS].decode("utf-8", "replace")
        raise ValueError(f"{path}, {where}: longer than {MAX_LINE_BYTES:,} bytes (it starts {_quote(head)}): a "
                         f"JSON Lines file holds one example per line, and no example is that long. Is this the "
                         f"right file?")
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}, {where}: not UTF-8 text (byte {e.start + 1} of the line is "
                         f"{raw[e.start:e.start + 1]!r}): save the file as UTF-8.") from None


def check_json_lines(path: Path, schema: str = "auto") -> int:
    """Checks a JSON Lines file before ``datasets`` reads it and returns its number of examples.

    Streams the file one line at a time (a line longer than ``MAX_LINE_BYTES`` is refused after reading that
    much). Blank lines are skipped. Every other line must be a JSON object; the fields that the file's schema
    (``schema``, or the one its fields name) reads must be strings (Alpaca's optional ``input``: a string or
    null). The first problem is raised as a ``ValueError`` naming the file, the 1-based line number, and the
    field, quoting at most ``QUOTE_CHARS`` characters of the line."""
    check = _RowCheck(path, schema)
    with path.open("rb") as f:
        for n, raw in _lines(f):
            text = _decode(raw, f"line {n}", path, first=n == 1)
            if not text.strip():
                continue
            text = text.rstrip("\r\n")
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}): "
                                 f"{_quote(text.strip())}. Each non-blank line of a JSON Lines file holds one example, "
                                 f'a JSON object such as {{"question": "...", "answer": "..."}}.') from None
            check.add(row, f"line {n}", _quote(text.strip()))
    return check.finish()


def check_json_document(path: Path, schema: str = "auto") -> int:
    """Checks a ``.json`` file holding one JSON document (an array of example objects, or an object of equally
    long column lists) as :func:`check_json_lines` does, naming the 1-based element (row) of a bad example."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start + 1}): save the file as UTF-8.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}). A .json file holds "
                         f"a JSON array of examples (objects), or one example per line.") from None
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        lengths = {k: len(v) for k, v in doc.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{path}: its columns have different lengths ({lengths}): give every column one value "
                             f"per example.")
        rows: list[Any] = [dict(zip(doc, values)) for values in zip(*doc.values())]
        what = "row"
    elif isinstance(doc, list):
        rows, what = doc, "element"
    else:
        raise ValueError(f"{path}: the document is {_kind(doc)}; a .json file holds an array of examples (objects), "
                         f"or one example per line.")
    check = _RowCheck(path, schema)
    for i, row in enumerate(rows, 1):
        check.add(row, f"{what} {i}", _quote(json.dumps(row)) if not isinstance(row, dict) else "")
    return check.finish()


def check_data_file(path: Path, schema: str = "auto") -> None:
    """Checks a local data file before ``datasets`` reads it: JSON Lines (and ``.json``) row by row
    (:func:`check_json_lines`, :func:`check_json_document`); Parquet and CSV that they hold at least one example
    (their values are checked after loading, :func:`check_rows`). Raises ``ValueError`` naming the file and row."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        check_json_lines(path, schema)
    elif suffix == ".json":
        first_line = b""
        with path.open("rb") as f:
            for _, raw in _lines(f):
                if raw.strip():
                    first_line = raw
                    break
        try:
            one_object = isinstance(json.loads(first_line.decode("utf-8-sig")), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            one_object = False
        if one_object or not first_line.lstrip().startswith((b"[", b"{", b"\xef\xbb\xbf[", b"\xef\xbb\xbf{")):
            check_json_lines(path, schema)  # one example per line (or not JSON at all: say which line)
        else:
            check_json_document(path, schema)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        if pq.ParquetFile(str(path)).metadata.num_rows == 0:
            _raise_empty(path)
    elif suffix == ".csv":
        non_blank = 0
        with path.open("rb") as f:
            for _, raw in _lines(f):
                non_blank += bool(raw.strip())
                if non_blank == 2:  # the header and one row
                    return
        _raise_empty(path)


def check_rows(split, schema: str, where: str) -> None:
    """Every row of a loaded split (a ``datasets.Dataset``) gives ``schema``'s fields as text (optional fields:
    text or null); the first bad row is raised, 1-based, with the field. This catches what no file check sees:
    empty cells of a Parquet or CSV file, data from the hub or from ``save_to_disk``."""
    need = SCHEMAS[schema]
    for field in need + OPTIONAL[schema]:
        if field not in split.column_names:
            continue
        for i, value in enumerate(split[field], 1):
            problem = value_problem(field, value, field in need)
            if problem:
                raise ValueError(f"{where}, row {i}: {problem}. Fix or remove that row.")


class InstructData(pl.LightningDataModule):
    """Instruction data for causal-LM fine-tuning with the loss on answer tokens only.

    Args:
        path: a dataset on the hub (``"openai/gsm8k"``), a local .json/.jsonl/.parquet/.csv file, or a directory.
        name: the dataset configuration on the hub (e.g. ``"main"`` for GSM8K).
        schema: ``"auto"`` (from the columns), ``"alpaca"`` or ``"gsm8k"``.
        template: prompt template: ``"auto"`` (the schema's), ``"gsm8k"``, ``"alpaca"``, or a format string with
            ``{question}`` or ``{instruction}``/``{input}`` placeholders.
        train_split: the split trained on.
        val_split: the split validated on; default ``"validation"`` if the source has one, else a deterministic
            ``val_fraction`` of ``train_split`` (seeded by ``seed``).
        test_split: the split of ``test``; default ``"test"`` if present, else the validation split.
        val_fraction: share of the training split held out when there is no validation split.
        max_length: maximum tokens per example (prompt + answer + eos).
        batch_size: examples per batch (per process).
        max_train_examples / max_val_examples: keep only the first N examples (after the split), for quick runs.
        prompts / prompts_file: for ``predict``: questions (or instructions) given inline or one per line in a file.
        tokenizer: the tokenizer's name or directory (linked to ``--model.name_or_path`` by the CLI).
    """

    def __init__(self, path: str = DEFAULT_DATA, name: str | None = None, schema: str = "auto",
                 template: str = "auto", train_split: str = "train", val_split: str | None = None,
                 test_split: str | None = None, val_fraction: float = 0.1, max_length: int = 512,
                 batch_size: int = 32, max_train_examples: int | None = None, max_val_examples: int | None = None,
                 num_workers: int = 0, seed: int = 0, prompts: list[str] | None = None,
                 prompts_file: str | None = None, tokenizer: str | None = None,
                 trust_remote_code: bool = False) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}.")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
        self.path, self.name, self.schema_arg, self.template = path, name, schema, template
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.val_fraction, self.max_length, self.batch_size = val_fraction, max_length, batch_size
        self.max_train_examples, self.max_val_examples = max_train_examples, max_val_examples
        self.num_workers, self.seed = num_workers, seed
        self.prompts, self.prompts_file = list(prompts or []), prompts_file
        self.tokenizer_name, self.trust_remote_code = tokenizer, trust_remote_code
        self.tokenizer = None
        self.schema: str | None = None
        self.splits: dict[str, list[Encoded]] = {}
        self.truncated: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------------ setup
    def load_tokenizer(self):
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = load_or_explain(AutoTokenizer.from_pretrained, self.tokenizer_name, "tokenizer",
                                             trust_remote_code=self.trust_remote_code)
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        return self.tokenizer

    def setup(self, stage: str) -> None:
        tok = self.load_tokenizer()
        if stage == "predict":
            return
        if self.splits:
            return
        ds = load_source(self.path, self.name, schema=self.schema_arg)
        if self.train_split not in ds:
            raise ValueError(f"The dataset {self.path!r} has no split {self.train_split!r} (it has {sorted(ds)}): "
                             f"set --data.train_split.")
        train = ds[self.train_split]
        self.schema = detect_schema(list(train.column_names), self.schema_arg, repr(self.path))
        for split_name in dict.fromkeys([self.train_split, self.val_split or "validation", self.test_split or "test"]):
            if split_name not in ds:
                continue
            detect_schema(list(ds[split_name].column_names), self.schema, f"{self.path!r} (split {split_name!r})")
            check_rows(ds[split_name], self.schema, f"{self.path} (split {split_name!r})")
        val_name = self.val_split or ("validation" if "validation" in ds else None)
        if val_name is not None:
            if val_name not in ds:
                raise ValueError(f"The dataset {self.path!r} has no split {val_name!r} (it has {sorted(ds)}): set "
                                 f"--data.val_split to one of them, or leave it unset to hold out --data.val_fraction "
                                 f"of the training split.")
            val = ds[val_name]
        else:
            if len(train) < 2:
                raise ValueError(f"The training split of {self.path!r} has {len(train)} example(s): too few to hold "
                                 f"out a validation split.")
            parts = train.train_test_split(test_size=self.val_fraction, seed=self.seed, shuffle=True)
            train, val = parts["train"], parts["test"]
            val_name = f"{self.train_split}[held-out {self.val_fraction:g}, seed {self.seed}]"
        test_name = self.test_split or ("test" if "test" in ds and ds["test"] is not val else None)
        test = ds[test_name] if test_name and test_name in ds else val
        if self.max_train_examples:
            train = train.select(range(min(self.max_train_examples, len(train))))
        if self.max_val_examples:
            val = val.select(range(min(self.max_val_examples, len(val))))
        for split_name, split, label in (("train", train, self.train_split), ("val", val, val_name),
                                         ("test", test, test_name or val_name)):
            if len(split) == 0:
                raise ValueError(f"The {label!r} split of {self.path!r} is empty: give a dataset with examples in it "
                                 f"(check --data.path, the split names and max_*_examples).")
            detect_schema(list(split.column_names), self.schema, f"{self.path!r} (split {label!r})")
            self.splits[split_name], self.truncated[split_name] = encode_examples(
                list(split), tok, self.schema, self.template, self.max_length, str(label))
        self.report()

    def report(self) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        rank_zero_info(f"Data: {self.path} ({self.schema}-style; {sizes} examples; max_length {self.max_length})")
        for k, n in self.truncated.items():
            if n:
                rank_zero_info(f"  {n} of {len(self.splits[k])} {k} examples were longer than max_length="
                               f"{self.max_length}: their answers were cut at the end (prompts kept whole).")

    # ------------------------------------------------------------------------------------------ dataloaders
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, collate_fn=partial(collate, pad_id=pad),
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_prompts(self) -> list[str]:
        """The predict questions: ``prompts`` then the lines of ``prompts_file`` (blank lines skipped)."""
        prompts = list(self.prompts)
        if self.prompts_file:
            prompts += [ln.strip() for ln in Path(self.prompts_file).read_text().splitlines() if ln.strip()]
        if not prompts:
            raise ValueError("predict needs prompts: give --data.prompts '[\"...\"]' or --data.prompts_file FILE "
                             "(one question per line).")
        return prompts

    def predict_dataloader(self) -> DataLoader:
        schema = self.schema_arg if self.schema_arg != "auto" else "gsm8k"
        key = "question" if schema == "gsm8k" else "instruction"
        texts = [render_prompt({key: q, "input": ""}, schema, self.template) for q in self.predict_prompts()]
        return DataLoader(texts, batch_size=self.batch_size, shuffle=False, collate_fn=list)
