"""Where a run computes: the `train.device` setting resolved to a torch device, checked before any work.

Nodes train and the server evaluates on that device, with the data moved there once; weights
and masks cross to and from the host as numpy arrays at the edges of each task, so every
message carries the same bytes on every device. On CPU nothing moves, so results are those of a
run without the setting, bit for bit. On CUDA, torch's deterministic algorithms are switched on
(warning, not failing, for an operation that has none), so a GPU run repeats itself where torch
allows; its numbers differ from a CPU run's in the last bits of floating-point sums.
"""

from __future__ import annotations

import os

import torch

from .config import Config, check_device_name
from .errors import ConfigError

CUBLAS_WORKSPACE = ":4096:8"
"""The cuBLAS workspace setting deterministic CUDA matrix products need (set before CUDA starts)."""


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | None) -> torch.device:
    """The torch device for a `train.device` value (None: cpu); a device this machine lacks is a
    ConfigError that says which devices it has."""
    name = name or "cpu"
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device = {name!r}, but torch finds no CUDA GPU on this machine (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); run with "
                              "--device cpu, or --device auto to use a GPU only where there is one")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device = {name!r}, but this machine has {count} CUDA GPU(s): cuda:0 to "
                              f"cuda:{count - 1}")
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"device = {name!r}, but torch finds no Apple MPS backend on this machine; run with "
                          "--device cpu or --device auto")
    return device


def use_device(cfg: Config) -> torch.device:
    """Resolve the run's device and prepare torch for it (deterministic algorithms on CUDA)."""
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def describe(device: torch.device) -> str:
    """A device as a run's summary and first line name it: ``cpu``, or ``cuda:0 (NVIDIA H200)``."""
    if device.type != "cuda":
        return str(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
