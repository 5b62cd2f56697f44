"""Does one nested run replace the rank grid?  The accuracy study behind the project's recommended defaults.

A small Llama is pretrained (seeded, cached) on a synthetic cipher and frozen; adapters on all seven projections
are then trained on new tasks with every method of this library, and every trained adapter is evaluated at every
rank (token accuracy and loss on a held-out set):

regimes
    ``small``: a *small update*: the base's cipher with ``--override`` of its entries changed (the base
        already solves most of the task; fine-tuning adjusts it).
    ``large``: a *large update*: a fresh random cipher the base does not know.
    ``chain``: a task designed to be *capacity-bound at every rank*: a chained cipher y_i = table[y_{i-1}, x_i]
        (each answer depends on the previous answer and the current symbol, so the table is
        (symbols + 1) × symbols), its own base pretrained on one such table, and the task that table with
        ``override`` of its entries changed, more than r_max can store in the run's steps.  At ``--size small``
        (64 symbols: 4160 entries, 2048 changed, base 50% on the task; same model, batch, sequence length and
        steps as the other regimes, so a run costs about what a ``small`` run costs) plain LoRA trained at each
        rank alone reaches 45.0 / 52.0 / 60.3 / 78.1% at r = 1 / 2 / 4 / 8 (3 seeds, each rank at its best LR
        of the size's sweep), i.e. it rises at every doubling and is far from saturated at r_max, where ``small``
        saturates from r = 2 and ``large`` is bimodal over seeds.  Rank 1 cannot store any of the changes: it
        stays at or below the base's 50%, for every method.  The ``medium``/``large`` sizes' chain settings are
        scaled guesses, not measured.

The adapter's table grows with the number of changed entries, so a LoRA trained at each rank separately rises
from rank 1 to r_max where the task needs more than rank 1 can store.

methods (all through this library's layers, modes, ``set_rank``, ``begin_step`` and ``paired_loss``)
    ``matryoshka``            mode="matryoshka", paper's P, paper's inference rule (rank_scale="rank")
    ``matryoshka-trained``    the same runs, evaluated with rank_scale="trained" (the prefix of P)
    ``matryoshka-P/|S|``      mode="matryoshka" with p = P/|S| (the reference code's averaged form), rule "rank"
    ``rowwise``               mode="rowwise", rank_weights="uniform" (each row trains one rank as served)
    ``rowwise-half``          mode="rowwise", rank_weights="half_max" (half of the rows at r_max)
    ``paired``                mode="rowwise", max_pass=True: each step is ``paired_loss`` (the whole batch at r_max,
                              then its rows dealt over the lower ranks; two forward-backward passes per step)
    ``dylora``                mode="dylora" (one rank per step), rule "rank"
    ``lora-truncated``        mode="lora" at r_max, truncated to each rank keeping its trained scale s(r_max)
    ``grid``                  mode="lora" trained separately at each rank (K runs); its r_max member is also
                              reported on its own as ``plain LoRA at r_max`` (the same runs as ``lora-truncated``)

Every method gets a learning-rate sweep at equal steps; the rate with the best mean validation AURAC (log2 axis,
accuracy) over seeds is reported on the test set (each grid member, and so plain LoRA at r_max, by its validation
accuracy at its own rank).  Compute is counted in forward-backward passes (steps × passes per step): the one-run
methods are run again with the grid's K × steps passes ("equal compute"; ``paired`` gets half as many steps),
each with its own LR sweep at that budget (``--compute-lr sweep``, the default).
``--curve-steps`` trains seed 0 of every method (and the grid's r = 1 and r_max members) at its chosen rate for
each given step budget and plots accuracy at r = 1 and r_max against passes.  Results: a runs JSONL (reused on
restart), a Markdown report and PNG plots.

Usage (CPU, one process; about an hour on one core with the steps plot)::

    python benchmarks/accuracy.py --size small --curve-steps 50 100 200 400 800

Bigger (GPU, bf16)::

    python benchmarks/accuracy.py --size large --device cuda --dtype bfloat16 --workers 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
# before lightning_matlora (which loads transformers): importing harness switches the hub off
from accuracy_tasks import base_task, build_base, evaluate, regime_size, regime_task, task_loss
from harness import TARGETS, read_jsonl, write_text

from lightning_matlora import MatryoshkaLoRA, aurac, begin_step, build_p, default_ranks, set_rank, set_rank_scale

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("matryoshka", "matryoshka-trained", "matryoshka-P/|S|", "rowwise", "rowwise-half", "paired", "dylora",
           "lora-truncated", "grid")
ONE_RUN = ("matryoshka", "matryoshka-P/|S|", "rowwise", "rowwise-half", "paired", "dylora",
           "lora-truncated")  # one-run methods (``matryoshka-trained`` is a rule on the ``matryoshka`` runs)
PASSES = {"paired": 2}  # forward-backward passes per optimizer step (1 unless listed)
REGIMES = ("small", "large", "chain")
PLAIN = "plain LoRA at r_max"  # the grid's r_max member, reported on its own (lr chosen by its own accuracy)

SIZES = {
    # task (cipher kind, symbols, pairs per sequence, overridden entries), model, adapter, budgets
    "tiny": dict(chain=False, symbols=32, pairs=4, hidden=32, layers=1, heads=2, inter=64, r_max=4, steps=10, batch=8,
                 pretrain_steps=50, override=8, lrs=[1e-2], seeds=2, eval_rows=64,  # smoke test only
                 chain_task=dict(chain=True, symbols=16, override=64)),
    "small": dict(chain=False, symbols=512, pairs=8, hidden=64, layers=2, heads=4, inter=256, r_max=8, steps=200, batch=32,
                  pretrain_steps=3000, override=128, lrs=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1], seeds=3, eval_rows=512,
                  chain_task=dict(chain=True, symbols=64, override=2048)),
    "medium": dict(chain=False, symbols=4096, pairs=16, hidden=256, layers=4, heads=8, inter=1024, r_max=32,
                   steps=1000, batch=32, pretrain_steps=8000, override=1024, lrs=[1e-3, 3e-3, 1e-2], seeds=3, eval_rows=1024,
                   chain_task=dict(chain=True, symbols=256, override=32768)),
    "large": dict(chain=False, symbols=16384, pairs=32, hidden=1024, layers=8, heads=16, inter=2816, r_max=64,
                  steps=2000, batch=32, pretrain_steps=20000, override=4096, lrs=[3e-4, 1e-3, 3e-3], seeds=3, eval_rows=2048,
                  chain_task=dict(chain=True, symbols=512, override=131072)),
}


# ------------------------------------------------------------------------------------------------------ runs
@dataclasses.dataclass
class Job:
    regime: str
    method: str  # a training method in ONE_RUN, or "grid@k"
    lr: float
    seed: int
    steps: int
    budget: str  # "steps" (equal steps) or "compute" (the grid's K× steps)


def passes_of(method: str) -> int:
    """Forward-backward passes per optimizer step of a training run (``paired``: one at r_max, one rowwise)."""
    return PASSES.get(method, 1)


def train_name(method: str, r_max: int) -> str:
    """The training run a reported method reads: ``lora-truncated`` is the grid's r_max member evaluated at every
    rank, ``matryoshka-trained`` the ``matryoshka`` runs under the other rule, ``grid`` its members."""
    return {"matryoshka-trained": "matryoshka", "lora-truncated": f"grid@{r_max}", PLAIN: f"grid@{r_max}"}.get(
        method, method)


def adapter_kwargs(method: str, r_max: int, scaling: str) -> tuple[int, dict]:
    ranks = default_ranks(r_max)
    if method.startswith("grid@"):
        k = int(method.split("@")[1])
        return k, dict(mode="lora", rank_scale="trained")
    if method == "matryoshka":
        return r_max, dict(mode="matryoshka", rank_scale="rank")
    if method == "matryoshka-P/|S|":
        p = (build_p(ranks, r_max, scaling) / len(ranks)).tolist()
        return r_max, dict(mode="matryoshka", rank_scale="rank", p=p)
    if method == "rowwise":  # every train rank on the same share of the rows
        return r_max, dict(mode="rowwise", rank_scale="rank", rank_weights="uniform")
    if method == "rowwise-half":  # half of the rows at r_max (the library's default rank_weights)
        return r_max, dict(mode="rowwise", rank_scale="rank", rank_weights="half_max")
    if method == "paired":  # every step: the whole batch at r_max, then its rows dealt over the ranks below
        return r_max, dict(mode="rowwise", rank_scale="rank", max_pass=True)
    if method == "dylora":
        return r_max, dict(mode="dylora", rank_scale="rank")
    if method == "lora-truncated":
        return r_max, dict(mode="lora", rank_scale="trained")
    raise ValueError(method)


def run_job(job: Job, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    size = regime_size(SIZES[args.size] | {k: v for k, v in (("r_max", args.r_max),) if v}, job.regime)
    device, dtype = args.device, getattr(torch, args.dtype)
    task = regime_task(job.regime, size, args.base_seed)
    if job.method == "paired":
        try:
            from lightning_matlora import paired_loss
        except ImportError as e:
            raise SystemExit("method 'paired' needs lightning_matlora.paired_loss (MatryoshkaLoRA max_pass=True); "
                             "this checkout's library lacks it: update the library or drop 'paired' from "
                             "--methods") from e
    base = build_base(size, device, dtype, Path(args.cache), args.base_seed)
    r, kw = adapter_kwargs(job.method, size["r_max"], args.scaling)
    torch.manual_seed(1000 * job.seed + 7)
    cb = MatryoshkaLoRA(r_max=r, target_modules=TARGETS, scaling=args.scaling, seed=job.seed,
                        adapter_dtype="float32", verbose=False, init="shared", **kw)  # the study's initialisation
    cb.apply(base)
    params = [p for p in base.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0)
    warm = max(1, job.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, 1 - s / job.steps))
    g = torch.Generator().manual_seed(40_000 + 97 * job.seed)
    base.train()
    set_rank(base, None)
    t0 = time.time()
    diverged = False
    for step in range(job.steps):
        begin_step(base, step)
        inputs, targets = task.sample(size["batch"], g)
        inputs, targets = inputs.to(device), targets.to(device)
        if job.method == "paired":
            loss = paired_loss(base, lambda: task_loss(base, inputs, targets))
        else:
            loss = task_loss(base, inputs, targets)
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.time() - t0
    rules = ["rank", "trained"] if job.method == "matryoshka" else [kw["rank_scale"]]
    # the grid's r_max member is also plain LoRA at r_max served truncated (lora-truncated): every rank
    eval_ranks = [r] if job.method.startswith("grid@") and r != size["r_max"] else default_ranks(size["r_max"])
    out = {"regime": job.regime, "method": job.method, "lr": job.lr, "seed": job.seed, "steps": job.steps,
           "passes": passes_of(job.method), "budget": job.budget, "train_s": train_s, "diverged": diverged,
           "curves": {}}
    for rule in rules:
        set_rank_scale(base, rule)  # same trained weights, other inference rule
        curve = {}
        for k in eval_ranks:
            set_rank(base, k)
            if diverged:
                curve[k] = {"val_acc": 0.0, "test_acc": 0.0, "val_loss": float("inf"), "test_loss": float("inf")}
                continue
            va, vl = evaluate(base, task, size["eval_rows"], device, seed=1_000_001)
            ta, tl = evaluate(base, task, size["eval_rows"], device, seed=2_000_003)
            curve[k] = {"val_acc": va, "val_loss": vl, "test_acc": ta, "test_loss": tl}
        out["curves"][rule] = curve
    set_rank(base, None)
    return out


def _run_job_star(a):
    return run_job(*a)


# ------------------------------------------------------------------------------------------------------ study
def _names(method: str, r_max: int) -> list[str]:
    """The training runs behind a reported method."""
    return [f"grid@{k}" for k in default_ranks(r_max)] if method == "grid" else [train_name(method, r_max)]


def compute_steps(args: argparse.Namespace, name: str, K: int) -> int:
    """Steps of a one-run method at equal compute: the grid's K·steps forward-backward passes, over its passes/step."""
    return args.steps * K // passes_of(name)


