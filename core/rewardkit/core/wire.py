"""Binary wire format for hidden-state tensors (R2M feedback and scoring), numpy only.

Hidden states travel as raw little-endian tensors with a small JSON header, never as JSON lists of
floats and never as pickle. This module imports numpy and nothing heavier: the light client uses it.

A stream is a 4-byte preamble followed by zero or more frames::

    stream   = b"RKF1" frame*
    frame    = u32le N | N bytes UTF-8 JSON header | u64le P | P bytes payload

The header is a JSON object with the required fields ``group_id`` (non-empty str), ``index``
(int >= 0), ``round`` (int >= 0), ``dtype`` ("float32" | "float16" | "bfloat16") and ``shape``
([S, D], both >= 1), optional fields ``reward_text``, ``prompt``, ``response`` (str) and ``item``
(object), and any further keys, which are kept as they are (forward compatibility). The payload is
the C-order tensor, little-endian, exactly ``S * D * itemsize`` bytes; bfloat16 travels as its raw
16 bits (the upper half of the float32 bit pattern) and is decoded to float32, since numpy has no
bfloat16. See docs/r2m.md for the byte-by-byte layout.

Example::

    data = encode_stream([({"group_id": "p0", "index": 0, "round": 3}, hidden, "bfloat16")])
    dec = FrameDecoder(expected_dim=hidden.shape[1])
    frames = dec.feed(data[:100]) + dec.feed(data[100:])
    dec.close()                      # raises FrameError if the stream stopped mid-frame
    frames[0].array                  # (S, D) float32
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rewardkit.core.errors import InputError

__all__ = [
    "DTYPES",
    "MAGIC",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "encode_frame",
    "encode_stream",
    "reduce_positions",
]

MAGIC = b"RKF1"
"""Stream preamble: b"RKF" and the format version as one ASCII digit."""

DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
"""Wire dtypes and their item sizes in bytes."""

_NUMPY_WIRE: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
_HEADER_LEN = struct.Struct("<I")
_PAYLOAD_LEN = struct.Struct("<Q")
_STRING_FIELDS = ("reward_text", "prompt", "response")


class FrameError(InputError, ValueError):
    """A stream or frame is malformed. ``frame_index`` is the 0-based frame (None: the preamble),
    ``field`` the offending part (``header.dtype``, ``payload_length``, ...). ``decoded`` holds the
    good frames completed in the failing ``feed`` call before the error, so callers keep them."""

    def __init__(self, message: str, frame_index: int | None = None, field: str | None = None) -> None:
        where = "preamble" if frame_index is None else f"frame {frame_index}"
        super().__init__(f"{where}: {message}", field)
        self.detail = message
        self.frame_index = frame_index
        self.decoded: list[Frame] = []


@dataclass
class Frame:
    """One decoded frame: its header (validated), the tensor (S, D) and its position in the stream.

    ``array`` is float32 for float32 and bfloat16 frames and float16 for float16 frames."""

    header: dict[str, Any]
    array: np.ndarray
    frame_index: int
    payload_bytes: int = field(default=0)

    @property
    def group_id(self) -> str:
        return str(self.header["group_id"])

    @property
    def index(self) -> int:
        return int(self.header["index"])

    @property
    def round(self) -> int:
        return int(self.header["round"])


# ----------------------------------------------------------------------------------------------
# dtype conversion


def _float32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (what torch does)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exact."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


# ----------------------------------------------------------------------------------------------
# header validation (shared by encoder and decoder)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate_header(h: Any, frame_index: int | None, expected_dim: int | None = None) -> None:
    if not isinstance(h, dict):
        raise FrameError("header must be a JSON object", frame_index, "header")
    gid = h.get("group_id")
    if not isinstance(gid, str) or not gid:
        raise FrameError("header.group_id must be a non-empty string", frame_index, "header.group_id")
    for name in ("index", "round"):
        v = h.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise FrameError(
                f"header.{name} must be an integer >= 0, got {v!r}", frame_index, f"header.{name}"
            )
    dt = h.get("dtype")
    if dt not in DTYPES:
        raise FrameError(
            f"header.dtype must be one of {sorted(DTYPES)}, got {dt!r}", frame_index, "header.dtype"
        )
    shape = h.get("shape")
    if not isinstance(shape, list) or len(shape) != 2:
        raise FrameError(f"header.shape must be [S, D] (rank 2), got {shape!r}", frame_index, "header.shape")
    if not all(_is_int(s) and s >= 1 for s in shape):
        raise FrameError(
            f"header.shape entries must be integers >= 1, got {shape!r}", frame_index, "header.shape"
        )
    if expected_dim is not None and shape[1] != expected_dim:
        raise FrameError(
            f"hidden size {shape[1]} does not match the configured policy hidden size {expected_dim}",
            frame_index,
            "header.shape",
        )
    for name in _STRING_FIELDS:
        if name in h and not isinstance(h[name], str):
            raise FrameError(f"header.{name} must be a string", frame_index, f"header.{name}")
    if "item" in h and not isinstance(h["item"], dict):
        raise FrameError("header.item must be a JSON object", frame_index, "header.item")


# ----------------------------------------------------------------------------------------------
# encoding


def encode_frame(
    header: dict[str, Any], array: np.ndarray, dtype: str = "float32", *, frame_index: int = 0
) -> bytes:
    """Encode one frame. ``header`` needs ``group_id``, ``index`` and ``round``; ``dtype`` and
    ``shape`` are filled in from the arguments. ``array`` is (S, D), finite, any float dtype.

    Raises FrameError (naming ``frame_index``) for bad input, including values that overflow the
    wire dtype (e.g. > 65504 in float16).
    """
    i = frame_index
    if dtype not in DTYPES:
        raise FrameError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}", i, "dtype")
    a = np.asarray(array)
    if a.ndim != 2:
        raise FrameError(f"array must be 2-D (S, D), got shape {a.shape}", i, "shape")
    if not np.issubdtype(a.dtype, np.floating):
        raise FrameError(f"array must be a float array, got {a.dtype}", i, "dtype")
    h = dict(header)
    h["dtype"] = dtype
    h["shape"] = [int(a.shape[0]), int(a.shape[1])]
    _validate_header(h, i)
    if not np.isfinite(a).all():
        raise FrameError("array holds NaN or Inf", i, "payload")
    with np.errstate(over="ignore"):  # overflow is detected just below, with a clearer message
        if dtype == "bfloat16":
            # checked finite first: the rounding trick would turn a NaN bit pattern into a number
            wire = _float32_to_bf16_bits(a.astype(np.float32))
            check = _bf16_bits_to_float32(wire)
        else:
            wire = np.ascontiguousarray(a, dtype=_NUMPY_WIRE[dtype])
            check = wire
    if not np.isfinite(check).all():
        raise FrameError(f"array holds values that overflow {dtype}", i, "payload")
    hbytes = json.dumps(h, separators=(",", ":"), allow_nan=False).encode("utf-8")
    payload = wire.tobytes(order="C")
    return b"".join((_HEADER_LEN.pack(len(hbytes)), hbytes, _PAYLOAD_LEN.pack(len(payload)), payload))


def encode_stream(frames: Iterable[tuple[dict[str, Any], np.ndarray, str]]) -> bytes:
    """Encode a whole stream: the preamble, then one frame per ``(header, array, dtype)``."""
    return MAGIC + b"".join(encode_frame(h, a, d, frame_index=i) for i, (h, a, d) in enumerate(frames))


# ----------------------------------------------------------------------------------------------
# decoding


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in a header")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


MAX_HEADER_DEPTH = 32  # a frame header is a flat object with one small nested item; 32 levels is plenty


def _nesting_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text, counted without recursion (strings skipped)."""
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


