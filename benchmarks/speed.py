"""Training and inference cost of MatryoshkaLoRA against PEFT's LoRA, in one run.

Every variant uses the same Llama base built offline from a config (about 20M parameters by default), adapters on
all seven projections (q, k, v, o, gate, up, down), the same batch and dtype. Repetitions are interleaved
(A B C … A B C …) and each ratio is the median of the per-repetition ratios, so drifts in machine load hit every
variant alike. Peak memory of each training variant is measured in its own subprocess.

Training variants (one step = forward, backward, AdamW step on the trainable parameters):

    peft        PEFT LoRA r=R (lora_alpha=R: scale 1; the scale does not change the cost)
    matryoshka  this library, mode="matryoshka", r_max=R (the paper's P)
    lora        this library, mode="lora", r_max=R
    rowwise     this library, mode="rowwise", r_max=R
    dylora      this library, mode="dylora", r_max=R (rank drawn per step: cost varies with the draw)
    floor       no adapter; the input embeddings' output requires grad, so backward runs through every layer
                exactly as deep as with adapters, with nothing to update: the adapters' own cost is the rest.

Inference variants (forward under no_grad, eval mode): ``base`` (no adapter), this library at rank k unmerged for
several k, merged at R, and PEFT unmerged.

Usage::

    python benchmarks/speed.py                       # CPU float32, ~20M-parameter Llama, writes docs/benchmarks.md
    python benchmarks/speed.py --compile             # adds torch.compile variants
    python benchmarks/speed.py --preset 1b --device cuda --dtype bfloat16   # GPU: tokens/s and MFU vs PEFT
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
# before lightning_matlora (which loads transformers): importing harness switches the hub off
from harness import (TARGETS, llama_config, print_result, random_llama, random_tokens, reset_peak_rss, rss_kib,
                     run_worker, write_text)

from lightning_matlora import MatryoshkaLoRA, begin_step, merge, set_rank

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ("peft", "matryoshka", "lora", "rowwise", "dylora", "floor")
PRESETS = {
    # about 20M parameters: the CPU benchmark
    "20m": dict(hidden=512, inter=1376, layers=4, heads=8, kv_heads=8, vocab=8000, batch=4, seq=128),
    # Llama-3.2-1B's shape (1.24B parameters): the GPU benchmark
    "1b": dict(hidden=2048, inter=8192, layers=16, heads=32, kv_heads=8, vocab=128256, batch=8, seq=1024),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16/fp16 tensor-core peaks


# ------------------------------------------------------------------------------------------------------ models
_BASE_STATE: dict = {}


def build(variant: str, a: argparse.Namespace) -> torch.nn.Module:
    """A fresh model for ``variant``, all with the same base weights."""
    config = llama_config(vocab=a.vocab, hidden=a.hidden, inter=a.inter, layers=a.layers, heads=a.heads,
                          kv_heads=a.kv_heads, max_positions=max(2048, a.seq))
    model = random_llama(config, getattr(torch, a.dtype), a.device)
    if "state" not in _BASE_STATE:
        _BASE_STATE["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    else:
        model.load_state_dict(_BASE_STATE["state"])
    for p in model.parameters():
        p.requires_grad_(False)
    kind = variant.split(":")[0]
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.r, target_modules=TARGETS, lora_dropout=0.0))
    elif kind in ("matryoshka", "lora", "rowwise", "dylora", "merged"):
        mode = "matryoshka" if kind == "merged" else kind
        MatryoshkaLoRA(r_max=a.r, target_modules=TARGETS, mode=mode, verbose=False).apply(model)
        with torch.no_grad():  # B ≠ 0 so that nothing is special-cased on zeros (it is not, but be honest)
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 1e-3)
        if kind == "merged":
            model.eval()
            merge(model, a.r)
    return model


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class TrainStep:
    """One optimizer step of ``variant`` on a fixed batch (called repeatedly)."""

    def __init__(self, variant: str, a: argparse.Namespace, compiled: bool = False) -> None:
        self.variant, self.kind = variant, variant.split(":")[0]
        self.model = build(self.kind, a).train()
        self.fwd = torch.compile(self.model) if compiled else self.model
        self.ids = random_tokens(a.vocab, a.batch, a.seq, seed=1, device=a.device)
        params = trainable(self.model)
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        self.step_i = 0
        self.device = a.device

    def __call__(self) -> None:
        if self.kind in ("rowwise", "dylora"):
            begin_step(self.model, self.step_i)
        if self.kind == "floor":  # no parameter trains: the embeddings' output is the leaf that needs a gradient
            emb = self.model.get_input_embeddings()(self.ids).detach().requires_grad_(True)
            loss = self.fwd(inputs_embeds=emb, labels=self.ids).loss
        else:
            loss = self.fwd(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.step_i += 1


class InferStep:
    def __init__(self, variant: str, model: torch.nn.Module, a: argparse.Namespace, rank: int | None = None,
                 compiled: bool = False) -> None:
        self.variant, self.model, self.rank = variant, model.eval(), rank
        self.fwd = torch.compile(model) if compiled else model
        self.ids = random_tokens(a.vocab, a.batch, a.seq, seed=2, device=a.device)

    @torch.no_grad()
    def __call__(self) -> None:
        if self.rank is not None:
            set_rank(self.model, self.rank)
        self.fwd(input_ids=self.ids)


# ------------------------------------------------------------------------------------------------------ timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(steps: dict[str, callable], reps: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each step, measured round-robin (A B C … A B C …) ``reps`` times after ``warmup``."""
    for name in list(steps):  # first call separately: compiles; a variant that cannot run here is dropped
        try:
            steps[name]()
        except Exception as e:  # noqa: BLE001 - e.g. no C++ toolchain for inductor
            print(f"[speed] dropped {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            del steps[name]
    for _ in range(warmup):
        for f in steps.values():
            f()
    _sync(device)
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, f in steps.items():
            _sync(device)
            t = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repetitions of time(a) / time(b) in the same repetition."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


# ------------------------------------------------------------------------------------------------------ memory
def memory_child(variant: str, a: argparse.Namespace) -> dict:
    """Run in a fresh process: build ``variant``, run a few train steps, report its peak memory."""
    torch.set_num_threads(a.threads)
    step = TrainStep(variant, a)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"variant": variant, "peak_mib": peak / 2**20, "increment_mib": (peak - base) / 2**20}
    rss_before = rss_kib("VmRSS") * 1024
    reset_peak_rss()  # the build's transient peak drops out
    for _ in range(3):
        step()
    peak = rss_kib("VmHWM") * 1024
    return {"variant": variant, "peak_mib": peak / 2**20, "increment_mib": (peak - rss_before) / 2**20}