def _computed(args: argparse.Namespace, method: str, r_max: int) -> bool:
    """Whether a reported method has equal-compute runs (its training run is one of --compute-methods')."""
    return method != "grid" and train_name(method, r_max) in {train_name(m, r_max) for m in args.compute_methods}


def sweep_jobs(args: argparse.Namespace, size: dict) -> list[Job]:
    """Phase 1: every training run of every method at every swept LR, on the first seed, at equal steps."""
    todo: dict[tuple, Job] = {}
    for regime in args.regimes:
        for lr in args.lrs:
            for m in args.methods:
                for name in _names(m, size["r_max"]):
                    todo[(regime, name, lr)] = Job(regime, name, lr, 0, args.steps, "steps")
    return list(todo.values())


def _lr_of(chosen: dict, regime: str, method: str, r_max: int):
    """A method's chosen LR; the grid's is a dict rank → LR (each member tuned on its own)."""
    if method == "grid":
        return {k: chosen[(regime, f"grid@{k}")] for k in default_ranks(r_max)}
    return chosen[(regime, method)]


def compute_sweep_jobs(args: argparse.Namespace, size: dict, K: int) -> list[Job]:
    """Phase 2a (``--compute-lr sweep``): the one-run methods' LR sweep at equal compute, on the first seed."""
    todo: dict[tuple, Job] = {}
    for regime in args.regimes:
        for m in _reported(args):
            if _computed(args, m, size["r_max"]):
                name = train_name(m, size["r_max"])
                for lr in args.lrs:
                    todo[(regime, name, lr)] = Job(regime, name, lr, 0, compute_steps(args, name, K), "compute")
    return list(todo.values())


