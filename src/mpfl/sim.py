"""The in-process simulator: every node in one process, one shared model, real encoded messages.

Nodes are `mpfl.node.Node` objects and the server is `mpfl.server.Server`, exactly as on
Flower; only the transport differs: bodies are handed to `Node.handle` directly, so the
bytes counted are the bytes Flower would carry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .config import Config
from .core.params import Mask, Weights
from .errors import PayloadError
from .experiment import Experiment
from .node import Node, find_mask, make_trainer
from .protocol import NodeFailure, Reply
from .records import RunDir, check_run_dir, summarize
from .server import Server


class InProcessTransport:
    """Delivers bodies by calling each node's handler; a node's PayloadError becomes a failed reply."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = {n.id: n for n in nodes}

    def node_ids(self) -> list[int]:
        return list(self.nodes)

    def exchange(self, task: str, step: int, requests: Mapping[int, Sequence[bytes]]) -> dict[int, Reply]:
        replies: dict[int, Reply] = {}
        for node_id, bodies in requests.items():
            try:
                replies[node_id] = self.nodes[node_id].handle(task, step, bodies)
            except PayloadError as exc:
                replies[node_id] = NodeFailure(f"node rejected the request: {exc}")
        return replies


class PooledOracle:
    """Server-side mask search on all nodes' data pooled (the `centralized` upper bound)."""

    def __init__(self, exp: Experiment, trainer) -> None:
        self.exp, self.trainer, self.data = exp, trainer, exp.pooled_data()

    def find_mask(self, start: Weights, current: Mask, density: float, step: int) -> tuple[Mask, Weights | None]:
        return find_mask(self.exp.cfg, self.trainer, self.data, start, current, density, (self.exp.cfg.seed, step, 2**31 - 1))


@dataclass
class RunResult:
    """What a run produced: its round records, summary, final weights and mask, and where it was written."""

    records: list[dict]
    summary: dict
    weights: Weights
    mask: Mask
    run_dir: Path | None = None
    masks: dict[int, Mask] = field(default_factory=dict)


def simulate(cfg: Config, out: str | Path | None = None, *, on_round: Callable[[dict], None] | None = None,
             experiment: Experiment | None = None) -> RunResult:
    """Run `cfg` on the in-process simulator; write records to `out` when given."""
    started = time.perf_counter()
    if out is not None:
        check_run_dir(Path(out))
    exp = experiment or Experiment.from_config(cfg)
    run_dir = RunDir(out, cfg) if out is not None else None
    trainer = make_trainer(cfg, exp.model, exp.spec)
    nodes = [Node(i, cfg, trainer, exp.node_data(i)) for i in range(cfg.nodes)]
    records: list[dict] = []

    def record(r: dict) -> None:
        records.append(r)
        if run_dir is not None:
            run_dir.log(r)
        if on_round is not None:
            on_round(r)

    oracle = PooledOracle(exp, trainer) if cfg.method == "centralized" else None
    server = Server(cfg, exp.spec, exp.w0, InProcessTransport(nodes), evaluate=exp.evaluate, oracle=oracle, on_round=record)
    server.run()
    summary = summarize(cfg, records, time.perf_counter() - started)
    if run_dir is not None:
        run_dir.finish(summary)
    st = server.state
    return RunResult(records, summary, st.weights, st.mask, run_dir.path if run_dir else None, dict(st.history))
