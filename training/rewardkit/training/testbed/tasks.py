"""Task families of the testbed: each generates a prompt with one correct and one wrong answer sentence,
and has a checker that decides correctness from a response's text alone.

A family is ``generate(rng) -> TaskInstance`` plus ``check(task_meta, response_text) -> bool``. The
checkers only look for the deciding content (the answer number, the capital, the quoted word, ...), so
they keep working when the artifacts add neutral sentences, politeness phrases or markdown around it.
The filler and boilerplate pools (``artifacts.py``) are written so they never contain anything a
checker looks for: no digits, no place names, no colours, no quotation marks.

Example::

    inst = generate_task("arithmetic", random.Random(0))
    assert check(inst.meta, inst.chosen.sentence) and not check(inst.meta, inst.rejected.sentence)
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FAMILIES",
    "DEFAULT_FAMILY_WEIGHTS",
    "Evidence",
    "TaskInstance",
    "check",
    "generate_task",
]


@dataclass(frozen=True)
class Evidence:
    """The deciding sentence of a response; ``span`` is the answer phrase inside it (char offsets)."""

    sentence: str
    span: tuple[int, int]

    @property
    def answer(self) -> str:
        """The answer phrase the span points at."""
        return self.sentence[self.span[0] : self.span[1]]


@dataclass(frozen=True)
class TaskInstance:
    """A generated question: prompt, task metadata for the checker, and both evidence sentences.

    ``support`` holds optional task-specific neutral sentences shared by both responses.
    """

    family: str
    prompt: str
    meta: dict[str, Any]
    chosen: Evidence
    rejected: Evidence
    support: tuple[str, ...] = ()


def _evidence(template: str, answer: str, **slots: Any) -> Evidence:
    """Fill ``template`` (which holds ``{answer}`` exactly once) and record where the answer landed."""
    left, sep, right = template.partition("{answer}")
    assert sep and "{answer}" not in right, template
    left, right = left.format(**slots), right.format(**slots)
    return Evidence(left + answer + right, (len(left), len(left) + len(answer)))


def _capitalize_first(s: str) -> str:
    return s[:1].upper() + s[1:]


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")


def _numbers(text: str) -> list[float]:
    """Every number written in digits in ``text`` ("3,500" -> 3500.0, "2.5" -> 2.5)."""
    return [float(m.group().replace(",", "")) for m in _NUMBER_RE.finditer(text)]


def _fmt(x: float) -> str:
    """3500 -> '3,500', 2.5 -> '2.5'."""
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,}"


def _only_answer(text: str, answer: float, quoted: set[float]) -> bool:
    """True iff the numbers of ``text``, apart from those quoted from the question, are exactly ``answer``."""
    rest = {n for n in _numbers(text) if n not in quoted}
    return rest == {answer}


_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split()
)
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0..99 in English words: 42 -> 'forty-two'."""
    assert 0 <= n < 100, n
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def _has_word(text: str, phrase: str, *, case: bool = False) -> bool:
    flags = 0 if case else re.IGNORECASE
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text, flags) is not None


# ---------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------

_ARITH_PROMPTS = {
    "+": ["What is {a} + {b}?", "Calculate {a} plus {b}.", "What do you get when you add {a} and {b}?"],
    "-": [
        "What is {a} - {b}?",
        "Calculate {a} minus {b}.",
        "What do you get when you subtract {b} from {a}?",
    ],
    "*": ["What is {a} × {b}?", "Calculate {a} times {b}.", "What do you get when you multiply {a} by {b}?"],
}
_ARITH_ANSWERS = {
    "+": [
        "{a} + {b} equals {answer}.",
        "The sum of {a} and {b} is {answer}.",
        "Adding {a} and {b} gives {answer}.",
    ],
    "-": [
        "{a} - {b} equals {answer}.",
        "The difference between {a} and {b} is {answer}.",
        "Subtracting {b} from {a} leaves {answer}.",
    ],
    "*": [
        "{a} times {b} equals {answer}.",
        "The product of {a} and {b} is {answer}.",
        "Multiplying {a} by {b} gives {answer}.",
    ],
}
_ARITH_SUPPORT = [
    "Working it out step by step gives the result.",
    "This is a simple calculation to check by hand.",
    "The result follows directly from the numbers in the question.",
]