class FrameDecoder:
    """Incremental, bounded-memory decoder: ``feed(bytes) -> list[Frame]``, then ``close()``.

    Memory is bounded by ``max_header_bytes + max_payload_bytes`` (plus the frames the caller keeps):
    lengths are checked against the limits, and the payload length against ``shape * itemsize``,
    before any of the payload is buffered. The first error puts the decoder in a failed state; later
    calls raise it again.

    Args:
        max_header_bytes: largest JSON header accepted.
        max_payload_bytes: largest tensor payload accepted.
        max_frames: most frames per stream.
        expected_dim: if set, every frame's D must equal it (the configured policy hidden size).
    """

    def __init__(
        self,
        *,
        max_header_bytes: int = 64 * 1024,
        max_payload_bytes: int = 64 * 1024 * 1024,
        max_frames: int = 10_000,
        expected_dim: int | None = None,
    ) -> None:
        for name, v in (
            ("max_header_bytes", max_header_bytes),
            ("max_payload_bytes", max_payload_bytes),
            ("max_frames", max_frames),
        ):
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.max_header_bytes = max_header_bytes
        self.max_payload_bytes = max_payload_bytes
        self.max_frames = max_frames
        self.expected_dim = expected_dim
        self.frames_decoded = 0
        self.bytes_consumed = 0
        # states: preamble -> header_len -> header -> payload_len -> payload -> header_len ...
        self._state = "preamble"
        self._buf = bytearray(len(MAGIC))
        self._filled = 0
        self._header: dict[str, Any] = {}
        self._error: FrameError | None = None

    # -- public ---------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume ``data`` (any chunking) and return the frames it completed."""
        self._raise_if_failed()
        out: list[Frame] = []
        mv = memoryview(data).cast("B")
        pos, n = 0, len(mv)
        try:
            while pos < n:
                take = min(len(self._buf) - self._filled, n - pos)
                self._buf[self._filled : self._filled + take] = mv[pos : pos + take]
                self._filled += take
                pos += take
                self.bytes_consumed += take
                if self._filled == len(self._buf):
                    frame = self._advance()
                    if frame is not None:
                        out.append(frame)
        except FrameError as e:
            e.decoded = out
            self._error = e
            raise
        return out

    def close(self) -> None:
        """Declare the end of the stream; raises FrameError if it stopped before a frame boundary."""
        self._raise_if_failed()
        if self._state == "header_len" and self._filled == 0:
            return
        if self._state == "preamble":
            err = FrameError(
                f"stream ended after {self._filled} bytes, before the 4-byte preamble", None, "preamble"
            )
        else:
            err = FrameError(
                f"stream ended mid-frame (in {self._state.replace('_', ' ')}, "
                f"{self._filled} of {len(self._buf)} bytes)",
                self.frames_decoded,
                self._state,
            )
        self._error = err
        raise err

    # -- state machine --------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            e = self._error
            raise FrameError(f"decoder already failed: {e.detail}", e.frame_index, e.field)

    def _expect(self, state: str, nbytes: int) -> None:
        self._state = state
        self._buf = bytearray(nbytes)
        self._filled = 0

    def _advance(self) -> Frame | None:
        idx = self.frames_decoded
        if self._state == "preamble":
            if bytes(self._buf) != MAGIC:
                if bytes(self._buf[:3]) == MAGIC[:3]:
                    msg = f"unsupported wire format version {bytes(self._buf[3:])!r}; this reader speaks {MAGIC!r}"
                else:
                    msg = f"stream must start with {MAGIC!r}, got {bytes(self._buf)!r}"
                raise FrameError(msg, None, "preamble")
            self._expect("header_len", _HEADER_LEN.size)
        elif self._state == "header_len":
            if idx >= self.max_frames:
                raise FrameError(
                    f"too many frames: the limit is max_frames={self.max_frames}", idx, "max_frames"
                )
            (hlen,) = _HEADER_LEN.unpack(self._buf)
            if hlen > self.max_header_bytes:
                raise FrameError(
                    f"header of {hlen} bytes exceeds max_header_bytes={self.max_header_bytes}",
                    idx,
                    "header_length",
                )
            if hlen < 2:
                raise FrameError(f"header length {hlen} is too short for a JSON object", idx, "header_length")
            self._expect("header", hlen)
        elif self._state == "header":
            self._header = self._parse_header(idx)
            self._expect("payload_len", _PAYLOAD_LEN.size)
        elif self._state == "payload_len":
            (plen,) = _PAYLOAD_LEN.unpack(self._buf)
            s, d = self._header["shape"]
            want = s * d * DTYPES[self._header["dtype"]]
            if plen != want:
                raise FrameError(
                    f"payload length {plen} != shape {self._header['shape']} x {DTYPES[self._header['dtype']]} "
                    f"bytes ({self._header['dtype']}) = {want}",
                    idx,
                    "payload_length",
                )
            if plen > self.max_payload_bytes:
                raise FrameError(
                    f"payload of {plen} bytes exceeds max_payload_bytes={self.max_payload_bytes}",
                    idx,
                    "payload_length",
                )
            self._expect("payload", plen)
        else:
            assert self._state == "payload", self._state
            frame = self._decode_payload(idx)
            self.frames_decoded += 1
            self._expect("header_len", _HEADER_LEN.size)
            return frame
        return None

    def _parse_header(self, idx: int) -> dict[str, Any]:
        try:
            text = bytes(self._buf).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FrameError(f"header is not valid UTF-8 JSON: {e}", idx, "header") from None
        depth = _nesting_depth(text)
        if depth > MAX_HEADER_DEPTH:  # json.loads would recurse once per level: RecursionError, a 500
            raise FrameError(f"header nests {depth} levels deep; at most {MAX_HEADER_DEPTH} are allowed", idx, "header")
        try:
            h = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError) as e:
            raise FrameError(f"header is not valid UTF-8 JSON: {e}", idx, "header") from None
        _validate_header(h, idx, self.expected_dim)
        return h

    def _decode_payload(self, idx: int) -> Frame:
        h = self._header
        dt = h["dtype"]
        raw = np.frombuffer(self._buf, dtype=_NUMPY_WIRE[dt])  # shares the frame's own buffer, no copy
        arr = _bf16_bits_to_float32(raw) if dt == "bfloat16" else raw
        arr = arr.reshape(h["shape"])  # (S, D)
        if not np.isfinite(arr).all():
            bad = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise FrameError(f"payload holds NaN or Inf (first at position {bad})", idx, "payload")
        return Frame(header=h, array=arr, frame_index=idx, payload_bytes=len(self._buf))


