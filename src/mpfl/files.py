"""Writing files safely: a reader sees either the old or the new content, never half of it; no
write goes through a symbolic link; and named groups of arrays share one `.npz` layout
(``<group>/<key>`` entries, no pickles)."""

from __future__ import annotations

import os
import re
import secrets
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import PathError

Groups = dict[str, dict[str, np.ndarray]]
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def refuse_link(path: Path) -> None:
    """Refuse to write at `path` when it is a symbolic link: whatever it points to is not ours to replace."""
    if Path(path).is_symlink():
        raise PathError(f"{path} is a symbolic link; mpfl does not write through links: remove it or choose "
                        "another folder")


def _temp_file(path: Path) -> tuple[int, Path]:
    """A new, exclusively created temporary sibling of `path` (a fresh random name, opened with O_EXCL and
    O_NOFOLLOW), so that a file or link already there, or another writer, is never written through."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise PathError(f"cannot create a temporary file beside {path}: every name tried exists")


def atomic_write(path: Path, data: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write a file through a new temporary sibling that is synced, then renamed over `path` (the folder is
    synced too, so the rename survives a power loss). `data` is the content, or a function that writes it
    to the open file (content too large to hold twice). A symbolic link at `path` is refused."""
    path = Path(path)
    refuse_link(path)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that the files created or renamed in it are on disk (where the platform allows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files `atomic_write` left in `folder` when its process was killed mid-write;
    only call this while no other process can be writing there (e.g. holding the run's lock)."""
    stale = [p for p in Path(folder).glob(".*.tmp") if _TEMP_NAME.fullmatch(p.name) and not p.is_symlink()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def numbered(tensors: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """A list of arrays as a group keyed "0", "1", ..."""
    return {str(i): t for i, t in enumerate(tensors)}


def in_order(group: Mapping[str, np.ndarray], count: int) -> list[np.ndarray]:
    """The first `count` arrays of a `numbered` group, in order (KeyError if one is missing)."""
    return [np.array(group[str(i)]) for i in range(count)]


def write_groups(path: Path, groups: Mapping[str, Mapping[str, np.ndarray]] | Iterable[tuple[str, Mapping[str, np.ndarray]]],
                 *, compress: bool = False) -> None:
    """Write groups of named arrays to one `.npz` file, atomically; the group "" holds top-level entries.
    The file is what `np.savez` (`np.savez_compressed` with `compress`) writes, but each array goes to
    disk as it comes, so `groups` may be an iterable of (name, arrays) pairs made one at a time."""
    pairs = groups.items() if isinstance(groups, Mapping) else groups

    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
            for group, entries in pairs:
                for key, value in entries.items():
                    with archive.open(f"{group}/{key}.npy" if group else f"{key}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)

    atomic_write(path, write)


def read_groups(path: Path) -> Groups:
    """The groups of a file written by `write_groups` (group names may hold "/", keys may not)."""
    groups: Groups = {}
    with np.load(path, allow_pickle=False) as f:
        for name in f.files:
            group, _, key = name.rpartition("/")
            groups.setdefault(group, {})[key] = f[name]
    return groups
