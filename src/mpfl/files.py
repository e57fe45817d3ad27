"""Writing files safely: a reader sees either the old or the new content, never half of it; no
write goes through a symbolic link; and named groups of arrays share one `.npz` layout
(``<group>/<key>`` entries, no pickles); `StoredArrays` reads such a file that nothing in it is trusted."""

from __future__ import annotations

import math
import os
import re
import secrets
import stat
import zipfile
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
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


class StoredArrays:
    """A `.npz` file that `write_groups` wrote uncompressed, read with nothing in it trusted (a checkpoint that
    may have been edited): only a regular file is opened, since a FIFO in its place would block the reader
    forever; only named members are read; a member must be stored as written, not compressed (a deflated
    member of 3.4 MB can unpack to a gigabyte); and its `.npy` header is checked before any memory is taken
    for it: an array of at most `limit` bytes, and never more than the file holds (a header can claim 4 TiB)."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        self._file = os.fdopen(fd, "rb")
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("it is not a regular file")
            self.size = info.st_size
            self._zip = zipfile.ZipFile(self._file)
        except BaseException:
            self._file.close()
            raise
        self.names = {name.removesuffix(".npy") for name in self._zip.namelist()}
        """The members' names, as `write_groups` names them (``<group>/<key>``, or a top-level key)."""

    def __enter__(self) -> StoredArrays:
        return self

    def __exit__(self, *exc: object) -> None:
        self._zip.close()
        self._file.close()

    def read(self, name: str, limit: int | None = None) -> np.ndarray:
        """The array `name`, once its header shows it holds at most `limit` bytes (ValueError otherwise)."""
        info = self._zip.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"its member {name} is compressed; these files are written uncompressed")
        with self._zip.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"its member {name} is a .npy file of version {version}, not 1.0 or 2.0")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(member)
        size, bound = math.prod(shape) * dtype.itemsize, self.size if limit is None else min(limit, self.size)
        if size > bound:
            raise ValueError(f"its member {name} claims an array of {size:,} bytes ({dtype}, shape {shape}), more "
                             f"than the {bound:,} it may hold")
        with self._zip.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)

    def read_groups(self, names: Collection[str], limit: int) -> Groups:
        """The members of `names` the file holds (each at most `limit` bytes), as groups (see `read_groups`)."""
        groups: Groups = {}
        for name in sorted(self.names & set(names)):
            group, _, key = name.rpartition("/")
            groups.setdefault(group, {})[key] = self.read(name, limit)
        return groups
