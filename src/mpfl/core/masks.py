"""Sparsity schedules, local mask criteria and mask statistics, as pure functions on arrays.

A mask is a list of boolean arrays, one per prunable tensor. Every new mask is a subset of
the current one: the criteria only ever choose among entries that are still kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import MethodError
from ..registry import Registry, accepted_keywords, check_callable, registry
from .contract import checked_arrays
from .memo import positions

Mask = list[np.ndarray]
SCHEDULES = ("geometric", "linear")
SCOPES = ("layer", "global")


def target_density(t: int, rounds: int, sparsity: float, schedule: str) -> float:
    """Density after mask round t of `rounds`: geometric keeps the same fraction each round, linear
    removes the same share of the full model each round."""
    if schedule == "geometric":
        return (1.0 - sparsity) ** (t / rounds)
    if schedule == "linear":
        return 1.0 - sparsity * t / rounds
    raise ValueError(f"unknown schedule {schedule!r}")


def keep_count(size: int, density: float, minimum: int = 1) -> int:
    """Entries to keep in a tensor of `size` at `density` (rounded, at least `minimum` when size allows)."""
    return min(size, max(minimum, int(math.floor(density * size + 0.5))))


_SAMPLE = 2048
_SAMPLE_MARGIN = 5.0


def kth_largest(values: np.ndarray, k: int) -> np.generic:
    """The k-th largest entry of a 1-D array (1 <= k <= size): exactly ``np.partition(values,
    size - k)[size - k]``, NaN sorting last as there.

    Large arrays are narrowed first: the quantile of an evenly strided sample brackets the answer
    with a margin of five standard deviations, and only the entries inside the bracket are
    partitioned (a few percent of them, instead of all). Counting the entries below and above the
    bracket proves it holds the answer; when it does not (or NaN is present), the whole array is
    partitioned, so the result never depends on the sample.
    """
    n = values.size
    rank = n - k
    if n <= 4 * _SAMPLE:
        return np.partition(values, rank)[rank]
    sample = np.sort(values[:: n // _SAMPLE])
    m = sample.size
    centre = rank * m / n
    spread = _SAMPLE_MARGIN * math.sqrt(max(centre * (m - centre) / m, 1.0)) + 1
    lo, hi = int(centre - spread), int(math.ceil(centre + spread))
    below = values < (sample[lo] if lo > 0 else -np.inf)
    above = values > (sample[hi] if hi < m else np.inf)
    candidates = values[np.flatnonzero(~(below | above))]
    count_below, count_above = int(np.count_nonzero(below)), int(np.count_nonzero(above))
    if count_below + candidates.size + count_above != n or not count_below <= rank < count_below + candidates.size:
        return np.partition(values, rank)[rank]
    return np.partition(candidates, rank - count_below)[rank - count_below]


def top_k(scores: np.ndarray, eligible: np.ndarray, k: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """The k eligible entries with the highest scores; ties go to the higher `tiebreak`, then the lower index."""
    idx = positions(eligible)
    flat = eligible.reshape(-1)
    if k >= idx.size:
        return flat.astype(bool)
    if k <= 0:
        return np.zeros(flat.size, dtype=bool)
    scores = scores.reshape(-1)
    s = scores[idx]
    kth = kth_largest(s, k)
    # comparing all entries and masking is several times faster than scattering the chosen indices
    out = np.logical_and(flat, scores > kth)
    ties = idx[s == kth]
    need = k - int(np.count_nonzero(out))
    if tiebreak is not None:
        ties = ties[np.lexsort((ties, -tiebreak.reshape(-1)[ties]))]
    out[ties[:need]] = True
    return out


def select(
    scores: Sequence[np.ndarray],
    current: Sequence[np.ndarray],
    density: float,
    scope: str = "layer",
    floor: float = 0.01,
    tiebreak: Sequence[np.ndarray] | None = None,
) -> Mask:
    """Keep the highest-scoring entries of the current mask at `density` of each layer (scope
    ``layer``) or of all layers together (scope ``global``, each layer keeping at least `floor`)."""
    ties = tiebreak if tiebreak is not None else [None] * len(scores)
    if scope == "layer":
        return [
            top_k(s, c, keep_count(c.size, density), t).reshape(c.shape) for s, c, t in zip(scores, current, ties)
        ]
    if scope != "global":
        raise ValueError(f"unknown scope {scope!r}")
    reserved = [top_k(s, c, min(int(c.sum()), keep_count(c.size, floor)), t) for s, c, t in zip(scores, current, ties)]
    total = keep_count(sum(c.size for c in current), density)
    rest = total - sum(int(r.sum()) for r in reserved)
    flat_scores = np.concatenate([s.reshape(-1) for s in scores])
    eligible = np.concatenate([c.reshape(-1) & ~r for c, r in zip(current, reserved)])
    flat_ties = None if tiebreak is None else np.concatenate([t.reshape(-1) for t in tiebreak])
    chosen = top_k(flat_scores, eligible, rest, flat_ties) | np.concatenate(reserved)
    return _split(chosen, current)


def _split(flat: np.ndarray, like: Sequence[np.ndarray]) -> Mask:
    out, start = [], 0
    for c in like:
        out.append(flat[start : start + c.size].reshape(c.shape))
        start += c.size
    return out


def rows(a: np.ndarray) -> np.ndarray:
    """A tensor viewed as one row per output filter / neuron (dim 0); a scalar is one row of one."""
    shape = a.shape or (1,)
    return a.reshape(shape[0], int(np.prod(shape[1:], dtype=np.int64)))


def whole_filters(mask: np.ndarray) -> np.ndarray | None:
    """One flag per output filter of a mask that keeps or drops whole filters; None if it keeps part of one."""
    grid = rows(mask)
    flags = grid.any(axis=1)
    return flags if (grid == flags[:, None]).all() else None


def expand_rows(flags: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A per-filter flag vector broadcast back to a full tensor mask."""
    return np.ascontiguousarray(np.broadcast_to(flags.reshape((-1,) + (1,) * (len(shape) - 1)), shape))