def seed_jobs(args: argparse.Namespace, size: dict, chosen: dict, K: int, compute: bool,
              chosen_compute: dict | None = None) -> list[Job]:
    """Phase 2: the remaining seeds at each method's chosen LR (equal steps), and every seed of the one-run
    methods at the grid's K·steps forward-backward passes (equal compute; at ``chosen_compute``'s LR where given).
    Runs shared by two reported methods are run once."""
    todo: dict[tuple, Job] = {}
    r_max = size["r_max"]
    for regime in args.regimes:
        for m in _reported(args):
            lr = _lr_of(chosen, regime, m, r_max)
            for name in _names(m, r_max):
                lr_n = lr[int(name.split("@")[1])] if m == "grid" else lr
                for seed in range(1, args.seeds):
                    todo[(regime, name, lr_n, seed, args.steps)] = Job(regime, name, lr_n, seed, args.steps, "steps")
                if compute and _computed(args, m, r_max):
                    n = compute_steps(args, name, K)
                    lr_c = (chosen_compute or {}).get((regime, m), lr_n)
                    for seed in range(args.seeds):
                        todo[(regime, name, lr_c, seed, n)] = Job(regime, name, lr_c, seed, n, "compute")
    return list(todo.values())


def curve_jobs(args: argparse.Namespace, size: dict, chosen: dict) -> list[Job]:
    """Phase 3 (``--curve-steps``): seed 0 at each method's chosen LR trained for each step budget; the grid's
    members at r = 1 and r_max (the ranks the steps plot shows), each at its own LR."""
    todo: dict[tuple, Job] = {}
    r_max = size["r_max"]
    ranks = default_ranks(r_max)
    for regime in args.regimes:
        for m in _reported(args):
            if m == "grid":
                runs = [(f"grid@{k}", chosen[(regime, f"grid@{k}")]) for k in sorted({ranks[0], r_max})]
            else:
                runs = [(train_name(m, r_max), chosen[(regime, m)])]
            for name, lr in runs:
                for n in args.curve_steps:
                    todo[(regime, name, lr, n)] = Job(regime, name, lr, 0, n, "curve")
    return list(todo.values())


