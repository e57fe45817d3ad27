"""The wire format: every message of every method becomes bytes here and nowhere else.

A body is a 32-byte header followed by a payload of per-tensor records.

Header (little-endian): magic ``b"MPFL"``, format version (u8: 3; version 2, which differs
only in having no float32 marks in VALUES records, is still read, e.g. an older export's
``mask.bin``), kind (u8), encoding (u8: the
value dtype or the mask coder; ``SPARSE``: dtype | coder << 4), flags (u8: bit 0 = structured
mask, bit 1 = a mask's grown positions, coded over the complement of the receiver's mask),
round (u32), base_version (u32: the version of the support the body is coded over, so sender and
receiver can check they agree on it), num_samples (u32), tensor count (u32), payload length
(u32), CRC-32 of everything else (u32). Kinds: ``WEIGHTS`` 1, ``MASK`` 2, ``VALUES`` 3,
``SCORES`` 4, ``SPARSE`` 5, ``INIT`` 6; value dtypes: float32 0, float16 1, int8 2; mask
coders: range 0, packbits 1.

Payload records, one per tensor, by kind (``k`` = number of values in the record):

- ``WEIGHTS`` / ``SCORES`` / ``VALUES``: count (u32) [+ scale (f32) for int8], then the ``k``
  values: ``4 + 4k`` bytes as float32, ``4 + 2k`` as float16, ``8 + k`` as int8. ``VALUES``
  holds only the entries inside a support both sides know, in row-major order, so no
  indices travel. In a ``VALUES`` body of float16 or int8, bit 31 of a record's count marks
  values sent as float32 (``4 + 4k`` bytes) all the same: the sender's choice for a model's
  BatchNorm statistics, whose small running variances one int8 scale per tensor rounds
  coarsely; the receiver needs no hint.
- ``MASK``: coded positions (u32: the size of the previous support), ones (u32), coded
  length (u32), then the bits of the new mask over the previous support only (row-major,
  packed with the first bit in the highest bit of the first byte, zero padded; the range coder
  codes these bytes): ``12 + L`` bytes. ``L`` is 0 for an all-zero or all-one mask,
  ``ceil(n / 8)`` with ``packbits``, and a multiple of 4 near ``n * H(ones / n) / 8`` with the
  range coder, which must be exactly the encoder's bytes for the bits they decode to (so, as
  every bitmap here, a mask has one encoding). A structured mask spends one bit per output filter.
- ``SPARSE``: tensor size (u32), non-zeros (u32), coded length (u32), the coded position
  bitmap (which costs no more than optimally coded index gaps), then a values record of the
  non-zeros. A coded position never carries a zero value, so each tensor has one encoding.
- ``INIT`` (no tensors; the encoding byte names the source of the initial weights: 0 = the
  seeded initialiser, 1 = an ``--init`` file, 2 = a node's request for them): the seed (u32)
  and the SHA-256 of the initial weights (32 bytes, see :func:`weights_digest`), 36 bytes. A
  node that can rebuild the weights, or holds a copy of the file, checks the digest instead of
  receiving them; one without a matching copy replies with a single ``INIT`` body of source 2
  echoing the digest, and the server then sends it the weights in a ``WEIGHTS`` body.

Values: float32 is exact. float16 rounds to nearest (relative error at most 2**-11, absolute
at most 2**-25 in float16's subnormal range); values beyond float16's range are refused.
int8 is symmetric per tensor: ``q = round(x / scale)`` with ``scale = max|x| / 127`` in float32
(where that is subnormal and rounds down so far that ``max|x| / scale >= 127.5``, the next
float32 up, until it is not), so the error is at most ``scale / 2`` (plus the float32 rounding of
``q * scale``). A decoder refuses int8 records the encoder never writes: a ``q`` of -128, a scale
other than 1 over all-zero values, and, where the scale is a normal float32, a largest ``|q|``
other than 127 or a scale that no float32 ``max|x|`` gives as ``max|x| / 127``.
:func:`quantization_error` measures both on actual data.

Decoding is strict: the receiver states what it expects (kind, round, shapes, supports)
and every header field, count, length and checksum is checked before anything of the
payload's size is allocated. Any violation raises :class:`PayloadError`.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import IntEnum

import constriction
import numpy as np

from .core.masks import rows, whole_filters
from .core.memo import positions
from .errors import PayloadError

MAGIC = b"MPFL"
VERSION = 3
READABLE_VERSIONS = (2, 3)
"""Versions a decoder accepts: what version 3 added (float32 marks in VALUES records) a version 2
body never holds, so its bytes mean the same."""
_HEADER = struct.Struct("<4sBBBBIIIII")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _CRC.size
_U32 = struct.Struct("<I")
_MASK_META = struct.Struct("<III")
_F32 = struct.Struct("<f")
_INIT = struct.Struct("<I32s")
INIT_SOURCES = {"seed": 0, "file": 1, "request": 2}
_STRUCTURED = 1
_GROW = 2
_RANGE_SLACK = 64
_MODEL_BITS = 32
_MIN_SCALE = np.float32(np.finfo(np.float32).smallest_subnormal)
_EXACT = 1 << 31
"""Set in a VALUES record's count: its values are float32 whatever the body's value dtype."""


class Kind(IntEnum):
    """What a body carries; the receiver names the kind it expects."""

    WEIGHTS = 1
    MASK = 2
    VALUES = 3
    SCORES = 4
    SPARSE = 5
    INIT = 6


VALUE_DTYPES = {"float32": (0, np.dtype("<f4")), "float16": (1, np.dtype("<f2")), "int8": (2, np.dtype("i1"))}
MASK_CODERS = {"range": 0, "packbits": 1}
_DTYPE_BY_CODE = {code: name for name, (code, _) in VALUE_DTYPES.items()}
_CODER_BY_CODE = {code: name for name, code in MASK_CODERS.items()}
_DENSE_KINDS = (Kind.WEIGHTS, Kind.SCORES, Kind.VALUES)


@dataclass(frozen=True)
class Body:
    """A decoded body: header fields and the decoded tensors (full shape, zeros outside supports)."""

    kind: Kind
    round: int
    base_version: int
    num_samples: int
    tensors: list[np.ndarray]
    flags: int = 0

    @property
    def grow(self) -> bool:
        """Whether a MASK body holds grown positions (coded over the complement of the receiver's mask)."""
        return bool(self.flags & _GROW)


# --------------------------------------------------------------------------- header


def _pack(kind: Kind, encoding: int, flags: int, round: int, base_version: int, num_samples: int, count: int,
          payload: bytes) -> bytes:
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < 2**32
               for v in (round, base_version, num_samples)):
        raise PayloadError(f"round {round!r}, base version {base_version!r} and num_samples {num_samples!r} must be "
                           "integers that fit in 32 bits")
    head = _HEADER.pack(MAGIC, VERSION, int(kind), encoding, flags, round, base_version, num_samples, count, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, _CRC.pack(crc), payload))


