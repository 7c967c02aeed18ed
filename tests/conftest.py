"""Shared fixtures: tiny models on disk (built once per session), free ports, a private redis-server per module."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rewardkit.core.testing import make_tiny_reward_model

    return make_tiny_reward_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rewardkit.core.testing import make_tiny_reward_model

    return make_tiny_reward_model(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2")


@pytest.fixture(scope="module")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real redis-server of the module's own (skips without one, fails under CI=true: ``require_redis``)."""
    from tests.helpers import RedisProcess, require_redis

    require_redis()
    with RedisProcess(tmp_path_factory.mktemp("redis")) as rp:
        yield rp
