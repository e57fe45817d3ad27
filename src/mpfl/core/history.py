"""The consensus mask of every version of a run, held as one bit per entry.

The server keeps every mask a run has had: a node that missed rounds is sent the current mask
coded over the version it still holds, and the run's results include the whole history. A long
run has hundreds of versions (one per mask round and per adaptation round), so as boolean arrays
they would dominate its memory (4.2 GB for resnet18 over 1,000 rounds); as packed bits they take
an eighth of that. A lookup unpacks a fresh copy, except for the latest version, which is kept
as the very arrays it was added with: the server's current mask, shared with the nodes holding it.
Every mask comes out read-only (those added are made so), so that no node, plug-in criterion or
consensus rule can change a version in place: one that tries stops with numpy's "read-only" error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from .masks import Mask


def packed(mask: Sequence[np.ndarray]) -> np.ndarray:
    """A mask as one row of packed bits (`np.packbits`, big-endian within a byte), its tensors
    flattened in C order one after the other, the last byte padded with zero bits."""
    return np.packbits(np.concatenate([np.zeros(0, dtype=bool), *(np.asarray(m, dtype=bool).reshape(-1) for m in mask)]))


def _freeze(mask: Sequence[np.ndarray]) -> Mask:
    for array in mask:
        array.flags.writeable = False
    return list(mask)


class MaskHistory(Mapping[int, Mask]):
    """Masks by version, packed; the tensor shapes are fixed by the first mask added."""

    def __init__(self, masks: Mapping[int, Mask] | None = None) -> None:
        self.shapes: tuple[tuple[int, ...], ...] | None = None
        self._rows: dict[int, np.ndarray] = {}
        self._latest: tuple[int, Mask] | None = None
        for version, mask in sorted((masks or {}).items()):
            self[version] = mask

    @classmethod
    def from_rows(cls, shapes: Sequence[tuple[int, ...]], versions: Sequence[int], rows: np.ndarray) -> MaskHistory:
        """The history whose `rows` (one `packed` row per version, in the order of `versions`) a
        checkpoint stored; ValueError if their size or padding does not fit `shapes`."""
        history = cls()
        history.shapes = tuple(tuple(shape) for shape in shapes)
        total = history.total
        if rows.dtype != np.uint8 or rows.shape != (len(versions), (total + 7) // 8):
            raise ValueError(f"the mask history is {rows.dtype} {rows.shape}, not uint8 "
                             f"({len(versions)}, {(total + 7) // 8}) for {len(versions)} versions of {total} entries")
        if total % 8 and (rows[:, -1] & np.uint8(0xFF >> (total % 8))).any():
            raise ValueError("the padding bits of the mask history are not zero")
        history._rows = {int(v): row for v, row in zip(versions, rows)}
        return history

    @property
    def total(self) -> int:
        """Entries in one mask (0 before the first is added)."""
        return sum(math.prod(shape) for shape in self.shapes or ())

    def __setitem__(self, version: int, mask: Mask) -> None:
        shapes = tuple(np.shape(m) for m in mask)
        if self.shapes is None:
            self.shapes = shapes
        elif shapes != self.shapes:
            raise ValueError(f"a mask of shapes {shapes} cannot join a history of shapes {self.shapes}")
        self._rows[version] = packed(mask)
        _freeze(mask)
        if self._latest is None or version >= self._latest[0]:
            self._latest = (version, mask)

    def __getitem__(self, version: int) -> Mask:
        if self._latest is not None and self._latest[0] == version:
            return self._latest[1]
        row = self._rows[version]
        assert self.shapes is not None  # a row exists, so a first mask fixed the shapes
        flat = np.unpackbits(row, count=self.total).view(bool)
        ends = np.cumsum([math.prod(shape) for shape in self.shapes])[:-1]
        return _freeze([part.reshape(shape) for part, shape in zip(np.split(flat, ends), self.shapes)])

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._rows))

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, version: object) -> bool:
        return version in self._rows

    def rows(self) -> np.ndarray:
        """Every version's `packed` row, in version order, as one (versions, bytes) array."""
        return np.stack([self._rows[v] for v in self])

    @property
    def nbytes(self) -> int:
        """Bytes the packed rows take."""
        return sum(row.nbytes for row in self._rows.values())