def _reported(args: argparse.Namespace) -> list[str]:
    """Reported methods: --methods in table order, plus plain LoRA at r_max wherever the grid is run."""
    return [m for m in METHODS if m in args.methods] + ([PLAIN] if "grid" in args.methods else [])


def _rule(method: str) -> str:
    return "trained" if method in ("matryoshka-trained", "lora-truncated", PLAIN) or method.startswith("grid@") \
        else "rank"


def method_curves(results: list[dict], regime: str, method: str, lr, steps: int, ranks: list[int], split: str,
                  r_max: int) -> list[tuple[dict, float]]:
    """Per seed (complete seeds only, in seed order): ({rank: (acc, loss)}, training seconds) of a reported method
    trained ``steps`` steps at ``lr`` (the grid: a dict rank → LR; its K runs make one curve, their seconds add)."""
    by_seed: dict[int, dict] = {}
    secs: dict[int, dict] = {}
    want = [r_max] if method == PLAIN else ranks
    for res in results:
        if res["regime"] != regime or res["steps"] != steps:
            continue
        if method == "grid":
            if not res["method"].startswith("grid@"):
                continue
            k = int(res["method"].split("@")[1])
            if k not in lr or res["lr"] != lr[k]:
                continue
            c = res["curves"]["trained"][k]
            by_seed.setdefault(res["seed"], {})[k] = (c[f"{split}_acc"], c[f"{split}_loss"])
            secs.setdefault(res["seed"], {})[k] = res["train_s"]
            continue
        if res["method"] != train_name(method, r_max) or res["lr"] != lr:
            continue
        curve = res["curves"][_rule(method)]
        by_seed[res["seed"]] = {k: (curve[k][f"{split}_acc"], curve[k][f"{split}_loss"]) for k in want}
        secs[res["seed"]] = {0: res["train_s"]}
    return [(v, sum(secs[s].values())) for s, v in sorted(by_seed.items()) if len(v) == len(want)]


def choose_compute_lrs(results, args, ranks, K) -> dict:
    """Per regime: each one-run method's LR at equal compute, by mean validation AURAC (log2, accuracy) of its
    sweep at that budget (plain LoRA at r_max: validation accuracy at r_max)."""
    chosen = {}
    r_max = ranks[-1]
    for regime in args.regimes:
        for m in _reported(args):
            if not _computed(args, m, r_max):
                continue
            top = None
            for lr in args.lrs:
                n = compute_steps(args, train_name(m, r_max), K)
                curves = method_curves(results, regime, m, lr, n, ranks, "val", r_max)
                if curves:
                    score = statistics.mean(c[r_max][0] if m == PLAIN else aurac(ranks, [c[k][0] for k in ranks])
                                            for c, _ in curves)
                    if top is None or score > top[0]:
                        top = (score, lr)
            if top is not None:
                chosen[(regime, m)] = top[1]
    return chosen


def choose_lrs(results, args, ranks) -> dict:
    """Per regime: each method's LR by mean validation AURAC (log2, accuracy); each grid member's (and so plain
    LoRA at r_max's) by validation accuracy at its own rank, as a user tuning that one LoRA would."""
    chosen = {}
    r_max = ranks[-1]

    def best(score_of, regime, method, lr_of=lambda lr: lr, want=ranks):
        top = None
        for lr in args.lrs:
            curves = method_curves(results, regime, method, lr_of(lr), args.steps, want, "val", r_max)
            if curves:
                score = statistics.mean(score_of(c) for c, _ in curves)
                if top is None or score > top[0]:
                    top = (score, lr)
        if top is None:
            raise RuntimeError(f"no finished runs of {method!r} in regime {regime!r}")
        return top[1]

    for regime in args.regimes:
        for m in _reported(args):
            if m == "grid":
                for k in ranks:
                    chosen[(regime, f"grid@{k}")] = best(lambda c, k=k: c[k][0], regime, "grid",
                                                         lambda lr, k=k: {k: lr}, [k])
            elif m == PLAIN:
                chosen[(regime, m)] = best(lambda c: c[r_max][0], regime, m)
            else:
                chosen[(regime, m)] = best(lambda c: aurac(ranks, [c[k][0] for k in ranks]), regime, m)
    return chosen


