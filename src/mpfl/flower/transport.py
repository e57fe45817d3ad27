"""The `Transport` of the Flower runner: the Server's requests as Messages over a Flower Grid.

Flower addresses SuperNodes by node ids it assigns when they connect; mpfl addresses nodes
by partition id. `FlowerTransport.connect` asks every connected SuperNode for its partition
id once, then `exchange` maps between the two. A node that is no longer connected, replies
with an error, or does not reply before the round's timeout becomes a `NodeFailure` with
the reason, which the Server records in the round's ``dropped``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from typing import TypeVar

from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from ..errors import ConfigError, PayloadError, RoundError
from ..protocol import NodeFailure, Reply
from .payload import EVALUATE, METRICS, QUERY_PARTITION, message_type, pack, partition_of, unpack

K = TypeVar("K")


def send(grid: Grid, messages: Mapping[K, Message], timeout: float) -> dict[K, Message | NodeFailure]:
    """Send `messages` and wait up to `timeout` seconds; map each key to its reply or the failure."""
    sent = list(messages.items())
    if not sent:
        return {}
    replies = grid.send_and_receive([m for _, m in sent], timeout=timeout)
    by_id = {r.metadata.reply_to_message_id: r for r in replies}
    out: dict[K, Message | NodeFailure] = {}
    for key, msg in sent:
        reply = by_id.get(msg.metadata.message_id)
        if reply is None:
            out[key] = NodeFailure(f"no reply within {timeout:g} s")
        elif reply.has_error():
            out[key] = NodeFailure(f"error reply (Flower code {reply.error.code}): {reply.error.reason}")
        else:
            out[key] = reply
    return out


class FlowerTransport:
    """Delivers the Server's bodies to SuperNodes with `grid.send_and_receive`."""

    def __init__(self, grid: Grid, round_timeout: float) -> None:
        self.grid, self.timeout = grid, round_timeout
        self.flower_ids: dict[int, int] = {}

    def connect(self, nodes: int, min_nodes: int, timeout: float) -> list[int]:
        """Wait (at most `timeout` s) for `nodes` SuperNodes and learn their partition ids; return the
        partitions that did not join. Raise RoundError if fewer than `min_nodes` joined."""
        deadline = time.monotonic() + timeout
        while len(ids := sorted(self.grid.get_node_ids())) < nodes and time.monotonic() < deadline:
            time.sleep(1.0)
        log(INFO, "%d SuperNode(s) connected; asking for their partition ids", len(ids))
        queries = {nid: Message(RecordDict(), dst_node_id=nid, message_type=QUERY_PARTITION, ttl=self.timeout)
                   for nid in ids}
        refused: list[str] = []
        for nid, reply in send(self.grid, queries, self.timeout).items():
            try:
                pid = partition_of(reply)
                if not 0 <= pid < nodes:
                    raise PayloadError(f"partition-id {pid} is outside 0..{nodes - 1}")
            except PayloadError as exc:
                refused.append(f"SuperNode {nid}: {exc}")
                continue
            if pid in self.flower_ids:
                raise ConfigError(f"SuperNodes {self.flower_ids[pid]} and {nid} both hold partition-id {pid}; "
                                  "give every SuperNode its own partition-id")
            self.flower_ids[pid] = nid
        for reason in refused:
            log(WARNING, "left out of the run: %s", reason)
        missing = [p for p in range(nodes) if p not in self.flower_ids]
        if len(self.flower_ids) < min_nodes:
            detail = "; ".join(refused) or f"{len(ids)} SuperNode(s) connected"
            raise RoundError(f"only {len(self.flower_ids)} of {nodes} partitions joined within {timeout:g} s, "
                             f"fewer than min_nodes = {min_nodes} ({detail})")
        if missing:
            log(WARNING, "running without partition(s) %s", missing)
        return missing

    def node_ids(self) -> list[int]:
        """The partition ids that joined the run (a disconnected one fails in `exchange`)."""
        return sorted(self.flower_ids)

    def exchange(self, task: str, step: int, requests: Mapping[int, Sequence[bytes]]) -> dict[int, Reply]:
        """Send each partition its bodies as a ``train.<task>`` message; collect bodies or failures."""
        replies, messages = self._messages(message_type(task), step, requests)
        for pid, reply in send(self.grid, messages, self.timeout).items():
            if isinstance(reply, NodeFailure):
                replies[pid] = reply
                continue
            try:
                replies[pid] = unpack(reply.content)
            except PayloadError as exc:
                replies[pid] = NodeFailure(f"malformed reply: {exc}")
        return replies

    def evaluate(self, body: bytes, step: int) -> dict[int, dict[str, float] | NodeFailure]:
        """Ask every partition to evaluate the weights in `body` on its validation split."""
        failures, messages = self._messages(EVALUATE, step, {pid: [body] for pid in self.node_ids()})
        results: dict[int, dict[str, float] | NodeFailure] = dict(failures)
        for pid, reply in send(self.grid, messages, self.timeout).items():
            if isinstance(reply, NodeFailure):
                results[pid] = reply
            elif (metrics := reply.content.metric_records.get(METRICS)) is None:
                results[pid] = NodeFailure("evaluation reply without metrics")
            else:
                results[pid] = dict(metrics)
        return results

    def _messages(self, mtype: str, step: int, requests: Mapping[int, Sequence[bytes]]
                  ) -> tuple[dict[int, NodeFailure], dict[int, Message]]:
        """One message per connected partition; a failure for each partition no longer connected."""
        connected = set(self.grid.get_node_ids())
        failures: dict[int, NodeFailure] = {}
        messages: dict[int, Message] = {}
        for pid, bodies in requests.items():
            nid = self.flower_ids[pid]
            if nid in connected:
                messages[pid] = Message(pack(bodies, step), dst_node_id=nid, message_type=mtype,
                                        group_id=str(step), ttl=self.timeout)
            else:
                failures[pid] = NodeFailure(f"SuperNode {nid} is no longer connected")
        return failures, messages
