"""Split a training set over federated nodes: iid, Dirichlet label skew or McMahan shards."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpfl.errors import ConfigError, DataError

PARTITIONS = ("iid", "dirichlet", "shards")
_DIRICHLET_ATTEMPTS = 200


@dataclass(frozen=True, eq=False)
class Partition:
    """Per-node index arrays into the training set: samples to train on and held-out validation."""

    train: tuple[np.ndarray, ...]
    val: tuple[np.ndarray, ...]

    @property
    def num_nodes(self) -> int:
        """How many nodes the data is split over."""
        return len(self.train)

    def sizes(self) -> np.ndarray:
        """Number of training samples per node; these weight FedAvg."""
        return np.array([len(t) for t in self.train], dtype=np.int64)


def make_partition(labels: np.ndarray, num_nodes: int, scheme: str = "iid", *, alpha: float = 0.5,
                   shards_per_node: int = 2, val_fraction: float = 0.1, seed: int = 0,
                   min_samples: int = 10) -> Partition:
    """Split sample indices over nodes by `scheme`, deterministically for a seed, then hold out validation."""
    labels = np.asarray(labels)
    scheme = scheme.strip().lower()
    _validate(labels, num_nodes, scheme, alpha, shards_per_node, val_fraction, min_samples)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_nodes)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, num_nodes, alpha, min_samples, rng)
    else:
        parts = _shards(labels, num_nodes, shards_per_node, rng)
    train, val = [], []
    for part in parts:
        part = rng.permutation(part)
        n_val = _val_count(len(part), val_fraction)
        val.append(np.sort(part[:n_val]).astype(np.int64))
        train.append(np.sort(part[n_val:]).astype(np.int64))
    return Partition(tuple(train), tuple(val))


def summarize(labels: np.ndarray, partition: Partition, num_classes: int) -> list[dict]:
    """Per node: train and validation sizes and the class counts of its training samples."""
    labels = np.asarray(labels)
    if len(labels) and labels.max() >= num_classes:
        raise ConfigError(f"labels go up to {labels.max()} but num_classes is {num_classes}")
    return [{"node": i, "train": len(t), "val": len(v),
             "labels": np.bincount(labels[t], minlength=num_classes).tolist()}
            for i, (t, v) in enumerate(zip(partition.train, partition.val))]


def format_summary(rows: list[dict]) -> str:
    """A plain-text table of summarize() rows; per-class counts are shown for up to 10 classes."""
    show_counts = bool(rows) and len(rows[0]["labels"]) <= 10
    header = ["node", "train", "val", "classes", "top class"] + (["class counts"] if show_counts else [])
    table = [header]
    for row in rows:
        counts = np.asarray(row["labels"])
        top = f"{counts.max() / counts.sum():.0%}" if counts.sum() else "-"
        cells = [str(row["node"]), str(row["train"]), str(row["val"]), str(int((counts > 0).sum())), top]
        table.append(cells + ([" ".join(str(c) for c in counts)] if show_counts else []))
    total = sum(r["train"] for r in rows), sum(r["val"] for r in rows)
    table.append(["all", str(total[0]), str(total[1]), "", ""] + ([""] if show_counts else []))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == len(header) - 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    return "\n".join(line.rstrip() for line in lines)


def _val_count(n: int, val_fraction: float) -> int:
    """Validation samples for a node of n: the fraction rounded, at least 1, and leaving at least 1 to train."""
    if val_fraction == 0 or n < 2:
        return 0
    return min(max(1, round(val_fraction * n)), n - 1)


MAX_SHARD_REMAINDER = 0.1
"""Most of the training samples equal shards may leave out (the remainder of the division) before a split is refused."""


def _validate(labels: np.ndarray, num_nodes: int, scheme: str, alpha: float, shards_per_node: int,
              val_fraction: float, min_samples: int) -> None:
    """Raise ConfigError naming the first parameter that is out of range."""
    if scheme not in PARTITIONS:
        raise ConfigError(f"unknown partition scheme {scheme!r}; available: {', '.join(PARTITIONS)}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
        raise ConfigError(f"labels must be a 1-D array of non-negative integers, got {labels.dtype} {labels.shape}")
    if not 1 <= num_nodes <= len(labels):
        raise ConfigError(f"nodes = {num_nodes} must be between 1 and the number of training samples ({len(labels)}); "
                          "use fewer nodes or more samples")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if scheme == "dirichlet":
        if not alpha > 0 or not np.isfinite(alpha):
            raise ConfigError(f"alpha must be a positive number, got {alpha}; smaller means more label skew")
        if min_samples < 0 or min_samples * num_nodes > len(labels):
            raise ConfigError(f"at least {min_samples} samples for each of nodes = {num_nodes} needs more than the "
                              f"{len(labels)} training samples; use fewer nodes")
    if scheme == "shards" and not 1 <= shards_per_node * num_nodes <= len(labels):
        raise ConfigError(f"shards = {shards_per_node} per node for nodes = {num_nodes} must be >= 1 and give at "
                          f"most {len(labels)} shards (the training samples); use fewer shards or nodes")
    if scheme == "shards" and (left := len(labels) % (shards_per_node * num_nodes)) > MAX_SHARD_REMAINDER * len(labels):
        raise ConfigError(f"shards = {shards_per_node} per node for nodes = {num_nodes} cut {len(labels)} training "
                          f"samples into equal shards of {len(labels) // (shards_per_node * num_nodes)} and leave "
                          f"{left} out ({left / len(labels):.0%}); use fewer shards or nodes, or more samples")


def _dirichlet(labels: np.ndarray, num_nodes: int, alpha: float, min_samples: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """NIID-Bench label skew: each class split over nodes by Dir(alpha), redrawn until all nodes are big enough."""
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    cap = len(labels) / num_nodes
    for _ in range(_DIRICHLET_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
        sizes = np.zeros(num_nodes, dtype=np.int64)
        for idx in by_class:
            open_nodes = sizes < cap
            share = rng.dirichlet(np.full(num_nodes, alpha)) * open_nodes
            if not share.sum() > 0:  # the draw went to full nodes (a tiny alpha puts it all on one): draw over the
                share[open_nodes] = rng.dirichlet(np.full(int(open_nodes.sum()), alpha))  # open ones, as skewed
            cuts = (np.cumsum(share / share.sum()) * len(idx)).astype(np.int64)[:-1]
            for node, chunk in enumerate(np.split(rng.permutation(idx), cuts)):
                parts[node].append(chunk)
                sizes[node] += len(chunk)
        if sizes.min() >= min_samples:
            return [np.concatenate(p) for p in parts]
    more = " or raise alpha (less skew)" if alpha < 10 else ""  # beyond, the split is as even as it gets
    raise DataError(f"dirichlet partition with alpha = {alpha} left a node with fewer than {min_samples} samples "
                    f"(the least a node may hold) in {_DIRICHLET_ATTEMPTS} draws of {len(labels)} samples over "
                    f"{num_nodes} nodes; use fewer nodes (nodes = {num_nodes}) or more samples{more}")


def _shards(labels: np.ndarray, num_nodes: int, shards_per_node: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into equal shards, deal shards_per_node random shards to each node."""
    num_shards = num_nodes * shards_per_node
    shard_size = len(labels) // num_shards
    kept = rng.permutation(len(labels))[: num_shards * shard_size]
    ordered = kept[np.argsort(labels[kept], kind="stable")]
    shards = ordered.reshape(num_shards, shard_size)
    return [shards[ids].ravel() for ids in rng.permutation(num_shards).reshape(num_nodes, shards_per_node)]
