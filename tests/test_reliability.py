"""Bad payloads, dropouts, crash and resume, malicious nodes and robust consensus."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CLI_RUN, comparable, tiny_config, wait_for_rounds
from mpfl import codec
from mpfl.attacks import malicious_ids
from mpfl.checkpoint import load_final
from mpfl.cli import main
from mpfl.config import Config
from mpfl.core.aggregate import robust_average
from mpfl.core.masks import jaccard
from mpfl.errors import RoundError
from mpfl.experiment import Experiment
from mpfl.node import Node, make_trainer
from mpfl.records import read_rounds, read_summary
from mpfl.server import Server
from mpfl.sim import FaultyTransport, InProcessTransport, simulate

# --------------------------------------------------------------------------- bad messages


def _mutate(body: bytes, rng: np.random.Generator, replay: bytes) -> list[bytes]:
    """One of many ways a reply can go wrong, including forgeries with a valid checksum."""
    b = bytearray(body)
    kind = rng.integers(9)
    if kind == 0:
        b[rng.integers(len(b))] ^= int(rng.integers(1, 256))
    elif kind == 1:
        del b[rng.integers(len(b)) :]
    elif kind == 2:
        b += rng.bytes(int(rng.integers(1, 64)))
    elif kind == 3:
        b = bytearray(rng.bytes(int(rng.integers(0, 200))))
    elif kind == 4:
        return [bytes(b), bytes(b)]
    elif kind == 5:
        return [replay]
    elif kind == 6:
        return []
    else:  # rewrite payload bytes and fix the checksum, as a deliberate forger would
        for _ in range(int(rng.integers(1, 8))):
            pos = int(rng.integers(codec.HEADER_SIZE, len(b))) if len(b) > codec.HEADER_SIZE else 0
            b[pos] = int(rng.integers(256))
        if kind == 8 and len(b) >= 16:
            b[8:12] = rng.bytes(4)  # round field
        head = bytes(b[:28])
        import zlib

        b[28:32] = zlib.crc32(bytes(b[32:]), zlib.crc32(head)).to_bytes(4, "little")
    return [bytes(b)]


class MutatingTransport(InProcessTransport):
    """Two honest nodes plus many ids whose replies are mutated copies of honest ones."""

    def __init__(self, nodes, fakes: int, seed: int):
        super().__init__(nodes)
        self.fakes, self.rng, self.last, self.sent = fakes, np.random.default_rng(seed), {}, 0

    def node_ids(self):
        return list(self.nodes) + list(range(100, 100 + self.fakes))

    def exchange(self, task, step, requests):
        honest = super().exchange(task, step, {n: b for n, b in requests.items() if n in self.nodes})
        replies = dict(honest)
        sources = [r[0] for r in honest.values()]
        for n in requests:
            if n >= 100:
                replies[n] = _mutate(sources[n % len(sources)], self.rng, self.last.get(n, sources[0]))
                self.sent += 1
        self.last = {n: sources[0] for n in requests}
        return replies


def test_thousands_of_mutated_replies_never_reach_the_model():
    """Corrupted, truncated, extended, replayed, duplicated and checksum-valid forged replies;
    with a coordinate-wise median the forgeries that decode cannot move the model."""
    cfg = tiny_config(nodes=2, mask_rounds=2, rounds=40, train_samples=300, test_samples=100, eval_every=0,
                      aggregator="median")
    exp = Experiment.from_config(cfg)
    trainer = make_trainer(cfg, exp.model, exp.spec)
    transport = MutatingTransport([Node(i, cfg, trainer, exp.node_data(i), w0=exp.w0) for i in range(2)], fakes=50, seed=0)
    records = []
    server = Server(cfg, exp.spec, exp.w0, transport, evaluate=exp.evaluate, on_round=records.append)
    server.run()
    assert transport.sent >= 2000
    assert len(records) == 42
    accepted = sum(len(r["nodes"]) - 2 for r in records)
    assert accepted < transport.sent * 0.2  # almost everything is rejected ...
    assert all(set(r["nodes"]) >= {0, 1} for r in records)  # ... and honest nodes always get through
    for w in server.state.weights:
        assert np.isfinite(w).all()
    for w, m in zip(exp.spec.pick(server.state.weights), server.state.mask):
        assert (w[~m] == 0).all()
    reasons = {reason.split(":")[0] for r in records for reason in r["dropped"].values()}
    assert "rejected" in reasons


# --------------------------------------------------------------------------- dropouts


def _fedavg_of(cfg, exp, survivors) -> list[np.ndarray]:
    """One FedAvg round from w0 over `survivors` only, computed node by node (the reference): the
    float64 mean of their trained weights weighted by their training-set sizes, which must differ
    (with equal sizes a plain mean would pass for the weighted one)."""
    trainer = make_trainer(cfg, exp.model, exp.spec)
    full = exp.spec.supports(exp.spec.full_mask())
    request = [codec.encode_values(exp.w0, full, round=1)]
    tensors, sizes = [], []
    for n in survivors:
        node = Node(n, cfg, trainer, exp.node_data(n), w0=exp.w0)
        tensors.append(codec.decode_values(node.handle("train", 1, request)[0], full).tensors)
        sizes.append(len(exp.partition.train[n]))
    assert len(set(sizes)) > 1, f"the survivors' sizes {sizes} are equal: use a split that makes them differ"
    return [sum(s * t.astype(np.float64) for s, t in zip(sizes, per_node)) / sum(sizes) for per_node in zip(*tensors)]


def test_dropout_aggregates_exactly_the_survivors():
    # a label-skewed split: the six nodes hold 117, 175, 265, 238, 300 and 256 training samples
    cfg = tiny_config(method="fedavg", nodes=6, rounds=1, dropout=0.4, seed=4, partition="dirichlet", alpha=0.1)
    exp = Experiment.from_config(cfg)
    trainer = make_trainer(cfg, exp.model, exp.spec)
    nodes = [Node(i, cfg, trainer, exp.node_data(i), w0=exp.w0) for i in range(cfg.nodes)]
    records = []
    server = Server(cfg, exp.spec, exp.w0, FaultyTransport(nodes, cfg.faults, cfg.seed), evaluate=exp.evaluate,
                    on_round=records.append)
    server.run()
    survivors = records[0]["nodes"]
    assert 0 < len(survivors) < cfg.nodes
    assert set(records[0]["dropped"]) == {str(n) for n in range(cfg.nodes) if n not in survivors}
    for got, want in zip(server.state.weights, _fedavg_of(cfg, exp, survivors)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_silent_nodes_are_left_out_of_every_round_and_logged():
    # a label-skewed split: the honest nodes 0, 2 and 4 hold 214, 298 and 168 training samples
    cfg = tiny_config(method="fedavg", nodes=5, rounds=1, malicious=2, attack="silent", seed=2, partition="dirichlet",
                      alpha=0.1)
    bad = malicious_ids(cfg)
    result = simulate(cfg)
    record = result.records[0]
    assert record["nodes"] == [n for n in range(cfg.nodes) if n not in bad]
    assert set(record["dropped"]) == {str(n) for n in bad} and all("silent" in r for r in record["dropped"].values())
    for got, want in zip(result.weights, _fedavg_of(cfg, Experiment.from_config(cfg), record["nodes"])):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_faults_are_seeded_and_logged_with_their_reason():
    cfg = tiny_config(rounds=4, mask_rounds=1, nodes=6, dropout=0.1, straggler=0.1, corrupt=0.2, duplicate=0.3)
    a, b = simulate(cfg), simulate(cfg)
    assert [r["dropped"] for r in a.records] == [r["dropped"] for r in b.records]
    reasons = " ".join(v for r in a.records for v in r["dropped"].values())
    for word in ("dropped out", "deadline", "checksum", "reply bod"):
        assert word in reasons


@pytest.mark.parametrize("fault, reason", [("corrupt", "checksum mismatch"), ("duplicate", "expected 3 reply bodies, got 6")])
def test_a_fault_on_every_reply_of_a_three_body_round_is_named_and_so_is_its_setting(fault, reason):
    """A one-round mask phase is its last round, whose reply holds a mask, a core and the kept values: a
    corrupted reply keeps all three bodies (the server's checksum must catch the flipped byte), a
    duplicated one sends them twice."""
    with pytest.raises(RoundError) as failed:
        simulate(tiny_config(mask_rounds=1, rounds=1, **{fault: 1.0}))
    message = str(failed.value)
    assert f"nodes 0, 1, 2: rejected: {reason}" in message and f"faults ({fault} = 1): lower them" in message


# --------------------------------------------------------------------------- crash and resume


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path):
    """Killed once its second round is logged: inside the mask phase (3 rounds), whose nodes keep their own
    weights (rewind none) for the next round, so the checkpoint must carry node state too. A fixed point,
    so that a failure repeats; the rounds it had logged when killed are in every message."""
    reference = tmp_path / "reference"
    assert main(["run", *CLI_RUN, "--out", str(reference)]) == 0
    killed = tmp_path / "killed"
    target = 2
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "mpfl.cli", "run", *CLI_RUN, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        lines = (killed / "rounds.jsonl").read_text().count("\n") if (killed / "rounds.jsonl").exists() else 0
        if lines >= target:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    logged = (killed / "rounds.jsonl").read_text().count("\n") if (killed / "rounds.jsonl").exists() else 0
    at = f"killed at target {target}, with {logged} rounds logged"
    assert not (killed / "summary.json").exists(), f"the run finished before it could be killed ({at})"
    assert main(["run", "--resume", str(killed), "--quiet"]) == 0, at
    assert comparable(read_rounds(killed)) == comparable(read_rounds(reference)), at
    a, b = load_final(killed), load_final(reference)
    assert a.weights.keys() == b.weights.keys(), at
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights), at
    assert all(np.array_equal(a.mask[k], b.mask[k]) for k in a.mask), at
    csv_rows = (killed / "rounds.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + len(read_rounds(reference)), at


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_names_the_resume_command_and_resuming_ends_as_an_uninterrupted_run(tmp_path, capsys, workers):
    reference = tmp_path / "reference"
    assert main(["run", *CLI_RUN, "--out", str(reference)]) == 0
    out = tmp_path / "interrupted"
    loud = [a for a in CLI_RUN if a != "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "mpfl", "run", *loud, "--workers", str(workers), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rounds(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stdout == ""
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted; continue with: mpfl run --resume {out}"
    assert not (out / "summary.json").exists() and (out / "checkpoint.npz").exists()
    before = read_rounds(out)

    assert main(["run", *CLI_RUN, "--out", str(out)]) == 2
    assert f"holds an unfinished run; continue it with mpfl run --resume {out}" in capsys.readouterr().err
    resumed = subprocess.run([sys.executable, "-m", "mpfl", "run", "--resume", str(out)], capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("round")]
    assert lines[0].startswith(f"round {len(before) + 1:>3}/9") and lines[-1].startswith("round   9/9")
    assert comparable(read_rounds(out)) == comparable(read_rounds(reference))
    a, b = load_final(out), load_final(reference)
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
    elapsed = [r["elapsed"] for r in read_rounds(out)]
    assert elapsed == sorted(elapsed) and read_summary(out)["wall_time"] > before[-1]["elapsed"] > 0
    assert not (out / "checkpoint.npz").exists() and (out / "final.npz").exists()


def test_worker_processes_of_a_killed_run_end_quietly(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mpfl", "run", *CLI_RUN, "--workers", "2", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rounds(out, 1, proc)
    proc.kill()  # as the OOM killer would: no Ctrl-C handler, no pool shut-down
    _, stderr = proc.communicate(timeout=60)  # the workers hold the same stderr: its end means they have exited
    assert stderr == ""


def _children(pid: int) -> dict[int, str]:
    """The living child processes of process `pid`, with their command lines, from /proc."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
            command = open(f"/proc/{entry}/cmdline").read().replace("\0", " ")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry)] = command
    return found


