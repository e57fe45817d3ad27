"""A Flower deployment on 127.0.0.1 for tests, benchmarks and trying the apps on one machine.

`LocalFederation` starts a SuperLink and one SuperNode per partition, each in its own process
group and with its own ``FLWR_HOME`` (as if on its own machine), submits runs with ``flwr run``
and follows them with ``flwr ls``. With ``secure=True`` it first makes a private CA, the
SuperLink's certificate and an EC key per SuperNode, and runs with TLS and node
authentication, registering every SuperNode's public key with ``flwr supernode register``.
With ``simulation=True`` the SuperLink runs Flower's simulation engine instead of SuperNodes.
Everything binds to loopback, nothing is downloaded or installed, and `close` ends every
process group.

The commands it runs come from the functions below (`certificate_commands`, `superlink_command`,
...), which also render the commands of docs/deployment.md: a test checks that the page shows
exactly these.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import tomli_w

from .settings import ConfigValue

HOST = "127.0.0.1"
LOOPBACK_NAMES = "DNS:localhost,IP:127.0.0.1"
CONNECTION = "mpfl-coordinator"
"""The name of the `flwr` connection, its default: commands name no connection, so none is taken for an app folder."""
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               # Ray (the simulation engine) binds to 127.0.0.1 only as a single-machine cluster.
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
FAST_TASKS_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
"""A SuperNode's executor looks for new ClientApp tasks every 0.1 s instead of every 1 s."""
FINISHED = "finished"
CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def certificate_commands(names: str) -> list[str]:
    """Shell commands that make a private CA (``ca.crt``) and the SuperLink's certificate and key
    (``server.pem``, ``server.key``) for the subject alternative names `names`, such as
    ``DNS:coordinator.example.org,IP:127.0.0.1``. The SuperLink's own ServerApp process connects to
    127.0.0.1, so the names must include ``IP:127.0.0.1``."""
    return [
        'openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -days 365 -subj "/CN=mpfl-ca" '
        f"-keyout ca.key -out {CA_CERT}",
        'openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -subj "/CN=superlink" '
        f"-keyout {SERVER_KEY} -out server.csr",
        f'printf "subjectAltName={names}\\n" > san.ext',
        f"openssl x509 -req -in server.csr -CA {CA_CERT} -CAkey ca.key -CAcreateserial -days 365 -extfile san.ext "
        f"-out {SERVER_CERT}",
    ]


def supernode_key_command(name: str) -> str:
    """The shell command that makes a SuperNode's EC key pair (`name`, `name`.pub) in OpenSSH format."""
    return f'ssh-keygen -t ecdsa -b 384 -N "" -f {name}'


def superlink_command(host: str, port: int, *, secure: bool, simulation: bool = False) -> list[str]:
    """``flower-superlink`` listening on `host`:`port`; with `secure`, TLS with the certificate of
    `certificate_commands` (in the working directory) and only registered SuperNodes."""
    tls = (["--ssl-certfile", SERVER_CERT, "--ssl-keyfile", SERVER_KEY, "--ssl-ca-certfile", CA_CERT,
            "--enable-supernode-auth"] if secure else ["--insecure"])
    return (["flower-superlink", "--host", host, "--port", str(port), "--disable-runtime-dependency-installation",
             *tls] + (["--simulation"] if simulation else []))


def supernode_command(superlink: str, partition: int, partitions: int, *, key: str | None = None,
                      port: int | None = None, data_dir: str | None = None) -> list[str]:
    """``flower-supernode`` holding partition `partition` of `partitions`; with a `key` (the private key
    of `supernode_key_command`), over TLS and authenticated, else insecure. `port` is the SuperNode's
    own Runtime API port (9094 by default: each SuperNode on one machine needs its own)."""
    node_config = f"partition-id={partition} num-partitions={partitions}"
    if data_dir is not None:
        node_config += f' data-dir="{data_dir}"'
    tls = ["--root-certificates", CA_CERT, "--auth-supernode-private-key", key] if key else ["--insecure"]
    return (["flower-supernode", "--superlink", superlink, *tls] + (["--port", str(port)] if port else [])
            + ["--node-config", node_config])


def register_command(public_key: str) -> list[str]:
    """``flwr supernode register``: allow the SuperNode with this public key to connect (default connection)."""
    return ["flwr", "supernode", "register", public_key]


