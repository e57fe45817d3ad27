"""Datasets: find, verify, download and normalise MNIST, Fashion-MNIST and CIFAR-10/100."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import tarfile
import tempfile
import threading
import urllib.request
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import platformdirs
import torch

from .config import DATASET_ALIASES
from .errors import ConfigError, DataError
from .registry import Registry, registry

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

MIRRORS: dict[str, str] = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "cifar100": "https://www.cs.toronto.edu/~kriz/",
}
"""Base URL each built-in dataset is downloaded from; override to use another mirror."""

_MD5SUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    "cifar100": {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
}

_TIMEOUT_S = 20
KEEP_LOADED = 2
"""Built-in datasets kept in memory after loading (see `_load_builtin`)."""
_LOADED: OrderedDict[tuple, Dataset] = OrderedDict()
_LOADED_LOCK = threading.Lock()  # the Flower apps may load from several threads
_SHIPPED = Path(__file__).parent / "_data"
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CIFAR_TRAIN = {"cifar10": tuple(f"data_batch_{i}" for i in range(1, 6)), "cifar100": ("train",)}
_CIFAR_TEST = {"cifar10": ("test_batch",), "cifar100": ("test",)}
_CIFAR_LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}


@dataclass(frozen=True)
class _Spec:
    """Where a built-in dataset lives under a data root, and how to normalise it."""

    folder: str
    files: tuple[str, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_SPECS: dict[str, _Spec] = {
    "mnist": _Spec("MNIST/raw", tuple(f + ".gz" for f in _IDX_FILES), 10, (0.1307,), (0.3081,)),
    "fashion-mnist": _Spec("FashionMNIST/raw", tuple(f + ".gz" for f in _IDX_FILES), 10, (0.2860,), (0.3530,)),
    "cifar10": _Spec("cifar-10-batches-py", _CIFAR_TRAIN["cifar10"] + _CIFAR_TEST["cifar10"], 10,
                     (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": _Spec("cifar-100-python", _CIFAR_TRAIN["cifar100"] + _CIFAR_TEST["cifar100"], 100,
                      (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
Loader = Callable[[Path | None], "Dataset"]
DATASETS: Registry[Loader] = registry("dataset")
"""Every loadable dataset: a loader `loader(data_dir) -> Dataset` per name (built-in ones first)."""


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A normalised image classification dataset held in memory as tensors."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        """Reject tensors of the wrong shape, dtype or label range early, with the reason."""
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            for part, value in ((f"x_{split}", x), (f"y_{split}", y)):
                if not isinstance(value, torch.Tensor):
                    raise DataError(f"dataset {self.name!r}: {part} must be a torch.Tensor, got {type(value).__name__}; "
                                    "convert numpy arrays with torch.from_numpy")
            if x.dtype != torch.float32 or x.dim() != 4:
                raise DataError(f"dataset {self.name!r}: x_{split} must be float32 [N, C, H, W], "
                                f"got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise DataError(f"dataset {self.name!r}: y_{split} must be int64 [N] with N = {len(x)}, "
                                f"got {y.dtype} {tuple(y.shape)}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise DataError(f"dataset {self.name!r}: y_{split} has labels outside 0..{self.num_classes - 1}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f"dataset {self.name!r}: train images {tuple(self.x_train.shape[1:])} and "
                            f"test images {tuple(self.x_test.shape[1:])} differ in shape")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, (C, H, W), which models are built for."""
        c, h, w = self.x_train.shape[1:]
        return (c, h, w)

    def take(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """First n samples of each split (fewer if it is smaller) as views, for quick runs; None keeps it whole."""
        for n in (n_train, n_test):
            if n is not None and n < 0:
                raise ConfigError(f"take() needs sample counts >= 0, got {n}")
        return Dataset(self.name, self.x_train[:n_train], self.y_train[:n_train],
                       self.x_test[:n_test], self.y_test[:n_test], self.num_classes)

    def to(self, device: torch.device) -> Dataset:
        """The dataset with its tensors on `device` (itself if they are there already)."""
        if self.x_train.device == device:
            return self
        return Dataset(self.name, self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                       self.y_test.to(device), self.num_classes)

    def __repr__(self) -> str:
        """A summary instead of the tensors' contents."""
        return (f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


def available_datasets() -> list[str]:
    """Names load_dataset accepts: the built-in ones, then any registered ones."""
    return list(DATASETS.names())


def register_dataset(name: str, loader: Loader) -> None:
    """Make `loader(data_dir)` loadable as `name`, so a user's own dataset works with the CLI and API."""
    if not callable(loader):
        raise ConfigError(f"register_dataset({name!r}) needs a callable loader, got {type(loader).__name__}")
    DATASETS.register(name, loader)


def data_search_path(data_dir: str | Path | None = None) -> list[Path]:
    """Data roots in lookup order: data_dir, then $MPFL_DATA, then the per-user cache dir. A data_dir
    that does not exist yet is where a download goes; one that is a file is refused."""
    roots = [Path(data_dir).expanduser()] if data_dir is not None else []
    if roots and roots[0].exists() and not roots[0].is_dir():
        raise DataError(f"data_dir {str(data_dir)!r} is a file; give the folder that holds the datasets "
                        f"(or will hold them once downloaded)")
    if os.environ.get("MPFL_DATA"):
        roots.append(Path(os.environ["MPFL_DATA"]).expanduser())
    roots.append(_cache_dir())
    return list(dict.fromkeys(roots))


def dataset_available(name: str, data_dir: str | Path | None = None) -> bool:
    """Whether a dataset loads without a download: its files are in a data root (or it is registered)."""
    return DATASETS.canonical(name) not in _SPECS or dataset_root(name, data_dir) is not None


def dataset_root(name: str, data_dir: str | Path | None = None) -> Path | None:
    """The data root a built-in dataset is read from without a download: the first that holds its files;
    None when none does, or for a registered dataset."""
    key = DATASETS.canonical(name)
    if key not in _SPECS:
        return None
    roots = data_search_path(data_dir) + ([_SHIPPED] if key == "mnist" else [])
    return next((root for root in roots if _has_files(root, key)), None)


def unpublished_files(name: str, root: Path) -> list[str]:
    """The gzip files of a built-in MNIST-family dataset under data root `root` whose md5 is not the published
    one: another dataset's files in its folder (Fashion-MNIST's under MNIST/raw reads as MNIST), or damaged
    ones. Unpacked IDX files have no published sums and are not checked."""
    key = DATASETS.canonical(name)
    if key not in _SPECS or key in _CIFAR_TRAIN:
        return []
    folder = root / _SPECS[key].folder
    return [file for file, md5 in _MD5SUMS[key].items() if (folder / file).is_file() and _md5(folder / file) != md5]


def load_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = True) -> Dataset:
    """Load a dataset by name from the first data root holding its files, downloading them if allowed."""
    loader = DATASETS.get(name)
    if isinstance(loader, partial) and loader.func is _load_builtin:
        return loader(data_dir, download=download)
    dataset = loader(Path(data_dir) if data_dir is not None else None)
    if not isinstance(dataset, Dataset):
        raise DataError(f"the loader registered for {DATASETS.canonical(name)!r} returned {type(dataset).__name__}, "
                        "not a Dataset")
    _check_registered(dataset, DATASETS.canonical(name))
    return dataset


def _check_registered(dataset: Dataset, key: str) -> None:
    """Refuse what a user's loader may get wrong and the checks of `Dataset` cannot see: an empty split
    (nothing to train or to evaluate on) or images holding NaN or Inf (training would diverge at once)."""
    for split, x in (("train", dataset.x_train), ("test", dataset.x_test)):
        if not len(x):
            raise DataError(f"the loader registered for {key!r} returned no {split} samples; a run needs both splits")
        if not torch.isfinite(x).all():
            raise DataError(f"the loader registered for {key!r} returned x_{split} holding NaN or Inf values; "
                            "fix the data or its normalisation")


def dataset_files(name: str, data_dir: str | Path | None = None) -> list[Path] | None:
    """The files a built-in dataset is read from (found, or downloaded if missing), in a fixed order;
    None for a registered dataset, whose loader reads what it likes."""
    loader = DATASETS.get(name)
    if not (isinstance(loader, partial) and loader.func is _load_builtin):
        return None
    key = loader.args[0]
    return _files_in(_locate(key, data_dir, True), key)


def _files_in(root: Path, key: str) -> list[Path]:
    """The files of a built-in dataset under a data root that holds them, in a fixed order."""
    folder = root / _SPECS[key].folder
    if key in _CIFAR_TRAIN:
        return [folder / file for file in _SPECS[key].files]
    return [_idx_path(folder, stem) for stem in _IDX_FILES]


def _load_builtin(key: str, data_dir: str | Path | None = None, *, download: bool = True) -> Dataset:
    """A built-in dataset from its original files (found, or downloaded and verified).

    The last few datasets loaded stay in memory, keyed by their files' paths, sizes and
    modification times: a study runs many cells on one dataset, and decompressing and
    normalising all of MNIST again for each would cost more than a short run's training. A
    file replaced or changed on disk is read again. The tensors are shared: treat them as
    read-only (every built-in transformation copies)."""
    root = _locate(key, data_dir, download)
    stats = [(path.resolve(), path.stat()) for path in _files_in(root, key)]
    stamp = (key, *((str(path), stat.st_size, stat.st_mtime_ns) for path, stat in stats))
    with _LOADED_LOCK:
        if stamp in _LOADED:
            _LOADED.move_to_end(stamp)
            return _LOADED[stamp]
    dataset = _read_builtin(key, root)
    with _LOADED_LOCK:
        _LOADED[stamp] = dataset
        while len(_LOADED) > KEEP_LOADED:
            _LOADED.popitem(last=False)
    return dataset


def _read_builtin(key: str, root: Path) -> Dataset:
    """A built-in dataset read and normalised from its files under `root`."""
    spec = _SPECS[key]
    if key in _CIFAR_TRAIN:
        x_train, y_train, x_test, y_test = read_cifar(root, key)
    else:
        x_train, y_train = _read_idx_pair(root / spec.folder, "train", spec.num_classes)
        x_test, y_test = _read_idx_pair(root / spec.folder, "t10k", spec.num_classes)
    return Dataset(key, _normalise(x_train, spec), torch.from_numpy(y_train),
                   _normalise(x_test, spec), torch.from_numpy(y_test), spec.num_classes)


for _key in ("mnist", "fashion-mnist", "cifar10", "cifar100"):
    DATASETS.register(_key, partial(_load_builtin, _key), aliases=DATASET_ALIASES.get(_key, ()))


def read_idx(path: str | Path, *, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip or plain), checking its magic, dimensions and payload size."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"cannot read {path}: corrupt or truncated gzip data ({exc}); "
                            "delete the file and download it again") from exc
    if len(raw) < 4:
        raise DataError(f"{path} is too short ({len(raw)} bytes) to be an IDX file; delete the file and download it "
                        "again")
    magic, ndim = int.from_bytes(raw[:4], "big"), raw[3]
    if raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path} is not an IDX file: bad magic 0x{magic:08x}; if it should be one, delete the file "
                        "and download it again")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(f"{path} has IDX magic {magic} (0x{magic:08x}), expected {expected_magic} "
                        f"(0x{expected_magic:08x}); check that this is the right file (images 2051, labels 2049)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its IDX header; delete the file and download it again")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    payload = len(raw) - header
    if payload < expected:
        raise DataError(f"{path} is truncated: dimensions {dims} need {expected} payload bytes, found {payload}; "
                        "delete the file and download it again")
    if payload > expected:
        raise DataError(f"{path} has {payload - expected} trailing bytes after the {dims} payload; "
                        "the file is corrupt, delete it and download it again")
    data = np.frombuffer(raw, dtype=dtype, count=int(np.prod(dims)), offset=header)
    return data.reshape(dims).astype(dtype.newbyteorder("="))


