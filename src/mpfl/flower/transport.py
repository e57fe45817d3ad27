"""The `Transport` of the Flower runner: the Server's requests as Messages over a Flower Grid.

Flower addresses SuperNodes by node ids it assigns when they connect; mpfl addresses nodes
by partition id. `FlowerTransport.connect` asks every connected SuperNode for its partition
id once, then `exchange` maps between the two. A node that is no longer connected, replies
with an error, or does not reply before the round's timeout becomes a `NodeFailure` with
the reason, which the Server records in the round's ``dropped``; a request that never left
(its node was already gone, or the SuperLink refused it) is marked as not sent, so its bytes
are not counted.

Misconfigured SuperNodes never stop a run: a SuperNode whose node config does not fit the run,
and every SuperNode of a partition claimed twice, are left out (`left_out`), and the run starts
with the others if at least ``min_nodes`` remain.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from typing import TypeVar

from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from ..errors import PayloadError, RoundError
from ..protocol import NodeFailure, Reply
from .payload import EVALUATE, QUERY_PARTITION, message_type, metrics_of, pack, partition_of, timing_of, unpack

K, T = TypeVar("K"), TypeVar("T")
POLL_S = 0.2
"""Seconds between two pulls for replies (Flower's own `send_and_receive` waits 3 s between pulls)."""
METRIC_BYTES = 8
"""Bytes of one number in an evaluation reply's MetricRecord (an int64 or a float64)."""


def _push(grid: Grid, messages: list[Message]) -> list[str | None]:
    """Push `messages`; the message id of each, or None for one the SuperLink did not accept."""
    ids = list(grid.push_messages(messages))
    if len(ids) == len(messages):
        return ids
    accepted = set(ids)
    return [m.metadata.message_id if m.metadata.message_id in accepted else None for m in messages]


def _pull(grid: Grid, ids: set[str], timeout: float) -> dict[str, Message]:
    """Replies to the messages `ids`, by the id they reply to, pulled every `POLL_S` s for at most `timeout` s."""
    deadline, replies = time.monotonic() + timeout, {}
    waiting = set(ids)
    while waiting:
        for reply in grid.pull_messages(waiting):
            replies[reply.metadata.reply_to_message_id] = reply
            waiting.discard(reply.metadata.reply_to_message_id)
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    return replies


CLIENT_APP_EXCEPTION = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", re.DOTALL)
"""How Flower reports an exception its ClientApp raised: ``<class 'ZeroDivisionError'>:<'division by zero'>``."""


REASON_CHARS = 1000
"""The most of an error reply's reason a record and the log keep: the node chooses what it sends."""


def error_reason(reason: str | None) -> str:
    """An error reply's reason as a log line reads it: a ClientApp's exception as ``Type: message``,
    on one line of printable characters (a line break shown as ``\\n``, so that a node cannot write
    lines of the server's log), at most `REASON_CHARS` of them."""
    raised = CLIENT_APP_EXCEPTION.fullmatch((reason or "").strip())
    text = f"{raised[1]}: {raised[2]}" if raised else (reason or "no reason given")
    text = "".join(char if char.isprintable() else "\\n" if char == "\n" else " " for char in text)  # one log line
    return text if len(text) <= REASON_CHARS else f"{text[:REASON_CHARS]}... ({len(text)} characters)"


def send(grid: Grid, messages: Mapping[K, Message], timeout: float) -> dict[K, Message | NodeFailure]:
    """Send `messages` and wait up to `timeout` seconds; map each key to its reply or the failure."""
    keys, sent = list(messages), list(messages.values())
    if not sent:
        return {}
    ids = _push(grid, sent)
    replies = _pull(grid, {i for i in ids if i is not None}, timeout)
    out: dict[K, Message | NodeFailure] = {}
    for key, message_id in zip(keys, ids):
        reply = replies.get(message_id) if message_id is not None else None
        if message_id is None:
            out[key] = NodeFailure("the SuperLink did not accept the message", sent=False)
        elif reply is None:
            out[key] = NodeFailure(f"no reply within {timeout:g} s")
        elif reply.has_error():
            out[key] = NodeFailure(f"error reply (Flower code {reply.error.code}): {error_reason(reply.error.reason)}")
        else:
            out[key] = reply
    return out


def _content(reply: Message | NodeFailure, read: Callable[[RecordDict], T], malformed: str) -> T | NodeFailure:
    """A reply's content as `read` takes it, or the failure: the node's own, or `malformed` with why `read` refused it."""
    if isinstance(reply, NodeFailure):
        return reply
    try:
        return read(reply.content)
    except PayloadError as exc:
        return NodeFailure(f"{malformed}: {exc}")


class FlowerTransport:
    """Delivers the Server's bodies to SuperNodes by pushing Messages and pulling their replies."""

    def __init__(self, grid: Grid, round_timeout: float) -> None:
        self.grid, self.timeout = grid, round_timeout
        self.flower_ids: dict[int, int] = {}
        self.left_out: list[dict] = []
        self.timing: dict[int, dict[str, float]] = {}
        self.exchange_time = 0.0

    def connect(self, nodes: int, min_nodes: int, timeout: float) -> list[int]:
        """Wait (at most `timeout` s) for `nodes` SuperNodes and learn their partition ids; return the
        partitions that did not join. SuperNodes that do not fit the run are left out (`left_out`);
        RoundError if fewer than `min_nodes` partitions joined."""
        deadline = time.monotonic() + timeout
        while len(ids := sorted(self.grid.get_node_ids())) < nodes and time.monotonic() < deadline:
            time.sleep(1.0)
        log(INFO, "%d SuperNode(s) connected; asking for their partition ids", len(ids))
        queries = {nid: Message(RecordDict(), dst_node_id=nid, message_type=QUERY_PARTITION, ttl=self.timeout)
                   for nid in ids}
        claims: dict[int, list[int]] = {}
        for nid, reply in send(self.grid, queries, self.timeout).items():
            try:
                pid = partition_of(reply)
                if not 0 <= pid < nodes:
                    raise PayloadError(f"partition-id {pid} is outside 0..{nodes - 1}")
            except PayloadError as exc:
                self._leave_out(None, nid, str(exc))
                continue
            claims.setdefault(pid, []).append(nid)
        for pid, nids in sorted(claims.items()):
            if len(nids) == 1:
                self.flower_ids[pid] = nids[0]
                continue
            for nid in nids:
                others = ", ".join(str(n) for n in nids if n != nid)
                self._leave_out(pid, nid, f"partition-id {pid} is also claimed by SuperNode {others}; "
                                          "give every SuperNode its own partition-id")
        missing = [p for p in range(nodes) if p not in self.flower_ids]
        if len(self.flower_ids) < min_nodes:
            waited = f" within {timeout:g} s" if len(ids) < nodes else ""  # all came: none was waited for
            detail = "; ".join(f"SuperNode {e['supernode']}: {e['reason']}" for e in self.left_out)
            raise RoundError(f"only {len(self.flower_ids)} of {nodes} partitions joined, fewer than min_nodes = "
                             f"{min_nodes}: {len(ids)} SuperNode(s) connected{waited}"
                             + (f", and these were left out: {detail}" if detail else ""))
        if missing:
            log(WARNING, "running without partition(s) %s", missing)
        return missing

    def _leave_out(self, pid: int | None, nid: int, reason: str) -> None:
        """Record and log a SuperNode that does not take part in the run."""
        log(WARNING, "left out of the run: SuperNode %d: %s", nid, reason)
        self.left_out.append({"node": pid, "supernode": nid, "step": 0, "phase": "connect", "reason": reason})

    def take_timing(self) -> dict:
        """The round's timing for its record (the exchanges' wall time, each node's own account), reset
        for the next round."""
        timing = {"exchange_time": self.exchange_time, "nodes": {str(pid): t for pid, t in sorted(self.timing.items())}}
        self.exchange_time, self.timing = 0.0, {}
        return timing

    def node_ids(self) -> list[int]:
        """The partition ids that joined the run (a disconnected one fails in `exchange`)."""
        return sorted(self.flower_ids)

    def exchange(self, task: str, step: int, requests: Mapping[int, Sequence[bytes]]) -> dict[int, Reply]:
        """Send each partition its bodies as a ``train.<task>`` message; collect bodies or failures.
        The exchange's wall time and the nodes' own account of where their time went are kept for
        the round's record (`take_timing`)."""
        started = time.perf_counter()
        replies, messages = self._messages(message_type(task), step, requests)
        sent = send(self.grid, messages, self.timeout)
        self.exchange_time += time.perf_counter() - started
        for pid, reply in sent.items():
            replies[pid] = _content(reply, unpack, "malformed reply")
            if not isinstance(reply, NodeFailure) and (timing := timing_of(reply.content)) is not None:
                self.timing[pid] = timing
        return replies

    def evaluate(self, body: bytes, step: int) -> dict[int, dict[str, float] | NodeFailure]:
        """Ask every partition to evaluate the weights in `body` on its validation split."""
        failures, messages = self._messages(EVALUATE, step, {pid: [body] for pid in self.node_ids()})
        results: dict[int, dict[str, float] | NodeFailure] = dict(failures)
        for pid, reply in send(self.grid, messages, self.timeout).items():
            results[pid] = _content(reply, metrics_of, "malformed evaluation reply")
        return results

    def _messages(self, mtype: str, step: int, requests: Mapping[int, Sequence[bytes]]
                  ) -> tuple[dict[int, NodeFailure], dict[int, Message]]:
        """One message per connected partition; a failure, never sent, for each partition no longer connected."""
        connected = set(self.grid.get_node_ids())
        failures: dict[int, NodeFailure] = {}
        messages: dict[int, Message] = {}
        for pid, bodies in requests.items():
            nid = self.flower_ids[pid]
            if nid in connected:
                messages[pid] = Message(pack(bodies, step), dst_node_id=nid, message_type=mtype,
                                        group_id=str(step), ttl=self.timeout)
            else:
                failures[pid] = NodeFailure(f"SuperNode {nid} is no longer connected", sent=False)
        return failures, messages
