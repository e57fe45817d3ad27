"""Checkpoints and final files: what is written is what is read back, kept values only on the mask, and
metadata no run writes refused, each problem named."""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import rewrite_arrays
from mpfl.checkpoint import (
    CHECKPOINT,
    check_meta,
    from_kept,
    kept_values,
    load_checkpoint,
    load_final,
    read_meta,
    save_checkpoint,
    save_final,
)
from mpfl.core.history import MaskHistory
from mpfl.core.params import ParamSpec
from mpfl.errors import ConfigError, ExportError, RunDirError
from mpfl.node import NodeState
from mpfl.server import ServerState

SPEC = ParamSpec(names=("0.weight", "0.bias", "1.weight", "1.bias"), shapes=((4, 3), (4,), (2, 4), (2,)), prunable=(0, 2))
STEPS, NODES = 6, 5


def weights(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal(shape).astype(np.float32) for shape in SPEC.shapes]


def nested_masks(rng: np.random.Generator) -> dict[int, list[np.ndarray]]:
    """Mask versions 0 (all ones), 2 and 4, each a subset of the one before."""
    history, mask = {0: SPEC.full_mask()}, SPEC.full_mask()
    for version in (2, 4):
        mask = [m & (rng.random(m.shape) < 0.6) for m in mask]
        history[version] = mask
    return history


def states(seed: int = 0) -> tuple[ServerState, dict[int, NodeState]]:
    """A server after step 4 of 6 and one node of each kind: fresh, holding own weights, trained from
    w0 in mask round 2 (weights rebuilt on resume), with an error-feedback residual, and one that holds
    only w0."""
    rng = np.random.default_rng(seed)
    history = nested_masks(rng)
    w0 = weights(rng)
    server = ServerState(weights=SPEC.apply(weights(rng), history[4]), w0=w0, mask=history[4], version=4,
                         history=MaskHistory(history), node_version={1: 4, 2: 2, 3: 4}, w0_sent={1, 2, 3, 4}, next_step=5,
                         mask_done=True, bytes_up=12_345, bytes_down=67_890, counts={1: 54, 2: 7, 3: 2**32 - 1},
                         velocity=weights(rng))
    nodes = {
        0: NodeState(),
        1: NodeState(w0=w0, mask=history[4], version=4, local=SPEC.apply(weights(rng), history[4])),
        2: NodeState(w0=w0, mask=history[2], version=2, local_from_w0=2),
        3: NodeState(w0=w0, mask=history[4], version=4, residual=SPEC.pick(weights(rng))),
        4: NodeState(w0=w0),
    }
    return server, nodes


def same_arrays(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


def saved(tmp_path, seed: int = 0, run: dict | None = None) -> tuple[ServerState, dict[int, NodeState]]:
    server, nodes = states(seed)
    save_checkpoint(tmp_path, server, nodes, run, spec=SPEC)
    return server, nodes


def test_a_checkpoint_reads_back_the_server_and_every_node_that_received_something(tmp_path):
    server, nodes = saved(tmp_path, run={"seed": 3})
    got_server, got_nodes = load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)
    for name in ("weights", "w0", "mask", "velocity"):
        assert same_arrays(getattr(got_server, name), getattr(server, name)), name
    assert set(got_server.history) == set(server.history)
    assert all(same_arrays(got_server.history[v], server.history[v]) for v in server.history)
    for name in ("version", "node_version", "w0_sent", "next_step", "mask_done", "bytes_up", "bytes_down", "counts"):
        assert getattr(got_server, name) == getattr(server, name), name
    assert set(got_nodes) == {1, 2, 3, 4}
    for node_id, got in got_nodes.items():
        want = nodes[node_id]
        assert (got.version, got.local_from_w0) == (want.version, want.local_from_w0)
        for name in ("w0", "mask", "local", "residual"):
            assert same_arrays(getattr(got, name), getattr(want, name)), (node_id, name)
    assert got_nodes[1].mask[0] is got_nodes[3].mask[0] is got_server.mask[0]  # version 4: one copy, shared
    assert read_meta(tmp_path)["run"] == {"seed": 3}


def test_a_server_without_momentum_reads_back_without_velocity(tmp_path):
    server, nodes = states()
    server.velocity = None
    save_checkpoint(tmp_path, server, nodes, spec=SPEC)
    assert load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)[0].velocity is None


