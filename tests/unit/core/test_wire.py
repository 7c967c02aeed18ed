"""Tests for rewardkit.core.wire: the binary hidden-state frame format."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewardkit.core.errors import InputError
from rewardkit.core.wire import (
    MAGIC,
    FrameDecoder,
    FrameError,
    encode_frame,
    encode_stream,
    reduce_positions,
)


def _hdr(i: int = 0, group: str = "g0", **extra: object) -> dict:
    return {"group_id": group, "index": i, "round": 2, **extra}


def _arr(s: int = 5, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((s, d)).astype(np.float32)


def _decode_all(data: bytes, **kw: object) -> list:
    dec = FrameDecoder(**kw)  # type: ignore[arg-type]
    frames = dec.feed(data)
    dec.close()
    return frames


def _raw_frame(header: dict | bytes, payload: bytes, payload_len: int | None = None) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    plen = len(payload) if payload_len is None else payload_len
    return struct.pack("<I", len(hb)) + hb + struct.pack("<Q", plen) + payload


# -- round trips ---------------------------------------------------------------------------------


def test_round_trip_float32_is_exact_and_keeps_optional_fields() -> None:
    a = _arr()
    item = {"messages": [{"role": "user", "content": "hi"}]}
    data = encode_stream([(_hdr(0, prompt="p", response="r", item=item, custom=7), a, "float32")])
    (f,) = _decode_all(data)
    assert f.array.dtype == np.float32 and f.array.shape == (5, 8)
    np.testing.assert_array_equal(f.array, a)
    assert f.header["prompt"] == "p" and f.header["response"] == "r" and f.header["item"] == item
    assert f.header["custom"] == 7  # unknown keys pass through
    assert (f.group_id, f.index, f.round, f.frame_index) == ("g0", 0, 2, 0)


def test_round_trip_float16_equals_numpy_cast() -> None:
    a = _arr()
    (f,) = _decode_all(encode_stream([(_hdr(), a, "float16")]))
    assert f.array.dtype == np.float16
    np.testing.assert_array_equal(f.array, a.astype(np.float16))


def test_round_trip_bfloat16_matches_torch_rounding_exactly() -> None:
    a = _arr(7, 33, seed=3) * 100
    a[0, :4] = [1.0, -0.0, 3.0e38, 1e-40]  # exact, signed zero, near max, subnormal
    (f,) = _decode_all(encode_stream([(_hdr(), a, "bfloat16")]))
    want = torch.from_numpy(a).to(torch.bfloat16).float().numpy()
    assert f.array.dtype == np.float32
    np.testing.assert_array_equal(f.array, want)
    # and within bf16 precision (8 bits of mantissa) of the input
    np.testing.assert_allclose(f.array, a, rtol=2**-8, atol=1e-38)


def test_byte_at_a_time_feeding_gives_the_same_frames() -> None:
    frames_in = [
        (_hdr(i, group=f"g{i % 2}"), _arr(3 + i, 4, seed=i), dt)
        for i, dt in enumerate(["float32", "float16", "bfloat16", "float32"])
    ]
    data = encode_stream(frames_in)
    dec = FrameDecoder()
    out = []
    for b in data:
        out.extend(dec.feed(bytes([b])))
    dec.close()
    whole = _decode_all(data)
    assert [f.header for f in out] == [f.header for f in whole]
    assert len(out) == 4 and [f.frame_index for f in out] == [0, 1, 2, 3]
    for f, g in zip(out, whole, strict=True):
        np.testing.assert_array_equal(f.array, g.array)
    assert dec.bytes_consumed == len(data)


def test_empty_stream_with_preamble_only_is_valid() -> None:
    assert _decode_all(MAGIC) == []


def test_wire_module_does_not_import_torch() -> None:
    code = "import sys, rewardkit.core.wire; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- bad input -----------------------------------------------------------------------------------


def test_truncated_frame_is_reported_by_close_and_earlier_frames_are_kept() -> None:
    data = encode_stream([(_hdr(0), _arr(), "float32"), (_hdr(1), _arr(), "float32")])
    dec = FrameDecoder()
    frames = dec.feed(data[:-3])
    assert len(frames) == 1 and frames[0].index == 0
    with pytest.raises(FrameError) as ei:
        dec.close()
    assert ei.value.frame_index == 1 and ei.value.field == "payload"
    assert "frame 1" in str(ei.value) and "mid-frame" in str(ei.value)


@pytest.mark.parametrize("cut", [2, 6, 20])
def test_truncation_inside_preamble_or_header(cut: int) -> None:
    data = encode_stream([(_hdr(0), _arr(), "float32")])
    dec = FrameDecoder()
    assert dec.feed(data[:cut]) == []
    with pytest.raises(FrameError) as ei:
        dec.close()
    assert ei.value.field == ("preamble" if cut < 4 else "header_len" if cut < 8 else "header")


def test_bad_magic_and_unknown_version() -> None:
    with pytest.raises(FrameError, match="must start with") as ei:
        FrameDecoder().feed(b"GET / HTTP")
    assert ei.value.frame_index is None and ei.value.field == "preamble"
    with pytest.raises(FrameError, match="unsupported wire format version"):
        FrameDecoder().feed(b"RKF9")


def test_oversized_header_is_rejected_before_it_is_buffered() -> None:
    big = _hdr(0, prompt="x" * 5000)
    data = encode_stream([(big, _arr(), "float32")])
    dec = FrameDecoder(max_header_bytes=1024)
    with pytest.raises(FrameError) as ei:
        dec.feed(data[:8])  # preamble + length prefix only
    assert ei.value.field == "header_length" and "max_header_bytes=1024" in str(ei.value)


def test_oversized_payload_is_rejected_before_it_is_buffered() -> None:
    data = encode_stream([(_hdr(0), _arr(64, 64), "float32")])
    dec = FrameDecoder(max_payload_bytes=1000)
    hlen = struct.unpack("<I", data[4:8])[0]
    with pytest.raises(FrameError, match="max_payload_bytes=1000"):
        dec.feed(data[: 8 + hlen + 8])


def test_payload_length_must_match_shape_times_itemsize() -> None:
    h = {**_hdr(0), "dtype": "float32", "shape": [2, 3]}
    data = MAGIC + _raw_frame(h, b"\0" * 20)
    with pytest.raises(FrameError) as ei:
        _decode_all(data)
    assert ei.value.field == "payload_length" and "24" in str(ei.value)


def test_nan_and_inf_payloads_are_rejected_naming_the_frame() -> None:
    good = encode_frame(_hdr(0), _arr(), "float32")
    for bad_value in (np.nan, np.inf):
        a = _arr()
        a[1, 2] = bad_value
        h = {**_hdr(1), "dtype": "float32", "shape": [5, 8]}
        data = MAGIC + good + _raw_frame(h, a.tobytes())
        dec = FrameDecoder()
        with pytest.raises(FrameError) as ei:
            dec.feed(data)
        assert ei.value.frame_index == 1 and ei.value.field == "payload"
        assert [f.index for f in ei.value.decoded] == [0]  # the earlier good frame survives
        with pytest.raises(FrameError, match="already failed"):
            dec.feed(b"more")


def test_nan_in_bfloat16_payload_is_rejected() -> None:
    bits = np.full((2, 2), 0x7FC0, dtype="<u2")  # bf16 quiet NaN
    h = {**_hdr(0), "dtype": "bfloat16", "shape": [2, 2]}
    with pytest.raises(FrameError, match="NaN or Inf"):
        _decode_all(MAGIC + _raw_frame(h, bits.tobytes()))


def test_encoder_refuses_non_finite_and_float16_overflow() -> None:
    a = _arr()
    a[0, 0] = np.nan
    with pytest.raises(FrameError, match="NaN"):
        encode_frame(_hdr(), a, "float32")
    with pytest.raises(FrameError, match="overflow"):
        encode_frame(_hdr(), np.full((1, 1), 1e6, np.float32), "float16")
    with pytest.raises(FrameError, match="overflow bfloat16"):
        encode_frame(_hdr(), np.full((1, 1), 3.4e38, np.float32), "bfloat16")


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"dtype": "int8"}, "header.dtype"),
        ({"dtype": "float64"}, "header.dtype"),
        ({"shape": [40]}, "header.shape"),
        ({"shape": [2, 2, 10]}, "header.shape"),
        ({"shape": [0, 40]}, "header.shape"),
        ({"group_id": ""}, "header.group_id"),
        ({"index": -1}, "header.index"),
        ({"round": "3"}, "header.round"),
        ({"index": True}, "header.index"),
        ({"prompt": 5}, "header.prompt"),
        ({"item": [1]}, "header.item"),
    ],
)
def test_bad_header_fields_are_named(patch: dict, field: str) -> None:
    h = {**_hdr(0), "dtype": "float32", "shape": [4, 10], **patch}
    data = MAGIC + _raw_frame(h, b"\0" * 160)
    with pytest.raises(FrameError) as ei:
        _decode_all(data)
    assert ei.value.field == field and ei.value.frame_index == 0
    assert isinstance(ei.value, InputError) and isinstance(ei.value, ValueError)


@pytest.mark.parametrize("raw", [b"[1, 2]", b"{not json", b'{"a": NaN}', b'{"a":1,"a":2}', b"\xff\xfe{}"])
def test_malformed_header_json(raw: bytes) -> None:
    with pytest.raises(FrameError) as ei:
        _decode_all(MAGIC + _raw_frame(raw, b""))
    assert ei.value.field == "header"


def test_hidden_size_mismatch_with_expected_dim() -> None:
    data = encode_stream([(_hdr(0), _arr(3, 8), "float32"), (_hdr(1), _arr(3, 9), "float32")])
    with pytest.raises(FrameError, match="does not match the configured policy hidden size 8") as ei:
        _decode_all(data, expected_dim=8)
    assert ei.value.frame_index == 1


def test_too_many_frames() -> None:
    data = encode_stream([(_hdr(i), _arr(2, 2), "float16") for i in range(4)])
    dec = FrameDecoder(max_frames=3)
    with pytest.raises(FrameError) as ei:
        dec.feed(data)
    assert ei.value.field == "max_frames" and ei.value.frame_index == 3
    assert len(ei.value.decoded) == 3


def test_decoder_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_frames"):
        FrameDecoder(max_frames=0)


# -- reduction -----------------------------------------------------------------------------------


def test_reduce_positions_shape_and_window_means() -> None:
    a = _arr(10, 4)
    r = reduce_positions(a, 3)  # k = ceil(10/3) = 4 -> windows [0:4], [4:8], [8:10]
    assert r.shape == (3, 4) and r.dtype == np.float32
    np.testing.assert_allclose(r[0], a[0:4].mean(0), rtol=1e-6)
    np.testing.assert_allclose(r[2], a[8:10].mean(0), rtol=1e-6)
    assert reduce_positions(a, 10) is a  # nothing to do
    assert reduce_positions(a, 1).shape == (1, 4)


def test_reduce_positions_preserves_the_mean_when_the_stride_divides() -> None:
    a = _arr(12, 6, seed=5)
    for m in (1, 2, 3, 4, 6):
        r = reduce_positions(a, m)
        assert r.shape == (m, 6)
        np.testing.assert_allclose(r.mean(0), a.mean(0), rtol=1e-5, atol=1e-6)


def test_reduce_positions_keeps_float16() -> None:
    r = reduce_positions(_arr(9, 4).astype(np.float16), 4)
    assert r.dtype == np.float16 and r.shape == (3, 4)
    with pytest.raises(ValueError, match="max_positions"):
        reduce_positions(_arr(), 0)


# -- property test -------------------------------------------------------------------------------

_STREAM = encode_stream(
    [
        (_hdr(i, group=f"g{i // 3}"), _arr(1 + i % 4, 5, seed=i), ("float32", "float16", "bfloat16")[i % 3])
        for i in range(7)
    ]
)
_REFERENCE = _decode_all(_STREAM)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=len(_STREAM)), max_size=40))
def test_any_chunking_decodes_to_the_same_frames(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(_STREAM)]
    dec = FrameDecoder()
    out = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        out.extend(dec.feed(_STREAM[lo:hi]))
    dec.close()
    assert len(out) == len(_REFERENCE) == 7
    for f, g in zip(out, _REFERENCE, strict=True):
        assert f.header == g.header and f.frame_index == g.frame_index
        np.testing.assert_array_equal(f.array, g.array)
