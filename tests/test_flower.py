"""The Flower runner: run config mapping, records on the wire, the ServerApp and ClientApp in one
process, failure handling, and a real deployment (SuperLink + SuperNodes on 127.0.0.1)."""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
import time
import typing
import uuid
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.config import flatten_dict, parse_config_args
from flwr.supercore.task_identity import TaskIdentity

from conftest import bits
from mpfl import codec, datacache
from mpfl.checkpoint import load_final
from mpfl.config import SECTIONS, Config
from mpfl.data import load_dataset
from mpfl.datacache import load_cached
from mpfl.errors import ConfigError, PayloadError, RoundError
from mpfl.experiment import Experiment
from mpfl.flower import client_app, server_app, warm
from mpfl.flower.local import (
    CONNECTION,
    HOST,
    LOOPBACK_NAMES,
    LocalFederation,
    certificate_commands,
    register_command,
    superlink_command,
    supernode_command,
    supernode_key_command,
)
from mpfl.flower.node_runtime import handle, load_state, save_state
from mpfl.flower.payload import pack, step_of, unpack
from mpfl.flower.settings import RunnerOptions, flower_wording, from_run_config, node_settings, with_local_init
from mpfl.flower.transport import METRIC_BYTES, FlowerTransport
from mpfl.node import NodeState
from mpfl.protocol import NodeFailure, RoundRecord
from mpfl.records import RunSummary, read_rounds, read_summary
from mpfl.server import Server
from mpfl.sim import simulate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).parents[1]
DEFAULTS = flatten_dict(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
SMALL = {"nodes": 2, "min-nodes": 1, "rounds": 2, "threads": 1, "data.train-samples": 2000, "data.test-samples": 500,
         "prune.mask-rounds": 2, "round-timeout": 120.0, "connect-timeout": 60.0}


def run_config(**overrides) -> dict:
    """The run config Flower hands both apps: the pyproject defaults with SMALL and `overrides` applied."""
    return {**DEFAULTS, **SMALL, **{k.replace("_", "-"): v for k, v in overrides.items()}}


@pytest.fixture(scope="module")
def sim():
    """The in-process simulator's result for the SMALL configuration."""
    cfg, _ = from_run_config(run_config())
    return simulate(cfg)


def assert_same_run(out: Path, sim) -> None:
    """A Flower run directory holds the simulator's masks, final weights, accuracies and bytes."""
    keys = ("step", "phase", "nodes", "dropped", "bytes_up", "bytes_down", "accuracy", "density")
    assert [{k: r[k] for k in keys} for r in read_rounds(out)] == [{k: r[k] for k in keys} for r in sim.records]
    final = load_final(out)
    with np.load(out / server_app.MASKS) as masks:
        assert len(masks.files) == len(sim.masks) * len(final.mask)
        for step, mask in sim.masks.items():
            for name, m in zip(final.mask, mask, strict=True):
                assert np.array_equal(masks[f"{step}/{name}"], m)
    for got, want in zip(final.weights.values(), sim.weights, strict=True):
        assert np.array_equal(got, want)
    summary = read_summary(out)
    assert summary["runner"] == "flower-deployment" and set(summary) <= set(typing.get_type_hints(RunSummary))
    assert (summary["bytes_up"], summary["bytes_down"]) == (sim.summary["bytes_up"], sim.summary["bytes_down"])


# --------------------------------------------------------------------------- run config


def test_pyproject_run_config_declares_every_config_field_with_mpfls_default():
    runner = {f.name for f in fields(RunnerOptions)}
    declared = {k.replace("-", "_") for k in DEFAULTS} - runner
    expected = {f.name for f in fields(Config) if f.name not in SECTIONS}
    expected |= {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)}
    assert declared == expected
    assert from_run_config(DEFAULTS) == (Config(), RunnerOptions())


def test_run_config_takes_dashes_or_underscores_and_empty_means_default():
    cfg, opts = from_run_config({"train.batch-size": 16, "train.weight_decay": 1, "data.train-samples": "",
                                 "prune.exclude": "fc1,fc2", "out-dir": "x", "round-timeout": 5})
    assert (cfg.train.batch_size, cfg.train.weight_decay, cfg.data.train_samples) == (16, 1.0, None)
    assert cfg.prune.exclude == ("fc1", "fc2")
    assert (opts.out_dir, opts.round_timeout) == ("x", 5.0)
    assert from_run_config({"workers": 0})[0].workers == 0  # mpfl run's config.toml (automatic workers) serves as it is


@pytest.mark.parametrize("bad, message", [({"train.lrr": 0.1}, "train.lr"), ({"method": "fedsgd"}, "method"),
                                           ({"round-timeout": "soon"}, "round-timeout"),
                                           ({"faults.dropout": 0.1}, "faults.dropout = 0.1: the in-process simulator"),
                                           ({"workers": 2}, "workers = 2: worker processes"),
                                           ({"connect-timeout": 0}, "connect-timeout"),
                                           ({"faults.malicious": 1, "faults.attack": "inverted"},
                                            r"^faults.attack = 'inverted' is not one of"),
                                           ({"prune.mask-rounds": -1}, r"^prune.mask-rounds = -1 must be >= 1")])
