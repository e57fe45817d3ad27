"""Writing files safely: a reader sees either the old or the new content, never half of it,
and named groups of arrays share one `.npz` layout (``<group>/<key>`` entries, no pickles)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

Groups = dict[str, dict[str, np.ndarray]]


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file through a temporary sibling that is synced, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def numbered(tensors: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """A list of arrays as a group keyed "0", "1", ..."""
    return {str(i): t for i, t in enumerate(tensors)}


def in_order(group: Mapping[str, np.ndarray], count: int) -> list[np.ndarray]:
    """The first `count` arrays of a `numbered` group, in order (KeyError if one is missing)."""
    return [np.array(group[str(i)]) for i in range(count)]


def write_groups(path: Path, groups: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Write groups of named arrays to one `.npz` file, atomically; the group "" holds top-level entries."""
    arrays = {f"{group}/{key}" if group else key: value for group, entries in groups.items()
              for key, value in entries.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, buffer.getvalue())


def read_groups(path: Path) -> Groups:
    """The groups of a file written by `write_groups` (group names may hold "/", keys may not)."""
    groups: Groups = {}
    with np.load(path, allow_pickle=False) as f:
        for name in f.files:
            group, _, key = name.rpartition("/")
            groups.setdefault(group, {})[key] = f[name]
    return groups
