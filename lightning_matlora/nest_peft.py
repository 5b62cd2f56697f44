"""Nest an existing PEFT LoRA adapter: read it, reorder every layer by SVD, measure it, save it as a nested adapter.

The nested adapter serves rank k as each layer's best rank-k approximation of the PEFT update, and rank r_max as
the PEFT adapter itself (to float rounding). It is stored with ``scaling="none"``, ``rank_scale="rank"`` and
``alpha`` = |PEFT's scale| (``lora_alpha/r``, or ``lora_alpha/√r`` with rslora) of its largest-rank layers, so that
every rank is served with that one scale; each layer's own scale (its ``alpha_pattern``, its sign) is folded into
its ``lora_B``. ``mode="rowwise"`` with the default train ranks (powers of two up to r_max), so ``matlora export
--rank all`` writes those ranks and further ``rowwise`` training trains every rank as it is served. Layers of
smaller rank (``rank_pattern``) are padded with zero components.

The PEFT adapter becomes a :class:`~lightning_matlora.adapter_format.SavedAdapter` (:func:`as_nested_adapter`),
which :func:`~lightning_matlora.load_adapter` loads into the base (checking that it fits, with the same check as
every other adapter), and :func:`~lightning_matlora.nest_by_svd` reorders in place. Measuring the loss per rank
(``eval_data``) is :mod:`lightning_matlora.text_loss`'s job.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_format import LayerInfo, SavedAdapter
from .adapter_load import load_adapter
from .adapter_save import base_model_name, save_adapter, task_type_of
from .base_model import BaseRecord, LayerShape, check_fits, is_conv1d, load_base, resolve_base
from .config import MatLoRAConfig
from .curve import RankCurve
from .inject import adapted_layers, find_targets, saved_prefixes
from .nesting import NestReport, nest_by_svd
from .output_dir import check_output_dir
from .peft_lora import NotNestable, PeftLoRA, read_peft_lora
from .scaling import check_ranks, default_ranks
from .text_loss import QUESTION_FORMAT, encode_rows, load_tokenizer, rank_losses, read_rows, split_row


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


# ------------------------------------------------------------------------------------------- conversion
def peft_record(peft: PeftLoRA) -> BaseRecord:
    """What the PEFT adapter needs of its base: each layer's features (lora_A ``r × in``, lora_B ``out × r``) and
    the shapes of its ``modules_to_save`` tensors."""
    return BaseRecord(
        layers={n: LayerShape(int(A.shape[1]), int(B.shape[0]), None, int(A.shape[0]))
                for n, (A, B, _) in peft.layers.items()},
        saved={k: tuple(v.shape) for k, v in peft.saved.items()},
        base_name=peft.config.get("base_model_name_or_path"), task_type=peft.config.get("task_type"))


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
    """α of the nested adapter: the magnitude of the PEFT scale shared by most of the largest-rank layers (zero
    scales left out; a negative ``lora_alpha``'s sign is folded into ``lora_B``)."""
    R = peft.r_max
    scales = Counter(abs(s) for A, _, s in peft.layers.values() if A.shape[0] == R and s != 0)
    if not scales:
        raise NotNestable(f"{peft.path}: every largest-rank layer is served with scale 0 (lora_alpha or alpha_pattern "
                          f"is 0), so the adapter's update is zero: nothing to nest.")
    return scales.most_common(1)[0][0]


def as_nested_adapter(peft: PeftLoRA, model: nn.Module) -> SavedAdapter:
    """The PEFT adapter as a nested adapter of ``model`` at rank r_max = its largest rank, not yet nested: layer
    i serves α·B'·A with B' = B·(scale_i/α), which is PEFT's scale_i·B·A (factors padded with zero components to
    r_max; float32, float64 when PEFT's are). ``model`` is used only to choose the shortest ``target_modules`` and
    ``modules_to_save`` that select exactly these modules."""
    R, alpha = peft.r_max, common_scale(peft)
    names = sorted(peft.layers)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    saved = saved_module_names(peft, model)
    peft_saved = peft.config.get("modules_to_save") or None
    # nested factors are not representable in 16 bits without losing r_max: float32 (float64 if PEFT's are)
    dtype = torch.float64 if any(A.dtype == torch.float64 for A, _, _ in peft.layers.values()) else torch.float32
    settings = dict(r_max=R, exclude_modules=None, scaling="none", alpha=alpha, rank_scale="rank", mode="rowwise",
                    dropout=float(peft.config.get("lora_dropout") or 0.0),
                    adapter_dtype="float64" if dtype == torch.float64 else "float32")

    def selects(targets: Any, to_save: Any) -> bool:
        cfg = MatLoRAConfig(target_modules=targets, modules_to_save=to_save, **settings)
        return sorted(find_targets(model, cfg)) == names and sorted(saved_prefixes(model, cfg)) == saved

    # the short forms (name suffixes, PEFT's modules_to_save) when they select exactly these modules, else full names
    targets = suffixes if selects(suffixes, saved or None) else names
    to_save = peft_saved if peft_saved and selects(targets, peft_saved) else (saved or None)
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerInfo] = {}
    for name in names:
        A, B, scale = peft.layers[name]
        r, n_in, n_out = A.shape[0], A.shape[1], B.shape[0]
        A_pad, B_pad = torch.zeros(R, n_in, dtype=dtype), torch.zeros(n_out, R, dtype=dtype)
        A_pad[:r] = A
        # PEFT serves scale·B·A; ours serves α·B·A at r_max: the ratio (and sign) goes into B (float64, one rounding)
        B_pad[:, :r] = B.to(torch.float64) * (scale / alpha)
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = A_pad, B_pad
        layers[name] = LayerInfo(int(n_in), int(n_out), is_conv1d(modules[name]))
    tensors.update(peft.saved)
    return SavedAdapter(
        config=MatLoRAConfig(target_modules=targets, modules_to_save=to_save, **settings), layers=layers,
        tensors=tensors, saved_modules=saved, base_model_name_or_path=peft.config.get("base_model_name_or_path"),
        base_model_class=type(model).__name__, task_type=peft.config.get("task_type") or task_type_of(model))


