"""The README's two set-up commands are the ones CI and users run: keep them true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, f"CI must run the README's test command verbatim: {test_cmd!r}"


def test_readme_commands_keep_the_cpu_torch_pin_and_exist():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    main_cmd = next(b for b in blocks if "recipes/instruct.py" in b)
    for cmd in (main_cmd, next(b for b in blocks if "pytest" in b)):
        assert "torch==2.13.0" in cmd.split("&&")[0], "install must pin the CPU torch wheel"
    script = main_cmd.split("python ", 1)[1].split()[0]
    assert (ROOT / script).is_file(), f"README's main command runs {script}, which does not exist"
