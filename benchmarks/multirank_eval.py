"""Evaluate K ranks of a nested adapter: K sequential passes against one mixed-rank pass.

Same model, same data, one process. For each batch size B the two ways of getting every eval rank's per-row
loss are timed in interleaved repetitions (their order alternates every repetition) and the medians compared:

- sequential: for each eval rank k, ``set_rank(model, k)`` and one forward of the B-row batch (K forwards);
- mixed: the batch replicated K times (K·B rows), ``set_rank(model, per_row_ranks)``, one forward.

Both compute the same losses (checked before timing). The mixed pass does the same base-model work as the K
sequential passes (K·B rows in total) plus a rank-r_max adapter on every row, so it can only win where the
sequential passes leave the machine underused (small B, launch/Python overhead); at large B it is expected to be
slower. The script prints both, and the ratio sequential/mixed (> 1: mixed is faster).

    python benchmarks/multirank_eval.py                       # CPU defaults (a few minutes on 2 cores)
    python benchmarks/multirank_eval.py --device cuda --hidden 1024 --layers 8 --batch-sizes 1 4 16 64
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
# before lightning_matlora (which loads transformers): importing harness switches the hub off
from harness import llama_config, random_llama

from lightning_matlora import MatryoshkaLoRA, adapted_layers, default_ranks, set_rank


def build(args: argparse.Namespace) -> torch.nn.Module:
    config = llama_config(vocab=args.vocab, hidden=args.hidden, inter=int(args.hidden * 8 / 3), layers=args.layers,
                          heads=max(1, args.hidden // 64), kv_heads=max(1, args.hidden // 128), max_positions=args.seq)
    model = random_llama(config, getattr(torch, args.dtype)).to(args.device).eval()
    MatryoshkaLoRA(r_max=args.r_max, verbose=False).apply(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero adapter, so that ranks differ as after training
        for layer in adapted_layers(model).values():
            layer.lora_B.copy_((torch.randn(layer.lora_B.shape, generator=g) * 0.02).to(layer.lora_B))
    return model


def per_row_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


def sequential(model: torch.nn.Module, ids: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    out = []
    for k in ranks:
        set_rank(model, k)
        out.append(per_row_loss(model, ids))
    return torch.stack(out)


def mixed(model: torch.nn.Module, ids: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    rows = ids.shape[0]
    set_rank(model, torch.tensor(ranks).repeat_interleave(rows))
    return per_row_loss(model, ids.repeat(len(ranks), 1)).view(len(ranks), rows)


def timed(fn, *args) -> float:
    sync = torch.cuda.synchronize if args[1].is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn(*args)
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r-max", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default torch's); use 1 on a machine shared with other jobs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args)
    ranks = default_ranks(args.r_max)
    g = torch.Generator().manual_seed(2)
    dev = "cpu" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"# multi-rank evaluation: Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab} seq={args.seq}"
          f" {args.dtype}, r_max={args.r_max}, K={len(ranks)} eval ranks {ranks}")
    print(f"# device: {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.machine()}, "
          f"median of {args.reps} interleaved repetitions "
          f"(seq/mixed: ratio of medians; min-ratio: ratio of the fastest runs)")
    print(f"{'batch':>6} {'rows(mixed)':>12} {'sequential ms':>14} {'mixed ms':>10} {'seq/mixed':>10} "
          f"{'min-ratio':>10} {'max |Δloss|':>12}")
    with torch.inference_mode():
        for bs in args.batch_sizes:
            ids = torch.randint(0, args.vocab, (bs, args.seq), generator=g).to(args.device)
            a, b = sequential(model, ids, ranks), mixed(model, ids, ranks)  # warm-up and agreement check
            diff = float((a - b).abs().max())
            tol = 1e-4 if args.dtype == "float32" else 5e-2
            if diff > tol:
                raise SystemExit(f"sequential and mixed losses differ by {diff:.3g} at batch {bs}")
            times = {"sequential": [], "mixed": []}
            for rep in range(args.reps):
                order = ("sequential", "mixed") if rep % 2 == 0 else ("mixed", "sequential")
                for name in order:
                    times[name].append(timed(sequential if name == "sequential" else mixed, model, ids, ranks))
            s, m = statistics.median(times["sequential"]), statistics.median(times["mixed"])
            best = min(times["sequential"]) / min(times["mixed"])  # least disturbed runs: robust on a shared machine
            print(f"{bs:>6} {bs * len(ranks):>12} {1e3 * s:>14.1f} {1e3 * m:>10.1f} {s / m:>10.2f} {best:>10.2f} "
                  f"{diff:>12.2e}", flush=True)
    set_rank(model, None)


if __name__ == "__main__":
    main()
