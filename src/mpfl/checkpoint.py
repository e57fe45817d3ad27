"""What a run keeps on disk besides its records: a checkpoint after every round, so a killed run
resumes and ends bit for bit where an uninterrupted run would, and the final weights and mask.

All randomness is derived from (seed, step, node), so the server state and the nodes' states
are everything a run needs to continue. Masks are stored once (the server's mask history, one
bit per entry in one array); a node's mask is the history entry of the version it holds. Only
nodes that have taken part are stored, and a node's own weights only as their values on the
mask it trained under (they are zero elsewhere), or, when a mask round trained them from w0, as
that round's number alone (the node trains again on resume to rebuild them, bit for bit), so a
checkpoint grows with the nodes sampled and the kept weights, not with nodes x model size. Both
files are written to a temporary name and renamed, so a kill leaves either the old or the new
file.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .codec import weights_digest
from .core.history import MaskHistory
from .core.params import ParamSpec
from .errors import ConfigError, ExportError, RunDirError
from .files import StoredArrays, in_order, numbered, read_groups, write_groups
from .node import NodeState
from .server import ServerState

CHECKPOINT, FINAL = "checkpoint.npz", "final.npz"
DAMAGE = (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, zipfile.BadZipFile, MemoryError, RecursionError)
"""What reading a damaged (truncated, overwritten, hand-edited) `.npz` file or its JSON can raise (an array too
large for the memory left, JSON nested thousands deep)."""


@dataclass(frozen=True)
class NodeMeta:
    """What a checkpoint says of one node's state; the arrays it names are stored beside it."""

    version: int
    """The mask version the node holds (its mask is that entry of the server's history)."""
    has_mask: bool
    has_w0: bool
    local: bool
    """Whether the node's own weights are stored (as `kept_values` on its mask)."""
    residual: bool
    """Whether its top-k error feedback is stored."""
    kept: bool = False
    """Own weights stored as kept values: every checkpoint written since they were; older ones held
    full tensors (and no such key)."""
    from_w0: int = 0
    """The mask round whose training from w0 gave the node's own weights, which resume rebuilds by
    training again (0: none)."""

    @classmethod
    def of(cls, node: NodeState) -> NodeMeta:
        stored = node.local is not None and not node.local_from_w0
        return cls(node.version, node.mask is not None, node.w0 is not None, stored, node.residual is not None,
                   kept=True, from_w0=node.local_from_w0)

    @classmethod
    def from_json(cls, data: dict) -> NodeMeta:
        """A node's entry as `check_meta` has checked it (missing keys of older files take their defaults)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's metadata (its ``meta`` array, JSON): the server's counters and versions, each
    node's `NodeMeta`, and the run's identity (`run`, see `mpfl.resume`); the arrays lie beside it."""

    version: int
    history: list[int]
    """The mask versions the history holds (one per mask and adaptation round, and 0)."""
    next_step: int
    mask_done: bool
    bytes_up: int
    bytes_down: int
    node_version: dict[int, int]
    w0_sent: list[int]
    counts: dict[int, int]
    nodes: dict[int, NodeMeta]
    run: dict | None = None
    history_bits: bool = False
    """The history stored as packed bits in one array (every checkpoint written since; older ones
    held a boolean array per version and tensor, and no such key)."""

    @classmethod
    def of(cls, server: ServerState, nodes: dict[int, NodeState], run: dict | None) -> CheckpointMeta:
        return cls(server.version, sorted(server.history), server.next_step, server.mask_done, server.bytes_up,
                   server.bytes_down, dict(server.node_version), sorted(server.w0_sent), dict(server.counts),
                   {n: NodeMeta.of(node) for n, node in nodes.items() if not node.fresh}, run, history_bits=True)

    def to_json(self) -> dict:
        """The metadata as JSON holds it (node ids as text); no deep copy, as a run of 10,000 nodes
        writes thousands of node entries every round."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["nodes"] = {str(n): vars(m) for n, m in self.nodes.items()}
        for key in ("node_version", "counts"):
            data[key] = {str(k): v for k, v in data[key].items()}
        return data

    @classmethod
    def from_json(cls, data: dict, steps: int, nodes: int) -> CheckpointMeta:
        """Metadata read from a file, refused (ValueError) unless a run of `steps` rounds on `nodes` nodes wrote it."""
        check_meta(data, steps, nodes)
        return cls(data["version"], data["history"], data["next_step"], data["mask_done"], data["bytes_up"],
                   data["bytes_down"], {int(k): v for k, v in data["node_version"].items()}, data["w0_sent"],
                   {int(k): v for k, v in data["counts"].items()},
                   {int(k): NodeMeta.from_json(m) for k, m in data["nodes"].items()}, data.get("run"),
                   history_bits=data.get("history_bits", False))


def save_checkpoint(run_dir: Path, server: ServerState, nodes: dict[int, NodeState], run: dict | None = None, *,
                    spec: ParamSpec) -> None:
    """Write the server's and the nodes' state atomically to `run_dir/checkpoint.npz`; `run` (the run's
    identity and its last record, see `mpfl.resume`) is stored beside them. Nodes that have received
    nothing are left out; own weights are stored as their values on the node's mask (`kept_values`)."""
    groups = {"weights": numbered(server.weights), "w0": numbered(server.w0)}
    groups["history"] = numbered([server.history.rows()])
    if server.velocity is not None:
        groups["velocity"] = numbered(server.velocity)
    meta = CheckpointMeta.of(server, nodes, run)
    held = _masks(server.history, [m.version for m in meta.nodes.values() if m.local])
    for node_id, node_meta in meta.nodes.items():
        node = nodes[node_id]
        if node_meta.local:
            groups[f"node/{node_id}/local"] = numbered(kept_values(spec, node.local, held[node.version]))
        if node_meta.residual:
            groups[f"node/{node_id}/residual"] = numbered(node.residual)
    groups[""] = {"meta": np.frombuffer(json.dumps(meta.to_json()).encode(), dtype=np.uint8)}
    write_groups(run_dir / CHECKPOINT, groups)


