"""Nest an existing PEFT LoRA adapter: read it, reorder every layer by SVD, measure it, save it as a nested adapter.

The nested adapter serves rank k as each layer's best rank-k approximation of the PEFT update, and rank r_max as
the PEFT adapter itself (to float rounding). It is stored with ``scaling="none"``, ``rank_scale="rank"`` and
``alpha`` = PEFT's scale (``lora_alpha/r``, or ``lora_alpha/√r`` with rslora) of its largest-rank layers, so that
every rank is served with that one scale; ``mode="rowwise"`` with the default train ranks (powers of two up to
r_max), so ``matlora export --rank all`` writes those ranks and further ``rowwise`` training trains every rank
as it is served. Layers of smaller rank (``rank_pattern``) are padded with zero components.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layer import is_supported, layer_dims
from .nesting import NestReport, nest_by_svd
from .peft_lora import PeftLoRA, read_peft_lora

_AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                 "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
                 "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


@dataclasses.dataclass
class NestResult:
    """What :func:`nest_adapter` produced.

    path: the nested adapter directory. model: the base model with the nested adapter loaded (adapted in place).
    report: the :class:`NestReport` of the SVD. curve / unnested_curve: mean loss per rank on ``eval_data`` of the
    nested adapter and of the PEFT adapter truncated to each rank as it was ordered before nesting (None without
    ``eval_data``).

    See :func:`nest_adapter` for an example.
    >>> NestResult(path=Path("nested"), model=nn.Linear(2, 2), report=None).curve is None
    True
    """

    path: Path
    model: nn.Module
    report: NestReport
    curve: dict[int, float] | None = None
    unnested_curve: dict[int, float] | None = None


# ----------------------------------------------------------------------------------------------- the base
def load_base(base: str | os.PathLike, task_type: str | None) -> nn.Module:
    """``from_pretrained`` with the transformers auto class of PEFT's ``task_type`` (causal LM by default)."""
    import transformers

    cls = getattr(transformers, _AUTO_CLASSES.get(task_type or "CAUSAL_LM", "AutoModelForCausalLM"))
    return cls.from_pretrained(str(base)).eval()


def check_fits(peft: PeftLoRA, model: nn.Module) -> None:
    """Every PEFT layer exists in ``model``, is a Linear/Conv1D layer and has the factors' shapes; every
    ``modules_to_save`` tensor exists with its shape. Raises ``ValueError`` naming the first difference."""
    modules = dict(model.named_modules())
    base_name = peft.config.get("base_model_name_or_path")
    made_for = f" (it was made for {base_name!r})" if base_name else ""
    for name, (A, B, _) in peft.layers.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"The base model has no layer {name!r}: the PEFT adapter belongs to a different base "
                             f"model{made_for}.")
        if not is_supported(module):
            raise ValueError(f"Layer {name!r} of the base model is a {type(module).__name__}; only LoRA on Linear (and "
                             f"GPT-2 Conv1D) layers can be nested.")
        in_f, out_f = layer_dims(module)
        if (A.shape[1], B.shape[0]) != (in_f, out_f):
            raise ValueError(f"Shape mismatch at layer {name!r}: the base layer maps {in_f} → {out_f} features but the "
                             f"PEFT factors lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} map {A.shape[1]} → "
                             f"{B.shape[0]}: the adapter belongs to a different base model{made_for}.")
    state = model.state_dict()
    for key, value in peft.saved.items():
        if key not in state or tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"The base model has no tensor {key!r} of shape {tuple(value.shape)} (modules_to_save of "
                             f"the PEFT adapter): the adapter belongs to a different base model{made_for}.")


def saved_module_names(peft: PeftLoRA, model: nn.Module) -> list[str]:
    """The modules whose tensors the PEFT adapter stores (``modules_to_save``), by their names in ``model``."""
    names = {n for n, _ in model.named_modules() if n}
    out = set()
    for key in peft.saved:
        parts = key.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in names), None)
        if owner is None:
            raise ValueError(f"No module of the base model owns the PEFT adapter's tensor {key!r}.")
        out.add(owner)
    return sorted(out)


def common_scale(peft: PeftLoRA) -> float:
    """α of the nested adapter: the PEFT scale shared by most of the largest-rank layers."""
    R = peft.r_max
    scales = Counter(s for A, _, s in peft.layers.values() if A.shape[0] == R)
    return scales.most_common(1)[0][0]


