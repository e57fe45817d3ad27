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


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes, described by the first paragraph of
    the benchmark's docstring `doc` (which may run over several lines)."""
    p = argparse.ArgumentParser(description=" ".join(doc.strip().split("\n\n")[0].split()))
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
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    for i, c in enumerate(columns):  # a narrow column shows its whole name, folded, and every value whole
        table.add_column(c, justify="right", overflow="fold", min_width=max((len(row[i]) for row in cells), default=1))
    for row in cells:
        table.add_row(*row)
    Console(width=200).print(table, crop=False)
    if json_path is not None:
        json_path.write_text(json.dumps([{c: r.get(c) for c in columns} for r in rows], indent=2) + "\n")


def stop_on_sigterm() -> None:
    """Turn SIGTERM (a `kill`, a timeout) into SystemExit, so that `finally` blocks and context managers
    still end the processes and remove the folders a benchmark started."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def missing_extra(module: str, extra: str, what: str) -> str | None:
    """What to install for `what`, which needs `module` of the optional `extra`; None when it is installed."""
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{what} needs the {extra!r} extra ({module} is not installed): pip install -e \".[{extra}]\""


def require(module: str, extra: str, what: str, otherwise: str = "") -> None:
    """Exit at once, saying what to install (or `otherwise` what to do), when `what` needs an optional
    extra that is not installed."""
    if (missing := missing_extra(module, extra, what)) is not None:
        sys.exit(missing + (f"; {otherwise}" if otherwise else ""))


def round_epochs(cfg, phase: str) -> int:
    """Local epochs a node trains in a round of `phase`: `prune.mask_epochs` in a mask round, else `train.epochs`."""
    return cfg.prune.mask_epochs if phase == "mask" else cfg.train.epochs


def bare_round(model, exp, step: int, nodes: Sequence[int], weights: Sequence, phase: str = "train") -> float:
    """Seconds for the textbook torch loop over the simulator's batches of `nodes` at `step`, each
    node starting from `weights`: the reference the simulator's overhead is measured against. A mask
    round's nodes train `prune.mask_epochs` epochs, a training round's `train.epochs`, as in the run."""
    import time

    import torch
    from torch import nn

    from mpfl.core.params import set_weights
    from mpfl.core.training import generator

    cfg, loss_fn = exp.cfg, nn.CrossEntropyLoss()
    epochs = round_epochs(cfg, phase)
    started = time.perf_counter()
    for node in nodes:
        data = exp.node_data(node)
        set_weights(model, exp.spec, weights)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
        model.train()
        gen = generator(cfg.seed, step, node)
        for _ in range(epochs):
            order = data.train[torch.randperm(data.num_samples, generator=gen)]
            for start in range(0, len(order), cfg.train.batch_size):
                idx = order[start : start + cfg.train.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(data.x.index_select(0, idx)), data.y.index_select(0, idx))
                loss.backward()
                opt.step()
    return time.perf_counter() - started