def measure_memory(variants: list[str], a: argparse.Namespace, argv: list[str]) -> dict[str, dict]:
    return {v: run_worker(__file__, [*argv, "--memory-child", v], env={"PYTHONWARNINGS": "ignore"}) for v in variants}


# ------------------------------------------------------------------------------------------------------ FLOPs
def flops_per_token(a: argparse.Namespace, kind: str) -> float:
    """Model FLOPs of one training token: frozen base forward (2·N) + input gradients (2·N) over the matmul
    weights, attention scores (12·layers·seq·hidden for forward and backward), and the adapter's own
    6·r·(in + out) per adapted layer (forward, input and weight gradients)."""
    kvd = a.hidden * a.kv_heads // a.heads
    per_layer = [(a.hidden, a.hidden), (a.hidden, kvd), (a.hidden, kvd), (a.hidden, a.hidden),
                 (a.hidden, a.inter), (a.hidden, a.inter), (a.inter, a.hidden)]
    n_base = a.layers * sum(i * o for i, o in per_layer) + a.hidden * a.vocab  # + lm_head
    base = 4 * n_base + 12 * a.layers * a.seq * a.hidden  # frozen: no weight gradients
    if kind == "floor":
        return base
    return base + a.layers * sum(6 * a.r * (i + o) for i, o in per_layer)


