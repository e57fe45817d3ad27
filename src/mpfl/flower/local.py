"""A Flower deployment on 127.0.0.1 for tests, benchmarks and trying the apps on one machine.

`LocalFederation` starts ``flower-superlink --insecure`` and one ``flower-supernode`` per
partition, each in its own process group and with its own ``FLWR_HOME`` (as if on its own
machine), submits runs with ``flwr run`` and follows them with ``flwr ls``. With
``simulation=True`` the SuperLink runs Flower's simulation engine instead of SuperNodes.
Everything binds to loopback, nothing is downloaded or installed, and `close` ends every
process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import tomli_w

from .settings import ConfigValue

HOST = "127.0.0.1"
CONNECTION = "local"
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               # The SuperNode's executor looks for new ClientApp tasks every 0.1 s instead of every 1 s.
               "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
               # Ray (the simulation engine) binds to 127.0.0.1 only as a single-machine cluster.
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
FINISHED = "finished"
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class LocalFederation:
    """A SuperLink and `nodes` SuperNodes (partition i of `nodes` each) on loopback, under `workdir`."""

    def __init__(self, workdir: str | Path, nodes: int, *, simulation: bool = False) -> None:
        self.workdir, self.nodes, self.simulation = Path(workdir), nodes, simulation
        self.port = free_port()
        self.link: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def home(self, name: str) -> Path:
        """The FLWR_HOME of one Flower process (``cli`` for the flwr command)."""
        path = self.workdir / f"flwr-{name}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env(self, name: str) -> dict[str, str]:
        """The environment of a Flower process: offline, no proxy for loopback, its own FLWR_HOME."""
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), HOST, "localhost"]))
        return {**os.environ, **OFFLINE_ENV, "NO_PROXY": no_proxy, "no_proxy": no_proxy,
                "FLWR_HOME": str(self.home(name))}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        try:
            return subprocess.Popen(args, cwd=self.workdir, env=self.env(name), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink, wait until it is healthy, then start the SuperNodes."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        link = ["flower-superlink", "--insecure", "--host", HOST, "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        self.link = self._spawn("superlink", link + (["--simulation"] if self.simulation else []))
        self._wait_healthy(timeout)
        connection = {"address": f"{HOST}:{self.port}", "insecure": True}
        (self.home("cli") / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION,
                                                                                   CONNECTION: connection}}))
        if not self.simulation:
            for i in range(self.nodes):
                self.supernodes.append(self._spawn(f"supernode-{i}", [
                    "flower-supernode", "--insecure", "--superlink", f"{HOST}:{self.port}", "--port", str(free_port()),
                    "--node-config", f"partition-id={i} num-partitions={self.nodes}"]))

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.link.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {self.link.returncode}; "
                                   f"see {self.workdir / 'superlink.log'}")
            try:
                with DIRECT.open(f"http://{HOST}:{self.port}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"flower-superlink did not become healthy within {timeout:g} s")

    def _flwr(self, *args: str, timeout: float = 120.0) -> str:
        """Run a `flwr` command against this federation; return its standard output."""
        done = subprocess.run(["flwr", *args], cwd=self.workdir, env=self.env("cli"), capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done.stdout

    def run(self, app: str | Path, run_config: Mapping[str, ConfigValue]) -> int:
        """Submit `app` with these run config overrides (``flwr run``); return the run id. In
        simulation, each virtual SuperNode gets one CPU so that they run side by side."""
        overrides = self.workdir / f"run-config-{time.monotonic_ns()}.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)))
        federation = ["--federation-config", f"num-supernodes={self.nodes} client-resources-num-cpus=1"]
        out = self._flwr("run", str(Path(app).resolve()), CONNECTION, "--run-config", str(overrides),
                         *(federation if self.simulation else []), "--format", "json")
        return int(json.loads(out[out.index("{"):])["run-id"])

    def status(self, run_id: int) -> dict:
        """The run as ``flwr ls --format json`` describes it (``status``, ``status-details``, ...)."""
        out = json.loads(self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json"))
        return out["runs"][0]

    def wait(self, run_id: int, timeout: float, *, done: Path | None = None, poll: float = 10.0) -> dict:
        """Poll the run with ``flwr ls`` until it has finished (completed, failed or stopped); return
        its description. Each ``flwr ls`` costs about a second of CPU, so it is asked every `poll`
        seconds, and every 2 s once the file `done` (e.g. the run's summary.json) exists."""
        deadline, asked = time.monotonic() + timeout, float("-inf")
        while time.monotonic() < deadline:
            interval = 2.0 if done is not None and done.exists() else poll
            if time.monotonic() - asked >= interval:
                asked = time.monotonic()
                run = self.status(run_id)
                if run["status"].startswith(FINISHED):
                    return run
            time.sleep(0.25)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:g} s; see the logs in {self.workdir}")

    def stop_supernode(self, index: int) -> None:
        """End SuperNode `index` and everything it started, as a shutdown of its machine would (SIGTERM)."""
        _end_group(self.supernodes[index], signal.SIGTERM)

    def close(self, grace: float = 5.0) -> None:
        """End every process group this federation started (SIGTERM, then SIGKILL after `grace` s)."""
        procs = [p for p in [*self.supernodes, self.link] if p is not None]
        for proc in procs:
            _end_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _end_group(proc, signal.SIGKILL)
            proc.wait()


def _end_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    """Send `sig` to the process group `proc` leads (it was started in a new session)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
