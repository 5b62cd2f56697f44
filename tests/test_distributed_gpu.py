"""Stock FSDPStrategy and DeepSpeed ZeRO-3 on two GPUs, bf16 (benchmarks/distributed_gpu.py at a small size).

Skipped without two CUDA devices; CI has none, and these have not yet been run on a GPU.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_3"])
def test_bf16_fit_on_two_gpus_saves_a_complete_adapter(strategy, tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_port()}",
           str(ROOT / "benchmarks" / "distributed_gpu.py"), "--strategy", strategy, "--hidden", "256",
           "--layers", "2", "--vocab", "1000", "--r-max", "8", "--seq-len", "128", "--steps", "6", "--warmup", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["ran"] and report["adapter_complete"] and report["world_size"] == 2
    assert report["tokens_per_s"] > 0 and report["peak_memory_gib_per_gpu"] > 0
