"""``matlora`` / ``python -m lightning_matlora``: inspect a saved nested adapter, export a rank, merge a rank."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .quiet import quiet_known_noise

DESCRIPTION = """\
Work with a nested (MatryoshkaLoRA) adapter saved by save_adapter() or by the MatryoshkaLoRA callback
(a directory with matlora_config.json and adapter_model.safetensors; by default the callback writes it to
lightning_logs/version_N/matlora_adapter, or matlora_adapter/version_N without a logger, at the end of fit).
Errors print one line naming the file and the problem and exit with status 2.
--overwrite replaces only a directory that lightning_matlora wrote (an adapter, an export, a merged model);
a base model is checked against the adapter before it is loaded.

  matlora info    ADAPTER                                 settings, layers and the measured rank curve
  matlora export  ADAPTER --rank K --out DIR              rank K as a standard PEFT LoRA adapter
  matlora export  ADAPTER --rank all --out DIR            one PEFT adapter per train rank, DIR/rank_<k>/
  matlora export  ADAPTER --rank-pattern PLAN --out DIR   a rank per layer (PEFT rank_pattern) from a plan
  matlora allocate ADAPTER --base MODEL --data FILE --budget N|rank:K --out PLAN
                                                          a rank per layer within N adapter parameters
  matlora merge   ADAPTER --base MODEL --rank K --out DIR  a plain transformers model with rank K merged in
  matlora nest    PEFT_ADAPTER --base MODEL --out DIR     a PEFT LoRA adapter reordered by SVD into a nested one
                  [--data FILE] [--num-threads N]         (and its loss per rank on FILE, with N CPU threads)

An exported adapter loads with peft.PeftModel.from_pretrained(base, DIR) or any server that reads PEFT
adapters; a merged model loads with transformers.AutoModelForCausalLM.from_pretrained(DIR).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matlora", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def add_info(sub: Any) -> None:
    info = sub.add_parser("info", help="show an adapter's settings, layers and stored rank curve",
                          description="Print the adapter's configuration, train ranks, adapted layers, base model and "
                                      "the measured rank curve (score per rank, AURAC) if the run stored one.")
    info.add_argument("adapter", metavar="ADAPTER", help="a saved adapter directory")
    info.add_argument("--plan", metavar="PLAN", default=None,
                      help="a rank plan (from `matlora allocate`): show its parameter count beside the uniform ranks'")


def add_export(sub: Any) -> None:
    export = sub.add_parser("export", help="write rank K as a standard PEFT LoRA adapter",
                            description="Write rank K of the nested adapter as a PEFT LoRA adapter (adapter_config.json "
                                        "with r=K, adapter_model.safetensors). No base model is needed. With "
                                        "--rank all, one adapter per train rank goes to OUT/rank_<k>/ with a README.md "
                                        "card giving the measured score at that rank.")
    export.add_argument("adapter", metavar="ADAPTER", help="a saved adapter directory")
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--rank", metavar="K|all",
                       help="rank to export, 1 ≤ K ≤ r_max (need not be a train rank), or 'all' for every train rank")
    which.add_argument("--rank-pattern", metavar="PLAN", default=None,
                       help="a rank per layer: a plan file written by `matlora allocate` (or a JSON object of layer "
                            "names or patterns to ranks); written as PEFT's r plus rank_pattern/alpha_pattern")
    export.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace DIR if it holds an export, merged model or adapter this library wrote")
    export.add_argument("--base", metavar="MODEL", default=None,
                        help="check the adapter against this base model (a local directory or hub name; its weights "
                             "are not loaded) and record it as base_model_name_or_path")
    export.add_argument("--base-name", metavar="NAME", default=None,
                        help="base_model_name_or_path to record in the PEFT adapter (a hub name, or a path valid where "
                             "it is used); default: --base if given, else the base recorded in the adapter, as it was "
                             "given at training")
    export.add_argument("--fold-scale", action="store_true",
                        help="fold the rank scale into lora_B (lora_alpha = r, no use_rslora) for servers that ignore "
                             "use_rslora")


