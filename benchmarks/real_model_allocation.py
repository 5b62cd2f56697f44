"""A rank per layer on a real pretrained instruct model: ``allocate_ranks`` against uniform truncation, SmolLM2-135M.

    python benchmarks/real_model_allocation.py run --seed 0 --time-threads 2   # and --seed 1, --seed 2
    python benchmarks/real_model_allocation.py summary                          # the markdown table

``run`` trains the library's default nested adapter (``half_max_init`` of ``benchmarks/real_model_study.py``: one
pass, ``half_max`` rows, ``init="per_rank"``, r_max 16, lr 1e-3, 20 steps of batch 8, the study's data, chat
template and training loop, imported from it), then

- measures the truncation sensitivities once (:func:`lightning_matlora.rank_allocation.measure_sensitivities`:
  layers grouped by module type, the answer-token loss on the first ``--calibration-rows`` training rows), and for
  each budget equal to the size of uniform rank 1, 2, 4 and 8 plans an allocation from them
  (``plan_allocation(..., sensitivities=...)``); the wall time of each part is recorded, so that the time of one
  plain ``allocate_ranks`` call for a budget is the sum of the two;
- with ``--time-threads 2``, also times one plain ``allocate_ranks(model, "rank:4", ...)`` call at that many
  threads (a ``timing`` line);
- scores the uniform truncation, the greedy plan and the answer (after the final check) at every budget, and
  r_max: greedy exact match and answer-token accuracy on the 200 validation examples, scored as two halves of 100
  (the first half is the study's evaluation set, where the plain LoRA grid of ``docs/real_model_runs.jsonl`` was
  scored).

One JSON line per (seed, budget) in ``--out``. ``summary`` prints the table of docs/results.md section 7.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from collections.abc import Iterator

import torch

from real_model_study import answer_loss, build, collate, evaluate, load_base, splits, train_adapter

OUT = "docs/real_model_allocation_runs.jsonl"
GRID = "docs/real_model_runs.jsonl"
BUDGETS = [1, 2, 4, 8]
METHOD = "half_max_init"


def score(model, tok, val: list, setting, n: int = 200) -> dict:
    """Exact match and token accuracy at ``setting`` (a rank or a plan) on the first ``n`` validation examples, as
    two halves (``first100``, ``last100`` at the default n); ``exact_match`` is over all ``n``."""
    from lightning_matlora import at_rank

    h = n // 2
    with at_rank(model, setting):
        halves = [evaluate(model, tok, val[i:i + h], h) for i in (0, h)]
    model.eval()  # evaluate() leaves the model in training mode
    return {"exact_match": round(statistics.mean(x["exact_match"] for x in halves), 2),
            "first100": halves[0], "last100": halves[1]}


def run(a: argparse.Namespace) -> Iterator[dict]:
    from lightning_matlora import adapted_layers, allocate_ranks
    from lightning_matlora.layer_ranks import layer_parameters
    from lightning_matlora.rank_allocation import measure_sensitivities, plan_allocation

    model, tok = load_base(a.threads, a.base)
    train, val = splits(tok)
    cb = build(METHOD, a.r_max, a.seed)
    torch.manual_seed(a.seed)
    cb.apply(model)
    model.train()
    r_top = cb.config.r_max
    targs = argparse.Namespace(lr=a.lr, steps=a.steps, batch=a.batch, seed=a.seed, curve_at="", curve_n=0)
    train_s, _, _ = train_adapter(targs, model, tok, train, val, METHOD, r_top)
    model.eval()
    calib = [collate(train[i:min(i + a.calibration_batch, a.calibration_rows)], tok.pad_token_id)
             for i in range(0, a.calibration_rows, a.calibration_batch)]
    dims = {n: (m.in_features, m.out_features) for n, m in adapted_layers(model).items()}

    def size(ranks: dict[str, int]) -> int:
        return layer_parameters(dims, ranks)

    command = "python benchmarks/real_model_allocation.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for t in [int(x) for x in a.time_threads.split(",") if x]:  # one plain call, before anything else is measured
        torch.set_num_threads(t)
        t0, c0 = time.perf_counter(), time.process_time()
        allocate_ranks(model, "rank:4", calib, answer_loss)
        rec = {"kind": "timing", "seed": a.seed, "threads": t, "budget_rank": 4,
               "allocate_seconds": round(time.perf_counter() - t0, 1),
               "allocate_cpu_seconds": round(time.process_time() - c0, 1), "layers": len(dims),
               "calibration_rows": a.calibration_rows, "command": command, "time": stamp}
        print(json.dumps(rec), flush=True)
        yield rec
    torch.set_num_threads(a.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    sens = measure_sensitivities(model, calib, answer_loss)
    sens_s, sens_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"sensitivities: {sens.evaluations} evaluations in {sens_s:.1f} s", flush=True)
    full = score(model, tok, val, r_top, a.n_val)
    for k in [int(x) for x in a.budgets.split(",")]:
        t0, c0 = time.perf_counter(), time.process_time()
        found = plan_allocation(model, f"rank:{k}", calib, answer_loss, sensitivities=sens)
        plan_s, plan_cpu = time.perf_counter() - t0, time.process_time() - c0
        uniform = {n: k for n in dims}
        at_uniform = score(model, tok, val, k, a.n_val)
        at_greedy = at_uniform if found.greedy == uniform else score(model, tok, val, found.greedy, a.n_val)
        at_plan = at_greedy if found.ranks == found.greedy else at_uniform
        summary = found.record()
        rec = {"kind": "budget", "method": METHOD, "lr": a.lr, "steps": a.steps, "batch": a.batch, "seed": a.seed,
               "r_max": r_top, "budget_rank": k, "budget": size(uniform), "plan_parameters": size(found.ranks),
               "greedy_parameters": size(found.greedy),
               "chose": "greedy" if found.ranks == found.greedy and found.greedy != uniform else "uniform",
               "greedy_by_type": summary["greedy_by_group"], "calibration_loss": summary["metric"],
               "sensitivity": summary["sensitivity"],
               "uniform": at_uniform, "greedy": at_greedy, "allocated": at_plan, "r_max_score": full,
               "sensitivity_evaluations": sens.evaluations, "sensitivity_seconds": round(sens_s, 1),
               "plan_evaluations": found.evaluations, "plan_seconds": round(plan_s, 1),
               "sensitivity_cpu_seconds": round(sens_cpu, 1), "plan_cpu_seconds": round(plan_cpu, 1),
               "allocate_seconds": round(sens_s + plan_s, 1), "threads": a.threads, "layers": len(dims),
               "calibration_rows": a.calibration_rows, "train_seconds": round(train_s, 1), "command": command,
               "time": stamp}
        print(json.dumps({x: rec[x] for x in ("budget_rank", "chose", "greedy_by_type", "plan_seconds")}) +
              f" EM uniform {at_uniform['exact_match']} allocated {at_plan['exact_match']}", flush=True)
        yield rec


def load(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()] \
        if Path(path).exists() else []


def ms(xs: list[float], digits: int = 1) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    return (f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1
            else f"{xs[0]:.{digits}f}")


def summary(out: str, grid: str = GRID) -> str:
    """Per budget, mean ± sd over the seeds: exact match on the 200 validation examples of the uniform truncation,
    the greedy plan and the answer, the same on the first 100 beside plain LoRA trained at that rank (lr 1e-3, 20
    steps, the seeds it has, scored on those 100), the calibration losses, how often the greedy plan won; then the
    allocation's wall time."""
    recs = [r for r in load(out) if r.get("kind") == "budget"]
    loras: dict[int, list[float]] = {}
    for d in load(grid):
        if d["method"].startswith("lora:") and d["lr"] == 1e-3 and d["steps"] == 20:
            k = int(d["method"].split(":")[1])
            loras.setdefault(k, []).append(d["curve"][str(k)]["exact_match"])
    lines = ["| budget (= uniform rank) | parameters | seeds | EM uniform | EM greedy plan | EM allocated | "
             "EM uniform, first 100 | EM allocated, first 100 | plain LoRA at that rank, first 100 (seeds) | "
             "calib. loss uniform | greedy predicted | greedy measured | greedy chosen |",
             "| --- " * 13 + "|"]
    for k in BUDGETS:
        rs = [r for r in recs if r["budget_rank"] == k]
        if not rs:
            continue
        loss = [r["calibration_loss"] for r in rs]
        lora = f"{ms(loras[k])} ({len(loras[k])})" if k in loras else "—"
        lines.append(
            f"| rank {k} | {rs[0]['budget']:,} | {len(rs)} | {ms([r['uniform']['exact_match'] for r in rs])} | "
            f"{ms([r['greedy']['exact_match'] for r in rs])} | {ms([r['allocated']['exact_match'] for r in rs])} | "
            f"{ms([r['uniform']['first100']['exact_match'] for r in rs])} | "
            f"{ms([r['allocated']['first100']['exact_match'] for r in rs])} | {lora} | "
            f"{ms([x['uniform'] for x in loss], 3)} | {ms([x['predicted_greedy'] for x in loss], 3)} | "
            f"{ms([x['greedy'] for x in loss], 3)} | {sum(r['chose'] == 'greedy' for r in rs)}/{len(rs)} |")
    full = {r["seed"]: r["r_max_score"]["exact_match"] for r in recs}
    if full:
        lines.append(f"\nr_max = 16 (the full adapter): EM {ms(list(full.values()))} over {len(full)} seed(s).")
    sens = {r["seed"]: r for r in recs}
    if sens:
        r0 = next(iter(sens.values()))
        cpu = [r["sensitivity_cpu_seconds"] for r in sens.values() if "sensitivity_cpu_seconds" in r]
        lines.append(
            f"\nMeasuring the sensitivities ({r0['sensitivity_evaluations']} evaluations of "
            f"{r0['calibration_rows']} rows, {r0['layers']} layers, {r0['threads']} thread), wall time per seed: "
            f"{', '.join(str(r['sensitivity_seconds']) for _, r in sorted(sens.items()))} s"
            + (f" (CPU time: {', '.join(map(str, cpu))} s)" if cpu else "")
            + f"; planning one budget from them (1–2 evaluations): {ms([r['plan_seconds'] for r in recs])} s; one "
            f"plain `allocate_ranks` call (both): {ms([r['allocate_seconds'] for r in recs])} s.")
    for t in (r for r in load(out) if r.get("kind") == "timing"):
        lines.append(f"One plain `allocate_ranks(model, \"rank:{t['budget_rank']}\", ...)` call at {t['threads']} "
                     f"thread(s), seed {t['seed']}: {t['allocate_seconds']} s wall"
                     + (f", {t['allocate_cpu_seconds']} s CPU" if "allocate_cpu_seconds" in t else "") + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--r-max", type=int, default=16)
    p.add_argument("--calibration-rows", type=int, default=64, help="training rows the allocation measures on")
    p.add_argument("--calibration-batch", type=int, default=16)
    p.add_argument("--budgets", default="1,2,4,8", help="budgets as uniform ranks (the size of rank k everywhere)")
    p.add_argument("--n-val", type=int, default=200, help="validation examples scored (two halves)")
    p.add_argument("--time-threads", default="", help="also time one plain allocate_ranks call at each of these "
                   "thread counts, e.g. 1,2")
    p.add_argument("--base", default="smollm2", help="another GGUF file or model directory (tests use a tiny one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=OUT)
    p = sub.add_parser("summary")
    p.add_argument("--out", default=OUT)
    p.add_argument("--grid", default=GRID, help="the study's runs, for the plain LoRA grid")
    a = ap.parse_args(argv)
    if a.command == "summary":
        print(summary(a.out, a.grid))
        return
    for rec in run(a):  # each line as soon as it is measured
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