def adapt_like_peft(peft: PeftLoRA, model: nn.Module, nest: bool = True) -> NestReport | None:
    """Adapt ``model`` (in place) with the PEFT adapter's update at rank r_max = the largest PEFT rank, then (with
    ``nest``) nest it by SVD. Returns the report of :func:`nest_by_svd` (None without ``nest``)."""
    from .callback import MatryoshkaLoRA
    from .config import MatLoRAConfig
    from .inject import _saved_prefixes, adapted_layers, find_targets

    R, alpha = peft.r_max, common_scale(peft)
    names = sorted(peft.layers)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    saved = saved_module_names(peft, model)
    peft_saved = peft.config.get("modules_to_save") or None
    # nested factors are not representable in 16 bits without losing r_max: float32 (float64 if PEFT's are)
    wide = any(A.dtype == torch.float64 for A, _, _ in peft.layers.values())
    settings = dict(r_max=R, exclude_modules=None, scaling="none", alpha=alpha, rank_scale="rank", mode="rowwise",
                    dropout=float(peft.config.get("lora_dropout") or 0.0),
                    adapter_dtype="float64" if wide else "float32")

    def selects(targets: Any, to_save: Any) -> bool:
        cfg = MatLoRAConfig(target_modules=targets, modules_to_save=to_save, **settings)
        return sorted(find_targets(model, cfg)) == names and sorted(_saved_prefixes(model, cfg)) == saved

    # the short forms (name suffixes, PEFT's modules_to_save) when they select exactly these modules, else full names
    targets = suffixes if selects(suffixes, saved or None) else names
    to_save = peft_saved if peft_saved and selects(targets, peft_saved) else (saved or None)
    MatryoshkaLoRA(target_modules=targets, modules_to_save=to_save, verbose=False, save_adapter=False,
                   rank_eval=None, **settings).apply(model)
    layers = adapted_layers(model)
    with torch.no_grad():
        for name in names:
            A, B, scale = peft.layers[name]
            layer, r = layers[name], A.shape[0]
            layer.lora_A.zero_()
            layer.lora_B.zero_()
            layer.lora_A[:r].copy_(A)
            # PEFT serves scale·B·A; ours serves α·B·A at r_max: the ratio goes into B (float64, one rounding)
            layer.lora_B[:, :r].copy_(B.to(torch.float64) * (scale / alpha))
        state = model.state_dict(keep_vars=True)
        for key, value in peft.saved.items():
            state[key].data.copy_(value)
    return nest_by_svd(model) if nest else None


# ------------------------------------------------------------------------------------------ measurement
def read_rows(path: str | os.PathLike, max_rows: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file (or a JSON list) of objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a .jsonl file of rows such as {{\"text\": ...}} or "
                                f"{{\"question\": ..., \"answer\": ...}}.")
    text = path.read_text()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines()
                                                                         if l.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON Lines ({e}): give one JSON object per line.") from None
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} holds no rows of JSON objects: give one object per line.")
    return rows[:max_rows] if max_rows else rows


def split_row(row: dict[str, Any]) -> tuple[str, str]:
    """(prompt, target) of a row: ``{"text"}`` → ("", text); ``{"question", "answer"}`` → ("Question: …\\nAnswer: ",
    answer), the recipe's format; ``{"prompt", "completion"}`` → as given. The loss covers the target only."""
    if "text" in row:
        return "", str(row["text"])
    if "question" in row and "answer" in row:
        return f"Question: {row['question']}\nAnswer: ", str(row["answer"])
    if "prompt" in row and "completion" in row:
        return str(row["prompt"]), str(row["completion"])
    raise ValueError(f"A data row has keys {sorted(row)}: give 'text', 'question' and 'answer', or 'prompt' and "
                     f"'completion'.")


def encode_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int = 512
                ) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row: prompt + target + eos, labels −100 on the prompt, truncated to ``max_length``."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in rows:
        prompt, target = split_row(row)
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
    """Mean next-token loss over the target tokens of ``encoded`` at each of ``ranks`` (every token weighs the
    same)."""
    import torch.nn.functional as F

    from .adapted_model import at_rank

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    try:
        for k in ranks:
            total, count = 0.0, 0
            with at_rank(model, int(k)):
                for i in range(0, len(encoded), batch_size):
                    chunk = encoded[i:i + batch_size]
                    width = max(len(ids) for ids, _ in chunk)
                    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                    labels = torch.full((len(chunk), width), -100, dtype=torch.long)
                    mask = torch.zeros((len(chunk), width), dtype=torch.long)
                    for j, (a, b) in enumerate(chunk):
                        ids[j, :len(a)], labels[j, :len(b)], mask[j, :len(a)] = torch.tensor(a), torch.tensor(b), 1
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


def _tokenizer(base: Any, tokenizer: Any) -> Any:
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    source = tokenizer or (base if isinstance(base, (str, os.PathLike)) else
                           getattr(getattr(base, "config", None), "_name_or_path", None))
    if not source:
        raise ValueError("eval_data needs a tokenizer: pass tokenizer= (a tokenizer or a directory), or base as a "
                         "directory that holds one.")
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as e:
        raise ValueError(f"Could not load a tokenizer from {source} ({type(e).__name__}: {e}): pass tokenizer=.") \
            from None


