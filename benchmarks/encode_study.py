"""Nested training against plain LoRA and the per-rank grid on the recipe's Encode task, at equal steps.

    python benchmarks/encode_study.py METHOD --lr 1e-2 --seed 0 [--epochs 6] [--out docs/encode_study_runs.jsonl]
    python benchmarks/encode_study.py summary [--out docs/encode_study_runs.jsonl]   # the markdown table
    python benchmarks/encode_study.py table [--out docs/encode_study_runs.jsonl]  # each method at its chosen lr
    python benchmarks/encode_study.py plot [--out docs/encode_study_runs.jsonl] [--png docs/encode_study_steps.png]

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
                     (``nest_by_svd`` below: each prefix is the layer's best rank-k approximation under the
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
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes"
sys.path.insert(0, str(RECIPES))
sys.path.insert(1, str(HERE.parent))

from lightning_matlora import MatryoshkaLoRA, at_rank, begin_step, paired_loss, set_rank  # noqa: E402
from lightning_matlora.control import controller_of  # noqa: E402
from lightning_matlora.inject import adapted_layers  # noqa: E402
from lightning_matlora.scaling import scale_of_rank  # noqa: E402

EVAL_RANKS = [1, 2, 4, 8, 16]


def log2_aurac(ranks: list[int], vals: list[float]) -> float:
    """AURAC (the trapezoid area over the span, the same formula as :func:`lightning_matlora.aurac`) on log2 k."""
    if len(ranks) == 1:
        return float(vals[0])
    t = [math.log2(k) for k in ranks]
    area = sum((t[i + 1] - t[i]) * (vals[i] + vals[i + 1]) / 2 for i in range(len(t) - 1))
    return area / (t[-1] - t[0])


@torch.no_grad()
def nest_by_svd(model: torch.nn.Module) -> None:
    """The study's prototype (kept so that its ``svd:F`` figures reproduce; the library's
    :func:`lightning_matlora.nesting.nest_by_svd` instead switches a ``sqrt`` adapter to ``scaling="none"`` so that
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


