"""End-to-end behaviour of the server, nodes and in-process transport on small MNIST slices."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import tiny_config
from mpfl import codec
from mpfl.core import masks
from mpfl.errors import ConfigError, PayloadError, RoundError, RunDirError
from mpfl.experiment import Experiment
from mpfl.methods import plan
from mpfl.node import Node, make_trainer
from mpfl.protocol import NodeFailure
from mpfl.records import lost_nodes
from mpfl.server import Server
from mpfl.sim import InProcessTransport, simulate


class Recording(InProcessTransport):
    """An in-process transport that keeps every request and reply it carried."""

    def __init__(self, nodes, fail=()):
        super().__init__(nodes)
        self.log, self.fail = [], set(fail)

    def exchange(self, task, step, requests):
        replies = super().exchange(task, step, {n: b for n, b in requests.items() if n not in self.fail})
        replies.update({n: NodeFailure("switched off") for n in self.fail if n in requests})
        self.log.append((task, step, dict(requests), dict(replies)))
        return replies


UNEVEN = {"partition": "dirichlet", "alpha": 0.05, "seed": 1}
"""A label-skewed split of tiny_config's 1500 samples whose three nodes hold 545, 248 and 557 training samples."""


def weighted_mean(tensors, sizes):
    """The sample-weighted mean sum(s * t) / sum(s) of each tensor, in float64 (the reference)."""
    assert len(set(sizes)) > 1, f"the node sizes {sizes} are equal: a plain mean would pass for the weighted one"
    return [sum(s * t.astype(np.float64) for s, t in zip(sizes, per_node)) / sum(sizes) for per_node in zip(*tensors)]


def build(cfg, fail=()):
    exp = Experiment.from_config(cfg)
    trainer = make_trainer(cfg, exp.model, exp.spec)
    nodes = [Node(i, cfg, trainer, exp.node_data(i), w0=exp.w0) for i in range(cfg.nodes)]
    transport = Recording(nodes, fail)
    records = []
    server = Server(cfg, exp.spec, exp.w0, transport, evaluate=exp.evaluate, on_round=records.append)
    return exp, server, transport, records


@pytest.fixture(scope="module")
def mpfl_run():
    """Plain FedAvg steps (no server momentum), so the server's weights are the last round's average; a
    skewed split gives the nodes clearly unequal sample counts, so a weighted and a plain mean differ."""
    cfg = tiny_config(mask_rounds=3, sparsity=0.8, server_momentum=0.0, **UNEVEN)
    exp, server, transport, records = build(cfg)
    server.run()
    return cfg, exp, server, transport, records


def test_consensus_masks_shrink_as_nested_subsets_at_the_scheduled_density(mpfl_run):
    cfg, exp, server, _, records = mpfl_run
    history = [server.state.history[v] for v in sorted(server.state.history)]
    assert len(history) == 4  # the full mask, then one per mask round
    for prev, new in zip(history, history[1:]):
        assert all(not (n & ~p).any() for p, n in zip(prev, new))
    mask_records = [r for r in records if r["phase"] == "mask"]
    for r, new in zip(mask_records, history[1:]):  # one budget over all layers (scope = global)
        assert sum(int(m.sum()) for m in new) == masks.keep_count(sum(m.size for m in new), r["target_density"])
    assert records[-1]["density"] == pytest.approx(0.2, abs=1e-3)


def test_pruned_weights_are_zero_in_the_global_model_and_every_reply(mpfl_run):
    cfg, exp, server, transport, _ = mpfl_run
    mask = server.state.mask
    for w, m in zip(exp.spec.pick(server.state.weights), mask):
        assert (w[~m] == 0).all()
    for task, _step, _requests, replies in transport.log:
        if task != "train":
            continue
        for bodies in replies.values():
            body = codec.decode_values(bodies[0], exp.spec.supports(mask))
            for w, m in zip(exp.spec.pick(body.tensors), mask):
                assert (w[~m] == 0).all()


def test_bytes_counted_equal_the_encoded_message_lengths(mpfl_run):
    _, _, _, transport, records = mpfl_run
    assert [step for _, step, _, _ in transport.log] == [r["step"] for r in records]  # one exchange per round, all recorded
    for (_task, step, requests, replies), r in zip(transport.log, records):
        assert r["step"] == step
        assert r["bytes_down"] == sum(len(b) for bodies in requests.values() for b in bodies)
        assert r["bytes_up"] == sum(len(b) for bodies in replies.values() for b in bodies)
    assert records[-1]["cum_bytes_up"] == sum(r["bytes_up"] for r in records)


