"""Worker processes: how many a run starts (`mpfl.parallel.worker_count`), and where none can be started."""

import multiprocessing
import os
import signal
import struct
import subprocess
import sys

import pytest
import torch

import mpfl.parallel
from conftest import tiny_config
from mpfl.config import Config
from mpfl.errors import ConfigError, WorkerError
from mpfl.parallel import AUTO_WORKERS_MAX, NodePool, worker_count
from mpfl.sim import simulate


@pytest.mark.parametrize(("cores", "overrides", "expected"), [
    (2, {}, 2),                                  # one process per core, one torch thread each
    (64, {"nodes": 100}, AUTO_WORKERS_MAX),      # capped where the server's one process dominates
    (16, {"nodes": 3}, 3),                       # never more processes than nodes
    (16, {"threads": 4}, 4),                     # the cores shared out at --threads each
    (3, {"threads": 4}, 1),                      # more threads than cores: one process
    (16, {"threads": 0}, 1),                     # torch's own threads already use every core
    (1, {}, 1),
])
def test_auto_workers_share_the_cores_out(monkeypatch, cores, overrides, expected):
    monkeypatch.setattr(mpfl.parallel, "available_cores", lambda: cores)
    assert worker_count(Config().with_overrides({"workers": 0, **overrides})) == expected


def test_auto_workers_leave_a_gpu_to_one_process(monkeypatch):
    monkeypatch.setattr(mpfl.parallel, "available_cores", lambda: 16)
    monkeypatch.setattr(mpfl.parallel, "resolve_device", lambda name: torch.device("cuda" if name == "cuda" else "cpu"))
    assert worker_count(Config().with_overrides({"workers": 0, "device": "cuda"})) == 1
    assert worker_count(Config().with_overrides({"workers": 0, "device": "auto"})) == AUTO_WORKERS_MAX  # lands on the CPU


def test_a_set_number_of_workers_is_kept_up_to_one_per_node(monkeypatch):
    monkeypatch.setattr(mpfl.parallel, "available_cores", lambda: 1)
    assert worker_count(Config().with_overrides({"workers": 3})) == 3
    assert worker_count(Config().with_overrides({"workers": 30, "nodes": 4})) == 4
    assert worker_count(Config()) == 1


def test_auto_workers_stay_in_one_process_where_processes_cannot_be_forked(monkeypatch):
    monkeypatch.setattr(mpfl.parallel, "available_cores", lambda: 16)
    monkeypatch.setattr(mpfl.parallel, "forkserver_available", lambda: False)
    assert worker_count(Config().with_overrides({"workers": 0})) == 1
    with pytest.raises(ConfigError, match="workers = 2: worker processes are started by forkserver, which this "
                                          "platform lacks; run with --workers 1"):
        simulate(tiny_config(workers=2))


def test_a_script_without_a_main_guard_gets_one_error_that_says_what_to_do(tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text("from mpfl import Config, simulate\n"
                      "simulate(Config().with_overrides({'workers': 2, 'nodes': 3, 'train_samples': 600, "
                      "'test_samples': 100, 'mask_rounds': 1, 'rounds': 1}))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.count("Traceback") == 1  # the workers stop quietly
    assert done.stderr.strip().splitlines()[-1] == (
        'mpfl.errors.WorkerError: worker process 0 exited (exit code 1); if a script started this run, it must do '
        'so under `if __name__ == "__main__":`')


def _die_in_the_middle_of_a_reply(conn) -> None:
    """A worker killed while it writes a reply: a length prefix of 1,000 bytes, then 10 of them."""
    os.write(conn.fileno(), struct.pack("!i", 1000) + b"x" * 10)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_in_the_middle_of_a_reply_is_named_as_killed():
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_die_in_the_middle_of_a_reply, args=(child,))
    proc.start()
    child.close()
    pool = object.__new__(NodePool)  # only the pipes and processes matter to _receive
    pool.conns, pool.procs, pool.plugins = [parent], [proc], ()
    with pytest.raises(WorkerError, match=r"^worker process 0 was killed \(SIGKILL: out of memory\?\)$"):
        pool._receive(0)


def _serve_a_run_that_is_gone(parent, child, cfg, dataset) -> None:
    parent.close()  # the copy this process inherited: with it closed, nobody reads the pipe
    mpfl.parallel._serve(child, cfg, 1, dataset, [0, 1], {})


def test_a_worker_whose_run_is_gone_before_it_is_ready_ends_quietly():
    """Ctrl-C or a kill can end the run's process while its workers still start: a worker then
    cannot say it is ready, and ends with nothing on the terminal instead of a traceback."""
    from mpfl.experiment import Experiment

    cfg = tiny_config(nodes=2)
    dataset = Experiment.from_config(cfg).dataset
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_a_run_that_is_gone, args=(parent, child, cfg, dataset))
    proc.start()
    parent.close()
    child.close()
    proc.join(timeout=60)
    assert proc.exitcode == 0