def _gen_arithmetic(rng: random.Random) -> TaskInstance:
    op = rng.choices(["+", "-", "*"], weights=[0.45, 0.3, 0.25])[0]
    while True:
        if op == "+":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            ans = a + b
        elif op == "-":
            a = rng.randint(20, 99)
            b = rng.randint(5, a - 5)
            ans = a - b
        else:
            a, b = rng.randint(2, 12), rng.randint(3, 12)
            ans = a * b
        wrong = ans + rng.choice([-10, -2, -1, 1, 2, 10] if op != "*" else [-b, -1, 1, b, a])
        if ans not in (a, b) and wrong not in (a, b, ans) and wrong > 0:
            break
    k = rng.randrange(3)
    prompt = _ARITH_PROMPTS[op][rng.randrange(3)].format(a=a, b=b)
    template = _ARITH_ANSWERS[op][k]
    support = (rng.choice(_ARITH_SUPPORT),) if rng.random() < 0.4 else ()
    return TaskInstance(
        family="arithmetic",
        prompt=prompt,
        meta={"family": "arithmetic", "op": op, "a": a, "b": b, "answer": ans, "distractor": wrong},
        chosen=_evidence(template, str(ans), a=a, b=b),
        rejected=_evidence(template, str(wrong), a=a, b=b),
        support=support,
    )


def _check_arithmetic(meta: dict[str, Any], text: str) -> bool:
    return _only_answer(text, float(meta["answer"]), {float(meta["a"]), float(meta["b"])})


# ---------------------------------------------------------------------------------------------
# Unit conversion
# ---------------------------------------------------------------------------------------------

# (from singular, from plural, to plural, factor, confusable wrong factors)
_CONVERSIONS: list[tuple[str, str, str, int, tuple[int, ...]]] = [
    ("kilometer", "kilometers", "meters", 1000, (100, 10000)),
    ("meter", "meters", "centimeters", 100, (10, 1000)),
    ("kilogram", "kilograms", "grams", 1000, (100, 10000)),
    ("liter", "liters", "milliliters", 1000, (100, 10000)),
    ("hour", "hours", "minutes", 60, (100, 30)),
    ("minute", "minutes", "seconds", 60, (100, 30)),
    ("day", "days", "hours", 24, (12, 20)),
    ("week", "weeks", "days", 7, (5, 10)),
    ("foot", "feet", "inches", 12, (10, 3)),
    ("yard", "yards", "feet", 3, (12, 2)),
]
_UNIT_PROMPTS = [
    "How many {to} are in {v} {frm}?",
    "Convert {v} {frm} to {to}.",
    "What is {v} {frm} in {to}?",
]
_UNIT_ANSWERS = [
    "{v} {frm} is equal to {answer} {to}.",
    "There are {answer} {to} in {v} {frm}.",
    "Converted to {to}, {v} {frm} comes to {answer}.",
]


def _gen_unit(rng: random.Random) -> TaskInstance:
    frm1, frm, to, factor, confusable = rng.choice(_CONVERSIONS)
    halves = factor % 2 == 0
    while True:
        v: float = rng.choice([1.5, 2.5, 3.5, 4.5]) if halves and rng.random() < 0.3 else rng.randint(2, 12)
        ans = v * factor
        candidates = [v * f for f in confusable] + [ans * 10, (v + 1) * factor, (v - 1) * factor]
        wrong = rng.choice(candidates)
        if float(wrong).is_integer() and wrong > 0 and wrong not in (ans, v):
            ans, wrong = int(ans), int(wrong)
            break
    slots = {"v": _fmt(v), "frm": frm, "to": to}
    template = rng.choice(_UNIT_ANSWERS)
    return TaskInstance(
        family="unit_conversion",
        prompt=rng.choice(_UNIT_PROMPTS).format(**slots),
        meta={
            "family": "unit_conversion",
            "value": v,
            "from": frm1,
            "to": to,
            "answer": ans,
            "distractor": wrong,
        },
        chosen=_evidence(template, _fmt(ans), **slots),
        rejected=_evidence(template, _fmt(wrong), **slots),
    )


