"""What `mpfl run` shows while it runs: one line per round, with an estimate of the time left.

Progress goes to stderr and the final summary to stdout, so ``mpfl run > summary.txt`` keeps
the summary and a log file of stderr keeps the rounds. On a terminal the lines scroll above a
live bar; without one (pipes, nohup, CI) each round is one plain line, or one JSON object
with ``--log-format json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from statistics import fmean
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .protocol import Step, dropped_text

LOG_FORMATS = ("auto", "text", "json")


def format_seconds(seconds: float | None) -> str:
    """A duration as ``42 s``, ``3 min 05 s`` or ``1 h 02 min``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Eta:
    """Seconds left in a run, from the mean duration of this process's rounds of each phase (mask
    rounds cost more than training rounds); a phase not yet seen counts at the overall mean."""

    def __init__(self, plan: Sequence[Step]) -> None:
        self.plan = list(plan)
        self.times: dict[str, list[float]] = {}

    def add(self, record: dict) -> float | None:
        """Note a finished round; return the estimated seconds left after it (None before any timing)."""
        if record.get("time") is not None:
            self.times.setdefault(record["phase"], []).append(record["time"])
        seen = [t for ts in self.times.values() for t in ts]
        if not seen:
            return None
        overall = fmean(seen)
        left = [s for s in self.plan if s.step > record["step"]]
        return sum(fmean(self.times[s.phase]) if s.phase in self.times else overall for s in left)


def round_text(record: dict, total: int, eta: float | None) -> str:
    """One round as a line, its columns aligned whether or not the round was evaluated: position,
    phase, accuracy, loss, density, the run's traffic so far (up + down), the round's time and ETA."""
    acc = "acc    -  " if record.get("accuracy") is None else f"acc {100 * record['accuracy']:5.2f}%"
    loss = f"loss {record['loss']:.4f}" if record.get("loss") is not None else f"{'loss    -':<11}"
    mb = (record["cum_bytes_up"] + record["cum_bytes_down"]) / 1e6
    text = (f"round {record['step']:>3}/{total} {record['phase']:>6} {record['round']:>3}  {acc}  {loss}  "
            f"density {record['density']:.3f}  {mb:8.2f} MB so far  {record.get('time') or 0:5.1f} s  "
            f"eta {format_seconds(eta)}")
    if record.get("dropped"):
        text += "  dropped " + dropped_text(record["dropped"])
    return text


def plain_console(*, stderr: bool = True) -> Console:
    """A console for mpfl's own lines: no emoji codes (a path or message may hold ":x:") and no wrapping
    of its own (a long path stays one line to copy). Text that is not markup must still go through
    `rich.markup.escape`, or a "[/]" in a path would be read as a closing tag."""
    return Console(stderr=stderr, soft_wrap=True, emoji=False)


class RoundLog:
    """Shows each finished round on stderr: lines above a live bar on a terminal (``auto``), plain
    lines (``text``, or ``auto`` without a terminal) or JSON objects (``json``); nothing if quiet."""

    def __init__(self, plan: Sequence[Step], done: int = 0, *, log_format: str = "auto", quiet: bool = False,
                 console: Console | None = None, stream: TextIO | None = None) -> None:
        self.total, self.eta = len(plan), Eta(plan)
        self.console = console or plain_console()
        self.stream = stream or sys.stderr
        self.mode = "off" if quiet else log_format
        if self.mode == "auto":
            self.mode = "bar" if self.console.is_terminal else "text"
        self.progress: Progress | None = None
        if self.mode == "bar":
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("eta {task.fields[eta]}"))
            self.progress = Progress(*columns, console=self.console, transient=True)
            self.task = self.progress.add_task("rounds", total=self.total, completed=done, eta="?")

    def __enter__(self) -> RoundLog:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, record: dict) -> None:
        """Show one finished round."""
        eta = self.eta.add(record)
        if self.mode == "json":
            print(json.dumps({"event": "round", **record, "total_steps": self.total, "eta_s": eta}), file=self.stream,
                  flush=True)
        elif self.mode == "text":
            print(round_text(record, self.total, eta), file=self.stream, flush=True)
        elif self.progress is not None:
            self.progress.console.print(round_text(record, self.total, eta), highlight=False, markup=False)
            self.progress.update(self.task, completed=record["step"], eta=format_seconds(eta))
