"""The setup the benchmark scripts share: an offline hub, a synthetic Llama, one worker process per measurement,
peak memory, and writing results.

The scripts run as ``python benchmarks/NAME.py``; Python puts this folder first on their import path, so they
import this module by name. Importing it switches the hub off (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``,
unless already set): every model here is built from a config, nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# the seven projections of a Llama block: every benchmark adapts all of them
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULT = "RESULT "  # a worker process prints its result as one line: this prefix, then JSON


# ------------------------------------------------------------------------------------------------ the model
def llama_config(*, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int,
                 max_positions: int):
    """A ``LlamaConfig`` of the given shape with untied input and output embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                       tie_word_embeddings=False)


def random_llama(config, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` with weights drawn under ``torch.manual_seed(seed)``, created on ``device``, in
    ``dtype``: the same ``seed``, shape and device always give the same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def random_tokens(vocab: int, batch: int, seq: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """A fixed ``(batch, seq)`` batch of token ids, drawn from its own generator (``seed``)."""
    return torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


# -------------------------------------------------------------------------------------------- worker processes
def run_worker(script: str, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python script *args`` in a fresh process (so that its peak memory is its own) and return the result
    it printed with :func:`print_result`; a ``RuntimeError`` with the tail of its output if it failed."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          env=None if env is None else os.environ | env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT):])


def print_result(result: dict[str, Any]) -> None:
    """The one line a worker process prints for :func:`run_worker`."""
    print(RESULT + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------- peak memory (CPU)
def reset_peak_rss() -> None:
    """Reset the process's peak resident set (Linux ``VmHWM``) to its current size, so that what was built before
    drops out of the peak; a no-op elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_kib(field: str = "VmRSS") -> int:
    """A memory figure of this process in KiB from ``/proc/self/status`` (``VmRSS`` now, ``VmHWM`` its peak since
    :func:`reset_peak_rss`); off Linux the peak is ``getrusage``'s maximum and any other field 0."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0
    if field == "VmHWM":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return 0


# ------------------------------------------------------------------------------------------------ results
def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path``, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file (none if it does not exist)."""
    path = Path(path)
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