def _check_unit(meta: dict[str, Any], text: str) -> bool:
    return _only_answer(text, float(meta["answer"]), {float(meta["value"])})


# ---------------------------------------------------------------------------------------------
# Table lookup
# ---------------------------------------------------------------------------------------------

# (intro, row header, row names, column names, value range, question, answer template)
_TABLES: list[tuple[str, str, list[str], list[str], tuple[int, int], str, str]] = [
    (
        "Here are the sales of a market stall this week:",
        "Day",
        ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"],
        ["Apples", "Pears", "Plums", "Cherries", "Lemons"],
        (10, 99),
        "How many {col} did the stall sell on {row}?",
        "On {row}, the stall sold {answer} {col}.",
    ),
    (
        "Here are the exam scores of a small class:",
        "Student",
        ["Alice", "Ben", "Chloe", "Daniel", "Emma", "Farid", "Grace"],
        ["Math", "History", "Science", "Music", "Art"],
        (40, 100),
        "What score did {row} get in {col}?",
        "{row} scored {answer} in {col}.",
    ),
    (
        "Here is the rainfall, in millimeters, recorded in some towns:",
        "Town",
        ["Ashford", "Brookvale", "Cedarton", "Dunmore", "Elmwick", "Fernley"],
        ["March", "April", "May", "June", "July"],
        (11, 99),
        "How much rain fell in {row} in {col}?",
        "{row} recorded {answer} millimeters of rain in {col}.",
    ),
    (
        "Here are the points scored by each team in a tournament:",
        "Team",
        ["Falcons", "Tigers", "Wolves", "Sharks", "Hawks", "Bears"],
        ["Round one", "Round two", "Round three", "Final"],
        (12, 98),
        "How many points did the {row} score in {col_lower}?",
        "The {row} scored {answer} points in {col_lower}.",
    ),
]


