"""Data types returned by the rewardkit client, and the pydantic models that read server responses.

The response models are lenient about extra fields (a newer server may add some) and strict about the
ones the client relies on; a violation becomes :class:`~rewardkit.client.errors.ResponseFormatError`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from rewardkit.client.errors import ResponseFormatError

__all__ = ["ComponentInfo", "ComposedReward", "DenseReward", "ModelInfo", "Scores"]


@dataclass(eq=False)
class DenseReward:
    """Scalar reward plus its token-level (ABC) redistribution for one item.

    Attributes:
        reward: the scalar reward of the whole response.
        token_rewards: ``(n,)`` float32; with ``beta=1`` they sum to ``reward`` (ABC credit).
        tokens: the reward model's tokens of the response, or ``None`` when the rewards were
            projected onto caller-given ``response_token_spans``.
        spans: ``(n, 2)`` int64 character offsets ``[start, end)`` of each entry inside the response.
        model, head_version: which model and head scored it (as ``Scores`` carries them).

    Example::

        >>> d = client.score_dense(prompts=["2+2?"], responses=["4"])[0]
        >>> d.token_rewards.shape == (len(d.spans),)
        True
    """

    reward: float
    token_rewards: np.ndarray
    tokens: list[str] | None = None
    spans: np.ndarray = field(default_factory=lambda: np.empty((0, 2), dtype=np.int64))
    model: str | None = None  # the model id the server reported
    head_version: str | None = None  # the head that scored this item

    def __len__(self) -> int:
        return int(self.token_rewards.shape[0])


@dataclass
class ComposedReward:
    """One item's reward from a composition (``rewards={name: weight}``): the weighted sum and its parts.

    Attributes:
        reward: ``sum(weight * part)``, or ``None`` when a part could not score this item (see ``errors``).
        components: each part's unweighted value (``None`` for a part with an error).
        errors: part name -> why it could not score this item (empty when all parts scored).
        weights: the weights the server summed with.
        num_tokens: tokens the models read for this item (summed over the models).
        model, head_version: ``composite`` and each model's ``name:version``.

    Example::

        >>> c = rk.compose(prompts=["2+2?"], responses=["4"], references=["4"],
        ...                rewards={"default": 1.0, "numeric_match": 2.0})[0]
        >>> c.reward == c.components["default"] + 2.0 * c.components["numeric_match"]
        True
    """

    reward: float | None
    components: dict[str, float | None]
    errors: dict[str, str] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    num_tokens: int | None = None
    model: str | None = None
    head_version: str | None = None


class Scores(list[float]):
    """Scalar rewards in input order (a plain ``list[float]``) that also say which model and head produced them.

    Attributes:
        model: the model id the server reported.
        head_version: the head version of the response; when a long input was split over several requests and a
            head was swapped between them, the version of the last one (``head_versions`` has one per item).
        head_versions: per item, the head version that scored it.

    Example::

        >>> s = rk.score(prompts=["2+2?"], responses=["4"])
        >>> s[0], s.head_version
        (1.9, 'a3f9c2d1e4b5')
    """

    def __init__(self, values: list[float] | None = None, *, model: str | None = None,
                 head_versions: list[str | None] | None = None) -> None:
        super().__init__(values or [])
        self.model = model
        self.head_versions: list[str | None] = list(head_versions or [None] * len(self))

    @property
    def head_version(self) -> str | None:
        return self.head_versions[-1] if self.head_versions else None

    def extend_from(self, other: Scores) -> None:
        self.extend(other)
        self.head_versions.extend(other.head_versions)
        self.model = other.model or self.model


class ModelInfo(BaseModel):
    """One entry of ``GET /v1/models``."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    id: str
    head_version: str | None = None
    trained: bool | None = None
    description: str | None = None
    max_length: int | None = None
    dtype: str | None = None
    device: str | None = None
    reward_token_rule: str | None = None
    readout: str | None = None
    readout_layer: int | None = None
    ll_weight: float | None = None
    name: str | None = None  # the name `model` and `rewards` use (a server that serves one model: "default")


class ComponentInfo(BaseModel):
    """A reward component of ``GET /v1/models`` (``components``)."""

    model_config = ConfigDict(extra="allow")

    name: str
    kind: str
    description: str | None = None
    needs_reference: bool = False
    config: dict[str, Any] = {}


class _ModelList(BaseModel):
    model_config = ConfigDict(extra="allow")

    data: list[ModelInfo]
    components: list[ComponentInfo] = []
    default_rewards: dict[str, float] = {}


class _DenseResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    token_rewards: str | list[float]
    dtype: str = "float32"
    tokens: list[str] | None = None
    spans: list[list[int]] | None = None
    beta: float | None = None


class _RewardResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    reward: float | None
    num_tokens: int | None = None
    truncated: bool = False
    dense: _DenseResult | None = None
    components: dict[str, float | None] | None = None
    errors: dict[str, str] | None = None


class _RewardsResponse(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str | None = None
    head_version: str | None = None
    rewards: list[float | None]
    weights: dict[str, float] | None = None
    results: list[_RewardResult] | None = None
    usage: dict[str, Any] | None = None


def decode_float32(value: str | list[float], what: str = "token_rewards") -> np.ndarray:
    """Decode a dense vector: base64 of little-endian float32, or a JSON list of floats.

    Returns a writable, native-endian ``float32`` array (a copy, never a view of the wire bytes).

    Example::

        >>> decode_float32(base64.b64encode(np.float32([1.5, -2]).tobytes()).decode())
        array([ 1.5, -2. ], dtype=float32)
    """
    if isinstance(value, list):
        return np.asarray(value, dtype=np.float32)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ResponseFormatError(f"{what}: not valid base64 ({exc})") from exc
    if len(raw) % 4:
        raise ResponseFormatError(f"{what}: {len(raw)} bytes is not a whole number of float32 values")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)
