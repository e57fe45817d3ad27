"""Ctrl-C without half-written records: SIGINT (and SIGTERM) is held back while a round is being recorded."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Delay SIGINT and SIGTERM until the block ends, so an interrupt lands between rounds and leaves the
    round logs and the checkpoint consistent (only the main thread can handle signals; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in HELD}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


HELD = (signal.SIGINT, signal.SIGTERM)
"""The signals that stop a run: Ctrl-C, and `kill`, `docker stop` or a batch system's pre-emption."""


@contextmanager
def signal_handled(signum: int, handler: Callable | int) -> Iterator[None]:
    """`handler` for signal `signum` within the block, the earlier one after it (only the main thread
    may change a handler; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def sigterm_as_interrupt() -> AbstractContextManager[None]:
    """Within the block, SIGTERM stops the command as Ctrl-C does (a KeyboardInterrupt: between rounds,
    with the line saying how to resume) instead of ending the process where it stands."""
    return signal_handled(signal.SIGTERM, signal.default_int_handler)