def kept_values(spec: ParamSpec, weights: Sequence[np.ndarray], mask: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The entries of `weights` on `mask` (every entry of a tensor that is not prunable), flattened."""
    return [np.ascontiguousarray(w[s]) for w, s in zip(weights, spec.supports(mask))]


def from_kept(spec: ParamSpec, values: Sequence[np.ndarray], mask: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Full weights from `kept_values`, with zero off the mask; a value count that does not fit the
    mask is a ValueError (a damaged file)."""
    out = []
    for v, s, shape in zip(values, spec.supports(mask), spec.shapes):
        if v.dtype != np.float32 or v.ndim != 1 or v.size != int(s.sum()):
            raise ValueError("a node's kept values do not fit the mask it holds")
        full = np.zeros(shape, dtype=np.float32)
        full[s] = v
        out.append(full)
    return out


def damaged(path: Path, cause: object) -> RunDirError:
    """The one-line error for a damaged run file: which file, and what is wrong with it."""
    text = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
    return RunDirError(f"{path} is damaged ({text}); it cannot be resumed from: restore the file or start the run "
                       f"again with mpfl run --config {path.parent / 'config.toml'} --out NEW_DIR")


def read_meta(run_dir: Path) -> dict:
    """The checkpoint's metadata alone (cheap: the arrays are not read)."""
    path = run_dir / CHECKPOINT
    try:
        with StoredArrays(path) as f:
            meta = json.loads(f.read("meta").tobytes())
    except DAMAGE as exc:
        raise damaged(path, exc) from None
    if not isinstance(meta, dict):
        raise damaged(path, "its metadata is not a JSON object")
    return meta


def int_in(value: Any, lo: int, hi: float = float("inf")) -> bool:
    """Whether a JSON value is an integer from `lo` to `hi` (true and false are not integers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def check_meta(meta: dict, steps: int, nodes: int) -> None:
    """Refuse metadata no run of `steps` rounds on `nodes` nodes writes: every value in its range, every
    mask version one the history holds (a crafted next_step = 0 would otherwise drop the records)."""
    history = meta.get("history")
    problems = []
    if not int_in(meta.get("next_step"), 1, steps + 1):
        problems.append(f"next_step = {meta.get('next_step')!r} is not a step from 1 to {steps + 1}")
    if not (isinstance(history, list) and history and all(int_in(v, 0, steps) for v in history) and 0 in history):
        problems.append(f"the mask history {history!r} is not a list of steps from 0 to {steps} holding 0")
        history = [0]
    versions = set(history)
    if meta.get("version") not in versions:
        problems.append(f"mask version {meta.get('version')!r} is not in the history")
    if not isinstance(meta.get("history_bits", False), bool):
        problems.append(f"history_bits = {meta.get('history_bits')!r} is not true or false")
    if not isinstance(meta.get("mask_done"), bool):
        problems.append(f"mask_done = {meta.get('mask_done')!r} is not true or false")
    for key in ("bytes_up", "bytes_down"):
        if not int_in(meta.get(key), 0):
            problems.append(f"{key} = {meta.get(key)!r} is not a non-negative integer")
    node_ids = {str(n) for n in range(nodes)}
    maps = {key: meta.get(key) for key in ("node_version", "counts", "nodes")}
    for key, value in maps.items():
        if not isinstance(value, dict) or not set(value) <= node_ids:
            problems.append(f"{key} does not map node ids 0 to {nodes - 1}")
            maps[key] = {}
    if not all(v in versions for v in maps["node_version"].values()):
        problems.append("node_version names a mask version the history does not hold")
    if not all(int_in(v, 1, 2**32 - 1) for v in maps["counts"].values()):
        problems.append("counts holds a sample count that is not a positive 32-bit integer")
    if not (isinstance(meta.get("w0_sent"), list) and all(int_in(n, 0, nodes - 1) for n in meta["w0_sent"])):
        problems.append("w0_sent is not a list of node ids")
    for n, m in maps["nodes"].items():
        flags = ("has_mask", "has_w0", "local", "residual")
        if (not isinstance(m, dict) or m.get("version") not in versions or not all(isinstance(m.get(f), bool) for f in flags)
                or not isinstance(m.get("kept", False), bool) or not int_in(m.get("from_w0", 0), 0, steps)
                or (m.get("from_w0", 0) and not m.get("has_w0"))):
            problems.append(f"the state of node {n} is malformed")
    if problems:
        raise ValueError("; ".join(problems))


def _arrays(groups: dict, name: str, count: int, shapes: Sequence[tuple[int, ...]], dtype: Any) -> list[np.ndarray]:
    """The numbered arrays of one group, checked against the shapes and dtype the model needs."""
    arrays = in_order(groups[name], count)
    if [a.shape for a in arrays] != [tuple(s) for s in shapes] or any(a.dtype != dtype for a in arrays):
        raise ValueError(f"the arrays of {name!r} do not have the shapes or type of the run's model")
    return arrays


def load_checkpoint(run_dir: Path, spec: ParamSpec, *, steps: int, nodes: int, w0: Sequence[np.ndarray] | None = None
                    ) -> tuple[ServerState, dict[int, NodeState]]:
    """Read a checkpoint written by `save_checkpoint` for a run of `steps` rounds on `nodes` nodes with the
    model `spec` describes and, if given, the initial weights `w0` (those the run's config builds); a file
    that does not hold such a state is reported as damaged (RunDirError). Only the arrays its metadata names
    are read, each no larger than the model's largest (`StoredArrays`); any other member is damage."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise ConfigError(f"{str(run_dir)!r} has no {CHECKPOINT}; it cannot be resumed (was it written by mpfl run?)")
    try:
        with StoredArrays(path) as f:
            meta = CheckpointMeta.from_json(json.loads(f.read("meta").tobytes()), steps, nodes)
            names = _members(meta, spec)
            if unknown := sorted(f.names - names):
                raise ValueError(f"it holds {', '.join(unknown[:3])}{' and more' if len(unknown) > 3 else ''}, which no "
                                 "checkpoint of this run holds")
            groups = f.read_groups(names - {"meta"}, _largest(meta, spec))
        server, node_states = _states(groups, meta, spec)
        _check_values(server, node_states, spec)
    except DAMAGE as exc:
        raise damaged(path, exc) from None
    if w0 is not None and weights_digest(server.w0) != weights_digest(w0):  # an intact file, another build
        raise RunDirError(f"the initial weights in {path} are not those the run's config builds here (from its seed, "
                          "or its --init file): another torch version or an edited init file builds other ones. Resume "
                          "with those the run started with, or start the run again with mpfl run --config "
                          f"{run_dir / 'config.toml'} --out NEW_DIR")
    return server, node_states


def _members(meta: CheckpointMeta, spec: ParamSpec) -> set[str]:
    """The names of the arrays a checkpoint with `meta` may hold (velocity only under server momentum)."""
    n_all, n_prunable = range(len(spec.names)), range(len(spec.prunable))
    names = {"meta", *(f"{group}/{i}" for group in ("weights", "w0", "velocity") for i in n_all)}
    names |= {"history/0"} if meta.history_bits else {f"history/{v}/{i}" for v in meta.history for i in n_prunable}
    for n, m in meta.nodes.items():
        names |= {f"node/{n}/local/{i}" for i in n_all} if m.local else set()
        names |= {f"node/{n}/residual/{i}" for i in n_prunable} if m.residual else set()
    return names


def _largest(meta: CheckpointMeta, spec: ParamSpec) -> int:
    """The bytes of the largest array a checkpoint with `meta` holds: a tensor of the model (float32), or the
    mask history as packed bits (one row per version)."""
    return max(4 * max(math.prod(s) for s in spec.shapes),
               len(meta.history) * ((sum(math.prod(s) for s in spec.prunable_shapes) + 7) // 8))


def _check_values(server: ServerState, nodes: dict[int, NodeState], spec: ParamSpec) -> None:
    """Refuse arrays no run continues from: NaN or Inf in the server's weights, w0 or momentum, or in a node's
    error-feedback residual (its NaN would silently drop entries from the node's top-k updates; a top-k round
    that meets one fails before it keeps it); and server weights that are not zero where the mask prunes (every
    round leaves them so, `Server.run_step`). A node's own weights may hold NaN: a node whose training diverged
    in a mask round keeps them (its mask is still a mask), and is dropped when it next sends values."""
    held = [("weights", server.weights), ("w0", server.w0), ("velocity", server.velocity or [])]
    held += [(f"node/{n}/residual", node.residual or []) for n, node in sorted(nodes.items())]
    for name, arrays in held:
        if not all(np.isfinite(a).all() for a in arrays):
            raise ValueError(f"the arrays of {name!r} hold NaN or Inf values")
    if any(np.any(server.weights[i][~kept]) for i, kept in zip(spec.prunable, server.mask)):
        raise ValueError(f"the weights are not zero where its mask (version {server.version}) prunes")


def _states(groups: dict, meta: CheckpointMeta, spec: ParamSpec) -> tuple[ServerState, dict[int, NodeState]]:
    """The server and node states held by a checkpoint's arrays and checked metadata."""
    n_all, n_prunable = len(spec.names), len(spec.prunable)
    shapes, prunable_shapes = spec.shapes, spec.prunable_shapes
    history = _history(groups, meta.history, prunable_shapes, meta.history_bits)
    held = _masks(history, [meta.version, *(m.version for m in meta.nodes.values())])
    float32 = np.dtype(np.float32)
    weights, w0 = _arrays(groups, "weights", n_all, shapes, float32), _arrays(groups, "w0", n_all, shapes, float32)
    server = ServerState(weights=weights, w0=w0, mask=held[meta.version], version=meta.version, history=history,
                         node_version=meta.node_version, w0_sent=set(meta.w0_sent), next_step=meta.next_step,
                         mask_done=meta.mask_done, bytes_up=meta.bytes_up, bytes_down=meta.bytes_down,
                         counts=meta.counts,
                         velocity=_arrays(groups, "velocity", n_all, shapes, float32) if "velocity" in groups else None)
    nodes = {}
    for n, m in meta.nodes.items():
        nodes[n] = NodeState(
            w0=w0 if m.has_w0 else None, mask=held[m.version] if m.has_mask else None, version=m.version,
            local=_local(groups, n, m, spec, held[m.version]) if m.local else None,
            residual=_arrays(groups, f"node/{n}/residual", n_prunable, prunable_shapes, float32) if m.residual else None,
            local_from_w0=m.from_w0,
        )
    return server, nodes


def _masks(history: MaskHistory, versions: Sequence[int]) -> dict[int, list[np.ndarray]]:
    """The masks of `versions`, each unpacked once: the nodes holding a version share its arrays."""
    return {v: history[v] for v in set(versions)}


def _history(groups: dict, versions: Sequence[int], shapes: Sequence[tuple[int, ...]], bits: bool) -> MaskHistory:
    """The mask history: one row of packed bits per version (`core.history.packed`), or (checkpoints written
    before those) a boolean array per version and tensor. Every round rewrites the whole history, and a long
    run holds hundreds of versions: as bits in one array, 375 versions of the mlp's mask take 9.3 MB instead
    of 75 MB in 1,125 arrays."""
    if not bits:
        return MaskHistory({v: _arrays(groups, f"history/{v}", len(shapes), shapes, np.dtype(bool)) for v in versions})
    (rows,) = in_order(groups["history"], 1)
    return MaskHistory.from_rows(shapes, versions, rows)


def _local(groups: dict, node: int, meta: NodeMeta, spec: ParamSpec, mask: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A node's own weights: kept values on its mask, or (checkpoints written before those) full tensors."""
    name = f"node/{node}/local"
    if meta.kept:
        return from_kept(spec, in_order(groups[name], len(spec.names)), mask)
    return _arrays(groups, name, len(spec.names), spec.shapes, np.dtype(np.float32))


@dataclass(frozen=True)
class Final:
    """A run's final weights and mask by tensor name, and the input the model was built for."""

    weights: dict[str, np.ndarray]
    mask: dict[str, np.ndarray]
    input_shape: tuple[int, ...]
    num_classes: int


def save_final(run_dir: str | Path, spec: ParamSpec, weights: Sequence[np.ndarray], mask: Sequence[np.ndarray],
               input_shape: Sequence[int], num_classes: int) -> Path:
    """Write the final weights and mask of a run as `final.npz` (atomically), so the model can be exported."""
    path = Path(run_dir) / FINAL
    write_groups(path, {
        "w": {n: np.asarray(w, dtype=np.float32) for n, w in zip(spec.names, weights)},
        "m": {n: np.asarray(m, dtype=bool) for n, m in zip(spec.prunable_names, mask)},
        "": {"input_shape": np.asarray(input_shape, dtype=np.int64), "num_classes": np.asarray(num_classes, dtype=np.int64)},
    })
    return path


def load_final(run_dir: str | Path) -> Final:
    """Read `final.npz` from a run directory (no pickles)."""
    path = Path(run_dir) / FINAL
    if not path.is_file():
        raise ExportError(f"{path} does not exist: the run did not finish, or was made by a version of mpfl that "
                          "did not save final weights; rerun it")
    try:
        groups = read_groups(path)
        return Final(groups.get("w", {}), {k: v.astype(bool) for k, v in groups.get("m", {}).items()},
                     tuple(int(d) for d in groups[""]["input_shape"]), int(groups[""]["num_classes"]))
    except DAMAGE as exc:
        raise ExportError(f"{path} is damaged ({type(exc).__name__}: {exc}); rerun the run to write it again") from None