def read_cifar(root: Path, variant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read extracted CIFAR-10/100 python batches under root: uint8 NCHW images and int64 labels."""
    key = variant.strip().lower().replace("-", "").replace("_", "")
    if key not in _CIFAR_TRAIN:
        raise ConfigError(f"read_cifar variant must be 'cifar10' or 'cifar100', got {variant!r}")
    folder = Path(root) / _SPECS[key].folder
    splits = []
    for names in (_CIFAR_TRAIN[key], _CIFAR_TEST[key]):
        batches = [_read_cifar_batch(folder / n, _CIFAR_LABEL_KEY[key], _SPECS[key].num_classes) for n in names]
        splits += [np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])]
    return splits[0], splits[1], splits[2], splits[3]


def _cache_dir() -> Path:
    """The per-user cache directory, the last place searched and downloaded into."""
    return Path(platformdirs.user_cache_dir("mpfl"))


def _idx_path(folder: Path, stem: str) -> Path | None:
    """The gzip or the plain copy of an IDX file, whichever exists."""
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            return path
    return None


def _has_files(root: Path, key: str) -> bool:
    """Whether root holds every file the dataset needs."""
    spec = _SPECS[key]
    folder = root / spec.folder
    if key in _CIFAR_TRAIN:
        return all((folder / f).is_file() for f in spec.files)
    return all(_idx_path(folder, stem) for stem in _IDX_FILES)


def _locate(key: str, data_dir: str | Path | None, download: bool) -> Path:
    """First root holding the dataset's files, else the root it was downloaded into."""
    roots = data_search_path(data_dir) + ([_SHIPPED] if key == "mnist" else [])
    for root in roots:
        if _has_files(root, key):
            return root
    reason = "downloading is turned off"
    if download:
        try:
            return _download_dataset(key, data_search_path(data_dir))
        except OSError as exc:
            reason = f"the download failed ({exc})"
    spec = _SPECS[key]
    urls = ", ".join(MIRRORS[key] + name for name in _MD5SUMS[key])
    where = (f"and extract it in {roots[0]}" if key in _CIFAR_TRAIN else f"into {roots[0] / spec.folder}")
    raise DataError(
        f"dataset {key!r} not found: no directory holds all of {spec.folder}/{{{', '.join(spec.files)}}} "
        f"(searched: {', '.join(str(r) for r in roots)}), and {reason}. Fetch {urls} {where}, or point "
        f"--data-dir or MPFL_DATA at a directory that holds {spec.folder}/.")


def _download_dataset(key: str, roots: list[Path]) -> Path:
    """Download a dataset's files into the first writable root, verifying each md5; return that
    root. A download that fails removes the folders it made (left empty) and nothing else."""
    made = [folder for r in roots for folder in _missing_folders(r / _SPECS[key].folder)]
    try:
        root = next((r for r in roots if _writable(r)), None)
        if root is None:
            raise PermissionError(f"no writable directory among {', '.join(map(str, roots))}")
        for name, md5 in _MD5SUMS[key].items():
            if key in _CIFAR_TRAIN:
                _fetch(MIRRORS[key] + name, root / name, md5)
                _extract(root / name, root)
            else:
                _fetch(MIRRORS[key] + name, root / _SPECS[key].folder / name, md5)
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):  # rmdir removes only empty folders
                folder.rmdir()
        raise
    return root


