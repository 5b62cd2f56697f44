"""The recipe's example format and encoding: an instruction example -> prompt text -> token ids and labels.

Schemas (detected from the columns, or forced with ``schema``):

- ``"alpaca"``: columns ``instruction``, ``output`` and optionally ``input``;
- ``"gsm8k"``: columns ``question`` and ``answer`` (the final answer follows the last ``####``).

Each example becomes ``prompt + answer + eos``; the loss (labels ≠ -100) covers the answer tokens and the eos
only. Examples longer than ``max_length`` keep their whole prompt and lose the tail of the answer (never all
of it): they are counted and reported. A prompt that leaves no room for a single answer token is an error.

A prompt template is a format string over the placeholders of :func:`prompt_fields`. To add one, put it in
``TEMPLATES`` under a new name (``--data.template NAME`` then selects it). ``"chat"`` is the tokenizer's own chat
template (``tokenizer.apply_chat_template``): the question (or the instruction, and its input after a blank line)
is the user message, optionally after a ``system`` message, and the prompt ends with the template's assistant
header; the answer and the eos token (for chat models the end-of-turn token, e.g. ``<|im_end|>``) follow it.
``"auto"`` is ``"chat"`` when the tokenizer has a chat template, else the schema's template. :func:`render_prompt`
is the one place where prompts are rendered for training, evaluation and predict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

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
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


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


def prompt_fields(example: dict[str, Any], schema: str) -> dict[str, str]:
    """The placeholders a prompt template may use for one example of ``schema``: ``{question}`` (GSM8K-style), or
    ``{instruction}`` and ``{input}`` (Alpaca-style; ``input`` is ``""`` when missing or null)."""
    if schema == "alpaca":
        return {"instruction": example["instruction"], "input": example.get("input") or ""}
    return {"question": example["question"]}


def uses_chat(template: str, tokenizer: Any) -> bool:
    """Whether ``template`` means the tokenizer's chat template: ``"chat"`` (an error naming the fix when the
    tokenizer has none), or ``"auto"`` with a tokenizer that has one."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise ValueError("--data.template chat uses the tokenizer's chat template, but this tokenizer has none: choose "
                         "a template name (gsm8k, alpaca), a format string, or 'auto'.")
    return template == "chat" or (template == "auto" and has)


def chat_messages(example: dict[str, Any], schema: str, system: str | None = None) -> list[dict[str, str]]:
    """The conversation of one example's prompt: an optional system message, then the user message (the question,
    or the instruction followed by its input after a blank line)."""
    fields = prompt_fields(example, schema)
    user = fields["question"] if schema == "gsm8k" else "\n\n".join(
        t for t in (fields["instruction"], fields["input"]) if t.strip())
    return ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": user}]


def render_prompt(example: dict[str, Any], schema: str, template: str, tokenizer: Any = None,
                  system: str | None = None) -> str:
    """The prompt text of one example under ``template`` ("auto", "chat", a template name, or a format string);
    ``tokenizer`` is needed for ``"chat"`` and ``"auto"``, ``system`` is the chat's system message (``None``: none,
    so the chat template's default applies)."""
    if tokenizer is not None and uses_chat(template, tokenizer):
        return tokenizer.apply_chat_template(chat_messages(example, schema, system), tokenize=False,
                                             add_generation_prompt=True)
    if template == "chat":
        raise ValueError("--data.template chat needs the tokenizer to render prompts.")
    if template == "auto":
        template = schema
    fields = prompt_fields(example, schema)
    if schema == "alpaca" and template == "alpaca" and not fields["input"].strip():
        template = "alpaca_no_input"
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


def prompt_ids(prompts: list[str], tokenizer, template: str) -> list[list[int]]:
    """Token ids of rendered prompts; a chat prompt already holds its special tokens, so none are added."""
    return tokenizer(prompts, add_special_tokens=not uses_chat(template, tokenizer))["input_ids"]


def encode_examples(rows: list[dict[str, Any]], tokenizer, schema: str, template: str, max_length: int,
                    split: str = "train", system: str | None = None) -> tuple[list[Encoded], int]:
    """Tokenise ``rows``; returns the examples and how many had their answer truncated to fit ``max_length``."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos token: set one (tokenizer.eos_token) so that answers can end.")
    prompts = [render_prompt(r, schema, template, tokenizer, system) for r in rows]
    answers = [answer_text(r, schema) for r in rows]
    p_ids = prompt_ids(prompts, tokenizer, template)
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
