"""Write ``paca_lightning/assets/mmlu_sample/``: a small MMLU-schema sample for tests and the demo.

    python scripts/make_mmlu_sample.py

Questions written for this project in the ``cais/mmlu`` schema (``question``, ``subject``,
``choices``, ``answer`` 0-3), in the splits the evaluation uses: ``dev`` (5 exemplars per
subject), ``test`` (scored) and ``auxiliary_train`` (fine-tuning; its subject is empty, as on the
hub). Arithmetic questions are generated from a seeded RNG, so the files are reproducible.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from paca_lightning.data import MMLU_SAMPLE_DIR  # noqa: E402

GEOGRAPHY = [
    ("Which is the largest ocean on Earth?", ["Atlantic", "Indian", "Pacific", "Arctic"], 2),
    ("What is the capital of Japan?", ["Osaka", "Tokyo", "Kyoto", "Nagoya"], 1),
    ("Which river flows through Cairo?", ["Nile", "Congo", "Niger", "Zambezi"], 0),
    ("On which continent is the Sahara desert?", ["Asia", "Australia", "South America", "Africa"], 3),
    ("Which country has the largest population in South America?", ["Argentina", "Brazil", "Peru", "Chile"], 1),
    ("What is the capital of Canada?", ["Toronto", "Vancouver", "Ottawa", "Montreal"], 2),
    ("Which mountain range separates Europe from Asia?", ["Alps", "Andes", "Ural Mountains", "Rockies"], 2),
    ("Which line divides the Earth into northern and southern hemispheres?",
     ["Equator", "Prime meridian", "Tropic of Cancer", "Arctic Circle"], 0),
    ("What is the longest river in Europe?", ["Danube", "Volga", "Rhine", "Loire"], 1),
    ("Which city is the capital of Australia?", ["Sydney", "Melbourne", "Perth", "Canberra"], 3),
]
ASTRONOMY = [
    ("Which planet is closest to the Sun?", ["Venus", "Mercury", "Earth", "Mars"], 1),
    ("What is the largest planet in the Solar System?", ["Saturn", "Neptune", "Jupiter", "Uranus"], 2),
    ("What causes the phases of the Moon?",
     ["Earth's shadow", "The Moon's orbit changing how much of its lit side we see", "Clouds",
      "The Sun's rotation"], 1),
    ("About how long does light from the Sun take to reach Earth?", ["8 minutes", "8 seconds", "8 hours", "8 days"], 0),
    ("Which planet is known as the red planet?", ["Jupiter", "Venus", "Mercury", "Mars"], 3),
    ("What is a light-year a measure of?", ["Time", "Brightness", "Distance", "Mass"], 2),
    ("Which force keeps the planets in orbit around the Sun?", ["Magnetism", "Gravity", "Friction", "Pressure"], 1),
    ("What is the Sun mostly made of?", ["Hydrogen", "Oxygen", "Iron", "Carbon"], 0),
    ("Which planet has the most famous ring system?", ["Mars", "Earth", "Saturn", "Mercury"], 2),
    ("What is the name of our galaxy?", ["Andromeda", "Milky Way", "Triangulum", "Sombrero"], 1),
]


def arithmetic_questions(rng: random.Random, count: int, subject: str) -> list[dict]:
    rows = []
    for _ in range(count):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        operation = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[operation]
        wrong = set()
        while len(wrong) < 3:
            candidate = value + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
            if candidate != value:
                wrong.add(candidate)
        choices = [value] + sorted(wrong)
        rng.shuffle(choices)
        rows.append({"question": f"What is {a} {operation} {b}?", "subject": subject,
                     "choices": [str(c) for c in choices], "answer": choices.index(value)})
    return rows


def main() -> int:
    rng = random.Random(0)
    written = {"dev": [], "test": [], "auxiliary_train": []}
    for subject, items in (("high_school_geography", GEOGRAPHY), ("astronomy", ASTRONOMY)):
        rows = [{"question": q, "subject": subject, "choices": c, "answer": a} for q, c, a in items]
        written["dev"] += rows[:5]
        written["test"] += rows[5:]
    maths = arithmetic_questions(rng, 11, "elementary_mathematics")
    written["dev"] += maths[:5]
    written["test"] += maths[5:]
    written["auxiliary_train"] = [dict(row, subject="") for row in arithmetic_questions(rng, 40, "")]
    MMLU_SAMPLE_DIR.mkdir(parents=True, exist_ok=True)
    for split, rows in written.items():
        with open(MMLU_SAMPLE_DIR / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} questions to {MMLU_SAMPLE_DIR / f'{split}.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