def add_merge(sub: Any) -> None:
    merge = sub.add_parser("merge", help="write a transformers model with rank K merged into the base",
                           description="Merge rank K into the base weights and save a plain transformers model "
                                       "(save_pretrained) that loads without lightning_matlora.")
    merge.add_argument("adapter", metavar="ADAPTER", help="a saved adapter directory")
    merge.add_argument("--base", metavar="MODEL", default=None,
                       help="base model: a local directory or hub name (default: the base recorded in the adapter)")
    merge.add_argument("--rank", required=True, type=int, metavar="K", help="rank to merge, 1 ≤ K ≤ r_max")
    merge.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace DIR if it holds a merged model, export or adapter this library wrote")


def format_info(path: str, plan: str | None = None) -> str:
    """The text ``matlora info`` prints: settings, layers, and every recorded rank curve with its AURAC; with
    ``plan`` (a rank plan file), the plan's parameter count beside the uniform ranks'."""
    from .adapter_format import read_adapter

    a = read_adapter(path)
    c = a.config
    kinds: dict[str, int] = {}
    for name in a.layers:
        suffix = name.rsplit(".", 1)[-1]
        kinds[suffix] = kinds.get(suffix, 0) + 1
    numel = sum(t.numel() for t in a.tensors.values())
    lines = [
        f"MatryoshkaLoRA adapter: {path}",
        f"  base model      {a.base_model_name_or_path or 'unknown'} ({a.base_model_class or 'class unknown'})",
        f"  r_max           {c.r_max}",
        f"  train ranks     {c.ranks}",
        f"  eval ranks      {c.eval_ranks}",
        f"  mode            {c.mode}",
        f"  rank_scale      {c.rank_scale}   scaling {c.scaling}   alpha {c.alpha:g}   dropout {c.dropout:g}",
        f"  targets         {c.target_modules!r}   exclude {c.exclude_modules!r}",
        f"  layers          {len(a.layers)} (" + ", ".join(f"{k} ×{v}" for k, v in sorted(kinds.items())) + ")",
        f"  modules_to_save {a.saved_modules or 'none'}",
        f"  parameters      {numel:,} at r_max",
        f"  written by      lightning_matlora {a.library_version}",
    ]
    if not a.curves:
        lines += ["", "  No measured rank curve stored (the run did not evaluate ranks)."]
    for curve in a.curves:
        width = max(len(curve.metric), 5)
        better = "higher" if curve.higher_is_better else "lower"
        lines += ["", f"  Measured rank curve: {curve.metric} ({better} is better)", f"  {'rank':>6}  {curve.metric:>{width}}"]
        lines += [f"  {r:>6}  {s:>{width}.4f}" for r, s in zip(curve.ranks, curve.scores)]
        lines.append(f"  AURAC  {curve.aurac():.4f}")
    if a.metadata:
        lines += ["", "  metadata " + ", ".join(f"{k}={v!r}" for k, v in sorted(a.metadata.items()))]
    if plan is not None:
        lines += ["", *format_plan_sizes(a, plan)]
    return "\n".join(lines)


def format_plan_sizes(adapter: Any, plan: str) -> list[str]:
    """Lines comparing a rank plan's adapter parameters with the uniform ranks' (the plan is checked first)."""
    from .layer_ranks import resolve_layer_ranks
    from .rank_plan import plan_parameters, read_plan

    ranks = resolve_layer_ranks(sorted(adapter.layers), read_plan(plan), adapter.r_max)
    n = plan_parameters(adapter, ranks)
    lines = [f"  Rank plan {plan}: ranks {min(ranks.values())}…{max(ranks.values())}, {n:,} adapter parameters",
             f"  {'rank':>6}  {'parameters':>12}"]
    uniform = sorted(set(adapter.config.ranks) | {adapter.r_max})
    for k in uniform:
        lines.append(f"  {k:>6}  {plan_parameters(adapter, k):>12,}")
    fits = [k for k in uniform if plan_parameters(adapter, k) <= n]
    if fits:
        lines.append(f"  the plan is the size of uniform rank {fits[-1]}" if plan_parameters(adapter, fits[-1]) == n
                     else f"  the plan's size lies between uniform rank {fits[-1]} and the next rank")
    return lines


def run_info(args: argparse.Namespace) -> str:
    return format_info(args.adapter, args.plan)


