"""`MatLoRAConfig`: every setting of a nested adapter, validated once, serialisable to JSON."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence
from typing import Any, Union

import torch

from .scaling import build_p, check_p, check_r_max, check_ranks, check_scaling, default_ranks

MODES = ("matryoshka", "lora", "dylora", "rowwise")
RANK_WEIGHT_RULES = ("half_max", "uniform")
INIT_RULES = ("shared", "per_rank")
LAYER_DRAWS = ("none", "type")
RANK_SCALES = ("rank", "trained")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

TargetSpec = Union[str, Sequence[str], None]


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """Normalise a dtype given as ``torch.float32``, ``"float32"`` or ``"torch.float32"`` to its short name."""
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES and (name.startswith(("int", "uint", "bool")) or name in ("nf4", "fp4", "4bit", "8bit")):
        raise ValueError(f"adapter_dtype {dtype!r} is an integer or quantized type, but the adapter factors are trained "
                         f"and stay in floating point (never quantized): use None (the base weight's dtype, or a "
                         f"quantized base's compute dtype) or one of {sorted(DTYPES)}. To quantize the frozen base, "
                         f"load it with transformers' BitsAndBytesConfig (see docs/quantized.md).")
    if name not in DTYPES:
        raise ValueError(f"adapter_dtype {dtype!r} is not supported: use None (the base weight's dtype) or one of "
                         f"{sorted(DTYPES)}.")
    return name


def _targets(spec: TargetSpec, what: str, regex: bool = True) -> str | list[str] | None:
    if spec is None or isinstance(spec, str):
        if isinstance(spec, str) and not spec:
            raise ValueError(f"{what} is an empty string: give 'all-linear', a list of name suffixes or a regex.")
        if regex and isinstance(spec, str) and spec != "all-linear":
            try:  # a string is a regex on full module names (PEFT's rule): compile it now, not at injection
                re.compile(spec)
            except re.error as err:
                raise ValueError(f"{what}={spec!r} is not a valid regular expression ({err}): a string is matched "
                                 f"as a regex against full module names; escape it, or give a list of module-name "
                                 f"suffixes such as ['q_proj', 'v_proj'].") from None
        return spec
    items = list(spec)
    if not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"{what} must be 'all-linear', a regex string or a list of non-empty module-name "
                         f"suffixes, got {spec!r}.")
    return items


#: The inference rule each training mode trained its ranks under (``"trained"`` at rank k serves p_1…p_k).
_MODE_RULE = {"rowwise": "rank", "dylora": "rank"}


def check_rule_for_mode(mode: str, rank_scale: str) -> None:
    """Warn when an adapter trained by ``mode`` is served with a rule that mode never trained.

    ``"rowwise"`` and ``"dylora"`` train every rank k as ``s(k)·x·A[:, :k]·B[:k, :]`` (the ``"rank"`` rule);
    serving them with ``"trained"`` evaluates ``x·A[:, :k]·diag(p_1…p_k)·B[:k, :]``, a function they never trained.
    ``"matryoshka"`` trains P (both rules are meaningful), ``"lora"`` trains ``s(r_max)·x·A·B``, which both rules
    serve exactly at k = r_max.
    """
    trained = _MODE_RULE.get(mode)
    if trained is not None and rank_scale != trained:
        warnings.warn(f"mode={mode!r} trains every rank k under rank_scale={trained!r} (s(k) on the rank-k prefix), "
                      f"but this adapter is served with rank_scale={rank_scale!r} (the prefix p_1…p_k of a training "
                      f"diagonal this mode never used): use rank_scale={trained!r}, or mode='matryoshka' to train P.",
                      UserWarning, stacklevel=3)


def _rank_weights(spec: Any, ranks: list[int], mode: str, max_pass: bool = False) -> str | list[int]:
    """Validate ``rank_weights``: a rule name, or one positive integer per train rank (``"rowwise"`` only).

    With ``max_pass`` the weights describe the low pass: the train ranks below r_max (``ranks``), and
    ``"half_max"`` is refused (the max pass already trains r_max on every row)."""
    if isinstance(spec, str):
        if spec not in RANK_WEIGHT_RULES:
            raise ValueError(f"Unknown rank_weights {spec!r}: use {RANK_WEIGHT_RULES} or a list of positive integers, "
                             f"one per train rank ({ranks}).")
        if max_pass and spec == "half_max":
            raise ValueError("rank_weights='half_max' puts half of a batch's rows at r_max, but with max_pass=True "
                             "the max pass already trains every row at r_max and rank_weights describes the low pass "
                             f"(the train ranks below r_max, {ranks}): use 'uniform' (the default with max_pass) or "
                             "one positive integer per train rank below r_max.")
        return spec
    items = list(spec)
    what = "train rank below r_max" if max_pass else "train rank"
    if len(items) != len(ranks) or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in items):
        raise ValueError(f"rank_weights must be {'' if max_pass else repr('half_max') + ', '}'uniform' or one "
                         f"positive integer per {what} ({len(ranks)} for {ranks}), got {spec!r}.")
    if mode != "rowwise":
        raise ValueError(f"rank_weights (how rowwise shares a batch's rows among the train ranks) only applies to "
                         f"mode='rowwise', not mode={mode!r}: drop rank_weights or switch mode.")
    return items


def _check_max_pass(max_pass: Any, mode: str, ranks: list[int], r_max: int) -> list[int]:
    """Validate ``max_pass``; return the train ranks of the low pass (those below r_max)."""
    if not isinstance(max_pass, bool):
        raise ValueError(f"max_pass must be True or False, got {max_pass!r}.")
    low = [r for r in ranks if r < r_max]
    if not max_pass:
        return low
    if mode != "rowwise":
        raise ValueError(f"max_pass=True (each step: the whole batch at r_max, then its rows dealt over the lower "
                         f"train ranks) is a form of mode='rowwise', not mode={mode!r}: use mode='rowwise', or set "
                         f"max_pass=None (auto: True for rowwise only) or False.")
    if not low:
        raise ValueError(f"max_pass=True needs at least one train rank below r_max={r_max} for its low pass, but "
                         f"ranks={ranks}: add lower train ranks (or drop `ranks` for the default powers of two), or "
                         f"drop max_pass.")
    return low


def _check_distill(distill: Any, distill_module: Any, max_pass: bool) -> float:
    """Validate ``distill`` (the weight of the self-distillation term) and ``distill_module``; return the weight."""
    if isinstance(distill, bool) or not isinstance(distill, (int, float)) or not math.isfinite(distill) or distill < 0:
        raise ValueError(f"distill must be a finite number ≥ 0 (the weight of the KL term of a max_pass step; 0 "
                         f"turns it off), got {distill!r}.")
    if distill_module is not None and (not isinstance(distill_module, str) or not distill_module):
        raise ValueError(f"distill_module must be None (the output embedding of a transformers model inside the "
                         f"adapted module) or the non-empty name of the submodule whose output is the logits, got "
                         f"{distill_module!r}.")
    if distill > 0 and not max_pass:
        raise ValueError(f"distill={distill!r} matches the low pass's output to the max pass's, which needs "
                         f"max_pass=True: use MatryoshkaLoRA(..., mode='rowwise', max_pass=True, distill={distill!r}), "
                         f"or set distill=0.")
    return float(distill)


#: What a field means beyond its value (``role`` in its metadata; ``None``: a detail of training or evaluation).
ROLES = {
    "adapter": "defines the adapter (its size and its layers): a checkpoint with another value cannot resume",
    "objective": "defines the training objective: resuming with another value warns that the objective changed",
    "serving": "defines how a rank is served (its inference rule)",
}
#: The JSON types a field may be stored as (``stored`` in its metadata); lightning_matlora.adapter_format turns
#: each into its schema type.
STORED_TYPES = ("pos_int", "int", "num", "bool", "str", "str?", "[int]", "[num]?", "[str]?", "targets",
                "targets?", "str|[int]")
_NO_LEGACY = object()


def option(default: Any, doc: str, *, stored: str | None = None, role: str | None = None,
           legacy: Any = _NO_LEGACY, rule: bool = False) -> Any:
    """A field of :class:`MatLoRAConfig` (or of :class:`CallbackSettings`) with everything the package derives from it.

    Args:
        default: the default value (what ``MatryoshkaLoRA(...)`` and ``MatLoRAConfig(...)`` use when it is not given).
        doc: the field's documentation (the ``Args`` of ``MatryoshkaLoRA`` and ``MatLoRAConfig`` are built from it).
        stored: its JSON type in an adapter file, one of :data:`STORED_TYPES` (``None``: not stored; every
            :class:`MatLoRAConfig` field is stored).
        role: one of :data:`ROLES`, or ``None``.
        legacy: for a field added after adapter files and checkpoints first shipped, the value that a file or a
            checkpoint without it was trained with (not necessarily today's default). Such a field is optional in an
            adapter file, and keyword-only in ``MatryoshkaLoRA(...)``.
        rule: the field enters the function served at a rank k (the rank rule: the scale s(k) or the prefix of the
            training diagonal): an adapter loaded into a model that is already adapted must agree with it on it.
    """
    if stored is not None and stored not in STORED_TYPES:
        raise ValueError(f"stored={stored!r}: use one of {STORED_TYPES}.")
    if role is not None and role not in ROLES:
        raise ValueError(f"role={role!r}: use one of {sorted(ROLES)} or None.")
    return dataclasses.field(default=default, metadata={"doc": doc, "stored": stored, "role": role, "legacy": legacy,
                                                        "rule": rule})


@dataclasses.dataclass
class MatLoRAConfig:
    """Settings of a MatryoshkaLoRA adapter, validated at construction. Each field is documented below (the same
    text documents :class:`lightning_matlora.MatryoshkaLoRA`'s arguments).

    >>> cfg = MatLoRAConfig(r_max=8, mode="matryoshka")
    >>> cfg.ranks, cfg.eval_ranks
    ([1, 2, 4, 8], [1, 2, 4, 8])
    >>> MatLoRAConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    r_max: int = option(64, "allocated rank R of every adapter (factors ``r_max × in`` and ``out × r_max``).",
                        stored="pos_int", role="adapter", rule=True)
    ranks: Sequence[int] | None = option(None, "train ranks S (each in 1…r_max); default the powers of two ≤ r_max, "
                                               "plus r_max.", stored="[int]", role="objective", rule=True)
    target_modules: TargetSpec = option(
        "all-linear", "``\"all-linear\"`` (every Linear/Conv1D but the output head), a list of module-name suffixes "
        "such as ``[\"q_proj\", \"v_proj\"]``, or a regex matched against full module names.",
        stored="targets", role="adapter")
    exclude_modules: TargetSpec = option(("lm_head",), "names never adapted (same forms as ``target_modules``).",
                                         stored="targets?", role="adapter")
    modules_to_save: Sequence[str] | None = option(
        None, "modules kept fully trainable and saved with the adapter (never adapted).", stored="[str]?",
        role="adapter")
    scaling: str = option("sqrt", "per-rank scale s(r): ``\"none\"`` → 1, ``\"rank\"`` → 1/r, ``\"sqrt\"`` → 1/√r; "
                                  "times ``alpha``.", stored="str", role="objective", rule=True)
    alpha: float = option(1.0, "factor on every per-rank scale.", stored="num", role="objective", rule=True)
    dropout: float = option(0.0, "dropout probability on the adapter input.", stored="num")
    mode: str = option(
        "rowwise", "training objective: ``\"rowwise\"`` (default: each row of a batch trains its own train rank, "
        "as it will be served), ``\"matryoshka\"`` (the paper's diagonal P: the sum of all nested adapters), "
        "``\"lora\"`` (plain LoRA at r_max) or ``\"dylora\"`` (one rank sampled per optimizer step). The default "
        "follows the project's accuracy study (docs/results.md), where the paper's P served with its own rule stayed "
        "at the base model's level; ``mode=\"matryoshka\"`` reproduces the paper.", stored="str", role="objective")
    rank_scale: str = option(
        "rank", "inference rule at rank k: ``\"rank\"`` (the paper's, s(k) on the prefix) or ``\"trained\"`` (the "
        "prefix p_1…p_k of the training diagonal; warns for ``\"rowwise\"``/``\"dylora\"``, which train "
        "``\"rank\"``).", stored="str", role="serving", rule=True)
    p: Sequence[float] | None = option(None, "explicit training diagonal (length r_max, finite, ≥ 0) instead of "
                                             "Algorithm 1's.", stored="[num]?", role="objective", rule=True)
    eval_ranks: Sequence[int] | None = option(None, "ranks evaluated and reported; default the train ranks.",
                                              stored="[int]")
    adapter_dtype: str | torch.dtype | None = option(
        None, "dtype of the adapter factors (a floating dtype); default the base weight's, or for a quantized "
        "(bitsandbytes) base its compute dtype. The factors are never quantized.", stored="str?")
    seed: int = option(0, "seed of the per-step rank draws of ``\"dylora\"``/``\"rowwise\"`` (identical on every "
                          "process) and of the initial factors (layer ``name`` draws ``lora_A`` from a generator "
                          "seeded with (seed, name)).", stored="int")
    rank_weights: str | Sequence[int] | None = option(
        None, "``\"rowwise\"`` only: how a batch's rows are shared among the train ranks. ``\"uniform\"`` (the "
        "with ``max_pass``): the same share for every train rank; ``\"half_max\"`` (the default): half of the rows "
        "at r_max, the other half spread evenly over the other train ranks; or one positive integer per train rank "
        "(rank i gets a share ∝ its integer). With ``max_pass=True`` it describes the low pass: ``\"uniform\"`` or one positive integer per "
        "train rank below r_max (``\"half_max\"`` is refused). docs/results.md compares the rules.",
        stored="str|[int]", role="objective", legacy="uniform")
    max_pass: bool | None = option(
        None, "``\"rowwise\"`` only: run every training step twice on the same batch and optimise "
        "``(L_max + L_low) / 2``: L_max with every row at r_max, L_low with the rows dealt over the train ranks below "
        "r_max (the \"sandwich rule\" of slimmable networks; see docs/method.md). About 2× the compute and "
        "activation memory of a step. The callback wraps the module's ``training_step``; what the step may rely on "
        "in the second (low) pass: its ``self.log`` calls are dropped, and the updates of the torchmetrics metrics "
        "that are submodules of the LightningModule are discarded (the low pass updates copies), so each is counted "
        "once per step; other side effects (counters, lists, metrics held outside the module) happen twice. The low "
        "pass's loss is logged as ``train/loss_low_ranks``; the step returns the mean. With manual optimization, or "
        "in a hand-written loop, compute the loss with :func:`~lightning_matlora.paired_loss` (a training forward "
        "outside it trains the one-pass approximation, half of the rows at r_max, and warns). ``None``/``False`` "
        "(the default): one pass per step, at a plain LoRA step's cost; ``True`` with another mode is "
        "refused. On the real pretrained model (docs/results.md, section 0) one pass kept r_max within a point of "
        "plain LoRA at the same training time and the paired passes did not; on the bundled toy model they raise "
        "every rank at equal steps, at 2× the compute.", stored="bool", role="objective", legacy=False)
    distill: float = option(
        0.0, "``max_pass`` only: weight w ≥ 0 of self-distillation: the step optimises ``(L_max + L_low + w·KL) / 2`` "
        "with KL(p_max ‖ p_low) between the softmaxes (temperature 1, last dim) of the distilled module's output in "
        "the max pass (detached: the teacher gets no gradient) and in the low pass, averaged over every position of "
        "that output (see docs/method.md). Logged as ``train/distill_kl``. Keeps one more copy of the output (the "
        "logits, float32 or wider) from the max pass to the low pass, and the KL's backward two more until the "
        "backward. 0 (the default) turns it off.", stored="num", role="objective", legacy=0.0)
    distill_module: str | None = option(
        None, "the module whose output (a logits tensor, classes on the last dim) is distilled: ``None`` (the output "
        "embedding of a transformers model inside the adapted module, e.g. ``lm_head``) or the name of a submodule "
        "relative to the adapted module. Checked when the adapter is applied.", stored="str?", role="objective",
        legacy=None)

    init: str | None = option(
        None, "initialisation of ``lora_A`` (``lora_B`` starts at 0, so the adapted model starts equal to the base): "
        "``\"shared\"`` (the reference code's: every row of A from U(−1/√r_max, 1/√r_max)) or ``\"per_rank\"`` "
        "(the rows r_(b−1)+1…r_b that train rank r_b adds to the train rank below it from U(−1/√r_b, 1/√r_b): each "
        "train rank's newest components start at the scale of a LoRA of that rank alone; with one train rank it is "
        "``\"shared\"``). ``None`` (default): ``\"per_rank\"`` for ``mode=\"rowwise\"``, ``\"shared\"`` for the "
        "other modes (the paper's and DyLoRA's own initialisation). On the real pretrained model "
        "(docs/results.md) ``\"per_rank\"`` let rank 1 learn as fast as a LoRA of rank 1 alone at plain LoRA's "
        "learning rate, where ``\"shared\"`` left it far behind in the first steps (it needed 3× the rate).", stored="str", legacy="shared")
    layer_draws: str = option(
        "none", "``\"rowwise\"`` only: how the rows' train ranks vary across layers. ``\"none\"`` (default): a row "
        "takes the same train rank in every layer, so only the uniform ranks are trained. ``\"type\"``: each module "
        "type (the last part of a layer's name, e.g. every ``q_proj``; the groups of "
        ":func:`~lightning_matlora.allocate_ranks`) draws its own offset of the cyclic row→rank assignment each step, "
        "so a row trains a mix of per-type ranks (each type's share of the rows per rank is unchanged, and over the "
        "steps every pair of ranks meets equally often): the mixed per-type prefixes that ``allocate_ranks`` serves "
        "are trained. docs/results.md (section 7) measures it.", stored="str", role="objective", legacy="none")

    def __post_init__(self) -> None:
        check_r_max(self.r_max)
        if self.mode not in MODES:
            raise ValueError(f"Unknown mode {self.mode!r}: use one of {MODES}.")
        if self.rank_scale not in RANK_SCALES:
            raise ValueError(f"Unknown rank_scale {self.rank_scale!r}: use 'rank' (the paper's rule: s(k) on the "
                             f"rank-k prefix) or 'trained' (the prefix of the training diagonal p_1…p_k).")
        check_scaling(self.scaling)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ValueError(f"alpha must be a finite number > 0 (a factor on every per-rank scale), got {self.alpha!r}.")
        self.alpha = float(self.alpha)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        self.dropout = float(self.dropout)
        if self.ranks is None:
            self.ranks = [self.r_max] if self.mode == "lora" else default_ranks(self.r_max)
        else:
            self.ranks = check_ranks(self.ranks, self.r_max)
            if self.mode == "lora" and self.ranks != [self.r_max]:
                raise ValueError(f"mode='lora' trains plain LoRA at r_max (S = {{{self.r_max}}}) but ranks="
                                 f"{self.ranks} was given: drop `ranks`, or use mode='matryoshka' for nested ranks.")
        if self.max_pass is None:  # resolved here (stored), so that to_dict/from_dict keep the objective
            self.max_pass = False
        low = _check_max_pass(self.max_pass, self.mode, self.ranks, self.r_max)
        self.distill = _check_distill(self.distill, self.distill_module, self.max_pass)
        if self.rank_weights is None:  # resolved here, so that to_dict/from_dict keep the rule
            self.rank_weights = "uniform" if self.max_pass else "half_max"
        self.rank_weights = _rank_weights(self.rank_weights, low if self.max_pass else self.ranks, self.mode,
                                          self.max_pass)
        if self.init is None:  # resolved here (stored), so that to_dict/from_dict keep the initialisation
            self.init = "per_rank" if self.mode == "rowwise" else "shared"
        if self.init not in INIT_RULES:
            raise ValueError(f"Unknown init {self.init!r}: use 'per_rank' (each train rank's newest rows of lora_A at "
                             f"the scale of a LoRA of that rank alone), 'shared' (every row at 1/√r_max, the "
                             f"reference code's) or None (auto: 'per_rank' for mode='rowwise').")
        if self.layer_draws not in LAYER_DRAWS:
            raise ValueError(f"Unknown layer_draws {self.layer_draws!r}: use 'none' (a row takes the same train rank "
                             f"in every layer) or 'type' (each module type draws its own row ranks).")
        if self.layer_draws != "none" and self.mode != "rowwise":
            raise ValueError(f"layer_draws={self.layer_draws!r} varies the rows' train ranks across layers, which "
                             f"only mode='rowwise' has (mode={self.mode!r} trains no per-row ranks): use "
                             f"mode='rowwise', or drop layer_draws.")
        if self.eval_ranks is None:
            self.eval_ranks = default_ranks(self.r_max) if self.mode == "lora" else list(self.ranks)
        else:
            self.eval_ranks = check_ranks(self.eval_ranks, self.r_max, what="eval_ranks")
        if self.p is not None:
            if self.mode != "matryoshka":
                raise ValueError(f"p (an explicit training diagonal) only applies to mode='matryoshka', not "
                                 f"mode={self.mode!r}: drop p or switch mode.")
            self.p = check_p(self.p, self.r_max).tolist()
        self.target_modules = _targets(self.target_modules, "target_modules")
        if self.target_modules is None:
            raise ValueError("target_modules is None: give 'all-linear', a list of name suffixes or a regex.")
        excl = _targets(self.exclude_modules, "exclude_modules")
        self.exclude_modules = excl
        if self.modules_to_save is not None:
            self.modules_to_save = _targets(self.modules_to_save, "modules_to_save", regex=False)
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
        self.adapter_dtype = dtype_name(self.adapter_dtype)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        check_rule_for_mode(self.mode, self.rank_scale)

    @property
    def row_cycle(self) -> list[int]:
        """The cycle of train ranks that ``"rowwise"`` deals over a batch's rows: train rank i repeated
        ``rank_weights[i]`` times (``"half_max"``: every rank once, then r_max n−2 more times, so that r_max gets
        half of the rows; ``"uniform"``: every rank once). With ``max_pass`` this is the cycle of the low pass:
        the train ranks below r_max only (the max pass runs every row at r_max)."""
        ranks = self.low_ranks if self.max_pass else list(self.ranks)
        n = len(ranks)
        if self.rank_weights == "uniform" or n == 1:
            weights = [1] * n
        elif self.rank_weights == "half_max":
            weights = [1] * (n - 1) + [n - 1]
        else:
            weights = list(self.rank_weights)
        return [r for r, w in zip(ranks, weights) for _ in range(w)]

    @property
    def low_ranks(self) -> list[int]:
        """The train ranks below r_max (the ranks of ``max_pass``'s low pass)."""
        return [r for r in self.ranks if r < self.r_max]

    @property
    def train_diagonal(self) -> torch.Tensor:
        """p (float64, length r_max): the explicit ``p`` if given, else Algorithm 1 on the train ranks."""
        if self.p is not None:
            return torch.tensor(self.p, dtype=torch.float64)
        return build_p(self.ranks, self.r_max, self.scaling, self.alpha)

    @property
    def init_bounds(self) -> torch.Tensor:
        """The bound b_i (float64, length r_max) of row i of ``lora_A`` at initialisation, A[i] ~ U(−b_i, b_i):
        1/√r_max for every row (``init="shared"``), or 1/√r_b with r_b the smallest train rank ≥ i + 1
        (``init="per_rank"``; rows above the largest train rank take r_max).

        >>> MatLoRAConfig(r_max=8, init="per_rank").init_bounds.pow(-2).round().int().tolist()
        [1, 2, 4, 4, 8, 8, 8, 8]
        """
        if self.init == "shared":
            return torch.full((self.r_max,), self.r_max ** -0.5, dtype=torch.float64)
        owner = [min([r for r in self.ranks if r >= i + 1] or [self.r_max]) for i in range(self.r_max)]
        return torch.tensor(owner, dtype=torch.float64).rsqrt()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["exclude_modules"], tuple):
            d["exclude_modules"] = list(d["exclude_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MatLoRAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown MatryoshkaLoRA config fields {unknown}: this file was written by a newer "
                             f"lightning_matlora; upgrade the package to read it.")
        return cls(**d)


@dataclasses.dataclass
class CallbackSettings:
    """The :class:`~lightning_matlora.MatryoshkaLoRA` callback's own arguments, beyond the adapter's
    :class:`MatLoRAConfig`: what it prints, saves and evaluates. They are not part of the adapter (not stored)."""

    verbose: bool = option(True, "print the summary of the adapted model when the adapter is applied, and the rank "
                                 "curves' table at the end of ``fit``/``validate``/``test``.")
    save_adapter: bool | str = option(
        True, "at the end of ``fit``, save the adapter with :func:`~lightning_matlora.save_adapter` (with the last "
        "measured rank curves, ``last_curves``): ``True`` → the run's own directory "
        "(``lightning_logs/version_N/matlora_adapter``; without a logger a new ``matlora_adapter/version_N``; never "
        "another run's), a path → there (replaced), ``False`` → not at all. The path is logged and kept in "
        "``.adapter_path``. Runs an :class:`~lightning_matlora.AdapterCheckpoint` inside the callback; one in the "
        "Trainer's callbacks replaces it.")
    save_best: bool | str | None = option(
        None, "keep the best adapter of the run in ``<save_adapter dir>_best``, saved after each validation where the "
        "monitored metric improves: ``True`` monitors the rank-curve evaluation's ``val/aurac_loss`` (minimised), a "
        "string names any logged metric (minimised if its name contains \"loss\", else maximised; see "
        "``save_best_mode``), ``None``/``False`` keeps no best adapter.")
    save_best_mode: str = option("auto", "``\"auto\"`` (as above), ``\"min\"`` or ``\"max\"``.")
    rank_eval: str | None = option(
        "auto", "rank curves (see :mod:`lightning_matlora.rank_validation` and docs/rank-curves.md): every validation (and "
        "test) epoch, the loss returned by ``validation_step`` and every :class:`~lightning_matlora.RankCurveMetric` "
        "on the module are measured at every eval rank and logged as ``val/<name>@r<k>`` and ``val/aurac_<name>`` "
        "(``name``: ``loss``, or the metric's name), plotted (one PNG per metric) and printed as a table at the end "
        "of ``fit``/``validate``; ``last_curves`` holds them. ``\"auto\"`` (one mixed-rank pass when the step "
        "returns per-row losses and the module has no ``RankCurveMetric``, else one pass per rank), ``\"mixed\"``, "
        "``\"sequential\"``, or ``None`` to turn it off.")
    base_scores: dict[str, float] | None = option(
        None, "the base model's scores (no adapter), by curve name (``\"loss\"``, or a ``RankCurveMetric``'s "
        "name): a ``base`` row of the rank-curve table and a dashed \"base model\" line on each rank-curve plot. "
        "Give measured values, or set ``.base_scores`` on the callback during the run (e.g. in the module's "
        "``on_fit_start``, after measuring the base with the adapter at zero).")


# ------------------------------------------------------------------------------------- derived from the fields
def fields_with_role(role: str) -> tuple[str, ...]:
    """The names of the :class:`MatLoRAConfig` fields with ``role`` (see :data:`ROLES`), in declaration order.

    >>> fields_with_role("adapter")
    ('r_max', 'target_modules', 'exclude_modules', 'modules_to_save')
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r}: use one of {sorted(ROLES)}.")
    return tuple(f.name for f in dataclasses.fields(MatLoRAConfig) if f.metadata["role"] == role)


def rule_fields() -> tuple[str, ...]:
    """The names of the :class:`MatLoRAConfig` fields that enter the function served at a rank (``rule`` in their
    :func:`option`), in declaration order: an adapter loaded into an already adapted model must agree on them.

    >>> rule_fields()
    ('r_max', 'ranks', 'scaling', 'alpha', 'rank_scale', 'p')
    """
    return tuple(f.name for f in dataclasses.fields(MatLoRAConfig) if f.metadata["rule"])


def legacy_values() -> dict[str, Any]:
    """field → the value a file or checkpoint written before the field existed was trained with (the fields added
    later; every other field is required in an adapter file).

    >>> legacy_values()
    {'rank_weights': 'uniform', 'max_pass': False, 'distill': 0.0, 'distill_module': None, 'init': 'shared', 'layer_draws': 'none'}
    """
    return {f.name: f.metadata["legacy"] for f in dataclasses.fields(MatLoRAConfig)
            if f.metadata["legacy"] is not _NO_LEGACY}


def stored_types() -> dict[str, str]:
    """field → its JSON type in an adapter file (one of :data:`STORED_TYPES`), for every :class:`MatLoRAConfig`
    field."""
    return {f.name: f.metadata["stored"] for f in dataclasses.fields(MatLoRAConfig)}


def options_doc(*classes: type) -> str:
    """The ``Args:`` section documenting the fields of ``classes`` (dataclasses built with :func:`option`)."""
    lines = ["Args:"]
    for cls in classes:
        for f in dataclasses.fields(cls):
            lines.append(_wrap(f"{f.name}: {f.metadata['doc']}", "    ", "        "))
    return "\n".join(lines)


def _wrap(text: str, first: str, rest: str, width: int = 112) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest,
                                    break_on_hyphens=False, break_long_words=False))


MatLoRAConfig.__doc__ = (MatLoRAConfig.__doc__ or "").rstrip() + "\n\n    " + \
    options_doc(MatLoRAConfig).replace("\n", "\n    ") + "\n    "
