"""Partitioning: disjointness, coverage, determinism and the label skew each scheme should produce."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpfl.errors import ConfigError, DataError
from mpfl.partition import MAX_SHARD_REMAINDER, PARTITIONS, Partition, format_summary, make_partition, summarize

BALANCED = np.repeat(np.arange(10), 100)


def all_indices(p: Partition) -> np.ndarray:
    """Every index handed out, train and validation, in one array."""
    return np.concatenate(p.train + p.val)


def assert_disjoint(p: Partition) -> None:
    """No index is given twice, across nodes or between a node's train and validation sets."""
    indices = all_indices(p)
    assert len(np.unique(indices)) == len(indices)
    for part in p.train + p.val:
        assert part.dtype == np.int64


def class_shares(labels: np.ndarray, p: Partition, num_classes: int) -> np.ndarray:
    """Per node, the fraction of its samples in each class."""
    counts = np.array([np.bincount(labels[np.concatenate([t, v])], minlength=num_classes)
                       for t, v in zip(p.train, p.val)])
    return counts / counts.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_disjoint_and_complete(scheme: str) -> None:
    p = make_partition(BALANCED, 10, scheme, seed=3)
    assert p.num_nodes == 10
    assert_disjoint(p)
    np.testing.assert_array_equal(np.sort(all_indices(p)), np.arange(len(BALANCED)))
    assert p.sizes().sum() + sum(len(v) for v in p.val) == len(BALANCED)
    assert p.sizes().tolist() == [len(t) for t in p.train]


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_deterministic_for_a_seed(scheme: str) -> None:
    a, b = make_partition(BALANCED, 5, scheme, seed=7), make_partition(BALANCED, 5, scheme, seed=7)
    c = make_partition(BALANCED, 5, scheme, seed=8)
    for x, y in zip(a.train + a.val, b.train + b.val):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a.train, c.train))


def test_iid_is_balanced() -> None:
    labels = np.tile(np.arange(10), 103)
    p = make_partition(labels, 7, "iid", val_fraction=0.2)
    totals = [len(t) + len(v) for t, v in zip(p.train, p.val)]
    assert sorted(totals) == [147] * 6 + [148]
    assert [len(v) for v in p.val] == [round(0.2 * n) for n in totals]
    assert np.abs(class_shares(labels, p, 10) - 0.1).max() < 0.1


def test_dirichlet_small_alpha_skews_labels() -> None:
    labels = np.repeat(np.arange(10), 500)
    skewed = class_shares(labels, make_partition(labels, 10, "dirichlet", alpha=0.05, seed=1), 10)
    assert skewed.max(axis=1).mean() > 0.5
    flat = class_shares(labels, make_partition(labels, 10, "dirichlet", alpha=100, seed=1), 10)
    assert flat.max(axis=1).max() < 0.2 and flat.max(axis=1).mean() < 0.15


@pytest.mark.parametrize("seed", range(4))
def test_a_vanishing_alpha_gives_each_class_to_one_node_even_once_nodes_fill_up(seed: int) -> None:
    """Dir(1e-6) puts a class on one node; when that node is already full the class goes to one of
    the others, whole, rather than being spread over them (which would weaken the skew)."""
    labels = np.repeat(np.arange(10), 300)
    p = make_partition(labels, 3, "dirichlet", alpha=1e-6, min_samples=10, val_fraction=0.0, seed=seed)
    holders = [[n for n, idx in enumerate(p.train) if np.any(labels[idx] == c)] for c in range(10)]
    assert all(len(h) == 1 for h in holders)


def test_dirichlet_respects_min_samples() -> None:
    p = make_partition(BALANCED, 20, "dirichlet", alpha=0.3, min_samples=30, seed=2)
    assert min(len(t) + len(v) for t, v in zip(p.train, p.val)) >= 30


