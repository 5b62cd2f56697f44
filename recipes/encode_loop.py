"""What the plain-loop studies on the bundled Encode task share (``explore_modes.py``, ``encode_study.py``,
``gradient_share.py``): the recipe's base model and data at its settings, the learning-rate schedule, and the two
scores of an adapter served at one rank.

These studies train without Lightning, so that every step is in view; the recipe (``instruct.py``) is the way to
train.
"""

from __future__ import annotations

from pathlib import Path

import torch

from instruct_data import InstructData
from instruct_encoding import Encoded, final_answer

BASE = Path(__file__).resolve().parent / "assets" / "base"  # the bundled base model (``make_base.py``)
BATCH = 32  # the recipe's batch size
MAX_LENGTH = 64  # the recipe's max_length
MAX_NEW_TOKENS = 12  # greedy tokens generated per answer
GENERATE_CHUNK = 100  # prompts generated together
WARMUP_RATIO = 0.05  # of a schedule's steps, in encode_study.py and gradient_share.py


def load_task() -> InstructData:
    """The bundled Encode task as the recipe reads it (its train/validation split, encoded at ``MAX_LENGTH``)."""
    data = InstructData(tokenizer=str(BASE), max_length=MAX_LENGTH, batch_size=BATCH)
    data.setup("fit")
    return data


def load_base() -> torch.nn.Module:
    """The bundled base model (as ``from_pretrained`` returns it: in eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(BASE))


def warmup_linear_decay(optimizer: torch.optim.Optimizer, total: int, warmup: int):
    """A ``LambdaLR`` over ``total`` steps: linear warm-up over ``warmup`` steps, then linear decay to 0."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))


def token_accuracy(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """The share (%) of answer tokens of ``batch`` (a :func:`~instruct_encoding.collate` batch) predicted right
    under teacher forcing."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    answer = labels != -100
    return 100 * float(((logits.argmax(-1) == labels) & answer).sum() / answer.sum())


def exact_match(model: torch.nn.Module, examples: list[Encoded], tokenizer) -> float:
    """The share (%) of ``examples`` whose greedy answer (at most ``MAX_NEW_TOKENS`` new tokens, prompts
    left-padded, ``GENERATE_CHUNK`` at a time) has the reference final answer."""
    hits = 0
    for start in range(0, len(examples), GENERATE_CHUNK):
        chunk = examples[start:start + GENERATE_CHUNK]
        width = max(e.n_prompt for e in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(chunk):
            ids[row, width - e.n_prompt:] = torch.tensor(e.input_ids[:e.n_prompt])
            mask[row, width - e.n_prompt:] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        hits += sum(final_answer(t) == e.reference for t, e in zip(texts, chunk))
    return 100 * hits / len(examples)
