"""Dataset reading, lookup, download and normalisation, checked against independent computations."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_cifar
from mpfl import data
from mpfl.data import Dataset, available_datasets, data_search_path, load_dataset, read_cifar, read_idx, register_dataset
from mpfl.errors import ConfigError, DataError
from mpfl.registry import UnknownNameError

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# From shared/data/SHA256SUMS.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
# Published MNIST test-set class counts.
MNIST_T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR10_MEAN, CIFAR10_STD = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
CIFAR100_MEAN, CIFAR100_STD = np.array([0.5071, 0.4865, 0.4409]), np.array([0.2673, 0.2564, 0.2762])


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Encode a uint8 array as IDX: magic 0x08/ndim, big-endian dims, raw bytes."""
    magic = 0x0800 | array.ndim if magic is None else magic
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def write_fake_mnist(root: Path, n: int, folder: str = "MNIST/raw", seed: int = 0) -> dict[str, np.ndarray]:
    """Write the four gzip IDX files with n random 28x28 images per split; return the arrays written."""
    rng = np.random.default_rng(seed)
    raw = root / folder
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split in ("train", "t10k"):
        arrays[f"{split}-images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels"] = rng.integers(0, 10, n, dtype=np.uint8)
    for name in IDX_NAMES:
        (raw / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(arrays[name.rsplit("-", 2)[0]])))
    return arrays


