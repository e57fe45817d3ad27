"""What the package trusts and what it keeps: sample counts nodes claim, malformed replies, run
directories a resume reads, one process per run folder, NaN in configs, and files written through links."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CLI_RUN, comparable, rewrite_arrays, tiny_config, wait_for_rounds
from mpfl import codec
from mpfl.attacks import malicious_ids
from mpfl.checkpoint import load_final
from mpfl.cli import main
from mpfl.config import Config, field_types
from mpfl.core import adapt
from mpfl.core.masks import jaccard
from mpfl.errors import ConfigError, PathError, PayloadError, RunDirError
from mpfl.experiment import Experiment
from mpfl.files import atomic_write, remove_stale_temps
from mpfl.locks import LOCK, RunLock
from mpfl.node import Node, make_trainer
from mpfl.protocol import TASK_ADAPT
from mpfl.records import read_rounds
from mpfl.server import Server
from mpfl.sim import InProcessTransport, simulate

# --------------------------------------------------------------------------- sample counts


def _claiming(body: bytes, count: int) -> bytes:
    """`body` with its num_samples header field set to `count` and the checksum fixed, as a forger would."""
    b = bytearray(body)
    b[16:20] = count.to_bytes(4, "little")
    b[28:32] = zlib.crc32(bytes(b[32:]), zlib.crc32(bytes(b[:28]))).to_bytes(4, "little")
    return bytes(b)


class RewritingTransport(InProcessTransport):
    """The in-process transport with one node's replies replaced per step by `rewrite(step, bodies)`."""

    def __init__(self, nodes, node: int, rewrite):
        super().__init__(nodes)
        self.node, self.rewrite = node, rewrite

    def exchange(self, task, step, requests):
        replies = super().exchange(task, step, requests)
        if self.node in replies:
            replies[self.node] = self.rewrite(step, replies[self.node])
        return replies


def _server(cfg, rewrite=None, node: int = 1):
    exp = Experiment.from_config(cfg)
    trainer = make_trainer(cfg, exp.model, exp.spec)
    nodes = [Node(i, cfg, trainer, exp.node_data(i), w0=exp.w0) for i in range(cfg.nodes)]
    transport = RewritingTransport(nodes, node, rewrite or (lambda step, bodies: bodies))
    records: list[dict] = []
    return Server(cfg, exp.spec, exp.w0, transport, on_round=records.append), records, exp


def test_a_node_count_is_fixed_at_its_first_claim_and_a_changed_claim_is_dropped():
    cfg = tiny_config(method="fedavg", rounds=3)
    server, records, exp = _server(cfg, lambda step, bodies: [_claiming(bodies[0], 2 * 500)] if step == 2 else bodies)
    server.run()
    sizes = {n: len(exp.partition.train[n]) for n in range(cfg.nodes)}
    assert server.state.counts == sizes
    assert [r["nodes"] for r in records] == [[0, 1, 2], [0, 2], [0, 1, 2]]
    assert records[1]["dropped"] == {"1": f"rejected: reply claims 1000 training samples, but this node's count is "
                                          f"fixed at {sizes[1]}"}


@pytest.mark.parametrize("body", [1, 2])
def test_a_reply_whose_later_bodies_claim_another_count_is_dropped(body):
    cfg = tiny_config(mask_rounds=1, rounds=1)

    def claim_more(step, bodies):
        return [_claiming(b, 999) if i == body else b for i, b in enumerate(bodies)]

    server, records, exp = _server(cfg, lambda step, bodies: claim_more(step, bodies) if step == 1 else bodies)
    server.run()
    size = len(exp.partition.train[1])
    assert records[0]["dropped"] == {"1": f"rejected: reply's bodies claim different training sample counts ({size} "
                                          "and 999); a later body claims the first one's count or none (0)"}
    assert records[1]["nodes"] == [0, 1, 2]