def test_aggregate_is_the_sample_weighted_average_of_the_replies(mpfl_run):
    cfg, exp, server, transport, _ = mpfl_run
    task, step, requests, replies = transport.log[-1]
    supports = exp.spec.supports(server.state.mask)
    bodies = [codec.decode_values(replies[n][0], supports) for n in sorted(replies)]
    sizes = [len(exp.partition.train[n]) for n in sorted(replies)]
    assert [b.num_samples for b in bodies] == sizes
    expected = weighted_mean([b.tensors for b in bodies], sizes)
    for got, want in zip(server.state.weights, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_only_masks_travel_in_the_mask_phase_after_the_initial_weights():
    """MPFL with mask-only messages: no averaged values and no cores (the rest of the defaults)."""
    _, server, transport, _ = build(tiny_config(mask_rounds=3, sparsity=0.8, mask_average_from=0, core_share=0))
    server.run()
    for task, step, requests, replies in transport.log:
        if task != "mask":
            continue
        kinds = [codec.peek(b).kind for bodies in requests.values() for b in bodies]
        assert set(kinds) <= {codec.Kind.INIT, codec.Kind.MASK}
        assert (codec.Kind.INIT in kinds) == (step == 1)
        assert {codec.peek(b).kind for bodies in replies.values() for b in bodies} == {codec.Kind.MASK}


def test_same_seed_same_masks_and_another_seed_other_masks():
    a = simulate(tiny_config(rounds=1, mask_rounds=1))
    b = simulate(tiny_config(rounds=1, mask_rounds=1))
    c = simulate(tiny_config(rounds=1, mask_rounds=1, seed=1))
    assert all(np.array_equal(x, y) for x, y in zip(a.mask, b.mask))
    assert all(np.array_equal(x, y) for x, y in zip(a.weights, b.weights))
    assert a.records == [dict(r, time=a.records[i]["time"], elapsed=a.records[i]["elapsed"]) for i, r in enumerate(b.records)]
    assert not all(np.array_equal(x, y) for x, y in zip(a.mask, c.mask))


def test_filter_criterion_removes_whole_filters():
    result = simulate(tiny_config(model="cnn", criterion="filter", scope="layer", mask_rounds=1, rounds=1,
                                  sparsity=0.5, train_samples=600))
    for m in result.mask:
        rows = m.reshape(m.shape[0], -1)
        assert (rows.all(1) | ~rows.any(1)).all()
        assert rows.all(1).mean() == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("method", ["fedavg", "fedavg-prune", "topk", "centralized", "random", "local", "ssfl"])
def test_every_method_runs_and_keeps_its_density(method):
    cfg = tiny_config(method=method, sparsity=0.75, mask_rounds=2, rounds=2, train_samples=900)
    result = simulate(cfg)
    want = 1.0 if method in ("fedavg", "topk") else 0.25
    assert result.summary["final_density"] == pytest.approx(want, abs=0.01)
    assert result.summary["final_accuracy"] > (0.05 if method == "random" else 0.2)
    assert [r["phase"] for r in result.records] == [s.phase for s in plan(cfg)]


def test_topk_uploads_are_density_matched_sparse_updates():
    cfg = tiny_config(method="topk", sparsity=0.9, rounds=1)
    exp, server, transport, _ = build(cfg)
    server.run()
    _, _, _, replies = transport.log[0]
    for bodies in replies.values():
        body = codec.decode_sparse(bodies[0], exp.spec.shapes)
        for i, size in zip(exp.spec.prunable, exp.spec.prunable_sizes):
            assert np.count_nonzero(body.tensors[i]) <= masks.keep_count(int(size), 0.1)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _mask_before(server, step):
    """The consensus mask a round of step `step` starts from."""
    history = server.state.history
    return history[max(v for v in history if v < step)]


def test_fedavg_prune_prunes_the_sample_weighted_aggregate_by_magnitude():
    """Each mask round's new mask is the magnitude mask (masks' selection rule) of the sample-weighted mean of the
    nodes' replies, computed here, not of w0 nor of one node's weights."""
    cfg = tiny_config(method="fedavg-prune", sparsity=0.75, mask_rounds=2, rounds=1, **UNEVEN)
    exp, server, transport, _ = build(cfg)
    server.run()
    spec, prune = exp.spec, cfg.prune
    log = {step: (task, replies) for task, step, _, replies in transport.log}
    mask_steps = [s for s in plan(cfg) if s.phase == "mask"]
    assert len(mask_steps) == 2
    for s in mask_steps:
        task, replies = log[s.step]
        previous = _mask_before(server, s.step)
        supports = spec.supports(previous)
        assert task == "train" and sorted(replies) == [0, 1, 2]
        tensors = [codec.decode_values(replies[n][0], supports).tensors for n in sorted(replies)]
        aggregate = [a.astype(np.float32) for a in weighted_mean(tensors, [len(exp.partition.train[n]) for n in sorted(replies)])]

        def pruned_by(weights, s=s, previous=previous):
            return masks.magnitude_mask(spec.pick(weights), previous, s.density, scope=prune.scope, floor=prune.layer_floor)

        new = server.state.history[s.step]
        assert _same(new, pruned_by(aggregate)), f"step {s.step}: not the magnitude mask of the aggregate"
        assert not _same(new, pruned_by(exp.w0)) and not _same(new, pruned_by(tensors[0]))  # the test tells them apart


def test_ssfl_keeps_the_top_of_the_sample_weighted_sum_of_the_nodes_scores():
    """SSFL's one mask round: every node sends dense scores; the mask is masks.select of their sample-weighted
    mean (the sum over the total count: the same order), computed here."""
    cfg = tiny_config(method="ssfl", sparsity=0.75, rounds=1, **UNEVEN)
    exp, server, transport, _ = build(cfg)
    server.run()
    spec, prune = exp.spec, cfg.prune
    (step,) = [s for s in plan(cfg) if s.phase == "mask"]
    task, logged_step, _, replies = transport.log[0]
    assert (task, logged_step) == ("scores", step.step) and sorted(replies) == [0, 1, 2]
    scores = [codec.decode_dense(replies[n][0], codec.Kind.SCORES, spec.prunable_shapes).tensors for n in sorted(replies)]
    total = [t.astype(np.float32) for t in weighted_mean(scores, [len(exp.partition.train[n]) for n in sorted(replies)])]

    def chosen_by(values):
        return masks.select(values, spec.full_mask(), step.density, prune.scope, prune.layer_floor)

    new = server.state.history[step.step]
    assert _same(new, chosen_by(total))
    assert sum(int(m.sum()) for m in new) == masks.keep_count(sum(m.size for m in new), step.density)
    assert not any(_same(new, chosen_by(node_scores)) for node_scores in scores)  # no single node's scores give it


def test_local_asks_only_the_first_node_for_masks_and_adopts_its_mask():
    cfg = tiny_config(method="local", sparsity=0.75, mask_rounds=2, rounds=1)
    exp, server, transport, _ = build(cfg)
    server.run()
    mask_log = [entry for entry in transport.log if entry[0] == "mask"]
    assert [step for _, step, _, _ in mask_log] == [s.step for s in plan(cfg) if s.phase == "mask"] == [1, 2]
    for _, step, requests, replies in mask_log:
        assert list(requests) == [0] and list(replies) == [0], f"step {step}: other nodes were asked for masks"
        previous = _mask_before(server, step)
        own = codec.decode_mask(replies[0][0], previous).tensors
        assert _same(server.state.history[step], own), f"step {step}: the mask is not node 0's"
        assert not _same(own, previous)  # it did prune
    train = [entry for entry in transport.log if entry[0] == "train"]
    assert len(train) == 1 and sorted(train[0][2]) == [0, 1, 2]  # every node trains on it


def test_centralized_searches_its_masks_on_every_nodes_training_data(monkeypatch):
    """The pooled oracle's mask search (node.find_mask, as the simulator's oracle calls it) gets exactly the
    union of all nodes' training indices, in every mask round."""
    import mpfl.sim

    searched = []
    original = mpfl.sim.find_mask

    def recording(cfg, trainer, data, *args, **kwargs):
        searched.append((data.train.numpy().copy(), data.val.numpy().copy()))
        return original(cfg, trainer, data, *args, **kwargs)

    monkeypatch.setattr(mpfl.sim, "find_mask", recording)
    cfg = tiny_config(method="centralized", sparsity=0.75, mask_rounds=2, rounds=1, **UNEVEN)
    exp = Experiment.from_config(cfg)
    result = simulate(cfg, experiment=exp)
    assert [r["phase"] for r in result.records] == ["mask", "mask", "train"]
    every_train = np.sort(np.concatenate(exp.partition.train))
    every_val = np.sort(np.concatenate(exp.partition.val))
    assert len(np.unique(every_train)) == len(every_train) == sum(len(t) for t in exp.partition.train)
    assert len(searched) == 2
    for train, val in searched:
        np.testing.assert_array_equal(np.sort(train), every_train)
        np.testing.assert_array_equal(np.sort(val), every_val)


def test_topk_keeps_what_it_did_not_send_as_error_feedback_and_sends_it_later():
    """Node 0 over two top-k rounds, against its update recomputed here: what it sends plus what it keeps
    is exactly update + the residual it kept before (float32 values travel exactly), the sent entries are
    the keep_count largest |update + residual|, and the second round's selection owes something to the first
    round's residual."""
    from mpfl.core.training import generator

    cfg = tiny_config(method="topk", sparsity=0.9, rounds=2, value_dtype="float32")
    exp, server, transport, _ = build(cfg)
    spec, node = exp.spec, transport.nodes[0]
    kept_after = []  # node 0's residual after each round

    def keep(record):
        residual = node.state.residual
        kept_after.append(None if residual is None else [r.copy() for r in residual])

    server.on_round = keep
    server.run()
    assert [(task, step) for task, step, _, _ in transport.log] == [("topk", 1), ("topk", 2)]
    full_supports = spec.supports(spec.full_mask())
    previous = [np.zeros(shape, np.float32) for shape in spec.prunable_shapes]
    for (_, step, requests, replies), residual in zip(transport.log, kept_after):
        assert residual is not None, f"round {step}: the node kept no residual (no error feedback)"
        received = codec.decode_values(requests[0][0], full_supports).tensors
        trained, _ = node.trainer.train(received, None, node.data, cfg.train.epochs, generator(*node.key(step)))
        update = [t - w for t, w in zip(trained, received)]
        sent = codec.decode_sparse(replies[0][0], spec.shapes).tensors
        density = plan(cfg)[step - 1].density
        changed_by_residual = False
        for j, i in enumerate(spec.prunable):
            owed = update[i] + previous[j]
            np.testing.assert_array_equal(sent[i] + residual[j], owed, err_msg=f"round {step}, tensor {i}")
            magnitude, k = np.abs(owed), masks.keep_count(owed.size, density)
            kth, next_ = np.sort(magnitude, axis=None)[[-k, -k - 1]]
            assert kth > next_ > 0, f"round {step}, tensor {i}: a tie at the k-th largest |value|"  # one top k
            chosen = sent[i] != 0
            assert int(chosen.sum()) == k
            assert magnitude[chosen].min() > magnitude[~chosen].max()  # the largest went out ...
            np.testing.assert_array_equal(sent[i][chosen], owed[chosen])  # ... exactly, and nothing of them is kept
            assert not residual[j][chosen].any()
            alone = np.abs(update[i])
            changed_by_residual |= not np.array_equal(chosen, alone >= np.sort(alone, axis=None)[-int(chosen.sum())])
        for i in set(range(len(spec.shapes))) - set(spec.prunable):
            np.testing.assert_array_equal(sent[i], update[i])  # tensors that are never pruned go out whole
        assert changed_by_residual == (step > 1)  # round 1 owes nothing; round 2 sends some of round 1's rest
        previous = residual


def test_fedavg_matches_a_hand_computed_round():
    cfg = tiny_config(method="fedavg", rounds=1, server_momentum=0.0, **UNEVEN)  # plain FedAvg: the step is the average
    exp, server, transport, _ = build(cfg)
    server.run()
    trainer = make_trainer(cfg, exp.model, exp.spec)
    locals_, sizes = [], []
    for n in range(cfg.nodes):
        node = Node(n, cfg, trainer, exp.node_data(n), w0=exp.w0)
        body = codec.decode_values(node.handle("train", 1, transport.log[0][2][n])[0], exp.spec.supports(exp.spec.full_mask()))
        locals_.append(body.tensors)
        sizes.append(len(exp.partition.train[n]))
    for got, want in zip(server.state.weights, weighted_mean(locals_, sizes)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_failed_node_is_dropped_and_recorded():
    cfg = tiny_config(rounds=1, mask_rounds=1)
    _, server, _, records = build(cfg, fail={1})
    server.run()
    assert all(r["dropped"] == {"1": "switched off"} for r in records)
    assert all(r["nodes"] == [0, 2] for r in records)


def test_bytes_down_count_only_the_requests_the_transport_sent():
    """A node the transport knows to be gone is sent nothing and its bodies are not counted; a node that
    was sent its request and never answered is counted. The summary lists both as lost."""
    cfg = tiny_config(rounds=1, mask_rounds=2)
    _, server, transport, records = build(cfg, fail={2})
    delivered = []
    exchange = transport.exchange

    def gone_after_round_1(task, step, requests):
        sent = {n: b for n, b in requests.items() if n != 1 or step == 1}
        replies = exchange(task, step, sent)
        delivered.append(sum(len(body) for bodies in sent.values() for body in bodies))
        return {**replies, **({1: NodeFailure("gone", sent=False)} if len(sent) < len(requests) else {})}

    transport.exchange = gone_after_round_1
    server.run()
    assert [r["bytes_down"] for r in records] == delivered and records[0]["nodes"] == [0, 1]
    assert lost_nodes(records) == [{"node": 2, "step": 1, "phase": "mask", "reason": "switched off"},
                                   {"node": 1, "step": 2, "phase": "mask", "reason": "gone"}]


def test_too_few_replies_stop_the_run_with_a_clear_message():
    cfg = tiny_config(rounds=1, mask_rounds=1, min_nodes=3)
    _, server, _, _ = build(cfg, fail={2})
    with pytest.raises(RoundError, match="fewer than min_nodes = 3.*node 2: switched off"):
        server.run()


def test_a_corrupted_reply_is_rejected_and_the_round_completes():
    cfg = tiny_config(rounds=1, mask_rounds=1)
    exp, server, transport, records = build(cfg)
    original = transport.exchange

    def corrupt(task, step, requests):
        replies = original(task, step, requests)
        body = bytearray(replies[0][0])
        body[-1] ^= 0xFF
        replies[0] = [bytes(body), *replies[0][1:]]
        return replies

    transport.exchange = corrupt
    server.run()
    assert all("checksum" in r["dropped"]["0"] for r in records)
    assert all(r["nodes"] == [1, 2] for r in records)


def test_early_stop_when_the_mask_stops_changing():
    from mpfl.core.consensus import RULES, register_rule

    if "keep-all" not in RULES:
        register_rule("keep-all", lambda votes, support, ctx: [s.copy() for s in support])
    cfg = tiny_config(consensus="keep-all", mask_rounds=3, rounds=1)
    result = simulate(cfg)
    assert [r["phase"] for r in result.records] == ["mask", "train"]
    assert result.records[0]["hamming"] == 0


def test_local_start_sends_no_weights_and_trains_from_each_nodes_own_weights():
    from mpfl.core.training import generator

    cfg = tiny_config(rewind="none", train_init="local", rounds=1, mask_rounds=1, mask_average_from=0)
    exp, server, transport, records = build(cfg)
    own = {}

    def keep(record):
        if record["phase"] == "mask":
            own.update({n.id: n.state.local for n in transport.nodes.values()})

    server.on_round = keep
    server.run()
    task, step, requests, replies = transport.log[-1]
    assert task == "train"
    assert {codec.peek(b).kind for bodies in requests.values() for b in bodies} == {codec.Kind.MASK}
    assert all(node.state.local is None for node in transport.nodes.values())  # no later round starts from them
    mask = server.state.mask
    for node in transport.nodes.values():
        start = exp.spec.apply(own[node.id], mask)
        trained, _ = node.trainer.train(start, mask, node.data, 1, generator(cfg.seed, step, node.id))
        expected = codec.encode_values(trained, exp.spec.supports(mask), round=step, base_version=server.state.version,
                                       num_samples=node.data.num_samples, dtype=node.value_dtype)
        assert replies[node.id][0] == expected


def test_saliency_masks_need_no_training_and_start_training_from_w0():
    result = simulate(tiny_config(criterion="saliency", mask_rounds=1, rounds=1, sparsity=0.5))
    assert result.records[0]["phase"] == "mask"
    assert result.summary["final_density"] == pytest.approx(0.5, abs=0.01)
    assert result.summary["final_accuracy"] > 0.3


def test_nodes_rebuild_the_seeded_initial_weights_bit_for_bit_and_refuse_a_wrong_digest(tmp_path):
    cfg = tiny_config(rounds=1, mask_rounds=1)
    exp = Experiment.from_config(cfg)
    trainer = make_trainer(cfg, exp.model, exp.spec)
    other = Experiment.from_config(tiny_config(rounds=1, mask_rounds=1, seed=1))
    body = codec.encode_init(exp.w0, source="seed", seed=cfg.seed, round=1)
    assert len(body) == codec.HEADER_SIZE + 36
    node = Node(0, cfg, trainer, exp.node_data(0), w0=[w.copy() for w in exp.w0])
    node.handle("mask", 1, [body])
    assert all(np.array_equal(a, b) for a, b in zip(node.state.w0, exp.w0))
    stranger = Node(0, cfg, trainer, exp.node_data(0), w0=other.w0)
    with pytest.raises(PayloadError, match="differ from the server's.*torch version"):
        stranger.handle("mask", 1, [body])
    (tmp_path / "w0.pt").write_bytes(b"weights")
    loaded = Node(0, cfg.with_overrides({"init": str(tmp_path / "w0.pt")}), trainer, exp.node_data(0), w0=other.w0)
    with pytest.raises(PayloadError, match="from seed 0, but this node loaded them from '.*w0.pt': run both with the"):
        loaded.handle("mask", 1, [body])
    with pytest.raises(PayloadError, match="did not build them"):
        Node(0, cfg, trainer, exp.node_data(0)).handle("mask", 1, [body])
    file_ref = codec.encode_init(exp.w0, source="file", seed=cfg.seed, round=1)
    for holder in (stranger, Node(0, cfg, trainer, exp.node_data(0))):  # another file, or none: ask
        reply = holder.handle("mask", 1, [file_ref])
        assert len(reply) == 1 and codec.decode_init(reply[0]) == codec.InitRef(1, "request", cfg.seed,
                                                                                codec.weights_digest(exp.w0))
    with pytest.raises(PayloadError, match="does not accept requests"):
        node.handle("mask", 1, reply)


def test_an_init_file_travels_as_a_reference_and_as_weights_only_to_nodes_without_a_copy(tmp_path):
    cfg = tiny_config(rounds=1, mask_rounds=1)
    exp = Experiment.from_config(cfg)
    torch.save(exp.model.state_dict(), tmp_path / "init.pt")
    file_cfg = tiny_config(rounds=1, mask_rounds=1, init=str(tmp_path / "init.pt"))
    seeded = simulate(cfg)
    from_file = simulate(file_cfg)
    assert from_file.records[0]["bytes_down"] == seeded.records[0]["bytes_down"]
    assert all(np.array_equal(a, b) for a, b in zip(seeded.weights, from_file.weights))

    # node 1 holds no copy of the file: it replies with a request, and only it gets the weights
    _, server, transport, records = build(file_cfg)
    transport.nodes[1].built_w0 = None
    server.run()
    first = transport.log[0]
    asked = first[3][1]
    assert len(asked) == 1 and codec.decode_init(asked[0]).source == "request"
    again = transport.log[1]
    assert list(again[2]) == [1] and codec.peek(again[2][1][0]).kind == codec.Kind.WEIGHTS
    weights_body = codec.HEADER_SIZE + sum(4 + 4 * w.size for w in exp.w0)
    assert len(again[2][1][0]) == weights_body
    sent = sum(len(b) for bodies in first[2].values() for b in bodies)
    assert records[0]["bytes_down"] == sent + sum(len(b) for b in again[2][1])
    assert records[0]["bytes_up"] == from_file.records[0]["bytes_up"] + len(asked[0])
    assert all(np.array_equal(a, b) for a, b in zip(server.state.weights, from_file.weights))
    assert all(np.array_equal(a, b) for a, b in zip(transport.nodes[1].state.w0, exp.w0))


@pytest.mark.parametrize("dtype, bits", [("float32", 32), ("float16", 16), ("int8", 8)])
def test_traffic_in_bits_per_parameter_per_node_and_round(dtype, bits):
    s = simulate(tiny_config(method="fedavg", rounds=2, value_dtype=dtype)).summary
    node_rounds = 2 * 3
    assert s["bits_per_param_up"] == pytest.approx(8 * s["bytes_up"] / (s["params_dense"] * node_rounds))
    # a dense round is one value per parameter plus a header and a count (and a scale for int8) per tensor
    assert bits < s["bits_per_param_up"] < bits * 1.01 and bits < s["bits_per_param_down"] < bits * 1.01
    assert s["megabytes_total"] == pytest.approx((s["bytes_up"] + s["bytes_down"]) / 1e6)


def test_values_travel_as_int8_by_default_and_dense_fedavg_as_float32():
    runs = {m: simulate(tiny_config(method=m, rounds=1, mask_rounds=1)) for m in ("mpfl", "fedavg", "topk")}
    assert runs["mpfl"].summary["config"]["codec"]["value_dtype"] == "auto"
    assert 8 * 0.1 < runs["mpfl"].summary["train_bits_per_param_up"] < 8 * 0.1 * 1.05  # 10 % of the weights, int8
    assert 32 < runs["fedavg"].summary["bits_per_param_up"] < 32.2
    assert runs["topk"].summary["bits_per_param_down"] < 8.1
    pinned = simulate(tiny_config(rounds=1, mask_rounds=1, value_dtype="float32")).summary
    assert pinned["train_bits_per_param_up"] > 3 * runs["mpfl"].summary["train_bits_per_param_up"]


# --------------------------------------------------------------------------- mask adaptation in training


@pytest.fixture(scope="module")
def adapted_run():
    """Sampled training rounds with a swap every round, so nodes miss swaps and must catch up."""
    cfg = tiny_config(nodes=4, mask_rounds=2, rounds=6, fraction=0.5, adapt_every=1, adapt_until=1.0, sparsity=0.8)
    exp, server, transport, records = build(cfg)
    server.run()
    return cfg, exp, server, transport, records


def test_swaps_keep_the_density_and_the_weights_off_the_mask_exactly_zero(adapted_run):
    cfg, exp, server, transport, records = adapted_run
    train = [r for r in records if r["phase"] == "train"]
    assert [r["swapped"] > 0 for r in train[:-1]] == [True] * (len(train) - 1)
    history = [server.state.history[r["step"]] for r in train[:-1]]
    assert len({sum(int(m.sum()) for m in mask) for mask in history}) == 1  # constant density through every swap
    assert all(not (w[~m]).any() for w, m in zip(exp.spec.pick(server.state.weights), server.state.mask))
    for task, step, _requests, replies in transport.log:
        if task != "adapt":
            continue
        mask = server.state.history[max(v for v in server.state.history if v < step)]
        for bodies in replies.values():
            values = codec.decode_values(bodies[0], exp.spec.supports(mask)).tensors
            assert all(not w[~m].any() for w, m in zip(exp.spec.pick(values), mask))
            regrow = codec.decode_mask(bodies[1], [~m for m in mask]).tensors
            assert all(not (g & m).any() for g, m in zip(regrow, mask))


def test_a_node_that_missed_swaps_catches_up_to_exactly_the_current_mask(adapted_run):
    cfg, exp, server, transport, records = adapted_run
    grown = [(step, n) for task, step, requests, _ in transport.log for n, bodies in requests.items()
             if any(codec.peek(b).kind == codec.Kind.MASK and codec.peek(b).grow for b in bodies)]
    assert grown, "no node ever needed regrown positions"
    for node in transport.nodes.values():
        held = server.state.history[node.state.version]
        assert all(np.array_equal(a, b) for a, b in zip(node.mask, held))
    latest = [n for n in transport.nodes.values() if n.state.version == server.state.version]
    assert latest and all(all(np.array_equal(a, b) for a, b in zip(n.mask, server.state.mask)) for n in latest)


def test_with_node_drop_votes_the_swap_drops_the_kept_weights_most_nodes_vote_to_drop():
    """adapt_drop = votes: each adaptation reply adds a third body, the node's drop votes over the mask;
    the server drops, layer by layer, as many kept positions as it regrows, none with fewer sample-weighted
    drop votes (tallied here) than a position it keeps, and regrows only positions some node voted for."""
    cfg = tiny_config(mask_rounds=2, rounds=3, adapt_every=1, adapt_until=1.0, sparsity=0.8, adapt_drop="votes",
                      **UNEVEN)
    exp, server, transport, _ = build(cfg)
    server.run()
    adapted = [entry for entry in transport.log if entry[0] == "adapt"]
    assert adapted
    for _, step, _, replies in adapted:
        before, after = _mask_before(server, step), server.state.history[step]
        assert all(len(bodies) == 3 for bodies in replies.values())
        nodes = sorted(replies)
        drops = [codec.decode_mask(replies[n][2], before).tensors for n in nodes]
        regrows = [codec.decode_mask(replies[n][1], [~m for m in before]).tensors for n in nodes]
        votes = weighted_mean(drops, [len(exp.partition.train[n]) for n in nodes])
        for layer, (old, new, tally) in enumerate(zip(before, after, votes)):
            dropped, kept, grown = old & ~new, old & new, new & ~old
            assert dropped.sum() == grown.sum(), f"step {step}, layer {layer}: density changed"
            if dropped.any():
                assert tally[dropped].min() >= tally[kept].max(), f"step {step}, layer {layer}"
            assert not (grown & ~np.any([r[layer] for r in regrows], axis=0)).any()


def test_warm_up_rounds_train_the_dense_model_and_the_mask_search_starts_from_their_weights():
    """Dense FedAvg rounds first (density 1, no mask messages); then the first mask round sends every node
    the warmed-up global weights to search from, where without warm-up it sends only the INIT reference."""
    cfg = tiny_config(warmup_rounds=2, mask_rounds=2, rounds=1, value_dtype="float32")  # exact, to compare
    exp, server, transport, records = build(cfg)
    weights_after, log = {}, server.on_round

    def keep(record):
        weights_after[record["step"]] = [w.copy() for w in server.state.weights]
        log(record)

    server.on_round = keep
    server.run()
    assert [r["phase"] for r in records] == ["warmup", "warmup", "mask", "mask", "train"]
    assert [r["density"] for r in records[:2]] == [1.0, 1.0] and records[2]["density"] < 1.0
    assert not any(codec.peek(b).kind == codec.Kind.MASK for _, _, requests, _ in transport.log[:2]
                   for bodies in requests.values() for b in bodies)
    assert not all(np.array_equal(a, b) for a, b in zip(weights_after[2], exp.w0))  # the warm-up trained
    full = exp.spec.supports(exp.spec.full_mask())
    for bodies in transport.log[2][2].values():
        shared = [b for b in bodies if codec.peek(b).kind == codec.Kind.VALUES]
        assert len(shared) == 1
        assert all(np.array_equal(a, b) for a, b in zip(codec.decode_values(shared[0], full).tensors, weights_after[2]))
    _, cold, cold_transport, _ = build(tiny_config(mask_rounds=2, rounds=1))
    cold.run()
    assert all([codec.peek(b).kind for b in bodies] == [codec.Kind.INIT] for bodies in cold_transport.log[0][2].values())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_resume_right_after_a_swap_ends_bit_for_bit_as_an_uninterrupted_run(tmp_path, momentum):
    """With server momentum its velocity is part of the checkpoint, or the resumed rounds would differ."""
    cfg = tiny_config(mask_rounds=2, rounds=4, adapt_every=2, adapt_until=1.0, server_momentum=momentum)
    reference = simulate(cfg)
    swap_step = next(r["step"] for r in reference.records if r.get("swapped"))

    def stop(record):
        if record["step"] == swap_step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, tmp_path / "run", on_round=stop)
    resumed = simulate(cfg, tmp_path / "run", resume=True)
    keys = ("step", "accuracy", "loss", "bytes_up", "bytes_down", "density", "swapped")
    assert [{k: r.get(k) for k in keys} for r in resumed.records] == [{k: r.get(k) for k in keys} for r in reference.records]
    assert all(np.array_equal(a, b) for a, b in zip(resumed.weights, reference.weights))
    assert all(np.array_equal(a, b) for a, b in zip(resumed.mask, reference.mask))


def test_server_momentum_steps_by_the_velocity_on_the_mask_and_only_in_training():
    """FedAvgM against a numpy reference over two rounds; the mask phase and momentum 0 take the aggregate as it is."""
    cfg = tiny_config(mask_rounds=1, rounds=2, server_momentum=0.5)
    exp, server, _, _ = build(cfg)
    mask_step, first, second = plan(cfg)
    spec, state = exp.spec, server.state
    rng = np.random.default_rng(0)
    state.mask = [rng.random(s) < 0.3 for s in spec.prunable_shapes]
    state.weights = spec.apply(exp.w0, state.mask)
    averages = [spec.apply([rng.standard_normal(s).astype(np.float32) for s in spec.shapes], state.mask)
                for _ in range(2)]
    assert server.advance(mask_step, averages[0]) is averages[0] and state.velocity is None
    weights, velocity = state.weights, [np.zeros_like(w) for w in state.weights]
    for step, average in zip((first, second), averages):
        velocity = [np.float32(0.5) * v + (a - w) for v, a, w in zip(velocity, average, weights)]
        weights = [w + v for w, v in zip(weights, velocity)]
        state.weights = server.advance(step, average)
        assert all(np.array_equal(got, want) for got, want in zip(state.weights, weights))
    assert not np.array_equal(state.weights[0], averages[1][0])  # the second step is not the plain average
    for i, m in zip(spec.prunable, state.mask):
        assert not state.weights[i][~m].any() and not state.velocity[i][~m].any()
    plain = build(tiny_config(mask_rounds=1, rounds=2, server_momentum=0.0))[1]
    assert plain.advance(second, averages[1]) is averages[1]


def test_running_statistics_take_the_average_while_parameters_take_the_momentum_step():
    cfg = tiny_config(mask_rounds=1, rounds=2, server_momentum=0.9)
    exp, server, _, _ = build(cfg)
    _, first, second = plan(cfg)
    statistic = len(exp.spec.names) - 1  # the mlp has none: call its last bias a running statistic
    server.spec = replace(exp.spec, statistics=(statistic,))
    rng = np.random.default_rng(1)
    server.state.mask = [rng.random(s) < 0.3 for s in exp.spec.prunable_shapes]
    server.state.weights = before = exp.spec.apply(exp.w0, server.state.mask)
    averages = [exp.spec.apply([rng.standard_normal(s).astype(np.float32) for s in exp.spec.shapes], server.state.mask)
                for _ in range(2)]
    weights, velocity = before[0], np.zeros_like(before[0])
    for step, average in zip((first, second), averages):
        server.state.weights = server.advance(step, average)
        velocity = np.float32(0.9) * velocity + (average[0] - weights)
        weights = weights + velocity
        assert np.array_equal(server.state.weights[0], weights)  # a parameter: FedAvgM's step
        assert np.array_equal(server.state.weights[statistic], average[statistic])  # a statistic: the average
    assert not server.state.velocity[statistic].any()


@pytest.mark.parametrize(("overrides", "averaged"), [
    ({"mask_average_from": 2}, {2, 3}),
    ({"mask_average_from": -1}, {3}),  # negative: counted from the end
    ({"mask_average_from": -3}, {1, 2, 3}),
    ({}, {3}),  # unset, every node asked: the last round
    ({"nodes": 4, "mask_fraction": 0.5}, {2, 3}),  # unset, sampled mask rounds: from the second
])
def test_averaged_mask_rounds_carry_values_and_start_the_next_round_from_their_mean(overrides, averaged):
    cfg = tiny_config(mask_rounds=3, rounds=1, sparsity=0.8, **overrides)
    exp, server, transport, records = build(cfg)
    server.run()
    mask_log = [entry for entry in transport.log if entry[0] == "mask"]
    assert [entry[1] for entry in mask_log] == [1, 2, 3]
    for _task, step, requests, replies in mask_log:
        sent = {codec.peek(b).kind for bodies in requests.values() for b in bodies}
        got = [[codec.peek(b).kind for b in bodies] for bodies in replies.values()]
        assert (codec.Kind.VALUES in sent) == (step > min(averaged))  # the shared start, after the first average
        assert all(kinds == [codec.Kind.MASK, codec.Kind.MASK] + [codec.Kind.VALUES] * (step in averaged)
                   for kinds in got)


def test_counting_averaged_rounds_from_the_end_is_the_same_run_as_naming_the_round():
    runs = [simulate(tiny_config(mask_rounds=3, rounds=1, mask_average_from=start)) for start in (-1, 3, None)]
    for other in runs[1:]:
        assert [r["bytes_up"] for r in other.records] == [r["bytes_up"] for r in runs[0].records]
        assert all(np.array_equal(a, b) for a, b in zip(other.weights, runs[0].weights))


def test_simulate_refuses_what_is_not_a_config_or_an_experiment_of_another_config(tmp_path):
    with pytest.raises(TypeError, match="simulate needs a mpfl.config.Config, got dict"):
        simulate({"nodes": 3})
    other = Experiment.from_config(tiny_config(model="cnn"))
    with pytest.raises(ConfigError, match="experiment must be Experiment.from_config\\(cfg\\) for this very cfg"):
        simulate(tiny_config(), tmp_path / "run", experiment=other)
    assert not (tmp_path / "run").exists()


def test_resuming_a_run_that_has_no_checkpoint_yet_needs_its_own_config(tmp_path):
    out = tmp_path / "run"
    started = tiny_config(lr=0.05)

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(started, out, on_round=stop, keep_checkpoint=True)
    (out / "checkpoint.npz").unlink()
    (out / "rounds.jsonl").unlink()
    saved = (out / "config.toml").read_bytes()
    with pytest.raises(RunDirError, match=r"was started with another config: train.lr = 0.3 \(config.toml: 0.05\)"):
        simulate(tiny_config(lr=0.3), out, resume=True)
    assert (out / "config.toml").read_bytes() == saved
    assert simulate(started, out, resume=True).summary["rounds"] == len(plan(started))


def test_a_layer_floor_that_makes_the_sparsity_unreachable_is_refused_for_pruning_methods_only():
    Experiment.from_config(tiny_config(sparsity=0.9, layer_floor=0.1))  # exactly the target density: allowed
    Experiment.from_config(tiny_config(sparsity=0.9, layer_floor=0.5, scope="layer"))  # no floor in layer scope
    Experiment.from_config(tiny_config(method="fedavg", sparsity=0.995))  # fedavg never prunes
    with pytest.raises(ConfigError, match=r"layer_floor = 0.01 keeps more of every layer than sparsity = 0.995"):
        Experiment.from_config(tiny_config(sparsity=0.995))


def _small_batchnorm_model(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), 16),
                               torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, num_classes))


