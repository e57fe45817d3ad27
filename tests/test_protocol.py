"""The transport contract's helpers: replies taken in the order of the requests, whatever their arrival order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mpfl.protocol import NodeFailure, in_request_order


def test_each_reply_is_handed_on_once_it_and_every_earlier_node_have_arrived():
    events = []

    def arrivals():
        for node in (2, 0, 1):
            events.append(f"arrives {node}")
            yield node, [bytes([node])]

    for node, reply in in_request_order([0, 1, 2], arrivals()):
        events.append(f"taken {node}")
        assert reply == [bytes([node])]
    assert events == ["arrives 2", "arrives 0", "taken 0", "arrives 1", "taken 1", "taken 2"]


@given(st.lists(st.integers(0, 30), unique=True).flatmap(
    lambda nodes: st.tuples(st.just(nodes), st.permutations(nodes), st.sets(st.sampled_from(nodes) if nodes else st.nothing()))))
def test_replies_come_in_request_order_with_a_failure_for_each_node_that_never_replied(case):
    nodes, arrival, silent = case
    taken = list(in_request_order(nodes, ((n, [bytes([n])]) for n in arrival if n not in silent)))
    assert taken == [(n, NodeFailure("no reply before the deadline") if n in silent else [bytes([n])]) for n in nodes]


def test_replies_from_nodes_not_asked_are_ignored():
    assert list(in_request_order([1], [(7, [b"x"]), (1, [b"y"])])) == [(1, [b"y"])]
