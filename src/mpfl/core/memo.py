"""Results of functions of large arrays that a round computes many times over, remembered safely.

In a round with a hundred nodes the same consensus mask is the support of every message and
every local training: each encode, decode and training call would otherwise redo the same
`flatnonzero` or mask conversion on it. A hit needs the very same array object with unchanged
contents, checked against a private copy (a tenth of the cost of `flatnonzero`), so an array
changed in place is recomputed, never served stale.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

Result = TypeVar("Result")

MIN_SIZE = 4096
"""Smaller arrays are cheaper to recompute than to check."""


class ArrayMemo(Generic[Result]):
    """`compute(array)` for the last `size` large arrays seen, keyed by identity and verified by content."""

    def __init__(self, compute: Callable[[np.ndarray], Result], size: int = 16) -> None:
        self.compute, self.size = compute, size
        self._entries: OrderedDict[int, tuple[np.ndarray, np.ndarray, Result]] = OrderedDict()
        self._lock = threading.Lock()  # Flower runs apps in threads; the bookkeeping must not interleave

    def __call__(self, array: np.ndarray) -> Result:
        if array.size < MIN_SIZE:
            return self.compute(array)
        key = id(array)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] is array and np.array_equal(entry[1], array):
                self._entries.move_to_end(key)
                return entry[2]
        result = self.compute(array)
        with self._lock:
            self._entries[key] = (array, array.copy(), result)  # holding `array` keeps its id from being reused
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return result


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # shared by every caller: none may change it
    return array


positions: ArrayMemo[np.ndarray] = ArrayMemo(lambda support: _read_only(np.flatnonzero(support)))
"""``np.flatnonzero(support)`` (C order, read-only), remembered for the supports a round reuses."""

complement: ArrayMemo[np.ndarray] = ArrayMemo(lambda mask: _read_only(~mask))
"""``~mask`` (read-only), remembered, so that the pruned positions of the mask every node of a
round holds are one array whose positions are computed once (regrow votes are coded over them)."""