def _forkserver(pid: int) -> int | None:
    """The forkserver process that run `pid` starts its workers from, once there is one."""
    return next((child for child, command in _children(pid).items() if "forkserver" in command), None)


def test_a_killed_worker_process_stops_the_run_with_one_line_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mpfl", "run", *CLI_RUN, "--workers", "2", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rounds(out, 1, proc)
    workers = sorted(_children(_forkserver(proc.pid)))
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)  # as the OOM killer would
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].endswith(
        f"was killed (SIGKILL: out of memory?); continue with: mpfl run --resume {out}")
    resumed = subprocess.run([sys.executable, "-m", "mpfl", "run", "--resume", str(out), "--quiet"],
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow
def test_sigterm_stops_a_run_as_ctrl_c_does_and_the_run_resumes(tmp_path):
    """`kill`, `docker stop` and a batch system's pre-emption send SIGTERM: the run stops between rounds,
    says how to resume, and the resumed run ends as an uninterrupted one would."""
    out = tmp_path / "run"
    loud = [a for a in CLI_RUN if a != "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "mpfl", "run", *loud, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rounds(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stdout == "" and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted; continue with: mpfl run --resume {out}"
    assert (out / "checkpoint.npz").exists() and not (out / "summary.json").exists()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    reference = simulate(Config.from_toml(out / "config.toml"))
    assert [r["accuracy"] for r in read_rounds(out)] == [r["accuracy"] for r in reference.records]


def test_ctrl_c_while_the_workers_start_is_one_line(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the forkserver, busy importing torch,
    ignores it, and the run's own process says what happened (and removes the folder it made, if it
    wrote nothing there yet)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mpfl", "run", *CLI_RUN, "--workers", "2", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while _forkserver(proc.pid) is None:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)  # past the milliseconds of starting it, well inside its second or more of importing torch
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted")
    assert ("before the run started; nothing was written" in last) == (not out.exists())  # nor an empty folder


def _importing_torch(pid: int) -> bool:
    """Whether process `pid` has mapped torch's C++ library: it is inside `import torch`, which takes a second or
    more after that (the interpreter's own start, before mpfl's code runs, can take longer than a fixed wait)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("log", [[], ["--log-format", "json"]])
def test_ctrl_c_while_mpfl_starts_is_one_line(tmp_path, log):
    """Within its first second `mpfl` is still importing torch: a Ctrl-C then is one line too."""
    proc = subprocess.Popen([sys.executable, "-m", "mpfl", "run", *CLI_RUN, *log, "--out", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not _importing_torch(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    (line,) = stderr.splitlines()
    assert proc.returncode == 130 and (json.loads(line)["event"] if log else line).startswith("interrupted")


def test_resume_refuses_finished_or_foreign_directories(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path), "--quiet"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    done = tmp_path / "done"
    assert main(["run", *CLI_RUN[:2], "--rounds", "1", "--mask-rounds", "1", "--train-samples", "600", "--quiet",
                 "--out", str(done)]) == 0
    before = (done / "summary.json").read_text()
    assert main(["run", "--resume", str(done), "--quiet"]) == 2
    assert "finished run" in capsys.readouterr().err
    assert (done / "summary.json").read_text() == before


# --------------------------------------------------------------------------- user input


def test_bad_init_files_stop_before_any_work(tmp_path, capsys):
    bad = tmp_path / "w.pt"
    torch.save({"1.weight": torch.zeros(3, 3)}, bad)
    out = tmp_path / "run"
    assert main(["run", "--init", str(bad), "--out", str(out), "--quiet"]) == 2
    assert "1.weight" in capsys.readouterr().err
    assert not out.exists()
    bad.write_bytes(b"not a torch file")
    assert main(["run", "--init", str(bad), "--out", str(out), "--quiet"]) == 2
    assert "w.pt" in capsys.readouterr().err
    assert not out.exists()


def test_a_corrupt_dataset_stops_before_any_work(tmp_path, capsys):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (raw / name).write_bytes(b"\x1f\x8b garbage")
    out = tmp_path / "run"
    assert main(["run", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--out", str(out), "--quiet"]) == 2
    assert "FashionMNIST" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------- untrusted nodes


def test_robust_aggregators_against_numpy():
    rng = np.random.default_rng(6)
    nodes = [[rng.standard_normal((4, 3)).astype(np.float32)] for _ in range(7)]
    nodes.append([np.full((4, 3), 1000.0, np.float32)])
    stack = np.stack([n[0] for n in nodes])
    np.testing.assert_allclose(robust_average(nodes, [1] * 8, "median")[0], np.median(stack, axis=0), rtol=1e-6)
    s = np.sort(stack, axis=0)[1:-1]  # trim 1 of 8 from each end (0.125 * 8 = 1)
    np.testing.assert_allclose(robust_average(nodes, [1] * 8, "trimmed-mean", trim=0.125)[0], s.mean(axis=0), rtol=1e-6)
    # Krum (Blanchard et al. 2017): each candidate's score is the sum of its squared distances to its
    # n - f - 2 nearest others; the candidate of the least score is returned as it is. With this draw
    # f = 1 and f = 2 choose different nodes, neither at an end of the list, each by a clear margin.
    flat = stack.reshape(8, -1).astype(np.float64)
    squared = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    for byzantine, want in ((1, 3), (2, 5)):
        scores = [np.sort(np.delete(squared[i], i))[: 8 - byzantine - 2].sum() for i in range(8)]
        chosen = int(np.argmin(scores))
        assert chosen == want and sorted(scores)[0] < 0.99 * sorted(scores)[1], (byzantine, scores)
        krum = robust_average(nodes, [1] * 8, "krum", byzantine=byzantine)[0]
        np.testing.assert_array_equal(krum, stack[chosen], err_msg=f"f = {byzantine}: Krum must return node {chosen} "
                                                                   f"(scores {scores})")


def test_malicious_nodes_are_chosen_by_seed_and_forge_what_they_send():
    cfg = tiny_config(malicious=1, attack="inverted-mask", mask_rounds=1, rounds=1)
    bad = malicious_ids(cfg)
    assert len(bad) == 1 and bad == malicious_ids(cfg)
    current = [np.array([1, 1, 1, 0], bool)]
    honest = [np.array([1, 0, 0, 0], bool)]
    exp = Experiment.from_config(cfg)
    node = Node(bad[0], cfg, make_trainer(cfg, exp.model, exp.spec), exp.node_data(bad[0]))
    assert node.forge_mask(honest, current, exp.w0, 1)[0].tolist() == [False, True, True, False]
    honest_node = Node(next(i for i in range(cfg.nodes) if i not in bad), cfg, node.trainer, exp.node_data(0))
    assert honest_node.forge_mask(honest, current, exp.w0, 1)[0].tolist() == [True, False, False, False]
    flip_cfg = tiny_config(malicious=1, attack="sign-flip")
    flip = Node(malicious_ids(flip_cfg)[0], flip_cfg, node.trainer, exp.node_data(0))
    start, trained = [np.ones(2, np.float32)], [np.array([1.5, 0.5], np.float32)]
    assert flip.forge_values(trained, start, 1)[0].tolist() == [0.5, 1.5]


@pytest.mark.slow
def test_robust_consensus_keeps_the_mask_close_to_the_clean_run():
    base = dict(nodes=6, mask_rounds=2, rounds=1, train_samples=1800, sparsity=0.8)
    clean = simulate(tiny_config(**base))
    attacked = simulate(tiny_config(**base, malicious=2, attack="inverted-mask", vote_weighting="samples"))
    robust = simulate(tiny_config(**base, malicious=2, attack="inverted-mask", vote_weighting="agreement"))
    assert jaccard(robust.mask, clean.mask) > jaccard(attacked.mask, clean.mask)
    honest_only = simulate(tiny_config(**base, malicious=2, attack="silent"))
    # the robust rules recover exactly what the four honest nodes alone agree on (which, with two voters
    # fewer, differs from the clean six-node mask by what those two honest votes would have changed)
    assert all(np.array_equal(a, b) for a, b in zip(robust.mask, honest_only.mask))
    assert jaccard(robust.mask, clean.mask) == jaccard(honest_only.mask, clean.mask) > 0.6
    weights = robust.records[0]["vote_weights"]
    bad = {str(n) for n in malicious_ids(tiny_config(**base, malicious=2, attack="inverted-mask"))}
    assert max(weights[n] for n in bad) < min(w for n, w in weights.items() if n not in bad) / 5
    assert json.dumps(robust.summary["malicious_nodes"]) == json.dumps(sorted(int(n) for n in bad))


def test_a_round_whose_replies_all_pass_the_value_limit_says_to_raise_it():
    with pytest.raises(RoundError, match=r"values beyond ±0\.05 .*If honest nodes' values reach ±0\.05 .*raise "
                                         r"--value-limit"):
        simulate(tiny_config(method="fedavg", rounds=1, value_limit=0.05))
    with pytest.raises(RoundError) as faults_only:
        simulate(tiny_config(method="fedavg", rounds=1, dropout=1.0))
    assert "value-limit" not in str(faults_only.value)


def test_no_higher_value_limit_is_advised_when_only_malicious_nodes_passed_it():
    cfg = tiny_config(method="fedavg", rounds=1, malicious=1, attack="scale", attack_scale=1e7, min_nodes=3)
    with pytest.raises(RoundError, match=r"values beyond ±10000") as refused:
        simulate(cfg)
    assert "raise --value-limit" not in str(refused.value)