def test_own_weights_are_stored_as_their_values_on_the_mask_and_weights_from_w0_not_at_all(tmp_path):
    _, nodes = saved(tmp_path)
    with np.load(tmp_path / CHECKPOINT) as f:
        stored = {name: f[name] for name in f.files if name.startswith("node/")}
    kept = [int(s.sum()) for s in SPEC.supports(nodes[1].mask)]
    assert [stored[f"node/1/local/{i}"].shape for i in range(4)] == [(k,) for k in kept]
    assert not any(name.startswith(("node/2/", "node/4/", "node/0/")) for name in stored)
    assert {name.rsplit("/", 1)[0] for name in stored} == {"node/1/local", "node/3/residual"}


def test_checkpoints_written_before_kept_values_still_read_with_full_tensors(tmp_path):
    server, nodes = saved(tmp_path)
    with np.load(tmp_path / CHECKPOINT) as f:
        arrays = {name: f[name] for name in f.files}
    meta = json.loads(arrays["meta"].tobytes())
    del meta["nodes"]["1"]["kept"], meta["nodes"]["1"]["from_w0"]
    arrays.update({f"node/1/local/{i}": w for i, w in enumerate(nodes[1].local)},
                  meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    np.savez(tmp_path / CHECKPOINT, **arrays)
    old = load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)[1][1]
    assert same_arrays(old.local, nodes[1].local) and old.local_from_w0 == 0


def test_the_mask_history_is_stored_as_bits_and_older_checkpoints_with_boolean_masks_still_read(tmp_path):
    server, _ = saved(tmp_path)
    with np.load(tmp_path / CHECKPOINT) as f:
        arrays = {name: f[name] for name in f.files}
    rows = arrays.pop("history/0")
    assert rows.dtype == np.uint8 and rows.shape == (3, 3)  # versions 0, 2, 4; 12 + 8 bits in 3 bytes
    for row, version in zip(rows, sorted(server.history)):
        flat = np.concatenate([m.reshape(-1) for m in server.history[version]])
        assert np.array_equal(np.unpackbits(row, count=20).astype(bool), flat)
    assert not any(name.startswith("history/") for name in arrays)
    meta = json.loads(arrays["meta"].tobytes())
    del meta["history_bits"]
    arrays.update({f"history/{v}/{i}": m for v, mask in server.history.items() for i, m in enumerate(mask)},
                  meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    np.savez(tmp_path / CHECKPOINT, **arrays)
    old = load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)[0]
    assert all(same_arrays(old.history[v], server.history[v]) for v in server.history)


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4),
       versions=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_any_mask_history_reads_back_as_written(tmp_path_factory, shapes, versions, seed):
    rng = np.random.default_rng(seed)
    spec = ParamSpec(names=tuple(str(i) for i in range(len(shapes))), shapes=tuple(shapes), prunable=tuple(range(len(shapes))))
    history = {v: [rng.random(shape) < 0.5 for shape in shapes] for v in range(versions)}
    zeros = [np.zeros(shape, dtype=np.float32) for shape in shapes]
    server = ServerState(weights=zeros, w0=zeros, mask=history[versions - 1], version=versions - 1,
                         history=MaskHistory(history),
                         next_step=versions, mask_done=False)
    folder = tmp_path_factory.mktemp("history")
    save_checkpoint(folder, server, {}, spec=spec)
    got = load_checkpoint(folder, spec, steps=versions, nodes=1)[0].history
    assert set(got) == set(history) and all(same_arrays(got[v], history[v]) for v in history)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), density=st.floats(0.0, 1.0))
def test_kept_values_hold_the_weights_on_the_mask_and_from_kept_restores_them_with_zeros_elsewhere(seed, density):
    rng = np.random.default_rng(seed)
    full = weights(rng)
    mask = [rng.random(s) < density for s in SPEC.prunable_shapes]
    values = kept_values(SPEC, full, mask)
    supports = SPEC.supports(mask)
    assert all(np.array_equal(v, w[s]) for v, w, s in zip(values, full, supports))
    restored = from_kept(SPEC, values, mask)
    for got, w, s in zip(restored, full, supports):
        assert got.dtype == np.float32 and np.array_equal(got, np.where(s, w, np.float32(0)))


