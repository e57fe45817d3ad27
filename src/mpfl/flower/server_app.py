"""The Flower ServerApp: the simulator's `mpfl.server.Server`, driven over a Flower Grid.

It builds the run's `Experiment` from the run config (for the model, the initial weights
and the server-side test set), waits for the SuperNodes, runs the Server through a
`FlowerTransport`, and writes the same run directory as `mpfl run` (``out-dir`` in the run
config), plus ``masks.npz`` with the consensus mask after every mask and adaptation round.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from .. import codec
from ..config import Config
from ..core.aggregate import count_cap
from ..core.params import Mask, ParamSpec
from ..errors import MpflError, RoundError
from ..experiment import Experiment
from ..files import write_groups
from ..protocol import NodeFailure, RoundRecord
from ..records import RunDir, check_run_dir, finish_run, lost_nodes, new_run_dir, removed_if_unused, summary_line
from ..server import Server
from .settings import RunnerOptions, flower_wording, from_run_config
from .transport import METRIC_BYTES, FlowerTransport

MASKS = "masks.npz"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one experiment on the connected SuperNodes and write its run directory; an error names
    Flower's keys, not `mpfl run`'s flags."""
    try:
        _run(grid, context)
    except MpflError as exc:
        raise type(exc)(flower_wording(str(exc))) from None


def _run(grid: Grid, context: Context) -> None:
    cfg, opts = from_run_config(context.run_config)
    out = Path(opts.out_dir) if opts.out_dir else new_run_dir(cfg)
    check_run_dir(out)
    with removed_if_unused(out, made=not opts.out_dir):  # the folder new_run_dir made, if the run wrote nothing
        _run_in(grid, cfg, opts, out)


def _run_in(grid: Grid, cfg: Config, opts: RunnerOptions, out: Path) -> None:
    """The run once its config and folder are known: connect, run the rounds, write the summary."""
    started = time.perf_counter()
    exp = Experiment.from_config(cfg)
    transport = FlowerTransport(grid, opts.round_timeout)
    records: list[RoundRecord] = []
    said: dict[str, tuple[str, int]] = {}

    def on_round(record: RoundRecord) -> None:
        record["elapsed"] = time.perf_counter() - started
        record["flower"] = transport.take_timing()
        records.append(record)
        run_dir.log(record)
        _log_round(record, said)

    # Built before any node is contacted, so a method Flower cannot run fails at once.
    server = Server(cfg, exp.spec, exp.w0, transport, evaluate=exp.evaluate, on_round=on_round,
                    clear=exp.cleared)
    missing = transport.connect(cfg.nodes, cfg.min_nodes, opts.connect_timeout)
    run_dir = RunDir(out, cfg)
    log(INFO, "writing the run to %s", run_dir.path.resolve())
    try:
        server.run()
    except RoundError as exc:
        log(ERROR, "the run stopped: %s (rounds so far are in %s)", flower_wording(str(exc)), run_dir.path.resolve())
        raise
    partitions = {str(p): n for p, n in sorted(transport.flower_ids.items())}
    evaluation, failed = _evaluate_on_nodes(transport, server) if opts.federated_eval else ({}, [])
    extra = {"runner": runner_of(grid), "partitions": partitions, "missing_partitions": missing, **evaluation,
             "lost_nodes": _lost(transport, missing, records, failed), "limited_counts": server.limited_counts()}
    state = server.state
    _save_masks(run_dir.path, exp.spec, state.history)
    summary = finish_run(exp, run_dir, state.weights, state.mask, records, time.perf_counter() - started, extra)
    log(INFO, "%s", summary_line(summary, run_dir.path.resolve()))


