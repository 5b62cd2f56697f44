"""A minimal causal-LM LightningModule and deterministic token data for real `Trainer.fit` tests."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader


class CausalLM(L.LightningModule):
    """Wraps a transformers causal LM; the loss is the model's own next-token loss on the batch's tokens.

    ``configure_optimizers`` passes ``self.parameters()`` (frozen base included), as users commonly do.
    If ``builder`` is given, the model is built in ``configure_model`` instead of ``__init__``.
    """

    def __init__(self, model: torch.nn.Module | None = None, builder: Callable[[], torch.nn.Module] | None = None,
                 lr: float = 1e-2, optimizer: str = "adamw") -> None:
        super().__init__()
        self.model = model
        self.builder = builder
        self.lr = lr
        self.optimizer_name = optimizer
        self.seen_at_configure_optimizers: dict | None = None

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        from lightning_matlora import adapted_layers

        self.seen_at_configure_optimizers = {
            "adapted": len(adapted_layers(self)),
            "trainable": sorted(n for n, p in self.named_parameters() if p.requires_grad),
        }
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class BuildsInConfigureModel(CausalLM):
    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.builder()


def token_loader(n: int = 12, seq: int = 10, batch_size: int = 4, vocab: int = 97, seed: int = 0) -> DataLoader:
    tokens = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
    return DataLoader(tokens, batch_size=batch_size, shuffle=False)


def trainer(callbacks, **kw) -> L.Trainer:
    # a fresh root dir: the callback saves the final adapter there, never into the repository
    args = dict(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=tempfile.mkdtemp(prefix="matlora-test-"))
    args.update(kw)
    return L.Trainer(callbacks=callbacks, **args)


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
