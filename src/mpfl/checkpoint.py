"""What a run keeps on disk besides its records: a checkpoint after every round, so a killed run
resumes and ends bit for bit where an uninterrupted run would, and the final weights and mask.

All randomness is derived from (seed, step, node), so the server state and the nodes'
states are everything a run needs to continue. Masks are stored once (the server's mask
history); a node's mask is the history entry of the version it holds. Both files are written
to a temporary name and renamed, so a kill leaves either the old or the new file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .core.params import ParamSpec
from .errors import ConfigError, ExportError
from .files import in_order, numbered, read_groups, write_groups
from .node import NodeState
from .server import ServerState

CHECKPOINT, FINAL = "checkpoint.npz", "final.npz"


def save_checkpoint(run_dir: Path, server: ServerState, nodes: dict[int, NodeState]) -> None:
    """Write the server's and the nodes' state atomically to `run_dir/checkpoint.npz`."""
    groups = {"weights": numbered(server.weights), "w0": numbered(server.w0)}
    groups.update({f"history/{version}": numbered(mask) for version, mask in server.history.items()})
    node_meta = {}
    for n, st in nodes.items():
        for name in ("local", "residual"):
            if getattr(st, name) is not None:
                groups[f"node/{n}/{name}"] = numbered(getattr(st, name))
        node_meta[str(n)] = {"version": st.version, "has_mask": st.mask is not None, "has_w0": st.w0 is not None,
                             "local": st.local is not None, "residual": st.residual is not None}
    meta = {
        "version": server.version, "history": sorted(server.history), "next_step": server.next_step,
        "mask_done": server.mask_done, "bytes_up": server.bytes_up, "bytes_down": server.bytes_down,
        "node_version": {str(k): v for k, v in server.node_version.items()}, "w0_sent": sorted(server.w0_sent),
        "nodes": node_meta,
    }
    groups[""] = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    write_groups(run_dir / CHECKPOINT, groups)


def load_checkpoint(run_dir: Path, spec: ParamSpec) -> tuple[ServerState, dict[int, NodeState]]:
    """Read a checkpoint written by `save_checkpoint` for a model described by `spec`."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} has no {CHECKPOINT}; it cannot be resumed (was it written by mpfl run?)")
    try:
        groups = read_groups(path)
        meta = json.loads(groups[""]["meta"].tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{str(path)!r} is not a readable checkpoint: {exc}") from None
    n_all, n_prunable = len(spec.names), len(spec.prunable)
    history = {v: [a.astype(bool) for a in in_order(groups[f"history/{v}"], n_prunable)] for v in meta["history"]}
    weights, w0 = in_order(groups["weights"], n_all), in_order(groups["w0"], n_all)
    if [w.shape for w in weights] != [tuple(s) for s in spec.shapes]:
        raise ConfigError(f"{str(path)!r} does not match the run's model; was config.toml changed?")
    server = ServerState(weights=weights, w0=w0, mask=history[meta["version"]], version=meta["version"], history=history,
                         node_version={int(k): v for k, v in meta["node_version"].items()}, w0_sent=set(meta["w0_sent"]),
                         next_step=meta["next_step"], mask_done=meta["mask_done"], bytes_up=meta["bytes_up"],
                         bytes_down=meta["bytes_down"])
    nodes = {}
    for key, m in meta["nodes"].items():
        n = int(key)
        nodes[n] = NodeState(
            w0=w0 if m["has_w0"] else None, mask=history[m["version"]] if m["has_mask"] else None, version=m["version"],
            local=in_order(groups[f"node/{n}/local"], n_all) if m["local"] else None,
            residual=in_order(groups[f"node/{n}/residual"], n_prunable) if m["residual"] else None,
        )
    return server, nodes


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
    groups = read_groups(path)
    return Final(groups.get("w", {}), {k: v.astype(bool) for k, v in groups.get("m", {}).items()},
                 tuple(int(d) for d in groups[""]["input_shape"]), int(groups[""]["num_classes"]))
