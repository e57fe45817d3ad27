"""What the server and the nodes agree on without sending it: rounds, tasks and the transport.

Both sides derive the same round plan from the run's config (`Method.plan`), so a request
only needs its task name, its step number and its encoded bodies. A runner supplies a
`Transport` that delivers bodies to nodes and brings back their replies: in process for the
simulator, over Flower's grid for deployments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

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
        weights): the node's fixed count, bounded (`Server.bounded_count`), never a raw claim."""
        return [self.counts[node] for node in self.replies]


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
