"""The same MPFL run on the in-process simulator, on a Flower deployment over loopback, and on
Flower's simulation engine (if flwr[simulation] is installed): round time side by side, and
where a deployment round's time goes.

    python benchmarks/flower_vs_inprocess.py [--quick] [--json PATH]

Every runner must produce the same masks, weights, accuracy and bytes (column ``same``); only
the time differs. ``round_seconds`` is the median wall time of a training round (the Server's
record), ``wall_time_s`` runs from submitting the run to its end (for Flower: ``flwr run``
until ``flwr ls`` reports it finished; SuperLink and SuperNode start-up is not included).
``flower-floor`` is Flower alone: the same SuperLink and SuperNodes running an echo app
(benchmarks/flower_floor), so its round is what any ClientApp pays per round on this machine.

The profile splits the deployment's training rounds (medians over rounds, of the slowest node)
into: ``server_s`` (the Server's own work: encoding, decoding, aggregation, evaluation),
``flower_wait_s`` (SuperNode polling, task dispatch, message transfer, pulling the reply),
``process_start_s`` (Flower starting the ClientApp process: Python, Flower's imports, the app
bundle, mpfl's light ClientApp module), ``forward_s`` (handing the message to the warm node
process and back), ``setup_s`` (the node's data and model, cached after the first message)
and ``node_s`` (decoding, training, encoding).

--quick: 2 nodes, mlp on 2,000 MNIST samples, 2 mask + 2 training rounds; otherwise 4 nodes on
all of MNIST, 5 mask + 5 training rounds.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import emit, parser, stop_on_sigterm

from mpfl.checkpoint import load_final
from mpfl.flower.local import LocalFederation
from mpfl.flower.server_app import MASKS
from mpfl.flower.settings import from_run_config
from mpfl.records import read_rounds, read_summary
from mpfl.sim import RunResult, simulate

REPO = Path(__file__).resolve().parents[1]
FLOOR_APP = Path(__file__).resolve().parent / "flower_floor"
QUICK = {"nodes": 2, "rounds": 2, "prune.mask-rounds": 2, "data.train-samples": 2000, "data.test-samples": 500}
FULL = {"nodes": 4, "rounds": 5, "prune.mask-rounds": 5}
COMMON = {"threads": 1, "federated-eval": False, "round-timeout": 1800.0}
TARGET_S = 5.0
COLUMNS = ("runner", "round_seconds", "wall_time_s", "final_accuracy", "bytes_up", "bytes_down", "same")
PARTS = ("round_s", "server_s", "flower_wait_s", "process_start_s", "forward_s", "setup_s", "node_s")


def same_as(out: Path, sim: RunResult) -> bool:
    """Whether a Flower run directory holds the simulator's final weights and every consensus mask."""
    final = load_final(out)
    with np.load(out / MASKS) as masks:
        names = list(final.mask)
        same_masks = all(np.array_equal(masks[f"{step}/{n}"], m) for step, mask in sim.masks.items()
                         for n, m in zip(names, mask))
    return same_masks and all(np.array_equal(a, b) for a, b in zip(final.weights.values(), sim.weights, strict=True))


def round_seconds(records: list[dict]) -> float:
    """The median wall time of a training round."""
    return statistics.median(r["time"] for r in records if r["phase"] == "train")


def on_flower(runner: str, overrides: dict, nodes: int, sim: RunResult, work: Path, simulation: bool
              ) -> tuple[dict, list[dict]]:
    """Run on a fresh local federation; one row of the table, and the run's round records."""
    out = work / runner / "run"
    with LocalFederation(work / runner, nodes, simulation=simulation) as fed:
        started = time.perf_counter()
        run = fed.wait(fed.run(REPO, {**overrides, "out-dir": str(out)}), 7200, done=out / "summary.json", poll=5.0)
        wall = time.perf_counter() - started
    if run["status"] != "finished:completed":
        raise SystemExit(f"{runner}: run {run['run-id']} ended {run['status']}: {run['status-details']}")
    s, records = read_summary(out), read_rounds(out)
    return {"runner": runner, "round_seconds": round_seconds(records), "wall_time_s": wall,
            "final_accuracy": s["final_accuracy"], "bytes_up": s["bytes_up"], "bytes_down": s["bytes_down"],
            "same": same_as(out, sim)}, records