def test_bad_run_config_is_named(bad, message):
    with pytest.raises(ConfigError, match=message):
        from_run_config(bad)


def test_node_config_must_name_a_partition_of_this_run():
    cfg = Config(nodes=2)
    assert node_settings({"partition-id": 1, "num-partitions": 2, "data-dir": "/d"}, cfg).data_dir == "/d"
    with pytest.raises(ConfigError, match="num-partitions = 3 but the run has nodes = 2"):
        node_settings({"partition-id": 0, "num-partitions": 3}, cfg)
    with pytest.raises(ConfigError, match="lacks partition-id"):
        node_settings({"num-partitions": 2}, cfg)
    with pytest.raises(ConfigError, match="outside"):
        node_settings({"partition-id": 2, "num-partitions": 2}, cfg)


def test_a_supernode_uses_its_own_copy_of_the_init_file_or_none(tmp_path):
    copy = tmp_path / "w0.pt"
    copy.write_bytes(b"weights")
    elsewhere = str(tmp_path / "on-the-server" / "w0.pt")
    assert with_local_init({"train.init": str(copy)}, {})["train.init"] == str(copy)
    assert with_local_init({"train.init": elsewhere}, {})["train.init"] == ""  # not here: the node asks
    assert with_local_init({"train.init": elsewhere}, {"init": str(copy)})["train.init"] == str(copy)
    assert with_local_init({"train.init": "", "method": "mpfl"}, {}) == {"train.init": "", "method": "mpfl"}
    # a node's init setting stays for the runs after: one built from the seed ignores it
    assert with_local_init({"train.init": "", "method": "mpfl"}, {"init": str(copy)}) == {"train.init": "",
                                                                                          "method": "mpfl"}
    assert from_run_config(with_local_init({"train.init": elsewhere}, {}))[0].train.init is None
    with pytest.raises(ConfigError, match="init must be a quoted path"):
        with_local_init({"train.init": elsewhere}, {"init": 3})


# --------------------------------------------------------------------------- records


def test_bodies_travel_byte_for_byte_with_the_step():
    bodies = [b"MPFL\x00" * 7, b"", bytes(range(256))]
    content = pack(bodies, step=4)
    assert unpack(content) == bodies and step_of(content) == 4
    assert unpack(pack([])) == []
    with pytest.raises(PayloadError, match="step"):
        step_of(pack(bodies))
    with pytest.raises(PayloadError, match="bodies"):
        unpack(RecordDict())


def test_node_state_survives_in_context_state():
    state = RecordDict()
    w0, mask = [np.arange(6, dtype=np.float32).reshape(2, 3)], [np.array([[True, False, True]])]
    node = NodeState(w0=w0, mask=mask, version=3)
    save_state(state, node)
    back = load_state(state)
    assert back.version == 3 and back.local is None and back.residual is None
    assert back.mask[0].dtype == bool and np.array_equal(back.mask[0], node.mask[0])
    assert np.array_equal(back.w0[0], node.w0[0])
    node.w0 = None
    save_state(state, node)
    assert load_state(state).w0 is None
    assert load_state(RecordDict()) == NodeState()


# --------------------------------------------------------------------------- apps in one process


class LoopbackGrid:
    """A Grid that hands every message to the ClientApp in this process, one Context per SuperNode.

    `down` SuperNodes are not connected; to ``train.*`` messages, `silent` ones never answer,
    `failing` ones answer with an error, and `garble` ones flip a bit of every reply body."""

    def __init__(self, rc: dict, partitions: list[int], num_partitions: int | None = None) -> None:
        n = num_partitions or len(partitions)
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config=rc,
                                          node_config={"partition-id": p, "num-partitions": n})
                         for i, p in enumerate(partitions)}
        self.down: set[int] = set()
        self.silent: set[int] = set()
        self.failing: set[int] = set()
        self.garble: set[int] = set()
        self.sent: list[Message] = []
        self.replies: dict[str, Message] = {}
        self.after_push: Callable[[list[Message]], None] = lambda messages: None

    def get_node_ids(self) -> list[int]:
        return [n for n in self.contexts if n not in self.down]

    def push_messages(self, messages):
        """Deliver each message at once and keep its reply for `pull_messages`; the message ids."""
        messages, ids = list(messages), []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            ids.append(msg.metadata.message_id)
            if (reply := self._reply(msg)) is not None:
                self.replies[msg.metadata.message_id] = reply
        self.after_push(messages)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def _reply(self, msg: Message) -> Message | None:
        node, train = msg.metadata.dst_node_id, msg.metadata.message_type.startswith("train.")
        if train and node in self.silent:
            return None
        if node in self.down or (train and node in self.failing):
            return Message(Error(code=5, reason="node unavailable"), reply_to=msg)
        try:
            reply = client_app.app(msg, self.contexts[node])
        except Exception as exc:  # the SuperNode turns a ClientApp exception into an error reply
            reply = Message(Error(code=2, reason=str(type(exc)) + ":<'" + str(exc) + "'>"), reply_to=msg)  # as Flower
        if train and node in self.garble and reply.has_content():
            bodies = [b[:-1] + bytes([b[-1] ^ 1]) for b in unpack(reply.content)]
            reply = Message(pack(bodies), reply_to=msg)
        return reply


