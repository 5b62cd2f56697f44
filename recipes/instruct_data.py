"""The recipe's LightningDataModule: instruction data from any ``datasets`` source, encoded for answer-only loss.

``InstructData`` reads a hub dataset, a local data file or a directory (:func:`load_source`, which checks local
files row by row first: :mod:`instruct_data_checks`), holds out a validation split if there is none, and encodes
every split (:mod:`instruct_encoding`, where the schemas and prompt templates are).
"""

from __future__ import annotations

import glob
import os
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from instruct_base import load_or_explain
from instruct_data_checks import QUOTE_CHARS, check_data_file, check_rows, shorten
from instruct_encoding import Encoded, collate, detect_schema, encode_examples, prompt_ids, render_prompt

RECIPES = Path(__file__).resolve().parent
DEFAULT_DATA = str(RECIPES / "assets" / "data" / "encode.jsonl")
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_source(path: str, name: str | None = None, revision: str | None = None, schema: str = "auto"):
    """A ``datasets.DatasetDict`` from a hub name, a local data file (json/jsonl/parquet/csv) or directory.

    Local data files are checked before ``datasets`` reads them (:func:`check_data_file`): a bad row fails with
    one error naming the file, the line (or row) and the problem, instead of deep inside ``datasets``."""
    import datasets

    p = Path(path)
    try:
        if p.is_file():
            builder = _FILE_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise ValueError(f"Cannot read {path}: give a .json, .jsonl, .parquet or .csv file, a directory, or a "
                                 f"dataset name on the hub.")
            check_data_file(p, schema)
            return _load_files(lambda: datasets.load_dataset(builder, data_files={"train": str(p)}), path)
        if p.is_dir():
            if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
                ds = datasets.load_from_disk(str(p))
                return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})
            for f in _data_files_under(p):
                check_data_file(f, schema)
            return _load_files(lambda: datasets.load_dataset(str(p), name), path)
        if any(ch in path for ch in "*?"):
            builder = _FILE_BUILDERS.get(Path(path.replace("*", "x")).suffix.lower(), "json")
            for f in sorted(glob.glob(path)):
                if Path(f).is_file() and Path(f).suffix.lower() in _FILE_BUILDERS:
                    check_data_file(Path(f), schema)
            return _load_files(lambda: datasets.load_dataset(builder, data_files={"train": path}), path)
        return datasets.load_dataset(path, name, revision=revision)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        if p.exists():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        raise ValueError(f"Cannot load the dataset {path!r}: it is not a local file or directory, and the hub "
                         f"{'is switched off on this machine (HF_HUB_OFFLINE=1)' if offline else 'could not be reached'}"
                         f". Point --data.path at a local .jsonl/.json/.parquet/.csv file or a directory "
                         f"(e.g. one written by dataset.save_to_disk). ({type(e).__name__}: {e})") from None


def _load_files(load, path: str):
    """``load()``, with what ``datasets`` could not read reported as one sentence naming ``path``."""
    from datasets.exceptions import DatasetGenerationError

    try:
        return load()
    except DatasetGenerationError as e:
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [""])[0]
        raise ValueError(f"datasets could not read the data in {path}: {type(cause).__name__}: "
                         f"{shorten(first, 4 * QUOTE_CHARS)}") from e


def _data_files_under(directory: Path) -> list[Path]:
    """The data files (json/jsonl/parquet/csv) ``datasets`` may read from ``directory`` (hidden folders skipped)."""
    return [f for f in sorted(directory.rglob("*")) if f.is_file() and f.suffix.lower() in _FILE_BUILDERS
            and not any(part.startswith(".") for part in f.relative_to(directory).parts)]


