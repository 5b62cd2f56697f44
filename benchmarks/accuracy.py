"""Does one nested run replace the rank grid?  The accuracy study behind the project's recommended defaults.

A small Llama is pretrained (seeded, cached) on a synthetic cipher and frozen; adapters on all seven projections
are then trained on two new tasks with every method of this library, and every trained adapter is evaluated at
every rank (token accuracy and loss on a held-out set):

regimes
    ``small``: a *small update*: the base's cipher with ``--override`` of its entries changed (the base
        already solves most of the task; fine-tuning adjusts it).
    ``large``: a *large update*: a fresh random cipher the base does not know.

Both are capacity-limited (the table the adapter must store grows with the number of changed entries), so a LoRA
trained at each rank separately rises clearly from rank 1 to r_max.

methods (all through this library's layers, modes, ``set_rank`` and ``begin_step``)
    ``matryoshka``            mode="matryoshka", paper's P, paper's inference rule (rank_scale="rank")
    ``matryoshka-trained``    the same runs, evaluated with rank_scale="trained" (the prefix of P)
    ``matryoshka-P/|S|``      mode="matryoshka" with p = P/|S| (the reference code's averaged form), rule "rank"
    ``rowwise``               mode="rowwise" (each row trains one rank as served), rule "rank"
    ``dylora``                mode="dylora" (one rank per step), rule "rank"
    ``lora-truncated``        mode="lora" at r_max, truncated to each rank keeping its trained scale s(r_max)
    ``grid``                  mode="lora" trained separately at each rank (K runs)

Every method gets a learning-rate sweep at equal steps; the rate with the best mean validation AURAC (log2 axis,
accuracy) over seeds is reported on the test set.  The one-run methods are run again with the grid's K× step
budget ("equal compute").  Results: JSON, a Markdown report and a PNG plot.

Usage (CPU, ~20–30 min on 2 cores)::

    python benchmarks/accuracy.py --size small --workers 2

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning_matlora import MatryoshkaLoRA, begin_step, build_p, default_ranks, set_rank, set_rank_scale  # noqa: E402,E501
from lightning_matlora import aurac as _lib_aurac  # noqa: E402

METHODS = ("matryoshka", "matryoshka-trained", "matryoshka-P/|S|", "rowwise", "rowwise-half", "dylora", "lora-truncated",
           "grid")
ONE_RUN = ("matryoshka", "matryoshka-P/|S|", "rowwise", "rowwise-half", "dylora", "lora-truncated")  # training runs (not rules)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SIZES = {
    # task (cipher kind, symbols, pairs per sequence, overridden entries), model, adapter, budgets
    "tiny": dict(chain=False, symbols=32, pairs=4, hidden=32, layers=1, heads=2, inter=64, r_max=4, steps=10, batch=8,
                 pretrain_steps=50, override=8, lrs=[1e-2], seeds=2, eval_rows=64),  # smoke test only
    "small": dict(chain=False, symbols=512, pairs=8, hidden=64, layers=2, heads=4, inter=256, r_max=8, steps=200, batch=32,
                  pretrain_steps=3000, override=128, lrs=[3e-3, 1e-2, 3e-2], seeds=3, eval_rows=512),
    "medium": dict(chain=False, symbols=4096, pairs=16, hidden=256, layers=4, heads=8, inter=1024, r_max=32,
                   steps=1000, batch=32, pretrain_steps=8000, override=1024, lrs=[1e-3, 3e-3, 1e-2], seeds=3, eval_rows=1024),
    "large": dict(chain=False, symbols=16384, pairs=32, hidden=1024, layers=8, heads=16, inter=2816, r_max=64,
                  steps=2000, batch=32, pretrain_steps=20000, override=4096, lrs=[3e-4, 1e-3, 3e-3], seeds=3, eval_rows=2048),
}


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


def regime_task(regime: str, size: dict, base_seed: int) -> Task:
    """``large``: a fresh random cipher; ``small``: the base's cipher with ``size['override']`` entries changed."""
    t0 = base_task(size, base_seed)
    V = size["symbols"]
    g = torch.Generator().manual_seed(20_000 + base_seed + (0 if regime == "small" else 1))
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
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=size["symbols"] + 1, hidden_size=size["hidden"], intermediate_size=size["inter"],
                      num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                      num_key_value_heads=size["heads"], max_position_embeddings=2 * size["pairs"] + 8,
                      tie_word_embeddings=False)
    key = (f"base_{'chain' if size['chain'] else 'uni'}_V{size['symbols']}_L{size['pairs']}_h{size['hidden']}_l{size['layers']}_i{size['inter']}"
           f"_s{size['pretrain_steps']}_seed{base_seed}.pt")
    path = cache / key
    torch.manual_seed(base_seed)
    model = LlamaForCausalLM(cfg)
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
            loss = _loss(model, inputs.to(device), targets.to(device))
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