def test_dirichlet_gives_up_with_advice() -> None:
    labels = np.repeat(np.arange(10), 20)
    with pytest.raises(DataError, match="fewer nodes .* raise alpha"):
        make_partition(labels, 20, "dirichlet", alpha=0.01, min_samples=10)
    with pytest.raises(ConfigError, match="at least 11 samples for each of nodes = 20"):
        make_partition(labels, 20, "dirichlet", min_samples=11)


def test_shards_follow_classes() -> None:
    p = make_partition(BALANCED, 10, "shards", shards_per_node=2, seed=4)
    for t, v in zip(p.train, p.val):
        assert len(t) + len(v) == 100
        assert len(np.unique(BALANCED[np.concatenate([t, v])])) <= 2
    one = make_partition(BALANCED, 10, "shards", shards_per_node=1, seed=4)
    assert sorted(np.unique(BALANCED[np.concatenate([t, v])]).item() for t, v in zip(one.train, one.val)) == \
        list(range(10))


def test_shards_drop_only_the_remainder() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 1003)
    p = make_partition(labels, 5, "shards", shards_per_node=4)
    assert_disjoint(p)
    assert len(all_indices(p)) == 1000
    assert all(len(t) + len(v) == 200 for t, v in zip(p.train, p.val))


def test_validation_split_sizes() -> None:
    labels = np.zeros(13, dtype=np.int64)
    assert [len(v) for v in make_partition(labels, 13, "iid", val_fraction=0.5).val] == [0] * 13
    assert [len(v) for v in make_partition(labels, 1, "iid", val_fraction=0).val] == [0]
    assert [len(v) for v in make_partition(labels, 6, "iid", val_fraction=0.01).val] == [1] * 6
    assert [len(v) for v in make_partition(labels, 1, "iid", val_fraction=0.99).val] == [12]


@pytest.mark.parametrize("kwargs, phrase", [
    ({"num_nodes": 0}, "nodes = 0 must be between 1 and"),
    ({"num_nodes": 1001}, "nodes = 1001 must be between 1 and"),
    ({"scheme": "powerlaw"}, "iid, dirichlet, shards"),
    ({"scheme": "dirichlet", "alpha": 0}, "alpha"),
    ({"scheme": "dirichlet", "alpha": float("nan")}, "alpha"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"scheme": "shards", "shards_per_node": 0}, "shards = 0 per node"),
    ({"scheme": "shards", "shards_per_node": 201}, "shards = 201 per node"),
    ({"scheme": "shards", "shards_per_node": 35}, r"equal shards of 5 and leave 125 out \(12%\)"),
])
def test_bad_parameters(kwargs: dict, phrase: str) -> None:
    args = {"num_nodes": 5, **kwargs}
    with pytest.raises(ConfigError, match=phrase):
        make_partition(BALANCED, **args)


def test_bad_labels() -> None:
    with pytest.raises(ValueError, match="1-D array of non-negative integers"):
        make_partition(np.zeros((10, 2), dtype=np.int64), 2)
    with pytest.raises(ConfigError):
        make_partition(np.linspace(0, 1, 10), 2)


def test_summary() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    p = Partition(train=(np.array([0, 3]), np.array([1, 2, 4])), val=(np.array([], dtype=np.int64), np.array([5])))
    rows = summarize(labels, p, 3)
    assert rows == [{"node": 0, "train": 2, "val": 0, "labels": [1, 0, 1]},
                    {"node": 1, "train": 3, "val": 1, "labels": [1, 1, 1]}]
    lines = format_summary(rows).splitlines()
    assert lines[0].split() == ["node", "train", "val", "classes", "top", "class", "class", "counts"]
    assert lines[1] == "   0      2    0        2        50%  1 0 1"  # numbers right-aligned, the counts left
    assert lines[2].split() == ["1", "3", "1", "3", "33%", "1", "1", "1"]
    assert lines[3].split() == ["all", "5", "1"]
    with pytest.raises(ConfigError, match="num_classes"):
        summarize(labels, p, 2)
    ten = format_summary(summarize(labels, p, 10)).splitlines()  # up to 10 classes: a count per class
    assert ten[1].split() == ["0", "2", "0", "2", "50%", "1", "0", "1", *["0"] * 7]
    many = format_summary(summarize(labels, p, 11)).splitlines()  # more: no per-class column
    assert many[0].split() == ["node", "train", "val", "classes", "top", "class"]
    assert many[1].split() == ["0", "2", "0", "2", "50%"]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), scheme=st.sampled_from(PARTITIONS))
