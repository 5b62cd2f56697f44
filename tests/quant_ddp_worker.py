"""One process of the DDP run on a 4-bit base (launched by tests/test_quantized.py through torchrun).

    python -m torch.distributed.run --nproc-per-node=2 tests/quant_ddp_worker.py FLOAT_BASE_DIR OUT_DIR

Each process loads the same 4-bit base from FLOAT_BASE_DIR, trains 3 steps with DDP on its half of each global batch
and writes ``rank{r}.pt`` (its adapter and losses).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_matlora import MatryoshkaLoRA  # noqa: E402
from lightning_matlora.distributed import full_adapter_state_dict  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 10


def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (STEPS * GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(11))


class QuantLM(pl.LightningModule):
    def __init__(self, path: str) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        self.model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            device_map="cpu").train()
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(float(loss.detach()))
        return loss

    def train_dataloader(self) -> DataLoader:
        """Process g of w takes rows g, g + w, ... so that each step's global batch is the single run's batch."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return DataLoader(tokens()[rank::world], batch_size=GLOBAL_BATCH // world, shuffle=False)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def run(path: str, devices: int, out: str | None = None) -> dict[str, torch.Tensor]:
    """Train on the global batches: ``devices=2`` under DDP (each process its half), 1 in one process."""
    pl.seed_everything(0, verbose=False)
    module = QuantLM(path)
    cb = MatryoshkaLoRA(r_max=4, mode="matryoshka", verbose=False, save_adapter=False)
    torch.manual_seed(1)
    cb.apply(module)  # the same initial adapter in both runs (the strategy's setup may draw random numbers)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=out, callbacks=[cb],
                         use_distributed_sampler=False)
    trainer.fit(module)
    state = full_adapter_state_dict(trainer)
    if out is not None:
        torch.save({"adapter": state, "losses": module.losses}, os.path.join(out, f"rank{trainer.global_rank}.pt"))
    return state


if __name__ == "__main__":
    run(sys.argv[1], devices=2, out=sys.argv[2])