def adapt_like_peft(peft: PeftLoRA, model: nn.Module, nest: bool = True) -> NestReport | None:
    """Load the PEFT adapter into ``model`` (in place) as a nested adapter at rank r_max (:func:`as_nested_adapter`,
    then :func:`~lightning_matlora.load_adapter`), then (with ``nest``) nest it by SVD. Returns the report of
    :func:`nest_by_svd` (None without ``nest``)."""
    load_adapter(model, as_nested_adapter(peft, model))
    return nest_by_svd(model) if nest else None


# --------------------------------------------------------------------------------------------------- entry
def nest_adapter(peft_adapter_dir: str | os.PathLike, base: nn.Module | str | os.PathLike | None,
                 out_dir: str | os.PathLike, *, eval_data: str | os.PathLike | None = None,
                 eval_ranks: Sequence[int] | None = None, tokenizer: Any = None, max_rows: int | None = 256,
                 max_length: int = 512, batch_size: int = 8, overwrite: bool = False,
                 question_format: str = QUESTION_FORMAT) -> NestResult:
    """Turn a standard PEFT LoRA adapter into a nested adapter whose every prefix rank k is the best rank-k
    approximation of each layer's update, and whose rank r_max is the PEFT adapter itself.

    Args:
        peft_adapter_dir: a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
            Refused, with the reason: other PEFT methods, DoRA, LoRA biases, ``bias != "none"``, embedding or
            convolution LoRA, and other options whose forward is not scaling·B·A. ``rank_pattern``/
            ``alpha_pattern`` are supported: r_max is the largest rank, smaller layers get zero components. A
            negative ``lora_alpha`` (which PEFT serves as a negative scale) is kept exactly: its sign goes into
            ``lora_B``. Every field read is type-checked as PEFT would; an error names the file and the field.
        base: the base model: a transformers model (adapted in place and returned in the result), or a local
            directory or hub name loaded with the auto class of the adapter's ``task_type``; None loads the
            adapter's ``base_model_name_or_path``. Every layer and shape is checked against the adapter before any
            weight is loaded (on the ``meta`` device), so a wrong base fails in one line naming the layer.
        out_dir: where the nested adapter is saved (:func:`~lightning_matlora.save_adapter`'s format); must not
            exist unless ``overwrite`` (which replaces an adapter directory there, never other files); never the
            PEFT adapter, the base, or a directory containing either.
        eval_data: optional JSON Lines file of rows ``{"text"}``, ``{"question", "answer"}`` (prompt
            ``question_format``) or ``{"prompt", "completion"}``: the mean target-token loss is measured at
            every eval rank, for the nested adapter and for the PEFT adapter truncated as it was, and stored in
            the adapter (``matlora info`` shows it).
        eval_ranks: ranks to measure (default: powers of two up to r_max, and r_max).
        tokenizer: for ``eval_data``: a tokenizer or a directory (default: the base's directory).
        max_rows, max_length, batch_size: how much of ``eval_data`` is used (``max_rows`` ≥ 1, or None for every
            row), the token limit per row, rows per forward.
        question_format: the prompt of a ``{"question", "answer"}`` row
            (default :data:`~lightning_matlora.text_loss.QUESTION_FORMAT`).
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
    out, src = Path(out_dir), Path(peft_adapter_dir)
    given_base = base if isinstance(base, (str, os.PathLike)) else None
    check_output_dir(out, overwrite, {"the PEFT adapter": src, "the base model": given_base}, adapter_only=True)
    peft = read_peft_lora(src)
    common_scale(peft)  # a zero update is refused before any model is loaded
    record = peft_record(peft)
    ranks = _eval_ranks(eval_ranks, peft.r_max)
    rows = None
    if eval_data is not None:  # fail on bad data before any model is loaded
        rows = read_rows(eval_data, max_rows)
        for row in rows:
            split_row(row, question_format)
    base = _base_source(base, peft, src)
    if isinstance(base, str):
        check_output_dir(out, overwrite, {"the PEFT adapter": src, "the base model": base}, adapter_only=True)
    encoded, pad = None, 0
    if rows is not None:  # the tokenizer before the model: a missing one fails fast
        encoded, pad = _encode_eval_rows(rows, tokenizer, base, max_length, question_format)
    model = _plain_base(base, record)
    curve = unnested = None
    if encoded is not None:
        report, curve, unnested = _nest_and_measure(peft, model, encoded, pad, ranks, batch_size)
    else:
        report = adapt_like_peft(peft, model)
    meta = _nest_metadata(peft, src, report, ranks)
    curves = None
    if curve is not None:
        curves = RankCurve(tuple(curve), tuple(curve.values()), metric="loss", higher_is_better=False)
        meta["unnested_loss"] = {"ranks": list(unnested), "scores": list(unnested.values())}
        meta["eval_data"] = {"path": str(eval_data), "rows": len(encoded)}
    path = save_adapter(model, out, curves=curves, metadata=meta)
    return NestResult(path=Path(path), model=model, report=report, curve=curve, unnested_curve=unnested)


def _eval_ranks(eval_ranks: Sequence[int] | None, r_max: int) -> list[int]:
    """The ranks measured on ``eval_data``: ``eval_ranks`` checked against r_max, or the default ranks."""
    if eval_ranks is None:
        return default_ranks(r_max)
    if not list(eval_ranks):
        raise ValueError("eval_ranks (--ranks) is empty: give at least one rank, e.g. 1,2,4, or leave it out for the "
                         "default ranks.")
    return check_ranks(list(eval_ranks), r_max, what="eval_ranks")


def _base_source(base: nn.Module | str | os.PathLike | None, peft: PeftLoRA, src: Path) -> nn.Module | str:
    """``base`` as a model or a resolved directory/hub name (None: the adapter's ``base_model_name_or_path``)."""
    if base is None:
        base = peft.config.get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{src} does not record its base model: pass base (a model, a local directory or a hub "
                             f"name).")
    if isinstance(base, (str, os.PathLike)):
        return resolve_base(base)
    return base


def _encode_eval_rows(rows: list[dict[str, Any]], tokenizer: Any, base: nn.Module | str, max_length: int,
                      question_format: str) -> tuple[list[tuple[list[int], list[int]]], int]:
    """The ``eval_data`` rows tokenised (with ``tokenizer``, default the base's directory) and the padding id."""
    source = tokenizer or (base if isinstance(base, str) else base_model_name(base))
    if not source:
        raise ValueError("eval_data needs a tokenizer: pass tokenizer= (a tokenizer or a directory), or base as a "
                         "directory that holds one.")
    tok = load_tokenizer(source)
    encoded = encode_rows(rows, tok, max_length, question_format)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return encoded, pad


def _plain_base(base: nn.Module | str, record: BaseRecord) -> nn.Module:
    """The base model, loaded (a name) or given, checked against the adapter's ``record`` before any weight is
    loaded; a model already adapted by MatryoshkaLoRA is refused."""
    if isinstance(base, str):
        return load_base(base, record)
    if adapted_layers(base):
        raise ValueError("base is already adapted by MatryoshkaLoRA: pass a plain base model.")
    check_fits(record, base)
    return base


def _nest_and_measure(peft: PeftLoRA, model: nn.Module, encoded: list[tuple[list[int], list[int]]], pad: int,
                      ranks: list[int], batch_size: int) -> tuple[NestReport, dict[int, float], dict[int, float]]:
    """Load the PEFT adapter into ``model`` and nest it, measuring the mean loss per rank before (the PEFT adapter
    truncated to each rank as it was ordered) and after nesting. Returns (report, nested curve, unnested curve)."""
    adapt_like_peft(peft, model, nest=False)
    unnested = rank_losses(model, encoded, ranks, batch_size, pad)
    report = nest_by_svd(model)
    curve = rank_losses(model, encoded, ranks, batch_size, pad)
    return report, curve, unnested


def _nest_metadata(peft: PeftLoRA, src: Path, report: NestReport, ranks: list[int]) -> dict[str, Any]:
    """The nested adapter's metadata: where it was nested from (the PEFT adapter's scale settings, its ranks by
    layer count) and the SVD report at ``ranks``."""
    return {
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