@pytest.fixture
def in_process(monkeypatch):
    """Give this process the task identity Flower gives a ServerApp process, and build each
    config's Experiment once per test (as the simulator does) to keep the apps fast."""
    monkeypatch.setattr(Experiment, "from_config", functools.lru_cache(Experiment.from_config))
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def serve(grid: LoopbackGrid, rc: dict) -> None:
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))


def test_apps_in_one_process_match_the_simulator(tmp_path, sim, in_process):
    rc = run_config(out_dir=str(tmp_path / "run"))
    grid = LoopbackGrid(rc, [1, 0])
    serve(grid, rc)
    assert_same_run(tmp_path / "run", sim)
    summary = read_summary(tmp_path / "run")
    assert summary["partitions"] == {"0": 101, "1": 100} and summary["missing_partitions"] == []
    assert set(summary["federated_eval"]["nodes"]) == {"0", "1"}
    assert 0.0 < summary["federated_eval"]["accuracy"] <= 1.0
    types = [m.metadata.message_type for m in grid.sent]
    assert types == ["query.partition"] * 2 + ["train.mask"] * 4 + ["train.train"] * 4 + ["evaluate"] * 2
    assert all(set(r) <= set(RoundRecord.__annotations__) for r in read_rounds(tmp_path / "run"))
    elapsed = [r["elapsed"] for r in read_rounds(tmp_path / "run")]  # as mpfl run records it: seconds so far
    assert all(0 < a < b for a, b in zip(elapsed, elapsed[1:])) and elapsed[-1] <= summary["wall_time"]


def test_flower_errors_name_flowers_keys_not_mpfl_runs_flags(tmp_path, in_process):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    rc = run_config(out_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="already holds files; choose another out-dir$"):
        serve(LoopbackGrid(rc, [0, 1]), rc)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert flower_wording("use --mask-rounds 2, --nodes 4 or --data-dir, not --resume; flwr run --run-config x") == \
        "use prune.mask-rounds 2, nodes 4 or data.data-dir, not --resume; flwr run --run-config x"
    assert flower_wording("point --data-dir at it", node=True) == "point the node config's data-dir at it"


def test_a_supernode_that_cannot_prepare_the_run_replies_with_the_reason():
    rc = run_config()
    reply, timing = handle(rc, {"partition-id": 5, "num-partitions": 2}, RecordDict(), "mask", RecordDict())
    assert isinstance(reply, NodeFailure) and timing["node"] == 0.0
    assert reply.reason.startswith("node could not prepare the run: ") and "partition-id" in reply.reason


@pytest.mark.parametrize("task", ["mask", "evaluate"])
def test_a_malformed_request_gets_the_nodes_reason_not_flowers_generic_error(task):
    """Two bodies where one is due: the node replies with what was wrong, for tasks and evaluation alike."""
    reply, _ = handle(run_config(), {"partition-id": 0, "num-partitions": 2}, RecordDict(), task,
                      pack([b"x", b"y"], 1))
    assert isinstance(reply, NodeFailure) and reply.reason.startswith("node rejected the request: ")


def test_mask_adaptation_in_training_runs_on_the_apps_as_in_the_simulator(tmp_path, in_process):
    """Averaged mask rounds, cores and regrow votes with swaps travel through the Flower apps (and
    the server's momentum steps the same)."""
    extra = {"rounds": 4, "prune.mask-average-from": 1, "adapt.adapt-until": 1.0, "train.server-momentum": 0.9,
             "federated-eval": False, "out-dir": str(tmp_path / "run")}
    rc = run_config(**extra)
    cfg, _ = from_run_config(rc)
    grid = LoopbackGrid(rc, [0, 1])
    serve(grid, rc)
    sim = simulate(cfg)
    assert any(r.get("swapped") for r in sim.records)
    assert_same_run(tmp_path / "run", sim)
    types = [m.metadata.message_type for m in grid.sent]
    assert types.count("train.adapt") == 2 and types.count("train.mask") == 2 * 2  # swaps after training round 2


def test_filter_masks_run_on_the_apps_as_in_the_simulator(tmp_path, in_process):
    """Nodes train the shrunk model and both servers clear what dropped filters own, so the runs agree."""
    rc = run_config(**{"prune.criterion": "filter", "rounds": 2, "train.server-momentum": 0.9,
                       "federated-eval": False, "out-dir": str(tmp_path / "run")})
    cfg, _ = from_run_config(rc)
    serve(LoopbackGrid(rc, [0, 1]), rc)
    sim = simulate(cfg)
    assert sim.records[-1]["density"] < 1
    assert_same_run(tmp_path / "run", sim)