class LocalFederation:
    """A SuperLink and `nodes` SuperNodes (partition i of `nodes` each) on loopback, under `workdir`."""

    def __init__(self, workdir: str | Path, nodes: int, *, simulation: bool = False, secure: bool = False) -> None:
        if simulation and importlib.util.find_spec("ray") is None:  # else every run fails with "unknown error"
            raise ModuleNotFoundError('Flower\'s simulation engine needs Ray, which is not installed: pip install '
                                      '"flwr[simulation]" (from a checkout of mpfl: pip install -e ".[simulation]")', name="ray")
        self.workdir, self.nodes, self.simulation, self.secure = Path(workdir), nodes, simulation, secure
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
        return {**os.environ, **OFFLINE_ENV, **FAST_TASKS_ENV, "NO_PROXY": no_proxy, "no_proxy": no_proxy,
                "FLWR_HOME": str(self.home(name))}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        try:
            return subprocess.Popen(args, cwd=self.workdir, env=self.env(name), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()

    def _shell(self, command: str) -> None:
        """Run one shell command of the TLS recipe in the working directory."""
        done = subprocess.run(command, shell=True, cwd=self.workdir, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{command} failed ({done.returncode}): {done.stderr or done.stdout}")

    def start(self, timeout: float = 60.0) -> None:
        """Make the certificates and keys (`secure`), start the SuperLink, wait until it is healthy,
        register the SuperNodes' keys (`secure`), then start the SuperNodes."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.secure:
            for command in certificate_commands(LOOPBACK_NAMES):
                self._shell(command)
        self.link = self._spawn("superlink", superlink_command(HOST, self.port, secure=self.secure,
                                                               simulation=self.simulation))
        self._wait_healthy(timeout)
        tls = {"root-certificates": str((self.workdir / CA_CERT).resolve())} if self.secure else {"insecure": True}
        connection = {"address": f"{HOST}:{self.port}", **tls}
        (self.home("cli") / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION,
                                                                                   CONNECTION: connection}}))
        if not self.simulation:
            for i in range(self.nodes):
                self.start_supernode(i)

    def start_supernode(self, partition: int, *, key: str | None = None, register: bool = True) -> subprocess.Popen:
        """Start a SuperNode holding `partition` (with `secure`: under its own key, registered unless told
        not to); it is ended with the federation."""
        key = key or f"supernode-{partition}"
        if self.secure:
            self._shell(supernode_key_command(key))
            if register:
                self._command(register_command(f"{key}.pub"))
        args = supernode_command(f"{HOST}:{self.port}", partition, self.nodes, key=key if self.secure else None,
                                 port=free_port())
        proc = self._spawn(f"supernode-{len(self.supernodes)}", args)
        self.supernodes.append(proc)
        return proc

    def _wait_healthy(self, timeout: float) -> None:
        scheme = "https" if self.secure else "http"
        context = ssl.create_default_context(cafile=str(self.workdir / CA_CERT)) if self.secure else None
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.link.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {self.link.returncode}; "
                                   f"see {self.workdir / 'superlink.log'}")
            try:
                with opener.open(f"{scheme}://{HOST}:{self.port}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"flower-superlink did not become healthy within {timeout:g} s")

    def _flwr(self, *args: str) -> str:
        """Run ``flwr`` with `args` against this federation (its default connection); its standard output."""
        return self._command(["flwr", *args])

    def _command(self, command: list[str], timeout: float = 120.0) -> str:
        """Run a `flwr` command line in the working directory; its standard output."""
        done = subprocess.run(command, cwd=self.workdir, env=self.env("cli"), capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done.stdout

    def run(self, app: str | Path, run_config: Mapping[str, ConfigValue]) -> int:
        """Submit `app` with these run config overrides (``flwr run``); return the run id. In
        simulation, each virtual SuperNode gets one CPU so that they run side by side."""
        overrides = self.workdir / f"run-config-{time.monotonic_ns()}.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)))
        federation = ["--federation-config", f"num-supernodes={self.nodes} client-resources-num-cpus=1"]
        out = self._flwr("run", str(Path(app).resolve()), "--run-config", str(overrides),
                         *(federation if self.simulation else []), "--format", "json")
        return int(json.loads(out[out.index("{"):])["run-id"])

    def status(self, run_id: int) -> dict:
        """The run as ``flwr ls --format json`` describes it (``status``, ``status-details``, ...)."""
        out = json.loads(self._flwr("ls", "--run-id", str(run_id), "--format", "json"))
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