def _gen_table(rng: random.Random) -> TaskInstance:
    intro, header, row_pool, col_pool, (lo, hi), question, template = rng.choice(_TABLES)
    rows = rng.sample(row_pool, rng.randint(3, 4))
    cols = rng.sample(col_pool, 3)
    values = rng.sample(range(lo, hi + 1), len(rows) * len(cols))
    cell = {(r, c): values[i * len(cols) + j] for i, r in enumerate(rows) for j, c in enumerate(cols)}
    r, c = rng.choice(rows), rng.choice(cols)
    # The typical lookup slip: a neighbouring cell in the same row or the same column.
    neighbours = [(r, c2) for c2 in cols if c2 != c] + [(r2, c) for r2 in rows if r2 != r]
    wr, wc = rng.choice(neighbours)
    lines = [intro, "", "| " + " | ".join([header, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    lines += ["| " + " | ".join([row, *(str(cell[row, col]) for col in cols)]) + " |" for row in rows]
    # Months keep their capital letter; fruit, subject and round names read lower-case in a sentence.
    slots = {"row": r, "col": c if header == "Town" else c.lower(), "col_lower": c.lower()}
    prompt = "\n".join(lines) + "\n\n" + question.format(**slots)
    return TaskInstance(
        family="table_lookup",
        prompt=prompt,
        meta={
            "family": "table_lookup",
            "row": r,
            "column": c,
            "answer": cell[r, c],
            "distractor": cell[wr, wc],
            "distractor_cell": [wr, wc],
        },
        chosen=_evidence(_capitalize_first(template), str(cell[r, c]), **slots),
        rejected=_evidence(_capitalize_first(template), str(cell[wr, wc]), **slots),
    )


def _check_table(meta: dict[str, Any], text: str) -> bool:
    return _only_answer(text, float(meta["answer"]), set())


# ---------------------------------------------------------------------------------------------
# Facts: capitals and general knowledge
# ---------------------------------------------------------------------------------------------

# country -> capital; no capital name contains its country's name or vice versa.
CAPITALS: dict[str, str] = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Russia": "Moscow",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Brazil": "Brasília",
    "Argentina": "Buenos Aires",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Ireland": "Dublin",
    "the United Kingdom": "London",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Colombia": "Bogotá",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Indonesia": "Jakarta",
    "the Philippines": "Manila",
    "Iran": "Tehran",
    "Switzerland": "Bern",
    "the Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "the Czech Republic": "Prague",
    "Morocco": "Rabat",
    "Nigeria": "Abuja",
    "Pakistan": "Islamabad",
    "New Zealand": "Wellington",
    "Ukraine": "Kyiv",
    "Cuba": "Havana",
    "Venezuela": "Caracas",
    "Ethiopia": "Addis Ababa",
    "Saudi Arabia": "Riyadh",
    "Romania": "Bucharest",
}
# A well-known city that is not the capital: the classic wrong answer.
FAMOUS_NON_CAPITALS: dict[str, str] = {
    "Australia": "Sydney",
    "Canada": "Toronto",
    "Turkey": "Istanbul",
    "Brazil": "Rio de Janeiro",
    "Switzerland": "Zurich",
    "India": "Mumbai",
    "China": "Shanghai",
    "Morocco": "Casablanca",
    "Nigeria": "Lagos",
    "Pakistan": "Karachi",
    "New Zealand": "Auckland",
    "Vietnam": "Ho Chi Minh City",
    "Spain": "Barcelona",
    "Italy": "Milan",
    "Germany": "Munich",
    "Japan": "Osaka",
    "Russia": "Saint Petersburg",
    "Colombia": "Medellín",
    "Saudi Arabia": "Jeddah",
}
_ALL_CITIES = tuple(sorted(set(CAPITALS.values()) | set(FAMOUS_NON_CAPITALS.values())))

_CAPITAL_PROMPTS = [
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
]
_CAPITAL_ANSWERS = [
    "The capital of {country} is {answer}.",
    "{Country} has {answer} as its capital.",
    "The capital city of {country} is {answer}.",
]

# (question, answer template, correct, wrong options)
GENERAL_FACTS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("How many legs does a spider have?", "A spider has {answer} legs.", "eight", ("six", "ten")),
    (
        "Which planet is known as the Red Planet?",
        "The planet known as the Red Planet is {answer}.",
        "Mars",
        ("Venus", "Jupiter"),
    ),
    (
        "What is the largest ocean on Earth?",
        "The largest ocean on Earth is the {answer} Ocean.",
        "Pacific",
        ("Atlantic", "Indian"),
    ),
    (
        "What is the chemical symbol for gold?",
        "The chemical symbol for gold is {answer}.",
        "Au",
        ("Ag", "Go"),
    ),
    (
        "Who wrote Romeo and Juliet?",
        "Romeo and Juliet was written by {answer}.",
        "William Shakespeare",
        ("Charles Dickens", "Jane Austen"),
    ),
    ("How many days are there in a week?", "A week has {answer} days.", "seven", ("five", "eight")),
    ("How many continents are there?", "There are {answer} continents.", "seven", ("six", "nine")),
    (
        "What is the tallest mountain in the world?",
        "The tallest mountain in the world is Mount {answer}.",
        "Everest",
        ("Kilimanjaro", "Fuji"),
    ),
    (
        "What is the largest mammal?",
        "The largest mammal is the {answer}.",
        "blue whale",
        ("African elephant", "giraffe"),
    ),
    (
        "What is the largest planet in our solar system?",
        "The largest planet in our solar system is {answer}.",
        "Jupiter",
        ("Saturn", "Neptune"),
    ),
    (
        "In which country are the pyramids of Giza?",
        "The pyramids of Giza are in {answer}.",
        "Egypt",
        ("Mexico", "Greece"),
    ),
    (
        "What is the main language spoken in Brazil?",
        "The main language spoken in Brazil is {answer}.",
        "Portuguese",
        ("Spanish", "French"),
    ),
    ("How many sides does a triangle have?", "A triangle has {answer} sides.", "three", ("four", "five")),
    ("What do bees make?", "Bees make {answer}.", "honey", ("milk", "silk")),
    (
        "Which organ pumps blood through the body?",
        "The organ that pumps blood through the body is the {answer}.",
        "heart",
        ("liver", "stomach"),
    ),
    (
        "What gas do plants take in from the air to make their food?",
        "Plants take in {answer} from the air to make their food.",
        "carbon dioxide",
        ("oxygen", "helium"),
    ),
    (
        "What is the freezing point of water in degrees Celsius?",
        "Water freezes at {answer} degrees Celsius.",
        "zero",
        ("ten", "thirty-two"),
    ),
    (
        "Who painted the Mona Lisa?",
        "The Mona Lisa was painted by {answer}.",
        "Leonardo da Vinci",
        ("Vincent van Gogh", "Pablo Picasso"),
    ),
    (
        "What is the hardest natural substance?",
        "The hardest natural substance is {answer}.",
        "diamond",
        ("granite", "iron"),
    ),
    (
        "Which animal is known as the king of the jungle?",
        "The animal known as the king of the jungle is the {answer}.",
        "lion",
        ("tiger", "bear"),
    ),
]


def _gen_facts(rng: random.Random) -> TaskInstance:
    if rng.random() < 0.65:
        country = rng.choice(sorted(CAPITALS))
        capital = CAPITALS[country]
        famous = FAMOUS_NON_CAPITALS.get(country)
        if famous is not None and rng.random() < 0.5:
            wrong = famous
        else:
            wrong = rng.choice([c for c in sorted(CAPITALS.values()) if c != capital])
        slots = {"country": country, "Country": _capitalize_first(country)}
        template = rng.choice(_CAPITAL_ANSWERS)
        return TaskInstance(
            family="facts",
            prompt=rng.choice(_CAPITAL_PROMPTS).format(**slots),
            meta={
                "family": "facts",
                "kind": "capital",
                "country": country,
                "answer": capital,
                "distractor": wrong,
            },
            chosen=_evidence(template, capital, **slots),
            rejected=_evidence(template, wrong, **slots),
        )
    question, template, answer, wrongs = rng.choice(GENERAL_FACTS)
    wrong = rng.choice(wrongs)
    return TaskInstance(
        family="facts",
        prompt=question,
        meta={
            "family": "facts",
            "kind": "general",
            "answer": answer,
            "wrong_options": list(wrongs),
            "distractor": wrong,
        },
        chosen=_evidence(template, answer),
        rejected=_evidence(template, wrong),
    )


def _check_facts(meta: dict[str, Any], text: str) -> bool:
    answer = meta["answer"]
    others = _ALL_CITIES if meta["kind"] == "capital" else tuple(meta["wrong_options"])
    return _has_word(text, answer, case=True) and not any(
        _has_word(text, o, case=True) for o in others if o != answer
    )


# ---------------------------------------------------------------------------------------------
# Format-instruction following
# ---------------------------------------------------------------------------------------------

_CATEGORIES: dict[str, tuple[str, ...]] = {
    "colors": ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown"),
    "fruits": ("apple", "banana", "cherry", "mango", "grape", "peach", "lemon", "kiwi"),
    "animals": ("dog", "cat", "horse", "rabbit", "elephant", "zebra", "penguin", "dolphin"),
}


def _join_list(items: list[str]) -> str:
    """['a'] -> 'a'; ['a', 'b'] -> 'a and b'; ['a', 'b', 'c'] -> 'a, b, and c'."""
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ", and " + items[-1]


def _gen_format(rng: random.Random) -> TaskInstance:
    kind = rng.choice(["uppercase", "number_words", "quoted", "list_count"])
    if kind == "uppercase":
        country = rng.choice(sorted(CAPITALS))
        capital = CAPITALS[country]
        slots: dict[str, Any] = {"country": country, "Country": _capitalize_first(country)}
        template = rng.choice(_CAPITAL_ANSWERS)
        prompt = f"What is the capital of {country}? Write the name of the city in capital letters."
        good, bad = capital.upper(), capital
        meta: dict[str, Any] = {"answer": capital}
    elif kind == "number_words":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        slots = {"a": a, "b": b}
        template = rng.choice(["{a} plus {b} makes {answer}.", "The sum of {a} and {b} is {answer}."])
        prompt = f"What is {a} + {b}? Write the answer in words, not digits."
        good, bad = number_words(a + b), str(a + b)
        meta = {"a": a, "b": b, "answer": a + b}
    elif kind == "quoted":
        question, template, answer, _ = rng.choice(GENERAL_FACTS)
        slots = {}
        prompt = f"{question} Put the key part of your answer in double quotation marks."
        good, bad = f'"{answer}"', answer
        meta = {"answer": answer}
    else:
        category = rng.choice(sorted(_CATEGORIES))
        n = rng.randint(2, 5)
        pool = list(_CATEGORIES[category])
        items = rng.sample(pool, n + 1)
        wrong_n = n + 1 if rng.random() < 0.6 else n - 1
        slots = {"category": category}
        template = rng.choice(["Here are some {category}: {answer}.", "A few {category} are {answer}."])
        prompt = f"Name exactly {number_words(n)} {category}."
        good, bad = _join_list(items[:n]), _join_list(items[:wrong_n])
        meta = {"category": category, "count": n}
    return TaskInstance(
        family="format",
        prompt=prompt,
        meta={"family": "format", "kind": kind, **meta},
        chosen=_evidence(template, good, **slots),
        rejected=_evidence(template, bad, **slots),
    )


def _check_format(meta: dict[str, Any], text: str) -> bool:
    kind = meta["kind"]
    if kind == "uppercase":
        found = re.findall(re.escape(meta["answer"]), text, re.IGNORECASE)
        return bool(found) and all(f == f.upper() for f in found)
    if kind == "number_words":
        n = int(meta["answer"])
        quoted = {float(meta["a"]), float(meta["b"])}
        return _has_word(text, number_words(n)) and not any(x not in quoted for x in _numbers(text))
    if kind == "quoted":
        return re.search(re.escape(f'"{meta["answer"]}"'), text, re.IGNORECASE) is not None
    if kind == "list_count":
        words = _CATEGORIES[meta["category"]]
        return sum(_has_word(text, w) for w in words) == int(meta["count"])
    raise ValueError(f"unknown format task kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# The families
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A task family: a generator and a checker."""

    name: str
    generate: Callable[[random.Random], TaskInstance]
    check: Callable[[dict[str, Any], str], bool]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("arithmetic", _gen_arithmetic, _check_arithmetic),
        Family("unit_conversion", _gen_unit, _check_unit),
        Family("table_lookup", _gen_table, _check_table),
        Family("facts", _gen_facts, _check_facts),
        Family("format", _gen_format, _check_format),
    )
}

# Weighted towards what a frozen SmolLM2-135M already knows (facts, arithmetic); see docs/testbed.md.
DEFAULT_FAMILY_WEIGHTS: dict[str, float] = {
    "facts": 0.32,
    "arithmetic": 0.28,
    "table_lookup": 0.15,
    "format": 0.15,
    "unit_conversion": 0.10,
}


def generate_task(family: str, rng: random.Random) -> TaskInstance:
    """Generate one instance of ``family`` (a key of :data:`FAMILIES`)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family].generate(rng)


def check(task_meta: dict[str, Any], response_text: str) -> bool:
    """Is ``response_text`` a correct answer to the task described by ``task_meta`` (a row's ``task``)?"""
    family = task_meta.get("family")
    if family not in FAMILIES:
        raise ValueError(f"task.family must be one of {sorted(FAMILIES)}, got {family!r}")
    return FAMILIES[family].check(task_meta, response_text)