@pytest.mark.parametrize("change", ["one value too many", "float64", "two-dimensional"])
def test_kept_values_that_do_not_fit_the_mask_are_refused(change):
    rng = np.random.default_rng(1)
    mask = nested_masks(rng)[2]
    values = kept_values(SPEC, weights(rng), mask)
    values[0] = {"one value too many": np.append(values[0], np.float32(1)), "float64": values[0].astype(np.float64),
                 "two-dimensional": values[0].reshape(1, -1)}[change]
    with pytest.raises(ValueError, match="kept values do not fit the mask"):
        from_kept(SPEC, values, mask)


def valid_meta(tmp_path) -> dict:
    saved(tmp_path)
    return read_meta(tmp_path)


def test_the_metadata_of_a_saved_checkpoint_passes_its_check(tmp_path):
    check_meta(valid_meta(tmp_path), STEPS, NODES)


def _set(key, value):
    return lambda meta: meta.update({key: value})


def _set_node(key, value, node="1"):
    return lambda meta: meta["nodes"][node].update({key: value})


ACCEPTED = {
    "next_step one past the last step": _set("next_step", STEPS + 1),
    "the last step in the history": lambda meta: meta.update(history=[0, 2, 4, STEPS], version=STEPS),
    "the largest 32-bit count": lambda meta: meta["counts"].update({"4": 2**32 - 1}),
    "the last node id": lambda meta: (meta["w0_sent"].append(NODES - 1), meta["counts"].update({str(NODES - 1): 1})),
    "no bytes yet": lambda meta: meta.update(bytes_up=0, bytes_down=0),
    "trained from w0 in the last step": _set_node("from_w0", STEPS, node="2"),
    "no kept flag (an older checkpoint)": lambda meta: meta["nodes"]["1"].pop("kept"),
    "no from_w0 on a node without w0 (an older checkpoint)": lambda meta: (
        meta["nodes"]["1"].pop("from_w0"), meta["nodes"]["1"].update(has_w0=False)),
    "next_step at the first step": _set("next_step", 1),
    "no history_bits (an older checkpoint)": lambda meta: meta.pop("history_bits"),
    "w0 sent to node 0": lambda meta: meta["w0_sent"].append(0),
    "a count for every node": lambda meta: meta["counts"].update({str(n): 1 for n in range(NODES)}),
}