def peak_flops(a: argparse.Namespace) -> float | None:
    if not a.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


# ------------------------------------------------------------------------------------------------------ report
def machine(a: argparse.Namespace) -> str:
    if a.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {a.dtype}"
    cpu = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{a.dtype}; load average at start {os.getloadavg()[0]:.1f}")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="20m")
    for k in ("hidden", "inter", "layers", "heads", "kv_heads", "vocab", "batch", "seq"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, help="override the preset")
    ap.add_argument("--r", type=int, default=64, help="adapter rank (r_max, PEFT's r)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 32, 64], help="inference ranks (unmerged)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd train and inference steps")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_table.md"),
                    help="Markdown table written here ('-' for none)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def time_training(a: argparse.Namespace) -> tuple[dict[str, list[float]], int, dict[str, int]]:
    """Seconds per training step of every variant (interleaved), the base's parameter count, and each variant's
    trainable parameter count."""
    train = {v: TrainStep(v, a) for v in TRAIN}
    if a.compile:
        for v in ("peft", "matryoshka", "floor"):
            train[v + "+compile"] = TrainStep(v, a, compiled=True)
    times = interleaved(train, a.reps, a.warmup, a.device)
    n_params = sum(p.numel() for p in train["floor"].model.parameters())
    n_adapter = {v: sum(p.numel() for p in trainable(s.model)) for v, s in train.items()}
    return times, n_params, n_adapter


def time_inference(a: argparse.Namespace, ranks: list[int]) -> dict[str, list[float]]:
    """Seconds per inference forward of every variant (interleaved): base, each rank unmerged, merged, PEFT."""
    mat = build("matryoshka", a)
    peft_model = build("peft", a)
    infer = {"base": InferStep("base", build("base", a), a)}
    for k in ranks:
        infer[f"rank {k}"] = InferStep(f"rank {k}", mat, a, rank=k)
    infer["merged"] = InferStep("merged", build("merged", a), a)
    infer["peft"] = InferStep("peft", peft_model, a)
    if a.compile:
        infer["base+compile"] = InferStep("base+compile", build("base", a), a, compiled=True)
        infer["merged+compile"] = InferStep("merged+compile", build("merged", a), a, compiled=True)
        infer[f"rank {a.r}+compile"] = InferStep("c", build("matryoshka", a), a, rank=a.r, compiled=True)
    return interleaved(infer, a.reps, a.warmup, a.device)


