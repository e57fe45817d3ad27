"""A ServerApp that sends every SuperNode one small message per round, waits for the echoes as the
mpfl ServerApp waits for replies, and writes each round's wall time (seconds) to the run config's ``out``."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from mpfl.flower.transport import send

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Wait for `nodes` SuperNodes, then time `rounds` rounds of echoes."""
    nodes, rounds = int(context.run_config["nodes"]), int(context.run_config["rounds"])
    while len(ids := sorted(grid.get_node_ids())) < nodes:
        time.sleep(0.5)
    times = []
    for step in range(rounds):
        started = time.perf_counter()
        messages = {nid: Message(RecordDict({"round": ConfigRecord({"step": step})}), dst_node_id=nid,
                                 message_type="train", group_id=str(step), ttl=600) for nid in ids}
        send(grid, messages, 600.0)
        times.append(time.perf_counter() - started)
    Path(str(context.run_config["out"])).write_text(json.dumps(times))
