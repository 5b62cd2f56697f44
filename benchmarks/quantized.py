"""Peak memory and training step time on a 4-bit base against a float base and against PEFT's QLoRA, in one run.

One Llama base (built offline from a config, written once with ``save_pretrained``) is loaded three ways, each in
its own subprocess so that each peak is its own:

    float        the float base (``--dtype``) + MatryoshkaLoRA (all seven projections, r_max=R, mode="rowwise")
    nf4          the same base loaded with BitsAndBytesConfig(load_in_4bit=True, nf4, double quantization,
                 compute dtype ``--dtype``) + MatryoshkaLoRA, same settings
    peft-qlora   the same 4-bit base + PEFT LoRA r=R on the same projections (QLoRA)

One step = forward, backward, AdamW step on the adapter. Reported per variant: the frozen base's weight memory
(for the 4-bit bases: codes + quantization state), the peak memory during the training steps (CPU: the process's
peak resident set, reset after loading with /proc/self/clear_refs so that the float weights read while quantizing
at load time do not count; CUDA: ``torch.cuda.max_memory_allocated``, reset after loading), and the median step time.

Usage::

    python benchmarks/quantized.py                                  # CPU float32, ~20M-parameter Llama
    python benchmarks/quantized.py --device cuda --dtype bfloat16 --hidden 2048 --inter 8192 --layers 16 \\
        --heads 32 --kv-heads 8 --vocab 128256 --batch 8 --seq 1024  # GPU (Llama-3.2-1B's shape)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time

import torch
# before lightning_matlora (which loads transformers): importing harness switches the hub off
from harness import (TARGETS, llama_config, print_result, random_llama, random_tokens, reset_peak_rss, rss_kib,
                     run_worker)

VARIANTS = ("float", "nf4", "peft-qlora")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--base-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------- worker
def load(a: argparse.Namespace, variant: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, a.dtype)
    if variant == "float":
        return AutoModelForCausalLM.from_pretrained(a.base_dir, dtype=dtype).to(a.device)
    from lightning_matlora.quantized import quantization_config

    return AutoModelForCausalLM.from_pretrained(a.base_dir, dtype=dtype, device_map={"": a.device},
                                                quantization_config=quantization_config("nf4", compute_dtype=dtype))


def adapt(model: torch.nn.Module, a: argparse.Namespace, variant: str) -> torch.nn.Module:
    if variant == "peft-qlora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.r, target_modules=TARGETS, lora_dropout=0.0))
    from lightning_matlora import MatryoshkaLoRA

    MatryoshkaLoRA(r_max=a.r, target_modules=TARGETS, mode="rowwise", verbose=False).apply(model)
    return model


def worker(a: argparse.Namespace) -> dict:
    from lightning_matlora import begin_step
    from lightning_matlora.quantized import base_memory

    torch.manual_seed(0)
    model = adapt(load(a, a.worker), a, a.worker)
    model.train()
    frozen = base_memory(model)
    if frozen is not None:
        base_bytes = frozen.total_bytes
    else:
        base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        base_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = random_tokens(a.vocab, a.batch, a.seq, seed=1, device=a.device)
    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    rss_before = rss_kib("VmRSS")
    times = []
    for step in range(a.warmup + a.reps):
        if a.worker != "peft-qlora":
            begin_step(model, step)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    out = {"variant": a.worker, "step_s": statistics.median(times), "base_mib": base_bytes / 2**20,
           "trainable": sum(p.numel() for p in params), "loss": float(loss)}
    if cuda:
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mib"] = rss_kib("VmHWM") / 1024
        out["rss_before_mib"] = rss_before / 1024
    return out


# --------------------------------------------------------------------------------------------------- main
def write_base(a: argparse.Namespace, path: str) -> int:
    config = llama_config(vocab=a.vocab, hidden=a.hidden, inter=a.inter, layers=a.layers, heads=a.heads,
                          kv_heads=a.kv_heads, max_positions=max(128, a.seq))
    model = random_llama(config, getattr(torch, a.dtype))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse(argv)
    if a.worker:
        print_result(worker(a))
        return []
    with tempfile.TemporaryDirectory(prefix="matlora-quant-bench-") as d:
        n = write_base(a, d)
        own_args = argv if argv is not None else sys.argv[1:]
        rows = [run_worker(__file__, ["--worker", variant, "--base-dir", d, *own_args]) for variant in a.variants]
    peak = "peak memory during training (MiB" + (", max allocated)" if a.device.startswith("cuda") else
                                                  ", peak RSS of the process)")
    print(f"Llama {n / 1e6:.1f}M parameters (hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}); "
          f"batch {a.batch} × "
          f"{a.seq} tokens; r={a.r} on {', '.join(TARGETS)}; {a.device} {a.dtype}; torch {torch.__version__}; "
          f"{platform.processor() or platform.machine()}; median of {a.reps} steps after {a.warmup} warm-up")
    print()
    cpu = not a.device.startswith("cuda")
    extra = " RSS after loading (MiB) |" if cpu else ""
    grow = " peak − RSS after loading (MiB) |" if cpu else ""
    print(f"| variant | frozen base weights (MiB) |{extra} {peak} |{grow} step time (s) | trainable parameters |")
    print("| --- | ---: |" + (" ---: | ---: |" if cpu else "") + " ---: | ---: | ---: |")
    for r in rows:
        before = (f" {r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} | {r['peak_mib'] - r['rss_before_mib']:.0f} |"
                  if cpu else f" {r['peak_mib']:.0f} |")
        print(f"| {r['variant']} | {r['base_mib']:.1f} |{before} {r['step_s']:.3f} | {r['trainable']:,} |")
    by = {r["variant"]: r for r in rows}
    if "nf4" in by and "float" in by:
        print(f"\nnf4 / float: base weights ×{by['nf4']['base_mib'] / by['float']['base_mib']:.2f}, peak memory "
              f"×{by['nf4']['peak_mib'] / by['float']['peak_mib']:.2f}, step time "
              f"×{by['nf4']['step_s'] / by['float']['step_s']:.2f}")
    if "nf4" in by and "peft-qlora" in by:
        ratio = by['nf4']['peak_mib'] / by['peft-qlora']['peak_mib']
        print(f"nf4 (MatryoshkaLoRA) / PEFT QLoRA: peak memory ×{ratio:.2f}, "
              f"step time ×{by['nf4']['step_s'] / by['peft-qlora']['step_s']:.2f}")
    return rows


if __name__ == "__main__":
    main()
