"""rewardkit.json is validated like any input: wrong field types and unknown head kinds are a clear ModelLoadError."""

from __future__ import annotations

import pytest

from rewardkit.core.checkpoint import CheckpointMeta
from rewardkit.core.errors import ModelLoadError


@pytest.mark.parametrize("patch, match", [
    ({"norm_std": "1.0"}, "field 'norm_std' must be an integer or a number, got str"),
    ({"trained": "yes"}, "field 'trained' must be true or false"),
    ({"norm_mean": True}, "field 'norm_mean' must be an integer or a number, got True"),
    ({"backbone": 5}, "field 'backbone' must be a string"),
    ({"provenance": []}, "field 'provenance' must be an object"),
    ({"head_kind": "mystery"}, "head_kind 'mystery' is not one this rewardkit loads"),
    ({"norm_std": 0}, "norm_std must be > 0"),
])
def test_bad_meta_is_a_clear_load_error(patch: dict, match: str) -> None:
    data = {"backbone": "embedded:smollm2", "model_id": "m", **patch}
    with pytest.raises(ModelLoadError, match=match.replace("(", r"\(")):
        CheckpointMeta.from_dict(data)


def test_good_meta_loads() -> None:
    meta = CheckpointMeta.from_dict({"backbone": "x", "norm_mean": 1, "norm_std": 2.5, "trained": False,
                                     "gguf_file": None, "unknown_future_field": 3})
    assert (meta.norm_mean, meta.norm_std, meta.trained) == (1, 2.5, False)
