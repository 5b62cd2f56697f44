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
from lightning_matlora import adapted_layers, at_rank
from lightning_matlora.rank_allocation import plan_allocation

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
        found = plan_allocation(model, f"rank:{k}", calib)
        alloc_s = time.time() - t0
        plan = found.ranks
        uniform = {n: k for n in names}
        uniform_score = score(model, k, val, tok, num_generate)
        rec = {"seed": seed, "budget_rank": k, "budget": parameters(model, uniform),
               "plan_parameters": parameters(model, plan),
               "greedy_by_type": {g: found.greedy[ns[0]] for g, ns in sorted(found.groups.items())},
               "greedy_parameters": parameters(model, found.greedy),
               "calibration_loss": {"full": round(found.metric_full, 4), "uniform": round(found.metric_uniform, 4),
                                    "greedy": None if found.metric_greedy is None else round(found.metric_greedy, 4),
                                    "predicted_greedy": round(found.metric_full + sum(
                                        found.sensitivity[g][found.greedy[ns[0]]] for g, ns in found.groups.items()),
                                        4)},
               "sensitivity": {g: {str(c): round(v, 4) for c, v in sorted(d.items())}
                               for g, d in sorted(found.sensitivity.items())},
               "chose": "greedy" if plan == found.greedy and found.greedy != uniform else "uniform",
               "uniform": uniform_score,
               "allocated": uniform_score if plan == uniform else score(model, plan, val, tok, num_generate),
               "greedy": uniform_score if found.greedy == uniform else score(model, found.greedy, val, tok,
                                                                              num_generate),
               "allocate_seconds": round(alloc_s, 1), "train_seconds": round(train_s, 1),
               "command": "python recipes/rank_allocation_study.py " + " ".join(sys.argv[1:])}
        line = json.dumps(rec)
        print(line, flush=True)
        if out:
            with open(out, "a") as f:
                f.write(line + "\n")


def summary(out: str) -> str:
    """Per budget, mean ± sd over the seeds: exact match (EM) of the uniform rank, the greedy plan and the answer
    (after the final check); the calibration loss of the uniform rank, the greedy plan as predicted (additive
    sensitivities) and as measured; how often the greedy plan was chosen."""
    recs = [json.loads(line) for line in open(out) if line.strip()]
    lines = ["| budget (= uniform rank) | parameters | seeds | EM uniform | EM greedy plan | EM allocated | "
             "calib. loss uniform | greedy predicted | greedy measured | greedy chosen |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ms(xs, digits=1):
        xs = [x for x in xs if x is not None]
        if not xs:
            return "—"
        return (f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1
                else f"{xs[0]:.{digits}f}")
    for k in BUDGETS:
        rs = [r for r in recs if r["budget_rank"] == k]
        if not rs:
            continue
        loss = [r["calibration_loss"] for r in rs]
        lines.append(f"| rank {k} | {rs[0]['budget']:,} | {len(rs)} | {ms([r['uniform']['exact_match'] for r in rs])} | "
                     f"{ms([r['greedy']['exact_match'] for r in rs])} | {ms([r['allocated']['exact_match'] for r in rs])} | "
                     f"{ms([x['uniform'] for x in loss], 3)} | {ms([x['predicted_greedy'] for x in loss], 3)} | "
                     f"{ms([x['greedy'] for x in loss], 3)} | {sum(r['chose'] == 'greedy' for r in rs)}/{len(rs)} |")
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