def _missing_folders(path: Path) -> list[Path]:
    """`path` and its parents that do not exist yet, deepest first."""
    return [folder for folder in (path, *path.parents) if not folder.exists()]


def _writable(root: Path) -> bool:
    """Create root if needed and tell whether files can be written into it."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(root, os.W_OK)


def _md5(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, md5: str) -> None:
    """Download url to dest through a temp file that is renamed only when its md5 matches."""
    if dest.is_file() and _md5(dest) == md5:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        got = _md5(Path(tmp))
        if got != md5:
            raise DataError(f"checksum mismatch for {url}: md5 {got}, expected {md5}; the download is "
                            f"corrupt or the mirror changed; try again or put a good copy at {dest}")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _extract(archive: Path, root: Path) -> None:
    """Unpack a verified CIFAR tar.gz into root, refusing entries that would land outside it."""
    base = root.resolve()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                target = (base / member.name).resolve()
                if not (member.isfile() or member.isdir()) or not target.is_relative_to(base):
                    raise DataError(f"{archive} holds an unsafe entry {member.name!r}; delete it and download again")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(base, filter="data")
            else:
                tar.extractall(base)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot extract {archive}: {exc}; delete it and download again") from exc


def _read_idx_pair(folder: Path, prefix: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one split's 28x28 images and labels and check that they agree."""
    images_path = _idx_path(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _idx_path(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, expected_magic=2051)
    labels = read_idx(labels_path, expected_magic=2049)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28; it is from "
                        "another dataset: use the original file")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                        "the counts must match, so one of the files is from another dataset or corrupt")
    if len(labels) and labels.max() >= num_classes:
        raise DataError(f"{labels_path} has label {labels.max()}, expected labels 0..{num_classes - 1}; it is from "
                        "another dataset or corrupt: use the original file")
    return images[:, None], labels.astype(np.int64)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What pickle protocols 0 to 2 call (as `_codecs.encode`) to rebuild a Python 3 bytes object;
    only the latin-1 encoding they write is accepted."""
    if type(encoding) is not str or encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing to call _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _array_from_buffer(buffer: bytes | bytearray, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    """What pickle protocol 5 calls (as numpy's `_frombuffer`) to rebuild an array: of plain numbers only. A
    pickled dtype's state is the file's to set (flags that hide Python objects, a sub-array shape that makes
    each item read past the buffer), so the dtype is rebuilt from its type code alone."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or dtype.subdtype is not None or dtype.names:
        raise pickle.UnpicklingError(f"refusing to rebuild an array of dtype {dtype!r}")
    return np.frombuffer(buffer, dtype=np.dtype(dtype.str)).reshape(shape, order=order)


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays and bytes, so a hostile file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,
        ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,
    }

    def find_class(self, module: str, name: str) -> object:
        """Resolve only the names that pickles of numpy arrays and bytes use."""
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch, checking its structure: images [n, 3, 32, 32] and labels."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # a malformed pickle can raise almost any exception type
        raise DataError(f"cannot read CIFAR batch {path}: {exc}; replace it with the original file") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR batch: it holds a {type(batch).__name__}, not a dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path} is not a CIFAR batch: 'data' must be a uint8 array of shape [n, 3072]")
    raw = np.asarray(labels) if isinstance(labels, (list, tuple, np.ndarray)) else np.asarray([None])
    if raw.size and raw.dtype.kind not in "iu":  # a cast would turn 0.5 into class 0 and "3" into an error later
        raise DataError(f"{path} is not a CIFAR batch: {label_key!r} must be a list of ints")
    labels = raw.astype(np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{path} is not a CIFAR batch: {len(data)} images but {label_key!r} has shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path} has labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _normalise(images: np.ndarray, spec: _Spec) -> torch.Tensor:
    """uint8 NCHW images to contiguous float32 (x/255 - mean)/std per channel, via a lookup table
    (indexed directly: np.take would first widen the uint8 indices to int64, ten times slower)."""
    levels = np.arange(256, dtype=np.float64) / 255
    out = np.empty(images.shape, dtype=np.float32)
    for c, (mean, std) in enumerate(zip(spec.mean, spec.std)):
        out[:, c] = ((levels - mean) / std).astype(np.float32)[images[:, c]]
    return torch.from_numpy(out)
