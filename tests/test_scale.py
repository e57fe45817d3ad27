"""Cross-device scale: sampled mask rounds, node state that grows with the sample, and the device setting."""

import numpy as np
import pytest

from conftest import DEVICES, bits, needs_cuda, tiny_config
from mpfl import codec
from mpfl.checkpoint import CHECKPOINT, read_meta
from mpfl.config import Config
from mpfl.errors import ConfigError
from mpfl.experiment import Experiment
from mpfl.node import build_nodes
from mpfl.server import Server
from mpfl.sim import InProcessTransport, simulate

THOUSAND = {"nodes": 1000, "train_samples": 4000, "test_samples": 200, "fraction": 0.01, "mask_rounds": 3,
            "rounds": 2, "sparsity": 0.8}
"""1,000 nodes with 3-4 training samples each, 10 asked per round."""


class Recording(InProcessTransport):
    """An in-process transport that keeps every request and reply it carried."""

    def __init__(self, nodes):
        super().__init__(nodes)
        self.log = []

    def exchange(self, task, step, requests):
        replies = super().exchange(task, step, requests)
        self.log.append((task, step, dict(requests), dict(replies)))
        return replies


@pytest.fixture(scope="module")
def thousand():
    """A 1,000-node run on the in-process transport, every message recorded."""
    cfg = tiny_config(**THOUSAND)
    exp = Experiment.from_config(cfg)
    nodes = build_nodes(cfg, exp, range(cfg.nodes), {})
    transport = Recording(nodes)
    records = []
    server = Server(cfg, exp.spec, exp.w0, transport, evaluate=exp.evaluate, on_round=records.append)
    server.run()
    return cfg, exp, server, transport, records


def test_every_round_mask_rounds_included_asks_the_seeded_sample(thousand):
    cfg, _, _, transport, records = thousand
    assert [r["phase"] for r in records] == ["mask"] * 3 + ["train"] * 2
    asked = [sorted(requests) for _, _, requests, _ in transport.log]
    assert all(len(a) == 10 for a in asked)
    assert len({tuple(a) for a in asked}) == len(asked)  # another sample every round
    assert asked == [r["nodes"] for r in records]
    again = tiny_config(**THOUSAND)
    server = Server(again, thousand[1].spec, thousand[1].w0, transport)
    assert [server.sample(s) for s in server.plan] == asked  # the sample is a function of (seed, step)


def test_bytes_counted_equal_the_lengths_of_the_sampled_nodes_messages(thousand):
    _, _, _, transport, records = thousand
    for (_, _, requests, replies), record in zip(transport.log, records):
        assert record["bytes_down"] == sum(len(b) for bodies in requests.values() for b in bodies)
        assert record["bytes_up"] == sum(len(b) for bodies in replies.values() for b in bodies)


def test_a_node_that_skipped_rounds_catches_up_to_exactly_the_current_mask(thousand):
    """A mask update is coded over the version the node holds, however old; decoded over that version
    (independently of the node) it is the server's current mask, and every node holds its version's mask."""
    _, exp, server, transport, _ = thousand
    history = server.state.history
    held: dict[int, int] = {}
    caught_up = 0
    for _, step, requests, _ in transport.log:
        current = max(v for v in history if v < step)
        for node, bodies in requests.items():
            updates = [b for b in bodies if codec.peek(b).kind == codec.Kind.MASK]
            if held.get(node, 0) == current:
                assert not updates
                continue
            (update,) = updates
            assert codec.peek(update).base_version == held.get(node, 0)
            decoded = codec.decode_mask(update, history[held.get(node, 0)]).tensors
            assert all(np.array_equal(d, m) for d, m in zip(decoded, history[current]))
            caught_up += 0 < held.get(node, 0) < max(v for v in history if v < current)
            held[node] = current
    assert caught_up, "no node skipped a mask version between two rounds it was asked in"
    for node in transport.nodes.values():
        assert all(np.array_equal(a, b) for a, b in zip(node.mask, history[node.state.version]))


def test_node_state_is_held_only_by_the_nodes_asked_and_shared_by_version(thousand):
    _, _, server, transport, _ = thousand
    asked = {n for _, _, requests, _ in transport.log for n in requests}
    touched = {n.id for n in transport.nodes.values() if not n.state.fresh}
    assert touched == asked and len(asked) <= 50
    assert all(n.state.local is None for n in transport.nodes.values())  # no round after the last reads them
    copies = {id(n.state.mask[0]) for n in transport.nodes.values() if n.state.mask is not None}
    assert len(copies) <= len(server.state.history)  # one mask per version, not one per node


