"""Normalised datasets kept on disk and memory-mapped, for processes that start often.

Reading a dataset from its original files (gzip IDX or CIFAR batches) and normalising it takes
about 1.5 s for MNIST, which a Flower SuperNode used to pay for every message. `load_cached`
does it once per dataset: it writes the normalised arrays as ``.npy`` files under the user cache
(``<cache>/arrays/<dataset>-<checksum>/``, about 220 MB for MNIST), keyed by the SHA-256 of the
dataset's files, and later maps them into memory, so a node reads only the pages of its own
partition. The arrays are the very ones `mpfl.data.load_dataset` returns, so results do not change.
A registered dataset (a plug-in's loader) is loaded as usual, uncached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import platformdirs
import torch

from .data import DATASETS, Dataset, dataset_files, load_dataset

FORMAT = 1
"""Version of the cache layout and of the normalisation; a change makes new entries."""
SPLITS = ("x_train", "y_train", "x_test", "y_test")
META = "meta.json"


def cache_root() -> Path:
    """Where normalised datasets are kept: ``arrays`` in the user cache directory."""
    return Path(platformdirs.user_cache_dir("mpfl")) / "arrays"


def checksum(files: list[Path]) -> str:
    """SHA-256 over the contents of `files`, in order."""
    digest = hashlib.sha256(f"mpfl-arrays-{FORMAT}".encode())
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def load_cached(name: str, data_dir: str | Path | None = None, root: Path | None = None) -> Dataset:
    """Dataset `name` as `load_dataset` gives it, memory-mapped from the cache (filled on first use)."""
    files = dataset_files(name, data_dir)
    if files is None:
        return load_dataset(name, data_dir)
    key = DATASETS.canonical(name)
    folder = (root or cache_root()) / f"{key}-{checksum(files)[:32]}"
    if not (folder / META).is_file():
        _store(load_dataset(name, data_dir), folder)
    return _mapped(folder)


def _store(dataset: Dataset, folder: Path) -> None:
    """Write `dataset` into `folder` through a temporary sibling that is renamed when complete, so a
    reader never sees half an entry (a process that loses the race keeps the other's entry)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for split in SPLITS:
            np.save(tmp / f"{split}.npy", getattr(dataset, split).numpy())
        (tmp / META).write_text(json.dumps({"name": dataset.name, "num_classes": dataset.num_classes}))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / META).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mapped(folder: Path) -> Dataset:
    """The dataset stored in `folder`, its arrays mapped copy-on-write (never written back)."""
    meta = json.loads((folder / META).read_text())
    arrays = [torch.from_numpy(np.load(folder / f"{split}.npy", mmap_mode="c", allow_pickle=False))
              for split in SPLITS]
    return Dataset(meta["name"], *arrays, meta["num_classes"])