def test_property_disjoint_and_covering(data: st.DataObject, scheme: str) -> None:
    labels = np.array(data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=300)))
    nodes = data.draw(st.integers(1, len(labels)))
    val_fraction = data.draw(st.floats(0, 0.9))
    seed = data.draw(st.integers(0, 2**32 - 1))
    shards = data.draw(st.integers(1, len(labels) // nodes))
    if scheme == "shards" and len(labels) % (nodes * shards) > MAX_SHARD_REMAINDER * len(labels):
        with pytest.raises(ConfigError, match="use fewer shards or nodes, or more samples"):
            make_partition(labels, nodes, scheme, shards_per_node=shards, val_fraction=val_fraction, seed=seed)
        return
    p = make_partition(labels, nodes, scheme, shards_per_node=shards, val_fraction=val_fraction,
                       seed=seed, min_samples=0)
    assert p.num_nodes == nodes
    assert_disjoint(p)
    expected = len(labels) - len(labels) % (nodes * shards) if scheme == "shards" else len(labels)
    assert len(all_indices(p)) == expected
    assert all(0 <= i < len(labels) for i in all_indices(p))
    for t, v in zip(p.train, p.val):
        assert len(t) >= 1 or len(v) == 0


def test_shards_may_leave_out_at_most_a_tenth_of_the_samples() -> None:
    labels = np.arange(100) % 10
    p = make_partition(labels, 2, "shards", shards_per_node=9, val_fraction=0)  # 18 shards of 5, 10 left: a tenth
    assert sum(len(t) for t in p.train) == 90 and all(len(t) == 45 for t in p.train)
    with pytest.raises(ConfigError, match=r"equal shards of 5 and leave 11 out \(11%\)"):
        make_partition(np.arange(101) % 10, 2, "shards", shards_per_node=9, val_fraction=0)


def test_dirichlet_with_a_tiny_alpha_deals_no_class_to_a_node_already_full() -> None:
    """At alpha = 0.001 a class lands (almost) whole on one node. Class 0 holds 600 of 1,000 samples,
    more than a node's share of 500, so its node is full and classes 1 and 2 must go to the other,
    even when the draw puts them on the full one."""
    labels = np.repeat([0, 1, 2], [600, 200, 200])
    for seed in range(10):
        p = make_partition(labels, 2, "dirichlet", alpha=1e-3, val_fraction=0, min_samples=0, seed=seed)
        counts = [np.bincount(labels[t], minlength=3) for t in p.train]
        full = int(np.argmax([c[0] for c in counts]))
        assert counts[full][0] > 500 and counts[full][1:].tolist() == [0, 0], (seed, counts)


@pytest.mark.parametrize("alpha, raise_alpha", [(1e9, False), (0.01, True)])
def test_a_dirichlet_split_that_cannot_give_every_node_enough_says_what_would(alpha, raise_alpha):
    labels = np.repeat(np.arange(10), 40)  # 400 samples: exactly 10 for each of 40 nodes, which no draw gives
    with pytest.raises(DataError, match=r"fewer than 10 samples \(the least a node may hold\) in \d+ draws of 400 "
                                        r"samples over 40 nodes; use fewer nodes \(nodes = 40\) or more samples") as err:
        make_partition(labels, 40, "dirichlet", alpha=alpha, seed=0)
    assert ("raise alpha" in str(err.value)) == raise_alpha
