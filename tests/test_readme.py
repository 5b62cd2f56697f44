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


def test_the_default_runs_figures_name_one_cpu_and_agree_with_the_readme():
    """docs/recipe.md says once which CPU produced its table; the README quotes the same figures and CPU."""
    recipe = (ROOT / "docs" / "recipe.md").read_text()
    readme = (ROOT / "README.md").read_text()
    flat = " ".join(recipe.split())
    assert flat.count("Every figure of this table was produced on a 2-core AMD EPYC") == 1
    assert "another machine kind" not in flat and "this project's CPU machine" not in " ".join(readme.split())
    table = recipe[recipe.index("**The default run.**"):recipe.index("**What the run shows.**")]
    rows = {cells[0]: cells for cells in (re.findall(r"[^|\s]+", line) for line in table.splitlines()
                                          if line.startswith("| ") and line[2:3].isdigit())}
    quoted = re.search(r"rank 1 → 16: exact match ([\d.]+)% → ([\d.]+)%.*?seed 0 on a 2-core\s+AMD EPYC", readme,
                       flags=re.S)
    assert quoted and (quoted.group(1), quoted.group(2)) == (rows["1"][3], rows["16"][3])