@dataclass(frozen=True)
class _Header:
    """The header fields a decoder still needs once :func:`_unpack` has checked the rest."""

    kind: Kind
    version: int
    encoding: int
    round: int
    base_version: int
    num_samples: int


def _bytes_view(buf: object) -> memoryview:
    """The body as unsigned bytes; anything but bytes (a str, a number, None, a list) is a PayloadError."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise PayloadError(f"a body must be bytes, got {type(buf).__name__}")
    try:
        return memoryview(buf).cast("B")
    except TypeError as exc:  # a strided or multi-dimensional view: not a byte string
        raise PayloadError(f"a body must be contiguous bytes: {exc}") from None


def _unpack(
    buf: bytes, kind: Kind, round: int | None, base_version: int | None, count: int, flags: int = 0
) -> tuple[_Header, memoryview]:
    """Check the header against what the receiver expects; return it and the payload.

    Framing and the checksum are checked before the header's meaning, so a corrupted body is
    reported as corrupted rather than as, say, a message for another round.
    """
    view = _bytes_view(buf)
    if len(view) < HEADER_SIZE:
        raise PayloadError(f"body of {len(view)} bytes is shorter than the {HEADER_SIZE}-byte header")
    fields = _HEADER.unpack_from(view)
    magic, version, got_kind, encoding, got_flags, got_round, got_base, num_samples, got_count, length = fields
    if magic != MAGIC:
        raise PayloadError(f"bad magic {bytes(magic)!r}: this is not an mpfl message")
    if version not in READABLE_VERSIONS:
        raise PayloadError(f"format version {version} is not supported (expected {VERSION}); upgrade mpfl on both sides")
    if length != len(view) - HEADER_SIZE:
        arrived = len(view) - HEADER_SIZE
        raise PayloadError(f"payload length field says {length} bytes but {arrived} arrived (truncated or extended)")
    (crc,) = _CRC.unpack_from(view, _HEADER.size)
    if zlib.crc32(view[HEADER_SIZE:], zlib.crc32(view[: _HEADER.size])) != crc:
        raise PayloadError("checksum mismatch: the body was corrupted in transit")
    if got_kind != kind:
        name = Kind(got_kind).name if got_kind in Kind._value2member_map_ else str(got_kind)
        raise PayloadError(f"expected a {kind.name} body, got {name}")
    if got_flags != flags:
        raise PayloadError(f"body has flags {got_flags:#04x}, expected {flags:#04x}")
    if round is not None and got_round != round:
        raise PayloadError(f"body is for round {got_round}, expected round {round}")
    if base_version is not None and got_base != base_version:
        raise PayloadError(f"body is coded over mask version {got_base}, but the receiver holds version {base_version}")
    if got_count != count:
        raise PayloadError(f"body holds {got_count} tensors, expected {count}")
    header = _Header(Kind(got_kind), version, encoding, got_round, got_base, num_samples)
    return header, view[HEADER_SIZE:]


class _Reader:
    """Bounds-checked cursor over a payload."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.view):
            raise PayloadError(f"payload ends inside {what} ({n} bytes needed, {len(self.view) - self.pos} left)")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, layout: struct.Struct, what: str) -> tuple:
        return layout.unpack(self.take(layout.size, what))

    def finish(self) -> None:
        if self.pos != len(self.view):
            raise PayloadError(f"{len(self.view) - self.pos} unexpected trailing bytes after the last tensor")


