"""The public names are exactly the intended ones, and the client never imports torch or the server."""

from __future__ import annotations

import subprocess
import sys

import rewardkit.client as client
from rewardkit.client import adapters, errors, types

EXPECTED_CLIENT = {
    "AsyncRewardClient",
    "RewardClient",
    "DenseReward",
    "ComposedReward",
    "ComponentInfo",
    "FeedbackStream",
    "HiddenStateCapture",
    "ModelInfo",
    "Scores",
    "DEFAULT_TIMEOUT",
    "__version__",
    "parse_error",
    "RewardKitError",
    "APIError",
    "BadRequestError",
    "AuthenticationError",
    "NotFoundError",
    "PayloadTooLargeError",
    "OverloadedError",
    "NotReadyError",
    "ServerError",
    "TransportError",
    "TimeoutError",
    "ResponseFormatError",
}

EXPECTED_ADAPTERS = {
    "make_trl_reward_func",
    "make_trl_async_reward_func",
    "make_openrlhf_reward_func",
    "verl_compute_score",
    "verl_batch_compute_score",
    "dense_to_token_level_scores",
    "dense_to_lists",
}


def test_client_all_is_exactly_intended() -> None:
    assert set(client.__all__) == EXPECTED_CLIENT
    assert len(client.__all__) == len(EXPECTED_CLIENT)
    for name in client.__all__:
        assert getattr(client, name) is not None


def test_errors_all_matches_client_errors() -> None:
    error_names = {n for n in EXPECTED_CLIENT if n.endswith("Error")} | {"parse_error"}
    assert set(errors.__all__) == error_names
    for name in errors.__all__:
        assert getattr(errors, name) is getattr(client, name)


def test_adapters_and_types_all() -> None:
    assert set(adapters.__all__) == EXPECTED_ADAPTERS
    assert all(callable(getattr(adapters, n)) for n in adapters.__all__)
    assert set(types.__all__) == {"ComponentInfo", "ComposedReward", "DenseReward", "ModelInfo", "Scores"}


def test_import_pulls_no_torch_server_or_core() -> None:
    code = (
        "import sys, rewardkit.client, rewardkit.client.adapters, rewardkit.client.verl\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'fastapi')"
        " or m.startswith(('rewardkit.server', 'rewardkit.core', 'rewardkit.training')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