def summarise(results, args, size, chosen, K, chosen_compute: dict | None = None) -> dict:
    ranks = default_ranks(size["r_max"])
    r_max = size["r_max"]
    summary = {}
    for regime in args.regimes:
        for budget in ("steps", "compute"):
            for m in _reported(args):
                if budget == "compute" and not _computed(args, m, r_max):
                    continue
                lr = _lr_of(chosen, regime, m, r_max)
                if budget == "compute" and chosen_compute and (regime, m) in chosen_compute:
                    lr = chosen_compute[(regime, m)]
                name = _names(m, r_max)[0]
                steps = args.steps if budget == "steps" else compute_steps(args, name, K)
                curves = method_curves(results, regime, m, lr, steps, ranks, "test", r_max)
                if not curves:
                    continue
                want = [r_max] if m == PLAIN else ranks
                acc = {k: [100 * c[k][0] for c, _ in curves] for k in want}
                loss = {k: [c[k][1] for c, _ in curves] for k in want}
                au2 = [aurac(ranks, [100 * c[k][0] for k in ranks], "log2") for c, _ in curves] if m != PLAIN else []
                aul = [aurac(ranks, [100 * c[k][0] for k in ranks], "linear") for c, _ in curves] if m != PLAIN else []
                runs = K if m == "grid" else 1
                lrs = lr.values() if m == "grid" else [lr]
                summary[(regime, budget, m)] = dict(
                    lr=lr, n=len(curves),
                    acc_mean={k: statistics.mean(v) for k, v in acc.items()},
                    acc_sd={k: (statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in acc.items()},
                    loss_mean={k: statistics.mean(v) for k, v in loss.items()},
                    aurac_log2=_mean_sd(au2), aurac_lin=_mean_sd(aul),
                    runs=runs, steps=steps, passes_per_step=passes_of(name), passes=runs * steps * passes_of(name),
                    train_s=statistics.mean(s for _, s in curves),
                    diverged=len({_key(r) for r in results if r["diverged"] and r["regime"] == regime
                                  and r["steps"] == steps and r["lr"] in lrs and r["method"] in _names(m, r_max)}))
    return summary


def _mean_sd(v: list[float]) -> tuple[float, float] | None:
    if not v:
        return None
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def summarise_curves(results, args, size, chosen) -> dict:
    """{(regime, line): [(steps, passes, acc at r=1 %, acc at r_max %)]} from the seed-0 runs at each budget of
    --curve-steps; the line ``grid members`` reads r = 1 from the grid's r = 1 member and r_max from its r_max one."""
    ranks = default_ranks(size["r_max"])
    r_max, r_1 = size["r_max"], ranks[0]
    seed0 = [r for r in results if r["seed"] == 0]
    out = {}
    for regime in args.regimes:
        for m in _reported(args):
            if m == PLAIN:
                continue
            pts = []
            for n in args.curve_steps:
                if m == "grid":
                    lo = method_curves(seed0, regime, m, {r_1: chosen[(regime, f"grid@{r_1}")]}, n, [r_1], "test",
                                       r_max)
                    hi = method_curves(seed0, regime, PLAIN, chosen[(regime, f"grid@{r_max}")], n, ranks, "test", r_max)
                    if lo and hi:
                        pts.append((n, n, 100 * lo[0][0][r_1][0], 100 * hi[0][0][r_max][0]))
                    continue
                c = method_curves(seed0, regime, m, chosen[(regime, m)], n, ranks, "test", r_max)
                if c:
                    pts.append((n, n * passes_of(train_name(m, r_max)), 100 * c[0][0][r_1][0], 100 * c[0][0][r_max][0]))
            if pts:
                out[(regime, "grid members" if m == "grid" else m)] = pts
    return out


def base_scores(args, size) -> dict:
    out = {}
    for regime in args.regimes:
        rsize = regime_size(size, regime)
        base = build_base(rsize, args.device, getattr(torch, args.dtype), Path(args.cache), args.base_seed)
        task = regime_task(regime, rsize, args.base_seed)
        out[regime] = evaluate(base, task, rsize["eval_rows"], args.device, seed=2_000_003)
        out[f"pretrain-{regime}"] = evaluate(base, base_task(rsize, args.base_seed), rsize["eval_rows"], args.device,
                                             seed=2_000_003)
    return out


# ------------------------------------------------------------------------------------------------------ report
def _label(m: str) -> str:
    return {"lora-truncated": "lora-truncated (plain LoRA at r_max, served truncated)",
            PLAIN: f"**{PLAIN}** (the grid's r_max member)"}.get(m, m)


def _lr_text(lr) -> str:
    return " ".join(f"{k}:{v:g}" for k, v in lr.items()) if isinstance(lr, dict) else f"{lr:g}"


def _row(s: dict, label: str, ranks: list[int]) -> str:
    cells = " | ".join(f"{s['acc_mean'][k]:.1f} ± {s['acc_sd'][k]:.1f}" if k in s["acc_mean"] else "—"
                       for k in ranks)
    au = " | ".join(f"{a[0]:.1f} ± {a[1]:.1f}" if a else "—" for a in (s["aurac_log2"], s["aurac_lin"]))
    div = f" ({s['diverged']} diverged)" if s["diverged"] else ""
    return (f"| {label}{div} | {_lr_text(s['lr'])} | {cells} | {au} | {s['runs']} × {s['steps']} | "
            f"{s['passes']} | {s['train_s']:.0f} |")


HEADLINE = ("grid", PLAIN, "paired", "rowwise-half", "rowwise")


def _table_head(ranks: list[int]) -> tuple[str, str]:
    """The header and separator rows of a per-rank accuracy table."""
    return ("| method | LR | " + " | ".join(f"r={k}" for k in ranks)
            + " | AURAC log2 | AURAC lin | runs × steps | fwd-bwd passes | train s |"), "|" + "---|" * (len(ranks) + 7)


def _report_intro(args, size, K, base, wall, cmd: str, machine: str, n_runs: int, train_s: float) -> list[str]:
    """The report's first lines: the command, the machine, the size and what each regime is."""
    ranks = default_ranks(size["r_max"])
    r_max = size["r_max"]
    L = []
    L.append(f"Command: `{cmd}`  ")
    L.append(f"Machine: {machine}; wall time of the last invocation {wall / 60:.1f} min (runs reused from the runs "
             f"file not counted); training time summed over the {n_runs} runs: {train_s / 60:.1f} min.  ")
    L.append(f"Size `{args.size}`: Llama hidden {size['hidden']}, {size['layers']} layers, intermediate "
             f"{size['inter']}; adapters on {', '.join(TARGETS)}; r_max {r_max}, ranks {ranks} (K = {K}); scaling "
             f"`{args.scaling}`; {args.steps} steps per run at equal steps; at equal compute each one-run method gets "
             f"the grid's {K} × {args.steps} = {K * args.steps} forward-backward passes (steps = passes / passes per "
             f"step: `paired` takes 2 per step, so it gets {K * args.steps // 2} steps); AdamW, linear warm-up/decay; "
             f"{args.seeds} seeds; LR sweep {args.lrs} on seed 0, chosen per method by mean validation AURAC (log2, "
             f"accuracy) at equal steps and "
             + ("again by its own sweep at equal compute" if args.compute_lr == "sweep" else "reused at equal compute")
             + f", for each grid member (and so for {PLAIN}) by its validation accuracy at its own rank; the "
             f"steps plot uses the equal-steps LR; scores on a separate test set.  ")
    for regime in args.regimes:
        rs = regime_size(size, regime)
        L.append(f"Regime `{regime}`: {'chained ' if rs['chain'] else ''}cipher over {rs['symbols']} symbols, "
                 f"{rs['pairs']} pairs per sequence, batch {rs['batch']}"
                 + (f", {rs['override']} entries of the base's cipher changed" if regime != "large" else
                    ", a fresh cipher")
                 + f"; base accuracy on its own cipher {100 * base[f'pretrain-{regime}'][0]:.1f}%, on the task "
                 f"{100 * base[regime][0]:.1f}% (loss {base[regime][1]:.3f}).  ")
    L.append("")
    L.append(f"`{PLAIN}` is plain LoRA trained at r_max alone (the grid's r_max member, its LR chosen by its own "
             f"r_max validation accuracy); `lora-truncated` is the same runs (LR chosen by AURAC) served at every "
             f"rank by truncation. `fwd-bwd passes` is the compute: runs × steps × passes per step.")
    L.append("")
    return L


def _headline_table(summary, args, ranks: list[int]) -> list[str]:
    """The headline table: the grid, plain LoRA at r_max and the recommended nested methods, every regime."""
    hdr, sep = _table_head(ranks)
    L = []
    L.append("## Headline: grid vs plain LoRA at r_max vs the nested methods")
    L.append("")
    L.append("Test token accuracy, % (mean ± sd over seeds).")
    L.append("")
    L.append(hdr.replace("| method |", "| regime | budget | method |"))
    L.append("|---|---|" + sep[1:])
    for regime in args.regimes:
        for budget in ("steps", "compute"):
            for m in HEADLINE:
                s = summary.get((regime, budget, m))
                if s is not None:
                    L.append(f"| {regime} | {'equal steps' if budget == 'steps' else 'equal compute'} "
                             + _row(s, _label(m), ranks))
    L.append("")
    return L


def _regime_tables(summary, args, ranks: list[int], K: int) -> list[str]:
    """Per regime and budget: every reported method's test accuracy per rank and AURAC, then its test loss."""
    hdr, sep = _table_head(ranks)
    L = []
    for regime in args.regimes:
        for budget in ("steps", "compute"):
            title = ("equal steps" if budget == "steps" else
                     f"equal compute (one-run methods at the grid's {K * args.steps} forward-backward passes)")
            L.append(f"### Regime `{regime}`, {title}")
            L.append("")
            L.append("Test token accuracy, % (mean ± sd over seeds) per rank; AURAC on the log2 and linear axes.")
            L.append("")
            L.append(hdr)
            L.append(sep)
            for m in _reported(args):
                s = summary.get((regime, budget, m))
                label = _label(m)
                if s is None and budget == "compute" and m in ("grid", PLAIN):
                    s = summary.get((regime, "steps", m))
                    label += " (equal steps; the grid's K runs are the budget)"
                if s is not None:
                    L.append(_row(s, label, ranks))
            L.append("")
            L.append("Test loss (mean over seeds) per rank:")
            L.append("")
            L.append("| method | " + " | ".join(f"r={k}" for k in ranks) + " |")
            L.append("|" + "---|" * (len(ranks) + 1))
            for m in _reported(args):
                s = summary.get((regime, budget, m))
                if s is not None:
                    L.append(f"| {_label(m)} | " + " | ".join(f"{s['loss_mean'][k]:.3f}" if k in s["loss_mean"]
                                                             else "—" for k in ranks) + " |")
            L.append("")
    return L


def _steps_section(curves: dict, args, ranks: list[int], r_max: int, steps_plot: Path) -> list[str]:
    """Accuracy at r = 1 and r_max against training compute (``--curve-steps``), per regime."""
    L = []
    L.append("## Accuracy against training compute")
    L.append("")
    L.append(f"Seed 0, each method at its chosen LR, trained for each of {args.curve_steps} steps; x = "
             f"forward-backward passes (steps × passes per step); the line `grid members` is the grid's r = "
             f"{ranks[0]} member at r = {ranks[0]} and its r = {r_max} member ({PLAIN}) at r_max, each trained "
             f"alone. Test token accuracy, % at r = {ranks[0]} / r = {r_max}:")
    L.append("")
    for regime in args.regimes:
        lines = [(ln, pts) for (rg, ln), pts in curves.items() if rg == regime]
        if not lines:
            continue
        L.append(f"Regime `{regime}`:")
        L.append("")
        L.append("| method | " + " | ".join(f"{n} steps" for n in args.curve_steps) + " |")
        L.append("|" + "---|" * (len(args.curve_steps) + 1))
        for ln, pts in lines:
            by = {p[0]: p for p in pts}
            L.append(f"| {ln} | " + " | ".join(f"{by[n][2]:.1f} / {by[n][3]:.1f} ({by[n][1]} passes)"
                                               if n in by else "—" for n in args.curve_steps) + " |")
        L.append("")
    L.append(f"![accuracy at r = {ranks[0]} and r_max against forward-backward passes]({steps_plot.name})")
    L.append("")
    return L


def write_report(summary, curves, args, size, K, base, wall, path: Path, plot: Path, steps_plot: Path | None,
                 cmd: str, machine: str, n_runs: int, train_s: float) -> None:
    """Write the Markdown report to ``path`` and draw its plots (``plot``; ``steps_plot`` with ``--curve-steps``)."""
    ranks = default_ranks(size["r_max"])
    L = _report_intro(args, size, K, base, wall, cmd, machine, n_runs, train_s)
    L += _headline_table(summary, args, ranks)
    L += _regime_tables(summary, args, ranks, K)
    L += [f"![rank curves]({plot.name})", ""]
    if steps_plot is not None and curves:
        L += _steps_section(curves, args, ranks, size["r_max"], steps_plot)
    write_text(path, "\n".join(L) + "\n")
    _plot(summary, args, size, K, plot)
    if steps_plot is not None and curves:
        _plot_steps(curves, args, size, steps_plot)


def _plot(summary, args, size, K, plot: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = default_ranks(size["r_max"])
    fig, axes = plt.subplots(len(args.regimes), 2, figsize=(12, 4.5 * len(args.regimes)), squeeze=False)
    for i, regime in enumerate(args.regimes):
        for j, budget in enumerate(("steps", "compute")):
            ax = axes[i][j]
            for m in _reported(args):
                s = summary.get((regime, budget, m)) or (summary.get((regime, "steps", m)) if m in ("grid", PLAIN)
                                                         else None)
                if s is None:
                    continue
                ks = [k for k in ranks if k in s["acc_mean"]]
                ax.errorbar(ks, [s["acc_mean"][k] for k in ks], yerr=[s["acc_sd"][k] for k in ks], marker="o",
                            capsize=3, label=m, linestyle="--" if m == "grid" else "-",
                            markersize=10 if m == PLAIN else 6, fillstyle="none" if m == PLAIN else "full")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ranks)
            ax.set_xticklabels([str(r) for r in ranks])
            ax.set_xlabel("rank k")
            ax.set_ylabel("test token accuracy, %")
            ax.set_title(f"{regime} regime, " + ("equal steps" if budget == "steps" else
                                                 f"equal compute ({K * args.steps} passes)"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)


def _plot_steps(curves: dict, args, size, plot: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = default_ranks(size["r_max"])
    fig, axes = plt.subplots(len(args.regimes), 2, figsize=(12, 4.5 * len(args.regimes)), squeeze=False)
    for i, regime in enumerate(args.regimes):
        for j, (col, k) in enumerate(((3, size["r_max"]), (2, ranks[0]))):
            ax = axes[i][j]
            for (rg, ln), pts in curves.items():
                if rg != regime:
                    continue
                ax.plot([p[1] for p in pts], [p[col] for p in pts], marker="o", label=ln,
                        linestyle="--" if ln == "grid members" else "-")
            ax.set_xscale("log")
            ax.set_xlabel("forward-backward passes (steps × passes per step)")
            ax.set_ylabel(f"test token accuracy at r = {k}, %")
            ax.set_title(f"{regime} regime, r = {k}" + (" (r_max)" if k == size["r_max"] else ""))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main
def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="reported methods to run (default: all); plain LoRA at r_max is reported with the grid")
    ap.add_argument("--r-max", type=int, default=None, help="override the size's r_max")
    ap.add_argument("--steps", type=int, default=None, help="steps per run at equal steps (default: the size's)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--lrs", type=float, nargs="+", default=None)
    ap.add_argument("--scaling", default="sqrt", choices=["none", "rank", "sqrt"])
    ap.add_argument("--no-compute", action="store_true", help="skip the equal-compute runs")
    ap.add_argument("--compute-methods", nargs="+",
                    default=["matryoshka", "rowwise", "rowwise-half", "paired", "dylora", "lora-truncated"],
                    choices=list(ONE_RUN), help="one-run methods also trained at the grid's K·steps forward-backward "
                    "passes (those not in --methods are skipped)")
    ap.add_argument("--compute-lr", choices=["sweep", "steps"], default="sweep",
                    help="LR of the equal-compute runs: 'sweep' chooses it again from their own sweep of --lrs "
                    "(seed 0, validation AURAC); 'steps' reuses the LR chosen at equal steps")
    ap.add_argument("--curve-steps", type=int, nargs="+", default=None, metavar="N",
                    help="also train seed 0 of every method (and the grid's r = 1 and r_max members) at its chosen LR "
                    "for each of these step budgets, and plot accuracy at r = 1 and r_max against forward-backward "
                    "passes (e.g. 50 100 200 400 800)")
    ap.add_argument("--runs", default=None, help="JSONL of finished runs, appended as they finish and reused on "
                    "restart (default: --out with suffix _runs.jsonl)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--workers", type=int, default=1, help="parallel processes (each uses --threads threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--base-seed", type=int, default=0)
    ap.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "accuracy_study.md"),
                    help="generated report (tables); the plots and raw JSON go next to it")
    ap.add_argument("--json", default=None, help="raw results (default: next to --out)")
    ap.add_argument("--machine", default=None, help="machine description written into the report")
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    args.steps = args.steps or size["steps"]
    args.seeds = args.seeds or size["seeds"]
    args.lrs = args.lrs or size["lrs"]
    args.methods = [m for m in METHODS if m in args.methods]
    args.compute_methods = [m for m in args.compute_methods if m in args.methods]
    args.runs = args.runs or str(Path(args.out).with_name(Path(args.out).stem + "_runs.jsonl"))
    return args


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    size = SIZES[args.size] | ({"r_max": args.r_max} if args.r_max else {})
    cmd = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = args.machine or _machine(args)
    t0 = time.time()
    base = base_scores(args, size)  # pretrains and caches each base once, before the workers start
    print(f"[base] {base}", flush=True)
    ranks = default_ranks(size["r_max"])
    K = len(ranks)
    results = _run_all(sweep_jobs(args, size), args, "LR sweep, seed 0, equal steps")
    chosen = choose_lrs(results, args, ranks)
    print("[lr] chosen: " + ", ".join(f"{k[0]}/{k[1]}={v:g}" for k, v in chosen.items()), flush=True)
    chosen_compute = None
    if not args.no_compute and args.compute_lr == "sweep":
        sweep_c = _run_all(compute_sweep_jobs(args, size, K), args, "LR sweep, seed 0, equal compute")
        chosen_compute = choose_compute_lrs(sweep_c, args, ranks, K)
        results += sweep_c
        print("[lr] chosen at equal compute: " + ", ".join(f"{k[0]}/{k[1]}={v:g}" for k, v in chosen_compute.items()),
              flush=True)
    results += _run_all(seed_jobs(args, size, chosen, K, not args.no_compute, chosen_compute), args,
                        "other seeds (equal steps) and equal compute")
    if args.curve_steps:
        results += _run_all(curve_jobs(args, size, chosen), args, "seed 0 at each budget of --curve-steps")
    wall = time.time() - t0
    out = Path(args.out)
    js = Path(args.json) if args.json else out.with_name(out.stem + "_accuracy.json")
    write_text(js, json.dumps({"args": vars(args), "size": size, "base": base, "results": results}, indent=1))
    summary = summarise(results, args, size, chosen, K, chosen_compute)
    curves = summarise_curves(results, args, size, chosen) if args.curve_steps else {}
    plot = out.with_name(out.stem + "_curves.png")
    steps_plot = out.with_name(out.stem + "_steps.png") if args.curve_steps else None
    unique = {_key(r): r for r in results}
    write_report(summary, curves, args, size, K, base, wall, out, plot, steps_plot, cmd, machine, len(unique),
                 sum(r["train_s"] for r in unique.values()))
    print(out.read_text())
    print(f"[done] {wall / 60:.1f} min; report {out}, plots {plot}" + (f", {steps_plot}" if steps_plot else "")
          + f", raw {js}")


