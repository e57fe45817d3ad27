"""Shared fixtures (reference datasets, an isolated data lookup environment) and the number of test processes."""

from __future__ import annotations

import importlib.util
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

MAX_TEST_PROCESSES = 4
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
"""The devices a test that must hold on each of them runs on: cpu, and cuda where there is a GPU."""


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (the default, pyproject.toml): one test process per core, at most four, since each
    holds torch and a dataset (about 0.5 GB) and the deployment tests start Flower processes of their own."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_TEST_PROCESSES, cores))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start the slow tests (deployments, subprocess kills, worker processes) first, in their usual
    order, so that the test processes end together rather than one running a slow test last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config: pytest.Config) -> None:
    """Deliver Ctrl-C to the tests that send it: a shell that starts pytest in the background
    (``pytest &``) makes it ignore SIGINT, and every process it starts would inherit that."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def restore_registries():
    """Undo every registration a test makes (datasets, models, rules, methods, ...) and forget the
    plug-ins it imported, so tests stay independent."""
    import mpfl.data
    import mpfl.models
    import mpfl.node  # noqa: F401
    from mpfl import plugins
    from mpfl.registry import ALL

    saved = [(reg, reg.snapshot()) for reg in ALL]
    copies = [(kept, type(kept)(kept)) for kept in (plugins._loaded, plugins._digests, plugins._installed, plugins._files)]
    yield
    for reg, snapshot in saved:
        reg.restore(snapshot)
    for kept, copy in copies:
        kept.clear()
        kept.update(copy)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The reference MNIST / Fashion-MNIST copies in `shared/data`, beside the repository."""
    path = Path(__file__).parents[1].parent / "shared" / "data"
    if not (path / "MNIST" / "raw").is_dir():
        pytest.skip(f"reference datasets not found at {path}")
    return path


@pytest.fixture
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Unset MPFL_DATA and point the per-user cache at an empty temp dir, so no user files leak in."""
    import mpfl.data

    cache = tmp_path / "user-cache"
    monkeypatch.delenv("MPFL_DATA", raising=False)
    monkeypatch.setattr(mpfl.data, "_cache_dir", lambda: cache)
    return cache


@pytest.fixture(scope="session")
def mnist():
    """Full MNIST (the copy shipped with the package), loaded once per test session."""
    from mpfl.data import load_dataset

    return load_dataset("mnist")


def bits(arrays) -> list[bytes]:
    """Each array's raw bytes, to compare results bit for bit (NaN and -0.0 included)."""
    return [np.ascontiguousarray(a).view(np.uint8).tobytes() for a in arrays]


RECORD_KEYS = ("step", "nodes", "dropped", "accuracy", "loss", "bytes_up", "bytes_down", "density", "hamming")
"""What two runs' round records must share to be the same run (times and paths aside)."""


def assert_same_run(run, reference) -> None:
    """Two RunResults are the same run: records, final weights and every round's mask, bit for bit."""
    assert [{k: r.get(k) for k in RECORD_KEYS} for r in run.records] == \
        [{k: r.get(k) for k in RECORD_KEYS} for r in reference.records]
    assert bits(run.weights) == bits(reference.weights)
    assert sorted(run.masks) == sorted(reference.masks)
    assert all(bits(run.masks[step]) == bits(reference.masks[step]) for step in reference.masks)


def write_cifar(root: Path, variant: str, n: int = 4, seed: int = 0, legacy: bool = False) -> dict:
    """Write tiny CIFAR python batches of n images each; return {batch name: (data, labels)}."""
    folder, names, key, classes = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10),
        "cifar100": ("cifar-100-python", ["train", "test"], b"fine_labels", 100),
    }[variant]
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in names:
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, n).tolist()
        blob = pickle.dumps({b"batch_label": name.encode(), b"data": images, key: labels}, protocol=3)
        if legacy:
            blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (root / folder / name).write_bytes(blob)
        batches[name] = (images, labels)
    return batches


def tiny_config(**overrides):
    """A run small enough for a unit test: a few nodes on a slice of MNIST, one local epoch."""
    from mpfl.config import Config

    base = {"nodes": 3, "rounds": 2, "train_samples": 1500, "test_samples": 300, "mask_rounds": 2, "batch_size": 32,
            "threads": 1}
    base.update(overrides)
    return Config().with_overrides(base)


CLI_RUN = ["--nodes", "3", "--rounds", "6", "--mask-rounds", "3", "--train-samples", "3000", "--test-samples", "300",
           "--threads", "1", "--workers", "1", "--rewind", "none", "--method", "mpfl", "--quiet"]
"""An `mpfl run` long enough to stop and resume mid-run, in one process: a test about worker processes
adds ``--workers 2`` (each worker imports torch, which would otherwise take most of these tests' time)."""


def round_record(step: int, phase: str = "train", *, nodes=(0, 1), dropped=None, **fields) -> dict:
    """A round record with every key a record always has (mpfl.protocol.RoundRecord), as a log holds it."""
    return {"step": step, "phase": phase, "round": step, "method": "mpfl", "seed": 0, "accuracy": None, "loss": None,
            "target_density": 0.5, "density": 0.5, "bytes_up": 10, "bytes_down": 20, "cum_bytes_up": 10 * step,
            "cum_bytes_down": 20 * step, "nodes": list(nodes), "dropped": dropped or {}, **fields}


@pytest.fixture
def drawn(monkeypatch):
    """The figures plots draw (their PNGs still written), so that their axes can be read."""
    import matplotlib.figure

    figures, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or save(fig, *a, **k))
    return figures


def shown_tick_labels(axis) -> dict[float, str]:
    """The major tick labels a matplotlib axis shows (those within its limits), by position."""
    lo, hi = sorted(axis.get_view_interval())
    return {float(x): t.get_text() for x, t in zip(axis.get_majorticklocs(), axis.get_majorticklabels()) if lo <= x <= hi}


def comparable(records: list[dict]) -> list[dict]:
    """Round records without their timings: what a resumed run must repeat exactly."""
    return [{k: v for k, v in r.items() if k not in ("time", "elapsed")} for r in records]


def wait_for_rounds(out: Path, count: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until the run writing into `out` has recorded `count` rounds (or its process ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "rounds.jsonl").exists() and (out / "rounds.jsonl").read_text().count("\n") >= count:
            return
        time.sleep(0.02)


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def benchmark_module(name: str):
    """The script benchmarks/<name>.py as a module (importing its `_common` as the script does)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def rewrite_arrays(path: Path, change) -> None:
    """Rewrite the `.npz` file at `path` with its arrays (a dict, by member name) changed in place by
    `change(arrays)`: a hand edit of a checkpoint."""
    with np.load(path) as f:
        arrays = {name: f[name] for name in f.files}
    change(arrays)
    np.savez(path, **arrays)
