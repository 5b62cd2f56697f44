"""The exploration behind the default recipe's settings (docs/recipe.md): a plain training loop, no Lightning.

    python recipes/explore_modes.py MODE RANK_SCALE LR STEPS [R_MAX]
    python recipes/explore_modes.py rowwise rank 1e-2 600

Same bundled base and Encode data as the recipe, the MatryoshkaLoRA settings of recipes/configs/default.yaml
except ``mode``/``rank_scale``, AdamW with 20 warm-up steps and linear decay, batch 32, seed 0, one CPU
thread. Prints, per eval rank, the answer-token accuracy on the first 200 validation examples (teacher
forcing) and the greedy exact match on the first 100, before and after training, with the AURAC of each.
"""

from __future__ import annotations

import sys
import time

import torch

from encode_loop import BATCH, exact_match, load_base, load_task, token_accuracy, warmup_linear_decay
from instruct_encoding import Encoded, collate
from lightning_matlora import MatryoshkaLoRA, at_rank, aurac, begin_step

WARMUP_STEPS = 20
N_TOKEN_ACCURACY = 200  # validation examples scored by answer-token accuracy
N_EXACT_MATCH = 100  # the first of those, also scored by greedy exact match
LOG_EVERY = 100  # steps between two loss lines


def evaluate(model: torch.nn.Module, ranks: list[int], val: list[Encoded], tokenizer) -> dict[int, tuple]:
    """``{rank: (answer-token accuracy %, exact match %)}``, each rounded to 0.1."""
    model.eval()
    batch = collate(val, tokenizer.pad_token_id)
    scores = {}
    for k in ranks:
        with torch.no_grad(), at_rank(model, k):
            accuracy = token_accuracy(model, batch)
            em = exact_match(model, val[:N_EXACT_MATCH], tokenizer)
        scores[k] = (round(accuracy, 1), round(em, 1))
    model.train()
    return scores


def train(model: torch.nn.Module, examples: list[Encoded], pad_id: int, lr: float, steps: int) -> None:
    """``steps`` AdamW steps over full batches of ``examples``, reshuffled (seed 0) every epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = warmup_linear_decay(opt, steps, WARMUP_STEPS)
    order = torch.Generator().manual_seed(0)
    step, t0 = 0, time.time()
    while step < steps:
        for idx in torch.randperm(len(examples), generator=order).split(BATCH):
            if len(idx) < BATCH:  # the last, partial batch of an epoch is dropped
                continue
            batch = collate([examples[j] for j in idx], pad_id)
            begin_step(model, step)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % LOG_EVERY == 0:
                print(step, round(float(loss), 3), f"{time.time() - t0:.0f}s", flush=True)
            if step >= steps:
                break


def main(argv: list[str]) -> None:
    if len(argv) not in (4, 5):
        raise SystemExit(__doc__)
    mode, rule, lr, steps = argv[0], argv[1], float(argv[2]), int(argv[3])
    r_max = int(argv[4]) if len(argv) > 4 else 16
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_task()
    tokenizer = data.tokenizer
    model = load_base()
    cb = MatryoshkaLoRA(r_max=r_max, mode=mode, rank_scale=rule, verbose=False, save_adapter=False, rank_eval=None,
                        init="shared", rank_weights="uniform" if mode == "rowwise" else None)  # its study's settings
    cb.apply(model)
    ranks = list(cb.config.eval_ranks)
    val = data.splits["val"][:N_TOKEN_ACCURACY]

    print("base", evaluate(model, ranks, val, tokenizer), flush=True)
    train(model, data.splits["train"], tokenizer.pad_token_id, lr, steps)
    scores = evaluate(model, ranks, val, tokenizer)
    accuracy_aurac = round(aurac(list(scores), [acc for acc, _ in scores.values()]), 1)
    em_aurac = round(aurac(list(scores), [em for _, em in scores.values()]), 1)
    print(mode, rule, lr, steps, scores, "AURAC acc", accuracy_aurac, "em", em_aurac, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