# --------------------------------------------------------------------------- values


def _value_dtype(dtype: str) -> tuple[int, np.dtype]:
    try:
        return VALUE_DTYPES[dtype]
    except KeyError:
        raise PayloadError(f"unknown value dtype {dtype!r}; choose one of {sorted(VALUE_DTYPES)}") from None


def _dtype_name(code: int) -> str:
    if code not in _DTYPE_BY_CODE:
        raise PayloadError(f"unknown value dtype code {code}")
    return _DTYPE_BY_CODE[code]


def _float32(x: np.ndarray) -> np.ndarray:
    """``x`` as float32; values beyond its range become Inf, which the encoder then refuses."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32)


def _to_float16(flat: np.ndarray) -> np.ndarray:
    """Round to float16, refusing values that would overflow to Inf."""
    with np.errstate(over="ignore"):
        half = flat.astype(VALUE_DTYPES["float16"][1])
    if not np.isfinite(half).all():
        peak = float(np.abs(flat).max())
        raise PayloadError(f"a value of magnitude {peak:g} overflows float16 (largest 65504); send float32 or int8 values")
    return half


def _to_int8(flat: np.ndarray, peak: float) -> tuple[np.ndarray, np.float32]:
    """Symmetric per-tensor quantization of finite values whose largest magnitude is `peak`; the
    scale is float32 and never underflows to 0."""
    scale = max(np.float32(peak / 127), _MIN_SCALE) if peak > 0 else np.float32(1)
    while peak / float(scale) >= 127.5:  # a subnormal scale can round far below peak / 127; never clip the peak
        scale = np.nextafter(scale, np.float32(np.inf))
    # |x| / scale <= peak / scale < 127.5 in float64, so every q lies in [-127, 127] and the peak's is the largest
    scaled = np.divide(flat, float(scale), dtype=np.float64)
    q = np.rint(scaled, out=scaled).astype(VALUE_DTYPES["int8"][1])
    with np.errstate(over="ignore"):
        top = np.float32(np.rint(peak / float(scale))) * scale
    if not np.isfinite(top):
        raise PayloadError(f"a value of magnitude {peak:g} is too close to the float32 limit for int8 with a float32 scale")
    return q, scale


def _quantize(flat: np.ndarray, dtype: str) -> tuple[np.ndarray, np.float32 | None]:
    """float32 values in their wire form: (array in the wire dtype, int8 scale or None)."""
    peak = float(np.abs(flat).max()) if flat.size else 0.0  # NaN or Inf exactly when a value is
    if not np.isfinite(peak):
        raise PayloadError("refusing to encode NaN or Inf values (or values beyond the float32 range); weights "
                           "like these mean training diverged: lower the learning rate (--lr) or --server-momentum, "
                           "or, if some nodes may send forged values, use a robust --aggregator (median, trimmed-mean)")
    if dtype == "float16":
        return _to_float16(flat), None
    if dtype == "int8":
        return _to_int8(flat, peak)
    return flat.astype(VALUE_DTYPES["float32"][1], copy=False), None


def _dequantize(raw: np.ndarray, scale: np.float32 | None) -> np.ndarray:
    """The float32 values a wire array stands for (Inf where an int8 product overflows)."""
    out = raw.astype(np.float32)
    if scale is not None:
        with np.errstate(over="ignore"):
            out *= scale
    return out


def _values_record(raw: np.ndarray, scale: np.float32 | None, exact: bool = False) -> bytes:
    if raw.size >= _EXACT:
        raise PayloadError(f"a tensor of {raw.size:,} values is too large for one record (at most 2**31 - 1)")
    head = _U32.pack(raw.size | (_EXACT if exact else 0)) + (b"" if scale is None else _F32.pack(scale))
    return head + raw.tobytes()


def _encode_values(values: np.ndarray, dtype: str, exact: bool = False) -> bytes:
    """One values record in `dtype`; with `exact` (a VALUES body that is not float32), float32 and marked so."""
    return _values_record(*_quantize(_float32(values).ravel(), "float32" if exact else dtype), exact=exact)


def _decode_values(reader: _Reader, dtype: str, expected: int, index: int, *, may_be_exact: bool = False) -> np.ndarray:
    """Read one values record of exactly ``expected`` entries as float32, all finite; with
    `may_be_exact` (VALUES bodies of float16 or int8), the record may be marked as float32."""
    (count,) = reader.unpack(_U32, f"the count of tensor {index}")
    if count & _EXACT:
        if not may_be_exact or dtype == "float32":
            raise PayloadError(f"tensor {index} claims {count:,} values, or is marked as float32 values (bit 31), "
                               f"which only a VALUES body of float16 or int8 in format version 3 may hold")
        count, dtype = count & ~_EXACT, "float32"
    if count != expected:
        raise PayloadError(f"tensor {index} holds {count} values, expected {expected}")
    scale = None
    if dtype == "int8":
        scale = np.float32(reader.unpack(_F32, f"the scale of tensor {index}")[0])
        if not (np.isfinite(scale) and scale > 0):
            raise PayloadError(f"tensor {index} has an invalid int8 scale {scale}")
    dt = VALUE_DTYPES[dtype][1]
    raw = np.frombuffer(reader.take(count * dt.itemsize, f"the values of tensor {index}"), dtype=dt)
    out = _dequantize(raw, scale)
    if not np.isfinite(out).all():
        raise PayloadError(f"tensor {index} contains NaN, Inf or out-of-range values")
    if dtype == "int8":
        _check_int8(raw, scale, index)
    return out


def _check_int8(raw: np.ndarray, scale: np.float32, index: int) -> None:
    """Refuse int8 records the encoder never writes, so each tensor has one encoding: -128, a scale
    other than 1 for all-zero values, and, where the scale is a normal float32 (``max|x| / 127``
    then rounds to it with a relative error of at most 2**-24), a largest |q| other than 127 or a
    scale that no float32 peak rounds to (the encoder's is within two float32 steps of 127 x scale)."""
    peak = max(int(raw.max(initial=0)), -int(raw.min(initial=0)))
    if raw.size and raw.min() < -127:
        raise PayloadError(f"tensor {index} holds the int8 value -128, which the encoder never writes")
    if peak == 0 and scale != 1:
        raise PayloadError(f"tensor {index} holds only zeros but its int8 scale is {scale:g}, not 1")
    if not peak or scale < np.finfo(np.float32).tiny:
        return
    if peak != 127:
        raise PayloadError(f"tensor {index}'s largest int8 value is {peak}, not 127 as its scale {scale:g} requires")
    near = np.float32(127) * scale
    candidates = [near]
    for direction in (np.float32(np.inf), np.float32(-np.inf)):
        step = near
        for _ in range(2):
            step = np.nextafter(step, direction)
            candidates.append(step)
    if not any(np.isfinite(c) and np.float32(float(c) / 127) == scale for c in candidates):
        raise PayloadError(f"tensor {index}'s int8 scale {scale!s} is not max|x| / 127 for any float32 "
                           "max|x|")


def quantization_error(x: np.ndarray, dtype: str) -> dict[str, float]:
    """The error of sending ``x`` as ``dtype`` values: ``{"max_abs_error", "rms_error"}``.

    Computed by the same quantization the encoder applies, in float64, so it is what a
    receiver actually sees. Raises :class:`PayloadError` for values the dtype cannot carry.
    """
    _value_dtype(dtype)
    flat = _float32(x).ravel()
    err = _dequantize(*_quantize(flat, dtype)).astype(np.float64) - flat
    if not err.size:
        return {"max_abs_error": 0.0, "rms_error": 0.0}
    return {"max_abs_error": float(np.abs(err).max()), "rms_error": float(np.sqrt(np.mean(err**2)))}


def encode_dense(
    kind: Kind, tensors: Sequence[np.ndarray], *, round: int, base_version: int = 0, num_samples: int = 0, dtype: str = "float32"
) -> bytes:
    """Encode whole tensors (initial weights, dense FedAvg, saliency scores)."""
    if kind not in _DENSE_KINDS:
        raise PayloadError(f"{kind.name} is not a dense kind")
    code = _value_dtype(dtype)[0]
    payload = b"".join(_encode_values(t, dtype) for t in tensors)
    return _pack(kind, code, 0, round, base_version, num_samples, len(tensors), payload)


def decode_dense(
    buf: bytes, kind: Kind, shapes: Sequence[tuple[int, ...]], *, round: int | None = None, base_version: int | None = None
) -> Body:
    """Decode whole tensors, checking each count against the expected shape."""
    header, payload = _unpack(buf, kind, round, base_version, len(shapes))
    dtype = _dtype_name(header.encoding)
    reader = _Reader(payload)
    tensors = [_decode_values(reader, dtype, int(np.prod(shape)), i).reshape(shape) for i, shape in enumerate(shapes)]
    reader.finish()
    return Body(header.kind, header.round, header.base_version, header.num_samples, tensors)


def encode_values(
    tensors: Sequence[np.ndarray],
    supports: Sequence[np.ndarray],
    *,
    round: int,
    base_version: int = 0,
    num_samples: int = 0,
    dtype: str = "float32",
    exact: Collection[int] = (),
) -> bytes:
    """Encode the entries of each tensor inside its support (both sides know the supports) as
    `dtype`; the tensors whose index is in `exact` (BatchNorm statistics) go as float32."""
    if len(tensors) != len(supports):
        raise PayloadError(f"{len(tensors)} tensors but {len(supports)} supports")
    code = _value_dtype(dtype)[0]
    parts = []
    for i, (tensor, support) in enumerate(zip(tensors, supports)):
        tensor, support = _float32(tensor), np.asarray(support, dtype=bool)
        if tensor.shape != support.shape:
            raise PayloadError(f"tensor {i} has shape {tensor.shape} but its support has shape {support.shape}")
        # positions as an index array: numpy's boolean indexing is ~4x slower on a scattered support
        where = positions(support)
        kept = tensor.reshape(-1)[where] if where.size < tensor.size else tensor
        parts.append(_encode_values(kept, dtype, exact=i in exact and dtype != "float32"))
    return _pack(Kind.VALUES, code, 0, round, base_version, num_samples, len(tensors), b"".join(parts))


def decode_values(
    buf: bytes, supports: Sequence[np.ndarray], *, round: int | None = None, base_version: int | None = None
) -> Body:
    """Decode kept values into full-shape tensors that are exactly zero outside each support."""
    where = [positions(np.asarray(support, dtype=bool)) for support in supports]
    kept = decode_kept_values(buf, [w.size for w in where], round=round, base_version=base_version)
    tensors = []
    for support, at, values in zip(supports, where, kept.tensors):
        if at.size == np.size(support):  # a whole tensor (dense FedAvg, unpruned layers): nothing to scatter
            tensors.append(values.reshape(np.shape(support)))
            continue
        full = np.zeros(np.size(support), dtype=np.float32)
        full[at] = values
        tensors.append(full.reshape(np.shape(support)))
    return Body(kept.kind, kept.round, kept.base_version, kept.num_samples, tensors)


def decode_kept_values(
    buf: bytes, counts: Sequence[int], *, round: int | None = None, base_version: int | None = None
) -> Body:
    """Decode kept values as they travel: per tensor a 1-D array of exactly `counts[i]` values, the
    entries inside its support in row-major order. A fraction of the full tensors' memory, for a
    receiver that holds many replies (the server of a mask round)."""
    header, payload = _unpack(buf, Kind.VALUES, round, base_version, len(counts))
    dtype = _dtype_name(header.encoding)
    reader = _Reader(payload)
    marks = header.version >= 3  # version 2 predates the float32 marks
    tensors = [_decode_values(reader, dtype, int(count), i, may_be_exact=marks) for i, count in enumerate(counts)]
    reader.finish()
    return Body(header.kind, header.round, header.base_version, header.num_samples, tensors)


# --------------------------------------------------------------------------- masks

_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)


