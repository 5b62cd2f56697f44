"""Fault injection on the save swap: a save killed with SIGKILL between its two renames (or while writing) leaves
the previous adapter readable, and the next save cleans up what the killed one left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from lightning_matlora import adapted_layers, load_adapter, read_adapter, save_adapter
from lightning_matlora.atomic import stale_siblings
from lightning_matlora.cli import main
from test_adapter_io import trained

ROOT = Path(__file__).resolve().parents[1]

KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import lightning_matlora.adapter_format as fmt
    from conftest import tiny_llama
    from test_adapter_io import trained
    from lightning_matlora import save_adapter

    path, where = sys.argv[1], sys.argv[2]
    model = trained(tiny_llama(), seed=7, r_max=4)
    real_replace, real_save_file = os.replace, fmt.save_file

    def replace(src, dst):  # the swap's first rename moves the old adapter aside: die right after it
        real_replace(src, dst)
        if where == "between" and ".old-" in os.path.basename(str(dst)):
            os.kill(os.getpid(), signal.SIGKILL)

    def save_file(tensors, filename, metadata=None):  # die with half of the weights written
        with open(filename, "wb") as f:
            f.write(b"\\0" * 1000)
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    if where == "writing":
        fmt.save_file = save_file
    save_adapter(model, path)
""")


def killed_save(path: Path, where: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = KILLED_SAVE.format(tests=str(ROOT / "tests"))
    res = subprocess.run([sys.executable, "-c", script, str(path), where], capture_output=True, text=True, env=env,
                         timeout=300, cwd=str(path.parent))
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_between_the_renames_then_read_then_save(tmp_path, capsys):
    path = tmp_path / "ad"
    first = trained(tiny_llama(), seed=3, r_max=4)
    save_adapter(first, path)
    previous = read_adapter(path).tensors
    killed_save(path, "between")
    assert not path.exists()  # the window: the old adapter was moved aside, the new one not yet in place
    left = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert left == [".ad.old", ".ad.tmp"] and len(stale_siblings(path)) == 2

    with pytest.warns(UserWarning, match="interrupted; reading the previous adapter"):
        recovered = read_adapter(path)
    assert _same(recovered.tensors, previous)
    with pytest.warns(UserWarning, match="interrupted"):
        model = load_adapter(tiny_llama(), path)
    for name, layer in adapted_layers(model).items():
        torch.testing.assert_close(layer.lora_B.detach(), previous[f"{name}.lora_B"], rtol=0, atol=0)
    with pytest.warns(UserWarning):
        assert main(["info", str(path)]) == 0
    assert "r_max           4" in capsys.readouterr().out

    again = trained(tiny_llama(), seed=11, r_max=4)
    save_adapter(again, path)  # a later save puts a new adapter in place and removes what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    assert not _same(read_adapter(path).tensors, previous)


def test_kill_while_writing_keeps_the_adapter_and_the_next_save_cleans_up(tmp_path):
    path = tmp_path / "ad"
    save_adapter(trained(tiny_llama(), seed=3, r_max=4), path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    killed_save(path, "writing")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # untouched
    assert [p.name.split("-")[0] for p in stale_siblings(path)] == [".ad.tmp"]
    read_adapter(path)
    save_adapter(trained(tiny_llama(), seed=4, r_max=4), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_a_live_writers_temporary_is_not_removed(tmp_path):
    """Clean-up removes only temporaries whose process is gone: a concurrent save keeps its own."""
    path = tmp_path / "ad"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".ad.tmp-{sleeper.pid}-abc"
        live.mkdir()
        dead = tmp_path / ".ad.tmp-999999999-abc"
        dead.mkdir()
        save_adapter(trained(tiny_llama(), r_max=2), path)
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
