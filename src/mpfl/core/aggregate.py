"""Server-side aggregation of the nodes' tensors (FedAvg and its relatives)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def normalise(weights: Sequence[float]) -> np.ndarray:
    """Aggregation weights alpha_n summing to one (FedAvg weighs by local sample counts)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"aggregation weights must be non-negative with a positive sum, got {list(w)}")
    return w / w.sum()


def weighted_average(tensors: Sequence[Sequence[np.ndarray]], weights: Sequence[float]) -> list[np.ndarray]:
    """sum_n alpha_n x_n per tensor, accumulated in float64 and returned as float32."""
    alpha = normalise(weights)
    if len(tensors) != alpha.size:
        raise ValueError(f"{len(tensors)} tensor lists but {alpha.size} weights")
    out = []
    for i in range(len(tensors[0])):
        acc = np.zeros(np.shape(tensors[0][i]), dtype=np.float64)
        for a, t in zip(alpha, tensors):
            acc += a * t[i]
        out.append(acc.astype(np.float32))
    return out
