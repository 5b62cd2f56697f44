"""Nested training against plain LoRA and the per-rank grid on the recipe's Encode task, at equal steps.

    python recipes/encode_study.py METHOD --lr 1e-2 --seed 0 [--epochs 6] [--out docs/encode_study_runs.jsonl]
    python recipes/encode_study.py summary [--out docs/encode_study_runs.jsonl]   # the markdown table
    python recipes/encode_study.py table [--out docs/encode_study_runs.jsonl]  # each method at its chosen lr
    python recipes/encode_study.py plot [--out docs/encode_study_runs.jsonl] [--png docs/encode_study_steps.png]

The recipe's setting (bundled base and Encode data, batch 32, max_length 64, AdamW with 5 % linear warm-up then
linear decay, weight decay 0, 6 epochs = 678 optimizer steps) in a plain training loop on one CPU thread. After
training it scores every eval rank k ∈ {1, 2, 4, 8, 16} (those ≤ the method's r_max): answer-token accuracy on
the 400 validation examples (teacher forcing) and greedy exact match on the first 200 (12 new tokens), as the
recipe does, and appends one JSON line per run (method, options, lr, seed, steps, per-rank figures, log2 AURAC).

METHOD:
  lora:R             plain LoRA at rank R (``mode="lora"``, r_max R); one member of the grid when R < 16
  rowwise            ``mode="rowwise"`` (the library's training forward; ``--scaling`` picks s(k),
                     ``--rank-weights`` the library's row shares: ``uniform`` by default here, ``half_max``)
  weighted:W1,…,Wn   rowwise with the rows of each batch shared among the train ranks in proportion W
                     (e.g. ``weighted:1,1,1,1,4``: half the rows at r_max)
  svd:F              plain LoRA at r_max for the first F of the steps, then every layer re-ordered by SVD
                     (``reorder_by_svd`` below: each prefix is the layer's best rank-k approximation under the
                     ``rank`` rule's scales), then rowwise (``--weights``) for the rest with a fresh optimizer
                     (its own warm-up and decay, peak ``--lr2``, default ``--lr``)
  dual               every step: the whole batch at r_max plus the whole batch again with the lower train
                     ranks spread over its rows (2 forwards per step)
  distill:T          as ``dual``, the low-rank rows also matched (KL, temperature 1, weight T) to the detached
                     r_max logits of the same rows, on the answer tokens (the positions the loss is taken on)
  paired:T           the library's paired passes: ``MatryoshkaLoRA(max_pass=True, distill=T)`` and
                     ``paired_loss`` ((L_max + L_low + T·KL)/2, KL over every position of the logits); ``paired:0``
                     is ``dual`` through the library
  distillall:T       as ``distill:T`` on every position of the output (prompt and padding included: what a hook on
                     the output layer sees without knowing the labels), KL averaged over positions
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from encode_loop import BATCH, WARMUP_RATIO, exact_match, load_base, load_task, token_accuracy, warmup_linear_decay
from instruct_encoding import collate
from lightning_matlora import MatryoshkaLoRA, at_rank, aurac, begin_step, paired_loss, set_rank
from lightning_matlora.adapted_model import controller_of
from lightning_matlora.curve import panel_figure
from lightning_matlora.inject import adapted_layers
from lightning_matlora.scaling import scale_of_rank

EVAL_RANKS = [1, 2, 4, 8, 16]


@torch.no_grad()
def reorder_by_svd(model: torch.nn.Module) -> None:
    """The study's prototype of the library's SVD nesting (kept so that its ``svd:F`` figures reproduce; the library's
    :func:`lightning_matlora.nest_by_svd` instead switches a ``sqrt`` adapter to ``scaling="none"`` so that
    every prefix is exactly the best approximation). Re-order every adapted layer so that prefix k (served under the
    ``rank`` rule) is s(k)/s(R) times the best
    rank-k approximation of the layer's rank-R update s(R)·B·A (exactly the best one when s is constant);
    the rank-R update is unchanged. Balanced factors: A' = Σ^½Vᵀ/√s(R), B' = UΣ^½/√s(R)."""
    ctrl = controller_of(model)
    R, sR = ctrl.r_max, scale_of_rank(ctrl.r_max, ctrl.config.scaling, ctrl.config.alpha)
    for m in adapted_layers(model).values():
        delta = sR * m.lora_B.double() @ m.lora_A.double()  # out × in
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        root = (S[:R] / sR).sqrt()
        m.lora_B.copy_((U[:, :R] * root).to(m.lora_B.dtype))
        m.lora_A.copy_((root[:, None] * Vh[:R]).to(m.lora_A.dtype))


def row_ranks(ranks: list[int], weights: list[float], rows: int, offset: int) -> torch.Tensor:
    """Ranks for ``rows`` rows: counts proportional to ``weights`` (largest remainders), rotated by ``offset``."""
    w = torch.tensor(weights, dtype=torch.float64)
    exact = w / w.sum() * rows
    counts = exact.floor().long()
    rest = rows - int(counts.sum())
    order = torch.argsort(-(exact - counts), stable=True)
    counts[order[:rest]] += 1
    out = torch.repeat_interleave(torch.tensor(ranks), counts)
    return out.roll(offset)


def summary(path: str) -> str:
    """Markdown table of the runs in ``path``: one row per setting (method, scaling, row shares, lr, epochs), exact
    match per rank as mean ± sd over its seeds, log2 AURAC of exact match, token accuracy at r = 1 and r_max."""
    import collections
    import statistics

    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for line in Path(path).read_text().splitlines():
        d = json.loads(line)
        key = (d["method"], d["scaling"], d.get("rank_weights", "uniform"), d.get("weights"), d["lr"], d.get("lr2"),
               d["epochs"])
        groups[key].append(d)

    def ms(vals: list[float]) -> str:
        return f"{statistics.mean(vals):.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "")

    out = ["| setting | lr | seeds | " + " | ".join(f"r={k}" for k in EVAL_RANKS) + " | AURAC log2 | token acc r=1 / r_max |",
           "|---" * (len(EVAL_RANKS) + 5) + "|"]
    for (method, scaling, rw, w, lr, lr2, epochs), ds in groups.items():
        name = method + ("" if scaling == "sqrt" else f", scaling={scaling}") + \
            ("" if rw in (None, "uniform") or method.startswith("lora") else f", rank_weights={rw}") + \
            (f", weights={w}" if w else "") + (f", lr2={lr2:g}" if lr2 else "") + \
            ("" if epochs == 6 else f", {epochs:g} epochs")
        cells = [ms([d["curve"][str(k)]["exact_match"] for d in ds]) if str(k) in ds[0]["curve"] else ""
                 for k in EVAL_RANKS]
        top = str(max(int(k) for k in ds[0]["curve"]))
        tok = ms([d["curve"]["1"]["token_acc"] for d in ds]) if "1" in ds[0]["curve"] else "–"
        out.append(f"| {name} | {lr:g} | {','.join(str(d['seed']) for d in ds)} | " + " | ".join(cells) +
                   f" | {ms([d['aurac_log2_em'] for d in ds])} | {tok} / {ms([d['curve'][top]['token_acc'] for d in ds])} |")
    return "\n".join(out)


def passes_per_step(method: str) -> int:
    """Forward-backward passes of the whole batch per optimizer step (``dual`` and ``distill`` run two)."""
    return 2 if method.split(":")[0] in ("dual", "distill", "distillall", "paired") else 1


def chosen_lrs(records: list[dict], epochs: float = 6) -> dict[str, float]:
    """Each method's learning rate: the one whose seed-0 run of ``epochs`` epochs scored best (log2 AURAC of exact
    match; a grid member ``lora:K`` by its exact match at its own rank K)."""
    best: dict[str, tuple[float, float]] = {}
    for d in records:
        if d["seed"] != 0 or d["epochs"] != epochs or d["scaling"] != "sqrt" or d.get("weights"):
            continue
        name = method_name(d)
        score = d["curve"][str(d["r_max"])]["exact_match"] if d["method"].startswith("lora:") else d["aurac_log2_em"]
        if name not in best or score > best[name][0]:
            best[name] = (score, d["lr"])
    return {name: lr for name, (_, lr) in best.items()}


def method_name(d: dict) -> str:
    """The method of a run record with its row rule when it has one (``rowwise (half_max)``)."""
    plain = d["method"].startswith("lora") or d["method"].split(":")[0] in ("dual", "distill", "distillall", "paired")
    return d["method"] + ("" if plain else f" ({d.get('rank_weights', 'uniform')})")


def plot(path: str, png: str, lr: float | None = None) -> str:
    """Exact match at r = 1 and at r_max against training compute (whole-batch forward-backward passes, in
    epochs of the 3600 training examples), one line per method at its chosen learning rate (:func:`chosen_lrs`),
    from the seed-0 runs in ``path``; the grid members ``lora:1`` (r = 1 panel) and ``lora:16`` (r_max panel) are
    plain LoRA trained at that rank alone."""
    import collections

    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    lrs = chosen_lrs(records)
    if lr is not None:  # one rate for every method
        lrs = {name: lr for name in lrs}
    pts: dict[str, list[tuple[float, float, float]]] = collections.defaultdict(list)
    for d in records:
        name = method_name(d)
        if d["seed"] != 0 or d["scaling"] != "sqrt" or d.get("weights") or d["lr"] != lrs.get(name):
            continue
        c = d["curve"]
        top = str(max(int(k) for k in c))
        label = {"dual": "paired passes (dual)", "lora:16": "plain LoRA at 16", "lora:1": "plain LoRA at 1",
                 "rowwise (half_max)": "one pass, half_max"}.get(name, name)
        pts[f"{label}, lr {d['lr']:g}"].append((d["epochs"] * passes_per_step(d["method"]),
                                               c.get("1", {}).get("exact_match"), c[top]["exact_match"]))
    shown = []
    with panel_figure(png, ("exact match at r = 1", "exact match at r_max = 16"),
                      xlabel="training compute (whole-batch forward-backward passes, in epochs)",
                      ylabel="exact match %", suptitle="Encode task, seed 0: accuracy against training compute") as axes:
        for ax in axes:
            ax.set_xscale("log", base=2)
        for name, p in sorted(pts.items()):
            p.sort()
            if len(p) < 2:
                continue
            shown.append(name)
            for ax, i, skip in ((axes[0], 1, name.startswith(("lora:16,", "plain LoRA at 16,"))),
                                (axes[1], 2, name.startswith(("lora:", "plain LoRA at ")) and
                                 not name.startswith(("lora:16,", "plain LoRA at 16,")))):
                if skip:
                    continue
                xs, ys = [q[0] for q in p if q[i] is not None], [q[i] for q in p if q[i] is not None]
                ax.plot(xs, ys, marker="o", label=name)
    return f"wrote {png} ({', '.join(shown)})"


def table(path: str, epochs: float = 6, lr: float | None = None) -> str:
    """The study's main table: every method at its chosen learning rate (:func:`chosen_lrs`), exact match per rank
    as mean ± sd over the seeds run there, for runs of ``epochs`` epochs; the grid row takes each member ``lora:K``
    at its own rank and chosen rate (AURAC from the per-seed curves of seeds every member has)."""
    import collections
    import statistics

    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    lrs = chosen_lrs(records, epochs)
    if lr is not None:  # one rate for every method
        lrs = {name: lr for name in lrs}
    runs: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for d in records:
        name = method_name(d)
        if d["epochs"] == epochs and d["scaling"] == "sqrt" and not d.get("weights") and d["lr"] == lrs.get(name):
            runs[name][d["seed"]] = d

    def ms(vals: list[float]) -> str:
        return f"{statistics.mean(vals):.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "")

    rows = []
    members = {int(n.split(":")[1]): n for n in runs if n.startswith("lora:")}
    if members:
        seeds = sorted(set.intersection(*(set(runs[n]) for n in members.values())))
        curves = {s: {k: runs[members[k]][s]["curve"][str(k)]["exact_match"] for k in sorted(members)} for s in seeds}
        cells = [ms([runs[members[k]][s]["curve"][str(k)]["exact_match"] for s in runs[members[k]]])
                 for k in EVAL_RANKS if k in members]
        au = [aurac(sorted(members), [curves[s][k] for k in sorted(members)]) for s in seeds]
        lr_text = ", ".join(f"{lrs[members[k]]:g}" for k in sorted(members))
        rows.append(f"| grid: plain LoRA trained at each rank alone, each at its own rank | {lr_text} | "
                    f"{len(seeds)} | {len(members)} × 1 | " + " | ".join(cells) + f" | {ms(au) if au else '–'} |")
    for name in sorted(runs):
        ds = list(runs[name].values())
        cells = [ms([d["curve"][str(k)]["exact_match"] for d in ds]) if str(k) in ds[0]["curve"] else "" for k in EVAL_RANKS]
        if name.startswith("lora:") and name != f"lora:{max(EVAL_RANKS)}":
            continue
        rows.append(f"| {name} | {lrs[name]:g} | {len(ds)} | {passes_per_step(ds[0]['method'])} | " + " | ".join(cells) +
                    f" | {ms([d['aurac_log2_em'] for d in ds])} |")
    head = ["| training | lr | seeds | passes per step | " + " | ".join(f"r={k}" for k in EVAL_RANKS) + " | AURAC log2 |",
            "|---" * (len(EVAL_RANKS) + 5) + "|"]
    return "\n".join(head + rows)


def report(command: str) -> None:
    """The reporting subcommands (``summary``, ``table``, ``plot``) over a runs file."""
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["summary", "table", "plot"])
    ap.add_argument("--out", default="docs/encode_study_runs.jsonl")
    ap.add_argument("--epochs", type=float, default=6, help="table: the runs of this many epochs")
    ap.add_argument("--png", default="docs/encode_study_steps.png", help="plot: where to draw")
    ap.add_argument("--lr", type=float, default=None, help="table, plot: one rate for every method (default: each "
                    "method its best seed-0 rate)")
    a = ap.parse_args()
    if command == "summary":
        print(summary(a.out))
    elif command == "table":
        print(table(a.out, a.epochs, a.lr))
    else:
        print(plot(a.out, a.png, a.lr))


def parse_run(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("method")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--lr2", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=6)
    ap.add_argument("--r-max", type=int, default=16)
    ap.add_argument("--scaling", default="sqrt")
    ap.add_argument("--weights", default=None, help="row shares of the train ranks in rowwise phases (set per "
                    "batch by this script)")
    ap.add_argument("--rank-weights", default="uniform",
                    help="the library's rank_weights for rowwise: 'uniform', 'half_max' or integers 'W1,…,Wn'")
    ap.add_argument("--num-generate", type=int, default=200)
    ap.add_argument("--out", default="docs/encode_study_runs.jsonl")
    ap.add_argument("--one-schedule", action="store_true",
                    help="svd: keep one warm-up/decay schedule over all steps; at the switch only the optimizer's "
                         "moments are reset (what a callback can do inside a user's training run)")
    ap.add_argument("--layer-draws", default="none", choices=["none", "type"],
                    help="the library's layer_draws for rowwise: 'type' gives each module type its own row ranks")
    ap.add_argument("--tag", default="")
    return ap.parse_args(argv)


@dataclasses.dataclass
class Run:
    """One training run of the study: its METHOD (``kind:arg``) and what its steps need."""

    kind: str  # the METHOD's name: lora, rowwise, weighted, svd, dual, distill, paired, distillall
    arg: str  # what follows the colon ("" when nothing does)
    r_max: int
    ranks: list[int]  # the train ranks
    weights: list[float]  # row shares of the train ranks in rowwise phases
    total: int  # optimizer steps
    switch: int  # svd: the step at which the layers are re-ordered (0 otherwise)
    seed: int


def prepare_run(args: argparse.Namespace, model: torch.nn.Module, n_train: int) -> Run:
    """Apply the METHOD's adapter to ``model`` (seeded by ``--seed``) and describe the run over ``n_train``
    training examples."""
    kind, _, arg = args.method.partition(":")
    r_max = int(arg) if kind == "lora" else args.r_max
    mode = "lora" if kind == "lora" else "rowwise"
    torch.manual_seed(args.seed)
    rank_weights = args.rank_weights if args.rank_weights in ("uniform", "half_max") else \
        [int(w) for w in args.rank_weights.split(",")]
    extra = {} if mode == "lora" else {"rank_weights": rank_weights}
    if args.layer_draws != "none":
        extra["layer_draws"] = args.layer_draws
    if kind == "paired":
        extra = {"max_pass": True, "distill": float(arg)}
    cb = MatryoshkaLoRA(r_max=r_max, mode=mode, scaling=args.scaling, verbose=False, save_adapter=False,
                        rank_eval=None, seed=args.seed, init="shared", **extra)  # the study's initialisation
    cb.apply(model)
    ranks = list(cb.config.ranks)
    weights = [float(w) for w in (arg if kind == "weighted" else (args.weights or "")).split(",") if w] \
        or [1.0] * len(ranks)
    if len(weights) != len(ranks):
        raise SystemExit(f"--weights needs {len(ranks)} values")
    total = int(round(args.epochs * math.ceil(n_train / BATCH)))
    switch = int(round(float(arg) * total)) if kind == "svd" else 0
    return Run(kind, arg, r_max, ranks, weights, total, switch, args.seed)


def batch_loss(run: Run, model: torch.nn.Module, b: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    """The training loss of one step of ``run`` on batch ``b``."""
    rows = b["input_ids"].shape[0]
    off = int(torch.randint(rows, (1,), generator=torch.Generator().manual_seed(run.seed * 7919 + step)))
    kind = run.kind
    if kind == "lora" or (kind == "svd" and step < run.switch):
        set_rank(model, run.r_max if kind == "svd" else None)
        return model(**b).loss
    if kind in ("rowwise", "weighted", "svd"):
        if run.weights == [1.0] * len(run.ranks):
            set_rank(model, None)
            begin_step(model, step)
        else:
            set_rank(model, row_ranks(run.ranks, run.weights, rows, off))
        return model(**b).loss
    if kind == "paired":
        begin_step(model, step)
        return paired_loss(model, lambda: model(**b).loss)
    if kind in ("dual", "distill", "distillall"):
        low = [r for r in run.ranks if r < run.r_max]
        set_rank(model, run.r_max)
        out_hi = model(**b)
        set_rank(model, row_ranks(low, [1.0] * len(low), rows, off))
        out_lo = model(**b)
        loss = out_hi.loss + out_lo.loss
        if kind == "distill":  # KL on the answer tokens
            m = (b["labels"][:, 1:] != -100)
            t = F.log_softmax(out_hi.logits[:, :-1].detach(), -1)[m]
            s = F.log_softmax(out_lo.logits[:, :-1], -1)[m]
            loss = loss + float(run.arg) * F.kl_div(s, t, log_target=True, reduction="batchmean")
        elif kind == "distillall":  # KL on every position
            t = F.log_softmax(out_hi.logits.detach(), -1).flatten(0, -2)
            s = F.log_softmax(out_lo.logits, -1).flatten(0, -2)
            loss = loss + float(run.arg) * F.kl_div(s, t, log_target=True, reduction="batchmean")
        return loss
    raise SystemExit(f"unknown method {kind}:{run.arg}" if run.arg else f"unknown method {kind}")


def train(run: Run, args: argparse.Namespace, model: torch.nn.Module, train_set: list, pad_id: int) -> float:
    """Train ``run.total`` steps (svd: re-order the layers at ``run.switch``); returns the seconds it took."""
    params = [p for p in model.parameters() if p.requires_grad]

    def new_opt(lr, n):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        return opt, warmup_linear_decay(opt, n, max(1, int(WARMUP_RATIO * n)))

    svd = run.kind == "svd"
    opt, sched = new_opt(args.lr, run.switch if svd and not args.one_schedule else run.total)
    g = torch.Generator().manual_seed(run.seed)
    step, t0 = 0, time.time()
    while step < run.total:
        for idx in torch.randperm(len(train_set), generator=g).split(BATCH):
            loss = batch_loss(run, model, collate([train_set[j] for j in idx], pad_id), step)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if svd and step == run.switch:
                reorder_by_svd(model)
                if args.one_schedule:
                    opt.state.clear()
                else:
                    opt, sched = new_opt(args.lr2 or args.lr, run.total - run.switch)
            if step >= run.total:
                break
    set_rank(model, None)
    return time.time() - t0


def evaluate(model: torch.nn.Module, val: list, tokenizer, r_max: int, num_generate: int) -> dict[int, dict]:
    """Per eval rank up to ``r_max``: exact match on the first ``num_generate`` validation examples and
    answer-token accuracy on all of them (%, rounded to 0.01)."""
    model.eval()
    batch = collate(val, tokenizer.pad_token_id)
    result = {}
    for k in [k for k in EVAL_RANKS if k <= r_max]:
        with torch.no_grad(), at_rank(model, k):
            acc = token_accuracy(model, batch)
            em = exact_match(model, val[:num_generate], tokenizer)
        result[k] = {"exact_match": round(em, 2), "token_acc": round(acc, 2)}
    return result


def main() -> None:
    if sys.argv[1:2] and sys.argv[1] in ("summary", "table", "plot"):
        report(sys.argv[1])
        return
    args = parse_run(sys.argv[1:])
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = load_task()
    tok = data.tokenizer
    model = load_base()
    model.train()
    train_set = data.splits["train"]
    run = prepare_run(args, model, len(train_set))
    train_s = train(run, args, model, train_set, tok.pad_token_id)
    result = evaluate(model, data.splits["val"], tok, run.r_max, args.num_generate)
    ks = sorted(result)
    rec = {"method": args.method, "scaling": args.scaling, "weights": args.weights, "rank_weights": args.rank_weights,
           "lr": args.lr, "lr2": args.lr2, "one_schedule": args.one_schedule, "seed": args.seed,
           "epochs": args.epochs, "steps": run.total, "passes": run.total * passes_per_step(args.method),
           "r_max": run.r_max, "curve": {str(k): result[k] for k in ks},
           "aurac_log2_em": round(aurac(ks, [result[k]["exact_match"] for k in ks]), 2),
           "aurac_log2_tok": round(aurac(ks, [result[k]["token_acc"] for k in ks]), 2),
           "train_seconds": round(train_s, 1), "tag": args.tag,
           "command": "python recipes/encode_study.py " + " ".join(sys.argv[1:])}
    line = json.dumps(rec)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