def training_table(a: argparse.Namespace, t_train: dict[str, list[float]]) -> list[str]:
    tokens = a.batch * a.seq
    pf = peak_flops(a)
    hdr = "| variant | median ms | tokens/s | × PEFT | × floor | model TFLOP/step |" + (" MFU |" if pf else "")
    lines = ["Training step (forward + backward + AdamW):", "", hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for v, ts in t_train.items():
        kind = v.split("+")[0]
        if kind not in t_train:
            continue
        med = statistics.median(ts)
        fl = flops_per_token(a, kind) * tokens
        row = (f"| {v} | {1000 * med:.1f} | {tokens / med:,.0f} | {ratio(t_train, v, 'peft'):.3f} | "
               f"{ratio(t_train, v, 'floor'):.3f} | {fl / 1e12:.3f} |")
        if pf:
            row += f" {100 * fl / med / pf:.1f}% |"
        lines.append(row)
    fl_ratio = flops_per_token(a, "matryoshka") / flops_per_token(a, "floor")
    return lines + ["", f"Adapter FLOPs over the floor: {fl_ratio:.3f}× (the time ratio matryoshka/floor above is the "
                        f"measured counterpart)."]


def inference_table(t_inf: dict[str, list[float]]) -> list[str]:
    lines = ["Inference forward (no_grad):", "", "| variant | median ms | × base | × PEFT unmerged |",
             "|---|---|---|---|"]
    for v, ts in t_inf.items():
        lines.append(f"| {v} | {1000 * statistics.median(ts):.1f} | {ratio(t_inf, v, 'base'):.3f} | "
                     f"{ratio(t_inf, v, 'peft'):.3f} |")
    return lines


def memory_table(a: argparse.Namespace, mem: dict[str, dict]) -> list[str]:
    unit = ("CUDA max_memory_allocated" if a.device.startswith("cuda")
            else "peak RSS (VmHWM, reset after the model is built)")
    lines = [f"Peak memory of 3 training steps, each variant in its own process ({unit}); increment = peak "
             f"minus the memory held before the first step:", "",
             "| variant | peak MiB | increment MiB | peak × PEFT | increment × PEFT |", "|---|---|---|---|---|"]
    for v, m in mem.items():
        lines.append(f"| {v} | {m['peak_mib']:.0f} | {m['increment_mib']:.0f} | "
                     f"{m['peak_mib'] / mem['peft']['peak_mib']:.3f} | "
                     f"{m['increment_mib'] / max(mem['peft']['increment_mib'], 1e-9):.3f} |")
    return lines


def targets_table(t_train: dict[str, list[float]], t_inf: dict[str, list[float]], mem: dict[str, dict]) -> list[str]:
    checks = [
        ("train step matryoshka / PEFT", ratio(t_train, "matryoshka", "peft"), 0.95),
        ("train step matryoshka / lora", ratio(t_train, "matryoshka", "lora"), 1.02),
        ("train step rowwise / matryoshka", ratio(t_train, "rowwise", "matryoshka"), 1.05),
        ("inference merged / base", ratio(t_inf, "merged", "base"), 1.01),
    ]
    if mem:
        checks.append(("peak memory matryoshka / PEFT", mem["matryoshka"]["peak_mib"] / mem["peft"]["peak_mib"], 1.0))
    lines = ["Targets:", "", "| ratio | measured | target | met |", "|---|---|---|---|"]
    for name, val, tgt in checks:
        lines.append(f"| {name} | {val:.3f} | ≤ {tgt:.2f} | {'yes' if val <= tgt else 'NO'} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.threads = torch.get_num_threads()
    if a.memory_child:
        print_result(memory_child(a.memory_child, a))
        return
    ranks = [k for k in a.ranks if 1 <= k <= a.r]
    t_start = time.time()
    mach = machine(a)
    print(f"[speed] {mach}", flush=True)
    t_train, n_params, n_adapter = time_training(a)
    t_inf = time_inference(a, ranks)
    mem = {} if a.no_memory else measure_memory(["peft", "matryoshka", "lora", "rowwise", "floor"], a,
                                                [x for x in argv if x != "--compile"])

    lines = [f"Model: Llama, hidden {a.hidden}, intermediate {a.inter}, {a.layers} layers, {a.heads} heads "
             f"({a.kv_heads} KV), vocabulary {a.vocab}: {n_params / 1e6:.1f}M parameters; adapters r={a.r} on "
             f"{', '.join(TARGETS)} ({n_adapter['matryoshka'] / 1e6:.2f}M trainable; PEFT "
             f"{n_adapter['peft'] / 1e6:.2f}M). Batch {a.batch} × {a.seq} tokens, {a.dtype} on {a.device}; "
             f"{a.reps} interleaved repetitions after {a.warmup} warm-up; ratios are medians of per-repetition "
             f"ratios.", ""]
    lines += training_table(a, t_train) + [""] + inference_table(t_inf)
    if mem:
        lines += [""] + memory_table(a, mem)
    lines += [""] + targets_table(t_train, t_inf, mem)
    lines += ["", f"Command: `python benchmarks/speed.py {' '.join(argv)}`  ",
              f"Machine: {mach}; wall time {time.time() - t_start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out != "-":
        write_text(a.out, text)


if __name__ == "__main__":
    main()
