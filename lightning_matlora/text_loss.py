"""Mean target-token loss of a causal LM at each rank, on a JSON Lines file of text rows.

A small measurement without a Trainer (``matlora nest --data`` uses it to show what nesting did to each rank):
:func:`read_rows` reads the file, :func:`encode_rows` tokenises each row into (input ids, labels) with the loss on
the target only, and :func:`rank_losses` runs the model at each rank. A row is ``{"text"}`` (loss on all of it),
``{"prompt", "completion"}`` (loss on the completion) or ``{"question", "answer"}``, whose prompt is
``question_format`` (default :data:`QUESTION_FORMAT`, the format of the instruction-tuning recipe).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapted_model import at_rank

#: the prompt of a ``{"question", "answer"}`` row (the recipe's format); the loss covers the answer only
QUESTION_FORMAT = "Question: {question}\nAnswer: "

_ROW_KINDS = "{\"text\": ...}, {\"prompt\": ..., \"completion\": ...} or {\"question\": ..., \"answer\": ...}"


def read_rows(path: str | os.PathLike, max_rows: int | None = None) -> list[dict[str, Any]]:
    """The first ``max_rows`` (all with None; at least 1) rows of a JSON Lines file (or a JSON list) of objects.

    Raises ``FileNotFoundError``/``ValueError`` naming the file (and the line) for a missing file, a directory, a
    file that is not UTF-8 JSON Lines, or rows that are not objects.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> _ = f.write_text('{"text": "a"}\\n{"text": "b"}\\n')
    >>> read_rows(f, max_rows=1)
    [{'text': 'a'}]
    """
    path = Path(path)
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows (--max-rows) must be an integer ≥ 1, or None for every row, got {max_rows!r}.")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give a .jsonl file of rows such as {_ROW_KINDS}.")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a .jsonl file of rows such as {_ROW_KINDS}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): give a UTF-8 JSON Lines file.") from None
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}, line {n} is not JSON ({e}): give one JSON object per line.") \
                            from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON Lines ({e}): give one JSON object per line.") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} holds no rows of JSON objects: give one object per line.")
    return rows if max_rows is None else rows[:max_rows]


def split_row(row: dict[str, Any], question_format: str = QUESTION_FORMAT) -> tuple[str, str]:
    """(prompt, target) of a row: ``{"text"}`` → ("", text); ``{"question", "answer"}`` →
    (``question_format`` filled in, answer); ``{"prompt", "completion"}`` → as given.

    >>> split_row({"question": "2+2?", "answer": "4"})
    ('Question: 2+2?\\nAnswer: ', '4')
    """
    if "text" in row:
        return "", str(row["text"])
    if "question" in row and "answer" in row:
        return question_format.format(question=row["question"]), str(row["answer"])
    if "prompt" in row and "completion" in row:
        return str(row["prompt"]), str(row["completion"])
    raise ValueError(f"A data row has keys {sorted(row)}: give 'text', 'question' and 'answer', or 'prompt' and "
                     f"'completion'.")


def encode_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int = 512,
                question_format: str = QUESTION_FORMAT) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row: prompt + target + eos, labels −100 on the prompt, truncated to ``max_length``
    tokens. Rows with no target token left are dropped; none left at all raises ``ValueError``."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in rows:
        prompt, target = split_row(row, question_format)
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        t = tokenizer(target, add_special_tokens=not prompt)["input_ids"]
        if prompt and tokenizer.bos_token_id is not None and t[:1] == [tokenizer.bos_token_id]:
            t = t[1:]
        ids = (p + t + eos)[:max_length]
        labels = ([-100] * len(p) + t + eos)[:max_length]
        if any(x != -100 for x in labels[1:]):
            out.append((ids, labels))
    if not out:
        raise ValueError("No data row has a target token within max_length: nothing to measure.")
    return out


@torch.no_grad()
def rank_losses(model: nn.Module, encoded: Sequence[tuple[list[int], list[int]]], ranks: Sequence[int],
                batch_size: int = 8, pad_id: int = 0) -> dict[int, float]:
    """Mean next-token loss (nats) over the target tokens of ``encoded`` at each of ``ranks`` (every token weighs
    the same); the model is put back in the mode it was in."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    try:
        for k in ranks:
            total, count = 0.0, 0
            with at_rank(model, int(k)):
                for i in range(0, len(encoded), batch_size):
                    ids, labels, mask = _batch(encoded[i:i + batch_size], pad_id)
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
                    target = labels[:, 1:].to(device)
                    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100, reduction="sum")
                    total += float(loss)
                    count += int((target != -100).sum())
            out[int(k)] = total / count
    finally:
        model.train(was_training)
    return out


def loss_batches(encoded: Sequence[tuple[list[int], list[int]]], batch_size: int = 8, pad_id: int = 0
                 ) -> list[dict[str, torch.Tensor]]:
    """``encoded`` rows as transformers batches (``input_ids``, ``attention_mask``, ``labels``; right-padded), for
    which a causal LM returns its mean loss over the target tokens."""
    out = []
    for i in range(0, len(encoded), batch_size):
        ids, labels, mask = _batch(encoded[i:i + batch_size], pad_id)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _batch(chunk: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(ids, labels, attention mask), each ``len(chunk) × longest``, right-padded."""
    width = max(len(ids) for ids, _ in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    labels = torch.full((len(chunk), width), -100, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for j, (a, b) in enumerate(chunk):
        ids[j, :len(a)], labels[j, :len(b)], mask[j, :len(a)] = torch.tensor(a), torch.tensor(b), 1
    return ids, labels, mask


def load_tokenizer(source: Any) -> Any:
    """A tokenizer: ``source`` itself when it is one, else ``AutoTokenizer.from_pretrained(source)``; a failure
    raises ``ValueError`` naming the source."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    from transformers import AutoTokenizer  # transformers is imported only when a tokenizer is needed

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; one line naming the source
        raise ValueError(f"Could not load a tokenizer from {source} ({type(e).__name__}: {' '.join(str(e).split())}): "
                         f"pass tokenizer=.") from None