def _key(d) -> tuple:
    """A run's identity (its budget label is not part of it: a run serves every phase that needs it)."""
    g = d.__getitem__ if isinstance(d, dict) else lambda k: getattr(d, k)
    return (g("regime"), g("method"), float(g("lr")), g("seed"), g("steps"))


def _run_all(jobs: list[Job], args, what: str) -> list[dict]:
    done = {}
    runs = Path(args.runs)
    for res in read_jsonl(runs):
        res["curves"] = {rule: {int(k): v for k, v in c.items()} for rule, c in res["curves"].items()}
        done[_key(res)] = res
    results = [done[_key(j)] for j in jobs if _key(j) in done]
    jobs = [j for j in jobs if _key(j) not in done]
    print(f"[{what}] {len(jobs)} runs on {args.workers} worker(s) ({len(results)} reused from {runs})", flush=True)
    t = time.time()
    runs.parent.mkdir(parents=True, exist_ok=True)
    sink = runs.open("a")
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            for i, res in enumerate(pool.imap_unordered(_run_job_star, [(j, args) for j in jobs])):
                results.append(res)
                sink.write(json.dumps(res) + "\n")
                sink.flush()
                _progress(i, len(jobs), t, res)
    else:
        for i, j in enumerate(jobs):
            res = run_job(j, args)
            results.append(res)
            sink.write(json.dumps(res) + "\n")
            sink.flush()
            _progress(i, len(jobs), t, res)
    sink.close()
    return results


def _progress(i, n, t, res) -> None:
    el = time.time() - t
    accs = {rule: " ".join(f"{k}:{100 * v['test_acc']:.0f}" for k, v in c.items()) for rule, c in res["curves"].items()}
    print(f"  {i + 1}/{n} {el:.0f}s ({res['regime']} {res['method']} lr={res['lr']:g} seed={res['seed']} "
          f"steps={res['steps']} {res['train_s']:.1f}s) acc% {accs}", flush=True)


def _machine(args) -> str:
    import platform

    if args.device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{args.dtype}, {args.workers} worker(s) × {args.threads} thread(s)")


if __name__ == "__main__":
    main()
