"""The wire format: every message of every method becomes bytes here and nowhere else.

A body is a 32-byte header followed by a payload of per-tensor records.

Header (little-endian): magic ``b"MPFL"``, format version (u8), kind (u8), encoding (u8: the
value dtype or the mask coder), flags (u8: bit 0 = structured mask), round (u32), base
(u32: the version of the support the body is coded over, so sender and receiver can check
they agree on it), num_samples (u32), tensor count (u32), payload length (u32), CRC-32 of
everything else (u32).

Payload records, one per tensor, by kind:

- ``WEIGHTS`` / ``SCORES`` / ``VALUES``: count (u32) [+ scale (f32) for int8], then the
  values. ``VALUES`` holds only the entries inside a support both sides know, in row-major
  order, so no indices travel.
- ``MASK``: coded positions (u32: the size of the previous support), ones (u32), coded
  length (u32), then the bits of the new mask over the previous support only, range coded
  with the Bernoulli probability ones/positions (or raw ``packbits``). A structured mask
  spends one bit per output filter.
- ``SPARSE``: tensor size (u32), ones (u32), coded length (u32), the range-coded position
  bitmap (which costs no more than optimally coded index gaps), then the values.

Decoding is strict: the receiver states what it expects (kind, round, shapes, supports)
and every header field, count, length and checksum is checked before anything of the
payload's size is allocated. Any violation raises :class:`PayloadError`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence

import constriction
import numpy as np

from .errors import PayloadError

MAGIC = b"MPFL"
VERSION = 1
_HEADER = struct.Struct("<4sBBBBIIIII")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _CRC.size
_U32 = struct.Struct("<I")
_MASK_META = struct.Struct("<III")
_F32 = struct.Struct("<f")
_STRUCTURED = 1


class Kind(IntEnum):
    """What a body carries; the receiver names the kind it expects."""

    WEIGHTS = 1
    MASK = 2
    VALUES = 3
    SCORES = 4
    SPARSE = 5


VALUE_DTYPES = {"float32": (0, np.dtype("<f4")), "float16": (1, np.dtype("<f2")), "int8": (2, np.dtype("i1"))}
MASK_CODERS = {"range": 0, "packbits": 1}
_DTYPE_BY_CODE = {code: (name, dt) for name, (code, dt) in VALUE_DTYPES.items()}
_CODER_BY_CODE = {code: name for name, code in MASK_CODERS.items()}
_DENSE_KINDS = (Kind.WEIGHTS, Kind.SCORES, Kind.VALUES)


@dataclass(frozen=True)
class Body:
    """A decoded body: header fields and the decoded tensors (full shape, zeros outside supports)."""

    kind: Kind
    round: int
    base: int
    num_samples: int
    tensors: list[np.ndarray]


# --------------------------------------------------------------------------- header


def _pack(kind: Kind, encoding: int, flags: int, round: int, base: int, num_samples: int, count: int, payload: bytes) -> bytes:
    if not all(0 <= v < 2**32 for v in (round, base, num_samples)):
        raise PayloadError(f"round {round}, base {base} and num_samples {num_samples} must fit in 32 bits")
    head = _HEADER.pack(MAGIC, VERSION, int(kind), encoding, flags, round, base, num_samples, count, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, _CRC.pack(crc), payload))


@dataclass(frozen=True)
class _Header:
    kind: Kind
    encoding: int
    flags: int
    round: int
    base: int
    num_samples: int
    count: int


def _unpack(buf: bytes, kind: Kind, round: int | None, base: int | None, count: int) -> tuple[_Header, memoryview]:
    view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
    if len(view) < HEADER_SIZE:
        raise PayloadError(f"body of {len(view)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, got_kind, encoding, flags, got_round, got_base, num_samples, got_count, length = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {bytes(magic)!r}: this is not an mpfl message")
    if version != VERSION:
        raise PayloadError(f"format version {version} is not supported (expected {VERSION}); upgrade mpfl on both sides")
    if got_kind != kind:
        name = Kind(got_kind).name if got_kind in Kind._value2member_map_ else str(got_kind)
        raise PayloadError(f"expected a {kind.name} body, got {name}")
    if round is not None and got_round != round:
        raise PayloadError(f"body is for round {got_round}, expected round {round}")
    if base is not None and got_base != base:
        raise PayloadError(f"body is coded over mask version {got_base}, but the receiver holds version {base}")
    if got_count != count:
        raise PayloadError(f"body holds {got_count} tensors, expected {count}")
    if length != len(view) - HEADER_SIZE:
        raise PayloadError(f"payload length field says {length} bytes but {len(view) - HEADER_SIZE} arrived (truncated or extended)")
    (crc,) = _CRC.unpack_from(view, _HEADER.size)
    if zlib.crc32(view[HEADER_SIZE:], zlib.crc32(view[: _HEADER.size])) != crc:
        raise PayloadError("checksum mismatch: the body was corrupted in transit")
    header = _Header(Kind(got_kind), encoding, flags, got_round, got_base, num_samples, got_count)
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

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack(self.take(st.size, what))

    def finish(self) -> None:
        if self.pos != len(self.view):
            raise PayloadError(f"{len(self.view) - self.pos} unexpected trailing bytes after the last tensor")


# --------------------------------------------------------------------------- values


def _value_dtype(dtype: str) -> tuple[int, np.dtype]:
    try:
        return VALUE_DTYPES[dtype]
    except KeyError:
        raise PayloadError(f"unknown value dtype {dtype!r}; choose one of {sorted(VALUE_DTYPES)}") from None


def _encode_values(flat: np.ndarray, dtype: str) -> bytes:
    code, dt = _value_dtype(dtype)
    flat = np.asarray(flat, dtype=np.float32).ravel()
    if not np.isfinite(flat).all():
        raise PayloadError("refusing to encode NaN or Inf values")
    if dtype == "int8":
        peak = float(np.abs(flat).max()) if flat.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        q = np.clip(np.rint(flat / scale), -127, 127).astype(dt)
        return _U32.pack(flat.size) + _F32.pack(scale) + q.tobytes()
    return _U32.pack(flat.size) + flat.astype(dt).tobytes()


def _decode_values(reader: _Reader, dtype_code: int, expected: int, index: int) -> np.ndarray:
    if dtype_code not in _DTYPE_BY_CODE:
        raise PayloadError(f"unknown value dtype code {dtype_code}")
    name, dt = _DTYPE_BY_CODE[dtype_code]
    (count,) = reader.unpack(_U32, f"the count of tensor {index}")
    if count != expected:
        raise PayloadError(f"tensor {index} holds {count} values, expected {expected}")
    scale = reader.unpack(_F32, f"the scale of tensor {index}")[0] if name == "int8" else 1.0
    raw = np.frombuffer(reader.take(count * dt.itemsize, f"the values of tensor {index}"), dtype=dt)
    if name == "int8":
        if not np.isfinite(scale) or scale <= 0:
            raise PayloadError(f"tensor {index} has an invalid int8 scale {scale}")
        if raw.size and raw.min() < -127:
            raise PayloadError(f"tensor {index} holds the int8 value -128, which the encoder never writes")
        return raw.astype(np.float32) * np.float32(scale)
    out = raw.astype(np.float32)
    if not np.isfinite(out).all():
        raise PayloadError(f"tensor {index} contains NaN or Inf values")
    return out


def encode_dense(
    kind: Kind, tensors: Sequence[np.ndarray], *, round: int, base: int = 0, num_samples: int = 0, dtype: str = "float32"
) -> bytes:
    """Encode whole tensors (initial weights, dense FedAvg, saliency scores)."""
    if kind not in _DENSE_KINDS:
        raise PayloadError(f"{kind.name} is not a dense kind")
    payload = b"".join(_encode_values(t, dtype) for t in tensors)
    return _pack(kind, _value_dtype(dtype)[0], 0, round, base, num_samples, len(tensors), payload)


def decode_dense(
    buf: bytes, kind: Kind, shapes: Sequence[tuple[int, ...]], *, round: int | None = None, base: int | None = None
) -> Body:
    """Decode whole tensors, checking each count against the expected shape."""
    header, payload = _unpack(buf, kind, round, base, len(shapes))
    reader = _Reader(payload)
    tensors = [
        _decode_values(reader, header.encoding, int(np.prod(shape)), i).reshape(shape) for i, shape in enumerate(shapes)
    ]
    reader.finish()
    return Body(header.kind, header.round, header.base, header.num_samples, tensors)


def encode_values(
    tensors: Sequence[np.ndarray],
    supports: Sequence[np.ndarray],
    *,
    round: int,
    base: int = 0,
    num_samples: int = 0,
    dtype: str = "float32",
) -> bytes:
    """Encode the entries of each tensor inside its support (both sides know the supports)."""
    if len(tensors) != len(supports):
        raise PayloadError(f"{len(tensors)} tensors but {len(supports)} supports")
    payload = b"".join(_encode_values(np.asarray(t).reshape(-1)[np.asarray(s).reshape(-1)], dtype) for t, s in zip(tensors, supports))
    return _pack(Kind.VALUES, _value_dtype(dtype)[0], 0, round, base, num_samples, len(tensors), payload)


def decode_values(
    buf: bytes, supports: Sequence[np.ndarray], *, round: int | None = None, base: int | None = None
) -> Body:
    """Decode kept values into full-shape tensors that are exactly zero outside each support."""
    header, payload = _unpack(buf, Kind.VALUES, round, base, len(supports))
    reader = _Reader(payload)
    tensors = []
    for i, support in enumerate(supports):
        support = np.asarray(support, dtype=bool)
        full = np.zeros(support.shape, dtype=np.float32)
        full[support] = _decode_values(reader, header.encoding, int(support.sum()), i)
        tensors.append(full)
    reader.finish()
    return Body(header.kind, header.round, header.base, header.num_samples, tensors)


# --------------------------------------------------------------------------- masks

_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)


def _byte_model(p: float) -> "constriction.stream.model.Categorical":
    """Categorical model over packed bytes whose 8 bits are i.i.d. Bernoulli(p)."""
    probs = np.exp(_POPCOUNT * np.log(p) + (8 - _POPCOUNT) * np.log1p(-p))
    return constriction.stream.model.Categorical(probs / probs.sum(), perfect=False)


def _code_bits(bits: np.ndarray, coder: str) -> bytes:
    ones = int(bits.sum())
    if ones in (0, bits.size):
        return b""
    packed = np.packbits(bits)
    if coder == "packbits":
        return packed.tobytes()
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(packed.astype(np.int32), _byte_model(ones / bits.size))
    return encoder.get_compressed().astype("<u4").tobytes()


def _decode_bits(data: memoryview, coder: str, n: int, ones: int, index: int) -> np.ndarray:
    if ones > n:
        raise PayloadError(f"mask {index} claims {ones} ones over only {n} positions")
    if ones in (0, n):
        if len(data):
            raise PayloadError(f"mask {index} is constant but carries {len(data)} coded bytes")
        return np.full(n, ones == n, dtype=bool)
    nbytes = (n + 7) // 8
    if coder == "packbits":
        if len(data) != nbytes:
            raise PayloadError(f"mask {index} carries {len(data)} packed bytes, expected {nbytes}")
        packed = np.frombuffer(data, dtype=np.uint8)
    else:
        if len(data) % 4 or len(data) > nbytes + 64:
            raise PayloadError(f"mask {index} has an invalid coded length of {len(data)} bytes")
        try:
            decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
            packed = decoder.decode(_byte_model(ones / n), nbytes).astype(np.uint8)
        except Exception as exc:  # the coder rejects malformed streams in its own way
            raise PayloadError(f"mask {index} is not a valid range-coded stream: {exc}") from None
    bits = np.unpackbits(packed)
    if bits[n:].any():
        raise PayloadError(f"mask {index} has non-zero padding bits")
    bits = bits[:n].astype(bool)
    if int(bits.sum()) != ones:
        raise PayloadError(f"mask {index} decodes to {int(bits.sum())} ones but its header says {ones}")
    return bits


def _rows(mask: np.ndarray, index: int) -> np.ndarray:
    """One flag per output filter of a structured mask (checking the mask is row-constant)."""
    mask = np.asarray(mask, dtype=bool)
    rows = mask.reshape(mask.shape[0], -1) if mask.ndim else mask.reshape(1, 1)
    flags = rows.any(axis=1)
    if not (rows == flags[:, None]).all():
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
) -> bytes:
    """Encode masks as bits over the previous support ``base`` (each mask must be a subset of it)."""
    if coder not in MASK_CODERS:
        raise PayloadError(f"unknown mask coder {coder!r}; choose one of {sorted(MASK_CODERS)}")
    if len(masks) != len(base):
        raise PayloadError(f"{len(masks)} masks but {len(base)} base supports")
    parts = []
    for i, (mask, prev) in enumerate(zip(masks, base)):
        mask, prev = np.asarray(mask, dtype=bool), np.asarray(prev, dtype=bool)
        if mask.shape != prev.shape:
            raise PayloadError(f"mask {i} has shape {mask.shape} but its base has shape {prev.shape}")
        if (mask & ~prev).any():
            raise PayloadError(f"mask {i} is not a subset of the previous support")
        if structured:
            mask, prev = _rows(mask, i), _rows(prev, i)
        bits = mask.reshape(-1)[prev.reshape(-1)]
        data = _code_bits(bits, coder)
        parts.append(_MASK_META.pack(bits.size, int(bits.sum()), len(data)) + data)
    flags = _STRUCTURED if structured else 0
    return _pack(Kind.MASK, MASK_CODERS[coder], flags, round, base_version, num_samples, len(masks), b"".join(parts))


def decode_mask(
    buf: bytes,
    base: Sequence[np.ndarray],
    *,
    round: int | None = None,
    base_version: int | None = None,
    structured: bool = False,
) -> Body:
    """Decode masks coded over ``base``; the result is a full-shape subset of each base."""
    header, payload = _unpack(buf, Kind.MASK, round, base_version, len(base))
    if header.encoding not in _CODER_BY_CODE:
        raise PayloadError(f"unknown mask coder code {header.encoding}")
    if bool(header.flags & _STRUCTURED) != structured or header.flags & ~_STRUCTURED:
        raise PayloadError(f"mask flags {header.flags} do not match the expected {'structured' if structured else 'unstructured'} mask")
    coder = _CODER_BY_CODE[header.encoding]
    reader = _Reader(payload)
    masks = []
    for i, prev in enumerate(base):
        prev = np.asarray(prev, dtype=bool)
        support = _rows(prev, i) if structured else prev.reshape(-1)
        n, ones, length = reader.unpack(_MASK_META, f"the header of mask {i}")
        if n != int(support.sum()):
            raise PayloadError(f"mask {i} is coded over {n} positions but the previous support has {int(support.sum())}")
        bits = _decode_bits(reader.take(length, f"the bits of mask {i}"), coder, n, ones, i)
        flat = np.zeros(support.shape, dtype=bool)
        flat[support] = bits
        if structured:
            flat = np.broadcast_to(flat.reshape((-1,) + (1,) * (prev.ndim - 1)), prev.shape)
        masks.append(np.ascontiguousarray(flat.reshape(prev.shape)))
    reader.finish()
    return Body(header.kind, header.round, header.base, header.num_samples, masks)


# --------------------------------------------------------------------------- sparse updates


def encode_sparse(
    tensors: Sequence[np.ndarray],
    *,
    round: int,
    base: int = 0,
    num_samples: int = 0,
    dtype: str = "float32",
    coder: str = "range",
) -> bytes:
    """Encode sparse tensors (top-k updates): coded positions of the non-zeros, then their values."""
    parts = []
    for i, tensor in enumerate(tensors):
        flat = np.asarray(tensor, dtype=np.float32).reshape(-1)
        bits = flat != 0
        data = _code_bits(bits, coder)
        parts.append(_MASK_META.pack(flat.size, int(bits.sum()), len(data)) + data + _encode_values(flat[bits], dtype))
    encoding = _value_dtype(dtype)[0] | MASK_CODERS[coder] << 4
    return _pack(Kind.SPARSE, encoding, 0, round, base, num_samples, len(tensors), b"".join(parts))


def decode_sparse(
    buf: bytes,
    shapes: Sequence[tuple[int, ...]],
    *,
    max_ones: Sequence[int] | None = None,
    round: int | None = None,
    base: int | None = None,
) -> Body:
    """Decode sparse tensors into full shape; ``max_ones`` caps the non-zeros per tensor."""
    header, payload = _unpack(buf, Kind.SPARSE, round, base, len(shapes))
    dtype_code, coder_code = header.encoding & 0x0F, header.encoding >> 4
    if coder_code not in _CODER_BY_CODE:
        raise PayloadError(f"unknown position coder code {coder_code}")
    reader = _Reader(payload)
    tensors = []
    for i, shape in enumerate(shapes):
        size = int(np.prod(shape))
        n, ones, length = reader.unpack(_MASK_META, f"the header of sparse tensor {i}")
        if n != size:
            raise PayloadError(f"sparse tensor {i} has {n} positions, expected {size}")
        if max_ones is not None and ones > max_ones[i]:
            raise PayloadError(f"sparse tensor {i} has {ones} non-zeros, more than the allowed {max_ones[i]}")
        bits = _decode_bits(reader.take(length, f"the positions of sparse tensor {i}"), _CODER_BY_CODE[coder_code], n, ones, i)
        flat = np.zeros(size, dtype=np.float32)
        flat[bits] = _decode_values(reader, dtype_code, ones, i)
        tensors.append(flat.reshape(shape))
    reader.finish()
    return Body(header.kind, header.round, header.base, header.num_samples, tensors)


def peek(buf: bytes) -> Body:
    """A body's header fields (kind, round, base, num_samples) without decoding its payload, for dispatch."""
    view = memoryview(buf).cast("B")
    if len(view) < HEADER_SIZE or bytes(view[:4]) != MAGIC:
        raise PayloadError("not an mpfl message: too short or bad magic")
    _, _, kind, _, _, round, base, num_samples, _, _ = _HEADER.unpack_from(view)
    if kind not in Kind._value2member_map_:
        raise PayloadError(f"unknown body kind {kind}")
    return Body(Kind(kind), round, base, num_samples, [])
