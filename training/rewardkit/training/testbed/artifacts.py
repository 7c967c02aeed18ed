"""Spurious artifacts of the testbed and the rendering of a response around its deciding sentence.

Four artifacts, each switched on or off per row and per response independently:

* ``length``: the response is padded with 2-4 extra neutral sentences;
* ``boilerplate``: a politeness opener and closer ("Great question!" ... "I hope this helps.");
* ``format``: markdown, either a bullet list of the sentences or the deciding sentence in bold;
* ``evidence_position``: both responses are long (neutral filler around the deciding sentence) and
  the deciding sentence sits late (near the end, where the reward token reads it easily) or early
  (followed by much filler).

For ``length``/``boilerplate``/``format`` the artifact sits on one response and ``agrees`` means it is
on the chosen one (a model that rewards the artifact would be right). ``evidence_position`` always
sits on both responses; ``agrees`` means the evidence is late, the position in which a model that only
reads the end of a response is right.

All pools below are neutral: no digits, no place or person names, no colours, no number words, no
quotation marks, nothing a task checker looks for (``tests/unit/training/test_testbed.py`` checks it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from rewardkit.training.testbed.tasks import Evidence

__all__ = [
    "ARTIFACTS",
    "BOILERPLATE_CLOSERS",
    "BOILERPLATE_OPENERS",
    "FILLER",
    "ArtifactPlan",
    "RowPlan",
    "render",
]

ARTIFACTS: tuple[str, ...] = ("length", "boilerplate", "format", "evidence_position")
Side = Literal["chosen", "rejected"]
On = Literal["chosen", "rejected", "both", "none"]

FILLER: tuple[str, ...] = (
    "It is always worth reading a question carefully before answering it.",
    "Questions like this come up often in everyday conversation.",
    "Taking a moment to think usually leads to a better answer.",
    "Many people find this kind of question easy once they have seen it before.",
    "A clear answer is more useful than a long explanation.",
    "It helps to keep the original question in mind while reading the reply.",
    "Checking the details is a good habit in general.",
    "This sort of thing is often taught in school.",
    "Some people like to work through such questions slowly.",
    "Being precise matters when someone relies on the answer.",
    "It is easy to make a small slip when answering quickly.",
    "Writing things down can make them easier to follow.",
    "There are usually several ways to explain an answer.",
    "Good explanations tend to be short and direct.",
    "Reading the answer twice is a simple way to catch mistakes.",
    "People often remember facts better when they see them in context.",
    "The wording of a question can make it seem harder than it is.",
    "A calm approach tends to work well for questions of this kind.",
    "Small details can change the meaning of an answer.",
    "Most readers appreciate an answer that gets to the point.",
    "It can be useful to compare an answer with what you already know.",
    "Learning something new is easier when it is explained plainly.",
    "Some questions look simple but deserve a careful look.",
    "An answer should match exactly what was asked.",
    "Practice makes questions like this feel routine.",
    "It is fine to double check an answer when in doubt.",
    "Clear language makes any answer easier to trust.",
    "The same kind of question can be asked in many different ways.",
    "Thinking about the question from another angle can help.",
    "Everyone makes the occasional mistake with questions like this.",
    "Explaining the reasoning can make an answer more convincing.",
    "A good answer leaves little room for confusion.",
    "It is worth taking the question at face value.",
    "Often the simplest reading of a question is the correct reading.",
    "Some readers prefer answers with a little background.",
    "Staying focused on the question keeps the answer relevant.",
    "Answers are easier to use when they are stated plainly.",
    "A quick review can confirm that nothing was overlooked.",
    "Keeping an answer tidy makes it pleasant to read.",
    "Such questions are a nice way to exercise the mind.",
)

BOILERPLATE_OPENERS: tuple[str, ...] = (
    "Great question!",
    "Thanks for asking!",
    "What a great question.",
    "Happy to help with this!",
    "Sure, I would be glad to help.",
    "Absolutely, let me help you with that.",
)
BOILERPLATE_CLOSERS: tuple[str, ...] = (
    "I hope this helps!",
    "Let me know if you have any other questions.",
    "Feel free to ask if anything is unclear.",
    "Hope that clears things up!",
    "I hope this answer is useful to you.",
)


@dataclass(frozen=True)
class ArtifactPlan:
    """Where one artifact sits in a row. ``position`` is only set for ``evidence_position``."""

    present: bool = False
    on: On = "none"
    agrees: bool = False
    position: Literal["early", "late"] | None = None

    def applies_to(self, side: Side) -> bool:
        """Does this artifact change the ``side`` response?"""
        return self.present and self.on in (side, "both")

    def to_json(self) -> dict[str, object]:
        """The row's ``artifacts[name]`` record."""
        out: dict[str, object] = {"present": self.present, "on": self.on, "agrees": self.agrees}
        if self.position is not None:
            out["position"] = self.position
        return out


@dataclass(frozen=True)
class RowPlan:
    """Every random choice of one row's rendering, drawn once so both responses share them."""

    artifacts: dict[str, ArtifactPlan]
    support_first: bool
    padding: tuple[str, ...]
    opener: str
    closer: str
    markdown: Literal["bullets", "bold"]
    long_filler: tuple[str, ...]
    evidence_index: int

    @classmethod
    def draw(
        cls, rng: random.Random, artifacts: dict[str, ArtifactPlan], *, long_range: tuple[int, int] = (6, 10)
    ) -> RowPlan:
        """Draw the shared choices. ``long_range`` bounds the filler count of long responses."""
        ep = artifacts["evidence_position"]
        n_long = rng.randint(*long_range) if ep.present else 0
        long_filler = tuple(rng.sample(FILLER, n_long))
        if ep.position == "early":
            evidence_index = rng.randint(0, 1)
        elif ep.position == "late":
            evidence_index = n_long - rng.randint(0, 1)
        else:
            evidence_index = 0
        return cls(
            artifacts=artifacts,
            support_first=rng.random() < 0.3,
            padding=tuple(rng.sample(FILLER, rng.randint(2, 4))),
            opener=rng.choice(BOILERPLATE_OPENERS),
            closer=rng.choice(BOILERPLATE_CLOSERS),
            markdown=rng.choice(["bullets", "bold"]),
            long_filler=long_filler,
            evidence_index=evidence_index,
        )


def render(
    evidence: Evidence, support: tuple[str, ...], plan: RowPlan, side: Side
) -> tuple[str, tuple[int, int]]:
    """Assemble one response; return its text and the span of the answer phrase in it."""
    arts = plan.artifacts
    if arts["evidence_position"].applies_to(side):
        body = list(plan.long_filler)
        body.insert(plan.evidence_index, evidence.sentence)
        ev = plan.evidence_index
    else:
        body = [*support, evidence.sentence] if plan.support_first else [evidence.sentence, *support]
        ev = len(support) if plan.support_first else 0
    if arts["length"].applies_to(side):
        body += plan.padding
    if arts["boilerplate"].applies_to(side):
        body = [plan.opener, *body, plan.closer]
        ev += 1
    prefix = ""
    if arts["format"].applies_to(side):
        if plan.markdown == "bullets" and len(body) > 1:
            prefix, sep = "- ", "\n"
            body = [prefix + s for s in body]
        else:
            prefix, sep = "**", " "
            body[ev] = f"**{body[ev]}**"
    else:
        sep = " "
    start = sum(len(s) + len(sep) for s in body[:ev]) + len(prefix) + evidence.span[0]
    text = sep.join(body)
    span = (start, start + evidence.span[1] - evidence.span[0])
    assert text[span[0] : span[1]] == evidence.answer, (text, span, evidence)
    return text, span
