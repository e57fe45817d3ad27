"""The wire codec: exact round trips, documented quantization error, byte counts, coded size
near the entropy bound, strict rejection of every malformed body, and bodies built byte by byte
from the spec at the top of codec.py."""

from __future__ import annotations

import hashlib
import math
import re
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpfl import codec
from mpfl.codec import HEADER_SIZE, Kind
from mpfl.errors import PayloadError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEADER = struct.Struct("<4sBBBBIIIII")
F32_MAX = float(np.finfo(np.float32).max)

# --------------------------------------------------------------------------- building blocks


def reframe(body: bytes, payload: bytes | None = None, **fields: int) -> bytes:
    """Rebuild a body with a new payload and/or header fields and a correct length and checksum,
    so a test reaches the checks behind the checksum."""
    names = ("magic", "version", "kind", "encoding", "flags", "round", "base", "num_samples", "count", "length")
    values = dict(zip(names, HEADER.unpack_from(body)))
    payload = body[HEADER_SIZE:] if payload is None else payload
    values["length"] = len(payload)
    values.update(fields)
    head = HEADER.pack(*(values[n] for n in names))
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def reseal(body: bytes | bytearray) -> bytes:
    """The same bytes with the checksum recomputed (the length field is left as it is)."""
    body = bytes(body)
    return body[:28] + struct.pack("<I", zlib.crc32(body[HEADER_SIZE:], zlib.crc32(body[:28]))) + body[HEADER_SIZE:]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """Bit-for-bit equality of two tensor lists (so -0.0 and 0.0 differ)."""
    return len(a) == len(b) and all((x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes()) for x, y in zip(a, b))


def entropy_bits(n: int, ones: int) -> float:
    if ones in (0, n):
        return 0.0
    p = ones / n
    return -n * (p * math.log2(p) + (1 - p) * math.log2(1 - p))


def random_mask(shape: tuple[int, ...], density: float, seed: int) -> np.ndarray:
    return np.asarray(np.random.default_rng(seed).random(shape) < density)


def filter_mask(shape: tuple[int, ...], density: float, seed: int) -> np.ndarray:
    """A structured mask: whole output filters (axis 0) kept or dropped."""
    rows = shape[0] if shape else 1
    flags = random_mask((rows,), density, seed)
    return np.broadcast_to(flags.reshape((rows,) + (1,) * max(len(shape) - 1, 0)), shape or (1,)).reshape(shape).copy()


def keeps_whole_filters(mask: np.ndarray) -> bool:
    """Whether every output filter (axis 0) of a mask is either wholly kept or wholly dropped."""
    grid = mask.reshape(mask.shape[0], int(np.prod(mask.shape[1:])))
    return bool((grid == grid[:, :1]).all())


densities = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0))
seeds = st.integers(0, 2**32 - 1)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9)
shape_lists = st.lists(shapes, min_size=0, max_size=3)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
half_range = st.floats(-65504, 65504, width=32)
int8_range = st.floats(-(2.0**100), 2.0**100, width=32)


@st.composite
def tensor_lists(draw, elements=finite32) -> list[np.ndarray]:
    return [draw(hnp.arrays(np.float32, s, elements=elements)) for s in draw(shape_lists)]