def run_export(args: argparse.Namespace) -> str:
    from .export import export_peft

    rank: Any = args.rank
    if args.rank_pattern is not None:
        from .rank_plan import read_plan

        rank = read_plan(args.rank_pattern)
    out = export_peft(args.adapter, args.out, rank=rank, overwrite=args.overwrite, fold_scale=args.fold_scale,
                      base=args.base, base_name=args.base_name)
    what = ("a rank per layer (rank_pattern)" if args.rank_pattern is not None else
            "one PEFT adapter per train rank" if args.rank.strip().lower() == "all" else f"rank {args.rank}")
    return f"Wrote {what} to {out}"


def add_allocate(sub: Any) -> None:
    allocate = sub.add_parser("allocate", help="choose a rank per layer within a parameter budget",
                              description="Measure the loss on FILE with each group of layers (by module type) cut "
                                          "to each train rank, choose a rank per layer within the budget (greedy "
                                          "by loss decrease per parameter, checked against the best uniform rank "
                                          "that fits) and write the plan as JSON. `matlora export --rank-pattern "
                                          "PLAN` exports it; `matlora info ADAPTER --plan PLAN` shows its size.")
    allocate.add_argument("adapter", metavar="ADAPTER", help="a saved adapter directory")
    allocate.add_argument("--base", metavar="MODEL", default=None,
                          help="base model: a local directory or hub name (default: the base recorded in the adapter)")
    allocate.add_argument("--data", required=True, metavar="FILE",
                          help="JSON Lines rows ({\"text\"}, {\"question\", \"answer\"} or {\"prompt\", "
                               "\"completion\"}) to measure the loss on")
    allocate.add_argument("--budget", required=True, metavar="N|rank:K",
                          help="adapter parameters (Σ k·(in + out) over the layers), or rank:K for the size of rank K "
                               "everywhere")
    allocate.add_argument("--out", required=True, metavar="PLAN", help="the plan file to write (JSON)")
    allocate.add_argument("--group", choices=("type", "block", "layer"), default="type",
                          help="layers sharing one rank (default: type, e.g. every q_proj)")
    allocate.add_argument("--zero-rank", action="store_true",
                          help="rank 0 is a candidate too: a group may drop its adapter (left out of a PEFT export)")
    allocate.add_argument("--max-rows", type=int, default=64, metavar="N", help="rows of --data used (default 64)")
    allocate.add_argument("--overwrite", action="store_true", help="replace PLAN if it exists")


def run_allocate(args: argparse.Namespace) -> str:
    from pathlib import Path

    from .adapter_format import read_adapter
    from .adapter_load import load_adapter
    from .base_model import load_base, record_of
    from .rank_allocation import allocate_ranks, budget_parameters
    from .rank_plan import adapter_dims, plan_document, plan_parameters, write_plan
    from .text_loss import encode_rows, load_tokenizer, loss_batches, read_rows

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists: choose another --out, or pass --overwrite to replace it.")
    if out.exists() and out.is_dir():
        raise ValueError(f"{out} is a directory: --out names the plan file to write.")
    if args.max_rows < 1:
        raise ValueError(f"--max-rows must be ≥ 1, got {args.max_rows}.")
    adapter = read_adapter(args.adapter)
    budget = budget_parameters(args.budget, adapter_dims(adapter), adapter.r_max)  # before any model is loaded
    base = args.base or adapter.base_model_name_or_path
    if not base:
        raise ValueError("The adapter does not record its base model: pass --base MODEL.")
    rows = read_rows(args.data, args.max_rows)
    tok = load_tokenizer(base)
    batches = loss_batches(encode_rows(rows, tok), pad_id=tok.pad_token_id or 0)
    model = load_adapter(load_base(base, record_of(adapter)), adapter).eval()
    candidates = [0, *adapter.config.ranks] if args.zero_rank else None
    ranks = allocate_ranks(model, budget, batches, group=args.group, candidates=candidates)
    n = plan_parameters(adapter, ranks)
    write_plan(out, plan_document(ranks, adapter.r_max, n, budget=budget, metric="loss"))
    return (f"Wrote a rank plan ({n:,} adapter parameters within a budget of {budget:,}; ranks "
            f"{min(ranks.values())}…{max(ranks.values())}) to {out}")


def run_merge(args: argparse.Namespace) -> str:
    from .export import merge_to_base

    out = merge_to_base(args.adapter, args.out, rank=args.rank, base=args.base, overwrite=args.overwrite)
    return f"Wrote a transformers model with rank {args.rank} merged to {out}"