def test_nodes_keep_their_own_weights_only_while_a_later_round_may_start_from_them():
    cfg = tiny_config(mask_rounds=3, mask_average_from=2)
    method = Server(cfg, *_spec_w0(cfg), InProcessTransport([])).method
    steps = {s.step: s for s in method.plan()}
    # round 2 starts from each node's own weights, round 3 from the shared average, training from that average
    assert [method.keeps_own_weights(steps[i]) for i in (1, 2, 3, 4)] == [True, False, False, False]
    plain = Server(tiny_config(mask_rounds=2, mask_average_from=0), *_spec_w0(cfg), InProcessTransport([])).method
    assert [plain.keeps_own_weights(s) for s in plain.plan()] == [True, True, False, False]  # train_init local
    rewind = Server(tiny_config(rewind="init", train_init="rewind"), *_spec_w0(cfg), InProcessTransport([])).method
    assert not any(rewind.keeps_own_weights(s) for s in rewind.plan())


def _spec_w0(cfg: Config):
    exp = Experiment.from_config(cfg)
    return exp.spec, exp.w0


SAMPLED = {"nodes": 6, "fraction": 0.5, "rounds": 1}


@pytest.mark.parametrize("overrides, stop_at", [
    ({**THOUSAND, "mask_rounds": 2, "rounds": 1}, 1),  # own weights trained from w0: stored as the round's number
    ({**SAMPLED, "mask_rounds": 2}, 1),  # ... and rebuilt for round 2 to start from
    ({**SAMPLED, "mask_rounds": 3, "mask_average_from": 0}, 2),  # as kept values
    pytest.param({**SAMPLED, "mask_rounds": 2, "device": "cuda"}, 1, marks=needs_cuda),  # rebuilt by the GPU
    pytest.param({**SAMPLED, "mask_rounds": 3, "mask_average_from": 0, "device": "cuda"}, 2, marks=needs_cuda),
])
def test_resume_ends_bit_for_bit_and_checkpoints_hold_only_the_nodes_asked(tmp_path, overrides, stop_at):
    cfg = tiny_config(**overrides)
    reference = simulate(cfg)
    model_bytes = 4 * 199_210
    seen = {}

    def stop(record):
        if record["step"] == stop_at:
            seen["meta"] = read_meta(tmp_path / "run")
            seen["size"] = (tmp_path / "run" / CHECKPOINT).stat().st_size
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, tmp_path / "run", on_round=stop)
    nodes = seen["meta"]["nodes"]
    asked = {n for r in reference.records[:stop_at] for n in r["nodes"]}
    assert set(nodes) == {str(n) for n in asked}
    stored = [n for n, m in nodes.items() if m["local"]]
    rebuilt = [n for n, m in nodes.items() if m["from_w0"]]
    if stop_at == 1:  # every node asked trained from w0: no weights stored, the server's weights and w0 only
        assert len(rebuilt) == len(nodes) and not stored and seen["size"] < 3 * model_bytes
        if cfg.nodes < 1000:  # some node of round 1 is asked again and starts round 2 from its rebuilt weights
            assert asked & set(reference.records[1]["nodes"])
    else:
        assert stored and len(stored) + len(rebuilt) == len(nodes)
    resumed = simulate(cfg, tmp_path / "run", resume=True)
    keys = ("step", "nodes", "accuracy", "loss", "bytes_up", "bytes_down", "density", "hamming")
    assert [{k: r.get(k) for k in keys} for r in resumed.records] == [{k: r.get(k) for k in keys} for r in reference.records]
    assert all(np.array_equal(a, b) for a, b in zip(resumed.weights, reference.weights))
    assert all(np.array_equal(a, b) for a, b in zip(resumed.mask, reference.mask))


@pytest.mark.parametrize("device", DEVICES)
def test_own_weights_rebuilt_on_demand_give_the_run_that_keeps_them(device):
    """With sampled mask rounds a node does not hold the weights it trained from w0; a node asked
    again trains again to rebuild them: the run is the one in which every node keeps them (on a
    GPU too, whose deterministic algorithms make the second training the first's bit for bit)."""
    cfg = tiny_config(nodes=6, fraction=0.5, mask_rounds=3, rounds=1, mask_average_from=0, device=device)
    runs = {}
    for keep in (False, True):
        exp = Experiment.from_config(cfg)
        nodes = build_nodes(cfg, exp, range(cfg.nodes), {})
        for node in nodes:
            node.keeps_from_w0 = keep
        transport = Recording(nodes)
        held = []
        server = Server(cfg, exp.spec, exp.w0, transport,
                        on_round=lambda r, nodes=nodes, held=held: held.append(sum(n.state.local is not None
                                                                                    for n in nodes)))
        server.run()
        runs[keep] = (transport.log, server.state, held)
    assert runs[False][0] == runs[True][0]  # every request and reply, byte for byte
    assert all(np.array_equal(a, b) for a, b in zip(runs[False][1].weights, runs[True][1].weights))
    assert runs[False][2][0] == 0 and runs[True][2][0] == 3  # after mask round 1: nothing held, or the 3 asked
    rebuilt = {n for _, step, requests, _ in runs[False][0] if step == 2 for n in requests}
    assert rebuilt & {n for _, step, requests, _ in runs[False][0] if step == 1 for n in requests}