def _loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
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


def aurac(ranks: list[int], scores: list[float], axis: str = "log2") -> float:
    """Area under the rank–score curve over the span of the axis (spec: AURAC), as a float."""
    return float(_lib_aurac(ranks, scores, axis=axis))


# ------------------------------------------------------------------------------------------------------ runs
@dataclasses.dataclass
class Job:
    regime: str
    method: str  # a training method in ONE_RUN, or "grid@k"
    lr: float
    seed: int
    steps: int
    budget: str  # "steps" (equal steps) or "compute" (the grid's K× steps)


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
    if method == "dylora":
        return r_max, dict(mode="dylora", rank_scale="rank")
    if method == "lora-truncated":
        return r_max, dict(mode="lora", rank_scale="trained")
    raise ValueError(method)


def run_job(job: Job, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    size = SIZES[args.size] | {k: v for k, v in (("r_max", args.r_max),) if v}
    device, dtype = args.device, getattr(torch, args.dtype)
    task = regime_task(job.regime, size, args.base_seed)
    base = build_base(size, device, dtype, Path(args.cache), args.base_seed)
    r, kw = adapter_kwargs(job.method, size["r_max"], args.scaling)
    torch.manual_seed(1000 * job.seed + 7)
    cb = MatryoshkaLoRA(r_max=r, target_modules=TARGETS, scaling=args.scaling, seed=job.seed,
                        adapter_dtype="float32", verbose=False, **kw)
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
        loss = _loss(base, inputs.to(device), targets.to(device))
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.time() - t0
    rules = ["rank", "trained"] if job.method == "matryoshka" else [kw["rank_scale"]]
    eval_ranks = [r] if job.method.startswith("grid@") else default_ranks(size["r_max"])
    out = {"regime": job.regime, "method": job.method, "lr": job.lr, "seed": job.seed, "steps": job.steps,
           "budget": job.budget, "train_s": train_s, "diverged": diverged, "curves": {}}
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
def sweep_jobs(args: argparse.Namespace, size: dict) -> list[Job]:
    """Phase 1: every training run of every method at every swept LR, on the first seed, at equal steps."""
    jobs = []
    for regime in args.regimes:
        for lr in args.lrs:
            for m in ONE_RUN:
                jobs.append(Job(regime, m, lr, 0, args.steps, "steps"))
            for k in default_ranks(size["r_max"]):
                jobs.append(Job(regime, f"grid@{k}", lr, 0, args.steps, "steps"))
    return jobs


def seed_jobs(args: argparse.Namespace, size: dict, chosen: dict, K: int, compute: bool) -> list[Job]:
    """Phase 2: the remaining seeds at each method's chosen LR (equal steps), and every seed of the one-run
    methods at the grid's K× step budget (equal compute). Runs shared by two reported methods are run once."""
    todo: dict[tuple, Job] = {}
    for regime in args.regimes:
        for m in METHODS:
            lr = chosen[(regime, m)]
            train = _train_and_rule(m)[0]
            names = [f"grid@{k}" for k in default_ranks(size["r_max"])] if m == "grid" else [train]
            for name in names:
                for seed in range(1, args.seeds):
                    todo[(regime, name, lr, seed, "steps")] = Job(regime, name, lr, seed, args.steps, "steps")
                if compute and m != "grid" and train in args.compute_methods:
                    for seed in range(args.seeds):
                        todo[(regime, name, lr, seed, "compute")] = Job(regime, name, lr, seed, args.steps * K,
                                                                        "compute")
    return list(todo.values())


def method_curves(results: list[dict], regime: str, budget: str, method: str, lr: float, ranks: list[int],
                  split: str) -> list[dict]:
    """Per seed: {rank: (acc, loss)} of a reported method (maps the grid's K runs to one curve)."""
    by_seed: dict[int, dict] = {}
    for res in results:
        if res["regime"] != regime or res["budget"] != budget or res["lr"] != lr:
            continue
        if method == "grid":
            if not res["method"].startswith("grid@"):
                continue
            k = int(res["method"].split("@")[1])
            c = res["curves"]["trained"][k]
            by_seed.setdefault(res["seed"], {})[k] = (c[f"{split}_acc"], c[f"{split}_loss"])
            continue
        train_m, rule = _train_and_rule(method)
        if res["method"] != train_m:
            continue
        curve = res["curves"][rule]
        by_seed[res["seed"]] = {k: (curve[k][f"{split}_acc"], curve[k][f"{split}_loss"]) for k in ranks}
    return [v for _, v in sorted(by_seed.items()) if len(v) == len(ranks)]


def _train_and_rule(method: str) -> tuple[str, str]:
    if method == "matryoshka-trained":
        return "matryoshka", "trained"
    if method == "lora-truncated":
        return "lora-truncated", "trained"
    return method, "rank"


def choose_lrs(results, args, ranks) -> dict:
    chosen = {}
    for regime in args.regimes:
        for m in METHODS:
            best = None
            for lr in args.lrs:
                curves = method_curves(results, regime, "steps", m, lr, ranks, "val")
                if not curves:
                    continue
                score = statistics.mean(aurac(ranks, [c[k][0] for k in ranks]) for c in curves)
                if best is None or score > best[0]:
                    best = (score, lr)
            chosen[(regime, m)] = best[1]
    return chosen


def summarise(results, args, size, chosen, K) -> dict:
    ranks = default_ranks(size["r_max"])
    summary = {}
    for regime in args.regimes:
        for budget in ("steps", "compute"):
            for m in METHODS:
                if budget == "compute" and m == "grid":
                    continue
                train_m = _train_and_rule(m)[0]
                lr = chosen[(regime, m)]
                curves = method_curves(results, regime, budget, m, lr, ranks, "test")
                if not curves:
                    continue
                acc = {k: [100 * c[k][0] for c in curves] for k in ranks}
                loss = {k: [c[k][1] for c in curves] for k in ranks}
                au2 = [aurac(ranks, [100 * c[k][0] for k in ranks], "log2") for c in curves]
                aul = [aurac(ranks, [100 * c[k][0] for k in ranks], "linear") for c in curves]
                secs = [r["train_s"] for r in results if r["regime"] == regime and r["budget"] == budget
                        and r["lr"] == lr and (r["method"].startswith("grid@") if m == "grid" else r["method"] == train_m)]
                runs = K if m == "grid" else 1
                steps = args.steps * (K if budget == "compute" else 1)
                summary[(regime, budget, m)] = dict(
                    lr=lr, n=len(curves),
                    acc_mean={k: statistics.mean(v) for k, v in acc.items()},
                    acc_sd={k: (statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in acc.items()},
                    loss_mean={k: statistics.mean(v) for k, v in loss.items()},
                    aurac_log2=(statistics.mean(au2), statistics.stdev(au2) if len(au2) > 1 else 0.0),
                    aurac_lin=(statistics.mean(aul), statistics.stdev(aul) if len(aul) > 1 else 0.0),
                    runs=runs, steps_total=steps * runs,
                    train_s=sum(secs) / max(1, len(curves)),
                    diverged=sum(r["diverged"] for r in results if r["regime"] == regime and r["budget"] == budget
                                 and r["lr"] == lr and r["method"] == train_m))
    return summary


def base_scores(args, size) -> dict:
    out = {}
    base = build_base(size, args.device, getattr(torch, args.dtype), Path(args.cache), args.base_seed)
    for regime in args.regimes:
        task = regime_task(regime, size, args.base_seed)
        out[regime] = evaluate(base, task, size["eval_rows"], args.device, seed=2_000_003)
    t0 = base_task(size, args.base_seed)
    out["pretrain"] = evaluate(base, t0, size["eval_rows"], args.device, seed=2_000_003)
    return out


# ------------------------------------------------------------------------------------------------------ report
def write_report(summary, args, size, K, chosen, base, wall, path: Path, plot: Path, cmd: str, machine: str) -> None:
    ranks = default_ranks(size["r_max"])
    L = []
    L.append(f"Command: `{cmd}`  ")
    L.append(f"Machine: {machine}; wall time {wall / 60:.1f} min.  ")
    L.append(f"Size `{args.size}`: Llama hidden {size['hidden']}, {size['layers']} layers, intermediate "
             f"{size['inter']}, vocabulary {size['symbols'] + 1}; adapters on {', '.join(TARGETS)}; r_max "
             f"{size['r_max']}, ranks {ranks} (K = {K}); scaling `{args.scaling}`; batch {size['batch']} sequences of "
             f"{size['pairs']} cipher pairs; {args.steps} steps per run (equal steps) or {args.steps * K} (equal "
             f"compute); AdamW, linear warm-up/decay; {args.seeds} seeds; LR sweep {args.lrs}, chosen per method by "
             f"mean validation AURAC (log2, accuracy) at equal steps and reused at equal compute; scores on a "
             f"separate test set.  ")
    L.append(f"Base accuracy: its own cipher {100 * base['pretrain'][0]:.1f}%; "
             + "; ".join(f"{r} regime task {100 * base[r][0]:.1f}% (loss {base[r][1]:.3f})" for r in args.regimes)
             + ".")
    L.append("")
    for regime in args.regimes:
        for budget in ("steps", "compute"):
            title = "equal steps" if budget == "steps" else f"equal compute (one-run methods at {K}× steps)"
            L.append(f"### Regime `{regime}`, {title}")
            L.append("")
            L.append("Test token accuracy, % (mean ± sd over seeds) per rank; AURAC on the log2 and linear axes.")
            L.append("")
            hdr = "| method | LR | " + " | ".join(f"r={k}" for k in ranks) + " | AURAC log2 | AURAC lin | runs × steps | train s |"
            L.append(hdr)
            L.append("|" + "---|" * (len(ranks) + 6))
            for m in METHODS:
                s = summary.get((regime, budget, m))
                if s is None and budget == "compute" and m == "grid":
                    s = summary.get((regime, "steps", "grid"))
                    label = "grid (equal steps = its budget)"
                else:
                    label = m
                if s is None:
                    continue
                cells = " | ".join(f"{s['acc_mean'][k]:.1f} ± {s['acc_sd'][k]:.1f}" for k in ranks)
                div = f" ({s['diverged']} diverged)" if s["diverged"] else ""
                L.append(f"| {label}{div} | {s['lr']:g} | {cells} | {s['aurac_log2'][0]:.1f} ± {s['aurac_log2'][1]:.1f} "
                         f"| {s['aurac_lin'][0]:.1f} ± {s['aurac_lin'][1]:.1f} | {s['runs']} × "
                         f"{s['steps_total'] // s['runs']} | {s['train_s']:.0f} |")
            L.append("")
            L.append("Test loss (mean over seeds) per rank:")
            L.append("")
            L.append("| method | " + " | ".join(f"r={k}" for k in ranks) + " |")
            L.append("|" + "---|" * (len(ranks) + 1))
            for m in METHODS:
                s = summary.get((regime, budget, m))
                if s is None:
                    continue
                L.append(f"| {m} | " + " | ".join(f"{s['loss_mean'][k]:.3f}" for k in ranks) + " |")
            L.append("")
    L.append(f"![rank curves]({plot.name})")
    L.append("")
    path.write_text("\n".join(L) + "\n")
    _plot(summary, args, size, K, plot)


def _plot(summary, args, size, K, plot: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = default_ranks(size["r_max"])
    fig, axes = plt.subplots(len(args.regimes), 2, figsize=(12, 4.5 * len(args.regimes)), squeeze=False)
    for i, regime in enumerate(args.regimes):
        for j, budget in enumerate(("steps", "compute")):
            ax = axes[i][j]
            for m in METHODS:
                s = summary.get((regime, budget, m)) or (summary.get((regime, "steps", m)) if m == "grid" else None)
                if s is None:
                    continue
                mean = [s["acc_mean"][k] for k in ranks]
                sd = [s["acc_sd"][k] for k in ranks]
                ax.errorbar(ranks, mean, yerr=sd, marker="o", capsize=3, label=m,
                            linestyle="--" if m == "grid" else "-")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ranks)
            ax.set_xticklabels([str(r) for r in ranks])
            ax.set_xlabel("rank k")
            ax.set_ylabel("test token accuracy, %")
            ax.set_title(f"{regime} update, " + ("equal steps" if budget == "steps" else f"equal compute ({K}× steps)"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot, dpi=110)


# ------------------------------------------------------------------------------------------------------ main
def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--regimes", nargs="+", default=["small", "large"], choices=["small", "large"])
    ap.add_argument("--r-max", type=int, default=None, help="override the size's r_max")
    ap.add_argument("--steps", type=int, default=None, help="steps per run at equal steps (default: the size's)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--lrs", type=float, nargs="+", default=None)
    ap.add_argument("--scaling", default="sqrt", choices=["none", "rank", "sqrt"])
    ap.add_argument("--no-compute", action="store_true", help="skip the equal-compute runs")
    ap.add_argument("--compute-methods", nargs="+", default=["matryoshka", "rowwise", "rowwise-half", "dylora"],
                    choices=list(ONE_RUN), help="one-run methods also trained at the grid's K× step budget")
    ap.add_argument("--runs", default=None, help="JSONL of finished runs, appended as they finish and reused on "
                    "restart (default: --out with suffix _runs.jsonl)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--workers", type=int, default=1, help="parallel processes (each uses --threads threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--base-seed", type=int, default=0)
    ap.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "accuracy_study.md"),
                    help="generated report (tables); the plot and raw JSON go next to it")
    ap.add_argument("--json", default=None, help="raw results (default: next to --out)")
    ap.add_argument("--machine", default=None, help="machine description written into the report")
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    args.steps = args.steps or size["steps"]
    args.seeds = args.seeds or size["seeds"]
    args.lrs = args.lrs or size["lrs"]
    args.runs = args.runs or str(Path(args.out).with_name(Path(args.out).stem + "_runs.jsonl"))
    return args


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    size = SIZES[args.size] | ({"r_max": args.r_max} if args.r_max else {})
    cmd = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = args.machine or _machine(args)
    t0 = time.time()
    base = base_scores(args, size)  # pretrains and caches the base once, before the workers start
    print(f"[base] {base}", flush=True)
    ranks = default_ranks(size["r_max"])
    K = len(ranks)
    results = _run_all(sweep_jobs(args, size), args, "LR sweep, seed 0, equal steps")
    chosen = choose_lrs(results, args, ranks)
    print("[lr] chosen: " + ", ".join(f"{k[0]}/{k[1]}={v:g}" for k, v in chosen.items()), flush=True)
    results += _run_all(seed_jobs(args, size, chosen, K, not args.no_compute), args,
                        "other seeds (equal steps) and equal compute")
    wall = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    js = Path(args.json) if args.json else out.with_name(out.stem + "_accuracy.json")
    js.write_text(json.dumps({"args": vars(args), "size": size, "base": base, "results": results}, indent=1))
    summary = summarise(results, args, size, chosen, K)
    plot = out.with_name(out.stem + "_curves.png")
    report = out
    write_report(summary, args, size, K, chosen, base, wall, report, plot, cmd, machine)
    print(report.read_text())
    print(f"[done] {wall / 60:.1f} min; report {report}, plot {plot}, raw {js}")


def _key(d) -> tuple:
    g = d.__getitem__ if isinstance(d, dict) else lambda k: getattr(d, k)
    return (g("regime"), g("method"), float(g("lr")), g("seed"), g("steps"), g("budget"))


def _run_all(jobs: list[Job], args, what: str) -> list[dict]:
    done = {}
    runs = Path(args.runs)
    if runs.exists():
        for ln in runs.read_text().splitlines():
            res = json.loads(ln)
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
