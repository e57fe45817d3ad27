"""How mpfl's codec bodies travel in Flower records.

A request or reply holds an ArrayRecord ``bodies`` whose arrays carry the codec's bytes
unchanged (``stype = "bytes"``, one array per body, in order) and a ConfigRecord ``meta``
with the step number; a reply also carries a MetricRecord ``timing``, the node's account of
where its time went. Nothing but the codec's bytes is counted as payload, exactly as in the
simulator. This module imports neither torch nor the node code, so that a ClientApp that only
forwards messages stays light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from ..errors import PayloadError
from ..protocol import NodeFailure

BODIES, META, TIMING = "bodies", "meta", "timing"
STYPE = "bytes"
STEP = "step"
QUERY_PARTITION = "query.partition"
NODE, PARTITION_ID = "node", "partition-id"
EVALUATE, METRICS = "evaluate", "metrics"
TIMING_PARTS = ("setup", "node", "import_node", "handler", "process")
"""The parts of a reply's ``timing`` (`mpfl.flower.client_app.reply_timing`)."""


def message_type(task: str) -> str:
    """The Flower message type of an mpfl task (handled by ``@app.train(task)``)."""
    return f"train.{task}"


def pack(bodies: Sequence[bytes], step: int | None = None) -> RecordDict:
    """Message content carrying `bodies` byte for byte (and the step of a request)."""
    arrays = ArrayRecord(array_dict={str(i): Array(dtype="uint8", shape=(len(b),), stype=STYPE, data=bytes(b))
                                     for i, b in enumerate(bodies)})
    content = RecordDict({BODIES: arrays})
    if step is not None:
        content[META] = ConfigRecord({STEP: step})
    return content


def unpack(content: RecordDict) -> list[bytes]:
    """The bodies of a message, in order; anything else in their place is a PayloadError."""
    arrays = content.array_records.get(BODIES)
    if arrays is None:
        raise PayloadError(f"message has no {BODIES!r} record")
    if list(arrays.keys()) != [str(i) for i in range(len(arrays))]:
        raise PayloadError(f"bodies are not numbered 0..{len(arrays) - 1}: {list(arrays.keys())}")
    bodies = []
    for array in arrays.values():
        if array.stype != STYPE or array.dtype != "uint8" or tuple(array.shape) != (len(array.data),):
            raise PayloadError(f"a body must be raw bytes, got stype {array.stype!r}, dtype {array.dtype!r}")
        bodies.append(array.data)
    return bodies


def step_of(content: RecordDict) -> int:
    """The step number a request belongs to."""
    meta = content.config_records.get(META)
    step = meta.get(STEP) if meta is not None else None
    if not isinstance(step, int) or isinstance(step, bool):
        raise PayloadError(f"request carries no integer step number (got {step!r})")
    return step


def _non_negative(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def timing_of(content: RecordDict) -> dict[str, float] | None:
    """A reply's ``timing``, the node's own account of its seconds, kept for the round's record only:
    None (left out of the record) unless it holds only `TIMING_PARTS`, each a finite number >= 0."""
    timing = content.metric_records.get(TIMING)
    if timing is None or not set(timing) <= set(TIMING_PARTS) or not all(map(_non_negative, timing.values())):
        return None
    return {part: float(seconds) for part, seconds in timing.items()}


def metrics_of(content: RecordDict) -> dict[str, float]:
    """A federated evaluation's ``metrics``: an accuracy in [0, 1], a whole number of validation examples
    >= 0, and a loss >= 0 (infinite or NaN for a diverged model, as the server's own evaluation records
    it: only the accuracy is averaged); anything else is a PayloadError."""
    metrics = content.metric_records.get(METRICS)
    if metrics is None:
        raise PayloadError("evaluation reply without metrics")
    accuracy, loss, examples = (metrics.get(key) for key in ("accuracy", "loss", "num-examples"))
    if (set(metrics) != {"accuracy", "loss", "num-examples"} or not _non_negative(accuracy) or accuracy > 1
            or not isinstance(examples, int) or not _non_negative(examples)
            or not isinstance(loss, (int, float)) or isinstance(loss, bool) or loss < 0):
        raise PayloadError(f"evaluation metrics must be an accuracy in [0, 1], a loss >= 0 and a whole num-examples "
                           f">= 0; got {_shown(dict(metrics))}")
    return {"accuracy": float(accuracy), "loss": float(loss), "num-examples": examples}


def _shown(value: object, limit: int = 200) -> str:
    """`value`'s repr, cut to `limit` characters: a node chooses what it sends."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def partition_reply(message: Message, partition_id: int) -> Message:
    """A SuperNode's answer to the partition query."""
    return Message(RecordDict({NODE: ConfigRecord({PARTITION_ID: partition_id})}), reply_to=message)


def partition_of(reply: Message | NodeFailure) -> int:
    """The partition id a SuperNode answered with; PayloadError if it gave none."""
    if isinstance(reply, NodeFailure):
        raise PayloadError(reply.reason)
    node = reply.content.config_records.get(NODE)
    pid = node.get(PARTITION_ID) if node is not None else None
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise PayloadError(f"partition query reply has no integer {PARTITION_ID} (got {pid!r})")
    return pid
