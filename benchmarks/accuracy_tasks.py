"""The synthetic tasks of the accuracy study (``accuracy.py``) and their pretrained base models.

A task is a cipher on sequences ``BOS x1 y1 x2 y2 …``, scored on the y tokens only; a regime (``small``, ``large``,
``chain``) derives the fine-tuning task from the base's cipher. :func:`build_base` pretrains a small Llama on the
base cipher (cached on disk by its settings) and freezes it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import llama_config, random_llama


# ------------------------------------------------------------------------------------------------------ tasks
@dataclasses.dataclass
class Task:
    """A cipher on sequences ``BOS x1 y1 x2 y2 …`` with loss and accuracy on the y tokens only.

    ``chain=False``: y_i = table[x_i] (``table`` has length ``symbols``). ``chain=True``: y_i = table[y_{i-1}, x_i]
    (``table`` is ``(symbols + 1) × symbols``, row ``symbols`` is the start row). Tokens are 0…symbols-1, BOS =
    ``symbols``.
    """

    table: torch.Tensor
    symbols: int
    pairs: int
    chain: bool = False

    def sample(self, rows: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both ``rows × 2·pairs`` long tensors; targets are -100 where no loss is taken."""
        V, L = self.symbols, self.pairs
        x = torch.randint(V, (rows, L), generator=g)
        if self.chain:
            y = torch.empty_like(x)
            prev = torch.full((rows,), V, dtype=torch.long)
            for i in range(L):
                y[:, i] = self.table[prev, x[:, i]]
                prev = y[:, i]
        else:
            y = self.table[x]
        seq = torch.empty(rows, 2 * L + 1, dtype=torch.long)
        seq[:, 0] = V
        seq[:, 1::2] = x
        seq[:, 2::2] = y
        inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
        targets[:, 0::2] = -100  # the x positions are random: no loss there
        return inputs, targets


def _random_table(symbols: int, chain: bool, g: torch.Generator) -> torch.Tensor:
    if chain:
        return torch.stack([torch.randperm(symbols, generator=g) for _ in range(symbols + 1)])
    return torch.randperm(symbols, generator=g)


def base_task(size: dict, seed: int) -> Task:
    g = torch.Generator().manual_seed(10_000 + seed)
    return Task(_random_table(size["symbols"], size["chain"], g), size["symbols"], size["pairs"], size["chain"])


def regime_size(size: dict, regime: str) -> dict:
    """The settings a regime runs with: the size's, with the ``chain`` regime's own task (and base) settings."""
    return size | size["chain_task"] if regime == "chain" else size


def regime_task(regime: str, size: dict, base_seed: int) -> Task:
    """``large``: a fresh random cipher; ``small`` and ``chain``: the base's cipher with ``size['override']``
    entries changed (``size`` from :func:`regime_size`)."""
    t0 = base_task(size, base_seed)
    V = size["symbols"]
    g = torch.Generator().manual_seed(20_000 + base_seed + {"small": 0, "large": 1, "chain": 2}[regime])
    if regime == "large":
        table = _random_table(V, size["chain"], g)
    else:  # change `override` entries of the base cipher, each to a different symbol
        table = t0.table.clone()
        flat = table.view(-1)
        old = t0.table.view(-1)
        for c in torch.randperm(flat.numel(), generator=g)[: size["override"]].tolist():
            new = int(torch.randint(V - 1, (1,), generator=g))
            flat[c] = new if new < old[c] else new + 1
    return Task(table, V, size["pairs"], size["chain"])


# ------------------------------------------------------------------------------------------------------ model
def build_base(size: dict, device: str, dtype: torch.dtype, cache: Path, base_seed: int = 0):
    """The frozen base: a small Llama pretrained on the base cipher (cached on disk by its settings)."""
    cfg = llama_config(vocab=size["symbols"] + 1, hidden=size["hidden"], inter=size["inter"], layers=size["layers"],
                       heads=size["heads"], kv_heads=size["heads"], max_positions=2 * size["pairs"] + 8)
    key = (f"base_{'chain' if size['chain'] else 'uni'}_V{size['symbols']}_L{size['pairs']}_h{size['hidden']}_l{size['layers']}_i{size['inter']}"
           f"_s{size['pretrain_steps']}_seed{base_seed}.pt")
    path = cache / key
    model = random_llama(cfg, torch.float32, seed=base_seed)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
    else:
        task = base_task(size, base_seed)
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        steps = size["pretrain_steps"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.0, 1 - s / steps))
        g = torch.Generator().manual_seed(30_000 + base_seed)
        t = time.time()
        for step in range(steps):
            inputs, targets = task.sample(64, g)
            loss = task_loss(model, inputs.to(device), targets.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        acc, _ = evaluate(model, task, 512, device, seed=1)
        print(f"[base] pretrained {steps} steps in {time.time() - t:.0f}s, accuracy on its cipher {acc:.3f}",
              flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        model.cpu()
        torch.save(model.state_dict(), path)
    model.to(device=device, dtype=dtype).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def task_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


@torch.no_grad()
def evaluate(model, task: Task, rows: int, device: str, seed: int) -> tuple[float, float]:
    """(token accuracy on y, mean loss on y) over ``rows`` held-out sequences (teacher forcing)."""
    g = torch.Generator().manual_seed(seed)
    inputs, targets = task.sample(rows, g)
    inputs, targets = inputs.to(device), targets.to(device)
    was = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for i in range(0, rows, 256):
        logits = model(input_ids=inputs[i:i + 256]).logits.float()
        tg = targets[i:i + 256]
        mask = tg != -100
        loss_sum += F.cross_entropy(logits[mask], tg[mask], reduction="sum").item()
        correct += (logits.argmax(-1)[mask] == tg[mask]).sum().item()
        total += mask.sum().item()
    model.train(was)
    return correct / total, loss_sum / total