REFUSED = {
    "next_step = 0": (_set("next_step", 0), "next_step = 0 is not a step from 1 to 7"),
    "next_step past the end": (_set("next_step", STEPS + 2), "next_step = 8 is not a step from 1 to 7"),
    "next_step as text": (_set("next_step", "5"), "next_step = '5' is not a step"),
    "next_step as a boolean": (_set("next_step", True), "next_step = True is not a step"),
    "history without 0": (_set("history", [2, 4]), "is not a list of steps from 0 to 6 holding 0"),
    "history past the end": (_set("history", [0, 2, 7]), "is not a list of steps"),
    "history empty": (_set("history", []), "is not a list of steps"),
    "history not a list": (_set("history", {"0": 1}), "is not a list of steps"),
    "unknown mask version": (_set("version", 3), "mask version 3 is not in the history"),
    "mask_done as a number": (_set("mask_done", 1), "mask_done = 1 is not true or false"),
    "history_bits as text": (_set("history_bits", "yes"), "history_bits = 'yes' is not true or false"),
    "negative bytes up": (_set("bytes_up", -1), "bytes_up = -1 is not a non-negative integer"),
    "bytes down as a float": (_set("bytes_down", 1.5), "bytes_down = 1.5 is not a non-negative integer"),
    "node version out of range": (lambda meta: meta["node_version"].update({str(NODES): 0}),
                                  "node_version does not map node ids 0 to 4"),
    "node versions not a map": (_set("node_version", [4, 2]), "node_version does not map node ids"),
    "counts not a map": (_set("counts", [1, 2]), "counts does not map node ids"),
    "node states not a map": (_set("nodes", ["1"]), "nodes does not map node ids"),
    "node states missing": (lambda meta: meta.pop("nodes"), "nodes does not map node ids"),
    "node version not in the history": (lambda meta: meta["node_version"].update({"1": 3}),
                                        "node_version names a mask version the history does not hold"),
    "count zero": (lambda meta: meta["counts"].update({"1": 0}), "counts holds a sample count that is not a positive"),
    "count past 32 bits": (lambda meta: meta["counts"].update({"1": 2**32}), "counts holds a sample count"),
    "w0 sent to a node that does not exist": (lambda meta: meta["w0_sent"].append(NODES), "w0_sent is not a list of node ids"),
    "w0 sent to a negative node": (lambda meta: meta["w0_sent"].append(-1), "w0_sent is not a list of node ids"),
    "w0_sent not a list": (_set("w0_sent", 3), "w0_sent is not a list of node ids"),
    "node state not an object": (lambda meta: meta["nodes"].update({"1": [4]}), "the state of node 1 is malformed"),
    "node on an unknown version": (_set_node("version", 3), "the state of node 1 is malformed"),
    "node flag as a number": (_set_node("residual", 0), "the state of node 1 is malformed"),
    "node flag missing": (lambda meta: meta["nodes"]["1"].pop("has_w0"), "the state of node 1 is malformed"),
    "kept as a number": (_set_node("kept", 1), "the state of node 1 is malformed"),
    "trained from w0 after the last step": (_set_node("from_w0", STEPS + 1, node="2"), "the state of node 2 is malformed"),
    "trained from w0 it does not hold": (_set_node("has_w0", False, node="2"), "the state of node 2 is malformed"),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_metadata_at_the_edge_of_what_a_run_writes_is_accepted(tmp_path, case):
    meta = valid_meta(tmp_path)
    ACCEPTED[case](meta)
    check_meta(meta, STEPS, NODES)


@pytest.mark.parametrize("case", list(REFUSED))
def test_metadata_no_run_writes_is_refused_naming_the_problem(tmp_path, case):
    change, message = REFUSED[case]
    meta = valid_meta(tmp_path)
    change(meta)
    with pytest.raises(ValueError) as refused:
        check_meta(meta, STEPS, NODES)
    assert message in str(refused.value)


def test_every_problem_is_named_at_once(tmp_path):
    meta = valid_meta(tmp_path)
    meta.update(next_step=0, mask_done="yes", bytes_up=-5)
    with pytest.raises(ValueError) as refused:
        check_meta(meta, STEPS, NODES)
    assert [p.split(" = ")[0] for p in str(refused.value).split("; ")] == ["next_step", "mask_done", "bytes_up"]


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(meta=np.frombuffer(b"[1, 2]", dtype=np.uint8)), "its metadata is not a JSON object"),
    (lambda a: a.update(meta=np.frombuffer(b"{not json", dtype=np.uint8)), "JSONDecodeError"),
    (lambda a: a.pop("meta"), "KeyError"),
])
def test_read_meta_calls_a_file_without_readable_metadata_damaged(tmp_path, change, message):
    saved(tmp_path)
    rewrite_arrays(tmp_path / CHECKPOINT, change)
    with pytest.raises(RunDirError, match=f"checkpoint.npz is damaged .*{message}.*mpfl run --config"):
        read_meta(tmp_path)


@pytest.mark.parametrize("change", [
    lambda a: a.update({"weights/1": a["weights/1"].astype(np.float64)}),
    lambda a: a.update({"w0/0": a["w0/0"].T}),
    lambda a: a.update({"history/0": a["history/0"][:-1]}),  # a version short
    lambda a: a.update({"history/0": a["history/0"][:, :-1]}),  # a byte short
    lambda a: a.update({"history/0": a["history/0"].astype(bool)}),
    lambda a: a.update({"history/0": a["history/0"] | np.uint8(1)}),  # a padding bit set (20 bits in 3 bytes)
    lambda a: a.pop("velocity/3"),
    lambda a: a.update({"node/1/local/0": a["node/1/local/0"][:-1]}),
    lambda a: a.pop("node/3/residual/0"),
])
def test_arrays_that_are_not_the_models_are_damage_not_a_wrong_state(tmp_path, change):
    saved(tmp_path)
    rewrite_arrays(tmp_path / CHECKPOINT, change)
    with pytest.raises(RunDirError, match="checkpoint.npz is damaged"):
        load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)


def _set_entry(name: str, index: int, value: float):
    """A change to one entry of the array `name` (as a hand edit makes it)."""
    def change(arrays):
        arrays[name] = arrays[name].copy()
        arrays[name].flat[index] = value
    return change