def test_malicious_nodes_and_robust_rules_run_as_in_the_simulator(tmp_path, in_process):
    extra = {"nodes": 3, "faults.malicious": 1, "faults.attack": "inverted-mask", "robust.vote-weighting": "agreement",
             "robust.aggregator": "median", "federated-eval": False, "out-dir": str(tmp_path / "run")}
    rc = run_config(**extra)
    cfg, _ = from_run_config(rc)
    serve(LoopbackGrid(rc, [0, 1, 2]), rc)
    sim = simulate(cfg)
    assert_same_run(tmp_path / "run", sim)
    assert read_summary(tmp_path / "run")["malicious_nodes"] == sim.summary["malicious_nodes"] != []


def test_silent_nodes_withhold_their_replies_on_flower_as_in_the_simulator(tmp_path, in_process):
    rc = run_config(nodes=3, **{"faults.malicious": 1, "faults.attack": "silent", "federated-eval": False,
                                "out-dir": str(tmp_path / "run")})
    cfg, _ = from_run_config(rc)
    serve(LoopbackGrid(rc, [0, 1, 2]), rc)
    sim = simulate(cfg)
    rounds = read_rounds(tmp_path / "run")
    assert [r["nodes"] for r in rounds] == [r["nodes"] for r in sim.records]
    for got, want in zip(rounds, sim.records, strict=True):
        assert set(got["dropped"]) == set(want["dropped"]) == {str(n) for n in sim.summary["malicious_nodes"]}
        assert all(reason.endswith("withheld its reply (silent attack)") for reason in got["dropped"].values())
    for got, want in zip(load_final(tmp_path / "run").weights.values(), sim.weights, strict=True):
        assert np.array_equal(got, want)


def test_failed_nodes_are_left_out_and_recorded_per_round(in_process):
    cfg, _ = from_run_config(run_config(nodes=4, method="fedavg"))
    grid = LoopbackGrid(run_config(nodes=4, method="fedavg"), [0, 1, 2, 3])
    transport = FlowerTransport(grid, round_timeout=1.0)
    assert transport.connect(cfg.nodes, cfg.min_nodes, timeout=1.0) == []
    exp = Experiment.from_config(cfg)
    records = []

    def on_round(record: dict) -> None:
        records.append(record)
        grid.down = {101}

    grid.failing, grid.silent, grid.garble = {101}, {102}, {103}
    Server(cfg, exp.spec, exp.w0, transport, evaluate=exp.evaluate, on_round=on_round).run()
    first, second = records
    assert first["nodes"] == second["nodes"] == [0]
    assert first["dropped"]["1"] == "error reply (Flower code 5): node unavailable"
    assert first["dropped"]["2"] == second["dropped"]["2"] == "no reply within 1 s"
    assert first["dropped"]["3"].startswith("rejected:") and second["dropped"]["3"].startswith("rejected:")
    assert second["dropped"]["1"] == "SuperNode 101 is no longer connected"


def test_below_min_nodes_the_run_stops_with_a_clear_message_and_keeps_its_rounds(tmp_path, in_process):
    rc = {**run_config(min_nodes=2, out_dir=str(tmp_path / "run")), "round-timeout": 2.0}
    grid = LoopbackGrid(rc, [0, 1])
    grid.silent = {101}
    with pytest.raises(RoundError, match=r"step 1 \(mask\): only 1 valid replies, fewer than min-nodes = 2. "
                                         r"node 1: no reply within 2 s"):
        serve(grid, rc)
    assert (tmp_path / "run" / "config.toml").is_file() and not (tmp_path / "run" / "summary.json").exists()


def test_centralized_is_refused_before_any_node_is_contacted(tmp_path, in_process):
    rc = run_config(method="centralized", out_dir=str(tmp_path / "run"))
    grid = LoopbackGrid(rc, [0, 1])
    with pytest.raises(RoundError, match="centralized method needs the pooled training data"):
        serve(grid, rc)
    assert grid.sent == [] and not (tmp_path / "run").exists()



def test_a_run_without_out_dir_that_writes_nothing_leaves_no_folder_under_runs(tmp_path, in_process, monkeypatch):
    """The ServerApp takes a new folder under runs/ at once (so runs started in the same second get one
    each) and removes it again when the run stops before writing anything there."""
    monkeypatch.chdir(tmp_path)
    rc = run_config(method="centralized", out_dir="")
    with pytest.raises(RoundError, match="centralized method needs the pooled training data"):
        serve(LoopbackGrid(rc, [0, 1]), rc)
    assert list((tmp_path / "runs").iterdir()) == []


def test_flowers_simulation_engine_without_ray_is_refused_before_anything_starts(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r'needs Ray, which is not installed: pip install "flwr\[simulation\]"'):
        LocalFederation(tmp_path / "fed", 2, simulation=True)
    assert not (tmp_path / "fed").exists()


