"""Nodes in worker processes, for the simulator's `workers` option.

Each of `workers` processes holds a fixed share of the nodes (node i lives in worker
i mod workers) with its own model and trainer; the training data are passed once as
shared-memory tensors, so they are held once whatever the number of workers. A round sends
each worker the requests of its nodes, which it runs one after another exactly as the
sequential simulator does. Every random draw depends on (seed, step, node) only, so with the
same number of torch threads per process the masks and weights are bit for bit those of a
run with one process.

`workers = 0` (what `mpfl run` uses unless told otherwise) starts one worker per CPU core the
process may use, at the configured torch threads each (see :func:`worker_count`).

Workers are forked from a server process that has imported mpfl and torch once (the
``forkserver`` start method), so starting them costs little after the first run. As with any
multiprocessing code, a script that sets `workers` to 0 or above 1 must start the run under
``if __name__ == "__main__":``; the Python API's default, 1, needs no guard.
"""

from __future__ import annotations

import os
import pickle
import signal
import traceback
from collections.abc import Mapping, Sequence
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing as mp

from .config import Config, Options
from .data import Dataset
from .devices import resolve_device
from .errors import WORKER_NOTE, ConfigError, MpflError, WorkerError
from .experiment import Experiment
from .interrupts import signal_handled
from .node import Node, NodeState, build_nodes, deliver
from .plugins import from_plugin_code, load_plugins
from .protocol import Reply

PRELOAD = ["mpfl.sim"]
AUTO_WORKERS_MAX = 8
"""The most workers `workers = 0` starts: beyond about this many, the server's share of a round
(decoding every reply, the consensus, the evaluation), which runs in one process, dominates."""


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def forkserver_available() -> bool:
    """Whether this platform starts processes by forkserver, as worker processes need (Windows does not)."""
    return "forkserver" in mp.get_all_start_methods()