def file_hash(path: Path, algorithm: str) -> str:
    """Hex digest of a whole file."""
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """Full MNIST loaded with nothing configured, so it comes from the copy shipped in the package."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MPFL_DATA", raising=False)
        mp.setattr(data, "_cache_dir", lambda: tmp_path_factory.mktemp("empty-cache"))
        return load_dataset("mnist", download=False)


# IDX reading

def test_read_idx_on_real_mnist_t10k(shared_data_dir: Path) -> None:
    raw = shared_data_dir / "MNIST" / "raw"
    images = read_idx(raw / "t10k-images-idx3-ubyte.gz", expected_magic=2051)
    labels = read_idx(raw / "t10k-labels-idx1-ubyte.gz", expected_magic=2049)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 10000 and counts.tolist() == MNIST_T10K_COUNTS


def test_read_idx_plain_equals_gzip(shared_data_dir: Path, tmp_path: Path) -> None:
    gz = shared_data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    plain = tmp_path / "labels"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    np.testing.assert_array_equal(read_idx(plain), read_idx(gz))
    expected = np.frombuffer(plain.read_bytes()[8:], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(plain), expected)


def test_read_idx_wider_dtype_is_native(tmp_path: Path) -> None:
    values = np.array([[1, -2, 70000], [3, 4, -5]], dtype=">i4")
    path = tmp_path / "ints.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + values.tobytes())
    result = read_idx(path)
    assert result.dtype == np.int32 and result.dtype.isnative
    assert result.tolist() == [[1, -2, 70000], [3, 4, -5]]


IMAGES = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
GOOD = idx_bytes(IMAGES)
CORRUPTIONS = {
    "wrong magic": (gzip.compress(idx_bytes(IMAGES, magic=2049)), "expected 2051"),
    "not idx": (b"\x12\x34" + GOOD[2:], "not an IDX file"),
    "truncated payload": (gzip.compress(GOOD[:-10]), "truncated"),
    "trailing bytes": (gzip.compress(GOOD + b"\0\0\0"), "3 trailing bytes"),
    "truncated header": (GOOD[:9], "truncated inside its IDX header"),
    "truncated gzip": (gzip.compress(GOOD)[:200], "corrupt or truncated gzip"),
    "garbage gzip": (b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4, "corrupt or truncated gzip"),
    "empty": (b"", "too short"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_read_idx_rejects_corrupt_files(tmp_path: Path, case: str) -> None:
    blob, phrase = CORRUPTIONS[case]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(blob)
    with pytest.raises(DataError, match=phrase) as info:
        read_idx(path, expected_magic=2051)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read .*no-such-file"):
        read_idx(tmp_path / "no-such-file")


def test_mismatched_image_and_label_counts(tmp_path: Path, data_env: Path) -> None:
    write_fake_mnist(tmp_path, 5, folder="FashionMNIST/raw")
    labels = tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(4, dtype=np.uint8))))
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load_dataset("fashion-mnist", tmp_path, download=False)


def test_label_out_of_range(tmp_path: Path, data_env: Path) -> None:
    write_fake_mnist(tmp_path, 5, folder="FashionMNIST/raw")
    labels = tmp_path / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.array([0, 1, 12, 3, 4], dtype=np.uint8))))
    with pytest.raises(DataError, match="label 12"):
        load_dataset("fashion-mnist", tmp_path, download=False)


def test_wrong_image_size(tmp_path: Path, data_env: Path) -> None:
    write_fake_mnist(tmp_path, 5, folder="FashionMNIST/raw")
    images = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 32, 32), dtype=np.uint8))))
    with pytest.raises(DataError, match="32x32 images, expected 28x28"):
        load_dataset("fashion-mnist", tmp_path, download=False)


# Lookup

def test_search_path_order(tmp_path: Path, data_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPFL_DATA", str(tmp_path / "env"))
    assert data_search_path(tmp_path / "arg") == [tmp_path / "arg", tmp_path / "env", data_env]
    monkeypatch.delenv("MPFL_DATA")
    assert data_search_path() == [data_env]


def test_lookup_order_data_dir_then_env_then_cache(tmp_path: Path, data_env: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    arg, env = tmp_path / "arg", tmp_path / "env"
    write_fake_mnist(arg, 3, seed=1)
    write_fake_mnist(env, 5, seed=2)
    cached = write_fake_mnist(data_env, 7, seed=3)
    monkeypatch.setenv("MPFL_DATA", str(env))
    assert len(load_dataset("mnist", arg, download=False).y_train) == 3
    assert len(load_dataset("mnist", None, download=False).y_train) == 5
    monkeypatch.delenv("MPFL_DATA")
    from_cache = load_dataset("mnist", download=False)
    assert len(from_cache.y_train) == 7
    np.testing.assert_array_equal(from_cache.y_test.numpy(), cached["t10k-labels"])


def test_incomplete_root_is_skipped(tmp_path: Path, data_env: Path) -> None:
    write_fake_mnist(tmp_path, 3)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    write_fake_mnist(data_env, 7)
    assert len(load_dataset("mnist", tmp_path, download=False).y_train) == 7


def test_uncompressed_idx_files_are_found(tmp_path: Path, data_env: Path) -> None:
    written = write_fake_mnist(tmp_path, 6, folder="FashionMNIST/raw")
    for gz in (tmp_path / "FashionMNIST" / "raw").glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    loaded = load_dataset("fashion-mnist", tmp_path, download=False)
    np.testing.assert_array_equal(loaded.y_train.numpy(), written["train-labels"])


def test_a_loaded_dataset_is_reused_until_its_files_change(tmp_path: Path, data_env: Path) -> None:
    """A second load of unchanged files is the first dataset itself (no reading, decompressing or
    normalising again); a file rewritten on disk is read again, and an older dataset leaves memory
    once more than `KEEP_LOADED` others were loaded after it."""
    write_fake_mnist(tmp_path, 5, seed=1)
    first = load_dataset("mnist", tmp_path, download=False)
    assert load_dataset("mnist", tmp_path, download=False) is first
    written = write_fake_mnist(tmp_path, 4, seed=2)
    changed = load_dataset("mnist", tmp_path, download=False)
    assert changed is not first
    np.testing.assert_array_equal(changed.y_train.numpy(), written["train-labels"])
    for i in range(data.KEEP_LOADED):
        write_fake_mnist(tmp_path / str(i), 3)
        load_dataset("mnist", tmp_path / str(i), download=False)
    assert load_dataset("mnist", tmp_path, download=False) is not changed


def test_shipped_mnist_matches_reference_checksums() -> None:
    shipped = Path(data.__file__).parent / "_data" / "MNIST" / "raw"
    assert {p.name: file_hash(p, "sha256") for p in shipped.glob("*.gz")} == MNIST_SHA256


def test_shipped_mnist_is_used_when_nothing_is_configured(mnist: Dataset, shared_data_dir: Path) -> None:
    assert (len(mnist.y_train), len(mnist.y_test), mnist.input_shape, mnist.num_classes) == (60000, 10000,
                                                                                               (1, 28, 28), 10)
    raw = shared_data_dir / "MNIST" / "raw"
    labels = np.frombuffer(gzip.decompress((raw / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:], dtype=np.uint8)
    pixels = np.frombuffer(gzip.decompress((raw / "t10k-images-idx3-ubyte.gz").read_bytes())[16:], dtype=np.uint8)
    np.testing.assert_array_equal(mnist.y_test.numpy(), labels)
    expected = (pixels[: 500 * 784].reshape(500, 1, 28, 28) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(mnist.x_test[:500].numpy(), expected, atol=1e-6)


def test_normalised_mnist_statistics(mnist: Dataset) -> None:
    x = mnist.x_train
    assert x.dtype == torch.float32 and x.is_contiguous() and x.shape == (60000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    assert mnist.y_train.dtype == torch.int64
    assert np.bincount(mnist.y_train.numpy()).sum() == 60000


def test_missing_files_without_download(tmp_path: Path, data_env: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", tmp_path, download=False)
    message = str(info.value)
    for name in IDX_NAMES:
        assert f"{name}.gz" in message
    assert str(tmp_path) in message and str(data_env) in message
    assert "MPFL_DATA" in message and "--data-dir" in message and "turned off" in message


def test_failed_download_reports_missing_files(tmp_path: Path, data_env: Path, monkeypatch) -> None:
    monkeypatch.setitem(data.MIRRORS, "cifar10", (tmp_path / "no-such-mirror").as_uri() + "/")
    with pytest.raises(DataError, match="download failed") as info:
        load_dataset("cifar10", tmp_path / "data")
    assert "cifar-10-batches-py/{data_batch_1" in str(info.value)
    assert "\n" not in str(info.value)  # one line: the CLI prints it as one


def test_a_failed_download_removes_the_folders_it_made_and_keeps_the_users_files(tmp_path, data_env, monkeypatch):
    monkeypatch.setitem(data.MIRRORS, "fashion-mnist", (tmp_path / "no-such-mirror").as_uri() + "/")
    with pytest.raises(DataError, match="download failed"):
        load_dataset("fashion-mnist", tmp_path / "new" / "data")
    assert not (tmp_path / "new").exists() and not data_env.exists()
    (tmp_path / "mine" / "FashionMNIST").mkdir(parents=True)
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="download failed"):
        load_dataset("fashion-mnist", tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").rglob("*")) == ["FashionMNIST", "notes.txt"]


# Downloads, from file:// URLs

def test_download_verifies_and_saves(shared_data_dir: Path, tmp_path: Path, data_env: Path, monkeypatch) -> None:
    mirror = shared_data_dir / "FashionMNIST" / "raw"
    monkeypatch.setitem(data.MIRRORS, "fashion-mnist", mirror.as_uri() + "/")
    target = tmp_path / "downloads"
    loaded = load_dataset("fashion-mnist", target)
    assert (len(loaded.y_train), len(loaded.y_test)) == (60000, 10000)
    saved = sorted((target / "FashionMNIST" / "raw").iterdir())
    assert [p.name for p in saved] == sorted(f"{n}.gz" for n in IDX_NAMES)
    for path in saved:
        assert file_hash(path, "md5") == file_hash(mirror / path.name, "md5")


def test_download_checksum_mismatch_leaves_nothing(tmp_path: Path, data_env: Path, monkeypatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in IDX_NAMES:
        (mirror / f"{name}.gz").write_bytes(b"not the real file")
    monkeypatch.setitem(data.MIRRORS, "fashion-mnist", mirror.as_uri() + "/")
    target = tmp_path / "downloads"
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("fashion-mnist", target)
    assert [p for p in target.rglob("*") if p.is_file()] == []


def test_download_falls_back_to_writable_cache(tmp_path: Path, data_env: Path, monkeypatch) -> None:
    batches = write_cifar(tmp_path / "src", "cifar100")
    archive = tmp_path / "mirror" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-100-python", arcname="cifar-100-python")
    monkeypatch.setitem(data.MIRRORS, "cifar100", archive.parent.as_uri() + "/")
    monkeypatch.setitem(data._MD5SUMS["cifar100"], archive.name, file_hash(archive, "md5"))
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    loaded = load_dataset("cifar100", blocked / "data")  # a folder that cannot be made (as root too)
    assert (data_env / "cifar-100-python" / "train").is_file()
    assert loaded.y_test.tolist() == batches["test"][1]


def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path, data_env: Path) -> None:
    not_a_folder = tmp_path / "data.gz"
    not_a_folder.write_text("")
    with pytest.raises(DataError, match="is a file; give the folder that holds the datasets"):
        load_dataset("mnist", not_a_folder)


def test_unsafe_archive_is_refused(tmp_path: Path, data_env: Path, monkeypatch) -> None:
    archive = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    monkeypatch.setitem(data.MIRRORS, "cifar10", archive.parent.as_uri() + "/")
    monkeypatch.setitem(data._MD5SUMS["cifar10"], archive.name, file_hash(archive, "md5"))
    with pytest.raises(DataError, match="unsafe entry"):
        load_dataset("cifar10", tmp_path / "data")
    assert not (tmp_path / "escaped.txt").exists()


# CIFAR

@pytest.mark.parametrize("variant, mean, std, train_names, test_names, classes", [
    ("cifar10", CIFAR10_MEAN, CIFAR10_STD, [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], 10),
    ("cifar100", CIFAR100_MEAN, CIFAR100_STD, ["train"], ["test"], 100),
])
def test_cifar_loader(tmp_path: Path, data_env: Path, variant, mean, std, train_names, test_names, classes) -> None:
    batches = write_cifar(tmp_path, variant, n=4)
    loaded = load_dataset(variant.upper(), tmp_path, download=False)
    assert loaded.num_classes == classes and loaded.input_shape == (3, 32, 32)
    assert loaded.x_train.shape == (4 * len(train_names), 3, 32, 32) and loaded.x_test.shape == (4, 3, 32, 32)
    assert loaded.x_train.is_contiguous() and loaded.x_train.dtype == torch.float32
    images = np.concatenate([batches[n][0] for n in train_names]).reshape(-1, 3, 32, 32)
    expected = (images / 255 - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(loaded.x_train.numpy(), expected, atol=1e-5)
    assert loaded.y_train.tolist() == sum((batches[n][1] for n in train_names), [])
    assert loaded.y_test.tolist() == batches[test_names[0]][1]


def test_cifar_red_channel_comes_first(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100", n=1)
    image = np.zeros(3072, dtype=np.uint8)
    image[:1024], image[1024:2048], image[2048:] = 10, 20, 30
    blob = pickle.dumps({b"data": image[None], b"fine_labels": [7]}, protocol=3)
    (tmp_path / "cifar-100-python" / "test").write_bytes(blob)
    x_train, y_train, x_test, y_test = read_cifar(tmp_path, "cifar100")
    assert x_test.shape == (1, 3, 32, 32) and y_test.tolist() == [7]
    assert [int(x_test[0, c, 5, 9]) for c in range(3)] == [10, 20, 30]


def test_cifar_legacy_numpy_module_names(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path, "cifar10", legacy=True)
    assert b"numpy.core.multiarray" in (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    x_train, y_train, x_test, y_test = read_cifar(tmp_path, "cifar10")
    np.testing.assert_array_equal(x_test.reshape(4, -1), batches["test_batch"][0])


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_cifar_batch_resaved_with_any_protocol(tmp_path: Path, protocol: int) -> None:
    # Python 3 pickles bytes under protocols 0 to 2 as calls to _codecs.encode(text, "latin1"), and numpy
    # arrays under protocol 5 as calls to numpy's _frombuffer
    batches = write_cifar(tmp_path, "cifar10")
    data, labels = batches["test_batch"]
    blob = pickle.dumps({b"batch_label": b"testing batch 1 of 1", b"data": data, b"labels": labels}, protocol=protocol)
    assert (b"_codecs" in blob) == (protocol <= 2) and (b"_frombuffer" in blob) == (protocol == 5)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(blob)
    x_train, y_train, x_test, y_test = read_cifar(tmp_path, "cifar10")
    np.testing.assert_array_equal(x_test.reshape(len(data), -1), data)
    assert y_test.tolist() == list(labels)


class _SubArrayBuffer:
    """Pickles (protocol 5) as numpy's _frombuffer over one image's bytes with a uint8 dtype whose state gives
    each item `items` bytes: numpy would read that many times the buffer, past its end."""

    def __init__(self, items: int) -> None:
        self.dtype = np.dtype("u1", False, True)
        self.dtype.__setstate__((3, "|", (np.dtype("u1"), (items,)), None, None, -1, -1, 0))

    def __reduce__(self):
        from numpy._core.numeric import _frombuffer

        return _frombuffer, (bytearray(3072), self.dtype, (-1, 3072), "C")


def test_a_protocol_5_dtype_that_would_read_past_its_buffer_is_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    blob = pickle.dumps({b"data": _SubArrayBuffer(4), b"labels": [0] * 4}, protocol=5)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(blob)
    with pytest.raises(DataError, match="refusing to rebuild an array of dtype"):
        read_cifar(tmp_path, "cifar10")


def test_a_protocol_5_array_of_python_objects_is_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    blob = pickle.dumps({b"data": np.zeros(3, dtype=np.uint8)}, protocol=5).replace(b"u1", b"O8")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(blob)
    with pytest.raises(DataError, match="refusing to rebuild an array of dtype"):
        read_cifar(tmp_path, "cifar10")


def test_an_encoding_other_than_latin1_is_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    blob = pickle.dumps({b"data": b"x"}, protocol=2).replace(b"latin1", b"rot_13")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(blob)
    with pytest.raises(DataError, match="encoding 'rot_13'"):
        read_cifar(tmp_path, "cifar10")


class RunsCommand:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(RunsCommand(marker)))
    with pytest.raises(DataError, match="refusing to load .*system") as info:
        read_cifar(tmp_path, "cifar10")
    assert "data_batch_3" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("batch, phrase", [
    ([1, 2, 3], "holds a list, not a dict"),
    ({b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0] * 4}, r"shape \[n, 3072\]"),
    ({b"data": np.zeros((4, 3072), dtype=np.float32), b"labels": [0] * 4}, "uint8"),
    ({b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": [0] * 3}, "4 images"),
    ({b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 10]}, "labels outside 0..9"),
    ({b"data": np.zeros((4, 3072), dtype=np.uint8)}, "must be a list of ints"),
    ({b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": [0.5] * 4}, "must be a list of ints"),
    ({b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": ["1"] * 4}, "must be a list of ints"),
    ({b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": 7}, "must be a list of ints"),
])
def test_malformed_cifar_batch(tmp_path: Path, batch, phrase: str) -> None:
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch, protocol=3))
    with pytest.raises(DataError, match=phrase):
        read_cifar(tmp_path, "cifar10")


def test_read_cifar_rejects_unknown_variant(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cifar10"):
        read_cifar(tmp_path, "mnist")


# Dataset object and names

def test_take_returns_views(tmp_path: Path, data_env: Path) -> None:
    write_fake_mnist(tmp_path, 20)
    full = load_dataset("mnist", tmp_path, download=False)
    small = full.take(5, 3)
    assert (len(small.x_train), len(small.y_train), len(small.x_test), len(small.y_test)) == (5, 5, 3, 3)
    for part, whole in ((small.x_train, full.x_train), (small.y_test, full.y_test)):
        assert part.data_ptr() == whole.data_ptr() and part.is_contiguous()
    assert small.take().x_train.shape == small.x_train.shape
    assert len(full.take(n_test=2).y_train) == 20
    with pytest.raises(ConfigError):
        full.take(-1)


def test_names_are_case_insensitive_with_aliases(tmp_path: Path, data_env: Path) -> None:
    written = write_fake_mnist(tmp_path, 4, folder="FashionMNIST/raw")
    for name in ("fashion-mnist", "FMNIST", "Fashion_MNIST"):
        loaded = load_dataset(name, tmp_path, download=False)
        assert loaded.name == "fashion-mnist"
    expected = (written["train-images"][:, None] / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(loaded.x_train.numpy(), expected, atol=1e-5)


def test_unknown_name_lists_available() -> None:
    with pytest.raises(UnknownNameError, match="unknown dataset 'imagenet'; available: mnist, fashion-mnist, cifar10"):
        load_dataset("imagenet")


def test_register_dataset(tmp_path: Path) -> None:
    seen = []

    def loader(root: Path | None) -> Dataset:
        seen.append(root)
        x = torch.zeros(2, 1, 4, 4)
        return Dataset("tiny", x, torch.tensor([0, 1]), x, torch.tensor([1, 0]), 2)

    register_dataset("Tiny", loader)
    assert available_datasets()[-1] == "tiny"
    assert available_datasets()[:4] == ["mnist", "fashion-mnist", "cifar10", "cifar100"]
    assert load_dataset("TINY", tmp_path).input_shape == (1, 4, 4) and seen == [tmp_path]
    with pytest.raises(ConfigError, match="already registered"):
        register_dataset("FMNIST", loader)
    register_dataset("broken", lambda root: "not a dataset")
    with pytest.raises(DataError, match="returned str"):
        load_dataset("broken")


def test_registered_loaders_that_return_an_empty_split_or_nan_images_are_refused() -> None:
    x, y = torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    register_dataset("no_test_split", lambda root: Dataset("t", x, y, x[:0], y[:0], 2))
    register_dataset("nan_images", lambda root: Dataset("t", nan, y, x, y, 2))
    with pytest.raises(DataError, match="returned no test samples; a run needs both splits"):
        load_dataset("no_test_split")
    with pytest.raises(DataError, match="returned x_train holding NaN or Inf values; fix the data"):
        load_dataset("nan_images")


def test_dataset_rejects_bad_tensors() -> None:
    x = torch.zeros(3, 1, 2, 2)
    with pytest.raises(DataError, match="x_train must be a torch.Tensor, got ndarray; convert numpy arrays"):
        Dataset("bad", x.numpy(), torch.zeros(3, dtype=torch.int64), x, torch.zeros(3, dtype=torch.int64), 2)
    with pytest.raises(DataError, match="float32"):
        Dataset("bad", x.double(), torch.zeros(3, dtype=torch.int64), x, torch.zeros(3, dtype=torch.int64), 2)
    with pytest.raises(DataError, match="labels outside 0..1"):
        Dataset("bad", x, torch.tensor([0, 1, 2]), x, torch.zeros(3, dtype=torch.int64), 2)


def test_corrupt_file_in_first_root_is_reported_not_skipped(tmp_path: Path, data_env: Path) -> None:
    write_fake_mnist(tmp_path, 50)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path, download=False)
