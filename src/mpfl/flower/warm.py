"""A warm node process behind the ClientApp of a Flower deployment.

Flower starts a new ClientApp process for every message a SuperNode receives, so a ClientApp
that trains imports torch and builds the run's experiment again for every message (3 s and more
on a busy machine). Instead, a deployment's ClientApp forwards each message to one long-lived
process per SuperNode, which keeps torch, the experiment and the trainer between messages
(`mpfl.flower.node_runtime`); the ClientApp itself imports only Flower and mpfl's light modules.

The warm process is a child of the first ClientApp process, in the SuperNode's process group, so
ending that group ends it. It listens on a Unix socket in a private directory of the user cache
(``<cache>/warm``, mode 0700) and answers only clients that know the key in a 0600 file beside it.
It exits once the SuperNode's executor that started the ClientApp is gone, or after ``keep-warm``
idle seconds (node config; ``keep-warm=0`` turns it off). The node's state still travels in
Flower's context with every message, so the warm process holds nothing a run needs: if it is
gone, the next message starts another, and if that fails too, the ClientApp does the work itself.

Requests and replies are Flower's own records in Flower's protobuf encoding; nothing is pickled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

import platformdirs
from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

from .. import errors
from .._version import __version__
from ..protocol import NodeFailure
from .settings import ConfigValue

CLIENTAPP_COMMAND = "flwr-clientapp"
START_TIMEOUT_S = 120.0
WATCH_S = 1.0
MAX_SOCKET_PATH = 100
Result = tuple[RecordDict | NodeFailure, dict[str, float]]


@dataclass(frozen=True)
class Paths:
    """The files of one SuperNode's warm process: its socket, key, log, lock and process id."""

    socket: Path
    key: Path
    log: Path
    lock: Path
    pid: Path


def warm_dir() -> Path:
    """The private directory of the warm processes' sockets and keys."""
    return Path(platformdirs.user_cache_dir("mpfl")) / "warm"


def paths_for(node_id: int, root: Path | None = None) -> Paths:
    """The files of the warm process of SuperNode `node_id` for this Python and this mpfl install."""
    identity = f"{node_id}|{sys.executable}|{Path(__file__).resolve().parents[1]}|{__version__}"
    return paths_at((root or warm_dir()) / hashlib.sha256(identity.encode()).hexdigest()[:16])


def paths_at(base: Path) -> Paths:
    """The files of the warm process whose files are named `base` plus a suffix."""
    return Paths(*(base.with_suffix(suffix) for suffix in (".sock", ".key", ".log", ".lock", ".pid")))


def enabled(keep_warm: float) -> bool:
    """Whether this process forwards messages to a warm process: it is a ClientApp process that
    Flower started for one message, Unix sockets exist, and the node config did not turn it off."""
    return keep_warm > 0 and Path(sys.argv[0]).name == CLIENTAPP_COMMAND and hasattr(socket, "AF_UNIX")


def prestart(context: Context, keep_warm: float, *, root: Path | None = None, parent: int | None = None) -> None:
    """Start the SuperNode's warm process unless one runs, without waiting: it loads torch and the node
    code while the ServerApp is still connecting, so that it is ready for the first round."""
    paths = usable_paths(context.node_id, root)
    if paths is None:
        return
    with _locked(paths):
        if _running(paths) is None:
            _spawn(paths, parent or os.getppid(), keep_warm)


def forward(context: Context, task: str, content: RecordDict, keep_warm: float, *, root: Path | None = None,
            parent: int | None = None) -> Result | None:
    """Have the SuperNode's warm process handle the message (starting it if needed): the reply and
    timing of `mpfl.flower.node_runtime.handle`, with ``context.state`` updated; None if no warm
    process could do it, and the caller should. Errors the node raised are raised here. A warm
    process started here lives as long as process `parent` (by default the SuperNode's executor,
    which started this ClientApp)."""
    paths = usable_paths(context.node_id, root)
    if paths is None:
        return None
    request = _request(context, task, content)
    for fresh in (False, True):
        answer = _call(paths, request, parent or os.getppid(), keep_warm, fresh=fresh)
        if answer is not None:
            return _result(answer, context.state)
    return None