def worker_count(cfg: Config) -> int:
    """The worker processes a run trains its nodes in (1: none, the nodes run in the run's own process).

    `workers` >= 1 is taken as given (at most one per node). 0 (auto) means one per available core
    at `threads` torch threads each, at most :data:`AUTO_WORKERS_MAX` and one per node; it means 1
    when the nodes train on a GPU (processes would share it by time-slicing, measured only for the
    small mlp), when `threads` = 0 leaves the threads to torch, which then uses every core in one
    process, or where there is no forkserver to start workers with. Any count gives the same results.
    """
    if cfg.workers:
        return min(cfg.workers, cfg.nodes)
    if cfg.threads == 0 or resolve_device(cfg.train.device).type != "cpu" or not forkserver_available():
        return 1
    return max(1, min(available_cores() // cfg.threads, AUTO_WORKERS_MAX, cfg.nodes))


def worker_threads(cfg: Config, workers: int) -> int:
    """Torch threads per worker: the configured `threads`, or with 0 this process's threads shared out."""
    return cfg.threads or max(1, torch.get_num_threads() // workers)


def _serve(conn: Connection, cfg: Config, threads: int, dataset: Dataset, ids: list[int],
           states: dict[int, NodeState]) -> None:
    """A worker's loop: build its nodes and say "ready", then answer ("exchange", task, step, requests)
    and ("states",) until it receives None. Ctrl-C is left to the main process, which stops the
    workers itself; if that process is gone (killed), the worker ends quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        try:
            load_plugins(cfg.plugins)
            nodes = {n.id: n for n in build_nodes(cfg, Experiment.from_config(cfg, dataset), ids, states)}
        except MpflError as exc:
            conn.send(("setup", exc))
            return
        conn.send(("ready", None))
        _answer(conn, nodes)
    except (EOFError, OSError):  # the pipe broke, while starting too: the run's process is gone, nobody is left to answer
        return


def _answer(conn: Connection, nodes: dict[int, Node]) -> None:
    """Answer the run's process until it sends None: ("exchange", task, step, requests) with the
    nodes' replies, ("options",) with the option keys its plug-ins read, ("states",) with the states
    of the nodes that have taken part."""
    while (message := conn.recv()) is not None:
        try:
            if message[0] == "exchange":
                result = deliver(nodes, *message[1:])
            elif message[0] == "options":
                result = set(Options.read)
            else:
                result = {i: n.state for i, n in nodes.items() if not n.state.fresh}
            conn.send(("ok", result))
        except (Exception, SystemExit) as exc:  # raised again in the main process as it is (a plug-in's
            # sys.exit too), as one process would, with where it happened as a note
            shown = from_plugin_code(exc.__traceback__) or exc.__traceback__  # a plug-in's frames, if it raised
            exc.add_note(f"{WORKER_NOTE} {os.getpid()}:\n{''.join(traceback.format_exception(type(exc), exc, shown)).rstrip()}")
            try:
                conn.send(("raise", exc))
            except (pickle.PicklingError, TypeError, AttributeError):  # an exception that cannot travel
                conn.send(("error", traceback.format_exc()))


def refuse_in_a_starting_worker() -> None:
    """End a worker process quietly if it is still starting, that is re-importing the user's script
    (forkserver does, as spawn does): a script without a ``__main__`` guard would otherwise start a
    run there too, and fail with a long traceback. The run's process then says what to do."""
    if getattr(mp.current_process(), "_inheriting", False):  # multiprocessing's own mark of this phase
        raise SystemExit(1)


def _stopped(worker: int, code: int | None) -> str:
    """Why worker process `worker` gave no answer, from its exit code."""
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        return f"worker process {worker} was killed ({name}{': out of memory?' if -code == signal.SIGKILL else ''})"
    return (f"worker process {worker} exited (exit code {code}); if a script started this run, it must do so under "
            "`if __name__ == \"__main__\":`")


class NodePool:
    """The nodes of a run spread over worker processes; `exchange` runs every worker's share at once."""

    def __init__(self, cfg: Config, dataset: Dataset, states: Mapping[int, NodeState], workers: int) -> None:
        if not forkserver_available():
            raise ConfigError(f"workers = {cfg.workers}: worker processes are started by forkserver, which this "
                              "platform lacks; run with --workers 1")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        # SIGINT ignored for a moment is inherited by the forkserver while it imports torch, and by every
        # worker, so Ctrl-C reaches the run's own process alone, which stops them (a Ctrl-C within the few
        # milliseconds of starting the forkserver is lost).
        with signal_handled(signal.SIGINT, signal.SIG_IGN):
            forkserver.ensure_running()
        self.ids, self.plugins = list(range(cfg.nodes)), cfg.plugins
        self.workers = max(1, min(workers, cfg.nodes))
        threads = worker_threads(cfg, self.workers)
        self.conns: list[Connection] = []
        self.procs = []
        for w in range(self.workers):
            mine = self.ids[w :: self.workers]
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, cfg, threads, dataset, mine,
                                                    {i: states[i] for i in mine if i in states}), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        try:
            for w in range(self.workers):  # set-up errors (a plug-in that does not register a name) come now
                self._receive(w)
        except BaseException:
            self.terminate()
            raise

    def node_ids(self) -> list[int]:
        return list(self.ids)

    def _receive(self, worker: int) -> tuple[str, Any]:
        """The next message from `worker`: ("ready", None) or ("ok", result); its failures raised here."""
        try:
            status, result = self.conns[worker].recv()
        except (EOFError, OSError):  # OSError: killed in the middle of a reply ("got end of file during message")
            self.procs[worker].join(timeout=5)
            raise WorkerError(_stopped(worker, self.procs[worker].exitcode)) from None
        if status == "setup":
            imported = f"the config's plug-ins ({', '.join(self.plugins)})" if self.plugins else "no plug-ins"
            raise type(result)(f"a worker process could not set up its nodes: {str(result).rstrip('.')}. Worker "
                               f"processes imported {imported}: whatever a run names (a dataset, model, method, "
                               "criterion, consensus rule...) must be registered, in every process, by a module "
                               "listed in the config's plugins (--plugins) as it is imported") from None
        if status == "raise":
            raise result
        if status not in ("ok", "ready"):
            raise RuntimeError(f"worker process {worker} failed:\n{result}")
        return status, result

    def _send(self, messages: Mapping[int, tuple]) -> None:
        """One message to each of some workers (a dead one is found when its answer is awaited)."""
        for w, message in messages.items():
            try:
                self.conns[w].send(message)
            except ConnectionError:
                pass

    def exchange(self, task: str, step: int, requests: Mapping[int, Sequence[bytes]]) -> dict[int, Reply]:
        """Run each addressed node's handler in its worker; replies in the order of `requests`."""
        shares: dict[int, dict[int, Sequence[bytes]]] = {}
        for n, bodies in requests.items():
            shares.setdefault(n % self.workers, {})[n] = bodies
        self._send({w: ("exchange", task, step, share) for w, share in shares.items()})
        replies: dict[int, Reply] = {}
        for w in shares:
            replies.update(self._receive(w)[1])
        return {n: replies[n] for n in requests}

    def states(self) -> dict[int, NodeState]:
        """The state of every node that has received something, fetched from the workers (for checkpoints)."""
        out: dict[int, NodeState] = {}
        self._send({w: ("states",) for w in range(self.workers)})
        for w in range(self.workers):
            out.update(self._receive(w)[1])
        return {n: out[n] for n in self.ids if n in out}

    def options_read(self) -> set[str]:
        """The option keys the plug-ins of every worker have read (`mpfl.config.Options.read`)."""
        self._send({w: ("options",) for w in range(self.workers)})
        return set().union(*(self._receive(w)[1] for w in range(self.workers)))

    def terminate(self) -> None:
        """Stop the workers at once, whatever they are doing."""
        for conn, proc in zip(self.conns, self.procs):
            proc.terminate()
            proc.join()
            conn.close()

    def close(self) -> None:
        """Stop the workers."""
        for conn, proc in zip(self.conns, self.procs):
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
            conn.close()
