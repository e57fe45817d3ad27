"""What the server and the nodes agree on without sending it: rounds, tasks and the transport.

Both sides derive the same round plan from the run's config (`Method.plan`), so a request
only needs its task name, its step number and its encoded bodies. A runner supplies a
`Transport` that delivers bodies to nodes and brings back their replies: in process for the
simulator, over Flower's grid for deployments.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypedDict

from . import codec

TASK_MASK, TASK_TRAIN, TASK_ADAPT, TASK_SCORES, TASK_TOPK = "mask", "train", "adapt", "scores", "topk"
BUILTIN_TASKS = (TASK_MASK, TASK_TRAIN, TASK_ADAPT, TASK_SCORES, TASK_TOPK)
"""The node tasks `mpfl.node` registers itself (plug-ins may register more)."""


@dataclass(frozen=True)
class Step:
    """One round of a run: its global number, phase, number within the phase and target density."""

    step: int
    phase: str
    index: int
    density: float


class NodeFailure(NamedTuple):
    """A node that gave no usable reply, and why. `sent` is False when the request never left
    (the node was known to be unreachable, or the transport refused the message), so that its
    bytes are not counted as sent."""

    reason: str
    sent: bool = True


Reply = Sequence[bytes] | NodeFailure


class _AlwaysRecorded(TypedDict):
    """The keys every round record has (see `RoundRecord`)."""

    step: int  # the round's number in the run's plan (mask and training rounds together, from 1)
    phase: str  # "mask" or "train"
    round: int  # the round's number within its phase, from 1
    method: str
    seed: int
    accuracy: float | None  # test accuracy of the global model after the round; None if not evaluated
    loss: float | None  # its mean test cross-entropy
    target_density: float  # the density the plan asks for after this round
    density: float  # the share of the prunable weights the consensus mask keeps
    bytes_up: int  # nodes to server, this round
    bytes_down: int  # server to nodes, this round
    cum_bytes_up: int  # so far in the run
    cum_bytes_down: int
    nodes: list[int]  # the nodes whose replies counted
    dropped: dict[str, str]  # node id -> why it was left out of the round


class RoundRecord(_AlwaysRecorded, total=False):
    """One round as `on_round` callbacks receive it and ``rounds.jsonl`` holds it: a plain dict (JSON
    as it is, and a method may add metrics of its own through `Round.metrics`) whose keys are named
    here. Bytes are those of the encoded messages the round sent."""

    time: float  # the round's wall time (s), set once it ends
    elapsed: float  # the run's wall time so far (s), over every invocation of a resumed run
    hamming: int  # mask rounds: entries the consensus mask changed
    layer_density: list[float]  # mask rounds: the share kept per prunable tensor
    agreement: float  # MPFL's mask rounds: the mean agreement of the local masks with the consensus
    vote_weights: dict[str, float]  # MPFL's mask rounds: node id -> its share of the vote
    swap_fraction: float  # adaptation rounds: the share of each layer's kept weights to swap
    swapped: int  # adaptation rounds: weights regrown (and as many dropped)
    flower: dict[str, Any]  # Flower runs: where the round's time went per node


RECORDED_BY_RUNNERS = RoundRecord.__required_keys__ | {"time", "elapsed", "flower"}
"""The record keys the server and the runners set, which a method's metrics may not replace."""


def _fits(value: object, hint: Any) -> bool:
    """Whether a JSON value has the type `hint` names (the types of `RoundRecord`, of
    `mpfl.records.RunSummary` and of the config's fields): an integer counts as a float, a boolean as
    neither, a list as a tuple."""
    if isinstance(hint, types.UnionType):
        return any(_fits(value, part) for part in typing.get_args(hint))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    return isinstance(value, hint)


def mistyped(data: dict, hints: Mapping[str, Any], prefix: str = "") -> str | None:
    """The first key of `data` whose value does not have its hint's type, as ``key = value is not type``."""
    for key, value in data.items():
        if key in hints and not _fits(value, hints[key]):
            hint = hints[key]
            named = hint.__name__ if isinstance(hint, type) and typing.get_origin(hint) is None else str(hint)
            return f"{prefix}{key} = {value!r:.40} is not {named}"
    return None


@functools.cache
def type_hints(schema: type) -> dict[str, Any]:
    """The keys and types a TypedDict names, resolved once (`typing.get_type_hints` takes about 0.5 ms)."""
    return typing.get_type_hints(schema)


def typed_dict_problem(data: object, schema: type) -> str | None:
    """Why a JSON value is not the TypedDict `schema`: not an object, a required key missing, a value
    of another type; None if it is one. Keys the schema does not name may hold anything."""
    if not isinstance(data, dict):
        return "not a JSON object"
    missing = sorted(schema.__required_keys__ - set(data))
    if missing:
        return f"no {', '.join(missing)}"
    return mistyped(data, type_hints(schema))


def record_problem(record: object) -> str | None:
    """Why a value read from a round log is not a `RoundRecord` (see `typed_dict_problem`; a dropped node
    must also be a node id); None if it is one. Keys a method adds of its own may hold any value."""
    problem = typed_dict_problem(record, RoundRecord)
    if problem is None and not all(node.isdigit() for node in record["dropped"]):
        return "a dropped node is not a node id"
    return problem


@dataclass
class Round:
    """What one exchange produced: valid decoded replies, dropped nodes with the reason, bytes, the
    weight the server gives each reply (`Server.exchange` fills `counts`), and what the method wants
    recorded about the round."""

    replies: dict[int, codec.Body] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    metrics: dict = field(default_factory=dict)
    counts: dict[int, float] = field(default_factory=dict)

    def weights(self) -> list[float]:
        """Each reply's sample count as the server weighs it, in reply order (FedAvg's and the vote's
        weights): the node's fixed count, bounded (`Server.bounded_counts`), never a raw claim."""
        return [self.counts[node] for node in self.replies]


def dropped_text(dropped: Mapping[Any, str]) -> str:
    """A round's dropped nodes as one line, each reason once with the nodes it dropped
    (``nodes 0, 2: no reply within 60 s; node 3: rejected: ...``), in the order first seen."""
    by_reason: dict[str, list[str]] = {}
    for node, reason in dropped.items():
        by_reason.setdefault(reason, []).append(str(node))
    return "; ".join(f"node{'s' if len(nodes) > 1 else ''} {', '.join(nodes)}: {reason}"
                     for reason, nodes in by_reason.items())


def bytes_sent(requests: Mapping[int, Sequence[bytes]], replies: Mapping[int, Reply]) -> int:
    """The bytes of the requests that actually left: all but those the transport reports as never sent."""
    return sum(len(body) for node, bodies in requests.items()
               if not (isinstance(reply := replies.get(node), NodeFailure) and not reply.sent) for body in bodies)


class Transport(Protocol):
    """Delivers one round's requests and collects the replies that arrive."""

    def node_ids(self) -> list[int]:
        """The partition ids of the nodes that can currently be reached."""
        ...

    def exchange(self, task: str, step: int, requests: Mapping[int, Sequence[bytes]]) -> dict[int, Reply]:
        """Send each node its bodies; return each node's reply bodies or the reason it failed
        (a `NodeFailure` with ``sent=False`` for a request that was never sent)."""
        ...