def usable_paths(node_id: int, root: Path | None = None) -> Paths | None:
    """The warm process's files for SuperNode `node_id`, if they can live in a private directory."""
    paths = paths_for(node_id, root)
    return paths if len(str(paths.socket)) <= MAX_SOCKET_PATH and _private(paths.socket.parent) else None


def _private(folder: Path) -> bool:
    """Create `folder` readable by this user only; False if it exists with other owners or modes."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and info.st_mode & 0o077 == 0


def _request(context: Context, task: str, content: RecordDict) -> list[bytes]:
    """The frames of a request: what to do, the message's content and the node's state."""
    header = {"task": task, "run_config": dict(context.run_config), "node_config": dict(context.node_config)}
    return [json.dumps(header).encode(), to_bytes(content), to_bytes(context.state)]


@contextmanager
def _locked(paths: Paths) -> Iterator[None]:
    """Hold the SuperNode's lock on its warm process (starting one is not left to two processes at once)."""
    import fcntl  # Unix only, as the sockets are (`enabled`)

    with open(paths.lock, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _call(paths: Paths, request: list[bytes], parent: int, keep_warm: float, *, fresh: bool) -> list[bytes] | None:
    """Send `request` to the warm process, starting one if none runs (with `fresh`, replacing the one
    that just failed); its answer, or None."""
    try:
        with _locked(paths):
            pid = _running(paths)
            if fresh and pid is not None:
                os.kill(pid, signal.SIGTERM)
                pid = None
            if pid is None:
                pid = _spawn(paths, parent, keep_warm)
            _wait(paths, pid)
            conn = _connect(paths)
        with conn:
            for frame in request:
                conn.send_bytes(frame)
            return [conn.recv_bytes() for _ in range(3)]
    except (OSError, EOFError, TimeoutError):
        return None


def _connect(paths: Paths) -> Connection:
    """A connection to the warm process, authenticated with its key (OSError if there is none)."""
    try:
        return Client(str(paths.socket), "AF_UNIX", authkey=paths.key.read_bytes())
    except AuthenticationError as exc:
        raise ConnectionRefusedError(str(exc)) from None


_children: dict[int, subprocess.Popen] = {}


def _running(paths: Paths) -> int | None:
    """The process id of the SuperNode's warm process, if it is alive."""
    try:
        pid = int(paths.pid.read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _spawn(paths: Paths, parent: int, keep_warm: float) -> int:
    """Start a new warm process with a new key; its process id."""
    paths.socket.unlink(missing_ok=True)
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    with open(paths.log, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", __name__, str(paths.socket.with_suffix("")), str(parent),
                                 str(keep_warm)], stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)
    _children[proc.pid] = proc
    paths.pid.write_text(str(proc.pid))
    return proc.pid


def _wait(paths: Paths, pid: int) -> None:
    """Wait until warm process `pid` listens (TimeoutError if it ends or takes over `START_TIMEOUT_S`)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not paths.socket.exists():
        if not _alive(pid) or time.monotonic() > deadline:
            raise TimeoutError(f"the warm node process did not start; see {paths.log}")
        time.sleep(0.05)


def _result(answer: list[bytes], state: RecordDict) -> Result:
    """The reply and timing in the warm process's answer; its node state replaces ``state``."""
    header = json.loads(answer[0])
    if header["error"] is not None:
        kind, text = header["error"]
        raise getattr(errors, kind, RuntimeError)(text)
    for key in list(state):
        del state[key]
    state.update(from_bytes(answer[2]))
    reply = NodeFailure(header["failure"]) if header["failure"] is not None else from_bytes(answer[1])
    return reply, header["timing"]


def to_bytes(records: RecordDict) -> bytes:
    """Records in Flower's protobuf encoding."""
    return recorddict_to_proto(records).SerializeToString()


def from_bytes(data: bytes) -> RecordDict:
    """Records from Flower's protobuf encoding."""
    return recorddict_from_proto(RecordDictProto.FromString(data))


# ---------------------------------------------------------------------- the warm process


Handler = Callable[[Mapping[str, ConfigValue], Mapping[str, ConfigValue], RecordDict, str, RecordDict], tuple]


def answer(frames: list[bytes], handle: Handler) -> list[bytes]:
    """The warm process's answer to one request: the reply, the node's new state and the timing, or the
    error the node raised (by its mpfl error class when it has one)."""
    header = json.loads(frames[0])
    state = from_bytes(frames[2])
    try:
        reply, timing = handle(header["run_config"], header["node_config"], state, header["task"], from_bytes(frames[1]))
    except Exception as exc:  # the ClientApp raises it again, as if it had run the node itself
        kind = type(exc).__name__ if isinstance(exc, errors.MpflError) else "RuntimeError"
        return [json.dumps({"error": [kind, f"{type(exc).__name__}: {exc}"]}).encode(), b"", b""]
    failure = reply.reason if isinstance(reply, NodeFailure) else None
    content = b"" if failure is not None else to_bytes(reply)
    return [json.dumps({"error": None, "failure": failure, "timing": timing}).encode(), content, to_bytes(state)]


class Watch:
    """Ends the warm process once its parent is gone, after `idle` seconds without a request, or on SIGTERM."""

    def __init__(self, paths: Paths, parent: int, idle: float) -> None:
        self.paths, self.parent, self.idle = paths, parent, idle
        self.inode = paths.socket.stat().st_ino
        self.busy, self.last = False, time.monotonic()

    def run(self) -> None:
        """Check every `WATCH_S` seconds, then leave."""
        while _alive(self.parent) and (self.busy or time.monotonic() - self.last < self.idle):
            time.sleep(WATCH_S)
        self.leave()

    def leave(self, *_: object) -> None:
        """Remove this process's files (unless a successor replaced them; an empty log too) and exit."""
        try:
            if self.paths.socket.stat().st_ino == self.inode:
                for path in (self.paths.socket, self.paths.key, self.paths.pid, self.paths.lock):
                    path.unlink(missing_ok=True)
                if self.paths.log.stat().st_size == 0:
                    self.paths.log.unlink()
        except OSError:
            pass
        os._exit(0)


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a child of this process that ended does not, though not yet reaped)."""
    if pid in _children:
        return _children[pid].poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(paths: Paths, parent: int, idle: float) -> None:
    """Answer requests one at a time until the `Watch` ends the process."""
    listener = Listener(str(paths.socket), "AF_UNIX", authkey=paths.key.read_bytes())
    from .node_runtime import handle  # torch and the node code, loaded once for every later message

    # the idle clock starts once the process can answer: a slow import must not count as idle time
    watch = Watch(paths, parent, idle)
    signal.signal(signal.SIGTERM, watch.leave)
    threading.Thread(target=watch.run, daemon=True).start()

    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, AuthenticationError):
            continue
        watch.busy = True
        try:
            with conn:
                frames = [conn.recv_bytes() for _ in range(3)]
                for frame in answer(frames, handle):
                    conn.send_bytes(frame)
        except (OSError, EOFError):
            pass
        finally:
            watch.busy, watch.last = False, time.monotonic()


def main() -> None:
    """``python -m mpfl.flower.warm BASE PARENT IDLE``, as `forward` starts it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="the warm process's files, without their suffix")
    parser.add_argument("parent", type=int, help="end when this process has ended")
    parser.add_argument("idle", type=float, help="end after this many seconds without a request")
    args = parser.parse_args()
    serve(paths_at(args.base), args.parent, args.idle)


if __name__ == "__main__":
    main()