@pytest.mark.parametrize("change, cause", [
    (_set_entry("weights/0", 0, np.nan), "the arrays of 'weights' hold NaN or Inf values"),
    (_set_entry("w0/1", 2, np.inf), "the arrays of 'w0' hold NaN or Inf values"),
    (_set_entry("velocity/3", 1, -np.inf), "the arrays of 'velocity' hold NaN or Inf values"),
    (_set_entry("node/3/residual/1", 5, np.nan), "the arrays of 'node/3/residual' hold NaN or Inf values"),
], ids=["NaN in the weights", "Inf in w0", "-Inf in the momentum", "NaN in a residual"])
def test_values_no_run_continues_from_are_damage(tmp_path, change, cause):
    saved(tmp_path)
    rewrite_arrays(tmp_path / CHECKPOINT, change)
    with pytest.raises(RunDirError, match=rf"checkpoint.npz is damaged \(ValueError: {cause}\)"):
        load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)


def test_a_nodes_own_weights_are_read_as_they_are_nan_too(tmp_path):
    """A node whose training diverged in a mask round keeps NaN weights (it sent only a mask): the run goes on
    without it, so its checkpoint must be resumed from as it is."""
    saved(tmp_path)
    rewrite_arrays(tmp_path / CHECKPOINT, lambda arrays: arrays.update({"node/1/local/0": np.full_like(
        arrays["node/1/local/0"], np.nan)}))
    assert np.isnan(load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)[1][1].local[0]).any()


def test_weights_where_the_mask_prunes_are_damage_and_weights_it_keeps_are_read_as_they_are(tmp_path):
    server, _ = saved(tmp_path)
    pruned, kept = np.flatnonzero(~server.mask[1]), np.flatnonzero(server.mask[1])  # tensor 2 ("1.weight")
    rewrite_arrays(tmp_path / CHECKPOINT, _set_entry("weights/2", int(kept[0]), 0.5))
    assert load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)[0].weights[2].flat[kept[0]] == np.float32(0.5)
    rewrite_arrays(tmp_path / CHECKPOINT, _set_entry("weights/2", int(pruned[0]), 0.5))
    with pytest.raises(RunDirError, match=r"damaged \(ValueError: the weights are not zero where its mask \(version 4\) "
                                          r"prunes\)"):
        load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)


def test_initial_weights_other_than_the_config_builds_here_are_refused_as_another_build(tmp_path):
    """An intact checkpoint whose w0 another torch version or init file would not build is not damage:
    the error says what differs and how to go on."""
    server, _ = saved(tmp_path)
    assert same_arrays(load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES, w0=server.w0)[0].w0, server.w0)
    other = [w.copy() for w in server.w0]
    other[3].flat[0] = np.nextafter(other[3].flat[0], np.float32(np.inf))  # one value, one step of float32 away
    with pytest.raises(RunDirError, match=r"^the initial weights in .*checkpoint.npz are not those the run's config "
                                          r"builds here .* another torch version or an edited init file"):
        load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES, w0=other)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...]) -> bytes:
    """A float32 .npy header claiming `shape`, with no values after it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def with_member(name: str, data: bytes):
    """A change to the checkpoint's zip file: member `name` added, or replaced, by `data` (stored as np.savez stores)."""
    def change(path):
        with zipfile.ZipFile(path) as archive:
            members = {n: archive.read(n) for n in archive.namelist()}
        members[f"{name}.npy"] = data
        with zipfile.ZipFile(path, "w") as archive:
            for n, content in members.items():
                archive.writestr(n, content)
    return change


def compressed(path):
    with np.load(path) as f:
        arrays = {name: f[name] for name in f.files}
    np.savez_compressed(path, **arrays)


LARGEST = 4 * 4 * 3
"""The largest array of SPEC's checkpoints: its (4, 3) float32 tensor (the history is 3 versions of 3 bytes)."""

