"""The torch thread default beside other work: `mpfl run` on an idle machine and with busy processes beside it.

    python benchmarks/threads.py [--quick] [--json PATH] [--busy N] [--timeout SECONDS]

For each load, first none and then N CPU-bound processes (``python -c 'while True: pass'``,
default N = 2, started before and stopped after the runs of that load), three runs of ``mpfl
run`` in fresh processes, one after the other: with the defaults (one torch thread in each of
one process per core), with ``--threads 1 --workers 1`` (one thread in one process, the default
before workers were automatic) and with ``--threads 0`` (torch's own choice, one thread per
core, in one process, which was the default before one thread was). A row per run: the load,
the threads asked for, the wall time and the CPU time of the run's process and every process it
started, its workers included (read from /proc every 0.25 s, so a process loses at most its
last 0.25 s; reading more often costs the machine more than that), how many rounds it finished, whether
it finished before the timeout (default 600 s, 300 s with --quick; a run cut off there has a
wall time of at least the timeout), and its wall time over those of the ``--threads 1`` and
``--threads 0`` runs under the same load. Targets: with the busy processes, the default at most
1.5x ``--threads 1``; idle, the default no slower than ``--threads 0`` (at most 1.0x).

The full configuration is the plain ``mpfl run`` (mlp, 10 IID nodes, all of MNIST, 5 mask +
10 training rounds); --quick uses 12,000 training images and 2 mask + 3 training rounds. The
machine's load average is recorded before and after, since other work on it changes the
figures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, parser, stop_on_sigterm

COLUMNS = ["load", "threads", "wall_s", "cpu_s", "rounds_done", "finished", "vs_threads_1", "vs_threads_0"]
THREADS = {"default": [], "1": ["--threads", "1", "--workers", "1"], "0": ["--threads", "0"]}
QUICK = ["--train-samples", "12000", "--mask-rounds", "2", "--rounds", "3"]
BUSY = "while True: pass"


def session_cpu(session: int, seen: dict[int, float]) -> None:
    """Record in `seen` the CPU seconds (user + system) so far of every live process of `session`, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # the fields after the command name
        except (OSError, IndexError):
            continue  # ended meanwhile
        if int(stat[3]) == session:  # fields 6, 14 and 15 of proc(5): session, utime, stime
            seen[int(entry.name)] = (int(stat[11]) + int(stat[12])) / tick


def timed_run(args: list[str], out: Path, timeout: float) -> dict:
    """Wall and CPU seconds of `mpfl run ARGS --out OUT` in a fresh process (and the processes it starts),
    cut off after `timeout` s (and ended with this script, whatever stops it)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mpfl", "run", *args, "--quiet", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done, cpu, polls = (0, 0, None), {}, 0
    try:
        while not (done := os.wait4(proc.pid, os.WNOHANG))[0] and time.perf_counter() - started < timeout:
            if polls % 5 == 0:
                session_cpu(proc.pid, cpu)
            polls += 1
            time.sleep(0.05)
    finally:
        if not done[0]:
            os.killpg(proc.pid, signal.SIGKILL)
            done = os.wait4(proc.pid, 0)
    wall, finished = time.perf_counter() - started, os.WIFEXITED(done[1])
    if finished and os.WEXITSTATUS(done[1]) != 0:
        raise SystemExit(f"mpfl run {' '.join(args)} failed with exit code {os.WEXITSTATUS(done[1])}")
    rounds = (out / "rounds.jsonl").read_text().count("\n") if (out / "rounds.jsonl").exists() else 0
    return {"wall_s": wall, "cpu_s": sum(cpu.values()), "rounds_done": rounds, "finished": finished}


def runs_under_load(busy: int, quick: bool, timeout: float, work: Path) -> list[dict]:
    """The three runs with `busy` CPU-bound processes beside them (stopped again afterwards)."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        load = "idle" if not busy else f"{busy} busy processes"
        rows = [{"load": load, "threads": name, **timed_run([*(QUICK if quick else []), *flags],
                                                            work / f"{busy}-{i}", timeout)}
                for i, (name, flags) in enumerate(THREADS.items())]
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    wall = {r["threads"]: r["wall_s"] for r in rows}
    return [{**r, "vs_threads_1": r["wall_s"] / wall["1"], "vs_threads_0": r["wall_s"] / wall["0"]} for r in rows]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--busy", type=int, default=2, help="CPU-bound processes beside the runs (default 2)")
    p.add_argument("--timeout", type=float, help="seconds after which a run is stopped (default 600, --quick 300)")
    args = p.parse_args()
    stop_on_sigterm()
    timeout = args.timeout or (300.0 if args.quick else 600.0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mpfl-threads-") as work:
        rows = runs_under_load(0, args.quick, timeout, Path(work)) + runs_under_load(args.busy, args.quick, timeout,
                                                                                        Path(work))
    emit(f"mpfl run{' (--quick)' if args.quick else ''}: wall and CPU time by torch threads, idle and beside "
         f"{args.busy} busy processes ({os.cpu_count()} cores, load average before {load_before[0]:.2f}, after "
         f"{os.getloadavg()[0]:.2f})", rows, args.json, COLUMNS)


if __name__ == "__main__":
    main()
