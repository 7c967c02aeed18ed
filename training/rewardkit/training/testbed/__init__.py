"""Synthetic preference testbed: real-text pairs with known ground truth and controlled spurious artifacts.

Task families (``tasks``) give a prompt, a correct and a wrong answer, and a checker that decides
correctness from a response's text; artifacts (``artifacts``) add length, boilerplate, markdown or a
long-response evidence position, each recorded per row; ``build`` writes the splits and a manifest.
See docs/testbed.md.

Example::

    from rewardkit.training.testbed import make_testbed, check
    manifest = make_testbed("data/testbed", seed=0)
"""

from rewardkit.training.testbed.artifacts import ARTIFACTS
from rewardkit.training.testbed.build import (
    GENERATOR_VERSION,
    SPLITS,
    TestbedConfig,
    generate_split,
    make_testbed,
)
from rewardkit.training.testbed.tasks import FAMILIES, check

__all__ = [
    "ARTIFACTS",
    "FAMILIES",
    "GENERATOR_VERSION",
    "SPLITS",
    "TestbedConfig",
    "check",
    "generate_split",
    "make_testbed",
]