# --------------------------------------------------------------------------------------------------- entry
def nest_adapter(peft_adapter_dir: str | os.PathLike, base: nn.Module | str | os.PathLike | None,
                 out_dir: str | os.PathLike, *, eval_data: str | os.PathLike | None = None,
                 eval_ranks: Sequence[int] | None = None, tokenizer: Any = None, max_rows: int | None = 256,
                 max_length: int = 512, batch_size: int = 8, overwrite: bool = False) -> NestResult:
    """Turn a standard PEFT LoRA adapter into a nested adapter whose every prefix rank k is the best rank-k
    approximation of each layer's update, and whose rank r_max is the PEFT adapter itself.

    Args:
        peft_adapter_dir: a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
            Refused, with the reason: other PEFT methods, DoRA, LoRA biases, ``bias != "none"``, embedding or
            convolution LoRA, and other options whose forward is not scaling·B·A. ``rank_pattern``/
            ``alpha_pattern`` are supported: r_max is the largest rank, smaller layers get zero components.
        base: the base model: a transformers model (adapted in place and returned in the result), or a local
            directory or hub name loaded with the auto class of the adapter's ``task_type``; None loads the
            adapter's ``base_model_name_or_path``.
        out_dir: where the nested adapter is saved (:func:`~lightning_matlora.save_adapter`'s format); must not
            exist unless ``overwrite`` (which replaces an adapter directory there, never other files).
        eval_data: optional JSON Lines file of rows ``{"text"}``, ``{"question", "answer"}`` (the recipe's prompt
            ``"Question: …\\nAnswer: "``) or ``{"prompt", "completion"}``: the mean target-token loss is measured at
            every eval rank, for the nested adapter and for the PEFT adapter truncated as it was, and stored in
            the adapter (``matlora info`` shows it).
        eval_ranks: ranks to measure (default: powers of two up to r_max, and r_max).
        tokenizer: for ``eval_data``: a tokenizer or a directory (default: the base's directory).
        max_rows, max_length, batch_size: how much of ``eval_data`` is used, the token limit per row, rows per
            forward.
        overwrite: replace an existing ``out_dir``.

    Returns a :class:`NestResult` (path, the adapted model, the SVD report, the measured curves).

    >>> import tempfile
    >>> import peft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                   num_attention_heads=2, num_key_value_heads=1)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> lora = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    >>> peft_dir = tempfile.mkdtemp() + "/peft"
    >>> lora.save_pretrained(peft_dir)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> result = nest_adapter(peft_dir, LlamaForCausalLM(cfg), tempfile.mkdtemp() + "/nested")
    >>> result.path.name, sorted(result.report.singular_values)[0]
    ('nested', 'model.layers.0.self_attn.q_proj')
    """
    from .adapter_save import save_adapter
    from .curve import RankCurve
    from .scaling import check_ranks, default_ranks

    out = Path(out_dir)
    src = Path(peft_adapter_dir)
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise ValueError(f"Refusing to write the nested adapter to {out}: it holds the PEFT adapter {src}. Choose a "
                         f"new output directory.")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another output directory or pass overwrite=True "
                              f"(--overwrite on the command line).")
    peft = read_peft_lora(src)
    R = peft.r_max
    ranks = check_ranks(list(eval_ranks), R, what="eval_ranks") if eval_ranks is not None else default_ranks(R)
    if eval_data is not None:  # fail on bad data before any model is loaded
        rows = read_rows(eval_data, max_rows)
        for row in rows:
            split_row(row)
    if base is None:
        base = peft.config.get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{src} does not record its base model: pass base (a model, a local directory or a hub "
                             f"name).")
    curve = unnested = encoded = None
    if eval_data is not None:  # the tokenizer before the model: a missing one fails fast
        tok = _tokenizer(base, tokenizer)
        encoded = encode_rows(rows, tok, max_length)
    model = load_base(base, peft.config.get("task_type")) if isinstance(base, (str, os.PathLike)) else base
    from .inject import adapted_layers

    if adapted_layers(model):
        raise ValueError("base is already adapted by MatryoshkaLoRA: pass a plain base model.")
    check_fits(peft, model)
    if encoded is not None:
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        # first the PEFT adapter truncated to each rank as it was ordered, then the same after nesting in place
        adapt_like_peft(peft, model, nest=False)
        unnested = rank_losses(model, encoded, ranks, batch_size, pad)
        report = nest_by_svd(model)
        curve = rank_losses(model, encoded, ranks, batch_size, pad)
    else:
        report = adapt_like_peft(peft, model)
    meta: dict[str, Any] = {
        "nested_from": {
            "peft_adapter": str(src),
            "r": peft.config.get("r"), "lora_alpha": peft.config.get("lora_alpha"),
            "use_rslora": bool(peft.config.get("use_rslora")),
            "rank_pattern": peft.config.get("rank_pattern") or {},
            "alpha_pattern": peft.config.get("alpha_pattern") or {},
            "layer_ranks": dict(sorted(Counter(str(r) for r in peft.ranks.values()).items())),
        },
        "nesting": report.to_dict(ranks),
    }
    curves = None
    if curve is not None:
        curves = RankCurve(tuple(curve), tuple(curve.values()), metric="loss", higher_is_better=False)
        meta["unnested_loss"] = {"ranks": list(unnested), "scores": list(unnested.values())}
        meta["eval_data"] = {"path": str(eval_data), "rows": len(encoded)}
    path = save_adapter(model, out, curves=curves, metadata=meta)
    return NestResult(path=Path(path), model=model, report=report, curve=curve, unnested_curve=unnested)

