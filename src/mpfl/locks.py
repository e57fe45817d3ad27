"""One process per run directory: a lock file that names its holder.

A run holds an exclusive `fcntl.flock` on ``<run>/.lock``, which also holds its process id, for as
long as it writes there. A second `mpfl run` or `mpfl run --resume` on the same folder is refused at
once, naming the holder. The kernel drops the lock when its process dies, however it dies, so the
file that a SIGKILLed run leaves behind is recognised as stale and taken over. On platforms without
`fcntl` the lock file is created exclusively instead, and a stale one has to be removed by hand.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from .errors import RunDirError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK = ".lock"
_held: set[Path] = set()
"""The run directories this process holds (resolved): its own lock does not make them busy to it."""
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _read_pid(fd: int) -> int | None:
    """The process id written in an open lock file, if it holds one."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


HOLDERS = {"run": ("run directory", "an mpfl run writing there"), "study": ("study folder", "an mpfl study running there")}
"""What a lock's folder is called and what holds it, by the kind of command that takes the lock."""


def _in_use(folder: Path, pid: int | None, kind: str = "run") -> RunDirError:
    """The error for a folder another process holds."""
    holder = f"process {pid}" if pid is not None else "another process"
    called, doing = HOLDERS[kind]
    return RunDirError(f"{called} {str(folder)!r} is in use by {holder} ({doing}); wait for it to finish or stop it, "
                       "then try again")


def refuse_if_locked(folder: Path) -> None:
    """Raise RunDirError, naming the holder, when a process holds `folder`'s run lock right now (a stale
    lock file left by a killed run does not count)."""
    path = Path(folder) / LOCK
    if Path(folder).resolve() in _held:
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        if fcntl is None:  # pragma: no cover - Windows
            raise _in_use(folder, _read_pid(fd))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(folder, _read_pid(fd)) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RunLock:
    """The exclusive lock on one run directory (or, with `kind` "study", a study's folder), held from
    `acquire` to `release` (or as a `with` block). `stale` is the process id of a killed holder whose
    lock file was taken over, if any."""

    def __init__(self, folder: str | Path, kind: str = "run") -> None:
        self.folder, self.kind = Path(folder), kind
        self.path = self.folder / LOCK
        self.fd: int | None = None
        self.stale: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunDirError naming the process that holds it."""
        if fcntl is None:  # pragma: no cover - Windows
            self._acquire_exclusive()
            return
        while True:
            try:
                fd = os.open(self.path, _OPEN_FLAGS, 0o666)
            except OSError as exc:
                raise RunDirError(f"cannot lock run directory {str(self.folder)!r}: {self.path.name} cannot be "
                                  f"opened ({exc.strerror}); remove it if it is not a regular file") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise _in_use(self.folder, pid, self.kind) from None
            if self._still_there(fd):
                break
            os.close(fd)  # the previous holder removed the file while we waited for it: lock the new one
        self.stale = _read_pid(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        _held.add(self.folder.resolve())

    def _still_there(self, fd: int) -> bool:
        """Whether the file we locked is still the one at the lock's path."""
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _acquire_exclusive(self) -> None:  # pragma: no cover - Windows
        """Without fcntl: create the lock file exclusively; an existing one means a holder."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            raise RunDirError(f"run directory {str(self.folder)!r} is locked by {self.path}; if no mpfl run is "
                              "writing there any more, delete that file and try again") from None
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        _held.add(self.folder.resolve())

    def release(self) -> None:
        """Remove the lock file and let go of the lock (removed first, so a waiting process that opened the
        old file notices and locks a fresh one)."""
        if self.fd is None:
            return
        _held.discard(self.folder.resolve())
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
