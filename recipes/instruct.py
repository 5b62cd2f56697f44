"""Instruction-tune a causal LM with a nested (MatryoshkaLoRA) adapter: ``python recipes/instruct.py fit``.

With no arguments it fine-tunes the bundled base model (``recipes/assets/base``, trained by
``recipes/make_base.py``) on the bundled Encode task (``recipes/assets/data/encode.jsonl``, written by
``recipes/make_data.py``), offline on a CPU in a few minutes, and prints the rank–accuracy table, its AURAC,
the rank advice, and where the adapter and the curve PNG were saved.

Everything is a LightningCLI option (``--help``, ``--print_config``, ``--config FILE.yaml``):

    python recipes/instruct.py fit --config recipes/configs/paper_gsm8k.yaml      # GPU + hub access
    python recipes/instruct.py fit --model.name_or_path /models/my-llama --data.path data.jsonl
    python recipes/instruct.py fit --size_curve.budgets '[1, 2, 4, 8]'    # then quality against adapter size
    python recipes/instruct.py predict --model.adapter runs/instruct/lightning_logs/version_0/matlora_adapter \\
        --model.rank 8 --data.prompts '["Encode hello"]'

On the command line an error in the options or the data prints one line naming the option and the fix, and
exits with status 2 (``main()`` raises it instead, for programs and tests). ``predict`` writes nothing under the
run directory (no logger version, no config.yaml), so the next ``fit`` gets the next version number.

The ``MatryoshkaLoRA`` callback is in the default config's ``trainer.callbacks`` (recipes/configs/default.yaml);
change it with ``--trainer.callbacks.init_args.r_max 32`` style options or a config file. It adapts the model,
measures the module's rank-curve metrics at every eval rank, and saves the adapter at the end of ``fit``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lightning_matlora.quiet import quiet_known_noise

from instruct_data import InstructData
from instruct_module import InstructLM, find_matlora
from instruct_size_curve import check_budgets, format_size_curve, measure_size_curve, plot_size_curve

HERE = Path(__file__).resolve().parent

DEFAULT_CONFIG = HERE / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class InstructCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--num_threads", type=Optional[int], default=None,
                            help="CPU threads of torch (default: torch's choice); the bundled tiny model runs "
                                 "fastest on one")
        parser.add_argument("--size_curve.budgets", type=Optional[list[int]], default=None,
                            help="after fit, score the adapter at these budgets (uniform ranks, e.g. '[1, 2, 4, 8]') "
                                 "cut uniformly and as allocate_ranks plans them, on the validation split, and "
                                 "print the table against the adapter parameter count (off by default)")
        parser.add_argument("--size_curve.plot", type=Optional[str], default=None,
                            help="also draw the size curve to this PNG file")
        parser.add_argument("--size_curve.calibration_rows", type=int, default=64,
                            help="training examples the allocation measures its sensitivities on")
        parser.link_arguments("model.name_or_path", "data.tokenizer")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        threads = config.get("num_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--num_threads must be ≥ 1 (or unset for torch's choice), got {threads}.")
            torch.set_num_threads(int(threads))
        adapter_into_output_dir(config)
        # the size curve is measured after fit only (a fit's saved config.yaml keeps it for validate/predict: ignored)
        self.size_curve = config.get("size_curve")
        if self.size_curve is not None and self.size_curve.budgets is not None and \
                self.size_curve.calibration_rows < 1:
            raise ValueError(f"--size_curve.calibration_rows must be ≥ 1, got {self.size_curve.calibration_rows}.")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # options that depend on the callback (eval ranks and predict rank against r_max): checked now, before
        # any data is read or any step runs
        self.model.check_callbacks(self.trainer.callbacks)
        if self.subcommand == "fit" and self.size_curve is not None and self.size_curve.budgets is not None:
            self.size_curve.budgets = check_budgets(self.size_curve.budgets,
                                                    find_matlora(self.trainer.callbacks).config.r_max)
            if self.trainer.world_size > 1:
                raise ValueError("--size_curve.budgets runs in one process: fit with --trainer.devices 1, or measure "
                                 "the saved adapter afterwards (matlora allocate).")
        if self.subcommand == "fit":
            self.model.defer_report = True  # printed by after_fit, once the progress bar is gone

    def after_fit(self) -> None:
        self.model.print_fit_report()
        if self.size_curve is not None and self.size_curve.budgets:
            points = measure_size_curve(self.model, self.size_curve.budgets, self.size_curve.calibration_rows)
            print("\n" + format_size_curve(points))
            if self.size_curve.plot:
                print(f"Size curve plotted to {plot_size_curve(points, self.size_curve.plot)}")


def adapter_into_output_dir(config) -> None:
    """``--model.output_dir DIR`` moves the adapter too: the MatryoshkaLoRA callback saves it to ``DIR/adapter``
    (next to ``rank_curve.json``) unless its ``save_adapter`` names a directory of its own or is false."""
    out = config.get("model", {}).get("output_dir")
    if not out:
        return
    callbacks = config.get("trainer", {}).get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        args = getattr(cb, "init_args", None)
        if str(getattr(cb, "class_path", "")).endswith("MatryoshkaLoRA") and args is not None \
                and args.get("save_adapter", True) is True:
            args["save_adapter"] = str(Path(out) / "adapter")


def main(args: list[str] | None = None, run: bool = True) -> InstructCLI:
    """Run the CLI (``args`` as on the command line; ``run=False``: no subcommand, just build the objects)."""
    torch.set_float32_matmul_precision("high")
    defaults = {"default_config_files": [str(DEFAULT_CONFIG)]}
    given = sys.argv[1:] if args is None else args
    predict = run and bool(given) and given[0] == "predict"
    # predict logs nothing: no logger version directory and no config.yaml in it
    return InstructCLI(InstructLM, InstructData, seed_everything_default=0, args=args, run=run,
                       save_config_callback=None if predict else SaveConfigCallback,
                       trainer_defaults={"logger": False} if predict else None,
                       save_config_kwargs={"overwrite": True},
                       parser_kwargs={s: defaults for s in SUBCOMMANDS} if run else defaults)


def error_line(err: BaseException) -> str:
    """The one line the command line prints for ``err``: the innermost cause's message (jsonargparse wraps an
    option's error in its own), without a traceback."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {text}"


def command_line(argv: Sequence[str] | None = None) -> int:
    """``python recipes/instruct.py ...``: :func:`main`, with the known-harmless messages of the dependencies
    quieted (:mod:`lightning_matlora.quiet`) and a bad option or input reported as one line on stderr, status 2."""
    quiet_known_noise()
    given = list(sys.argv[1:] if argv is None else argv)
    try:
        main(given)
    except (ValueError, OSError) as e:  # bad options and inputs; other errors keep their traceback
        sub = given[0] if given and given[0] in SUBCOMMANDS else ""
        print(f"instruct.py{' ' + sub if sub else ''}: error: {error_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(command_line())