def magnitude_mask(weights: Sequence[np.ndarray], current: Sequence[np.ndarray], density: float, *,
                   scope: str = "layer", floor: float = 0.01, **_: object) -> Mask:
    """Unstructured magnitude pruning: keep the largest |w| of the current mask."""
    return select([np.abs(w) for w in weights], current, density, scope, floor)


def filter_mask(weights: Sequence[np.ndarray], current: Sequence[np.ndarray], density: float, **_: object) -> Mask:
    """Structured pruning: keep the output filters / neurons with the largest L2 norm, per layer."""
    out = []
    for w, c in zip(weights, current):
        kept_rows = rows(c).any(axis=1)
        norms = np.linalg.norm(rows(w).astype(np.float64), axis=1)
        chosen = top_k(norms, kept_rows, keep_count(kept_rows.size, density))
        out.append(expand_rows(chosen, c.shape))
    return out


def saliency_mask(scores: Sequence[np.ndarray], current: Sequence[np.ndarray], density: float, *,
                  scope: str = "layer", floor: float = 0.01, **_: object) -> Mask:
    """SNIP-style pruning: keep the entries with the largest |w * dL/dw| (scores computed by the node)."""
    return select(scores, current, density, scope, floor)


EXTRAS = ("options", "rng")
"""Keywords a criterion gets only if it names them (or takes **kwargs): the run's `options` and a
numpy Generator seeded by (seed, step, node, `Stream.CRITERION`), for criteria that draw at random."""


@dataclass(frozen=True)
class Criterion:
    """A local mask rule `choose(weights_or_scores, current, density, *, scope, floor) -> mask`.

    With `needs_scores` the node passes SNIP saliency scores instead of trained weights and
    skips local training; with `structured` masks keep or drop whole output filters. `extras`
    are the keywords of `EXTRAS` that `choose` takes.
    """

    choose: Callable[..., Mask]
    structured: bool = False
    needs_scores: bool = False
    extras: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extras", frozenset(accepted_keywords(self.choose, EXTRAS)))


CRITERIA: Registry[Criterion] = registry("mask criterion")
CRITERIA.register("magnitude", Criterion(magnitude_mask))
CRITERIA.register("filter", Criterion(filter_mask, structured=True))
CRITERIA.register("saliency", Criterion(saliency_mask, needs_scores=True))


def register_criterion(name: str, fn: Callable[..., Mask], *, structured: bool = False, needs_scores: bool = False) -> None:
    """Add a local mask criterion `fn(weights_or_scores, current, density, *, scope, floor) -> mask`
    (a subset of `current`); see `Criterion` for the two flags."""
    check_callable(fn, "mask criterion", name, "fn(weights, current, density, *, scope, floor) (or with **kwargs "
                   "for the last two)", None, None, 1.0, scope="layer", floor=0.01,
                   **dict.fromkeys(accepted_keywords(fn, EXTRAS) if callable(fn) else ()))
    CRITERIA.register(name, Criterion(fn, structured=structured, needs_scores=needs_scores))


def checked_mask(mask: object, current: Sequence[np.ndarray], what: str, *, structured: bool = False) -> Mask:
    """`mask` (what a plug-in's criterion, rule or method returned: `what` names it) as boolean
    arrays, once it is one array per prunable tensor, each of its tensor's shape and a subset of
    `current` (and, if `structured`, keeping or dropping whole output filters); otherwise a
    MethodError that names `what` and the contract, so a broken plug-in stops with one line."""
    contract = (f"{what} must be a list of {len(current)} boolean arrays, one per prunable tensor, each "
                "the shape of its tensor and a subset of the current mask")
    out = checked_arrays(mask, [c.shape for c in current], "b", contract)
    for i, (m, c) in enumerate(zip(out, current)):
        if (m > c).any():
            raise MethodError(f"{contract}; item {i} keeps entries the current mask has pruned")
        if structured and whole_filters(m) is None:
            raise MethodError(f"{what} must keep or drop whole output filters (rows along the first axis), as its "
                              f"source is structured, but item {i} keeps part of a filter")
    return out


# --------------------------------------------------------------------------- statistics


def density(mask: Sequence[np.ndarray]) -> float:
    """Fraction of prunable entries kept."""
    total = sum(m.size for m in mask)
    return sum(int(m.sum()) for m in mask) / total if total else 1.0


def layer_density(mask: Sequence[np.ndarray]) -> list[float]:
    """Fraction kept per prunable tensor."""
    return [float(m.mean()) if m.size else 1.0 for m in mask]


def hamming(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> int:
    """Number of entries on which two masks differ."""
    return sum(int(np.count_nonzero(x != y)) for x, y in zip(a, b))


def jaccard(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """|a & b| / |a | b| over all entries (1.0 for identical masks)."""
    inter = sum(int(np.count_nonzero(x & y)) for x, y in zip(a, b))
    union = sum(int(np.count_nonzero(x | y)) for x, y in zip(a, b))
    return inter / union if union else 1.0


def agreement(local: Sequence[np.ndarray], consensus: Sequence[np.ndarray], support: Sequence[np.ndarray]) -> float:
    """Fraction of the previous support on which a node's mask matches the new consensus."""
    same = sum(int(np.count_nonzero((x == y) & s)) for x, y, s in zip(local, consensus, support))
    total = sum(int(s.sum()) for s in support)
    return same / total if total else 1.0
