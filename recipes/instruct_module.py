"""The LightningModule of the instruction-tuning recipe: a transformers causal LM with rank-curve metrics.

The module knows nothing about adapters while training: the ``MatryoshkaLoRA`` callback adapts and freezes the
model, and evaluates the adapter at every eval rank k each validation epoch. The module only declares its
metrics as :class:`~lightning_matlora.RankCurveMetric`s — the loss and the accuracy of the answer tokens (teacher
forcing) and, for GSM8K-style data, the exact match of the final answer from greedy generation on the first
``num_generate`` validation examples — and updates them in ``validation_step`` with no rank argument: the
callback runs the step at each eval rank and each update goes to the rank that is active. The callback logs
``val/<metric>@r<k>`` and ``val/aurac_<metric>``, plots the curves and saves the adapter with them. This module
measures the base model before training and hands its scores to the callback (``base_scores``), so the callback's
one end-of-fit table has a base row and its plots a base line; the module then prints the rank to serve.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_matlora import (MatryoshkaLoRA, RankCurveMetric, adapted_layers, at_rank, describe_rank_choice,
                               load_adapter)
from lightning_matlora.curve import RankCurve, ranks_indistinguishable

from instruct_base import load_or_explain

RECIPES = Path(__file__).resolve().parent
DEFAULT_BASE = str(RECIPES / "assets" / "base")
# what a saved adapter (and its PEFT export) records as the bundled base: the path relative to a checkout, never
# this machine's absolute path (other local directories and hub names are recorded as given, as PEFT does)
DEFAULT_BASE_NAME = "recipes/assets/base"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
HEADS = {"loss": "loss", "token_acc": "token acc %", "exact_match": "exact match %"}


def _quantized_loading(quantize: str | None, dtype: str) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the base quantized (``quantize`` = nf4, fp4, int8), else none."""
    if quantize is None:
        return {}
    from lightning_matlora.quantized import quantization_config

    compute = DTYPES[dtype] if dtype != "auto" else None
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quantization_config(quantize, compute_dtype=compute), "device_map": {"": device}}


def load_model(name_or_path: str, dtype: str, trust_remote_code: bool, quantize: str | None = None) -> torch.nn.Module:
    """The causal LM to fine-tune (``from_pretrained``), in training mode; quantized with bitsandbytes when
    ``quantize`` is ``"nf4"``, ``"fp4"`` or ``"int8"``."""
    from transformers import AutoModelForCausalLM

    model = load_or_explain(AutoModelForCausalLM.from_pretrained, name_or_path, "model", dtype=DTYPES[dtype],
                            trust_remote_code=trust_remote_code, **_quantized_loading(quantize, dtype))
    model.train()  # from_pretrained returns eval mode; Lightning switches modes per stage from here
    if name_or_path == DEFAULT_BASE:
        model.config.name_or_path = DEFAULT_BASE_NAME  # transformers records the path it was given
    return model


