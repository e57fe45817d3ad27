"""The work behind the Flower ClientApp: build what a SuperNode needs and run `mpfl.node.Node` on it.

A process keeps what it can between messages (`prepare`): the run's `Experiment` (data split,
model, initial weights) and trainer, by run config, for the most recent runs;
the dataset itself comes memory-mapped from the cache (`mpfl.datacache`). The node's own state
travels in Flower's ``context.state`` (`save_state`, `load_state`), so nothing a run needs
depends on what a process kept: a fresh process gives the same replies, byte for byte.

`handle` runs in the ClientApp's process (Flower's simulation engine, tests) or in the warm
node process behind it (`mpfl.flower.warm`, deployments); either way it returns the reply's
content and how long each part took.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .. import codec
from ..config import Config
from ..core.training import LocalTrainer
from ..core.training import evaluate as evaluate_weights
from ..datacache import load_cached
from ..errors import MpflError, PayloadError
from ..experiment import Experiment, set_threads
from ..node import Node, NodeState, make_trainer, release, steps_of
from ..protocol import NodeFailure, Step
from .payload import EVALUATE, METRICS, pack, step_of, unpack
from .settings import ConfigValue, NodeSettings, flower_wording, from_run_config, node_config, node_settings, with_local_init

STATE = "mpfl.node"
KEPT_RUNS = 2
"""How many runs' experiments a process keeps (a SuperNode mostly serves one run at a time)."""


@dataclass
class Prepared:
    """What the nodes of a run need for every message: the run's config (with the SuperNode's data
    dir), the experiment, a trainer and the run's plan, shared by the partitions one process serves
    (as in the simulator, where one trainer and one plan serve every node)."""

    cfg: Config
    exp: Experiment
    trainer: LocalTrainer
    steps: Mapping[int, Step]


_kept: OrderedDict[str, Prepared] = OrderedDict()


def prepare(run_config: Mapping[str, ConfigValue], node_cfg: Mapping[str, ConfigValue]) -> tuple[Prepared, NodeSettings]:
    """The node's view of the run, built once per process and run (Flower's simulation engine serves
    many partitions from one process), and the SuperNode's partition and settings."""
    cfg, _ = from_run_config(with_local_init(run_config, node_cfg))
    where = node_settings(node_cfg, cfg)
    cfg = node_config(cfg, where)
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    if key in _kept:
        _kept.move_to_end(key)
        set_threads(cfg)
        return _kept[key], where
    data = cfg.data
    exp = Experiment.from_config(cfg, load_cached(data.dataset, data.data_dir).take(data.train_samples,
                                                                                   data.test_samples))
    _kept[key] = Prepared(cfg, exp, make_trainer(cfg, exp.model, exp.spec), steps_of(cfg))
    while len(_kept) > KEPT_RUNS:
        _kept.popitem(last=False)
    return _kept[key], where


def handle(run_config: Mapping[str, ConfigValue], node_cfg: Mapping[str, ConfigValue], state: RecordDict,
           task: str, content: RecordDict) -> tuple[RecordDict | NodeFailure, dict[str, float]]:
    """Run one message: node task `task` (or the federated evaluation for ``evaluate``) on the
    request's content, updating the node's `state`; return the reply's content (or the node's
    failure) and the seconds spent preparing (``setup``) and handling it (``node``)."""
    started = time.perf_counter()
    try:
        prepared, where = prepare(run_config, node_cfg)
    except MpflError as exc:  # missing data, a bad node config: the reason, in Flower's terms, for the server's log
        return NodeFailure(f"node could not prepare the run: {flower_wording(str(exc), node=True)}"), \
            {"setup": time.perf_counter() - started, "node": 0.0}
    ready = time.perf_counter()
    pid = where.partition_id
    reply = _evaluate(prepared, pid, content) if task == EVALUATE else _task(prepared, pid, task, content, state)
    return reply, {"setup": ready - started, "node": time.perf_counter() - ready}


def _task(prepared: Prepared, pid: int, task: str, content: RecordDict, state: RecordDict) -> RecordDict | NodeFailure:
    """`Node.handle` of partition `pid` on the request's bodies, with the node's state loaded from and saved to `state`."""
    exp = prepared.exp
    node = Node(pid, prepared.cfg, prepared.trainer, exp.node_data(pid), load_state(state), w0=exp.w0,
                steps=prepared.steps)
    try:
        step = step_of(content)
        reply = node.handle(task, step, unpack(content))
        release([node], step)
    except PayloadError as exc:
        reply = NodeFailure(f"node rejected the request: {exc}")
    finally:
        save_state(state, node.state)
    return reply if isinstance(reply, NodeFailure) else pack(reply)


def _evaluate(prepared: Prepared, pid: int, content: RecordDict) -> RecordDict | NodeFailure:
    """Accuracy and loss of the weights in the request on partition `pid`'s validation split."""
    exp = prepared.exp
    try:
        bodies = unpack(content)
        if len(bodies) != 1:
            raise PayloadError(f"an evaluation request carries 1 body, got {len(bodies)}")
        weights = codec.decode_sparse(bodies[0], exp.spec.shapes, round=step_of(content)).tensors
    except PayloadError as exc:  # as for a task: the reason reaches the server, not Flower's generic error
        return NodeFailure(f"node rejected the request: {exc}")
    data = exp.node_data(pid)
    accuracy, loss = evaluate_weights(exp.model, exp.spec, weights, data.x[data.val], data.y[data.val])
    return RecordDict({METRICS: MetricRecord({"accuracy": accuracy, "loss": loss, "num-examples": int(data.val.numel())})})


def save_state(state: RecordDict, node: NodeState) -> None:
    """Store a node's state in ``context.state``: tensors as ArrayRecords, counters in a ConfigRecord."""
    counters = ConfigRecord()
    for f in fields(NodeState):
        value, key = getattr(node, f.name), f"{STATE}.{f.name}"
        if isinstance(value, int):
            counters[f.name] = value
        elif value is None:
            state.pop(key, None)
        else:
            state[key] = ArrayRecord(numpy_ndarrays=[np.asarray(v) for v in value])
    state[STATE] = counters


def load_state(state: RecordDict) -> NodeState:
    """The node state saved by `save_state` (a fresh state on the first message of a run)."""
    node = NodeState()
    counters = state.config_records.get(STATE)
    for f in fields(NodeState):
        key = f"{STATE}.{f.name}"
        if counters is not None and f.name in counters:
            setattr(node, f.name, counters[f.name])
        elif key in state.array_records:
            setattr(node, f.name, state.array_records[key].to_numpy_ndarrays())
    return node
