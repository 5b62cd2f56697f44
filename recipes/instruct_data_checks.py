"""The checks of the recipe's data, before and after ``datasets`` reads it: each bad row is refused with one
error that names the file, the line (or row) and the field, and quotes at most ``QUOTE_CHARS`` characters of it.

JSON Lines files are streamed one line at a time (:func:`check_json_lines`), ``.json`` documents are checked
element by element (:func:`check_json_document`), and :func:`check_data_file` picks between them by the file's
suffix and content. :func:`check_rows` checks a split that is already loaded (Parquet, CSV, the hub, a directory
written by ``save_to_disk``), where no file check can look.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from instruct_encoding import OPTIONAL, SCHEMAS, detect_schema

MAX_LINE_BYTES = 16 * 2**20  # a JSON line longer than this is refused unread (no example is that long)
QUOTE_CHARS = 60  # at most this much of a bad line or value is quoted in an error


def shorten(text: str, limit: int = QUOTE_CHARS) -> str:
    """``text``, cut to ``limit`` characters (an ellipsis marks the cut)."""
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