@pytest.mark.parametrize("step, asked_round, served", [(1, 1, True), (1, 9, False), (2, 2, False)])
def test_a_request_for_the_initial_weights_is_served_only_in_answer_to_this_rounds_reference(tmp_path, step,
                                                                                           asked_round, served):
    """With --init, the first mask round sends a reference to the initial weights; a node that answers it
    by asking for them, naming this round, is sent them in a second exchange. A request naming another
    round, or answering a training round, is refused as the reply it is, and nothing is sent twice."""
    cfg = tiny_config(mask_rounds=1, rounds=2)
    exp = Experiment.from_config(cfg)
    torch.save(exp.model.state_dict(), tmp_path / "init.pt")
    cfg = cfg.with_overrides({"init": str(tmp_path / "init.pt")})
    ask = codec.encode_init_request(codec.InitRef(asked_round, "request", cfg.seed, codec.weights_digest(exp.w0)))
    rewritten = []

    def once(at, bodies):  # only the node's first reply of that step asks
        if at != step or rewritten:
            return bodies
        rewritten.append(at)
        return [ask]

    server, records, _ = _server(cfg, once)
    exchanges = []
    exchange = server.transport.exchange
    server.transport.exchange = lambda task, at, requests: exchanges.append(at) or exchange(task, at, requests)
    server.run()
    assert exchanges == ([1, 1, 2, 3] if served else [1, 2, 3])
    if served:
        assert records[0]["nodes"] == [0, 1, 2] and records[0]["bytes_up"] > 0
    else:
        refused = "expected 3 reply bodies, got 1" if step == 1 else "expected a VALUES body, got INIT"
        assert records[step - 1]["dropped"] == {"1": f"rejected: {refused}"}


def test_registered_counts_refuse_every_other_claim():
    cfg = tiny_config(method="fedavg", rounds=2)
    server, records, exp = _server(cfg)
    sizes = {n: len(exp.partition.train[n]) for n in range(cfg.nodes)}
    server.register_counts({**sizes, 2: sizes[2] + 1})
    server.run()
    assert [r["nodes"] for r in records] == [[0, 1], [0, 1]]
    assert all("fixed at" in r["dropped"]["2"] for r in records)


def test_counts_are_bounded_by_a_multiple_of_the_lower_median():
    server, _, _ = _server(tiny_config(method="fedavg", nodes=4))
    server.state.counts = {0: 100, 1: 120, 2: 90, 3: 10**6}
    assert server.bounded_counts(range(4)) == {0: 100.0, 1: 120.0, 2: 90.0, 3: 250.0}  # lower median 100, limit 2.5
    server.cfg = server.cfg.with_overrides({"count_limit": 1.0})
    assert server.bounded_counts([1]) == {1: 100.0}


@pytest.mark.parametrize("counts", [{0: 500, 1: 4 * 10**9}, {0: 500, 1: 480, 2: 4 * 10**9, 3: 4 * 10**9}])
def test_half_of_the_nodes_forging_counts_stay_bounded_by_an_honest_count(counts):
    """With an even number of fixed counts, half of them forged (two nodes sampled in a round, one
    lying; or 2 of 4), the mean of the two middle counts would be half a forged one and bound nothing."""
    server, _, _ = _server(tiny_config(method="fedavg", nodes=len(counts)))
    server.state.counts = dict(counts)
    honest_max = max(c for c in counts.values() if c < 10**9)
    assert server.count_cap() <= 2.5 * honest_max
    assert set(server.limited_counts()) == {str(n) for n, c in counts.items() if c >= 10**9}