class Schedule:
    def __init__(self, opt, total: int, warmup_ratio: float = 0.05):
        warm = max(1, int(warmup_ratio * total))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))

    def step(self):
        self.sched.step()


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

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    shown = []
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
    for ax, title in zip(axes, ("exact match at r = 1", "exact match at r_max = 16")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training compute (whole-batch forward-backward passes, in epochs)")
        ax.set_ylabel("exact match %")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Encode task, seed 0: accuracy against training compute")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
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
        au = [log2_aurac(sorted(members), [curves[s][k] for k in sorted(members)]) for s in seeds]
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


def main() -> None:
    if sys.argv[1:2] and sys.argv[1] in ("summary", "table", "plot"):
        report(sys.argv[1])
        return
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
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from instruct_data import InstructData
    from instruct_encoding import collate, final_answer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    dm = InstructData(tokenizer=str(RECIPES / "assets" / "base"), max_length=64, batch_size=32)
    dm.setup("fit")
    tok = dm.tokenizer
    model = AutoModelForCausalLM.from_pretrained(str(RECIPES / "assets" / "base"))
    model.train()

    method, _, arg = args.method.partition(":")
    r_max = int(arg) if method == "lora" else args.r_max
    mode = "lora" if method == "lora" else "rowwise"
    torch.manual_seed(args.seed)
    rw = args.rank_weights if args.rank_weights in ("uniform", "half_max") else \
        [int(w) for w in args.rank_weights.split(",")]
    extra = {} if mode == "lora" else {"rank_weights": rw}
    if method == "paired":
        extra = {"max_pass": True, "distill": float(arg)}
    cb = MatryoshkaLoRA(r_max=r_max, mode=mode, scaling=args.scaling, verbose=False, save_adapter=False,
                        rank_eval=None, seed=args.seed, **extra)
    cb.apply(model)
    ranks = list(cb.config.ranks)
    weights = [float(w) for w in (arg if method == "weighted" else (args.weights or "")).split(",") if w] \
        or [1.0] * len(ranks)
    if len(weights) != len(ranks):
        raise SystemExit(f"--weights needs {len(ranks)} values")
    params = [p for p in model.parameters() if p.requires_grad]

    train = dm.splits["train"]
    steps_per_epoch = math.ceil(len(train) / 32)
    total = int(round(args.epochs * steps_per_epoch))
    switch = int(round(float(arg) * total)) if method == "svd" else 0

    def new_opt(lr, n):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        return opt, Schedule(opt, n)

    opt, sched = new_opt(args.lr, switch if method == "svd" and not args.one_schedule else total)
    g = torch.Generator().manual_seed(args.seed)
    step, t0 = 0, time.time()
    low = [r for r in ranks if r < r_max]
    while step < total:
        for idx in torch.randperm(len(train), generator=g).split(32):
            b = collate([train[j] for j in idx], tok.pad_token_id)
            rows = b["input_ids"].shape[0]
            off = int(torch.randint(rows, (1,), generator=torch.Generator().manual_seed(args.seed * 7919 + step)))
            if method == "lora" or (method == "svd" and step < switch):
                set_rank(model, r_max if method == "svd" else None)
                loss = model(**b).loss
            elif method in ("rowwise", "weighted", "svd"):
                if weights == [1.0] * len(ranks):
                    set_rank(model, None)
                    begin_step(model, step)
                else:
                    set_rank(model, row_ranks(ranks, weights, rows, off))
                loss = model(**b).loss
            elif method == "paired":
                begin_step(model, step)
                loss = paired_loss(model, lambda: model(**b).loss)
            elif method in ("dual", "distill", "distillall"):
                set_rank(model, r_max)
                out_hi = model(**b)
                set_rank(model, row_ranks(low, [1.0] * len(low), rows, off))
                out_lo = model(**b)
                loss = out_hi.loss + out_lo.loss
                if method == "distill":
                    m = (b["labels"][:, 1:] != -100)
                    t = F.log_softmax(out_hi.logits[:, :-1].detach(), -1)[m]
                    s = F.log_softmax(out_lo.logits[:, :-1], -1)[m]
                    loss = loss + float(arg) * F.kl_div(s, t, log_target=True, reduction="batchmean")
                elif method == "distillall":
                    t = F.log_softmax(out_hi.logits.detach(), -1).flatten(0, -2)
                    s = F.log_softmax(out_lo.logits, -1).flatten(0, -2)
                    loss = loss + float(arg) * F.kl_div(s, t, log_target=True, reduction="batchmean")
            else:
                raise SystemExit(f"unknown method {args.method}")
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if method == "svd" and step == switch:
                nest_by_svd(model)
                if args.one_schedule:
                    opt.state.clear()
                else:
                    opt, sched = new_opt(args.lr2 or args.lr, total - switch)
            if step >= total:
                break
    set_rank(model, None)
    train_s = time.time() - t0

    model.eval()
    val = dm.splits["val"]
    vb = collate(val, tok.pad_token_id)
    ex = val[:args.num_generate]
    result = {}
    for k in [k for k in EVAL_RANKS if k <= r_max]:
        with torch.no_grad(), at_rank(model, k):
            lg = model(input_ids=vb["input_ids"], attention_mask=vb["attention_mask"]).logits[:, :-1]
            lab = vb["labels"][:, 1:]
            msk = lab != -100
            acc = 100 * float(((lg.argmax(-1) == lab) & msk).sum() / msk.sum())
            hits = 0
            for i in range(0, len(ex), 100):
                chunk = ex[i:i + 100]
                n = max(e.n_prompt for e in chunk)
                ids = torch.full((len(chunk), n), tok.pad_token_id)
                am = torch.zeros_like(ids)
                for j, e in enumerate(chunk):
                    ids[j, n - e.n_prompt:] = torch.tensor(e.input_ids[:e.n_prompt])
                    am[j, n - e.n_prompt:] = 1
                gen = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=12, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                txt = tok.batch_decode(gen[:, n:], skip_special_tokens=True)
                hits += sum(final_answer(t) == e.reference for t, e in zip(txt, chunk))
            em = 100 * hits / len(ex)
        result[k] = {"exact_match": round(em, 2), "token_acc": round(acc, 2)}
    ks = sorted(result)
    rec = {"method": args.method, "scaling": args.scaling, "weights": args.weights, "rank_weights": args.rank_weights, "lr": args.lr,
           "lr2": args.lr2, "one_schedule": args.one_schedule, "seed": args.seed, "epochs": args.epochs, "steps": total,
           "passes": total * passes_per_step(args.method), "r_max": r_max,
           "curve": {str(k): result[k] for k in ks},
           "aurac_log2_em": round(log2_aurac(ks, [result[k]["exact_match"] for k in ks]), 2),
           "aurac_log2_tok": round(log2_aurac(ks, [result[k]["token_acc"] for k in ks]), 2),
           "train_seconds": round(train_s, 1), "tag": args.tag,
           "command": "python benchmarks/encode_study.py " + " ".join(sys.argv[1:])}
    line = json.dumps(rec)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
