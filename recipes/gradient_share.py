"""Why the paired passes' low ranks trail the grid: per-rank losses and the two passes' gradients, per component.

    python recipes/gradient_share.py [--seed 0] [--lr 1e-2] [--epochs 6] [--every 68] [--out docs/gradient_share.md]

Trains the recipe's setting (bundled base and Encode data, batch 32, r_max 16, train ranks 1, 2, 4, 8, 16, AdamW
with 5 % warm-up then linear decay) with ``MatryoshkaLoRA(max_pass=True)`` and ``paired_loss``, as
``encode_study.py paired:0`` does. Every ``--every`` steps, before the step, it measures on that step's batch:

- the gradient of each pass alone (L_max: every row at r_max; L_low: rows dealt over ranks 1, 2, 4, 8), split by
  component: component i is row i of every layer's A and column i of its B, all layers together;
- the share of each pass's gradient norm² that falls on components 1–8 (which every rank uses) and 9–16 (r_max
  only), and the cosine between the two passes' gradients on components 1–8 (negative: the passes pull the shared
  components apart);
- the validation loss at each rank k (teacher forcing, first 128 validation examples).

Writes a Markdown table (the figures behind docs/results.md's "Why the gap remains").
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from encode_loop import BATCH, WARMUP_RATIO, load_base, load_task, warmup_linear_decay
from instruct_encoding import collate
from lightning_matlora import MatryoshkaLoRA, adapted_layers, at_rank, begin_step, paired_loss
from lightning_matlora.adapted_model import controller_of

DOCS = Path(__file__).resolve().parents[1] / "docs"
RANKS = [1, 2, 4, 8, 16]
SHARED = 8  # components 1..8 serve every train rank; 9..16 only r_max


def component_grads(layers: dict) -> torch.Tensor:
    """The gradient as one vector per component (rows: components 1…r_max), all layers concatenated."""
    parts = [torch.cat([m.lora_A.grad, m.lora_B.grad.T], dim=1) for m in layers.values()]
    return torch.cat(parts, dim=1).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--epochs", type=float, default=6)
    ap.add_argument("--every", type=int, default=68)
    ap.add_argument("--out", default=str(DOCS / "gradient_share.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    dm = load_task()
    pad = dm.tokenizer.pad_token_id
    model = load_base()
    model.train()
    torch.manual_seed(args.seed)
    MatryoshkaLoRA(r_max=16, max_pass=True, verbose=False, save_adapter=False, rank_eval=None,
                   seed=args.seed, init="shared").apply(model)
    ctrl, layers = controller_of(model), adapted_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    train = dm.splits["train"]
    total = int(round(args.epochs * math.ceil(len(train) / BATCH)))
    sched = warmup_linear_decay(opt, total, max(1, int(WARMUP_RATIO * total)))
    probe = collate(dm.splits["val"][:128], pad)
    g = torch.Generator().manual_seed(args.seed)
    rows, step, t0 = [], 0, time.time()
    while step < total:
        for idx in torch.randperm(len(train), generator=g).split(BATCH):
            b = collate([train[j] for j in idx], pad)
            begin_step(model, step)
            if step % args.every == 0 or step == total - 1:
                grads = {}
                for name in ("max", "low"):
                    opt.zero_grad(set_to_none=True)
                    with ctrl.in_pass(name):
                        model(**b).loss.backward()
                    grads[name] = component_grads(layers)
                opt.zero_grad(set_to_none=True)
                share = {n: float(v[:SHARED].pow(2).sum() / v.pow(2).sum()) for n, v in grads.items()}
                hi, lo = grads["max"][:SHARED].flatten(), grads["low"][:SHARED].flatten()
                cos = float(hi @ lo / (hi.norm() * lo.norm()))
                model.eval()
                with torch.no_grad():
                    losses = {}
                    for k in RANKS:
                        with at_rank(model, k):
                            losses[k] = float(model(**probe).loss)
                model.train()
                rows.append((step, losses, share, cos))
                print(step, {k: round(v, 3) for k, v in losses.items()}, {n: round(v, 3) for n, v in share.items()},
                      round(cos, 3), flush=True)
            loss = paired_loss(model, lambda: model(**b).loss)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step >= total:
                break
    cmd = " ".join(["python recipes/gradient_share.py", *sys.argv[1:]])
    out = [f"Command: `{cmd}` ({time.time() - t0:.0f} s on one CPU thread). Paired passes (`max_pass=True`), "
           f"lr {args.lr:g}, seed {args.seed}, {total} steps.", "",
           "| step | val loss at r = " + ", ".join(str(k) for k in RANKS) + " | max pass: share of grad² on "
           "components 1–8 | low pass: share on 1–8 | cosine(max, low) on components 1–8 |",
           "|---|---|---|---|---|"]
    for step, losses, share, cos in rows:
        out.append(f"| {step} | " + " / ".join(f"{losses[k]:.3f}" for k in RANKS) +
                   f" | {share['max']:.3f} | {share['low']:.3f} | {cos:+.3f} |")
    Path(args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
