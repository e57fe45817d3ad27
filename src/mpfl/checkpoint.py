"""Checkpoints after every round, so a killed run resumes and ends bit for bit where an
uninterrupted run would.

All randomness is derived from (seed, step, node), so the server state and the nodes'
states are everything a run needs to continue. Masks are stored once (the server's mask
history); a node's mask is the history entry of the version it holds. The file is written
to a temporary name and renamed, so a kill leaves either the old or the new checkpoint.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from .core.params import ParamSpec
from .errors import ConfigError
from .node import NodeState
from .records import atomic_write
from .server import ServerState

CHECKPOINT = "checkpoint.npz"


def _put(arrays: dict[str, np.ndarray], prefix: str, tensors: list[np.ndarray] | None) -> bool:
    if tensors is None:
        return False
    for i, t in enumerate(tensors):
        arrays[f"{prefix}/{i}"] = t
    return True


def _get(arrays, prefix: str, count: int) -> list[np.ndarray]:
    return [np.array(arrays[f"{prefix}/{i}"]) for i in range(count)]


def save_checkpoint(run_dir: Path, server: ServerState, nodes: dict[int, NodeState]) -> None:
    """Write the server's and the nodes' state atomically to `run_dir/checkpoint.npz`."""
    arrays: dict[str, np.ndarray] = {}
    _put(arrays, "weights", server.weights)
    _put(arrays, "w0", server.w0)
    for version, mask in server.history.items():
        _put(arrays, f"history/{version}", mask)
    node_meta = {}
    for n, st in nodes.items():
        node_meta[str(n)] = {
            "version": st.version, "has_mask": st.mask is not None, "has_w0": st.w0 is not None,
            "local": _put(arrays, f"node/{n}/local", st.local), "residual": _put(arrays, f"node/{n}/residual", st.residual),
        }
    meta = {
        "version": server.version, "history": sorted(server.history), "next_step": server.next_step,
        "mask_done": server.mask_done, "bytes_up": server.bytes_up, "bytes_down": server.bytes_down,
        "node_version": {str(k): v for k, v in server.node_version.items()}, "w0_sent": sorted(server.w0_sent),
        "nodes": node_meta,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(run_dir / CHECKPOINT, buf.getvalue())


def load_checkpoint(run_dir: Path, spec: ParamSpec) -> tuple[ServerState, dict[int, NodeState]]:
    """Read a checkpoint written by `save_checkpoint` for a model described by `spec`."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} has no {CHECKPOINT}; it cannot be resumed (was it written by mpfl run?)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(arrays["meta"].tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{str(path)!r} is not a readable checkpoint: {exc}") from None
    n_all, n_prunable = len(spec.names), len(spec.prunable)
    history = {v: [a.astype(bool) for a in _get(arrays, f"history/{v}", n_prunable)] for v in meta["history"]}
    weights, w0 = _get(arrays, "weights", n_all), _get(arrays, "w0", n_all)
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
            local=_get(arrays, f"node/{n}/local", n_all) if m["local"] else None,
            residual=_get(arrays, f"node/{n}/residual", n_prunable) if m["residual"] else None,
        )
    return server, nodes
