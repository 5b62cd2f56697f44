"""Quality against adapter size on the bundled Encode task: ``allocate_ranks`` against uniform truncation.

    python recipes/rank_allocation_study.py run --seed 0 [--out docs/rank_allocation_runs.jsonl]
    python recipes/rank_allocation_study.py summary [--out docs/rank_allocation_runs.jsonl]   # the markdown table
    python recipes/rank_allocation_study.py run --seed 0 --layer-draws type --zero-rank --tag drawfix


``run`` trains one nested adapter as ``recipes/encode_study.py rowwise --lr 1e-2`` does (r_max 16, the recipe's
setting, one CPU thread), then, for each budget equal to the size of uniform rank 1, 2, 4 and 8, scores the
adapter cut uniformly to that rank and the adapter cut to ``allocate_ranks(model, budget="rank:k", ...)`` (layers
grouped by module type, the loss on 64 training rows as the metric): greedy exact match on the first 200
validation examples and answer-token accuracy on all 400, as the study does. One JSON line per (seed, budget).

``--layer-draws type`` trains with ``MatryoshkaLoRA(layer_draws="type")`` (each module type draws its own row
ranks, so mixed per-type prefixes are trained); ``--zero-rank`` lets ``allocate_ranks`` drop a module type's
adapter (rank 0 among the candidates). ``--tag`` names the variant in the JSON lines and the summary.
``--save-adapter DIR`` keeps the trained adapter (``DIR/seed<N>``); ``--adapter DIR`` skips training and scores
the adapter saved there by the same command line (the training time is read back from its metadata).
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
from lightning_matlora import adapted_layers, at_rank, load_adapter, read_adapter, save_adapter
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


def run(seed: int, out: str, num_generate: int, epochs: float = 6, layer_draws: str = "none",
        zero_rank: bool = False, tag: str = "", save_dir: str = "", adapter_dir: str = "",
        train_only: bool = False) -> None:
    args = parse_run(["rowwise", "--lr", "1e-2", "--seed", str(seed), "--epochs", str(epochs), "--out", "",
                      "--layer-draws", layer_draws])
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    data = load_task()
    tok = data.tokenizer
    model = load_base()
    train_set, val = data.splits["train"], data.splits["val"]
    if adapter_dir:
        path = f"{adapter_dir}/seed{seed}"
        saved = read_adapter(path)
        if saved.config.layer_draws != layer_draws:
            raise SystemExit(f"{path} was trained with layer_draws={saved.config.layer_draws!r}, not {layer_draws!r}")
        load_adapter(model, saved)
        train_s = float(saved.metadata["train_seconds"])
    else:
        model.train()
        study = prepare_run(args, model, len(train_set))
        train_s = train(study, args, model, train_set, tok.pad_token_id)
        if save_dir:
            save_adapter(model, f"{save_dir}/seed{seed}", metadata={"train_seconds": round(train_s, 1)})
    if train_only:
        return
    model.eval()
    candidates = None
    if zero_rank:  # rank 0 (the module type's adapter dropped) beside the train ranks
        from lightning_matlora.adapted_model import controller_of

        candidates = [0, *controller_of(model).config.ranks]
    calib = [collate(list(train_set[i:i + 32]), tok.pad_token_id) for i in range(0, CALIBRATION_ROWS, 32)]
    names = list(adapted_layers(model))
    for k in BUDGETS:
        t0 = time.time()
        found = plan_allocation(model, f"rank:{k}", calib, candidates=candidates)
        alloc_s = time.time() - t0
        plan = found.ranks
        uniform = {n: k for n in names}
        uniform_score = score(model, k, val, tok, num_generate)
        rec = {"tag": tag, "layer_draws": layer_draws, "zero_rank": zero_rank, "seed": seed, "budget_rank": k, "budget": parameters(model, uniform),
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
    """The table of :func:`summary_table` for each tag (untagged: the first study), one after the other."""
    recs = [json.loads(line) for line in open(out) if line.strip()]
    tags = list(dict.fromkeys(r.get("tag", "") for r in recs))
    parts = []
    for tag in tags:
        rs = [r for r in recs if r.get("tag", "") == tag]
        head = f"tag {tag!r}: layer_draws={rs[0].get('layer_draws', 'none')}, rank 0 a candidate: " \
               f"{rs[0].get('zero_rank', False)}"
        parts.append(head + "\n\n" + summary_table(rs))
    return "\n\n".join(parts)


def summary_table(recs: list[dict]) -> str:
    """Per budget, mean ± sd over the seeds: exact match (EM) of the uniform rank, the greedy plan and the answer
    (after the final check); the calibration loss of the uniform rank, the greedy plan as predicted (additive
    sensitivities) and as measured; how often the greedy plan was chosen."""
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
    ap.add_argument("--layer-draws", default="none", choices=["none", "type"],
                    help="train with MatryoshkaLoRA(layer_draws=...): 'type' gives each module type its own row ranks")
    ap.add_argument("--zero-rank", action="store_true", help="rank 0 (a module type's adapter dropped) is a "
                    "candidate of allocate_ranks")
    ap.add_argument("--tag", default="", help="names this variant in the JSON lines and the summary")
    ap.add_argument("--save-adapter", default="", help="keep the trained adapter in DIR/seed<N>")
    ap.add_argument("--adapter", default="", help="skip training: score the adapter in DIR/seed<N>")
    ap.add_argument("--train-only", action="store_true", help="train (and --save-adapter), score nothing")
    a = ap.parse_args()
    if a.command == "summary":
        print(summary(a.out))
    else:
        run(a.seed, a.out, a.num_generate, a.epochs, a.layer_draws, a.zero_rank, a.tag, a.save_adapter, a.adapter,
            a.train_only)


if __name__ == "__main__":
    main()