def test_misconfigured_supernodes_are_left_out_and_the_run_goes_on(in_process):
    rc = run_config()
    grid = LoopbackGrid(rc, [0, 1], num_partitions=3)
    with pytest.raises(RoundError, match="only 0 of 2 partitions joined.*num-partitions = 3 but the run has nodes = 2") \
            as refused:
        FlowerTransport(grid, 1.0).connect(2, 1, timeout=0.1)
    assert "2 SuperNode(s) connected, and these were left out" in str(refused.value)
    assert "within" not in str(refused.value)  # every SuperNode came at once: none was waited for
    stray = FlowerTransport(LoopbackGrid(rc, [1, 1, 0], num_partitions=2), 1.0)
    assert stray.connect(2, 1, timeout=0.1) == [1] and stray.node_ids() == [0]
    assert [(e["node"], e["supernode"], e["step"], e["phase"]) for e in stray.left_out] == [(1, 100, 0, "connect"),
                                                                                          (1, 101, 0, "connect")]
    assert stray.left_out[0]["reason"].startswith("partition-id 1 is also claimed by SuperNode 101")
    with pytest.raises(RoundError, match="SuperNode 100: partition-id 1 is also claimed by SuperNode 101"):
        FlowerTransport(LoopbackGrid(rc, [1, 1, 0], num_partitions=2), 1.0).connect(2, 2, timeout=0.1)
    one = FlowerTransport(LoopbackGrid(rc, [1], num_partitions=2), 1.0)
    assert one.connect(2, 1, timeout=0.1) == [0] and one.node_ids() == [1]


def test_the_summary_names_the_flower_runner():
    from flwr.superlink.grid import InMemoryGrid

    assert server_app.runner_of(InMemoryGrid.__new__(InMemoryGrid)) == "flower-simulation"
    assert server_app.runner_of(LoopbackGrid(run_config(), [0])) == "flower-deployment"


def request_bytes(messages: list[Message]) -> dict[int, int]:
    """The codec bytes of `messages` by step (their group id)."""
    out: dict[int, int] = {}
    for m in messages:
        out[int(m.metadata.group_id)] = out.get(int(m.metadata.group_id), 0) + sum(map(len, unpack(m.content)))
    return out


def test_bytes_count_the_messages_sent_and_lost_nodes_are_summarised(tmp_path, in_process):
    """A node gone after the first round: no request is sent to it any more, and the counted bytes
    are those of the messages the grid carried, round by round; the summary names the lost node."""
    rc = run_config(nodes=3, out_dir=str(tmp_path / "run"))
    grid = LoopbackGrid(rc, [0, 1, 2])
    pushes = []

    def stop_node_1_after_round_1(messages: list[Message]) -> None:
        pushes.append(messages)
        if len(pushes) == 2:  # the partition queries, then round 1: node 1 is gone from round 2 on
            grid.down = {101}

    grid.after_push = stop_node_1_after_round_1
    serve(grid, rc)
    rounds, summary = read_rounds(tmp_path / "run"), read_summary(tmp_path / "run")
    carried = request_bytes([m for m in grid.sent if m.metadata.message_type.startswith("train.")])
    assert [r["bytes_down"] for r in rounds] == [carried[r["step"]] for r in rounds]
    assert summary["bytes_down"] == sum(carried.values())
    assert [r["nodes"] for r in rounds] == [[0, 1, 2]] + [[0, 2]] * (len(rounds) - 1)
    assert all(r["dropped"] == {"1": "SuperNode 101 is no longer connected"} for r in rounds[1:])
    assert summary["lost_nodes"] == [{"node": 1, "step": 2, "phase": "mask", "reason": "SuperNode 101 is no longer connected"}]
    evaluations = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert [m.metadata.dst_node_id for m in evaluations] == [100, 102]
    assert summary["bytes_eval_down"] == sum(request_bytes(evaluations).values()) > 0
    assert summary["bytes_eval_up"] == 2 * 3 * METRIC_BYTES
    assert summary["runner"] == "flower-deployment"
    final = list(load_final(tmp_path / "run").weights.values())
    body = unpack(evaluations[0].content)[0]  # the final weights, exact, at their coded positions only
    assert bits(codec.decode_sparse(body, [w.shape for w in final]).tensors) == bits(final)
    assert len(body) < 0.2 * sum(w.nbytes for w in final)


# --------------------------------------------------------------------------- the node side


@pytest.fixture(scope="module", autouse=True)
def user_cache(tmp_path_factory):
    """A user cache of this module's own (cached datasets, warm node processes), for the apps run here
    and the SuperNodes the deployment tests start (they inherit the environment)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
    yield
    patch.undo()


def first_request(rc: dict) -> RecordDict:
    """The content of the first mask round's request to node 0: the reference to the initial weights."""
    cfg, _ = from_run_config(rc)
    exp = Experiment.from_config(cfg)
    server = Server(cfg, exp.spec, exp.w0, FlowerTransport(LoopbackGrid(rc, [0]), 1.0))
    return pack(server.w0_body(0, server.plan[0], {}), step=server.plan[0].step)


def node_context(rc: dict, node_id: int = 7, **node_config) -> Context:
    return Context(run_id=1, node_id=node_id, state=RecordDict(), run_config=rc,
                   node_config={"partition-id": 0, "num-partitions": 2, **node_config})


def same_state(a: NodeState, b: NodeState) -> bool:
    """Whether two node states hold the same counters and the same arrays."""
    def same(x, y):
        return x is None and y is None or (x is not None and y is not None and len(x) == len(y)
                                           and all(np.array_equal(u, v) for u, v in zip(x, y)))
    return a.version == b.version and all(same(getattr(a, f), getattr(b, f)) for f in ("w0", "mask", "local", "residual"))