class InstructLM(pl.LightningModule):
    """Causal-LM instruction tuning with rank-curve metrics of the nested adapter.

    Needs the ``MatryoshkaLoRA`` callback in ``trainer.callbacks`` (it is in the default config) with its rank
    evaluation on: it adapts the model, evaluates every eval rank, logs and plots the curves and saves the
    adapter.

    Args:
        name_or_path: a transformers causal LM: a hub name or a local directory (default: the recipe's bundled
            base model).
        dtype: weights' dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (the checkpoint's).
        trust_remote_code: allow custom model code from the model's repository (off unless asked for).
        lr: peak learning rate of AdamW (linear warm-up over ``warmup_ratio`` of the steps, then linear decay).
        weight_decay: AdamW weight decay (≥ 0).
        warmup_ratio: share of the optimizer steps spent warming up (0 ≤ ratio < 1).
        eval_ranks: ranks the metrics report; default every eval rank of the callback (its ``eval_ranks``, which
            decide the validation passes). Must be among them.
        num_generate: validation examples scored by greedy generation (exact match of the final answer,
            GSM8K-style data only); 0 turns generation off.
        max_new_tokens: generation budget per answer (validation and predict).
        rank: the rank ``predict`` generates at (default r_max).
        adapter: a saved adapter directory to load before validate/test/predict.
        output_dir: where the end of ``fit`` writes ``rank_curve.json`` (default: the logger's directory). On the
            recipe's command line the adapter goes there too, to ``output_dir/adapter`` (unless the callback's
            ``save_adapter`` names a directory); otherwise where ``save_adapter`` says.
        quantize: load the frozen base quantized with bitsandbytes: ``"nf4"`` or ``"fp4"`` (4-bit, double
            quantization, compute dtype ``dtype``) or ``"int8"`` (LLM.int8); None (default) keeps it unquantized.
            Needs ``pip install 'lightning_matlora[quant]'``.
    """

    def __init__(self, name_or_path: str = DEFAULT_BASE, dtype: str = "float32", trust_remote_code: bool = False,
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_ratio: float = 0.05,
                 eval_ranks: list[int] | None = None, num_generate: int = 64, max_new_tokens: int = 32,
                 rank: int | None = None, adapter: str | None = None, output_dir: str | None = None,
                 quantize: Optional[Literal["nf4", "fp4", "int8"]] = None) -> None:
        super().__init__()
        check_options(dtype=dtype, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                      eval_ranks=eval_ranks, num_generate=num_generate, max_new_tokens=max_new_tokens, rank=rank,
                      adapter=adapter)
        self.save_hyperparameters()
        self.model = load_model(name_or_path, dtype, trust_remote_code, quantize)
        ranks = sorted(eval_ranks) if eval_ranks else None  # None: the callback's eval ranks
        # the rank curves: updated in validation_step at the rank the callback has set
        self.loss = RankCurveMetric(ranks=ranks, higher_is_better=False)  # answer-token loss (token-weighted)
        self.token_acc = RankCurveMetric(ranks=ranks, higher_is_better=True)  # % of answer tokens right
        self.exact_match = (RankCurveMetric(ranks=ranks, higher_is_better=True)  # % of final answers right
                            if num_generate > 0 else None)
        self.curves: dict[str, RankCurve] = {}  # the last validation (or test) epoch's curves, by metric
        self.base_metrics: dict[str, float] | None = None
        self.outputs: dict[str, str] = {}
        self.fit_report = ""  # the end-of-fit advice and paths, until printed
        self.defer_report = False  # True: print_fit_report() is called by whoever ran fit (the recipe's CLI)

    # ---------------------------------------------------------------------------------------------- helpers
    @property
    def tokenizer(self):
        return self.trainer.datamodule.load_tokenizer()

    def matlora(self) -> MatryoshkaLoRA:
        """The trainer's MatryoshkaLoRA callback."""
        return find_matlora(self.trainer.callbacks)

    def check_callbacks(self, callbacks: Iterable[pl.Callback]) -> None:
        """Check the options that depend on the callback's settings (run by the CLI when it builds the objects,
        and at setup): the eval ranks and the predict rank against r_max and the callback's eval ranks."""
        cb = find_matlora(callbacks)
        ev, r_max = list(cb.config.eval_ranks), cb.config.r_max
        if cb.rank_eval is None:
            raise ValueError("The recipe's metrics are measured by the MatryoshkaLoRA callback's rank evaluation, "
                             "which rank_eval: null turns off: remove rank_eval from the callback's init_args.")
        wanted = self.hparams.eval_ranks or []
        outside = sorted(set(wanted) - set(ev))
        if outside:
            above = [r for r in outside if r > r_max]
            raise ValueError(f"--model.eval_ranks {sorted(wanted)}: ranks {outside} are not among the callback's eval "
                             f"ranks {ev}" + (f" ({above} exceed r_max={r_max})" if above else "")
                             + f". Choose ranks from {ev}, or evaluate more ranks with "
                               f"--trainer.callbacks.init_args.eval_ranks (each in 1…r_max={r_max}).")
        if self.hparams.rank is not None and self.hparams.rank > r_max:
            raise ValueError(f"--model.rank {self.hparams.rank} exceeds the adapter's r_max={r_max}: choose a rank in "
                             f"1…{r_max}.")

    def _with_generation(self) -> bool:
        dm = self.trainer.datamodule
        return self.hparams.num_generate > 0 and getattr(dm, "schema", None) == "gsm8k"

    # ------------------------------------------------------------------------------------------------ train
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("No trainable parameters: add the MatryoshkaLoRA callback (it is in the default config) "
                             "or unfreeze parameters.")
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = max(1, int(self.hparams.warmup_ratio * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------------- evaluation
    def _token_stats(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[summed answer-token loss, correct answer tokens, answer tokens] of one batch at the current rank."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        mask = labels != -100
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                               reduction="sum")
        correct = ((logits.argmax(-1) == labels) & mask).sum()
        return torch.stack([loss.detach(), correct.float(), mask.sum().float()])

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]]) -> list[str]:
        """Greedy answers to tokenised prompts (left-padded in batches), decoded without special tokens."""
        tok = self.tokenizer
        out: list[str] = []
        bs = self.trainer.datamodule.batch_size
        for i in range(0, len(prompts), bs):
            chunk = prompts[i:i + bs]
            n = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), n), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, p in enumerate(chunk):
                ids[j, n - len(p):] = torch.tensor(p)
                mask[j, n - len(p):] = 1
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=self.hparams.max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out += tok.batch_decode(gen[:, n:], skip_special_tokens=True)
        return out

    def _exact_match_counts(self) -> tuple[float, int]:
        """(percentage, count) of this process's share of the first ``num_generate`` validation (or test) examples
        whose greedy final answer is right, at the current rank."""
        from instruct_encoding import final_answer

        split = "test" if self.trainer.testing else "val"
        examples = self.trainer.datamodule.splits[split][:self.hparams.num_generate]
        mine = examples[self.global_rank::self.trainer.world_size]
        if not mine:
            return 0.0, 0
        texts = self._generate([e.input_ids[:e.n_prompt] for e in mine])
        hits = sum(final_answer(t) == e.reference for t, e in zip(texts, mine))
        return 100.0 * hits / len(mine), len(mine)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # the callback calls this step once per eval rank with the model set to that rank; Lightning's own call
        # (the training forward) counts for no rank, so skip its work
        if self.token_acc.active_rank is None:
            return
        loss_sum, correct, n = self._token_stats(batch)
        if n > 0:
            self.loss.update(loss_sum / n, n)
            self.token_acc.update(100.0 * correct / n, n)
        if self.exact_match is not None and batch_idx == 0:  # once per epoch: the first num_generate examples
            em, count = self._exact_match_counts()  # greedy generation at the active rank
            self.exact_match.update(em, count)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.curves = {c.metric: c for c in self.matlora().last_curves}  # the callback's hook ran first
        if "token_acc" in self.curves:
            acc, em = self.curves["token_acc"], self.curves.get("exact_match")
            rank_zero_info(f"epoch {self.current_epoch}: " + "  ".join(
                f"r{k}: acc {acc.score_at(k):.1f}" + (f" em {em.score_at(k):.1f}" if em else "") for k in acc.ranks))

    def evaluate_base(self) -> dict[str, float]:
        """Loss, token accuracy (and exact match) of the model as it is now, over the whole validation split
        (summed over processes)."""
        return self.evaluate_at(self.matlora().config.r_max)  # any rank: the adapter is zero

    @torch.no_grad()
    def evaluate_at(self, rank: int | dict[str, int]) -> dict[str, float]:
        """Loss, token accuracy (and exact match) over the whole validation split (summed over processes) with the
        adapter at ``rank``: a rank, or a rank per layer (``{name or pattern: k}``, e.g. an allocation)."""
        was_training = self.model.training
        self.model.eval()
        totals = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss sum, correct, tokens, hits, scored
        with at_rank(self.model, rank):
            for batch in self.trainer.datamodule.val_dataloader():
                totals[:3] += self._token_stats({n: t.to(self.device) for n, t in batch.items()}).double()
            if self.exact_match is not None:
                em, count = self._exact_match_counts()
                totals[3:] += torch.tensor([em * count / 100.0, count], dtype=torch.float64, device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        self.model.train(was_training)
        loss, correct, tokens, hits, scored = totals.tolist()
        metrics = {"loss": loss / tokens, "token_acc": 100.0 * correct / tokens}
        if self.exact_match is not None:
            metrics["exact_match"] = 100.0 * hits / max(scored, 1.0)
        return metrics

    def on_fit_start(self) -> None:
        layers = adapted_layers(self.model)
        fresh = layers and all(bool((m.lora_B == 0).all()) for m in layers.values())
        if not fresh or self.trainer.limit_val_batches == 0:
            return
        self.base_metrics = self.evaluate_base()
        self.matlora().base_scores = self.base_metrics  # the base row of the callback's table, a line on its plots
        rank_zero_info("Base model before fine-tuning (the adapter starts at zero): "
                       + _fmt_metrics(self.base_metrics))

    # ----------------------------------------------------------------------------------------- end of fit
    def on_fit_end(self) -> None:
        # the callback's on_fit_end ran first: it saved the adapter with its curves (every process took part) and
        # printed the rank-curve table, with the base model's row, and plotted one PNG per metric
        cb = self.matlora()
        adapter = cb.adapter_path
        if adapter:
            self.outputs["adapter"] = adapter
        key = _advice_metric(self.curves) if self.curves else "token_acc"
        png = Path(cb.rank_eval.plot_path(self.trainer, key))  # log_dir is a collective under DDP: every process
        if not self.trainer.is_global_zero:
            return
        saved = f"Adapter saved to {adapter}" if adapter else "The adapter was not saved (save_adapter: false)."
        if not self.curves:
            self.fit_report = f"\nNo validation ran, so there is no rank curve. {saved}"
        else:
            out = Path(self.hparams.output_dir or self.trainer.log_dir or self.trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "rank_curve.json").write_text(json.dumps({"curve": by_rank(self.curves),
                                                             "base": self.base_metrics}, indent=1))
            self.outputs["png"] = str(png) if png.is_file() else ""
            self.fit_report = "\n".join(["\n" + format_advice(self.curves, self.n_generated()), saved]
                                         + ([f"Rank curve plotted to {png}"] if png.is_file() else []))
        if not self.defer_report:
            self.print_fit_report()

    def print_fit_report(self) -> None:
        """Print the end-of-fit advice and paths (once; on the main process only). The recipe's command line calls
        it after ``fit`` returns, so that it comes after the progress bar's last line."""
        if self.fit_report:
            print(self.fit_report)
            self.fit_report = ""

    def n_generated(self, split: str = "val") -> int | None:
        """How many examples of ``split`` the exact match was measured on (None without generation)."""
        if self.exact_match is None:
            return None
        return min(self.hparams.num_generate, len(self.trainer.datamodule.splits[split]))

    # -------------------------------------------------------------------------------------- load / predict
    def setup(self, stage: str) -> None:
        self.check_callbacks(self.trainer.callbacks)
        if self.exact_match is not None and not self._with_generation():
            self.exact_match = None  # not GSM8K-style data: no final answer to match (the callback re-reads this)
        if self.hparams.adapter and stage in ("validate", "test", "predict"):
            try:
                load_adapter(self.model, self.hparams.adapter)
            except ValueError as e:
                raise ValueError(f"{e} With the recipe, run {stage} with the training run's MatryoshkaLoRA "
                                 f"settings, e.g. --config <run dir>/config.yaml.") from None

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.curves = {c.metric: c for c in self.matlora().last_test_curves}  # the callback prints their table

    def predict_step(self, batch: list[str], batch_idx: int) -> list[dict[str, Any]]:
        k = self.hparams.rank or self.matlora().config.r_max
        prompts = self.trainer.datamodule.prompt_ids(batch)
        with at_rank(self.model, k):
            answers = self._generate(prompts)
        for p, a in zip(batch, answers):
            rank_zero_info(f"[rank {k}] {p}{a}")
        return [{"prompt": p, "answer": a, "rank": k} for p, a in zip(batch, answers)]


# ------------------------------------------------------------------------------------------------ options
def check_options(dtype: str, lr: float, weight_decay: float, warmup_ratio: float, eval_ranks: list[int] | None,
                  num_generate: int, max_new_tokens: int, rank: int | None, adapter: str | None) -> None:
    """Every option of the module that can be checked on its own, at construction (before any training)."""
    if dtype not in DTYPES:
        raise ValueError(f"--model.dtype {dtype!r} is not one of {sorted(DTYPES)}.")
    if not lr > 0:
        raise ValueError(f"--model.lr must be > 0, got {lr!r}.")
    if not weight_decay >= 0:
        raise ValueError(f"--model.weight_decay must be ≥ 0, got {weight_decay!r}.")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"--model.warmup_ratio must be in [0, 1) (a share of the optimizer steps), got "
                         f"{warmup_ratio!r}.")
    if eval_ranks is not None:
        bad = [r for r in eval_ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
        twice = sorted({r for r in eval_ranks if list(eval_ranks).count(r) > 1})
        if bad or twice or not eval_ranks:
            why = (f"must be integers ≥ 1, got {bad}" if bad else f"has duplicates {twice}" if twice else "is empty")
            raise ValueError(f"--model.eval_ranks {why}: give distinct ranks in 1…r_max, e.g. --model.eval_ranks "
                             f"'[1, 4, 16]', or leave it unset for the callback's eval ranks.")
    if num_generate < 0 or max_new_tokens < 1:
        raise ValueError(f"--model.num_generate must be ≥ 0 and --model.max_new_tokens ≥ 1, got {num_generate} and "
                         f"{max_new_tokens}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"--model.rank must be a rank ≥ 1 (at most the adapter's r_max), got {rank!r}.")
    if adapter is not None and not Path(adapter).is_dir():
        raise ValueError(f"--model.adapter {adapter!r} is not a directory: give the adapter directory printed at "
                         f"the end of fit.")


def find_matlora(callbacks: Iterable[pl.Callback]) -> MatryoshkaLoRA:
    found = [cb for cb in callbacks if isinstance(cb, MatryoshkaLoRA)]
    if not found:
        raise ValueError("The recipe needs the MatryoshkaLoRA callback in trainer.callbacks (recipes/configs/"
                         "default.yaml has it; a --trainer.callbacks option on the command line replaces that list, "
                         "so include lightning_matlora.MatryoshkaLoRA in it).")
    return found[0]


# ---------------------------------------------------------------------------------------- report and files
def by_rank(curves: dict[str, RankCurve]) -> dict[int, dict[str, float]]:
    """``{rank: {metric: score}}`` over the ranks of the curves (the form of ``rank_curve.json``)."""
    ranks = sorted({r for c in curves.values() for r in c.ranks})
    return {k: {n: c.score_at(k) for n, c in curves.items() if k in c.ranks} for k in ranks}


def _fmt_metrics(m: dict[str, float]) -> str:
    s = f"val loss {m['loss']:.4f}, token accuracy {m['token_acc']:.1f}%"
    return s + (f", exact match {m['exact_match']:.1f}%" if "exact_match" in m else "")


def _advice_metric(curves: dict[str, RankCurve]) -> str:
    """Exact match when it was measured and is not zero everywhere, else answer-token accuracy."""
    em = curves.get("exact_match")
    return "exact_match" if em is not None and any(v > 0 for v in em.scores) else "token_acc"


def format_advice(curves: dict[str, RankCurve], n_generated: int | None = None) -> str:
    """The rank to serve: ``select_rank``'s advice on exact match (or token accuracy) and the ``--model.rank``
    option that serves it (the table of the curves is the callback's).

    ``n_generated``: the validation examples exact match was measured on. When exact match cannot tell the ranks
    apart on that many examples (95% Wilson intervals overlap, :func:`lightning_matlora.curve.select_rank`), the
    advice says so and comes from answer-token accuracy instead."""
    key = _advice_metric(curves)
    lines = []
    if key == "exact_match" and n_generated and ranks_indistinguishable(curves[key].as_mapping(), n_generated, 100.0):
        lines.append("Advice (select_rank, exact match): " + describe_rank_choice(
            curves[key].as_mapping(), 0.01, True, True, "exact match", n=n_generated, max_score=100.0))
        key = "token_acc"
    what = HEADS[key].rstrip(" %")
    curve = curves[key]
    lines.append(f"Advice (select_rank, {what}): "
                 + describe_rank_choice(curve.as_mapping(), 0.01, True, curve.higher_is_better, what)
                 + f" Serve it with --model.rank {curve.select_rank(tolerance=0.01)}.")
    return "\n".join(lines)
