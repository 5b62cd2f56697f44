"""Re-run the default recipe under several training objectives / inference rules and tabulate the curves.

    python recipes/compare_modes.py                     # every setting below, one after the other
    python recipes/compare_modes.py rowwise:rank matryoshka:rank -- --trainer.max_epochs 2

Each setting is ``mode:rank_scale``; the words after ``--`` go to every run. Each run is
``python recipes/instruct.py fit`` with the default config (same base, data, seed and steps) and writes its curve
to ``runs/compare/<mode>_<rank_scale>/rank_curve.json``; the table printed at the end (exact match and
answer-token accuracy per rank, AURAC) is the one recorded in docs/recipe.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from lightning_matlora import aurac

HERE = Path(__file__).resolve().parent
SETTINGS = ["matryoshka:rank", "matryoshka:trained", "rowwise:rank", "dylora:rank"]


def run(setting: str, extra: list[str], root: Path) -> dict:
    mode, rule = setting.split(":")
    out = root / f"{mode}_{rule}"
    cmd = [sys.executable, str(HERE / "instruct.py"), "fit", "--trainer.callbacks.init_args.mode", mode,
           "--trainer.callbacks.init_args.rank_scale", rule, "--model.output_dir", str(out),
           "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra]
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    data = json.loads((out / "rank_curve.json").read_text())
    data["seconds"] = time.time() - t0
    return data


def main() -> None:
    args = sys.argv[1:]
    extra = args[args.index("--") + 1:] if "--" in args else []
    settings = (args[:args.index("--")] if "--" in args else args) or SETTINGS
    root = Path("runs/compare")

    rows = []
    for s in settings:
        d = run(s, extra, root)
        curve = {int(k): v for k, v in d["curve"].items()}
        ranks = sorted(curve)
        rows.append((s, d["base"], curve, ranks, d["seconds"]))
        print(f"done {s} in {d['seconds']:.0f} s", flush=True)
    for metric in ("exact_match", "token_acc"):
        print(f"\n{metric} (%) per rank")
        ranks = rows[0][3]
        print(f"{'setting':<20}{'base':>7}" + "".join(f"{'r' + str(k):>7}" for k in ranks) + f"{'AURAC':>8}")
        for s, base, curve, ranks, _ in rows:
            vals = [curve[k][metric] for k in ranks]
            b = base.get(metric, float("nan")) if base else float("nan")
            print(f"{s:<20}{b:>7.1f}" + "".join(f"{v:>7.1f}" for v in vals) + f"{aurac(ranks, vals):>8.1f}")


if __name__ == "__main__":
    main()
