"""The Flower ClientApp: every SuperNode runs the simulator's `mpfl.node.Node` on its partition.

Flower starts the ClientApp afresh for each message, so each handler rebuilds the run's
`Experiment` from the run config (the same data split, model and plan as the ServerApp)
and restores the node's state from ``context.state``. The SuperNode's node config says
which partition it holds: ``partition-id``, ``num-partitions`` and optionally ``data-dir``.
The partitions the run config makes malicious (``faults.malicious``) run their attack as
on the simulator, so attack studies give the same results on both runners. Each node task
(`mpfl.node.NODE_TASKS`, plug-ins' tasks included) is a ``train.<task>`` message handler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from .. import codec
from ..codec import Kind
from ..config import Config
from ..core.training import evaluate as evaluate_weights
from ..errors import PayloadError
from ..experiment import Experiment
from ..node import NODE_TASKS, Node, make_trainer
from ..protocol import NodeFailure
from .payload import METRICS, load_state, pack, partition_reply, save_state, step_of, unpack
from .settings import NodeSettings, from_run_config, node_config, node_settings

app = ClientApp()


def _setup(context: Context) -> tuple[Config, NodeSettings]:
    """This SuperNode's view of the run: the run's config with its data dir, and its partition."""
    cfg, _ = from_run_config(context.run_config)
    where = node_settings(context.node_config, cfg)
    return node_config(cfg, where), where


@app.query("partition")
def partition(message: Message, context: Context) -> Message:
    """Tell the ServerApp which partition this SuperNode holds, once its node config fits the run."""
    _, where = _setup(context)
    return partition_reply(message, where.partition_id)


def _task_handler(task: str) -> Callable[[Message, Context], Message]:
    """A handler for ``train.<task>`` messages that runs `Node.handle` on the request's bodies."""

    def handle(message: Message, context: Context) -> Message:
        cfg, where = _setup(context)
        exp = Experiment.from_config(cfg)
        node = Node(where.partition_id, cfg, make_trainer(cfg, exp.model, exp.spec), exp.node_data(where.partition_id),
                    load_state(context.state), w0=exp.w0)
        try:
            reply = node.handle(task, step_of(message.content), unpack(message.content))
        except PayloadError as exc:
            reply = NodeFailure(f"node rejected the request: {exc}")
        finally:
            save_state(context.state, node.state)
        if isinstance(reply, NodeFailure):
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reply.reason), reply_to=message)
        return Message(pack(reply), reply_to=message)

    return handle


_handled: set[str] = set()


def _register_tasks() -> None:
    """A ``train.<task>`` handler for every node task not yet handled."""
    for task in NODE_TASKS:
        if task not in _handled:
            app.train(task)(_task_handler(task))
            _handled.add(task)


@app.lifespan()
def lifespan(context: Context) -> Iterator[None]:
    """Before each message: import the run's plug-ins (building its config does) and handle their tasks."""
    from_run_config(context.run_config)
    _register_tasks()
    yield


_register_tasks()


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Accuracy and loss of the weights in the request on this node's validation split."""
    cfg, where = _setup(context)
    exp = Experiment.from_config(cfg)
    bodies = unpack(message.content)
    if len(bodies) != 1:
        raise PayloadError(f"an evaluation request carries 1 body, got {len(bodies)}")
    weights = codec.decode_dense(bodies[0], Kind.WEIGHTS, exp.spec.shapes, round=step_of(message.content)).tensors
    data = exp.node_data(where.partition_id)
    accuracy, loss = evaluate_weights(exp.model, exp.spec, weights, data.x[data.val], data.y[data.val])
    metrics = MetricRecord({"accuracy": accuracy, "loss": loss, "num-examples": int(data.val.numel())})
    return Message(RecordDict({METRICS: metrics}), reply_to=message)