class InstructData(pl.LightningDataModule):
    """Instruction data for causal-LM fine-tuning with the loss on answer tokens only.

    Args:
        path: a dataset on the hub (``"openai/gsm8k"``), a local .json/.jsonl/.parquet/.csv file, or a directory.
        name: the dataset configuration on the hub (e.g. ``"main"`` for GSM8K).
        schema: ``"auto"`` (from the columns), ``"alpaca"`` or ``"gsm8k"``.
        template: prompt template: ``"auto"`` (the tokenizer's chat template if it has one, else the schema's),
            ``"chat"`` (the tokenizer's chat template), ``"gsm8k"``, ``"alpaca"``, or a format string with
            ``{question}`` or ``{instruction}``/``{input}`` placeholders.
        system: with a chat template, the system message before each prompt; ``None`` (default) sends none, so the
            template's own default applies (SmolLM2's adds a 20-token one).
        train_split: the split trained on.
        val_split: the split validated on; default ``"validation"`` if the source has one, else a deterministic
            ``val_fraction`` of ``train_split`` (seeded by ``seed``).
        test_split: the split of ``test``; default ``"test"`` if present, else the validation split.
        val_fraction: share of the training split held out when there is no validation split.
        max_length: maximum tokens per example (prompt + answer + eos).
        batch_size: examples per batch (per process).
        max_train_examples / max_val_examples: keep only the first N examples (after the split), for quick runs.
        prompts / prompts_file: for ``predict``: questions (or instructions) given inline or one per line in a file.
        tokenizer: the tokenizer's name or directory (linked to ``--model.name_or_path`` by the CLI).
    """

    def __init__(self, path: str = DEFAULT_DATA, name: str | None = None, schema: str = "auto",
                 template: str = "auto", train_split: str = "train", val_split: str | None = None,
                 test_split: str | None = None, val_fraction: float = 0.1, max_length: int = 512,
                 batch_size: int = 32, max_train_examples: int | None = None, max_val_examples: int | None = None,
                 num_workers: int = 0, seed: int = 0, prompts: list[str] | None = None,
                 prompts_file: str | None = None, tokenizer: str | None = None,
                 trust_remote_code: bool = False, system: str | None = None) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}.")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
        self.path, self.name, self.schema_arg, self.template = path, name, schema, template
        self.system = system
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.val_fraction, self.max_length, self.batch_size = val_fraction, max_length, batch_size
        self.max_train_examples, self.max_val_examples = max_train_examples, max_val_examples
        self.num_workers, self.seed = num_workers, seed
        self.prompts, self.prompts_file = list(prompts or []), prompts_file
        self.tokenizer_name, self.trust_remote_code = tokenizer, trust_remote_code
        self.tokenizer = None
        self.schema: str | None = None
        self.splits: dict[str, list[Encoded]] = {}
        self.truncated: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------------ setup
    def load_tokenizer(self):
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = load_or_explain(AutoTokenizer.from_pretrained, self.tokenizer_name, "tokenizer",
                                             trust_remote_code=self.trust_remote_code)
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        return self.tokenizer

    def setup(self, stage: str) -> None:
        tok = self.load_tokenizer()
        if stage == "predict":
            return
        if self.splits:
            return
        ds = load_source(self.path, self.name, schema=self.schema_arg)
        if self.train_split not in ds:
            raise ValueError(f"The dataset {self.path!r} has no split {self.train_split!r} (it has {sorted(ds)}): "
                             f"set --data.train_split.")
        train = ds[self.train_split]
        self.schema = detect_schema(list(train.column_names), self.schema_arg, repr(self.path))
        for split_name in dict.fromkeys([self.train_split, self.val_split or "validation", self.test_split or "test"]):
            if split_name not in ds:
                continue
            detect_schema(list(ds[split_name].column_names), self.schema, f"{self.path!r} (split {split_name!r})")
            check_rows(ds[split_name], self.schema, f"{self.path} (split {split_name!r})")
        val_name = self.val_split or ("validation" if "validation" in ds else None)
        if val_name is not None:
            if val_name not in ds:
                raise ValueError(f"The dataset {self.path!r} has no split {val_name!r} (it has {sorted(ds)}): set "
                                 f"--data.val_split to one of them, or leave it unset to hold out --data.val_fraction "
                                 f"of the training split.")
            val = ds[val_name]
        else:
            if len(train) < 2:
                raise ValueError(f"The training split of {self.path!r} has {len(train)} example(s): too few to hold "
                                 f"out a validation split.")
            parts = train.train_test_split(test_size=self.val_fraction, seed=self.seed, shuffle=True)
            train, val = parts["train"], parts["test"]
            val_name = f"{self.train_split}[held-out {self.val_fraction:g}, seed {self.seed}]"
        test_name = self.test_split or ("test" if "test" in ds and ds["test"] is not val else None)
        test = ds[test_name] if test_name and test_name in ds else val
        if self.max_train_examples:
            train = train.select(range(min(self.max_train_examples, len(train))))
        if self.max_val_examples:
            val = val.select(range(min(self.max_val_examples, len(val))))
        for split_name, split, label in (("train", train, self.train_split), ("val", val, val_name),
                                         ("test", test, test_name or val_name)):
            if len(split) == 0:
                raise ValueError(f"The {label!r} split of {self.path!r} is empty: give a dataset with examples in it "
                                 f"(check --data.path, the split names and max_*_examples).")
            detect_schema(list(split.column_names), self.schema, f"{self.path!r} (split {label!r})")
            self.splits[split_name], self.truncated[split_name] = encode_examples(
                list(split), tok, self.schema, self.template, self.max_length, str(label), self.system)
        self.report()

    def report(self) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        rank_zero_info(f"Data: {self.path} ({self.schema}-style; {sizes} examples; max_length {self.max_length})")
        for k, n in self.truncated.items():
            if n:
                rank_zero_info(f"  {n} of {len(self.splits[k])} {k} examples were longer than max_length="
                               f"{self.max_length}: their answers were cut at the end (prompts kept whole).")

    # ------------------------------------------------------------------------------------------ dataloaders
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, collate_fn=partial(collate, pad_id=pad),
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_prompts(self) -> list[str]:
        """The predict questions: ``prompts`` then the lines of ``prompts_file`` (blank lines skipped)."""
        prompts = list(self.prompts)
        if self.prompts_file:
            prompts += [ln.strip() for ln in Path(self.prompts_file).read_text().splitlines() if ln.strip()]
        if not prompts:
            raise ValueError("predict needs prompts: give --data.prompts '[\"...\"]' or --data.prompts_file FILE "
                             "(one question per line).")
        return prompts

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of prompts rendered by this module (no special tokens added to a chat prompt)."""
        return prompt_ids(prompts, self.load_tokenizer(), self.template)

    def predict_dataloader(self) -> DataLoader:
        schema = self.schema_arg if self.schema_arg != "auto" else "gsm8k"
        key = "question" if schema == "gsm8k" else "instruction"
        texts = [render_prompt({key: q, "input": ""}, schema, self.template, self.load_tokenizer(), self.system)
                 for q in self.predict_prompts()]
        return DataLoader(texts, batch_size=self.batch_size, shuffle=False, collate_fn=list)
