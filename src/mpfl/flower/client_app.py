"""The Flower ClientApp: every SuperNode runs the simulator's `mpfl.node.Node` on its partition.

The SuperNode's node config says which partition it holds: ``partition-id``,
``num-partitions``, optionally ``data-dir`` and ``keep-warm``. Each node task
(`mpfl.node.NODE_TASKS`, plug-ins' tasks included) is a ``train.<task>`` message handler;
``evaluate`` evaluates the final weights on the node's validation split. The node's state
lives in ``context.state`` between messages.

Flower starts a new ClientApp process for every message of a deployment, so this module
imports neither torch nor the node code: it forwards each message to the SuperNode's warm node
process (`mpfl.flower.warm`), which keeps them loaded, and does the work itself
(`mpfl.flower.node_runtime`) only where the process lives on (Flower's simulation engine) or no
warm process can run. The partitions the run config makes malicious (``faults.malicious``) run
their attack as on the simulator. Every reply carries a ``timing`` record: where the node's time
went (`reply_timing`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from ..protocol import BUILTIN_TASKS, NodeFailure
from . import warm
from .payload import EVALUATE, TIMING, partition_reply
from .settings import NodeSettings, from_run_config, node_settings, with_local_init

_IMPORTED = time.time()
app = ClientApp()
_first_message = True


def _settings(context: Context) -> NodeSettings:
    """This SuperNode's partition and options, once its node config fits the run."""
    cfg, _ = from_run_config(with_local_init(context.run_config, context.node_config))
    return node_settings(context.node_config, cfg)


@app.query("partition")
def partition(message: Message, context: Context) -> Message:
    """Tell the ServerApp which partition this SuperNode holds, once its node config fits the run (and
    have the warm node process load torch in the meantime)."""
    settings = _settings(context)
    if warm.enabled(settings.keep_warm):
        warm.prestart(context, settings.keep_warm)
    return partition_reply(message, settings.partition_id)


def run_node(context: Context, task: str, content: RecordDict) -> tuple[RecordDict | NodeFailure, dict[str, float]]:
    """Node task `task` (or ``evaluate``) on a request's content: in the warm node process when this
    process lives for one message, else here. The reply's content or the node's failure, and timing."""
    keep_warm = _settings(context).keep_warm
    if warm.enabled(keep_warm) and (result := warm.forward(context, task, content, keep_warm)) is not None:
        return result
    started = time.perf_counter()
    from .node_runtime import handle  # torch and the node code: only in a process that does the work

    reply, timing = handle(context.run_config, context.node_config, context.state, task, content)
    return reply, {**timing, "import_node": time.perf_counter() - started - timing["setup"] - timing["node"]}


def reply_timing(handler_s: float, timing: dict[str, float]) -> MetricRecord:
    """Where a node's time went: ``process`` (from the start of this process until this module was
    imported: Python, Flower and mpfl's light modules; only for the first message of a process), then
    the seconds of the message's handler (``handler``), within it of preparing the run's data and
    model (``setup``) and of the node's work (``node``: decoding, training, encoding)."""
    global _first_message
    started = _process_start_time() if _first_message else None
    _first_message = False
    return MetricRecord({**timing, "handler": handler_s,
                         "process": max(0.0, _IMPORTED - started) if started is not None else 0.0})


def _process_start_time() -> float | None:
    """When this process started (seconds since the epoch), where the system says (Linux)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _handler(task: str) -> Callable[[Message, Context], Message]:
    """The handler of ``train.<task>`` (or ``evaluate``) messages: the node's reply, or an error
    reply with the reason the node gave none."""

    def handle(message: Message, context: Context) -> Message:
        started = time.perf_counter()
        reply, timing = run_node(context, task, message.content)
        if isinstance(reply, NodeFailure):
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reply.reason), reply_to=message)
        reply[TIMING] = reply_timing(time.perf_counter() - started, timing)
        return Message(reply, reply_to=message)

    return handle


_handled: set[str] = set()


def _register_tasks() -> None:
    """A ``train.<task>`` handler for every node task not yet handled: the built-in ones, and those
    plug-ins registered (through `mpfl.node`, which they imported to do so)."""
    node = sys.modules.get("mpfl.node")
    for task in (*BUILTIN_TASKS, *(node.NODE_TASKS.names() if node is not None else ())):
        if task not in _handled:
            app.train(task)(_handler(task))
            _handled.add(task)


@app.lifespan()
def lifespan(context: Context) -> Iterator[None]:
    """Before each message: import the run's plug-ins (building its config does) and handle their tasks."""
    from_run_config(with_local_init(context.run_config, context.node_config))
    _register_tasks()
    yield


_register_tasks()
app.evaluate()(_handler(EVALUATE))