@st.composite
def nested_masks(draw, structured: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(masks, bases): each mask a subset of its base, at drawn densities."""
    make = filter_mask if structured else random_mask
    bases, masks = [], []
    for shape in draw(shape_lists):
        base = make(shape, draw(densities), draw(seeds))
        bases.append(base)
        masks.append(base & make(shape, draw(densities), draw(seeds)))
    return masks, bases


# --------------------------------------------------------------------------- round trips


@FAST
@given(tensor_lists(), st.sampled_from([Kind.WEIGHTS, Kind.SCORES, Kind.VALUES]), st.integers(0, 2**32 - 1))
def test_dense_float32_round_trip_is_bit_exact(tensors, kind, round_):
    body = codec.encode_dense(kind, tensors, round=round_, num_samples=7)
    out = codec.decode_dense(body, kind, [t.shape for t in tensors], round=round_)
    assert same(out.tensors, tensors)
    assert (out.kind, out.round, out.num_samples) == (kind, round_, 7)
    assert all(t.flags.writeable for t in out.tensors)


@FAST
@given(st.data())
def test_values_round_trip_inside_supports(data):
    tensors = data.draw(tensor_lists())
    supports = [random_mask(t.shape, data.draw(densities), data.draw(seeds)) for t in tensors]
    body = codec.encode_values(tensors, supports, round=3, base_version=2)
    out = codec.decode_values(body, supports, round=3, base_version=2)
    assert same(out.tensors, [np.where(s, t, np.float32(0)) for t, s in zip(tensors, supports)])
    kept = codec.decode_kept_values(body, [int(s.sum()) for s in supports], round=3, base_version=2)
    assert same(kept.tensors, [t[s] for t, s in zip(tensors, supports)])
    assert (kept.kind, kept.round, kept.base_version) == (out.kind, out.round, out.base_version)


def test_kept_values_must_have_the_counts_the_receiver_expects():
    body = codec.encode_values([np.arange(4, dtype=np.float32)], [np.array([1, 0, 1, 1], bool)], round=1)
    assert codec.decode_kept_values(body, [3]).tensors[0].tolist() == [0.0, 2.0, 3.0]
    with pytest.raises(PayloadError, match="holds 3 values, expected 2"):
        codec.decode_kept_values(body, [2])
    with pytest.raises(PayloadError):
        codec.decode_kept_values(body, [3, 1])


@FAST
@given(tensor_lists(half_range))
def test_float16_values_are_rounded_to_nearest(tensors):
    body = codec.encode_dense(Kind.WEIGHTS, tensors, round=1, dtype="float16")
    out = codec.decode_dense(body, Kind.WEIGHTS, [t.shape for t in tensors]).tensors
    for x, y in zip(tensors, out):
        assert np.array_equal(y, x.astype(np.float16).astype(np.float32))
        err = np.abs(y.astype(np.float64) - x)
        assert (err <= np.maximum(2.0**-11 * np.abs(x), 2.0**-25)).all()


def int8_scale(x: np.ndarray) -> np.float32:
    """The scale the format documents: max|x| / 127 in float32 (1 for an all-zero tensor), one
    subnormal step up at a time while the peak would still round beyond 127 steps."""
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak == 0:
        return np.float32(1)
    tiny = np.finfo(np.float32).smallest_subnormal
    scale = max(np.float32(peak / 127), np.float32(tiny))
    while peak / float(scale) >= 127.5:
        scale = np.float32(scale + tiny)
    return scale


def test_a_subnormal_scale_that_rounds_down_is_raised_until_the_peak_fits_in_127_steps():
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    x = np.array([305 * tiny, 0], dtype=np.float32)  # peak / 127 = 2.40 steps, which rounds to 2: 152.5 steps
    body = codec.encode_dense(Kind.WEIGHTS, [x], round=1, dtype="int8")
    (scale,) = struct.unpack_from("<f", body, HEADER_SIZE + 4)
    assert scale == np.float32(3 * tiny) == int8_scale(x)
    assert struct.unpack_from("<2b", body, HEADER_SIZE + 8) == (102, 0)  # 305 / 3 = 101.7 steps


def assert_int8_error(x: np.ndarray, y: np.ndarray, scale: np.float32) -> None:
    err = np.abs(y.astype(np.float64) - x)
    ulp = np.spacing(np.maximum(np.abs(x), np.abs(y)).astype(np.float32)).astype(np.float64)
    assert (err <= float(scale) / 2 + ulp).all()


@FAST
@given(tensor_lists(int8_range))
def test_int8_values_err_at_most_half_a_step(tensors):
    body = codec.encode_dense(Kind.WEIGHTS, tensors, round=1, dtype="int8")
    out = codec.decode_dense(body, Kind.WEIGHTS, [t.shape for t in tensors]).tensors
    pos = HEADER_SIZE
    for x, y in zip(tensors, out):
        count, scale = struct.unpack_from("<If", body, pos)
        assert count == x.size and np.float32(scale) == int8_scale(x)
        assert_int8_error(x, y, np.float32(scale))
        pos += 8 + x.size


@FAST
@given(nested_masks(), st.sampled_from(sorted(codec.MASK_CODERS)))
def test_mask_round_trip(pair, coder):
    masks, bases = pair
    body = codec.encode_mask(masks, bases, round=4, base_version=3, coder=coder, num_samples=11)
    out = codec.decode_mask(body, bases, round=4, base_version=3)
    assert same(out.tensors, masks)
    assert out.num_samples == 11 and all(t.flags.writeable for t in out.tensors)


@FAST
@given(nested_masks(structured=True), st.sampled_from(sorted(codec.MASK_CODERS)))
def test_structured_mask_round_trip(pair, coder):
    masks, bases = pair
    body = codec.encode_mask(masks, bases, round=2, coder=coder, structured=True)
    out = codec.decode_mask(body, bases, round=2, structured=True)
    assert same(out.tensors, masks)


@FAST
@given(st.data(), st.sampled_from(sorted(codec.MASK_CODERS)))
def test_sparse_float32_round_trip(data, coder):
    dense = data.draw(tensor_lists())
    tensors = [np.where(random_mask(t.shape, data.draw(densities), data.draw(seeds)), t, np.float32(0)) for t in dense]
    body = codec.encode_sparse(tensors, round=5, coder=coder)
    out = codec.decode_sparse(body, [t.shape for t in tensors], max_ones=[t.size for t in tensors], round=5)
    assert all(np.array_equal(x, y) for x, y in zip(tensors, out.tensors))


@pytest.mark.parametrize("peak", [9.3e-43, 1.4e-45, 3e-41, 1e-38])
def test_int8_keeps_its_error_bound_at_subnormal_peaks(peak):
    """float32(peak / 127) can fall far below peak / 127 in the subnormal range; the peak must not be clipped."""
    x = np.array([peak, -peak / 3, 0.0], dtype=np.float32)
    body = codec.encode_dense(Kind.WEIGHTS, [x], round=1, dtype="int8")
    y = codec.decode_dense(body, Kind.WEIGHTS, [x.shape]).tensors[0]
    scale = np.frombuffer(body[HEADER_SIZE + 4 : HEADER_SIZE + 8], dtype="<f4")[0]
    assert float(scale) * 127 >= float(x[0]) * (1 - 1e-6)
    assert_int8_error(x, y, scale)


@FAST
@given(st.data())
def test_sparse_lossy_values_round_trip(data):
    dense = data.draw(tensor_lists(half_range))
    tensors = [np.where(random_mask(t.shape, 0.3, data.draw(seeds)), t, np.float32(0)) for t in dense]
    shapes_ = [t.shape for t in tensors]
    half = codec.decode_sparse(codec.encode_sparse(tensors, round=1, dtype="float16"), shapes_).tensors
    assert all(np.array_equal(y, x.astype(np.float16).astype(np.float32)) for x, y in zip(tensors, half))
    small = codec.decode_sparse(codec.encode_sparse(tensors, round=1, dtype="int8"), shapes_).tensors
    for x, y in zip(tensors, small):
        assert_int8_error(x, y, int8_scale(x))
        assert not (y[x == 0]).any()


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 5), (), (1,), (1, 1, 1)])
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_edge_shapes_and_constant_masks(shape, density):
    base = np.ones(shape, dtype=bool)
    mask = np.full(shape, density == 1.0)
    x = np.zeros(shape, dtype=np.float32)
    for coder in codec.MASK_CODERS:
        body = codec.encode_mask([mask], [base], round=1, coder=coder)
        assert same(codec.decode_mask(body, [base]).tensors, [mask])
        assert len(body) == HEADER_SIZE + 12
        body = codec.encode_mask([mask], [base], round=1, coder=coder, structured=True)
        assert same(codec.decode_mask(body, [base], structured=True).tensors, [mask])
        body = codec.encode_sparse([x], round=1, coder=coder)
        assert same(codec.decode_sparse(body, [shape], max_ones=[0]).tensors, [x])
    for dtype in codec.VALUE_DTYPES:
        body = codec.encode_dense(Kind.WEIGHTS, [x], round=1, dtype=dtype)
        assert same(codec.decode_dense(body, Kind.WEIGHTS, [shape]).tensors, [x])
        body = codec.encode_values([x], [mask], round=1, dtype=dtype)
        assert same(codec.decode_values(body, [mask]).tensors, [x])


def test_empty_message_round_trips():
    for body, decode in [
        (codec.encode_dense(Kind.SCORES, [], round=1), lambda b: codec.decode_dense(b, Kind.SCORES, [])),
        (codec.encode_values([], [], round=1), lambda b: codec.decode_values(b, [])),
        (codec.encode_mask([], [], round=1), lambda b: codec.decode_mask(b, [])),
        (codec.encode_sparse([], round=1), lambda b: codec.decode_sparse(b, [])),
    ]:
        assert len(body) == HEADER_SIZE and decode(body).tensors == []


def test_single_element_tensors():
    one = np.array([-2.5], dtype=np.float32)
    assert same(codec.decode_dense(codec.encode_dense(Kind.WEIGHTS, [one], round=1), Kind.WEIGHTS, [(1,)]).tensors, [one])
    assert same([dense_round_trip(one, "int8")], [one])
    assert same(codec.decode_sparse(codec.encode_sparse([one], round=1), [(1,)]).tensors, [one])
    base = [np.array([True])]
    for mask in (np.array([True]), np.array([False])):
        assert same(codec.decode_mask(codec.encode_mask([mask], base, round=1), base).tensors, [mask])


def dense_round_trip(x: np.ndarray, dtype: str) -> np.ndarray:
    body = codec.encode_dense(Kind.WEIGHTS, [x], round=1, dtype=dtype)
    return codec.decode_dense(body, Kind.WEIGHTS, [x.shape]).tensors[0]


def test_subnormal_and_extreme_values():
    tiny = np.array([1e-45, -3e-45, 0.0], dtype=np.float32)
    body = codec.encode_dense(Kind.WEIGHTS, [tiny], round=1, dtype="int8")
    scale = struct.unpack_from("<f", body, HEADER_SIZE + 4)[0]
    assert scale > 0
    assert_int8_error(tiny, codec.decode_dense(body, Kind.WEIGHTS, [(3,)]).tensors[0], np.float32(scale))
    big = np.array([1e38, -3e38, 1.0], dtype=np.float32)
    assert_int8_error(big, dense_round_trip(big, "int8"), int8_scale(big))
    edge = np.array([65504, -65519, 6e-8], dtype=np.float32)
    assert np.array_equal(dense_round_trip(edge, "float16"), edge.astype(np.float16).astype(np.float32))


# --------------------------------------------------------------------------- quantization error


def test_quantization_error_matches_the_decoded_values():
    x = np.random.default_rng(0).normal(size=5000).astype(np.float32)
    assert codec.quantization_error(x, "float32") == {"max_abs_error": 0.0, "rms_error": 0.0}
    for dtype in ("float16", "int8"):
        err = dense_round_trip(x, dtype).astype(np.float64) - x
        got = codec.quantization_error(x, dtype)
        assert got["max_abs_error"] == pytest.approx(np.abs(err).max(), rel=1e-12)
        assert got["rms_error"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-12)
    assert codec.quantization_error(x, "int8")["max_abs_error"] <= float(int8_scale(x)) / 2 * (1 + 1e-6)
    assert codec.quantization_error(x, "float16")["max_abs_error"] <= 2.0**-11 * float(np.abs(x).max())
    assert codec.quantization_error(np.zeros(0), "int8") == {"max_abs_error": 0.0, "rms_error": 0.0}


def test_quantization_error_refuses_what_cannot_be_sent():
    with pytest.raises(PayloadError, match="float16"):
        codec.quantization_error(np.array([1e5]), "float16")
    with pytest.raises(PayloadError, match="NaN"):
        codec.quantization_error(np.array([np.nan]), "int8")
    with pytest.raises(PayloadError, match="unknown value dtype"):
        codec.quantization_error(np.array([1.0]), "bfloat16")


# --------------------------------------------------------------------------- byte counts

ITEM = {"float32": 4, "float16": 2, "int8": 1}
EXTRA = {"float32": 0, "float16": 0, "int8": 4}


def values_bytes(k: int, dtype: str) -> int:
    return 4 + EXTRA[dtype] + ITEM[dtype] * k


@pytest.mark.parametrize("dtype", sorted(codec.VALUE_DTYPES))
def test_values_and_dense_byte_counts(dtype):
    rng = np.random.default_rng(1)
    tensors = [rng.normal(size=s).astype(np.float32) for s in [(10, 3), (7,), (0,), (4, 4, 2)]]
    supports = [rng.random(t.shape) < 0.4 for t in tensors]
    body = codec.encode_values(tensors, supports, round=1, dtype=dtype)
    assert len(body) == 32 + sum(values_bytes(int(s.sum()), dtype) for s in supports)
    body = codec.encode_dense(Kind.WEIGHTS, tensors, round=1, dtype=dtype)
    assert len(body) == 32 + sum(values_bytes(t.size, dtype) for t in tensors)
    if dtype == "float32":
        assert len(codec.encode_values(tensors, supports, round=1)) == 32 + sum(4 + 4 * int(s.sum()) for s in supports)


def test_mask_byte_counts():
    rng = np.random.default_rng(2)
    bases = [rng.random(s) < 0.7 for s in [(100,), (13, 5), (9,), (4,)]]
    masks = [b & (rng.random(b.shape) < d) for b, d in zip(bases, [0.3, 0.5, 0.0, 1.0])]
    kept = [int(b.sum()) for b in bases]
    ones = [int(m.sum()) for m in masks]
    packed = codec.encode_mask(masks, bases, round=1, coder="packbits")
    assert len(packed) == 32 + sum(12 + (0 if o in (0, n) else (n + 7) // 8) for n, o in zip(kept, ones))
    body = codec.encode_mask(masks, bases, round=1, coder="range")
    pos, total = HEADER_SIZE, 32
    for n, o in zip(kept, ones):
        got_n, got_ones, length = struct.unpack_from("<III", body, pos)
        assert (got_n, got_ones) == (n, o) and length % 4 == 0 and (length == 0) == (o in (0, n))
        pos += 12 + length
        total += 12 + length
    assert len(body) == total == pos
    filters = [filter_mask((6, 3, 2), 0.8, 3), filter_mask((20, 4), 0.8, 4)]
    chosen = [f & filter_mask(f.shape, 0.5, 5 + i) for i, f in enumerate(filters)]
    structured = codec.encode_mask(chosen, filters, round=1, coder="packbits", structured=True)
    kept_rows = [int(f.reshape(len(f), -1)[:, 0].sum()) for f in filters]
    one_rows = [int(c.reshape(len(c), -1)[:, 0].sum()) for c in chosen]
    assert 0 < one_rows[1] < kept_rows[1]
    assert len(structured) == 32 + sum(12 + (0 if o in (0, n) else (n + 7) // 8) for n, o in zip(kept_rows, one_rows))


def test_sparse_byte_counts():
    rng = np.random.default_rng(3)
    tensors = [np.where(rng.random(s) < 0.1, rng.normal(size=s), 0).astype(np.float32) for s in [(200,), (10, 10)]]
    for dtype in codec.VALUE_DTYPES:
        body = codec.encode_sparse(tensors, round=1, dtype=dtype, coder="packbits")
        nnz = [int(np.count_nonzero(t)) for t in tensors]
        assert len(body) == 32 + sum(12 + (t.size + 7) // 8 + values_bytes(k, dtype) for t, k in zip(tensors, nnz))


# --------------------------------------------------------------------------- coded size


@pytest.mark.parametrize("density", [0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.001, 0.999, 0.9])
def test_range_coded_mask_is_near_the_entropy_bound(density):
    n = 200_003
    mask = random_mask((n,), density, 7)
    body = codec.encode_mask([mask], [np.ones(n, dtype=bool)], round=1)
    assert len(body) - HEADER_SIZE <= 1.02 * entropy_bits(n, int(mask.sum())) / 8 + 64


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 31, 64, 1000, 200_000])
def test_range_coded_size_bound_at_extreme_counts(n):
    for ones in sorted(k for k in {1, 2, n // 2, n - 2, n - 1} if 0 < k < n):
        mask = np.zeros(n, dtype=bool)
        mask[np.random.default_rng(ones).choice(n, ones, replace=False)] = True
        body = codec.encode_mask([mask], [np.ones(n, dtype=bool)], round=1)
        assert len(body) - HEADER_SIZE <= 1.02 * entropy_bits(n, ones) / 8 + 64
        assert same(codec.decode_mask(body, [np.ones(n, dtype=bool)]).tensors, [mask])


@FAST
@given(st.integers(1, 30_000), densities, seeds)
def test_range_coded_masks_of_any_length_round_trip_within_the_bound(n, density, seed):
    base = [np.ones(n, dtype=bool)]
    mask = random_mask((n,), density, seed)
    body = codec.encode_mask([mask], base, round=1)
    assert same(codec.decode_mask(body, base).tensors, [mask])
    assert len(body) - HEADER_SIZE <= 1.02 * entropy_bits(n, int(mask.sum())) / 8 + 64


def test_range_coding_never_exceeds_the_decoder_bound_at_half_density():
    n = 400_000
    mask = random_mask((n,), 0.5, 9)
    length = struct.unpack_from("<III", codec.encode_mask([mask], [np.ones(n, dtype=bool)], round=1), HEADER_SIZE)[2]
    assert length <= (n + 7) // 8 + 64


def test_range_coded_bytes_are_stable():
    """The wire format does not drift: a fixed mask codes to the same bytes on every platform
    (a deliberate change of the coded bytes comes with a new format VERSION and a new value here)."""
    n = 10_007
    mask = (np.arange(n, dtype=np.int64) * 2654435761 % 1009) < 37
    body = codec.encode_mask([mask], [np.ones(n, dtype=bool)], round=1)
    assert codec.VERSION == 3 and (len(body), zlib.crc32(body)) == (332, 3470410830)


# --------------------------------------------------------------------------- mutations


@dataclass
class Case:
    name: str
    body: bytes
    decode: Callable[[bytes], codec.Body]
    expected: list[np.ndarray]
    valid: Callable[[list[np.ndarray]], bool]


def _shape_ok(tensors: list[np.ndarray], shapes_: list[tuple[int, ...]], dtype) -> bool:
    return len(tensors) == len(shapes_) and all(t.shape == s and t.dtype == dtype for t, s in zip(tensors, shapes_))


def _dense_case(name: str, kind: Kind, tensors: list[np.ndarray], dtype: str) -> Case:
    shapes_ = [t.shape for t in tensors]
    body = codec.encode_dense(kind, tensors, round=2, dtype=dtype)
    decode = lambda b: codec.decode_dense(b, kind, shapes_, round=2)  # noqa: E731
    valid = lambda ts: _shape_ok(ts, shapes_, np.float32) and all(np.isfinite(t).all() for t in ts)  # noqa: E731
    return Case(name, body, decode, decode(body).tensors, valid)


def _values_case(dtype: str) -> Case:
    rng = np.random.default_rng(4)
    tensors = [rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(6,)).astype(np.float32)]
    supports = [rng.random(t.shape) < 0.5 for t in tensors]
    body = codec.encode_values(tensors, supports, round=3, base_version=1, dtype=dtype)
    decode = lambda b: codec.decode_values(b, supports, round=3, base_version=1)  # noqa: E731

    def valid(ts):
        return _shape_ok(ts, [s.shape for s in supports], np.float32) and all(
            np.isfinite(t).all() and not t[~s].any() for t, s in zip(ts, supports)
        )

    return Case(f"values-{dtype}", body, decode, decode(body).tensors, valid)


def _mask_case(coder: str, structured: bool) -> Case:
    make = filter_mask if structured else random_mask
    bases = [make((12, 3), 0.7, 1), make((40,), 0.8, 2), make((5,), 1.0, 3), make((0, 3), 0.5, 4)]
    masks = [b & make(b.shape, 0.5, 10 + i) for i, b in enumerate(bases)]
    body = codec.encode_mask(masks, bases, round=6, base_version=5, coder=coder, structured=structured)
    decode = lambda b: codec.decode_mask(b, bases, round=6, base_version=5, structured=structured)  # noqa: E731

    def valid(ts):
        ok = _shape_ok(ts, [b.shape for b in bases], np.bool_) and all(not (t & ~b).any() for t, b in zip(ts, bases))
        return ok and (not structured or all(keeps_whole_filters(t) for t in ts))

    return Case(f"mask-{coder}-{'structured' if structured else 'flat'}", body, decode, masks, valid)


def _sparse_case(coder: str, dtype: str) -> Case:
    rng = np.random.default_rng(5)
    tensors = [np.where(rng.random(s) < 0.2, rng.normal(size=s), 0).astype(np.float32) for s in [(50,), (3, 7)]]
    limits = [12, 21]
    body = codec.encode_sparse(tensors, round=4, coder=coder, dtype=dtype)
    decode = lambda b: codec.decode_sparse(b, [(50,), (3, 7)], max_ones=limits, round=4)  # noqa: E731

    def valid(ts):
        return _shape_ok(ts, [(50,), (3, 7)], np.float32) and all(
            np.isfinite(t).all() and np.count_nonzero(t) <= m for t, m in zip(ts, limits)
        )

    return Case(f"sparse-{coder}-{dtype}", body, decode, decode(body).tensors, valid)


def _init_case(source: str) -> Case:
    """An initial-weights reference, its digest and seed seen as two small tensors."""
    rng = np.random.default_rng(7)
    body = codec.encode_init([rng.normal(size=(4, 3)).astype(np.float32)], source=source, seed=2**32 - 1, round=1)

    def decode(b: bytes) -> codec.Body:
        ref = codec.decode_init(b, round=1)
        fields = np.array([ref.seed, codec.INIT_SOURCES[ref.source]], dtype=np.int64)
        return codec.Body(Kind.INIT, ref.round, 0, 0, [np.frombuffer(ref.digest, dtype=np.uint8), fields])

    def valid(ts):
        return ts[0].shape == (32,) and ts[1][0] < 2**32 and ts[1][1] in codec.INIT_SOURCES.values()

    return Case(f"init-{source}", body, decode, decode(body).tensors, valid)


def _cases() -> list[Case]:
    rng = np.random.default_rng(6)
    w = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32), np.zeros((0,), np.float32)]
    return [
        _dense_case("weights-float32", Kind.WEIGHTS, w, "float32"),
        _dense_case("scores-float16", Kind.SCORES, w, "float16"),
        _dense_case("weights-int8", Kind.WEIGHTS, w, "int8"),
        _dense_case("weights-empty", Kind.WEIGHTS, [], "float32"),
        _values_case("float32"),
        _values_case("int8"),
        _mask_case("range", False),
        _mask_case("packbits", False),
        _mask_case("range", True),
        _mask_case("packbits", True),
        _sparse_case("range", "float32"),
        _sparse_case("packbits", "int8"),
        _sparse_case("range", "float16"),
        _init_case("seed"),
        _init_case("file"),
    ]


CASES = _cases()
PATTERNS = (0x01, 0x80, 0xFF, 0x5A)


def outcome(case: Case, body: bytes) -> list[np.ndarray] | None:
    """The decoded tensors, or None when the body is rejected; any other exception fails the test."""
    try:
        return case.decode(body).tensors
    except PayloadError:
        return None


def variants(body: bytes):
    """Every single-byte change (XOR patterns), truncation, insertion, deletion and some extensions."""
    for pos in range(len(body)):
        for pattern in PATTERNS:
            changed = bytearray(body)
            changed[pos] ^= pattern
            yield bytes(changed)
        yield body[:pos]
        yield body[:pos] + b"\x00" + body[pos:]
        yield body[:pos] + body[pos + 1 :]
    for tail in (b"\x00", b"\xff" * 4, bytes(range(13)), body):
        yield body + tail


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_corruption_is_rejected_or_harmless(case):
    assert same(case.decode(case.body).tensors, case.expected)
    for body in variants(case.body):
        got = outcome(case, body)
        assert got is None or same(got, case.expected)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_resealed_corruptions_never_crash_or_break_invariants(case):
    """With the checksum recomputed, the inner checks alone must keep every result well-formed."""
    payload = case.body[HEADER_SIZE:]
    bodies = [reseal(b) for b in variants(case.body) if len(b) >= HEADER_SIZE]
    bodies += [reframe(case.body, payload[:cut]) for cut in range(len(payload))]
    bodies += [reframe(case.body, payload + tail) for tail in (b"\x00", b"\x00" * 4, b"\xff" * 8)]
    for body in bodies:
        got = outcome(case, body)
        assert got is None or case.valid(got)


@FAST
@given(st.sampled_from(CASES), st.binary(max_size=300))
def test_random_payloads_behind_a_valid_header(case, payload):
    got = outcome(case, reframe(case.body, payload))
    assert got is None or case.valid(got)


@FAST
@given(nested_masks(), st.sampled_from(sorted(codec.MASK_CODERS)), st.data())
def test_random_single_byte_changes_of_random_masks(pair, coder, data):
    masks, bases = pair
    body = codec.encode_mask(masks, bases, round=1, coder=coder)
    pos = data.draw(st.integers(0, len(body) - 1))
    changed = bytearray(body)
    changed[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(PayloadError):
        codec.decode_mask(bytes(changed), bases, round=1)
    try:
        got = codec.decode_mask(reseal(changed), bases).tensors
    except PayloadError:
        return
    assert all(t.shape == b.shape and not (t & ~b).any() for t, b in zip(got, bases))


# --------------------------------------------------------------------------- targeted rejections


@pytest.fixture
def weights_body() -> bytes:
    return codec.encode_dense(Kind.WEIGHTS, [np.arange(6, dtype=np.float32).reshape(2, 3)], round=3, base_version=1)


def decode_weights(body: bytes, **kw) -> codec.Body:
    return codec.decode_dense(body, Kind.WEIGHTS, kw.pop("shapes", [(2, 3)]), **kw)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"magic": b"MPFM"}, "bad magic"),
        ({"version": 1}, "format version 1"),
        ({"version": 99}, "format version 99"),
        ({"kind": int(Kind.SCORES)}, "expected a WEIGHTS body, got SCORES"),
        ({"kind": 77}, "got 77"),
        ({"round": 4}, "round 4, expected round 3"),
        ({"base": 9}, "mask version 9"),
        ({"count": 2}, "holds 2 tensors, expected 1"),
        ({"encoding": 9}, "unknown value dtype code 9"),
        ({"flags": 1}, "flags"),
    ],
)
def test_header_mismatches(weights_body, fields, message):
    with pytest.raises(PayloadError, match=message):
        decode_weights(reframe(weights_body, **fields), round=3, base_version=1)


def test_length_field_must_match(weights_body):
    with pytest.raises(PayloadError, match="payload length field says 5 bytes"):
        decode_weights(reseal(weights_body[:24] + struct.pack("<I", 5) + weights_body[28:]))


def test_checksum_and_framing(weights_body):
    with pytest.raises(PayloadError, match="checksum"):
        decode_weights(weights_body[:-1] + bytes([weights_body[-1] ^ 1]))
    length = len(weights_body) - HEADER_SIZE
    with pytest.raises(PayloadError, match=f"says {length} bytes but {length - 1} arrived \\(truncated or extended"):
        decode_weights(weights_body[:-1])
    with pytest.raises(PayloadError, match=f"says {length} bytes but {length + 1} arrived \\(truncated or extended"):
        decode_weights(weights_body + b"\x00")
    with pytest.raises(PayloadError, match="shorter than"):
        decode_weights(weights_body[:10])
    with pytest.raises(PayloadError, match="^3 unexpected trailing bytes"):
        decode_weights(reframe(weights_body, weights_body[HEADER_SIZE:] + bytes(3)))
    with pytest.raises(PayloadError, match="payload ends inside") as short:
        decode_weights(reframe(weights_body, weights_body[HEADER_SIZE:-2]))
    needed, left = map(int, re.search(r"\((\d+) bytes needed, (\d+) left\)", str(short.value)).groups())
    assert needed - left == 2
    assert decode_weights(weights_body, round=None, base_version=None).round == 3


def test_count_and_shape_mismatches(weights_body):
    with pytest.raises(PayloadError, match="holds 6 values, expected 8"):
        decode_weights(weights_body, shapes=[(2, 4)])
    with pytest.raises(PayloadError, match="holds 1 tensors, expected 2"):
        decode_weights(weights_body, shapes=[(2, 3), (1,)])
    base = [np.ones(10, dtype=bool)]
    mask = codec.encode_mask([np.arange(10) < 3], base, round=1)
    with pytest.raises(PayloadError, match="coded over 10 positions but the previous support has 9"):
        codec.decode_mask(mask, [np.arange(10) < 9])
    with pytest.raises(PayloadError, match="expected a VALUES body, got WEIGHTS"):
        codec.decode_values(weights_body, [np.ones((2, 3), dtype=bool)])
    values = codec.encode_values([np.ones(4, np.float32)], [np.array([1, 1, 0, 1], bool)], round=1)
    with pytest.raises(PayloadError, match="holds 3 values, expected 2"):
        codec.decode_values(values, [np.array([1, 1, 0, 0], bool)])
    sparse = codec.encode_sparse([np.ones(4, np.float32)], round=1)
    with pytest.raises(PayloadError, match="has 4 positions, expected 5"):
        codec.decode_sparse(sparse, [(5,)])


def test_base_version_and_structure_must_match():
    base = [filter_mask((4, 3), 1.0, 0)]
    body = codec.encode_mask([filter_mask((4, 3), 0.5, 1)], base, round=2, base_version=1, structured=True)
    with pytest.raises(PayloadError, match="mask version 1, but the receiver holds version 2"):
        codec.decode_mask(body, base, base_version=2, structured=True)
    with pytest.raises(PayloadError, match="flags"):
        codec.decode_mask(body, base, base_version=1, structured=False)
    flat = codec.encode_mask([filter_mask((4, 3), 0.5, 1)], base, round=2)
    with pytest.raises(PayloadError, match="flags"):
        codec.decode_mask(flat, base, structured=True)
    with pytest.raises(PayloadError, match="unknown mask coder code 7"):
        codec.decode_mask(reframe(flat, encoding=7), base)
    sparse = codec.encode_sparse([np.ones(3, np.float32)], round=1)
    with pytest.raises(PayloadError, match="unknown mask coder code 3"):
        codec.decode_sparse(reframe(sparse, encoding=0x30), [(3,)])
    with pytest.raises(PayloadError, match="unknown value dtype code 5"):
        codec.decode_sparse(reframe(sparse, encoding=0x05), [(3,)])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", sorted(codec.VALUE_DTYPES))
def test_non_finite_values_are_refused_at_encode(bad, dtype):
    x = np.array([1.0, bad, 2.0], dtype=np.float32)
    with pytest.raises(PayloadError, match="NaN or Inf"):
        codec.encode_dense(Kind.WEIGHTS, [x], round=1, dtype=dtype)
    with pytest.raises(PayloadError, match="NaN or Inf"):
        codec.encode_values([x], [np.ones(3, bool)], round=1, dtype=dtype)
    with pytest.raises(PayloadError, match="NaN or Inf"):
        codec.encode_sparse([x], round=1, dtype=dtype)
    assert codec.encode_values([x], [np.array([True, False, True])], round=1, dtype=dtype)


def test_float64_beyond_float32_is_refused():
    with pytest.raises(PayloadError, match="float32 range"):
        codec.encode_dense(Kind.WEIGHTS, [np.array([1e300])], round=1)


def test_float16_overflow_is_refused_with_a_clear_message():
    with pytest.raises(PayloadError, match=r"70000 overflows float16 \(largest 65504\)"):
        codec.encode_dense(Kind.WEIGHTS, [np.array([1.0, -70000.0], np.float32)], round=1, dtype="float16")
    with pytest.raises(PayloadError, match="overflows float16"):
        codec.encode_sparse([np.array([0.0, 1e6], np.float32)], round=1, dtype="float16")


def test_int8_near_the_float32_limit_is_refused():
    with pytest.raises(PayloadError, match="float32 limit"):
        codec.encode_dense(Kind.WEIGHTS, [np.array([F32_MAX, 1.0], np.float32)], round=1, dtype="int8")


def patch_values(body: bytes, offset: int, raw: bytes) -> bytes:
    payload = bytearray(body[HEADER_SIZE:])
    payload[offset : offset + len(raw)] = raw
    return reframe(body, bytes(payload))


@pytest.mark.parametrize("bits", [0x7FC00000, 0x7F800000, 0xFF800000])
def test_non_finite_values_are_rejected_at_decode(bits):
    body = codec.encode_dense(Kind.WEIGHTS, [np.ones(3, np.float32)], round=1)
    with pytest.raises(PayloadError, match="NaN, Inf"):
        codec.decode_dense(patch_values(body, 4 + 4, struct.pack("<I", bits)), Kind.WEIGHTS, [(3,)])
    half = codec.encode_dense(Kind.WEIGHTS, [np.ones(3, np.float32)], round=1, dtype="float16")
    half_bits = np.array([bits], np.uint32).view(np.float32).astype(np.float16).tobytes()
    with pytest.raises(PayloadError, match="NaN, Inf"):
        codec.decode_dense(patch_values(half, 4 + 2, half_bits), Kind.WEIGHTS, [(3,)])
    values = codec.encode_values([np.ones(3, np.float32)], [np.ones(3, bool)], round=1)
    with pytest.raises(PayloadError, match="NaN, Inf"):
        codec.decode_values(patch_values(values, 4, struct.pack("<I", bits)), [np.ones(3, bool)])
    sparse = codec.encode_sparse([np.ones(3, np.float32)], round=1)
    with pytest.raises(PayloadError, match="NaN, Inf"):
        codec.decode_sparse(patch_values(sparse, 12 + 4, struct.pack("<I", bits)), [(3,)])


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), 0.0, -1.0, -0.0])
def test_invalid_int8_scale_is_rejected(scale):
    body = codec.encode_dense(Kind.WEIGHTS, [np.array([1, -2, 3], np.float32)], round=1, dtype="int8")
    with pytest.raises(PayloadError, match="invalid int8 scale"):
        codec.decode_dense(patch_values(body, 4, struct.pack("<f", scale)), Kind.WEIGHTS, [(3,)])


def test_int8_out_of_range_is_rejected():
    body = codec.encode_dense(Kind.WEIGHTS, [np.array([1, -2, 3], np.float32)], round=1, dtype="int8")
    with pytest.raises(PayloadError, match="-128"):
        codec.decode_dense(patch_values(body, 8, b"\x80"), Kind.WEIGHTS, [(3,)])
    with pytest.raises(PayloadError, match="out-of-range"):
        codec.decode_dense(patch_values(body, 4, struct.pack("<f", 3e37)), Kind.WEIGHTS, [(3,)])


def test_int8_records_the_encoder_never_writes_are_refused():
    body = codec.encode_dense(Kind.WEIGHTS, [np.array([1, -2, 3], np.float32)], round=1, dtype="int8")
    q = struct.unpack_from("<3b", body, HEADER_SIZE + 8)
    assert q == (42, -85, 127)  # scale 3 / 127: the peak takes all 127 steps
    with pytest.raises(PayloadError, match="largest int8 value is 126, not 127"):
        codec.decode_dense(patch_values(body, 8, struct.pack("<3b", 42, -85, 126)), Kind.WEIGHTS, [(3,)])
    zeros = codec.encode_dense(Kind.WEIGHTS, [np.zeros(3, np.float32)], round=1, dtype="int8")
    assert struct.unpack_from("<f", zeros, HEADER_SIZE + 4) == (1.0,)
    with pytest.raises(PayloadError, match="holds only zeros but its int8 scale is 0.5, not 1"):
        codec.decode_dense(patch_values(zeros, 4, struct.pack("<f", 0.5)), Kind.WEIGHTS, [(3,)])
    unreachable = np.float32(1.9910402e-09)  # max|x| / 127 rounds to its neighbours, never to it
    forged = patch_values(body, 4, struct.pack("<f", unreachable))
    with pytest.raises(PayloadError, match=re.escape("int8 scale 1.9910402e-09 is not max|x| / 127 for any float32")):
        codec.decode_dense(forged, Kind.WEIGHTS, [(3,)])
    tiny = np.array([3e-45, -1e-45], np.float32)  # a subnormal scale: the peak may take fewer steps
    assert same(codec.decode_dense(codec.encode_dense(Kind.WEIGHTS, [tiny], round=1, dtype="int8"), Kind.WEIGHTS,
                                   [(2,)]).tensors, [tiny])


def test_a_strided_view_is_refused_as_not_contiguous_bytes():
    body = codec.encode_dense(Kind.WEIGHTS, [np.ones(3, np.float32)], round=1)
    with pytest.raises(PayloadError, match="a body must be contiguous bytes"):
        codec.peek(memoryview(body + body)[::2])


def test_mask_outside_the_previous_support_is_refused_at_encode():
    base = [np.array([True, True, False, True])]
    with pytest.raises(PayloadError, match="not a subset"):
        codec.encode_mask([np.array([True, False, True, False])], base, round=1)
    with pytest.raises(PayloadError, match="shape"):
        codec.encode_mask([np.ones(3, bool)], base, round=1)
    with pytest.raises(PayloadError, match="whole filters"):
        codec.encode_mask([np.array([[True, False], [False, False]])], [np.ones((2, 2), bool)], round=1, structured=True)
    with pytest.raises(PayloadError, match="2 masks but 1 base"):
        codec.encode_mask([base[0], base[0]], base, round=1)


def test_nonzero_padding_bits_are_rejected():
    base = [np.ones(12, dtype=bool)]
    mask = np.arange(12) % 3 == 0
    packed = codec.encode_mask([mask], base, round=1, coder="packbits")
    assert len(packed) == HEADER_SIZE + 12 + 2
    with pytest.raises(PayloadError, match="padding"):
        codec.decode_mask(patch_values(packed, 13, bytes([packed[-1] | 0x01])), base)
    body = codec.encode_mask([mask], base, round=1)
    stream = np.packbits(mask)
    stream[-1] |= 0x0F
    encoder = codec.constriction.stream.queue.RangeEncoder()
    encoder.encode(stream.astype(np.int32), codec._byte_model(4, 12))
    data = encoder.get_compressed().astype("<u4").tobytes()
    forged = reframe(body, struct.pack("<III", 12, 4, len(data)) + data)
    with pytest.raises(PayloadError, match="padding"):
        codec.decode_mask(forged, base)


def test_inconsistent_mask_records_are_rejected():
    base = [np.ones(20, dtype=bool)]
    body = codec.encode_mask([np.arange(20) < 5], base, round=1)
    data = body[HEADER_SIZE + 12 :]
    cases = {
        "claims 21 ones over only 20": struct.pack("<III", 20, 21, len(data)) + data,
        "constant but carries": struct.pack("<III", 20, 0, len(data)) + data,
        f"coded length of {len(data) - 1} bytes; .* a multiple of 4 bytes, at most 67":
            struct.pack("<III", 20, 5, len(data) - 1) + data[:-1],
        "coded length of 100 bytes": struct.pack("<III", 20, 5, 100) + bytes(100),
        # words the range decoder itself refuses (found by trying: constriction raises on them)
        "not a valid range-coded stream": struct.pack("<IIIIII", 20, 5, 12, 2**32 - 1, 2**32 - 1, 0),
        # decodable, with the right count of ones, but not what the encoder writes for those bits
        "not the range coder's encoding": struct.pack("<III", 20, 5, len(data) + 8) + data + bytes(8),
    }
    for message, payload in cases.items():
        with pytest.raises(PayloadError, match=message):
            codec.decode_mask(reframe(body, payload), base)
    packed = codec.encode_mask([np.arange(20) < 5], base, round=1, coder="packbits")
    bits = packed[HEADER_SIZE + 12 :]
    with pytest.raises(PayloadError, match="decodes to 5 ones but its header says 6"):
        codec.decode_mask(reframe(packed, struct.pack("<III", 20, 6, 3) + bits), base)
    with pytest.raises(PayloadError, match="carries 2 packed bytes, expected 3"):
        codec.decode_mask(reframe(packed, struct.pack("<III", 20, 5, 2) + packed[HEADER_SIZE + 12 : -1]), base)


@pytest.mark.parametrize("kind", ["mask", "sparse"])
def test_a_range_coded_bitmap_decodes_only_from_the_encoders_own_bytes(kind):
    """Every bitmap has one encoding: a stream that decodes (right count of ones and all) is accepted
    only if encoding what it decodes to gives it back, whether bits were flipped, words cut or added,
    or the stream is random."""
    rng = np.random.default_rng(0)
    base, bits = [np.ones(200, dtype=bool)], rng.random(200) < 0.3
    if kind == "mask":
        body = codec.encode_mask([bits], base, round=1)

        def encode(got):
            return codec.encode_mask(got.tensors, base, round=1)

        def decode(b):
            return codec.decode_mask(b, base, round=1)
    else:
        body = codec.encode_sparse([np.where(bits, 1.5, 0).astype(np.float32)], round=1)

        def encode(got):
            return codec.encode_sparse(got.tensors, round=1)

        def decode(b):
            return codec.decode_sparse(b, [(200,)], round=1)
    n, ones, length = struct.unpack_from("<III", body, HEADER_SIZE)
    data, rest = body[HEADER_SIZE + 12 : HEADER_SIZE + 12 + length], body[HEADER_SIZE + 12 + length :]

    def with_stream(stream: bytes) -> bytes:
        return reframe(body, struct.pack("<III", n, ones, len(stream)) + stream + rest)

    streams = [bytes(data[:i]) + bytes([data[i] ^ 1 << bit]) + bytes(data[i + 1 :]) for i in range(length)
               for bit in range(8)]
    streams += [data[:-4], data + bytes(4), data + b"\xff" * 8, bytes(4) + data]
    streams += [rng.integers(0, 256, length, dtype=np.uint8).tobytes() for _ in range(1000)]
    accepted = 0
    for stream in streams:
        try:
            got = decode(with_stream(stream))
        except PayloadError:
            continue
        accepted += 1
        assert encode(got) == with_stream(stream)
    assert decode(body) and accepted < len(streams)


def test_sparse_limits_and_zero_values():
    x = np.array([0, 1.5, 0, -2, 3], dtype=np.float32)
    body = codec.encode_sparse([x], round=1)
    assert same(codec.decode_sparse(body, [(5,)], max_ones=[3]).tensors, [x])
    with pytest.raises(PayloadError, match="3 non-zeros, more than the allowed 2"):
        codec.decode_sparse(body, [(5,)], max_ones=[2])
    payload = bytearray(body[HEADER_SIZE:])
    payload[-4:] = struct.pack("<f", 0.0)
    with pytest.raises(PayloadError, match="zero value at a coded position"):
        codec.decode_sparse(reframe(body, bytes(payload)), [(5,)])
    payload[-4:] = struct.pack("<f", -0.0)
    with pytest.raises(PayloadError, match="zero value at a coded position"):
        codec.decode_sparse(reframe(body, bytes(payload)), [(5,)])


def test_sparse_entries_that_quantize_to_zero_are_not_sent():
    x = np.array([100.0, 0.1, 0, -0.2, 1e-9], dtype=np.float32)
    body = codec.encode_sparse([x], round=1, dtype="int8", coder="packbits")
    assert struct.unpack_from("<III", body, HEADER_SIZE)[1] == 1
    assert same(codec.decode_sparse(body, [(5,)]).tensors, [np.array([100, 0, 0, 0, 0], np.float32)])
    body = codec.encode_sparse([x], round=1, dtype="float16")
    half = x.astype(np.float16).astype(np.float32)
    assert half[4] == 0 and same(codec.decode_sparse(body, [(5,)]).tensors, [half])
    assert struct.unpack_from("<III", body, HEADER_SIZE)[1] == 3


def _forgeable() -> dict[str, tuple[bytes, int, Callable[[bytes], codec.Body]]]:
    """Small valid bodies, the payload offset of a u32 count in each, and the decoder expecting 10 entries."""
    x, support = np.ones(10, np.float32), np.ones(10, bool)
    mask = codec.encode_mask([np.arange(10) < 4], [support], round=1)
    sparse = codec.encode_sparse([x], round=1)
    decode_mask = lambda b: codec.decode_mask(b, [support])  # noqa: E731
    decode_sparse = lambda b: codec.decode_sparse(b, [(10,)])  # noqa: E731
    return {
        "dense-count": (codec.encode_dense(Kind.WEIGHTS, [x], round=1), 0,
                        lambda b: codec.decode_dense(b, Kind.WEIGHTS, [(10,)])),
        "values-count": (codec.encode_values([x], [support], round=1, dtype="int8"), 0,
                         lambda b: codec.decode_values(b, [support])),
        "mask-positions": (mask, 0, decode_mask),
        "mask-ones": (mask, 4, decode_mask),
        "mask-length": (mask, 8, decode_mask),
        "sparse-size": (sparse, 0, decode_sparse),
        "sparse-ones": (sparse, 4, decode_sparse),
    }


@pytest.mark.parametrize("name", sorted(_forgeable()))
def test_huge_claims_do_not_allocate(name):
    """A body claiming 2**31 entries against a 10-entry expectation fails before allocating for them."""
    body, offset, decode = _forgeable()[name]
    forged = patch_values(body, offset, struct.pack("<I", 2**31))
    tracemalloc.start()
    with pytest.raises(PayloadError):
        decode(forged)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 1024


def test_header_length_claim_does_not_allocate(weights_body):
    forged = reseal(weights_body[:24] + struct.pack("<I", 2**31 + 5) + weights_body[28:])
    tracemalloc.start()
    with pytest.raises(PayloadError, match="payload length"):
        decode_weights(forged)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 1024


def test_encoder_argument_errors():
    x = [np.ones(3, np.float32)]
    with pytest.raises(PayloadError, match="unknown value dtype 'float8'"):
        codec.encode_dense(Kind.WEIGHTS, x, round=1, dtype="float8")
    with pytest.raises(PayloadError, match="not a dense kind"):
        codec.encode_dense(Kind.MASK, x, round=1)
    with pytest.raises(PayloadError, match="unknown mask coder 'zip'"):
        codec.encode_mask([np.ones(3, bool)], [np.ones(3, bool)], round=1, coder="zip")
    with pytest.raises(PayloadError, match="unknown mask coder 'zip'"):
        codec.encode_sparse(x, round=1, coder="zip")
    with pytest.raises(PayloadError, match="1 tensors but 2 supports"):
        codec.encode_values(x, [np.ones(3, bool)] * 2, round=1)
    with pytest.raises(PayloadError, match="support has shape"):
        codec.encode_values(x, [np.ones(4, bool)], round=1)
    with pytest.raises(PayloadError, match="32 bits"):
        codec.encode_dense(Kind.WEIGHTS, x, round=2**32)
    with pytest.raises(PayloadError, match="32 bits"):
        codec.encode_mask([], [], round=1, base_version=-1)
    for odd in (1.5, True, "1"):  # the header's fields are whole numbers: nothing is rounded or coerced
        with pytest.raises(PayloadError, match=f"round {odd!r}, .* must be integers that fit in 32 bits"):
            codec.encode_dense(Kind.WEIGHTS, x, round=odd)
    assert codec.peek(codec.encode_dense(Kind.WEIGHTS, x, round=np.int64(7))).round == 7


def test_peek_reads_the_header_only():
    body = codec.encode_mask([np.ones(3, bool)], [np.ones(3, bool)], round=7, base_version=6, num_samples=5)
    head = codec.peek(body)
    assert (head.kind, head.round, head.base_version, head.num_samples, head.tensors) == (Kind.MASK, 7, 6, 5, [])
    for bad, message in [(body[:20], "too short"), (b"XXXX" + body[4:], "bad magic"),
                         (reframe(body, version=1), "format version"), (reframe(body, kind=0), "unknown body kind 0")]:
        with pytest.raises(PayloadError, match=message):
            codec.peek(bad)


def test_init_reference_round_trip_and_digest():
    rng = np.random.default_rng(8)
    w = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)]
    ref = codec.decode_init(codec.encode_init(w, source="file", seed=5, round=3), round=3)
    assert (ref.source, ref.seed, ref.round) == ("file", 5, 3)
    assert ref.digest == codec.weights_digest([x.copy() for x in w])
    changed = [w[0], w[1] + np.float32(1e-7) * np.float32(np.abs(w[1]).max())]
    assert codec.weights_digest(changed) != ref.digest
    assert codec.weights_digest([w[0].reshape(2, 3), w[1]]) != ref.digest  # same bytes, another shape
    with pytest.raises(PayloadError, match="unknown initial-weights source"):
        codec.encode_init(w, source="cloud", seed=5, round=3)
    with pytest.raises(PayloadError, match="expected a INIT body, got WEIGHTS"):
        codec.decode_init(codec.encode_dense(Kind.WEIGHTS, w, round=3))


# --------------------------------------------------------------------------- the byte layout of the spec


def by_hand(kind: int, encoding: int, payload: bytes, *, flags: int = 0, round_: int = 1, base: int = 0,
            num_samples: int = 0, count: int = 1, version: int = 3) -> bytes:
    """A body built from the spec at the top of codec.py alone: the 28 header bytes, the CRC-32 of
    everything else, then the payload."""
    head = HEADER.pack(b"MPFL", version, kind, encoding, flags, round_, base, num_samples, count, len(payload))
    return head + struct.pack("<I", zlib.crc32(head + payload)) + payload


def test_kinds_and_value_encodings_are_the_numbers_of_the_spec():
    """Kind codes (WEIGHTS 1, VALUES 3, SCORES 4; the other kinds' tests below) and value encodings
    (float32 0, float16 1, int8 2) with their records: count, [int8: scale], values, little-endian."""
    x = np.array([1.0, -0.5, 0.25], dtype=np.float32)
    scale = np.float32(1.0) / np.float32(127)
    q = np.rint(x / scale).astype(np.int8)  # 127, -64 (half to even), 32
    records = {"float32": struct.pack("<I", 3) + x.astype("<f4").tobytes(),
               "float16": struct.pack("<I", 3) + x.astype("<f2").tobytes(),
               "int8": struct.pack("<If", 3, scale) + q.tobytes()}
    for code, dtype in enumerate(("float32", "float16", "int8")):
        for kind in (Kind.WEIGHTS, Kind.SCORES):
            assert codec.encode_dense(kind, [x], round=1, dtype=dtype) == by_hand(kind.value, code, records[dtype])
        assert codec.encode_values([x], [np.ones(3, bool)], round=4, base_version=2, num_samples=9, dtype=dtype) == \
            by_hand(3, code, records[dtype], round_=4, base=2, num_samples=9)
    assert codec.encode_values([x], [np.ones(3, bool)], round=4) == by_hand(3, 0, records["float32"], round_=4)


def test_values_named_exact_travel_as_float32_marked_in_their_count_and_arrive_bit_for_bit():
    """BatchNorm statistics in an int8 or float16 VALUES body: bit 31 of the record's count marks
    float32 values; the other tensors keep the body's dtype, and a receiver needs no hint."""
    x = np.array([1.0, -0.5, 0.25], dtype=np.float32)
    variances = np.array([3.0, 0.011, 0.0004, 1.7], dtype=np.float32)  # int8 would round the small ones to 0
    scale = np.float32(1.0) / np.float32(127)
    weights = struct.pack("<If", 3, scale) + np.rint(x / scale).astype(np.int8).tobytes()
    exact = struct.pack("<I", 4 | 1 << 31) + variances.astype("<f4").tobytes()
    supports = [np.ones(3, bool), np.ones(4, bool)]
    body = codec.encode_values([x, variances], supports, round=2, dtype="int8", exact=[1])
    assert body == by_hand(3, 2, weights + exact, round_=2, count=2)
    got = codec.decode_values(body, supports, round=2).tensors
    assert np.array_equal(got[1], variances) and not np.array_equal(got[0], x)  # x is int8-rounded
    half = codec.encode_values([x, variances], supports, round=2, dtype="float16", exact=[1])
    assert np.array_equal(codec.decode_values(half, supports).tensors[1], variances)
    # in a float32 body there is nothing to mark: the same bytes as without `exact`
    plain = codec.encode_values([x, variances], supports, round=2)
    assert codec.encode_values([x, variances], supports, round=2, exact=[1]) == plain


def test_version_2_bodies_still_read_as_they_always_did():
    """Version 3 only added float32 marks, so a version 2 body (an older export's mask.bin, an older
    node's values) decodes to what it always meant; versions before 2 are refused."""
    x = np.array([1.0, -0.5, 0.25], dtype=np.float32)
    values = by_hand(3, 0, struct.pack("<I", 3) + x.astype("<f4").tobytes(), version=2)
    assert np.array_equal(codec.decode_values(values, [np.ones(3, bool)]).tensors[0], x)
    mask = np.array([True, False, True, True, False, False, True, False, True])
    current = codec.encode_mask([mask], [np.ones(9, bool)], round=0, coder="packbits")
    older = by_hand(Kind.MASK.value, codec.MASK_CODERS["packbits"], current[HEADER_SIZE:], round_=0, version=2)
    assert np.array_equal(codec.decode_mask(older, [np.ones(9, bool)]).tensors[0], mask)
    assert codec.peek(older).kind == Kind.MASK
    with pytest.raises(PayloadError, match="format version 1 is not supported"):
        codec.decode_values(by_hand(3, 0, struct.pack("<I", 3) + x.astype("<f4").tobytes(), version=1), [np.ones(3, bool)])


def test_a_float32_mark_is_refused_where_the_spec_does_not_allow_it():
    x = np.array([1.0, -0.5, 0.25], dtype=np.float32)
    marked = struct.pack("<I", 3 | 1 << 31) + x.astype("<f4").tobytes()
    only = "marked as float32 values .bit 31., which only a VALUES body of float16 or int8 in format version 3"
    with pytest.raises(PayloadError, match=only):
        codec.decode_values(by_hand(3, 0, marked), [np.ones(3, bool)])  # a float32 VALUES body
    with pytest.raises(PayloadError, match=only):
        codec.decode_dense(by_hand(Kind.WEIGHTS.value, 2, marked), Kind.WEIGHTS, [(3,)])
    with pytest.raises(PayloadError, match=only):  # version 2 had no marks
        codec.decode_values(by_hand(3, 2, marked, version=2), [np.ones(3, bool)])
    assert np.array_equal(codec.decode_values(by_hand(3, 2, marked), [np.ones(3, bool)]).tensors[0], x)


def test_a_mask_body_is_its_support_size_ones_length_and_bits_first_bit_highest():
    """MASK (kind 2): encoding 0 = range coder, 1 = packbits; per tensor the size of the previous
    support, the ones, the coded length and the bits over that support, row-major, the first bit in
    the highest bit of the first byte, zero padded. Flags: bit 0 structured, bit 1 grown positions."""
    support = np.array([True, True, False, True, True, True, True, True, True, True])
    mask = np.array([True, False, False, True, True, False, False, False, False, True])
    bits = bytes([0b10110000, 0b10000000])  # over the 9 positions of the support: 1 0 1 1 0 0 0 0 1
    payload = struct.pack("<III", 9, 4, 2) + bits
    assert codec.encode_mask([mask], [support], round=3, base_version=2, coder="packbits") == \
        by_hand(2, 1, payload, round_=3, base=2)
    grown = codec.encode_mask([mask], [support], round=3, coder="packbits", grow=True)
    assert grown == by_hand(2, 1, payload, round_=3, flags=2)
    assert codec.peek(grown).grow and not codec.peek(by_hand(2, 1, payload, flags=1)).grow
    constant = struct.pack("<III", 9, 9, 0)  # an all-one (or all-zero) mask needs no bits
    assert codec.encode_mask([support], [support], round=3) == by_hand(2, 0, constant, round_=3)
    filters = np.zeros((3, 2), dtype=bool)
    filters[1] = True  # one bit per output filter: 0 1 0
    assert codec.encode_mask([filters], [np.ones((3, 2), bool)], round=3, coder="packbits", structured=True) == \
        by_hand(2, 1, struct.pack("<III", 3, 1, 1) + bytes([0b01000000]), round_=3, flags=1)
    decoded = codec.decode_mask(by_hand(2, 1, payload, flags=2), [support], round=1, grow=True)
    assert decoded.tensors[0].tolist() == mask.tolist()
    empty = by_hand(2, 0, b"", count=0)  # no tensors: the header alone
    assert codec.encode_mask([], [], round=1) == empty and codec.peek(empty).kind == Kind.MASK


def test_a_sparse_body_encodes_its_dtype_low_and_its_coder_high():
    """SPARSE (kind 5): the encoding byte holds the value dtype in its low four bits and the mask
    coder in its high four; per tensor its size, non-zeros, coded length, bitmap, then a values record."""
    t = np.array([0.0, 2.0, 0.0, 0.0, -1.0], dtype=np.float32)
    payload = (struct.pack("<III", 5, 2, 1) + bytes([0b01001000]) + struct.pack("<I", 2)
               + np.array([2.0, -1.0], "<f2").tobytes())
    body = codec.encode_sparse([t], round=6, dtype="float16", coder="packbits")
    assert body == by_hand(5, 1 | 1 << 4, payload, round_=6)
    assert codec.decode_sparse(body, [(5,)]).tensors[0].tolist() == t.tolist()


def test_an_init_body_names_its_source_and_carries_the_seed_and_a_digest_of_shapes_and_bytes():
    """INIT (kind 6, no tensors): encoding 0 = seeded, 1 = an --init file, 2 = a node's request; the
    payload is the seed (u32) and SHA-256 over each tensor's ndim, dims (u32) and float32 bytes."""
    w = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([0.5], dtype=np.float32)]
    digest = hashlib.sha256(struct.pack("<III", 2, 2, 3) + w[0].astype("<f4").tobytes()
                            + struct.pack("<II", 1, 1) + w[1].astype("<f4").tobytes()).digest()
    assert codec.weights_digest(w) == digest
    for code, source in enumerate(("seed", "file")):
        expected = by_hand(6, code, struct.pack("<I", 11) + digest, round_=2, count=0)
        assert codec.encode_init(w, source=source, seed=11, round=2) == expected
        assert codec.decode_init(expected, round=2).source == source
    request = codec.encode_init_request(codec.InitRef(2, "file", 11, digest))
    assert request == by_hand(6, 2, struct.pack("<I", 11) + digest, round_=2, count=0)
    assert codec.decode_init(request).source == "request"
    for seed in (0, 2**32 - 1):
        assert codec.decode_init(codec.encode_init(w, source="seed", seed=seed, round=2)).seed == seed
    for seed in (-1, 2**32):
        with pytest.raises(PayloadError, match=f"seed {seed} does not fit in 32 bits"):
            codec.encode_init(w, source="seed", seed=seed, round=2)


@pytest.mark.parametrize("body", ["MPFL", 7, None, [1, 2]])
def test_a_body_that_is_not_bytes_is_refused_with_its_type(body):
    for decode in (codec.peek, codec.decode_init, lambda b: codec.decode_dense(b, Kind.WEIGHTS, [(1,)])):
        with pytest.raises(PayloadError, match=f"a body must be bytes, got {type(body).__name__}"):
            decode(body)
