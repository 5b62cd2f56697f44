"""Generate the ISO-date instruction task for the real-model recipe (``recipes/configs/smollm2.yaml``).

Run ``python recipes/make_iso_dates.py`` (seeded; writes the same file every time). It writes
``recipes/assets/data/iso_dates.jsonl``, GSM8K-style (``question`` / ``answer``, the final answer after ``####``)::

    {"question": "Convert the date to ISO format: March 5, 2021", "answer": "#### 2021-03-05"}

The dates (1900–2099, any valid day) are written in four English forms: ``March 5, 2021``, ``5 March 2021``,
``Mar 5, 2021`` and ``the 5th of March, 2021``; every example is a different (date, form) pair (May abbreviated is
May, so a May date in the first and the third form reads the same: one question of the file occurs twice).

A pretrained instruct model knows the months and what a date is, but answers in a sentence or in another format:
SmolLM2-135M-Instruct scores 0 % exact match before fine-tuning. The task needs the month-name → number mapping,
zero padding and the reordering, learned from the examples: an instruction-following update of a real model. The
``####`` marks the final answer as in GSM8K, so the recipe scores it (a bare date would also be read as a
timestamp, not text, by ``datasets``' JSON loader).
"""

from __future__ import annotations

import calendar
import datetime
import json
import random
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "assets" / "data" / "iso_dates.jsonl"
SEED = 2026
N_EXAMPLES = 2000
INSTRUCTION = "Convert the date to ISO format: {date}"
MONTHS = list(calendar.month_name)[1:]


def ordinal(day: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th`` … ``11th``, ``21st``."""
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def written(d: datetime.date, form: int) -> str:
    """The date ``d`` in English form ``form`` (0–3)."""
    month = MONTHS[d.month - 1]
    return [f"{month} {d.day}, {d.year}", f"{d.day} {month} {d.year}", f"{month[:3]} {d.day}, {d.year}",
            f"the {ordinal(d.day)} of {month}, {d.year}"][form]


def examples(n: int = N_EXAMPLES, seed: int = SEED) -> list[dict[str, str]]:
    """``n`` distinct examples (no (date, form) pair twice), seeded."""
    rng = random.Random(seed)
    start, days = datetime.date(1900, 1, 1), (datetime.date(2099, 12, 31) - datetime.date(1900, 1, 1)).days
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < n:
        key = (rng.randrange(days + 1), rng.randrange(4))
        if key in seen:
            continue
        seen.add(key)
        d = start + datetime.timedelta(days=key[0])
        out.append({"question": INSTRUCTION.format(date=written(d, key[1])), "answer": f"#### {d.isoformat()}"})
    return out


def main() -> None:
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    DATA_FILE.write_text("".join(json.dumps(e) + "\n" for e in examples()))
    print(f"wrote {DATA_FILE} ({N_EXAMPLES} examples)")


if __name__ == "__main__":
    main()
