"""Python client for a rewardkit reward-model server.

Depends on httpx, pydantic and numpy only (never torch), so an RL trainer can import it anywhere.

Example::

    from rewardkit.client import RewardClient

    with RewardClient("http://localhost:8000") as rk:
        rk.score(prompts=["What is 2+2?"], responses=["4."])

Trainer adapters (TRL, OpenRLHF, verl) live in :mod:`rewardkit.client.adapters`.
"""

from rewardkit.client._base import DEFAULT_TIMEOUT, __version__
from rewardkit.client._client import AsyncRewardClient, RewardClient
from rewardkit.client.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    ResponseFormatError,
    RewardKitError,
    ServerError,
    TimeoutError,
    TransportError,
    parse_error,
)
from rewardkit.client.feedback import FeedbackStream, HiddenStateCapture
from rewardkit.client.types import ComponentInfo, ComposedReward, DenseReward, ModelInfo, Scores

__all__ = [
    "DEFAULT_TIMEOUT",
    "APIError",
    "AsyncRewardClient",
    "AuthenticationError",
    "BadRequestError",
    "ComponentInfo",
    "ComposedReward",
    "DenseReward",
    "FeedbackStream",
    "HiddenStateCapture",
    "ModelInfo",
    "NotFoundError",
    "NotReadyError",
    "OverloadedError",
    "PayloadTooLargeError",
    "ResponseFormatError",
    "RewardClient",
    "RewardKitError",
    "Scores",
    "ServerError",
    "TimeoutError",
    "TransportError",
    "__version__",
    "parse_error",
]