def test_the_clientapp_module_stays_light_and_routes_every_builtin_task():
    """A deployment starts a process per message: its ClientApp imports neither torch nor the node
    code, yet handles every task `mpfl.node` registers."""
    code = ("import sys, mpfl.flower.client_app as app; assert 'torch' not in sys.modules, 'torch imported'; "
            "from mpfl.protocol import BUILTIN_TASKS; import mpfl.node as node; "
            "assert set(BUILTIN_TASKS) == set(node.NODE_TASKS.names()), node.NODE_TASKS.names()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_warm_node_process_replies_as_the_clientapp_itself_and_leaves_when_idle(tmp_path, in_process):
    rc, request = run_config(), first_request(run_config())
    here = node_context(rc)
    want, _ = handle(rc, here.node_config, here.state, "mask", request)
    there = node_context(rc)
    got, timing = warm.forward(there, "mask", request, 2.0, root=tmp_path, parent=os.getpid())
    assert unpack(got) == unpack(want) and set(timing) == {"setup", "node"}
    assert same_state(load_state(there.state), load_state(here.state))
    paths = warm.paths_for(there.node_id, tmp_path)
    pid = int(paths.pid.read_text())
    again, timing = warm.forward(node_context(rc), "mask", request, 2.0, root=tmp_path, parent=os.getpid())
    assert unpack(again) == unpack(want) and int(paths.pid.read_text()) == pid and timing["setup"] < 0.05
    refused, _ = warm.forward(node_context(rc, **{"num-partitions": 3}), "mask", request, 2.0, root=tmp_path,
                              parent=os.getpid())
    assert isinstance(refused, NodeFailure) and "num-partitions = 3 but the run has nodes = 2" in refused.reason
    deadline = time.monotonic() + 30
    while warm._alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not warm._alive(pid) and not paths.socket.exists() and not paths.key.exists()


def test_cached_dataset_is_the_loaded_one_and_read_from_the_cache_later(tmp_path, monkeypatch):
    first, loaded = load_cached("mnist", root=tmp_path), load_dataset("mnist")
    (entry,) = tmp_path.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "x_test.npy", "x_train.npy", "y_test.npy",
                                                       "y_train.npy"]
    monkeypatch.setattr(datacache, "load_dataset", lambda *args: pytest.fail("read the dataset files again"))
    for cached in (first, load_cached("mnist", root=tmp_path)):
        for split in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(cached, split), getattr(loaded, split))
        assert (cached.name, cached.num_classes) == (loaded.name, loaded.num_classes)


def doc_text() -> str:
    """docs/deployment.md with continued lines joined and runs of white space made one space."""
    return " ".join((REPO / "docs" / "deployment.md").read_text().replace("\\\n", " ").split())


def test_the_deployment_guide_shows_the_commands_the_tests_run():
    """The guide's TLS recipe, SuperLink, SuperNode and registration commands are those LocalFederation
    runs (rendered with the guide's host names), and its node config parses as Flower parses it."""
    doc = doc_text()
    remote = "coordinator.example.org:8000"
    commands = [*certificate_commands("DNS:coordinator.example.org,IP:127.0.0.1"), supernode_key_command("supernode-0")]
    commands += [shlex.join(args) for args in (
        superlink_command("0.0.0.0", 8000, secure=False), superlink_command("0.0.0.0", 8000, secure=True),
        register_command("supernode-0.pub"), supernode_command(remote, 0, 4, data_dir="/data/mpfl"),
        supernode_command(remote, 0, 4, key="supernode-0"), superlink_command(HOST, 8000, secure=False),
        *(supernode_command(f"{HOST}:8000", i, 2, port=9094 + i) for i in range(2)))]
    for command in commands:
        assert " ".join(command.split()) in doc, command
    assert "IP:127.0.0.1" in LOOPBACK_NAMES and f'default = "{CONNECTION}"' in doc
    node_config = supernode_command(remote, 0, 4, data_dir="/data/mpfl")[-1]
    settings = node_settings(parse_config_args([node_config]), Config(nodes=4))
    assert (settings.partition_id, settings.num_partitions, settings.data_dir) == (0, 4, "/data/mpfl")


# --------------------------------------------------------------------------- deployment on loopback

_flower_cli = pytest.mark.skipif(shutil.which("flower-superlink") is None or shutil.which("flwr") is None,
                                 reason="Flower's command line tools are not installed")


