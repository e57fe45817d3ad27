"""Array files: `write_groups` writes what numpy's own savez writes, atomically, from a mapping or
from pairs made one at a time."""

import zipfile

import numpy as np
import pytest

from mpfl.files import atomic_write, read_groups, write_groups


def groups() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {"": {"meta": np.frombuffer(b'{"a": 1}', dtype=np.uint8)},
            "weights": {"0": rng.standard_normal((3, 4)).astype(np.float32), "1": np.arange(5, dtype=np.int64)},
            "node/7/mask": {"0": rng.random((6, 6)) < 0.3}}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("as_pairs", [False, True])
def test_the_file_reads_back_as_numpy_reads_its_own_savez(tmp_path, compress, as_pairs):
    written = groups()
    flat = {f"{g}/{k}" if g else k: v for g, entries in written.items() for k, v in entries.items()}
    (np.savez_compressed if compress else np.savez)(tmp_path / "numpy.npz", **flat)
    write_groups(tmp_path / "ours.npz", iter(written.items()) if as_pairs else written, compress=compress)
    with np.load(tmp_path / "numpy.npz") as theirs, np.load(tmp_path / "ours.npz") as ours:
        assert sorted(ours.files) == sorted(theirs.files)
        for name in theirs.files:
            assert ours[name].dtype == theirs[name].dtype and np.array_equal(ours[name], theirs[name])
    kinds = {info.compress_type for info in zipfile.ZipFile(tmp_path / "ours.npz").infolist()}
    assert kinds == {zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED}
    got = read_groups(tmp_path / "ours.npz")
    assert got.keys() == written.keys()
    assert all(np.array_equal(got[g][k], v) for g, entries in written.items() for k, v in entries.items())


def test_a_mask_file_compressed_is_far_smaller_than_a_byte_per_entry(tmp_path):
    mask = np.random.default_rng(1).random(200_000) < 0.1
    write_groups(tmp_path / "plain.npz", {"0": {"0": mask}})
    write_groups(tmp_path / "packed.npz", {"0": {"0": mask}}, compress=True)
    assert (tmp_path / "plain.npz").stat().st_size > mask.size
    assert (tmp_path / "packed.npz").stat().st_size < mask.size / 4


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.npz"
    write_groups(path, groups())
    before = path.read_bytes()

    def failing():
        yield "weights", {"0": np.zeros(3)}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_groups(path, failing())
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"]


def test_atomic_write_takes_a_function_that_writes_the_content(tmp_path):
    atomic_write(tmp_path / "out.bin", lambda f: f.write(b"streamed"))
    assert (tmp_path / "out.bin").read_bytes() == b"streamed"