def add_nest(sub: Any) -> None:
    nest = sub.add_parser("nest", help="turn a PEFT LoRA adapter into a nested adapter (SVD, exact at r_max)",
                          description="Reorder every layer of a standard PEFT LoRA adapter by the SVD of its update, so "
                                      "that rank K of the result is each layer's best rank-K approximation and rank "
                                      "r_max is the PEFT adapter itself; save it as a nested adapter that `matlora "
                                      "export --rank K` turns back into PEFT at any rank. Refuses DoRA, LoRA biases, "
                                      "embedding LoRA and other PEFT methods.")
    nest.add_argument("adapter", metavar="PEFT_ADAPTER",
                      help="a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors)")
    nest.add_argument("--base", metavar="MODEL", default=None,
                      help="base model: a local directory or hub name (default: the adapter's base_model_name_or_path)")
    nest.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    nest.add_argument("--data", metavar="FILE", default=None,
                      help="JSON Lines rows ({\"text\"}, {\"question\", \"answer\"} or {\"prompt\", \"completion\"}): "
                           "measure the mean loss at each rank, before and after nesting, and store it")
    nest.add_argument("--ranks", metavar="K,K,...", default=None,
                      help="ranks to measure (default: powers of two up to r_max, and r_max)")
    nest.add_argument("--max-rows", type=int, default=256, metavar="N", help="rows of --data used, N ≥ 1 (default 256)")
    nest.add_argument("--overwrite", action="store_true", help="replace DIR if it holds an adapter")
    nest.add_argument("--num-threads", type=int, default=None, metavar="N",
                      help="CPU threads of torch for --data's loss (default: torch's choice, one per core). On a "
                           "machine whose cores are busy with other work, 1 avoids a many-fold slowdown")


def run_nest(args: argparse.Namespace) -> str:
    from .nest_peft import nest_adapter

    ranks = None
    if args.ranks is not None:  # an empty --ranks is refused by nest_adapter, not taken as the default
        try:
            ranks = [int(r) for r in args.ranks.split(",")] if args.ranks.strip() else []
        except ValueError:
            raise ValueError(f"--ranks must be comma-separated integers such as 1,2,4,8, got {args.ranks!r}.") \
                from None
    if args.num_threads is not None:
        if args.num_threads < 1:
            raise ValueError(f"--num-threads must be ≥ 1 (or left out for torch's choice), got {args.num_threads}.")
        import torch

        torch.set_num_threads(args.num_threads)
    result = nest_adapter(args.adapter, args.base, args.out, eval_data=args.data, eval_ranks=ranks,
                          max_rows=args.max_rows, overwrite=args.overwrite)
    lines = [f"Wrote the nested adapter (r_max={result.report.r_max}) to {result.path}", str(result.report)]
    if result.curve is not None:
        lines.append("rank  loss (nested)  loss (LoRA truncated)")
        lines += [f"{k:>4}  {v:>13.4f}  {result.unnested_curve[k]:>20.4f}" for k, v in result.curve.items()]
    lines.append(f"Export a rank with `matlora export {result.path} --rank K --out DIR`.")
    return "\n".join(lines)


#: subcommand → (adds its parser, runs it and returns what to print); a new subcommand is one more entry
COMMANDS: dict[str, tuple[Callable[[Any], None], Callable[[argparse.Namespace], str]]] = {
    "info": (add_info, run_info), "export": (add_export, run_export), "merge": (add_merge, run_merge),
    "nest": (add_nest, run_nest), "allocate": (add_allocate, run_allocate)}


def error_line(command: str, err: BaseException, path: str | None) -> str:
    """One line for stderr: the command, the file (when the message does not name it) and the problem."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split()) or type(err).__name__
    if not isinstance(err, (ValueError, OSError)):  # not one of ours: say what it was and which adapter it concerns
        text = f"{type(err).__name__}: {text}"
        if path and path not in text:
            text = f"{path}: {text}"
    return f"matlora {command}: error: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``matlora``; returns the exit status: 0 done, 2 bad usage or a bad input (one line on
    stderr naming the file and the problem, never a traceback)."""
    quiet_known_noise()
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        print(COMMANDS[args.command][1](args))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - the command line reports every failure as one line
        print(error_line(args.command, e, getattr(args, "adapter", None)), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