def floor(nodes: int, rounds: int, work: Path) -> dict:
    """Flower's own round: the echo app on a fresh local federation of `nodes` SuperNodes."""
    out = work / "floor.json"
    with LocalFederation(work / "floor", nodes) as fed:
        run = fed.wait(fed.run(FLOOR_APP, {"nodes": nodes, "rounds": rounds, "out": str(out)}), 1800, done=out,
                       poll=5.0)
    if run["status"] != "finished:completed":
        raise SystemExit(f"flower-floor: run {run['run-id']} ended {run['status']}: {run['status-details']}")
    times = json.loads(out.read_text())
    return {"runner": "flower-floor", "round_seconds": statistics.median(times), "wall_time_s": sum(times)}


def profile(records: list[dict]) -> dict:
    """Where a deployment's training rounds went: the medians over rounds of each part (see the docstring)."""
    parts: dict[str, list[float]] = {name: [] for name in PARTS}
    for r in (r for r in records if r["phase"] == "train"):
        exchange, nodes = r["flower"]["exchange_time"], r["flower"]["nodes"].values()
        slowest = max(nodes, key=lambda t: t["process"] + t["handler"])
        values = {"round_s": r["time"], "server_s": r["time"] - exchange,
                  "flower_wait_s": exchange - slowest["process"] - slowest["handler"],
                  "process_start_s": slowest["process"],
                  "forward_s": slowest["handler"] - slowest["setup"] - slowest["node"],
                  "setup_s": slowest["setup"], "node_s": slowest["node"]}
        for name, value in values.items():
            parts[name].append(value)
    return {name: statistics.median(values) for name, values in parts.items()}


def main() -> None:
    args = parser(__doc__).parse_args()
    stop_on_sigterm()
    simulation = importlib.util.find_spec("ray") is not None
    if not simulation:
        print("Flower's simulation engine is not installed (pip install -e \".[simulation]\"): its row is left out",
              flush=True)
    overrides = {**(QUICK if args.quick else FULL), **COMMON}
    cfg, _ = from_run_config(overrides)
    started = time.perf_counter()
    sim = simulate(cfg)
    rows = [{"runner": "in-process", "round_seconds": round_seconds(sim.records),
             "wall_time_s": time.perf_counter() - started, "final_accuracy": sim.summary["final_accuracy"],
             "bytes_up": sim.summary["bytes_up"], "bytes_down": sim.summary["bytes_down"], "same": True}]
    work = Path(tempfile.mkdtemp(prefix="mpfl-flower-bench-"))
    try:
        deployment, records = on_flower("flower-deployment", overrides, cfg.nodes, sim, work, simulation=False)
        rows.append(deployment)
        if simulation:
            rows.append(on_flower("flower-simulation", overrides, cfg.nodes, sim, work, simulation=True)[0])
        rows.append(floor(cfg.nodes, cfg.rounds + cfg.prune.mask_rounds, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    title = f"MPFL on {cfg.nodes} nodes, {cfg.train.model}, {cfg.prune.mask_rounds} mask + {cfg.rounds} training rounds"
    emit(f"{title}: in-process vs Flower", rows, None, COLUMNS)
    parts = profile(records)
    emit("Where a deployment's training round goes (medians, slowest node, seconds)", [parts], None, PARTS)
    extra = deployment["round_seconds"] - rows[0]["round_seconds"]
    print(f"a deployment's training round costs {extra:.2f} s more than an in-process one (target: at most "
          f"{TARGET_S:g} s); Flower alone takes {rows[-1]['round_seconds']:.2f} s per round")
    if args.json is not None:  # one list of rows, each naming its table, as the other benchmarks write
        table = [{"table": "runners", **{c: r.get(c) for c in COLUMNS}} for r in rows]
        table.append({"table": "deployment_profile", **parts, "extra_round_s": extra})
        args.json.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
