"""Instruction-tune a causal LM with a nested (MatryoshkaLoRA) adapter: ``python recipes/instruct.py fit``.

With no arguments it fine-tunes the bundled base model (``recipes/assets/base``, trained by
``recipes/make_base.py``) on the bundled Encode task (``recipes/assets/data/encode.jsonl``, written by
``recipes/make_data.py``), offline on a CPU in a few minutes, and prints the rank–accuracy table, its AURAC,
the rank advice, and where the adapter and the curve PNG were saved.

Everything is a LightningCLI option (``--help``, ``--print_config``, ``--config FILE.yaml``):

    python recipes/instruct.py fit --config recipes/configs/paper_gsm8k.yaml      # GPU + hub access
    python recipes/instruct.py fit --model.name_or_path /models/my-llama --data.path data.jsonl
    python recipes/instruct.py predict --model.adapter runs/instruct/version_0/adapter --model.rank 8 \\
        --data.prompts '["Encode hello"]'

The ``MatryoshkaLoRA`` callback is in the default config's ``trainer.callbacks`` (recipes/configs/default.yaml);
change it with ``--trainer.callbacks.init_args.r_max 32`` style options or a config file. It adapts the model,
measures the module's rank-curve metrics at every eval rank, and saves the adapter at the end of ``fit``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.cli import LightningCLI

from instruct_data import InstructData
from instruct_module import InstructLM

HERE = Path(__file__).resolve().parent

DEFAULT_CONFIG = HERE / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class InstructCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--num_threads", type=Optional[int], default=None,
                            help="CPU threads of torch (default: torch's choice); the bundled tiny model runs "
                                 "fastest on one")
        parser.link_arguments("model.name_or_path", "data.tokenizer")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        threads = config.get("num_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--num_threads must be ≥ 1 (or unset for torch's choice), got {threads}.")
            torch.set_num_threads(int(threads))

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # options that depend on the callback (eval ranks and predict rank against r_max): checked now, before
        # any data is read or any step runs
        self.model.check_callbacks(self.trainer.callbacks)


def main(args: list[str] | None = None, run: bool = True) -> InstructCLI:
    """Run the CLI (``args`` as on the command line; ``run=False``: no subcommand, just build the objects)."""
    torch.set_float32_matmul_precision("high")
    defaults = {"default_config_files": [str(DEFAULT_CONFIG)]}
    return InstructCLI(InstructLM, InstructData, seed_everything_default=0, args=args, run=run,
                       save_config_kwargs={"overwrite": True},
                       parser_kwargs={s: defaults for s in SUBCOMMANDS} if run else defaults)


if __name__ == "__main__":
    main()
