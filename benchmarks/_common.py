"""Shared plumbing for the benchmark scripts: the --quick / --json flags and table output."""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a reduced configuration that finishes in minutes")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the table rows as a JSON list")
    return p


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "–" if value is None else str(value)


def emit(title: str, rows: Sequence[dict], json_path: Path | None, columns: Sequence[str] | None = None) -> None:
    """Print rows as a table and, if asked, write them as JSON keyed like the columns."""
    columns = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in columns))
    Console(width=200).print(table)
    if json_path is not None:
        json_path.write_text(json.dumps([{c: r.get(c) for c in columns} for r in rows], indent=2) + "\n")


def stop_on_sigterm() -> None:
    """Turn SIGTERM (a `kill`, a timeout) into SystemExit, so that `finally` blocks and context managers
    still end the processes and remove the folders a benchmark started."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def require(module: str, extra: str, what: str, otherwise: str = "") -> None:
    """Exit at once, saying what to install (or `otherwise` what to do), when `what` needs an optional
    extra that is not installed."""
    if importlib.util.find_spec(module) is None:
        hint = f"; {otherwise}" if otherwise else ""
        sys.exit(f"{what} needs the {extra!r} extra ({module} is not installed): pip install -e \".[{extra}]\"{hint}")