def test_the_memory_of_setting_up_the_nodes_does_not_grow_with_the_rounds_of_the_run():
    """The nodes of a process share the run's plan: 1,000 nodes of a 400-round run cost no more to set up
    than of a 1-round one (a plan per node would take about 170 bytes per node and round: 68 MB here)."""
    import tracemalloc

    allocated = {}
    for rounds in (1, 400):
        cfg = tiny_config(**{**THOUSAND, "mask_rounds": 1, "rounds": rounds})
        exp = Experiment.from_config(cfg)
        tracemalloc.start()
        nodes = build_nodes(cfg, exp, range(cfg.nodes), {})
        allocated[rounds] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(nodes) == 1000 and len(nodes[0].steps) == rounds + 1
    assert allocated[400] - allocated[1] < 400 * 1000  # under a kilobyte a round, for all the nodes together


def test_mask_fraction_defaults_to_fraction_and_can_differ():
    assert Config().prune.mask_fraction is None
    every = simulate(tiny_config(nodes=4, rounds=1, mask_rounds=1, fraction=0.5, mask_fraction=1.0))
    assert [len(r["nodes"]) for r in every.records] == [4, 2]
    default = simulate(tiny_config(nodes=4, rounds=1, mask_rounds=1))
    assert [len(r["nodes"]) for r in default.records] == [4, 4]
    with pytest.raises(ConfigError, match="mask_fraction"):
        tiny_config(mask_fraction=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_worker_processes_run_sampled_mask_rounds_as_one_process(device):
    cfg = tiny_config(nodes=6, fraction=0.5, mask_rounds=3, rounds=2, mask_average_from=0, train_samples=900,
                      device=device)
    sequential, parallel = simulate(cfg), simulate(cfg.with_overrides({"workers": 2}))
    assert bits(parallel.weights) == bits(sequential.weights)
    keys = ("step", "nodes", "accuracy", "bytes_up", "bytes_down", "hamming")
    assert [{k: r.get(k) for k in keys} for r in parallel.records] == [{k: r.get(k) for k in keys}
                                                                      for r in sequential.records]


def test_the_memory_estimate_counts_the_mask_history_a_longer_run_keeps():
    """Each mask the server's history gains costs the estimate a bit per weight: the difference
    between a short and a long run is what their histories hold (counted from real runs), and a
    real history takes no more than its term."""
    from mpfl.models import build_model
    from mpfl.resources import estimate_run

    params = sum(t.numel() for t in build_model("mlp", (1, 28, 28), 10).state_dict().values())
    runs = {(mask_rounds, rounds): tiny_config(nodes=2, mask_rounds=mask_rounds, rounds=rounds)
            for mask_rounds, rounds in ((2, 2), (2, 9), (4, 2))}
    histories = {key: simulate(cfg).masks for key, cfg in runs.items()}
    versions = {key: len(history) for key, history in histories.items()}
    assert versions[2, 9] > versions[2, 2] < versions[4, 2]  # adaptation rounds and mask rounds add masks
    estimates = {key: estimate_run(cfg) for key, cfg in runs.items()}
    for longer in ((2, 9), (4, 2)):
        assert estimates[longer].fixed - estimates[2, 2].fixed == (versions[longer] - versions[2, 2]) * -(-params // 8)
    for key, history in histories.items():
        assert history.nbytes <= estimates[key].history == versions[key] * -(-params // 8)


def test_the_memory_estimate_counts_the_nodes_asked_not_the_population():
    from mpfl.resources import estimate_run

    def mib(**overrides):
        return estimate_run(Config().with_overrides({"model": "mlp", **overrides})).total / 2**20

    assert mib(nodes=1000, fraction=0.1) < 0.5 * mib(nodes=1000)
    assert mib(nodes=1000, fraction=0.1, mask_fraction=1.0) == mib(nodes=1000)  # every node in the mask rounds
    measured = 682  # peak RSS, 1,000 nodes, 10 % per round, 5 + 20 rounds (benchmarks/scale.py)
    assert 0.9 * measured <= mib(nodes=1000, fraction=0.1, mask_rounds=5, rounds=20) <= 1.4 * measured
