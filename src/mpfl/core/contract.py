"""What a plug-in hook returns, held to its contract before the engine uses it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import MethodError


def checked_arrays(out: object, shapes: Sequence[tuple[int, ...]], kinds: str, contract: str) -> list[np.ndarray]:
    """`out` as numpy arrays once it is a list (or tuple) of one array per shape of `shapes`, each of
    that shape and of a dtype kind in `kinds` ("b" booleans, "f" floats); otherwise a MethodError that
    states the `contract` and what broke it, so that a broken plug-in stops with one line."""
    if not isinstance(out, (list, tuple)) or len(out) != len(shapes):
        got = f"holds {len(out)} items" if isinstance(out, (list, tuple)) else f"is {_a(type(out).__name__)}"
        raise MethodError(f"{contract}; it {got}")
    arrays = [np.asarray(a) for a in out]
    for i, (array, shape) in enumerate(zip(arrays, shapes)):
        if array.shape != tuple(shape):
            raise MethodError(f"{contract}; item {i} is {_a(str(array.dtype))} array of shape {array.shape}, the "
                              f"tensor's shape is {tuple(shape)}")
        if array.dtype.kind not in kinds:
            wanted = " or ".join(_KINDS[kind] for kind in kinds)
            raise MethodError(f"{contract}; item {i} is {_a(str(array.dtype))} array, not {wanted}")
    return arrays


_KINDS = {"b": "booleans", "f": "floats"}


def _a(word: str) -> str:
    """`word` with its indefinite article."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"