CRAFTED = {
    "a header claiming 4 TiB": (with_member("weights/0", npy_header((2**40,))),
                                f"its member weights/0 claims an array of {4 * 2**40:,} bytes (float32, shape "
                                f"({2**40},)), more than the {LARGEST} it may hold"),
    "values beyond the model's largest tensor": (with_member("w0/1", npy(np.zeros(LARGEST // 4 + 1, np.float32))),
                                                 f"its member w0/1 claims an array of {LARGEST + 4} bytes"),
    "a member no checkpoint holds": (with_member("junk/0", npy(np.zeros(3, np.float32))),
                                     "it holds junk/0, which no checkpoint of this run holds"),
    "a node's array for a node without one": (with_member("node/4/local/0", npy(np.zeros(3, np.float32))),
                                              "it holds node/4/local/0, which no checkpoint of this run holds"),
    "compressed members": (compressed, "its member meta is compressed"),
    "metadata nested 100,000 deep": (with_member("meta", npy(np.frombuffer(b"[" * 100_000, np.uint8))), "RecursionError"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_container_is_damage_refused_before_its_arrays_are_read(tmp_path, case):
    change, cause = CRAFTED[case]
    saved(tmp_path)
    change(tmp_path / CHECKPOINT)
    with pytest.raises(RunDirError) as refused:
        load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)
    assert "checkpoint.npz is damaged (" in str(refused.value) and cause in str(refused.value)


def test_an_array_that_does_not_fit_in_memory_is_damage_not_a_crash(tmp_path, monkeypatch):
    saved(tmp_path)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 4.00 TiB")

    monkeypatch.setattr(np.lib.format, "read_array", out_of_memory)
    with pytest.raises(RunDirError, match=r"checkpoint.npz is damaged \(MemoryError: Unable to allocate 4.00 TiB\)"):
        load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)


def test_a_fifo_in_place_of_the_checkpoint_is_refused_without_waiting_for_a_writer(tmp_path):
    path = tmp_path / CHECKPOINT
    os.mkfifo(path)
    with pytest.raises(RunDirError, match=r"checkpoint.npz is damaged \(ValueError: it is not a regular file\)"):
        load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)
    refusals = []

    def read():
        try:
            read_meta(tmp_path)
        except RunDirError as exc:
            refusals.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    if reader.is_alive():  # blocked until a writer opens the FIFO: open it, so the reader ends
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
    assert refusals and "checkpoint.npz is damaged (ValueError: it is not a regular file)" in refusals[0]


def test_metadata_of_another_run_size_is_refused_on_load(tmp_path):
    saved(tmp_path)
    with pytest.raises(RunDirError, match="counts does not map node ids 0 to 2"):
        load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=3)
    with pytest.raises(RunDirError, match="next_step = 5 is not a step from 1 to 4"):
        load_checkpoint(tmp_path, SPEC, steps=3, nodes=NODES)


def test_crafted_metadata_is_damage_named_in_one_error_not_a_crash(tmp_path):
    saved(tmp_path)

    def craft(arrays):
        meta = json.loads(arrays["meta"].tobytes())
        meta.update(counts=[54, 7], nodes="all")
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

    rewrite_arrays(tmp_path / CHECKPOINT, craft)
    with pytest.raises(RunDirError, match="counts does not map node ids 0 to 4; nodes does not map node ids 0 to 4"):
        load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)


def test_a_folder_without_a_checkpoint_says_it_cannot_be_resumed(tmp_path):
    with pytest.raises(ConfigError, match="has no checkpoint.npz; it cannot be resumed"):
        load_checkpoint(tmp_path, SPEC, steps=STEPS, nodes=NODES)


def test_the_final_file_reads_back_weights_and_mask_by_name(tmp_path):
    rng = np.random.default_rng(2)
    final_weights, mask = weights(rng), nested_masks(rng)[4]
    save_final(tmp_path, SPEC, [w.astype(np.float64) for w in final_weights], [m.astype(np.uint8) for m in mask],
               (1, 28, 28), 10)
    final = load_final(tmp_path)
    assert list(final.weights) == list(SPEC.names) and list(final.mask) == SPEC.prunable_names
    assert same_arrays(list(final.weights.values()), final_weights)
    assert same_arrays(list(final.mask.values()), mask)
    assert (final.input_shape, final.num_classes) == ((1, 28, 28), 10)


def test_a_missing_or_damaged_final_file_is_an_export_error_naming_it(tmp_path):
    with pytest.raises(ExportError, match="final.npz does not exist"):
        load_final(tmp_path)
    (tmp_path / "final.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ExportError, match="final.npz is damaged"):
        load_final(tmp_path)
