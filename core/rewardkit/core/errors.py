"""Exceptions raised by `rewardkit.core`.

Hierarchy::

    RewardKitError
    ├── ConfigError          operator configuration is wrong (bad model path, bad option)
    ├── ModelLoadError       a model or checkpoint could not be loaded
    └── InputError           a caller's input cannot be scored (carries the offending field)
        └── ItemTooLongError an item exceeds max_length while truncation is off

The server maps `InputError` to a 4xx with `field`, everything else to a 5xx or a refusal to start.
"""

from __future__ import annotations


class RewardKitError(Exception):
    """Base class of every error rewardkit raises on purpose."""


class ConfigError(RewardKitError):
    """The operator's configuration is invalid; the message says how to fix it."""


class ModelLoadError(RewardKitError):
    """A model, tokenizer or head could not be loaded."""


class InputError(RewardKitError):
    """A caller's input is invalid. `field` names the offending field (e.g. ``items[3].messages``)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class ItemTooLongError(InputError):
    """An item is longer than the configured max_length and truncation is disabled."""
