"""TensorBoard event files of a run (``mpfl run --tensorboard``): accuracy, loss, bytes and density
per round, at the round's global step, so runs can be compared live with ``tensorboard --logdir``
pointed at the folder above their event folders: TensorBoard reads a folder as one run, so each run
needs its own (the default, RUN_DIR/tensorboard, is).

Needs the ``tensorboard`` package (``pip install "mpfl[tensorboard]"``); torch's own
``SummaryWriter`` writes the files. A resumed run writes on from its checkpoint: events at or
after the first step it records again are purged, so every step appears once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .records import CONFIG

TENSORBOARD_DIR = "tensorboard"
SCALARS = {  # record key -> TensorBoard tag
    "accuracy": "test/accuracy", "loss": "test/loss", "density": "mask/density", "hamming": "mask/hamming",
    "bytes_up": "bytes/up", "bytes_down": "bytes/down", "cum_bytes_up": "bytes/cumulative_up",
    "cum_bytes_down": "bytes/cumulative_down", "time": "time/round_seconds",
}


def summary_writer_class() -> Any:
    """torch's SummaryWriter, or a one-line error saying how to install what it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package; install it with "
                          "pip install \"mpfl[tensorboard]\" (or pip install tensorboard)") from None
    return SummaryWriter


def check_folder(path: Path, run_dir: Path | None = None) -> None:
    """Refuse, before the run starts, a --tensorboard path where no folder of event files can be: a file,
    a place this process cannot write (the writer only opens it at the first round), or a folder in
    another run's directory than `run_dir`, whose event files would mix with that run's."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--tensorboard {path} is a file; give a folder for the event files")
    owner = next((p for p in (path, *path.parents) if (p / CONFIG).is_file()), None)
    if owner is not None and (run_dir is None or owner.resolve() != Path(run_dir).resolve()):
        where = "is a run directory" if owner == path else f"is inside the run directory {owner}"
        raise ConfigError(f"--tensorboard {path} {where}; give a folder of its own (by default RUN_DIR/tensorboard)")
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--tensorboard {path}: cannot write in {ancestor}; choose another folder")


class TensorBoardLog:
    """Writes each round's figures as scalars to an event file in `log_dir`."""

    def __init__(self, log_dir: str | Path, run_dir: str | Path | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.writer_class = summary_writer_class()
        self.writer: Any = None
        check_folder(self.log_dir, None if run_dir is None else Path(run_dir))

    def __call__(self, record: dict) -> None:
        """Add one round's scalars (the first one this process writes purges later events of an earlier run)."""
        if self.writer is None:
            self.writer = self.writer_class(str(self.log_dir), purge_step=record["step"])
        for key, tag in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