# ----------------------------------------------------------------------------------------------
# optional reduction before sending


def reduce_positions(array: np.ndarray, max_positions: int) -> np.ndarray:
    """Strided mean pooling over positions: (S, D) -> (ceil(S / k), D) with k = ceil(S / max_positions).

    Output row i is the mean of input rows [i*k, min((i+1)*k, S)); the last window may be shorter.
    When S <= max_positions the input is returned unchanged. Means are taken in float64 and cast
    back to the input dtype: a mean of finite values is finite, even for values near float32's maximum (float32 sums
    overflowed to inf there). When k divides S, the column means of the output equal those of the
    input (up to rounding).
    """
    if not _is_int(max_positions) or max_positions < 1:
        raise ValueError(f"max_positions must be an integer >= 1, got {max_positions!r}")
    a = np.asarray(array)
    if a.ndim != 2:
        raise ValueError(f"array must be 2-D (S, D), got shape {a.shape}")
    s = a.shape[0]
    if s <= max_positions:
        return a
    k = math.ceil(s / max_positions)
    starts = np.arange(0, s, k)  # (S',)
    counts = np.minimum(starts + k, s) - starts  # (S',)
    sums = np.add.reduceat(a.astype(np.float64), starts, axis=0)  # (S', D)
    out = sums / counts[:, None].astype(np.float64)  # (S', D)
    return out.astype(a.dtype, copy=False)
