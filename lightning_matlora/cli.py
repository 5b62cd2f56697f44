"""``matlora`` / ``python -m lightning_matlora``: inspect a saved nested adapter, export a rank, merge a rank."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DESCRIPTION = """\
Work with a nested (MatryoshkaLoRA) adapter saved by save_adapter() or by the MatryoshkaLoRA callback
(a directory with matlora_config.json and adapter_model.safetensors; by default the callback writes it to
<checkpoint dir>/matlora_adapter at the end of fit).

  matlora info    ADAPTER                                 settings, layers and the measured rank curve
  matlora export  ADAPTER --rank K --out DIR              rank K as a standard PEFT LoRA adapter
  matlora export  ADAPTER --rank all --out DIR            one PEFT adapter per train rank, DIR/rank_<k>/
  matlora merge   ADAPTER --base MODEL --rank K --out DIR  a plain transformers model with rank K merged in
  matlora nest    PEFT_ADAPTER --base MODEL --out DIR     a PEFT LoRA adapter reordered by SVD into a nested one

An exported adapter loads with peft.PeftModel.from_pretrained(base, DIR) or any server that reads PEFT
adapters; a merged model loads with transformers.AutoModelForCausalLM.from_pretrained(DIR).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matlora", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{info,export,merge,nest}")

    info = sub.add_parser("info", help="show an adapter's settings, layers and stored rank curve",
                          description="Print the adapter's configuration, train ranks, adapted layers, base model and "
                                      "the measured rank curve (score per rank, AURAC) if the run stored one.")
    info.add_argument("adapter", metavar="ADAPTER", help="a saved adapter directory")

    export = sub.add_parser("export", help="write rank K as a standard PEFT LoRA adapter",
                            description="Write rank K of the nested adapter as a PEFT LoRA adapter (adapter_config.json "
                                        "with r=K, adapter_model.safetensors). No base model is needed. With "
                                        "--rank all, one adapter per train rank goes to OUT/rank_<k>/ with a README.md "
                                        "card giving the measured score at that rank.")
    export.add_argument("adapter", metavar="ADAPTER", help="a saved adapter directory")
    export.add_argument("--rank", required=True, metavar="K|all",
                        help="rank to export, 1 ≤ K ≤ r_max (need not be a train rank), or 'all' for every train rank")
    export.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    export.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    export.add_argument("--fold-scale", action="store_true",
                        help="fold the rank scale into lora_B (lora_alpha = r, no use_rslora) for servers that ignore "
                             "use_rslora")

    merge = sub.add_parser("merge", help="write a transformers model with rank K merged into the base",
                           description="Merge rank K into the base weights and save a plain transformers model "
                                       "(save_pretrained) that loads without lightning_matlora.")
    merge.add_argument("adapter", metavar="ADAPTER", help="a saved adapter directory")
    merge.add_argument("--base", metavar="MODEL", default=None,
                       help="base model: a local directory or hub name (default: the base recorded in the adapter)")
    merge.add_argument("--rank", required=True, type=int, metavar="K", help="rank to merge, 1 ≤ K ≤ r_max")
    merge.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    merge.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    add_nest_parser(sub)
    return parser


# ---------------------------------------------------------------------------------------------------- nest
def add_nest_parser(sub: argparse._SubParsersAction) -> None:
    nest = sub.add_parser("nest", help="turn a PEFT LoRA adapter into a nested adapter (SVD, exact at r_max)",
                          description="Reorder every layer of a standard PEFT LoRA adapter by the SVD of its update, so "
                                      "that rank K of the result is each layer's best rank-K approximation and rank "
                                      "r_max is the PEFT adapter itself; save it as a nested adapter that `matlora "
                                      "export --rank K` turns back into PEFT at any rank. Refuses DoRA, LoRA biases, "
                                      "embedding LoRA and other PEFT methods.")
    nest.add_argument("peft_adapter", metavar="PEFT_ADAPTER",
                      help="a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors)")
    nest.add_argument("--base", metavar="MODEL", default=None,
                      help="base model: a local directory or hub name (default: the adapter's base_model_name_or_path)")
    nest.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    nest.add_argument("--data", metavar="FILE", default=None,
                      help="JSON Lines rows ({\"text\"}, {\"question\", \"answer\"} or {\"prompt\", \"completion\"}): "
                           "measure the mean loss at each rank, before and after nesting, and store it")
    nest.add_argument("--ranks", metavar="K,K,...", default=None,
                      help="ranks to measure (default: powers of two up to r_max, and r_max)")
    nest.add_argument("--max-rows", type=int, default=256, metavar="N", help="rows of --data used (default 256)")
    nest.add_argument("--overwrite", action="store_true", help="replace DIR if it holds an adapter")


def run_nest(args: argparse.Namespace) -> int:
    """``matlora nest``: 0 on success, 2 with one line on stderr for input that cannot be nested."""
    try:
        ranks = None
        if args.ranks:
            try:
                ranks = [int(r) for r in args.ranks.split(",")]
            except ValueError:
                raise ValueError(f"--ranks must be comma-separated integers such as 1,2,4,8, got {args.ranks!r}.") \
                    from None
        from .nest_peft import nest_adapter

        result = nest_adapter(args.peft_adapter, args.base, args.out, eval_data=args.data, eval_ranks=ranks,
                              max_rows=args.max_rows, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"matlora nest: error: {message}", file=sys.stderr)
        return 2
    print(f"Wrote the nested adapter (r_max={result.report.r_max}) to {result.path}")
    print(str(result.report))
    if result.curve is not None:
        print("rank  loss (nested)  loss (LoRA truncated)")
        for k, v in result.curve.items():
            print(f"{k:>4}  {v:>13.4f}  {result.unnested_curve[k]:>20.4f}")
    print(f"Export a rank with `matlora export {result.path} --rank K --out DIR`.")
    return 0


def format_info(path: str) -> str:
    from .adapter_io import read_adapter

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
    curve = a.rank_curve
    if curve and curve.get("ranks"):
        metric = curve.get("metric", "score")
        width = max(len(metric), 5)
        lines += ["", f"  Measured rank curve", f"  {'rank':>6}  {metric:>{width}}"]
        lines += [f"  {r:>6}  " + (f"{s:>{width}.4f}" if s is not None else f"{'nan':>{width}}")
                  for r, s in zip(curve["ranks"], curve["scores"])]
    else:
        lines += ["", "  No measured rank curve stored (the run did not evaluate ranks)."]
    if a.aurac is not None:
        lines.append(f"  AURAC  {a.aurac:.4f}")
    if a.metadata:
        lines += ["", "  metadata " + ", ".join(f"{k}={v!r}" for k, v in sorted(a.metadata.items()))]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``matlora``; returns the exit status (0 ok, 1 bad input, 2 bad usage)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "nest":
        return run_nest(args)
    try:
        if args.command == "info":
            print(format_info(args.adapter))
        elif args.command == "export":
            from .export import export_peft

            out = export_peft(args.adapter, args.out, rank=args.rank, overwrite=args.overwrite,
                              fold_scale=args.fold_scale)
            what = "one PEFT adapter per train rank" if args.rank.strip().lower() == "all" else f"rank {args.rank}"
            print(f"Wrote {what} to {out}")
        elif args.command == "merge":
            from .export import merge_to_base

            out = merge_to_base(args.adapter, args.out, rank=args.rank, base=args.base, overwrite=args.overwrite)
            print(f"Wrote a transformers model with rank {args.rank} merged to {out}")
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, OSError) as e:
        print(f"matlora {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