def test_forged_counts_give_an_attacker_at_most_count_limit_times_a_node():
    """A node claiming 1000x its samples weighs what count_limit allows in the vote and the mean:
    the aggregate equals a mean computed with the bounded weights."""
    cfg = tiny_config(method="fedavg", nodes=4, rounds=1, malicious=1, attack="sign-flip", attack_samples=1000)
    bad = malicious_ids(cfg)[0]
    result = simulate(cfg)
    honest_cfg = cfg.with_overrides({"attack_samples": 1.0})
    exp = Experiment.from_config(honest_cfg)
    trainer = make_trainer(honest_cfg, exp.model, exp.spec)
    full = exp.spec.supports(exp.spec.full_mask())
    request = [codec.encode_values(exp.w0, full, round=1)]
    tensors, sizes = [], []
    for n in range(cfg.nodes):
        reply = Node(n, honest_cfg, trainer, exp.node_data(n), w0=exp.w0).handle("train", 1, request)
        tensors.append(codec.decode_values(reply[0], full).tensors)
        sizes.append(len(exp.partition.train[n]))
    bounded = list(sizes)
    claimed = sorted(1000 * s if i == bad else s for i, s in enumerate(sizes))
    bounded[bad] = min(1000 * sizes[bad], 2.5 * claimed[1])  # the lower median of 4 counts
    want = [sum(w * t.astype(np.float64) for w, t in zip(bounded, per_node)) / sum(bounded) for per_node in zip(*tensors)]
    for got, expected in zip(result.weights, want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert result.summary["limited_counts"] == {str(bad): 1000 * sizes[bad]}  # the attacker, and no honest node
    assert simulate(honest_cfg).summary["limited_counts"] == {}


ATTACK = dict(nodes=10, train_samples=3000, test_samples=1000, mask_rounds=2, rounds=2, sparsity=0.8)
FORGE = dict(malicious=2, attack="inverted-mask", attack_samples=1000)


@pytest.mark.slow
def test_two_of_ten_forging_1000x_counts_with_inverted_masks():
    """The issue's attack on a small config: under sample-weighted votes, unbounded counts hand the
    attackers the mask; bounded (each forged count at 2.5x the median), the forged counts weigh as
    2.5 honest nodes, which hurts more than true counts but keeps most of the honest mask. The default
    agreement votes (with the trimmed mean) recover the honest-only mask even with unbounded counts,
    without losing accuracy."""
    samples = dict(vote_weighting="samples")
    honest = simulate(tiny_config(**ATTACK, **samples, malicious=2, attack="silent"))
    forged = simulate(tiny_config(**ATTACK, **samples, **FORGE))
    unbounded = simulate(tiny_config(**ATTACK, **samples, **FORGE, count_limit=1e9))
    true_counts = simulate(tiny_config(**ATTACK, **samples, **{**FORGE, "attack_samples": 1.0}))
    assert jaccard(unbounded.mask, honest.mask) < 0.2
    assert jaccard(true_counts.mask, honest.mask) >= jaccard(forged.mask, honest.mask) > 0.4
    bad = sorted(str(n) for n in malicious_ids(tiny_config(**ATTACK, **FORGE)))
    shares = forged.records[0]["vote_weights"]
    good = next(n for n in shares if n not in bad)
    assert all(shares[n] == pytest.approx(2.5 * shares[good], rel=1e-3) for n in bad)

    assert Config().robust.vote_weighting == "agreement"
    clean = simulate(tiny_config(**ATTACK))
    honest_agreement = simulate(tiny_config(**ATTACK, malicious=2, attack="silent"))
    unbounded_agreement = simulate(tiny_config(**ATTACK, **FORGE, count_limit=1e9))
    assert jaccard(unbounded_agreement.mask, honest_agreement.mask) >= 0.98
    robust = simulate(tiny_config(**ATTACK, **FORGE, aggregator="trimmed-mean"))
    assert jaccard(robust.mask, honest_agreement.mask) >= 0.98
    assert robust.summary["final_accuracy"] >= clean.summary["final_accuracy"] - 0.005
    assert all(robust.records[0]["vote_weights"][n] == 0.0 for n in bad)


def test_trimmed_votes_record_the_equal_weights_they_use():
    result = simulate(tiny_config(nodes=5, mask_rounds=1, rounds=0, vote_weighting="trimmed", **{
        "malicious": 1, "attack": "inverted-mask", "attack_samples": 1000}))
    assert result.records[0]["vote_weights"] == {str(n): 0.2 for n in range(5)}


ADAPT = dict(nodes=5, mask_rounds=1, rounds=2, adapt_every=1, adapt_until=1.0, sparsity=0.8)


def _forged_votes(monkeypatch, cfg, vote, body: int = 1) -> tuple[list[dict], list, list]:
    """Run `cfg` with node 1 claiming 1000x its samples and sending `vote(honest vote, positions)` as
    its regrow vote (`body` 1, over the pruned positions) or drop vote (2, over the kept ones) in the
    adaptation round (round 2). Returns the records, the other nodes' votes and the positions the
    server regrew."""
    exp = Experiment.from_config(cfg)
    trainer = make_trainer(cfg, exp.model, exp.spec)
    honest, grown = [], []
    forged_count = 1000 * len(exp.partition.train[1])

    class Forging(InProcessTransport):
        def exchange(self, task, step, requests):
            replies = super().exchange(task, step, requests)
            bodies = replies[1]
            bodies[0] = _claiming(bodies[0], forged_count)
            if task == TASK_ADAPT:
                state = server.state
                over = [~m for m in state.mask] if body == 1 else state.mask
                honest.extend(codec.decode_mask(replies[n][body], over).tensors for n in replies if n != 1)
                bodies[body] = codec.encode_mask(vote(honest[0], over), over, round=step, base_version=state.version)
            return replies

    def recording_swap(*args):
        out = swap(*args)
        grown.append(out[1])
        return out

    swap = adapt.swap
    monkeypatch.setattr(adapt, "swap", recording_swap)
    records: list[dict] = []
    transport = Forging([Node(i, cfg, trainer, exp.node_data(i), w0=exp.w0) for i in range(cfg.nodes)])
    server = Server(cfg, exp.spec, exp.w0, transport, on_round=records.append)
    server.run()
    return records, honest, grown[0] if grown else []


def _random_vote(like: list[np.ndarray], pruned: list[np.ndarray]) -> list[np.ndarray]:
    """As many pruned positions per tensor as an honest vote names, drawn at random."""
    rng = np.random.default_rng(0)
    out = []
    for layer, candidates in zip(like, pruned):
        vote = np.zeros(candidates.size, dtype=bool)
        vote[rng.choice(np.flatnonzero(candidates), int(layer.sum()), replace=False)] = True
        out.append(vote.reshape(candidates.shape))
    return out


@pytest.mark.parametrize("weighting", ["samples", "agreement", "trimmed"])
def test_regrow_votes_are_weighed_by_the_rule_of_the_mask_votes(monkeypatch, weighting):
    """A node claiming 1000x its samples votes for random pruned positions in an adaptation round.
    Under `samples` its bounded count (2.5x a node) regrows positions no honest node voted for; the
    robust rules of the mask votes, now applied to these votes too, leave it nothing of its own."""
    records, honest, grown = _forged_votes(monkeypatch, tiny_config(**ADAPT, vote_weighting=weighting), _random_vote)
    assert records[1]["nodes"] == [0, 1, 2, 3, 4] and records[1]["swapped"] > 0
    voted_by_honest = [np.logical_or.reduce(layers) for layers in zip(*honest)]
    forger_alone = sum(int(np.count_nonzero(g & ~h)) for g, h in zip(grown, voted_by_honest))
    assert (forger_alone > 0) == (weighting == "samples")


@pytest.mark.parametrize("body, kind", [(1, "regrow"), (2, "drop")])
def test_a_swap_vote_naming_more_positions_than_the_swap_count_is_dropped(monkeypatch, body, kind):
    """A vote for every position it may name would weigh as many nodes' votes: each vote must name
    exactly the swap count of each tensor, as every honest node's does."""
    records, honest, _ = _forged_votes(monkeypatch, tiny_config(**ADAPT, adapt_drop="votes"),
                                       lambda like, positions: positions, body)
    k = int(honest[0][0].sum())
    assert records[1]["nodes"] == [0, 2, 3, 4] and list(records[1]["dropped"]) == ["1"]
    named = re.fullmatch(rf"rejected: the {kind} vote names (\d+) positions of prunable tensor 0, not its swap count {k}",
                         records[1]["dropped"]["1"])
    assert named and int(named[1]) > k > 0


# --------------------------------------------------------------------------- malformed replies


@pytest.mark.parametrize("garbage, reason", [
    ("a string", "a reply must be a list of bodies, got str"),
    (None, "a reply must be a list of bodies, got NoneType"),
    (42, "a reply must be a list of bodies, got int"),
    ({"body": b"x"}, "a reply must be a list of bodies, got dict"),
    (b"bytes, not a list", "a reply must be a list of bodies, got bytes"),
    (["text"], "reply bodies must be bytes, got str"),
    ([None, 3.5], "reply bodies must be bytes, got NoneType, float"),
])
def test_a_bad_reply_of_any_type_is_dropped_with_its_reason(garbage, reason):
    server, records, _ = _server(tiny_config(method="fedavg", rounds=2), lambda step, bodies: garbage)
    server.run()
    assert [r["nodes"] for r in records] == [[0, 2], [0, 2]]
    assert all(r["dropped"] == {"1": f"rejected: {reason}"} for r in records)


@pytest.mark.parametrize("body", ["text", None, 7, [b"MPFL"]])
def test_the_codec_refuses_a_body_that_is_not_bytes(body):
    full = [np.ones(4, bool)]
    for decode in (lambda: codec.peek(body), lambda: codec.decode_mask(body, full),
                   lambda: codec.decode_values(body, full)):
        with pytest.raises(PayloadError, match=f"a body must be bytes, got {type(body).__name__}"):
            decode()


# --------------------------------------------------------------------------- config


FLOAT_FIELDS = sorted(name for name, hint in field_types().items() if str(hint).startswith("float")
                      or str(hint) == "<class 'float'>")


def test_the_float_fields_are_all_found():
    assert {"lr", "sparsity", "value_limit", "alpha", "percentile", "count_limit", "attack_samples"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_infinity_are_refused_in_every_float_field(name, value, capsys):
    with pytest.raises(ConfigError, match=rf"^{name} = -?(nan|inf) must be a finite number$"):
        Config().with_overrides({name: value})
    flag = "--" + name.replace("_", "-")
    assert main(["run", f"{flag}={value}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} = {value} must be a finite number" in err and "Traceback" not in err


def test_nan_in_a_toml_file_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = nan\n")
    with pytest.raises(ConfigError, match="lr = nan must be a finite number"):
        Config.from_toml(path)


@pytest.mark.parametrize("key", ["round-timeout", "connect-timeout"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_flower_runners_timeouts_refuse_nan_and_infinity(key, value):
    from mpfl.flower.settings import from_run_config

    with pytest.raises(ConfigError, match=f"run config {key} must be a finite number > 0 of seconds"):
        from_run_config({key: value})


# --------------------------------------------------------------------------- resume

SMALL = dict(nodes=3, mask_rounds=2, rounds=3, train_samples=900, test_samples=200, rewind="none")
FILES = ("config.toml", "run.json", "rounds.jsonl", "rounds.csv", "checkpoint.npz")


class Stop(KeyboardInterrupt):
    """Raised from the round callback to stop a run after a given step, as Ctrl-C would."""


def _interrupted(out: Path, after: int, **overrides) -> None:
    """A run of SMALL stopped once `after` rounds are recorded and checkpointed."""

    def stop(record):
        if record["step"] >= after:
            raise Stop

    with pytest.raises(Stop):
        simulate(tiny_config(**SMALL, **overrides), out, on_round=stop)


def test_a_run_whose_node_diverged_in_a_mask_round_resumes_to_the_same_end(tmp_path):
    """A node whose training diverges in a mask round sends only its mask, keeps NaN weights (rewind none)
    and is dropped when it next sends values: its checkpoint is the run's own, and resumes bit for bit."""
    cfg = tiny_config(mask_rounds=3, rounds=3, lr=0.7)
    whole = simulate(cfg)
    out = tmp_path / "run"

    def stop(record):
        if record["step"] >= 2:
            raise Stop

    with pytest.raises(Stop):
        simulate(cfg, out, on_round=stop)
    with np.load(out / "checkpoint.npz") as f:
        assert any(k.startswith("node/") and not np.isfinite(f[k]).all() for k in f.files)  # what is tested
    resumed = simulate(cfg, out, resume=True)
    assert comparable(resumed.records) == comparable(whole.records)
    assert all(np.array_equal(a, b) for a, b in zip(resumed.weights, whole.weights))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    simulate(tiny_config(**SMALL), out)
    return out


def _same_as(out: Path, reference: Path) -> None:
    """`out` holds exactly the records and final model of the uninterrupted `reference`."""
    assert comparable(read_rounds(out)) == comparable(read_rounds(reference))
    a, b = load_final(out), load_final(reference)
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in b.weights)
    assert all(np.array_equal(a.mask[k], b.mask[k]) for k in b.mask)
    assert len((out / "rounds.csv").read_text().splitlines()) == 1 + len(read_rounds(reference))


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_a_cut_last_line_is_restored_from_the_checkpoint_and_the_run_ends_bit_identical(tmp_path, reference):
    out = tmp_path / "run"
    _interrupted(out, 3)
    log = out / "rounds.jsonl"
    text = log.read_text()
    log.write_text(text[: text.rindex("\n", 0, -1) + 40])  # the last round's line, cut 40 characters in
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    _same_as(out, reference)


def test_a_cut_line_of_a_round_after_the_checkpoint_is_dropped_and_redone(tmp_path, reference):
    out = tmp_path / "run"
    _interrupted(out, 2)
    with open(out / "rounds.jsonl", "a") as f:
        f.write('{"step": 3, "phase": "tr')
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    _same_as(out, reference)


def test_a_folder_with_only_its_config_resumes_from_step_one(tmp_path, reference):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_bytes((reference / "config.toml").read_bytes())
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    _same_as(out, reference)
    assert json.loads((out / "run.json").read_text()).keys() == {"run_id", "config_sha256"}


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_one(tmp_path, reference):
    out = tmp_path / "run"
    _interrupted(out, 1)
    (out / "checkpoint.npz").unlink()  # killed between the first record and its checkpoint
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    _same_as(out, reference)


def test_records_without_a_checkpoint_are_not_thrown_away(tmp_path, capsys):
    out = tmp_path / "run"
    _interrupted(out, 2)
    (out / "checkpoint.npz").unlink()
    before = _snapshot(out)
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "rounds.jsonl holds 2 rounds" in err and "no checkpoint.npz" in err
    assert _snapshot(out) == before


@pytest.mark.parametrize("edit, named", [
    ({"train": {"lr": 0.1}}, "train.lr = 0.1 (checkpoint: 0.05)"),
    ({"seed": 7}, "seed = 7 (checkpoint: 0)"),
    ({"nodes": 4}, "nodes = 4 (checkpoint: 3)"),
    ({"prune": {"sparsity": 0.5}}, "prune.sparsity = 0.5 (checkpoint: 0.9)"),
    ({"method": "fedavg-prune"}, "method = 'fedavg-prune' (checkpoint: 'mpfl')"),
    ({"train": {"model": "cnn"}}, "train.model = 'cnn' (checkpoint: 'mlp')"),
])
def test_resume_refuses_an_edited_config_naming_what_differs(tmp_path, capsys, edit, named):
    import tomli_w

    out = tmp_path / "run"
    _interrupted(out, 2)
    cfg = Config.from_toml(out / "config.toml").to_dict()
    for key, value in edit.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    (out / "config.toml").write_text(tomli_w.dumps(cfg))
    before = _snapshot(out)
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert named in err and "differs from the one its checkpoint.npz was written with" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before


def test_resume_may_change_the_number_of_worker_processes(tmp_path, reference, capsys):
    import tomli_w

    out = tmp_path / "run"
    _interrupted(out, 2)
    cfg = Config.from_toml(out / "config.toml").to_dict()
    (out / "config.toml").write_text(tomli_w.dumps({**cfg, "workers": 2}))
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    _same_as(out, reference)
    flag = tmp_path / "flag"  # or on the command line, the one config flag --resume takes
    _interrupted(flag, 2)
    assert main(["run", "--resume", str(flag), "--workers", "2", "--quiet"]) == 0
    _same_as(flag, reference)
    assert Config.from_toml(flag / "config.toml").workers == cfg["workers"]  # the saved config stays as it was
    capsys.readouterr()
    assert main(["run", "--resume", str(flag), "--workers", "2", "--lr", "0.1"]) == 2
    assert ("--resume continues a run in its own folder with its own saved config; leave out --lr (of the run's "
            "settings it takes only --workers, which changes only the speed)") in " ".join(capsys.readouterr().err.split())
    assert main(["run", "--resume", str(flag), "--nodes", "4", "--out", str(tmp_path / "elsewhere")]) == 2
    assert "leave out --nodes, --out (of the run's settings" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("seed", [0, 1])
def test_resume_refuses_the_checkpoint_of_another_run(tmp_path, capsys, seed):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _interrupted(ours, 2)
    _interrupted(theirs, 3, seed=seed)
    (ours / "checkpoint.npz").write_bytes((theirs / "checkpoint.npz").read_bytes())
    before = _snapshot(ours)
    assert main(["run", "--resume", str(ours), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{ours / 'checkpoint.npz'} belongs to another run" in err
    assert _snapshot(ours) == before


def test_a_lost_run_json_is_rebuilt_from_the_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    _interrupted(out, 2)
    identity = json.loads((out / "run.json").read_text())
    (out / "run.json").unlink()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert json.loads((out / "run.json").read_text()) == identity
    _same_as(out, reference)


def test_a_refused_resume_rebuilds_no_run_json_from_a_checkpoint_it_did_not_accept(tmp_path, reference, capsys):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _interrupted(ours, 2)
    _interrupted(theirs, 4)  # the same config, so only the log tells the checkpoints apart
    checkpoint = (ours / "checkpoint.npz").read_bytes()
    (ours / "run.json").unlink()
    (ours / "checkpoint.npz").write_bytes((theirs / "checkpoint.npz").read_bytes())
    before = _snapshot(ours)
    assert main(["run", "--resume", str(ours), "--quiet"]) == 2
    assert "the log was cut or edited" in capsys.readouterr().err
    assert _snapshot(ours) == before  # no run.json naming the other run
    (ours / "checkpoint.npz").write_bytes(checkpoint)  # the user puts the right one back
    assert main(["run", "--resume", str(ours), "--quiet"]) == 0
    _same_as(ours, reference)


def test_report_and_export_send_no_run_to_resume_whose_log_resume_would_refuse(tmp_path, capsys):
    out = tmp_path / "run"
    _interrupted(out, 2)
    lines = (out / "rounds.jsonl").read_text().splitlines()
    lines[-1] = json.dumps({**json.loads(lines[-1]), "accuracy": 0.99})  # the checkpointed round, edited
    (out / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    refused = " ".join(capsys.readouterr().err.split())
    assert "differs from the copy in checkpoint.npz" in refused
    assert main(["export", str(out)]) == 2
    assert "it cannot be resumed either: " in capsys.readouterr().err
    assert main(["report", str(out), "--out", str(tmp_path / "r")]) == 2  # no finished run to report on
    err = " ".join(capsys.readouterr().err.split())
    assert "and cannot be resumed: " in err and "differs from the copy in checkpoint.npz" in err and "--resume" not in err


def _rewrite_meta(path: Path, change) -> None:
    """Rewrite the checkpoint with its metadata changed by `change(meta)` (what a crafted file holds)."""

    def changed(arrays: dict) -> None:
        meta = json.loads(arrays["meta"].tobytes())
        change(meta)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

    rewrite_arrays(path, changed)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _replace_array(path: Path, key: str, value: np.ndarray) -> None:
    rewrite_arrays(path, lambda arrays: arrays.update({key: value}))


def _edit_array(path: Path, key: str, edit) -> None:
    """Rewrite the checkpoint with array `key` replaced by `edit(array)` (a hand edit)."""
    rewrite_arrays(path, lambda arrays: arrays.update({key: edit(arrays[key])}))


DAMAGE = {
    "truncated checkpoint": ("checkpoint.npz", _truncate, "BadZipFile"),
    "empty checkpoint": ("checkpoint.npz", lambda p: p.write_bytes(b""), "checkpoint.npz is damaged"),
    "garbage checkpoint": ("checkpoint.npz", lambda p: p.write_bytes(os.urandom(4096)), "checkpoint.npz is damaged"),
    "next_step = 0": ("checkpoint.npz", lambda p: _rewrite_meta(p, lambda m: m.update(next_step=0)),
                      "next_step = 0 is not a step from 1 to 6"),
    "unknown mask version": ("checkpoint.npz", lambda p: _rewrite_meta(p, lambda m: m.update(version=9)),
                             "mask version 9 is not in the history"),
    "node out of range": ("checkpoint.npz", lambda p: _rewrite_meta(p, lambda m: m["counts"].update({"7": 5})),
                          "counts does not map node ids 0 to 2"),
    "no identity": ("checkpoint.npz", lambda p: _rewrite_meta(p, lambda m: m.pop("run")), "carries no run identity"),
    "wrong array shape": ("checkpoint.npz", lambda p: _replace_array(p, "weights/0", np.zeros((3, 3), np.float32)),
                          "do not have the shapes or type of the run's model"),
    "NaN in the weights": ("checkpoint.npz", lambda p: _edit_array(p, "weights/1", lambda w: np.full_like(w, np.nan)),
                           "the arrays of 'weights' hold NaN or Inf values"),
    "edited w0": ("checkpoint.npz", lambda p: _edit_array(p, "w0/0", lambda w: w + np.float32(1e-3)),
                  "are not those the run's config builds here"),
    "an extra array": ("checkpoint.npz", lambda p: _replace_array(p, "junk", np.zeros(3, np.float32)),
                       "it holds junk, which no checkpoint of this run holds"),
    "damaged log line": ("rounds.jsonl", lambda p: p.write_text(p.read_text().replace('"step": 1', '"step": 1,,', 1)),
                         "rounds.jsonl line 1 is damaged"),
    "duplicated rounds": ("rounds.jsonl", lambda p: p.write_text(p.read_text() * 2),
                          "rounds.jsonl holds 4 rounds before step 3"),
    "lost rounds": ("rounds.jsonl", lambda p: p.write_text(p.read_text().split("\n", 1)[1]),
                    "rounds.jsonl holds 1 round before step 3"),
    "binary log": ("rounds.jsonl", lambda p: p.write_bytes(b"\xff\xfe" * 50), "rounds.jsonl is damaged"),
    "damaged run.json": ("run.json", lambda p: p.write_text("{not json"), "run.json is damaged"),
    "damaged config": ("config.toml", lambda p: p.write_text("method = \n"), "config.toml' is not valid TOML"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_every_damaged_file_exits_2_naming_the_file_and_changes_nothing(tmp_path, capsys, case):
    name, damage, message = DAMAGE[case]
    out = tmp_path / "run"
    _interrupted(out, 2)
    damage(out / name)
    before = _snapshot(out)
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert name in err and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before


def test_a_damaged_final_file_is_an_export_error_naming_it(tmp_path, capsys, reference):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.toml", "final.npz"):
        (run / name).write_bytes((reference / name).read_bytes())
    _truncate(run / "final.npz")
    assert main(["export", str(run), "--repeats", "1"]) == 2
    assert "final.npz is damaged" in capsys.readouterr().err


# --------------------------------------------------------------------------- one process per run folder


def test_a_second_lock_on_a_run_folder_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunDirError, match=f"in use by process {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK).exists()


def test_a_stale_lock_file_is_taken_over(tmp_path):
    (tmp_path / LOCK).write_text("999999999\n")
    with RunLock(tmp_path) as lock:
        assert lock.stale == 999999999
        assert (tmp_path / LOCK).read_text() == f"{os.getpid()}\n"


@pytest.mark.slow
def test_a_concurrent_resume_is_refused_while_the_first_run_finishes_correctly(tmp_path):
    run = [*CLI_RUN, "--rounds", "10"]  # rounds enough to be still running when paused after its second
    reference = tmp_path / "reference"
    assert main(["run", *run, "--out", str(reference)]) == 0
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "mpfl", "run", *run, "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_rounds(out, 2, first)
    os.kill(first.pid, signal.SIGSTOP)  # paused mid-run, it still holds the folder, however slow the others start
    try:
        for argv in (["run", "--resume", str(out)], ["run", *run, "--out", str(out)]):
            second = subprocess.run([sys.executable, "-m", "mpfl", *argv], capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr
            assert f"is in use by process {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=240) == 0, first.stderr.read()
    assert comparable(read_rounds(out)) == comparable(read_rounds(reference))
    assert not (out / LOCK).exists() and not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_taken_over_by_its_resume(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mpfl", "run", *CLI_RUN, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_rounds(out, 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / LOCK).read_text() == f"{proc.pid}\n"
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert not (out / LOCK).exists() and (out / "summary.json").exists()


# --------------------------------------------------------------------------- files and links


def test_atomic_write_refuses_a_link_at_its_target(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "out.json").symlink_to(victim)
    with pytest.raises(PathError, match="is a symbolic link; mpfl does not write through links"):
        atomic_write(tmp_path / "out.json", "new")
    assert victim.read_text() == "keep me"


def test_atomic_write_never_opens_an_existing_temporary_name(tmp_path, monkeypatch):
    import secrets

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    names = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(names))
    (tmp_path / ".out.json.aaaaaaaa.tmp").symlink_to(victim)
    atomic_write(tmp_path / "out.json", "new")
    assert (tmp_path / "out.json").read_text() == "new" and victim.read_text() == "keep me"
    assert (tmp_path / ".out.json.aaaaaaaa.tmp").is_symlink()


def test_stale_temporary_files_are_removed(tmp_path):
    (tmp_path / ".checkpoint.npz.0123abcd.tmp").write_bytes(b"half")
    (tmp_path / "keep.txt").write_text("x")
    assert [p.name for p in remove_stale_temps(tmp_path)] == [".checkpoint.npz.0123abcd.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    simulate(tiny_config(nodes=2, mask_rounds=1, rounds=1, train_samples=600, test_samples=100), out)
    return out


def test_export_refuses_a_folder_with_files_unless_forced(finished, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", str(finished), "--out", str(out), "--repeats", "1"]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["export", str(finished), "--out", str(out), "--repeats", "1"]) == 2
    assert "holds an earlier export; pass --force to replace it (other files there stay)" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert main(["export", str(finished), "--out", str(out), "--repeats", "1", "--force"]) == 0


@pytest.mark.parametrize("name", ["model.sparse.pt", "export.json", "mask.bin", ".export.json.tmp"])
def test_export_never_writes_through_a_link(finished, tmp_path, capsys, name):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    out = tmp_path / "exp"
    out.mkdir()
    (out / name).symlink_to(victim)
    assert main(["export", str(finished), "--out", str(out), "--repeats", "1"]) == 2
    first = capsys.readouterr().err
    assert (f"already holds files ({name}); pass --force" if name.startswith(".") else
            f"{out / name} is a symbolic link") in " ".join(first.split())
    code = main(["export", str(finished), "--out", str(out), "--repeats", "1", "--force"])
    err = capsys.readouterr().err
    assert victim.read_text() == "keep me" and (out / name).is_symlink()
    if name.startswith("."):
        assert code == 0  # temporary files get fresh names, created exclusively
    else:
        assert code == 2 and f"{out / name} is a symbolic link" in err


def test_torchscript_exports_go_through_the_same_safe_write(finished, tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    out = tmp_path / "exp"
    out.mkdir()
    (out / "model.ts").symlink_to(victim)
    assert main(["export", str(finished), "--out", str(out), "--format", "torchscript", "--repeats", "1", "--force"]) == 2
    assert "model.ts is a symbolic link" in capsys.readouterr().err and victim.read_text() == "keep me"


@pytest.mark.parametrize("command", ["run", "export"])
def test_out_paths_that_cannot_be_folders_are_one_line_errors(finished, tmp_path, capsys, command):
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    head = ["run", "--nodes", "2", "--rounds", "0", "--mask-rounds", "1", "--train-samples", "600", "--quiet"] \
        if command == "run" else ["export", str(finished), "--repeats", "1"]
    for out, message in ((tmp_path / "dangling", "symbolic link to a missing folder"),
                         (tmp_path / "file", "is not a"), (tmp_path / "file" / "below", "Not a directory")):
        assert main([*head, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
