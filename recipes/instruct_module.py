"""The LightningModule of the instruction-tuning recipe: a transformers causal LM, evaluated at every eval rank.

The module knows nothing about adapters while training: the ``MatryoshkaLoRA`` callback adapts and freezes the
model. At each validation epoch it evaluates the adapter at every eval rank k (``at_rank``): the loss and the
accuracy of the answer tokens (teacher forcing) and, for GSM8K-style data, the exact match of the final answer
from greedy generation on the first ``num_generate`` validation examples. At the end of ``fit`` it prints the
rank–accuracy table with the AURAC of each metric and the rank advice, saves the adapter and the curve PNG.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_matlora import (MatryoshkaLoRA, RankCurveMetric, at_rank, aurac, controller_of, describe_rank_choice,
                               load_adapter, plot_rank_curves, select_rank)
from lightning_matlora.adapter_checkpoint import save_from_trainer
from lightning_matlora.curve import RankCurve
from lightning_matlora.inject import adapted_layers

RECIPES = Path(__file__).resolve().parent
DEFAULT_BASE = str(RECIPES / "assets" / "base")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
METRICS = ("loss", "token_acc", "exact_match")


def load_or_explain(fn: Callable, name_or_path: str, what: str, **kwargs: Any) -> Any:
    """``fn(name_or_path, **kwargs)`` (a ``from_pretrained``), with a clear error when the name is neither a local
    directory nor reachable on the hub."""
    try:
        return fn(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        if Path(name_or_path).exists():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        if offline:
            why = ("this machine is offline (HF_HUB_OFFLINE=1), so hub names only work for models already in the "
                   "local cache, and this one is not there")
        elif "connect" in str(e).lower():
            why = ("this machine is offline (the hub could not be reached) and the name is neither a local directory "
                   "nor in the local cache")
        else:
            why = "it is not a local directory and the hub could not serve it (check the name and your access)"
        raise ValueError(f"Cannot load the {what} {name_or_path!r}: {why}. Point --model.name_or_path at a local "
                         f"directory holding a transformers model (config.json, weights, tokenizer files), e.g. one "
                         f"written by save_pretrained, or run where the hub is reachable. "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


class InstructLM(pl.LightningModule):
    """Causal-LM instruction tuning with a per-rank evaluation of the nested adapter.

    Args:
        name_or_path: a transformers causal LM: a hub name or a local directory (default: the recipe's bundled
            base model).
        dtype: weights' dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (the checkpoint's).
        trust_remote_code: allow custom model code from the model's repository (off unless asked for).
        lr: peak learning rate of AdamW (linear warm-up over ``warmup_ratio`` of the steps, then linear decay).
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the optimizer steps spent warming up.
        eval_ranks: ranks evaluated each validation epoch; default the callback's eval ranks.
        num_generate: validation examples scored by greedy generation (exact match of the final answer,
            GSM8K-style data only); 0 turns generation off.
        max_new_tokens: generation budget per answer (validation and predict).
        rank: the rank ``predict`` generates at (default r_max).
        adapter: a saved adapter directory to load before validate/test/predict.
        output_dir: where the end of ``fit`` writes the adapter and the curve (default: the logger's directory).
    """

    def __init__(self, name_or_path: str = DEFAULT_BASE, dtype: str = "float32", trust_remote_code: bool = False,
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_ratio: float = 0.05,
                 eval_ranks: list[int] | None = None, num_generate: int = 64, max_new_tokens: int = 32,
                 rank: int | None = None, adapter: str | None = None, output_dir: str | None = None) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}.")
        if num_generate < 0 or max_new_tokens < 1:
            raise ValueError("num_generate must be ≥ 0 and max_new_tokens ≥ 1.")
        if adapter is not None and not Path(adapter).is_dir():
            raise ValueError(f"--model.adapter {adapter!r} is not a directory: give the adapter directory printed at "
                             f"the end of fit.")
        self.save_hyperparameters()
        from transformers import AutoModelForCausalLM

        self.model = load_or_explain(AutoModelForCausalLM.from_pretrained, name_or_path, "model",
                                     dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        self.model.train()  # from_pretrained returns eval mode; Lightning switches modes per stage from here
        self.curve: dict[int, dict[str, float]] = {}
        self.base_metrics: dict[str, float] | None = None
        self.outputs: dict[str, str] = {}

    # ---------------------------------------------------------------------------------------------- helpers
    @property
    def tokenizer(self):
        return self.trainer.datamodule.load_tokenizer()

    def ranks(self) -> list[int]:
        if self.hparams.eval_ranks:
            return sorted(self.hparams.eval_ranks)
        return list(controller_of(self.model).config.eval_ranks)

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
        """(percentage, count) of this process's share of the first ``num_generate`` validation examples whose
        greedy final answer is right, at the current rank."""
        from instruct_data import final_answer

        split = "test" if self.trainer.testing else "val"
        examples = self.trainer.datamodule.splits[split][:self.hparams.num_generate]
        mine = examples[self.global_rank::self.trainer.world_size]
        if not mine:
            return 0.0, 0
        texts = self._generate([e.input_ids[:e.n_prompt] for e in mine])
        hits = sum(final_answer(t) == e.reference for t, e in zip(texts, mine))
        return 100.0 * hits / len(mine), len(mine)

    def _new_curves(self, ranks: list[int]) -> None:
        """One :class:`RankCurveMetric` per measure (weighted means, reduced across processes by torchmetrics)."""
        self.curves = torch.nn.ModuleDict({n: RankCurveMetric(ranks=ranks, higher_is_better=(n != "loss"))
                                           for n in METRICS}).to(self.device)

    def _update_tokens(self, k: int, batch: dict[str, torch.Tensor]) -> None:
        loss_sum, correct, n = self._token_stats(batch)
        if n > 0:
            self.curves["loss"].update(k, loss_sum / n, n)
            self.curves["token_acc"].update(k, 100.0 * correct / n, n)

    def _compute_curves(self, ranks: list[int], generation: bool) -> dict[int, dict[str, float]]:
        """Runs generation (if asked) at every rank, then computes every curve on every process."""
        if generation:
            for k in ranks:
                with at_rank(self.model, k):
                    em, n = self._exact_match_counts()
                self.curves["exact_match"].update(k, em, n)
        names = METRICS if generation else METRICS[:2]
        computed = {n: self.curves[n].compute()["curve"] for n in names}
        for c in self.curves.values():
            c.reset()
        return {k: {n: float(computed[n][k]) for n in names} for k in ranks}

    def on_validation_epoch_start(self) -> None:
        self._new_curves(self.ranks())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        for k in self.ranks():
            with at_rank(self.model, k):
                self._update_tokens(k, batch)

    def on_validation_epoch_end(self) -> None:
        curve = self._compute_curves(self.ranks(), self._with_generation() and not self.trainer.sanity_checking)
        if self.trainer.sanity_checking:
            return
        self.curve = curve
        ranks = list(curve)
        for k, m in curve.items():
            for name, v in m.items():
                self.log(f"val/{name}@r{k:0{len(str(max(ranks)))}d}", v)
        for name in METRICS:
            if all(name in m for m in curve.values()):
                self.log(f"val/aurac_{name}", aurac(ranks, [curve[k][name] for k in ranks]),
                         prog_bar=name != "loss")
        rank_zero_info(f"epoch {self.current_epoch}: " + "  ".join(
            f"r{k}: acc {m['token_acc']:.1f}" + (f" em {m['exact_match']:.1f}" if "exact_match" in m else "")
            for k, m in curve.items()))

    @torch.no_grad()
    def evaluate_base(self) -> dict[str, float]:
        """Loss, token accuracy (and exact match) of the model as it is now, over the whole validation split."""
        was_training = self.model.training
        self.model.eval()
        k = controller_of(self.model).r_max  # any rank: the adapter is zero
        self._new_curves([k])
        for batch in self.trainer.datamodule.val_dataloader():
            with at_rank(self.model, k):
                self._update_tokens(k, {n: t.to(self.device) for n, t in batch.items()})
        metrics = self._compute_curves([k], self._with_generation())[k]
        self.model.train(was_training)
        return metrics

    def on_fit_start(self) -> None:
        layers = adapted_layers(self.model)
        fresh = layers and all(bool((m.lora_B == 0).all()) for m in layers.values())
        if not fresh or self.trainer.limit_val_batches == 0:
            return
        self.base_metrics = self.evaluate_base()
        rank_zero_info("Base model before fine-tuning (the adapter starts at zero): "
                       + _fmt_metrics(self.base_metrics))

    # ----------------------------------------------------------------------------------------- end of fit
    def on_fit_end(self) -> None:
        out = Path(self.hparams.output_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        ranks = sorted(self.curve)
        curves = []
        if ranks:  # one recorded curve per metric, the advice metric first
            key = _advice_metric(self.curve)
            names = [key] + [n for n in self.curve[ranks[0]] if n != key and all(n in self.curve[k] for k in ranks)]
            curves = [RankCurve(tuple(ranks), tuple(self.curve[k][n] for k in ranks), n, n != "loss") for n in names]
        adapter_dir = out / "adapter"
        # every process takes part (sharded adapters are gathered), global rank zero writes
        save_from_trainer(self.trainer, self.model, adapter_dir, curves=curves,
                          metadata={"base_model": self.hparams.name_or_path})
        self.outputs["adapter"] = str(adapter_dir)
        if not self.trainer.is_global_zero:
            return
        if not self.curve:
            print(f"\nNo validation ran, so there is no rank curve. Adapter saved to {adapter_dir}")
            return
        (out / "rank_curve.json").write_text(json.dumps({"curve": self.curve, "base": self.base_metrics}, indent=1))
        png = plot_curve(self.curve, self.base_metrics, out / "rank_curve.png")
        self.outputs["png"] = str(png) if png else ""
        print("\n" + format_report(self.curve, self.base_metrics))
        print(f"Adapter saved to {adapter_dir}")
        if png:
            print(f"Rank curve plotted to {png}")

    # -------------------------------------------------------------------------------------- load / predict
    def setup(self, stage: str) -> None:
        for cb in self.trainer.callbacks if self._trainer is not None else []:
            if isinstance(cb, MatryoshkaLoRA) and getattr(cb, "rank_eval", None) is not None:
                cb.rank_eval = None  # this module measures its own curves (loss, token accuracy, exact match)
        if self.hparams.adapter and stage in ("validate", "test", "predict"):
            try:
                load_adapter(self.model, self.hparams.adapter)
            except ValueError as e:
                raise ValueError(f"{e} With the recipe, run {stage} with the training run's MatryoshkaLoRA "
                                 f"settings, e.g. --config <run dir>/config.yaml.") from None

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()
        if self.global_rank == 0 and self.curve:
            print("\n" + format_report(self.curve, None).replace("(validation)", "(test)"))

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "validate" and self.global_rank == 0 and self.curve:
            print("\n" + format_report(self.curve, None))

    def predict_step(self, batch: list[str], batch_idx: int) -> list[dict[str, Any]]:
        k = self.hparams.rank or controller_of(self.model).r_max
        tok = self.tokenizer
        prompts = [tok(p, add_special_tokens=True)["input_ids"] for p in batch]
        with at_rank(self.model, k):
            answers = self._generate(prompts)
        for p, a in zip(batch, answers):
            rank_zero_info(f"[rank {k}] {p}{a}")
        return [{"prompt": p, "answer": a, "rank": k} for p, a in zip(batch, answers)]


# ---------------------------------------------------------------------------------------- report and files
def _fmt_metrics(m: dict[str, float]) -> str:
    s = f"val loss {m['loss']:.4f}, token accuracy {m['token_acc']:.1f}%"
    return s + (f", exact match {m['exact_match']:.1f}%" if "exact_match" in m else "")


def _advice_metric(curve: dict[int, dict[str, float]]) -> str:
    """Exact match when it was measured and is not zero everywhere, else answer-token accuracy."""
    if curve and all("exact_match" in m for m in curve.values()) and any(m["exact_match"] > 0 for m in curve.values()):
        return "exact_match"
    return "token_acc"


def format_report(curve: dict[int, dict[str, float]], base: dict[str, float] | None) -> str:
    """The end-of-fit table: one row per eval rank (and the base), the AURAC of each metric, the rank advice."""
    ranks = sorted(curve)
    names = [n for n in METRICS if all(n in curve[k] for k in ranks)]
    heads = {"loss": "loss", "token_acc": "token acc %", "exact_match": "exact match %"}

    def cells(values: dict[str, float]) -> str:
        return " ".join(f"{values.get(n, float('nan')):>14.4f}" if n == "loss"
                        else f"{values.get(n, float('nan')):>14.1f}" for n in names)

    lines = ["Rank curve (validation)", f"{'rank':>6} " + " ".join(f"{heads[n]:>14}" for n in names)]
    if base:
        lines.append(f"{'base':>6} " + cells(base))
    lines += [f"{k:>6} " + cells(curve[k]) for k in ranks]
    lines.append(f"{'AURAC':>6} " + cells({n: aurac(ranks, [curve[k][n] for k in ranks]) for n in names}))
    key = _advice_metric(curve)
    scores = {k: curve[k][key] for k in ranks}
    r = select_rank(scores, tolerance=0.01)
    lines.append(f"Advice (select_rank, {heads[key].rstrip(' %')}): "
                 + describe_rank_choice(scores, tolerance=0.01, name=heads[key].rstrip(" %"))
                 + f" Serve it with --model.rank {r}.")
    return "\n".join(lines)


def plot_curve(curve: dict[int, dict[str, float]], base: dict[str, float] | None, path: Path) -> Path | None:
    """Accuracy against rank (log2 axis) with the base level dashed; ``None`` if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    ranks = sorted(curve)
    names = [n for n in ("token_acc", "exact_match") if all(n in curve[k] for k in ranks)]
    labels = {"token_acc": "answer-token accuracy", "exact_match": "exact match"}
    fig, ax = plot_rank_curves([{k: curve[k][n] for k in ranks} for n in names],
                               labels=[f"{labels[n]} (AURAC {aurac(ranks, [curve[k][n] for k in ranks]):.1f})"
                                       for n in names], ylabel="%", title="Validation accuracy by adapter rank")
    for line, n in zip(ax.get_lines(), names):
        if base and n in base:
            ax.axhline(base[n], ls="--", color=line.get_color(), alpha=0.6, label=f"base model: {labels[n]}")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return path