def deployment(test):
    """A test on a real local deployment: slow (a SuperLink and SuperNodes), and skipped without Flower's tools."""
    return pytest.mark.slow(_flower_cli(test))


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A SuperLink and two SuperNodes (partitions 0 and 1) on 127.0.0.1, ended after the module."""
    with LocalFederation(tmp_path_factory.mktemp("flower"), nodes=2) as fed:
        yield fed


@deployment
def test_a_supernode_stopped_mid_run_is_left_out_and_the_run_finishes(federation, tmp_path):
    out = tmp_path / "run"
    run_id = federation.run(REPO, {**SMALL, "out-dir": str(out), "rounds": 1, "federated-eval": False})
    log, deadline = out / "rounds.jsonl", time.monotonic() + 240
    while not (log.is_file() and log.read_text().endswith("\n")):
        assert time.monotonic() < deadline, "the first round did not finish in time"
        time.sleep(0.5)
    federation.stop_supernode(1)
    run = federation.wait(run_id, 300, done=out / "summary.json")
    assert run["status"] == "finished:completed", run["status-details"]
    rounds = read_rounds(out)
    assert len(rounds) == 3 and rounds[0]["nodes"] == [0, 1] and rounds[0]["dropped"] == {}
    missing = [i for i, r in enumerate(rounds) if "1" in r["dropped"]]
    assert missing and missing == list(range(missing[0], 3))
    for r in rounds[missing[0]:]:
        assert r["nodes"] == [0] and r["dropped"]["1"]
    summary, first = read_summary(out), rounds[missing[0]]
    assert summary["final_accuracy"] is not None
    assert summary["lost_nodes"] == [{"node": 1, "step": first["step"], "phase": first["phase"],
                                      "reason": first["dropped"]["1"]}]


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("ssh-keygen") is None,
                    reason="openssl and ssh-keygen make the certificates and keys")
@deployment
def test_a_plugin_method_runs_on_a_deployment_with_tls_and_node_authentication_as_in_the_simulator(tmp_path):
    """The TLS recipe of docs/deployment.md (a private CA, the SuperLink's certificate for localhost
    and 127.0.0.1) and node authentication (EC keys registered with flwr supernode register). Every
    SuperNode imports the run config's plug-in before handling a message, so a method defined outside
    the package runs on Flower and gives the simulator's results. A SuperNode whose key is not
    registered, started while the run goes on, is refused and exits with code 1."""
    out = tmp_path / "run"
    extra = {"plugins": str(REPO / "examples" / "custom_method.py"), "method": "mpfl-dense-head", "rounds": 1,
             "prune.mask-rounds": 1}  # a round of each phase: each round costs Flower a process per node and message
    with LocalFederation(tmp_path / "flower", nodes=2, secure=True) as fed:
        run_id = fed.run(REPO, {**SMALL, **extra, "out-dir": str(out)})
        stray = fed.start_supernode(0, key="stray", register=False)
        run = fed.wait(run_id, 300, done=out / "summary.json")
        assert run["status"] == "finished:completed", run["status-details"]
        assert stray.wait(120) == 1
    cfg, _ = from_run_config(run_config(**extra))
    assert_same_run(out, simulate(cfg))
    assert "5.weight" not in load_final(out).mask
    summary = read_summary(out)
    assert summary["lost_nodes"] == [] and summary["bytes_eval_up"] == 2 * 3 * METRIC_BYTES
    assert run["network-traffic"]["total-bytes"] > summary["bytes_up"] + summary["bytes_down"]
    assert "Exit Code: 305" in (tmp_path / "flower" / "supernode-2.log").read_text()


def test_sampled_mask_rounds_on_the_apps_ask_the_nodes_the_simulator_asks(tmp_path, in_process):
    """With fewer nodes asked per mask round than there are, the ServerApp samples as the simulator
    does, and nodes left out of a round catch up when next asked: the same run, byte for byte."""
    rc = run_config(nodes=4, **{"train.fraction": 0.5, "prune.mask-rounds": 3, "federated-eval": False,
                                "out-dir": str(tmp_path / "run")})
    cfg, _ = from_run_config(rc)
    grid = LoopbackGrid(rc, [0, 1, 2, 3])
    serve(grid, rc)
    sim = simulate(cfg)
    assert_same_run(tmp_path / "run", sim)
    assert all(len(r["nodes"]) == 2 for r in sim.records)
    types = [m.metadata.message_type for m in grid.sent]
    assert types.count("train.mask") == 2 * 3


def test_a_client_apps_exception_reads_as_its_type_and_message():
    from mpfl.flower.transport import error_reason

    flower = "<class 'mpfl.errors.ConfigError'>:<'partition-id = 7 is outside 0..2'>"
    assert error_reason(flower) == "ConfigError: partition-id = 7 is outside 0..2"
    assert error_reason("<class 'ValueError'>:<'two\nlines'>") == "ValueError: two\\nlines"  # one log line
    assert error_reason("node unavailable") == "node unavailable"  # Flower's own reasons stay as they are


def test_a_long_or_controlling_error_reason_is_cut_and_made_printable():
    from mpfl.flower.transport import REASON_CHARS, error_reason

    assert error_reason("bad\x1b[2J\x07 news\nstep 9 (train 5): accuracy 99.00%") == \
        "bad [2J  news\\nstep 9 (train 5): accuracy 99.00%"  # no terminal controls, no forged log line
    long = error_reason("x" * 50_000)
    assert long == "x" * REASON_CHARS + "... (50000 characters)"
    assert error_reason(None) == "no reason given"


def test_a_nodes_timing_is_kept_only_as_finite_seconds_of_the_parts_nodes_report():
    from flwr.app import MetricRecord

    from mpfl.flower.payload import TIMING, timing_of

    honest = client_app.reply_timing(0.5, {"setup": 0.125, "node": 0.25, "import_node": 0.0625})
    assert timing_of(RecordDict({TIMING: honest})) == {"setup": 0.125, "node": 0.25, "import_node": 0.0625,
                                                         "handler": 0.5, "process": honest["process"]}
    for forged in ({"setup": float("nan")}, {"node": float("inf")}, {"setup": -1.0}, {"node": [0.1, 0.2]},
                   {"setup": 0.1, "padding": 1.0}):
        assert timing_of(RecordDict({TIMING: MetricRecord(forged)})) is None
    assert timing_of(RecordDict()) is None


class ForgedEvaluation(LoopbackGrid):
    """A LoopbackGrid whose SuperNodes in `forged` answer the federated evaluation with those metrics."""

    def __init__(self, rc: dict, partitions: list[int], forged: dict[int, dict]) -> None:
        super().__init__(rc, partitions)
        self.forged = forged

    def _reply(self, msg: Message) -> Message | None:
        from flwr.app import MetricRecord

        from mpfl.flower.payload import METRICS

        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == "evaluate" and node in self.forged:
            return Message(RecordDict({METRICS: MetricRecord(self.forged[node])}), reply_to=msg)
        return super()._reply(msg)


def test_federated_evaluation_refuses_malformed_metrics_and_bounds_claimed_examples(tmp_path, in_process):
    """A node's evaluation is its own claim: metrics out of range leave it out with the reason, and a
    huge number of examples weighs at most count-limit (2.5) times the lower median, as training counts do."""
    rc = run_config(nodes=3, out_dir=str(tmp_path / "run"), method="fedavg", rounds=1)
    grid = ForgedEvaluation(rc, [0, 1, 2], {101: {"accuracy": 1.0, "loss": 0.0, "num-examples": 10**9},
                                            102: {"accuracy": 7.0, "loss": 0.1, "num-examples": 50}})
    serve(grid, rc)
    summary = read_summary(tmp_path / "run")
    nodes = summary["federated_eval"]["nodes"]
    assert set(nodes) == {"0", "1"}
    honest = nodes["0"]
    want = (honest["num-examples"] * honest["accuracy"] + 2.5 * honest["num-examples"] * 1.0) / (
        3.5 * honest["num-examples"])
    assert summary["federated_eval"]["accuracy"] == pytest.approx(want, rel=1e-12)
    lost = [entry for entry in summary["lost_nodes"] if entry["phase"] == "evaluate"]
    assert [entry["node"] for entry in lost] == [2]
    assert lost[0]["reason"].startswith("malformed evaluation reply: evaluation metrics must be an accuracy in [0, 1]")


@pytest.mark.parametrize("metrics, valid", [
    ({"accuracy": 0.5, "loss": 1.25, "num-examples": 40}, True),
    ({"accuracy": 0.1, "loss": float("nan"), "num-examples": 40}, True),  # a diverged model, as the server records it
    ({"accuracy": 1, "loss": float("inf"), "num-examples": 0}, True),
    ({"accuracy": float("nan"), "loss": 1.0, "num-examples": 40}, False),
    ({"accuracy": 1.5, "loss": 1.0, "num-examples": 40}, False),
    ({"accuracy": 0.5, "loss": -1.0, "num-examples": 40}, False),
    ({"accuracy": 0.5, "loss": 1.0, "num-examples": 40.5}, False),
    ({"accuracy": 0.5, "loss": 1.0, "num-examples": -3}, False),
    ({"accuracy": 0.5, "loss": 1.0}, False),
    ({"accuracy": 0.5, "loss": 1.0, "num-examples": 40, "bonus": 1.0}, False),
    ({"accuracy": [0.5, 0.6], "loss": 1.0, "num-examples": 40}, False),
])
def test_evaluation_metrics_are_read_only_in_their_ranges(metrics, valid):
    from flwr.app import MetricRecord

    from mpfl.flower.payload import METRICS, metrics_of

    content = RecordDict({METRICS: MetricRecord(metrics)})
    if valid:
        got = metrics_of(content)
        assert set(got) == set(metrics) and got["num-examples"] == metrics["num-examples"]
    else:
        with pytest.raises(PayloadError, match="evaluation metrics must be an accuracy in"):
            metrics_of(content)


def test_the_serverapp_log_names_a_nodes_reason_once_and_then_refers_to_it(caplog):
    """A missing dataset's reason, with its list of files, would otherwise fill every round's log."""
    import logging

    from conftest import round_record

    missing = "node could not prepare the run: no Fashion-MNIST in /data (looked for 4 files: ...)"
    said: dict = {}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        for step, reason in ((1, missing), (2, missing), (3, "no reply within 5 s"), (4, missing)):
            server_app._log_round(round_record(step, dropped={"1": reason}), said)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"step 1: node 1 left out: {missing}", "step 2: node 1 left out: as at step 1",
        "step 3: node 1 left out: no reply within 5 s", f"step 4: node 1 left out: {missing}"]
