"""Quality against adapter size on the bundled Encode task: ``allocate_ranks`` against uniform truncation.

    python recipes/rank_allocation_study.py run --seed 0 [--out docs/rank_allocation_runs.jsonl]
    python recipes/rank_allocation_study.py summary [--out docs/rank_allocation_runs.jsonl]   # the markdown table

``run`` trains one nested adapter as ``recipes/encode_study.py rowwise --lr 1e-2`` does (r_max 16, the recipe's
setting, one CPU thread), then, for each budget equal to the size of uniform rank 1, 2, 4 and 8, scores the
adapter cut uniformly to that rank and the adapter cut to ``allocate_ranks(model, budget="rank:k", ...)`` (layers
grouped by module type, the loss on 64 training rows as the metric): greedy exact match on the first 200
validation examples and answer-token accuracy on all 400, as the study does. One JSON line per (seed, budget).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from encode_loop import exact_match, load_base, load_task, token_accuracy
from encode_study import parse_run, prepare_run, train
from instruct_encoding import collate
from lightning_matlora import adapted_layers, allocate_ranks, at_rank

BUDGETS = [1, 2, 4, 8]
CALIBRATION_ROWS = 64


def parameters(model: torch.nn.Module, ranks: dict[str, int]) -> int:
    return sum(ranks[n] * (m.in_features + m.out_features) for n, m in adapted_layers(model).items())


def score(model, setting, val, tokenizer, num_generate: int) -> dict[str, float]:
    batch = collate(val, tokenizer.pad_token_id)
    with torch.no_grad(), at_rank(model, setting):
        return {"exact_match": round(exact_match(model, val[:num_generate], tokenizer), 2),
                "token_acc": round(token_accuracy(model, batch), 2)}


def run(seed: int, out: str, num_generate: int, epochs: float = 6) -> None:
    args = parse_run(["rowwise", "--lr", "1e-2", "--seed", str(seed), "--epochs", str(epochs), "--out", ""])
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    data = load_task()
    tok = data.tokenizer
    model = load_base()
    model.train()
    train_set, val = data.splits["train"], data.splits["val"]
    study = prepare_run(args, model, len(train_set))
    train_s = train(study, args, model, train_set, tok.pad_token_id)
    model.eval()
    calib = [collate(list(train_set[i:i + 32]), tok.pad_token_id) for i in range(0, CALIBRATION_ROWS, 32)]
    names = list(adapted_layers(model))
    for k in BUDGETS:
        t0 = time.time()
        plan = allocate_ranks(model, f"rank:{k}", calib)
        alloc_s = time.time() - t0
        uniform = {n: k for n in names}
        by_type: dict[str, list[int]] = {}
        for n, r in plan.items():
            by_type.setdefault(n.rsplit(".", 1)[-1], []).append(r)
        rec = {"seed": seed, "budget_rank": k, "budget": parameters(model, uniform),
               "plan_parameters": parameters(model, plan),
               "plan_by_type": {t: sorted(set(rs)) for t, rs in sorted(by_type.items())},
               "uniform": score(model, k, val, tok, num_generate),
               "allocated": score(model, plan, val, tok, num_generate),
               "allocate_seconds": round(alloc_s, 1), "train_seconds": round(train_s, 1),
               "command": "python recipes/rank_allocation_study.py " + " ".join(sys.argv[1:])}
        line = json.dumps(rec)
        print(line, flush=True)
        if out:
            with open(out, "a") as f:
                f.write(line + "\n")


def summary(out: str) -> str:
    recs = [json.loads(line) for line in open(out) if line.strip()]
    lines = ["| budget (= uniform rank) | parameters | seeds | uniform EM | allocated EM | uniform tok. acc | "
             "allocated tok. acc | allocated − uniform EM |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ms(xs):
        return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"
    for k in BUDGETS:
        rs = [r for r in recs if r["budget_rank"] == k]
        if not rs:
            continue
        diff = [r["allocated"]["exact_match"] - r["uniform"]["exact_match"] for r in rs]
        lines.append(f"| rank {k} | {rs[0]['budget']:,} | {len(rs)} | {ms([r['uniform']['exact_match'] for r in rs])} | "
                     f"{ms([r['allocated']['exact_match'] for r in rs])} | "
                     f"{ms([r['uniform']['token_acc'] for r in rs])} | {ms([r['allocated']['token_acc'] for r in rs])} | "
                     f"{ms(diff)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["run", "summary"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/rank_allocation_runs.jsonl")
    ap.add_argument("--num-generate", type=int, default=200)
    ap.add_argument("--epochs", type=float, default=6)
    a = ap.parse_args()
    if a.command == "summary":
        print(summary(a.out))
    else:
        run(a.seed, a.out, a.num_generate, a.epochs)


if __name__ == "__main__":
    main()
