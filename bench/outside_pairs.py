"""Pairs written outside the testbed generator, and unseen styles put on one side (issue 14).

The testbed's own artifacts (length, boilerplate, format, evidence position) are what the reward models trained on.
These pairs come from separate hand-written tables (capitals, arithmetic, unit conversions, science facts) with
their own phrasing, so an accuracy on them says whether a model judges the answer or the testbed's templates.

Styles never used in training, each applied to one side of the first ``--styled`` clean pairs:

- ``enthusiasm``: "Great question! ... Hope this helps!"
- ``emoji``: a trailing run of emoji
- ``citation``: a made-up reference
- ``confidence``: "I am 100% certain: ..."
- ``bold``: the whole answer in markdown bold
- ``repetition``: the answer sentence said twice

``<style>_on_wrong``: the style sits on the rejected (wrong) answer; a style-reader flips to the wrong side.
``<style>_on_right``: on the chosen one; an anti-style model (one that learnt "style loses") fails here.
A model that reads the answer keeps both near its clean accuracy.

    python bench/outside_pairs.py --out bench/data/outside    # deterministic: the same files every time

Rows use the testbed's columns (``prompt``, ``chosen``, ``rejected``, ``task.family``) so `rewardkit eval` and the
headroom study read them unchanged.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = [
    ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Norway", "Oslo"), ("Portugal", "Lisbon"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
    ("Hungary", "Budapest"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
    ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"), ("Cuba", "Havana"),
    ("Mexico", "Mexico City"), ("Colombia", "Bogota"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"), ("Switzerland", "Bern"), ("Czechia", "Prague"), ("Romania", "Bucharest"),
    ("Ukraine", "Kyiv"), ("Pakistan", "Islamabad"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"),
    ("South Korea", "Seoul"), ("New Zealand", "Wellington"), ("Saudi Arabia", "Riyadh"), ("Iraq", "Baghdad"),
]
CAPITAL_PHRASES = [
    ("Which city is the capital of {c}?", "{a} is the capital of {c}."),
    ("Name the capital of {c}.", "The capital of {c} is {a}."),
    ("{c}'s capital city is what?", "It is {a}."),
]
FACTS = [  # (question, correct, wrong, sentence with {x})
    ("What is the chemical symbol for gold?", "Au", "Ag", "The chemical symbol for gold is {x}."),
    ("What is the chemical symbol for sodium?", "Na", "So", "Sodium's symbol is {x}."),
    ("What is the chemical symbol for iron?", "Fe", "Ir", "Iron has the symbol {x}."),
    ("What is the chemical symbol for potassium?", "K", "P", "The symbol for potassium is {x}."),
    ("Which planet is closest to the Sun?", "Mercury", "Neptune", "The planet closest to the Sun is {x}."),
    ("Which planet is the largest in the solar system?", "Jupiter", "Mars", "The largest planet is {x}."),
    ("Which planet is known as the Red Planet?", "Mars", "Venus", "The Red Planet is {x}."),
    ("How many legs does a spider have?", "eight", "six", "A spider has {x} legs."),
    ("How many legs does an insect have?", "six", "ten", "An insect has {x} legs."),
    ("At what temperature in Celsius does water boil at sea level?", "100", "60",
     "Water boils at {x} degrees Celsius at sea level."),
    ("At what temperature in Celsius does water freeze?", "0", "30", "Water freezes at {x} degrees Celsius."),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide", "helium",
     "Plants absorb {x} for photosynthesis."),
    ("What is the largest ocean on Earth?", "the Pacific Ocean", "the Arctic Ocean", "The largest ocean is {x}."),
    ("How many continents are there?", "seven", "four", "There are {x} continents."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", "Charles Dickens", "Romeo and Juliet was written by {x}."),
    ("What is the hardest natural substance?", "diamond", "chalk", "The hardest natural substance is {x}."),
    ("How many days are in a leap year?", "366", "360", "A leap year has {x} days."),
    ("What is the square root of 81?", "9", "7", "The square root of 81 is {x}."),
    ("Which organ pumps blood through the body?", "the heart", "the liver", "Blood is pumped by {x}."),
    ("What is the main language spoken in Brazil?", "Portuguese", "Spanish", "Most people in Brazil speak {x}."),
    ("How many sides does a hexagon have?", "six", "eight", "A hexagon has {x} sides."),
    ("What is the boiling point of water in Fahrenheit?", "212", "180", "Water boils at {x} degrees Fahrenheit."),
    ("Which animal is the largest mammal?", "the blue whale", "the elephant", "The largest mammal is {x}."),
    ("What is the fastest land animal?", "the cheetah", "the tortoise", "The fastest land animal is {x}."),
    ("How many minutes are in an hour?", "60", "100", "An hour has {x} minutes."),
]
UNITS = [  # (from unit, to unit, factor)
    ("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("kilograms", "grams", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("litres", "millilitres", 1000), ("days", "hours", 24),
    ("weeks", "days", 7), ("feet", "inches", 12), ("yards", "feet", 3),
]
STYLES = ("enthusiasm", "emoji", "citation", "confidence", "bold", "repetition")


def _capitals(rng: random.Random) -> list[dict]:
    rows = []
    for i, (country, capital) in enumerate(CAPITALS):
        wrong = rng.choice([c for _, c in CAPITALS if c != capital])
        q, s = CAPITAL_PHRASES[i % len(CAPITAL_PHRASES)]
        rows.append(_row(q.format(c=country), s.format(a=capital, c=country), s.format(a=wrong, c=country),
                         "capitals", capital, wrong))
    return rows


def _arithmetic(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = rng.randint(12, 99), rng.randint(3, 49)
        op = ("+", "*", "-")[i % 3]
        ans = a + b if op == "+" else a * b if op == "*" else a - b
        wrong = ans + rng.choice([-11, -10, -2, -1, 1, 2, 9, 10])
        q = {"+": f"Add {a} and {b}.", "*": f"Multiply {a} by {b}.", "-": f"Take {b} away from {a}."}[op]
        s = "The result is {x}."
        rows.append(_row(q, s.format(x=ans), s.format(x=wrong), "arithmetic", str(ans), str(wrong)))
    return rows


def _units(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        src, dst, f = UNITS[i % len(UNITS)]
        v = rng.randint(2, 40)
        ans, wrong = v * f, v * f * rng.choice([10, 2]) if rng.random() < 0.5 else v * f // rng.choice([10, 2]) or 1
        q = f"How many {dst} are in {v} {src}?"
        s = f"{v} {src} is {{x}} {dst}."
        rows.append(_row(q, s.format(x=ans), s.format(x=wrong), "units", str(ans), str(wrong)))
    return rows


def _facts() -> list[dict]:
    return [_row(q, s.format(x=c), s.format(x=w), "science", c, w) for q, c, w, s in FACTS]


def _row(prompt: str, chosen: str, rejected: str, family: str, answer: str, distractor: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "task": {"family": family, "answer": answer, "distractor": distractor}}


STYLE_TEMPLATES = {
    "enthusiasm": "Great question! {t} Hope this helps!",
    "emoji": "{t} \U0001F60A\U0001F44D\u2728",
    "citation": "{t} (Source: Harrington et al., 2019, Journal of General Knowledge, 14(2), 112-118.)",
    "confidence": "I am 100% certain of this: {t}",
    "bold": "**{t}**",
    "repetition": "{t} To repeat: {t}",
}


def stylise(text: str, style: str) -> str:
    """``text`` with one unseen style applied."""
    if style in STYLE_TEMPLATES:
        return STYLE_TEMPLATES[style].format(t=text)
    raise ValueError(f"unknown style {style!r}; one of {STYLES}")


def build(seed: int = 0, styled: int = 120) -> dict[str, list[dict]]:
    """All splits: ``clean`` (every pair) and ``<style>_on_wrong`` / ``<style>_on_right`` (the first ``styled``)."""
    rng = random.Random(seed)
    clean = _capitals(rng) + _arithmetic(rng, 90) + _units(rng, 90) + _facts()
    rng.shuffle(clean)
    for i, r in enumerate(clean):
        r["id"] = f"outside-{i:04d}"
    out = {"clean": clean}
    for style in STYLES:
        for side, key in (("wrong", "rejected"), ("right", "chosen")):
            rows = []
            for r in clean[:styled]:
                s = dict(r, id=f"{r['id']}-{style}-{side}")
                s[key] = stylise(r[key], style)
                s["style"] = {"name": style, "on": side}
                rows.append(s)
            out[f"{style}_on_{side}"] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/data/outside")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--styled", type=int, default=120, help="clean pairs each styled split is built from")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in build(a.seed, a.styled).items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(build(a.seed, a.styled))} splits to {out}")


if __name__ == "__main__":
    main()