def _coder_name(code: int) -> str:
    if code not in _CODER_BY_CODE:
        raise PayloadError(f"unknown mask coder code {code}")
    return _CODER_BY_CODE[code]


def _check_coder(coder: str) -> None:
    if coder not in MASK_CODERS:
        raise PayloadError(f"unknown mask coder {coder!r}; choose one of {sorted(MASK_CODERS)}")


@functools.lru_cache(maxsize=256)
def _byte_model(ones: int, n: int) -> constriction.stream.model.Categorical:
    """Categorical model over packed bytes whose 8 bits are i.i.d. Bernoulli(ones / n), built once
    per (ones, n): every node's vote in a round has the same counts.

    The probability is rounded to a multiple of 2**-32, and the nine distinct byte
    probabilities (one per number of set bits) are computed in exact integer arithmetic and
    rounded once. Sender and receiver therefore build bit-identical models on every
    platform, which ``exp`` and ``log`` from different math libraries would not guarantee.
    """
    one = 1 << _MODEL_BITS
    q = min(max((2 * ones * one + n) // (2 * n), 1), one - 1)
    by_count = np.array([q**k * (one - q) ** (8 - k) / one**8 for k in range(9)])
    return constriction.stream.model.Categorical(by_count[_POPCOUNT], perfect=False)


def _max_coded(n: int) -> int:
    """The most bytes a range-coded bitmap of n bits may take (the decoder's allocation bound)."""
    return (n + 7) // 8 + _RANGE_SLACK


def _code_bits(bits: np.ndarray, coder: str) -> bytes:
    """The coded bitmap; empty when all bits are equal, since the count of ones says it all."""
    ones = int(np.count_nonzero(bits))
    if ones in (0, bits.size):
        return b""
    packed = np.packbits(bits)
    if coder == "packbits":
        return packed.tobytes()
    data = _range_code(packed, ones, bits.size)
    if len(data) > _max_coded(bits.size):
        raise PayloadError(f"range coding a {bits.size}-bit mask took {len(data)} bytes; use the packbits coder")
    return data


def _range_code(packed: np.ndarray, ones: int, n: int) -> bytes:
    """The range coder's bytes for the packed bitmap of n bits with `ones` set."""
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(packed.astype(np.int32), _byte_model(ones, n))
    return encoder.get_compressed().astype("<u4").tobytes()


def _bitmap_record(bits: np.ndarray, data: bytes) -> bytes:
    """A coded bitmap's record: its size, its ones and its coded length (u32 each), then the code."""
    if bits.size >= 2**32:
        raise PayloadError(f"a bitmap of {bits.size:,} positions is too large for one record (at most 2**32 - 1)")
    return _MASK_META.pack(bits.size, int(np.count_nonzero(bits)), len(data)) + data


def _decode_bits(data: memoryview, coder: str, n: int, ones: int, what: str) -> np.ndarray:
    """Decode n bits with exactly ``ones`` set, refusing every byte string but the encoder's for
    them (malformed streams, padding, and range-coded streams that decode but were not so coded)."""
    if ones > n:
        raise PayloadError(f"{what} claims {ones} ones over only {n} positions")
    if ones in (0, n):
        if len(data):
            raise PayloadError(f"{what} is constant but carries {len(data)} coded bytes")
        return np.full(n, ones == n, dtype=bool)
    nbytes = (n + 7) // 8
    if coder == "packbits":
        if len(data) != nbytes:
            raise PayloadError(f"{what} carries {len(data)} packed bytes, expected {nbytes}")
        packed = np.frombuffer(data, dtype=np.uint8)
    else:
        if len(data) % 4 or len(data) > _max_coded(n):
            raise PayloadError(f"{what} has a coded length of {len(data)} bytes; a range-coded bitmap of {n} bits "
                               f"takes a multiple of 4 bytes, at most {_max_coded(n)}")
        try:
            decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
            packed = decoder.decode(_byte_model(ones, n), nbytes).astype(np.uint8)
        except Exception as exc:  # the coder rejects malformed streams in its own way
            raise PayloadError(f"{what} is not a valid range-coded stream: {exc}") from None
    bits = np.unpackbits(packed)
    if bits[n:].any():
        raise PayloadError(f"{what} has non-zero padding bits")
    bits = bits[:n].astype(bool)
    got = int(np.count_nonzero(bits))
    if got != ones:
        raise PayloadError(f"{what} decodes to {got} ones but its header says {ones}")
    if coder == "range" and _range_code(packed, ones, n) != data:  # padded, cut or altered, yet decodable
        raise PayloadError(f"{what} is not the range coder's encoding of the bits it decodes to (padded, cut short "
                           "or altered)")
    return bits


def _filter_flags(mask: np.ndarray, index: int) -> np.ndarray:
    """One flag per output filter of a structured mask (checking that whole filters are kept or dropped)."""
    flags = whole_filters(mask)
    if flags is None:
        raise PayloadError(f"structured mask {index} does not keep or drop whole filters")
    return flags


def encode_mask(
    masks: Sequence[np.ndarray],
    base: Sequence[np.ndarray],
    *,
    round: int,
    base_version: int = 0,
    coder: str = "range",
    structured: bool = False,
    num_samples: int = 0,
    grow: bool = False,
) -> bytes:
    """Encode masks as bits over the previous support ``base`` (each mask must be a subset of it).
    With `grow` the body is marked as positions to add: ``base`` is then the complement of the
    receiver's mask, and the receiver adds what it decodes."""
    _check_coder(coder)
    if len(masks) != len(base):
        raise PayloadError(f"{len(masks)} masks but {len(base)} base supports")
    parts = []
    for i, (mask, prev) in enumerate(zip(masks, base)):
        mask, prev = np.asarray(mask, dtype=bool), np.asarray(prev, dtype=bool)
        if mask.shape != prev.shape:
            raise PayloadError(f"mask {i} has shape {mask.shape} but its base has shape {prev.shape}")
        if (mask > prev).any():
            raise PayloadError(f"mask {i} is not a subset of the previous support")
        if structured:
            mask, prev = _filter_flags(mask, i), _filter_flags(prev, i)
        bits = mask.reshape(-1)[positions(prev)]
        data = _code_bits(bits, coder)
        parts.append(_bitmap_record(bits, data))
    flags = (_STRUCTURED if structured else 0) | (_GROW if grow else 0)
    return _pack(Kind.MASK, MASK_CODERS[coder], flags, round, base_version, num_samples, len(masks), b"".join(parts))


def decode_mask(
    buf: bytes,
    base: Sequence[np.ndarray],
    *,
    round: int | None = None,
    base_version: int | None = None,
    structured: bool = False,
    grow: bool = False,
) -> Body:
    """Decode masks coded over ``base``; the result is a full-shape subset of each base. `grow`
    must match the body's mark (see `encode_mask`)."""
    flags = (_STRUCTURED if structured else 0) | (_GROW if grow else 0)
    header, payload = _unpack(buf, Kind.MASK, round, base_version, len(base), flags)
    coder = _coder_name(header.encoding)
    reader = _Reader(payload)
    masks = []
    for i, prev in enumerate(base):
        prev = np.asarray(prev, dtype=bool)
        support = _filter_flags(prev, i) if structured else prev
        n, ones, length = reader.unpack(_MASK_META, f"the header of mask {i}")
        where = positions(support)
        if n != where.size:
            raise PayloadError(f"mask {i} is coded over {n} positions but the previous support has {where.size}")
        flat = np.zeros(support.size, dtype=bool)
        flat[where] = _decode_bits(reader.take(length, f"the bits of mask {i}"), coder, n, ones, f"mask {i}")
        if structured:
            flat = np.broadcast_to(flat[:, None], rows(prev).shape)
        masks.append(np.ascontiguousarray(flat).reshape(prev.shape))
    reader.finish()
    return Body(header.kind, header.round, header.base_version, header.num_samples, masks, flags)


# --------------------------------------------------------------------------- sparse updates


def _sparse_record(tensor: np.ndarray, dtype: str, coder: str) -> bytes:
    """Positions and values of one tensor's non-zeros, counted after quantization.

    An entry that quantizes to zero is dropped from the positions, so the decoder can refuse a
    zero value at a coded position and every tensor has exactly one encoding.
    """
    flat = _float32(tensor).reshape(-1)
    nonzero = np.flatnonzero(flat)
    raw, scale = _quantize(flat[nonzero], dtype)
    sent = raw != 0
    bits = np.zeros(flat.size, dtype=bool)
    bits[nonzero[sent]] = True
    data = _code_bits(bits, coder)
    return _bitmap_record(bits, data) + _values_record(raw[sent], scale)


def encode_sparse(
    tensors: Sequence[np.ndarray],
    *,
    round: int,
    base_version: int = 0,
    num_samples: int = 0,
    dtype: str = "float32",
    coder: str = "range",
) -> bytes:
    """Encode sparse tensors (top-k updates): coded positions of the non-zeros, then their values."""
    _check_coder(coder)
    encoding = _value_dtype(dtype)[0] | MASK_CODERS[coder] << 4
    payload = b"".join(_sparse_record(t, dtype, coder) for t in tensors)
    return _pack(Kind.SPARSE, encoding, 0, round, base_version, num_samples, len(tensors), payload)


def decode_sparse(
    buf: bytes,
    shapes: Sequence[tuple[int, ...]],
    *,
    max_ones: Sequence[int] | None = None,
    round: int | None = None,
    base_version: int | None = None,
) -> Body:
    """Decode sparse tensors into full shape; ``max_ones`` caps the non-zeros per tensor."""
    header, payload = _unpack(buf, Kind.SPARSE, round, base_version, len(shapes))
    dtype, coder = _dtype_name(header.encoding & 0x0F), _coder_name(header.encoding >> 4)
    reader = _Reader(payload)
    tensors = []
    for i, shape in enumerate(shapes):
        size = int(np.prod(shape))
        n, ones, length = reader.unpack(_MASK_META, f"the header of sparse tensor {i}")
        if n != size:
            raise PayloadError(f"sparse tensor {i} has {n} positions, expected {size}")
        if max_ones is not None and ones > max_ones[i]:
            raise PayloadError(f"sparse tensor {i} has {ones} non-zeros, more than the allowed {max_ones[i]}")
        bits = _decode_bits(reader.take(length, f"the positions of sparse tensor {i}"), coder, n, ones,
                            f"the positions of sparse tensor {i}")
        values = _decode_values(reader, dtype, ones, i)
        if not values.all():
            raise PayloadError(f"sparse tensor {i} carries a zero value at a coded position")
        flat = np.zeros(size, dtype=np.float32)
        flat[bits] = values
        tensors.append(flat.reshape(shape))
    reader.finish()
    return Body(header.kind, header.round, header.base_version, header.num_samples, tensors)


# --------------------------------------------------------------------------- initial weights


@dataclass(frozen=True)
class InitRef:
    """What an ``INIT`` body says of the initial weights: where they come from and their digest."""

    round: int
    source: str
    seed: int
    digest: bytes


def weights_digest(tensors: Sequence[np.ndarray]) -> bytes:
    """SHA-256 over every tensor's shape and float32 little-endian bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = np.ascontiguousarray(t, dtype="<f4")
        h.update(_U32.pack(t.ndim) + b"".join(_U32.pack(d) for d in t.shape))
        h.update(t.tobytes())
    return h.digest()


def encode_init(tensors: Sequence[np.ndarray], *, source: str, seed: int, round: int) -> bytes:
    """A reference to the initial weights (their source, seed and digest) instead of the weights."""
    if source not in INIT_SOURCES:
        raise PayloadError(f"unknown initial-weights source {source!r}; choose one of {sorted(INIT_SOURCES)}")
    if not 0 <= seed < 2**32:
        raise PayloadError(f"seed {seed} does not fit in 32 bits")
    return _pack(Kind.INIT, INIT_SOURCES[source], 0, round, 0, 0, 0, _INIT.pack(seed, weights_digest(tensors)))


def encode_init_request(ref: InitRef) -> bytes:
    """A node's reply asking for the initial weights `ref` names, which it cannot find or rebuild."""
    return _pack(Kind.INIT, INIT_SOURCES["request"], 0, ref.round, 0, 0, 0, _INIT.pack(ref.seed, ref.digest))


def decode_init(buf: bytes, *, round: int | None = None) -> InitRef:
    """Decode an ``INIT`` body (exactly 36 payload bytes)."""
    header, payload = _unpack(buf, Kind.INIT, round, 0, 0)
    sources = {code: name for name, code in INIT_SOURCES.items()}
    if header.encoding not in sources:
        raise PayloadError(f"unknown initial-weights source code {header.encoding}")
    reader = _Reader(payload)
    seed, digest = reader.unpack(_INIT, "the initial-weights reference")
    reader.finish()
    return InitRef(header.round, sources[header.encoding], seed, bytes(digest))


def peek(buf: bytes) -> Body:
    """A body's header fields (kind, round, base version, num_samples) without decoding its payload, for dispatch."""
    view = _bytes_view(buf)
    if len(view) < HEADER_SIZE or bytes(view[:4]) != MAGIC:
        raise PayloadError("not an mpfl message: too short or bad magic")
    _, version, kind, _, flags, round, base_version, num_samples, _, _ = _HEADER.unpack_from(view)
    if version not in READABLE_VERSIONS:
        raise PayloadError(f"format version {version} is not supported (expected {VERSION}); upgrade mpfl on both sides")
    if kind not in Kind._value2member_map_:
        raise PayloadError(f"unknown body kind {kind}")
    return Body(Kind(kind), round, base_version, num_samples, [], flags)