@pytest.mark.parametrize("method", ["mpfl", "fedavg"])
def test_batchnorm_statistics_travel_bit_for_bit_in_int8_runs(monkeypatch, method):
    """Every VALUES body of an int8 run (weights down, kept values up, in mask and training rounds)
    carries a BatchNorm model's running statistics as float32: one int8 scale per tensor would round
    a layer's small variances coarsely."""
    from mpfl.core.params import param_spec
    from mpfl.models import MODELS, build_model, register_model

    if "batchnorm_values_test_model" not in MODELS:
        register_model("batchnorm_values_test_model", _small_batchnorm_model)
    sent = []
    encode = codec.encode_values

    def recording(tensors, supports, **options):
        body = encode(tensors, supports, **options)
        sent.append(([np.array(t, copy=True) for t in tensors], supports, body))
        return body

    monkeypatch.setattr(codec, "encode_values", recording)
    simulate(tiny_config(method=method, model="batchnorm_values_test_model", value_dtype="int8", workers=1))
    statistics = param_spec(build_model("batchnorm_values_test_model", (1, 28, 28), 10)).statistics
    assert len(statistics) == 2 and sent  # running mean and variance
    for tensors, supports, body in sent:
        got = codec.decode_values(body, supports).tensors
        assert all(np.array_equal(got[i], tensors[i]) for i in statistics)
        assert not all(np.array_equal(g, t) for g, t in zip(got, tensors))  # the weights are int8
