"""The in-process simulator: every node in one process, one shared model, real encoded messages.

Nodes are `mpfl.node.Node` objects and the server is `mpfl.server.Server`, exactly as on
Flower; only the transport differs: bodies are handed to `Node.handle` directly, so the
bytes counted are the bytes Flower would carry. With more than one worker (`workers` > 1, or 0 on a
CPU with several cores: `mpfl.parallel.worker_count`) the nodes run in worker processes, with the
same results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT, save_checkpoint
from .config import Config, FaultConfig, Options
from .core.history import MaskHistory
from .core.params import Mask, Weights
from .errors import ConfigError
from .experiment import Experiment
from .files import remove_stale_temps
from .interrupts import deferred_interrupts
from .locks import RunLock
from .methods import method_of
from .node import Node, build_nodes, deliver, find_mask, make_trainer
from .parallel import NodePool, refuse_in_a_starting_worker, worker_count
from .protocol import NodeFailure, Reply, RoundRecord
from .records import RunDir, RunSummary, check_resumable_dir, check_run_dir, finish_run, make_run_dir, removed_if_unused
from .resume import check_resumable, checkpoint_run, load_resumed, plugin_changes, restart
from .seeds import POOLED, Stream, rng
from .server import Server


class InProcessTransport:
    """Delivers bodies by calling each node's handler, here or (with a `pool`) in worker processes."""

    def __init__(self, nodes: Sequence[Node], pool: NodePool | None = None) -> None:
        self.nodes = {n.id: n for n in nodes}
        self.pool = pool

    def node_ids(self) -> list[int]:
        return self.pool.node_ids() if self.pool is not None else list(self.nodes)

    def exchange(self, task: str, step: int, requests: Mapping[int, Sequence[bytes]]) -> dict[int, Reply]:
        if self.pool is not None:
            return self.pool.exchange(task, step, requests)
        return deliver(self.nodes, task, step, requests)


class FaultyTransport(InProcessTransport):
    """The in-process transport with seeded faults: nodes that drop out, straggle past the
    deadline, or send corrupted or duplicated replies."""

    def __init__(self, nodes: Sequence[Node], faults: FaultConfig, seed: int, pool: NodePool | None = None) -> None:
        super().__init__(nodes, pool)
        self.faults, self.seed = faults, seed

    def exchange(self, task: str, step: int, requests: Mapping[int, Sequence[bytes]]) -> dict[int, Reply]:
        faults = self.faults
        if not any(faults.rates().values()):
            return super().exchange(task, step, requests)  # no faults: no draws
        # five uniform draws per node asked, from its own stream: drop-out, straggling, corruption,
        # duplication, and where in its first body a corrupted byte lies
        draws = {n: rng(self.seed, step, n, Stream.FAULTS).random(5) for n in requests}
        present = {n: b for n, b in requests.items() if draws[n][0] >= faults.dropout}
        replies = super().exchange(task, step, present)
        for n in requests:
            _, late, corrupt, duplicate, where = draws[n]
            if n not in present:
                replies[n] = NodeFailure("dropped out")
            elif isinstance(replies[n], NodeFailure):
                continue
            elif late < faults.straggler:
                replies[n] = NodeFailure("no reply before the deadline (straggler)")
            elif corrupt < faults.corrupt:
                body = bytearray(replies[n][0])
                body[int(where * len(body))] ^= 0xFF
                replies[n] = [bytes(body), *replies[n][1:]]
            elif duplicate < faults.duplicate:
                replies[n] = list(replies[n]) * 2
        return replies


class PooledOracle:
    """Server-side mask search on all nodes' data pooled (the `centralized` upper bound)."""

    def __init__(self, exp: Experiment, trainer) -> None:
        self.exp, self.trainer, self.data = exp, trainer, exp.pooled_data()

    def find_mask(self, start: Weights, current: Mask, density: float, step: int) -> tuple[Mask, Weights | None]:
        return find_mask(self.exp.cfg, self.trainer, self.data, start, current, density, (self.exp.cfg.seed, step, POOLED))


@dataclass
class RunResult:
    """What a run produced: its round records, summary, final weights and mask, and where it was written."""

    records: list[RoundRecord]
    summary: RunSummary
    weights: Weights
    mask: Mask
    run_dir: Path | None = None
    masks: Mapping[int, Mask] = field(default_factory=MaskHistory)
    """The consensus mask after every mask and adaptation round (0: nothing pruned), by step, changed or not."""
    options_read: frozenset[str] | None = None
    """The option keys (``--options``) the run's plug-ins looked up, in every process; None for a run resumed
    from a checkpoint, whose earlier rounds' lookups are not known."""


