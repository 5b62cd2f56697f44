"""Generate the embedded task data: a letter-substitution code ("Encode <word>") and the base model's corpus.

Run ``python recipes/make_data.py`` (seeded; writes the same files every time). It writes

- ``recipes/assets/data/encode.jsonl``: the instruction dataset, GSM8K-style (``question`` / ``answer``):
  ``{"question": "Encode kaer", "answer": "#### kber"}``. The code swaps 10 pairs of letters (20 letters change,
  6 stay); letters are drawn with Zipf-like frequencies, so the pairs differ in how much they matter and a
  rank-k adapter can fix only the most frequent few. Each swapped pair is a rank-1 change of the identity map
  (the block [[-1, 1], [1, -1]]), so the update the task needs has rank about 10: the rank–accuracy curve of
  a nested adapter rises with rank instead of being flat.
- The pre-training corpus of the base model is not shipped: :func:`corpus_lines` regenerates it (used by
  ``recipes/make_base.py``). It holds free text of random words and two instructions in the same question /
  answer format, ``Copy <word>`` (answer: the word) and ``Reverse <word>`` (answer: the word reversed), but never
  ``Encode``: the base model knows the format and how to copy letters, and fine-tuning has to teach it the code.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DATA_FILE = ASSETS / "data" / "encode.jsonl"
SEED = 1234
N_EXAMPLES = 4000
LETTERS = string.ascii_lowercase
N_SWAPS = 10

PROMPT = "Question: {question}\nAnswer: "  # the GSM8K template of the recipe


def letter_weights() -> list[float]:
    """Zipf-like letter frequencies (a random but seeded order of the alphabet gets weights 1/(i+1)^0.9)."""
    rng = random.Random(SEED)
    order = list(LETTERS)
    rng.shuffle(order)
    w = {c: 1.0 / (i + 1) ** 0.9 for i, c in enumerate(order)}
    return [w[c] for c in LETTERS]


def code() -> dict[str, str]:
    """The substitution: ``N_SWAPS`` disjoint pairs of letters swapped, every other letter kept."""
    rng = random.Random(SEED + 1)
    letters = list(LETTERS)
    rng.shuffle(letters)
    mapping = {c: c for c in LETTERS}
    for i in range(N_SWAPS):
        a, b = letters[2 * i], letters[2 * i + 1]
        mapping[a], mapping[b] = b, a
    return mapping


def random_word(rng: random.Random, weights: list[float], lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choices(LETTERS, weights=weights, k=rng.randint(lo, hi)))


def encode(word: str, mapping: dict[str, str] | None = None) -> str:
    mapping = mapping or code()
    return "".join(mapping[c] for c in word)


def task_examples(n: int = N_EXAMPLES, seed: int = SEED) -> list[dict[str, str]]:
    """``n`` distinct GSM8K-style examples of the Encode task."""
    rng, weights, mapping = random.Random(seed + 2), letter_weights(), code()
    seen: set[str] = set()
    out = []
    while len(out) < n:
        w = random_word(rng, weights)
        if w in seen:
            continue
        seen.add(w)
        out.append({"question": f"Encode {w}", "answer": f"#### {encode(w, mapping)}"})
    return out


def corpus_lines(n: int, seed: int = SEED + 3) -> list[str]:
    """The base model's pre-training text: free text, Copy and Reverse instructions (never Encode)."""
    rng, weights = random.Random(seed), letter_weights()
    lines = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            words = [random_word(rng, weights, 2, 7) for _ in range(rng.randint(3, 6))]
            lines.append(" ".join(words) + ".")
        elif kind < 0.75:
            w = random_word(rng, weights)
            lines.append(PROMPT.format(question=f"Copy {w}") + f"#### {w}")
        else:
            w = random_word(rng, weights)
            lines.append(PROMPT.format(question=f"Reverse {w}") + f"#### {w[::-1]}")
    return lines


def main() -> None:
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    with DATA_FILE.open("w") as f:
        for ex in task_examples():
            f.write(json.dumps(ex) + "\n")
    mapping = code()
    swaps = sorted({tuple(sorted((a, b))) for a, b in mapping.items() if a != b})
    print(f"wrote {N_EXAMPLES} examples to {DATA_FILE}; swapped pairs: {' '.join(a + b for a, b in swaps)}")


if __name__ == "__main__":
    main()
