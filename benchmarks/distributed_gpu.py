"""Nested adapters under Lightning's stock FSDPStrategy and DeepSpeed ZeRO-3 on GPUs, bf16: does it run, memory per
GPU, tokens/s, and is the saved adapter complete.

    torchrun --nproc-per-node=2 benchmarks/distributed_gpu.py --strategy fsdp
    torchrun --nproc-per-node=2 benchmarks/distributed_gpu.py --strategy deepspeed_stage_3
    torchrun --nproc-per-node=2 benchmarks/distributed_gpu.py --strategy ddp      # the reference

The model is a Llama built from a config (no download): by default ~250M parameters (hidden 1024, 16 layers,
vocab 32000), trained on random tokens (throughput only). Rank 0 prints one JSON line: strategy, world size,
parameters, adapter parameters, tokens/s over the timed steps (all processes), peak memory per GPU (GiB, the
maximum over processes) and whether the gathered adapter is complete (every tensor at its full shape, finite).
``--out FILE`` also writes it. Not yet run on a GPU (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_matlora import MatryoshkaLoRA, full_adapter_state_dict


class RandomTokens(Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        self.n, self.seq_len, self.vocab = n, seq_len, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(i)
        return torch.randint(0, self.vocab, (self.seq_len,), generator=g)


class BenchLM(pl.LightningModule):
    """The Llama is built in configure_model (partitioned as created under ZeRO-3, sharded after by FSDP)."""

    def __init__(self, cfg: dict, batch_size: int, seq_len: int, steps: int) -> None:
        super().__init__()
        self.cfg, self.batch_size, self.seq_len, self.steps = cfg, batch_size, seq_len, steps
        self.model = None
        self.step_times: list[float] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import LlamaConfig, LlamaForCausalLM

        self.model = LlamaForCausalLM(LlamaConfig(**self.cfg))

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.step_times.append(time.perf_counter() - self._t0)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    def train_dataloader(self):
        n = self.batch_size * self.steps * self.trainer.world_size
        return DataLoader(RandomTokens(n, self.seq_len, self.cfg["vocab_size"]), batch_size=self.batch_size)


def make_strategy(name: str):
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, sharding_strategy="FULL_SHARD")
    return name  # "deepspeed_stage_3", "deepspeed_stage_2", "ddp"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="fsdp", choices=["fsdp", "deepspeed_stage_3", "deepspeed_stage_2", "ddp"])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--r-max", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    cfg = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75) // 64 * 64,
               num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
               num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=args.seq_len,
               tie_word_embeddings=False, torch_dtype="bfloat16")
    devices = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
    nodes = int(os.environ.get("WORLD_SIZE", devices)) // devices
    pl.seed_everything(0)
    module = BenchLM(cfg, args.batch_size, args.seq_len, args.steps)
    trainer = pl.Trainer(accelerator="gpu", devices=devices, num_nodes=nodes, strategy=make_strategy(args.strategy),
                         precision="bf16-true", max_steps=args.steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[MatryoshkaLoRA(r_max=args.r_max, save_adapter=False)])
    trainer.fit(module)

    adapter = full_adapter_state_dict(trainer)  # collective: every process
    from lightning_matlora.inject import adapted_layers

    layers = adapted_layers(module)
    complete = bool(layers) and all(
        adapter[f"{n}.lora_A"].shape == (args.r_max, m.in_features)
        and adapter[f"{n}.lora_B"].shape == (m.out_features, args.r_max)
        and bool(torch.isfinite(adapter[f"{n}.lora_A"].float()).all()) for n, m in layers.items())
    timed = module.step_times[args.warmup:]
    tokens = args.batch_size * args.seq_len * trainer.world_size * len(timed)
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=module.device)
    peak = float(trainer.strategy.reduce(peak, reduce_op="max"))
    if trainer.is_global_zero:
        n_params = sum(int(v.numel()) for v in adapter.values())
        report = {"strategy": args.strategy, "world_size": trainer.world_size, "ran": True,
                  "base_config": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
                  "adapter_parameters": n_params, "r_max": args.r_max, "adapter_complete": complete,
                  "tokens_per_s": tokens / sum(timed) if timed else None, "peak_memory_gib_per_gpu": peak,
                  "gpu": torch.cuda.get_device_name(), "batch_size": args.batch_size, "seq_len": args.seq_len}
        print(json.dumps(report))
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