def simulate(cfg: Config, out: str | Path | None = None, *, on_round: Callable[[RoundRecord], None] | None = None,
             experiment: Experiment | None = None, resume: bool = False, keep_checkpoint: bool = False) -> RunResult:
    """Run `cfg` on the in-process simulator; write records (and a checkpoint per round) to `out`
    when given; with `resume`, continue the run in `out` from its last checkpoint (or from the start
    if it stopped before its first checkpoint), once the checkpoint is known to be this run's and
    written with this config (`mpfl.resume`). The run holds `out`'s lock throughout, so a second
    process is refused at once. The checkpoint is removed when the run ends, unless
    `keep_checkpoint`. Each record's `elapsed` and the summary's `wall_time` add up the seconds of
    every invocation of the run."""
    refuse_in_a_starting_worker()
    if not isinstance(cfg, Config):
        raise TypeError(f"simulate needs a mpfl.config.Config, got {type(cfg).__name__}; build one with Config(), "
                        "Config.from_toml(path) or Config().with_overrides({...})")
    if experiment is not None and (not isinstance(experiment, Experiment) or experiment.cfg != cfg):
        raise ConfigError("experiment must be Experiment.from_config(cfg) for this very cfg (it holds the data split, "
                          "model and initial weights the run trains); build it from cfg, or leave it out")
    if out is None:
        if resume:
            raise ConfigError("resuming a run needs its run directory")
        return _simulate(cfg, None, on_round, experiment, resume, keep_checkpoint)
    out = Path(out)
    created = False
    if resume:
        check_resumable_dir(out)
    else:
        check_run_dir(out)
        experiment = experiment or Experiment.from_config(cfg)  # bad input stops before any folder is made
        created = not out.exists()
        make_run_dir(out)
    with removed_if_unused(out, made=created), RunLock(out):
        if resume:
            remove_stale_temps(out)
        return _simulate(cfg, out, on_round, experiment, resume, keep_checkpoint)


def _simulate(cfg: Config, out: Path | None, on_round: Callable[[RoundRecord], None] | None, experiment: Experiment | None,
              resume: bool, keep_checkpoint: bool) -> RunResult:
    """`simulate` once the run directory (if any) is locked."""
    started = time.perf_counter()
    Options.read.clear()  # the option keys this run's plug-ins look up, from here on
    meta = check_resumable(out, cfg) if resume else None
    exp = experiment or Experiment.from_config(cfg)
    steps = len(method_of(cfg).plan())
    server_state, node_states, records, identity = None, {}, [], {}
    changed = plugin_changes(meta, cfg)
    if meta is not None:
        server_state, node_states, records, identity = load_resumed(out, cfg, exp.spec, exp.w0, meta, steps)
    pool, workers = None, worker_count(cfg)
    if workers > 1:  # started before anything is written, so that a worker's set-up error leaves no run behind
        pool = NodePool(cfg, exp.dataset.to(torch.device("cpu")), node_states, workers)  # data on the host, shared
    try:
        run_dir = RunDir(out, cfg, resume=resume) if out is not None else None
        if meta is not None:
            run_dir.rewrite(records)
        elif run_dir is not None:
            identity = restart(out, cfg)
            if resume:
                run_dir.rewrite([])
        earlier = records[-1].get("elapsed", 0.0) if records else 0.0
        nodes = [] if pool is not None else build_nodes(cfg, exp, range(cfg.nodes), node_states)
        transport = FaultyTransport(nodes, cfg.faults, cfg.seed, pool)
        server: Server

        def record(r: dict) -> None:
            r["elapsed"] = earlier + time.perf_counter() - started
            records.append(r)
            if run_dir is not None:
                with deferred_interrupts():
                    run_dir.log(r)
                    save_checkpoint(run_dir.path, server.state,
                                    pool.states() if pool is not None else {n.id: n.state for n in nodes},
                                    checkpoint_run(identity, cfg, records, changed), spec=exp.spec)
            if on_round is not None:
                on_round(r)

        oracle = PooledOracle(exp, make_trainer(cfg, exp.model, exp.spec)) if method_of(cfg).needs_pooled_data else None
        server = Server(cfg, exp.spec, exp.w0, transport, evaluate=exp.evaluate, oracle=oracle, on_round=record,
                        state=server_state, clear=exp.cleared)
        server.run()
        if pool is not None:
            Options.read.update(pool.options_read())
    finally:
        if pool is not None:
            pool.close()
    summary = finish_run(exp, run_dir, server.state.weights, server.state.mask, records,
                         earlier + time.perf_counter() - started,
                         {"limited_counts": server.limited_counts(), **({"plugin_changes": changed} if changed else {})})
    if run_dir is not None and not keep_checkpoint:
        (run_dir.path / CHECKPOINT).unlink(missing_ok=True)
    state = server.state
    return RunResult(records, summary, state.weights, state.mask, run_dir.path if run_dir else None, state.history,
                     frozenset(Options.read) if meta is None else None)