def _log_round(record: dict, said: dict[str, tuple[str, int]]) -> None:
    """One line per round on the ServerApp's log (``flwr log``), and one per node left out; a reason
    already logged for that node (in `said`: node -> (reason, step)) is referred to, not repeated (a
    missing dataset's reason, with its list of files, would fill every round)."""
    acc = "-" if record["accuracy"] is None else f"{100 * record['accuracy']:.2f}%"
    log(INFO, "step %d (%s %d): accuracy %s, density %.4f, %d B up, %d B down, nodes %s", record["step"],
        record["phase"], record["round"], acc, record["density"], record["bytes_up"], record["bytes_down"],
        record["nodes"])
    for node, reason in record["dropped"].items():
        if node in said and said[node][0] == reason:
            log(WARNING, "step %d: node %s left out: as at step %d", record["step"], node, said[node][1])
            continue
        said[node] = (reason, record["step"])
        log(WARNING, "step %d: node %s left out: %s", record["step"], node, reason)


def _lost(transport: FlowerTransport, missing: list[int], records: list[dict], failed: list[dict]) -> list[dict]:
    """Every node that did not take part to the end: SuperNodes left out at the start, partitions no
    SuperNode joined with, nodes lost during the run, and nodes that failed the federated evaluation."""
    lost = list(transport.left_out)
    claimed = {entry["node"] for entry in lost}
    lost += [{"node": pid, "step": 0, "phase": "connect", "reason": "no SuperNode with this partition-id joined"}
             for pid in missing if pid not in claimed]
    lost += lost_nodes(records)
    gone = {entry["node"] for entry in lost}
    return lost + [entry for entry in failed if entry["node"] not in gone]


def runner_of(grid: Grid) -> str:
    """Which Flower runner drives the ServerApp: the simulation engine (its in-memory grid) or a deployment."""
    from flwr.superlink.grid import InMemoryGrid

    return "flower-simulation" if isinstance(grid, InMemoryGrid) else "flower-deployment"


def _evaluate_on_nodes(transport: FlowerTransport, server: Server) -> tuple[dict, list[dict]]:
    """The final weights evaluated on every node's validation split (federated evaluation): the
    summary's ``federated_eval`` with its traffic (``bytes_eval_down``: the weights, to each node
    they were sent to; ``bytes_eval_up``: the numbers each node returned), and the nodes that gave
    no result. The weights travel as a SPARSE body, exact float32 values at coded positions, so a
    pruned model costs its kept weights (a node may not hold the final mask to send values over).
    Each node's number of examples weighs at most `robust.count_limit` times the lower median of them
    (as training counts do: a node names its own)."""
    step = server.plan[-1].step
    body = codec.encode_sparse(server.state.weights, round=step)
    per_node, down, up, failed = {}, 0, 0, []
    for pid, result in sorted(transport.evaluate(body, step).items()):
        if isinstance(result, NodeFailure):
            log(WARNING, "federated evaluation: node %d left out: %s", pid, result.reason)
            down += len(body) if result.sent else 0
            failed.append({"node": pid, "step": step, "phase": "evaluate", "reason": result.reason})
            continue
        per_node[str(pid)] = result
        down += len(body)
        up += METRIC_BYTES * len(result)
    examples = [result["num-examples"] for result in per_node.values()]
    cap = count_cap(examples, server.cfg.robust.count_limit) if examples else 0.0
    weights = [min(n, cap) for n in examples]
    total = sum(weights)
    accuracy = sum(w * r["accuracy"] for w, r in zip(weights, per_node.values())) / total if total else None
    return {"federated_eval": {"accuracy": accuracy, "nodes": per_node}, "bytes_eval_down": down,
            "bytes_eval_up": up}, failed


def _save_masks(path: Path, spec: ParamSpec, history: Mapping[int, Mask]) -> None:
    """The consensus mask after every mask and adaptation round (0 = nothing pruned) as
    ``<step>/<tensor name>`` arrays, compressed (boolean arrays, a byte per entry), each unpacked from
    the history only as it is written."""
    write_groups(path / MASKS, ((str(step), dict(zip(spec.prunable_names, history[step]))) for step in history),
                 compress=True)
