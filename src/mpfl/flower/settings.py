"""Flower's flat run config and node config, mapped onto mpfl's typed `Config`.

The run config holds the same fields as an `mpfl run` TOML file, flattened with dots
(``method``, ``train.lr``, ``data.train-samples``; ``-`` or ``_`` alike), plus the keys of
the Flower runner itself (``out-dir``, ``round-timeout``, ...). An empty string means "mpfl's
default", since Flower's config values cannot be empty. Both apps derive the same `Config`
from the same run config, so every SuperNode builds the same partition, model and plan.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from ..config import FIELD_SECTIONS, Config, mentioned
from ..errors import ConfigError

ConfigValue = bool | int | float | str

_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")


def flower_wording(message: str, *, node: bool = False) -> str:
    """An error message written for `mpfl run` with each flag and field named as Flower knows it: a
    config field as its run-config key (``--mask-rounds`` or ``min_nodes = 2`` -> ``prune.mask-rounds``,
    ``min-nodes = 2``), ``--out`` as ``out-dir``, and on a SuperNode (`node`) ``--data-dir`` as its
    node config's ``data-dir``."""

    def key(match: re.Match) -> str:
        flag = match[1]
        if node and flag == "data-dir":
            return "the node config's data-dir"
        if flag == "out":
            return "out-dir"
        section = FIELD_SECTIONS.get(flag.replace("-", "_"))
        if section is None:
            return match[0]
        return f"{section}.{flag}" if section else flag

    return _FLAG.sub(key, _run_config_keys(message))


@dataclass(frozen=True)
class RunnerOptions:
    """Settings of the Flower runner that are not part of the algorithm's config."""

    out_dir: str = ""
    round_timeout: float = 600.0
    connect_timeout: float = 120.0
    federated_eval: bool = True


@dataclass(frozen=True)
class NodeSettings:
    """Which partition a SuperNode holds, where it finds its data, and how many idle seconds its
    warm node process waits for the next message (`mpfl.flower.warm`; 0: no warm process)."""

    partition_id: int
    num_partitions: int
    data_dir: str | None = None
    keep_warm: float = 600.0


RUNNER_FIELDS = frozenset(f.name for f in fields(RunnerOptions))


def from_run_config(run_config: Mapping[str, ConfigValue]) -> tuple[Config, RunnerOptions]:
    """The experiment's `Config` and the runner's options from Flower's flat run config
    (refusing the faults only the simulator can inject; malicious nodes are honoured)."""
    data: dict = {}
    runner: dict = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name in RUNNER_FIELDS:
            runner[name] = value
        elif value != "":
            section, _, field = name.rpartition(".")
            (data.setdefault(section, {}) if section else data)[field] = value
    try:
        cfg = Config.from_dict(data)
    except ConfigError as exc:  # named as the run config names them: faults.attack, not attack
        raise ConfigError(_run_config_keys(str(exc))) from None
    injected = [f"faults.{name} = {rate}" for name, rate in cfg.faults.rates().items() if rate]
    if injected:
        raise ConfigError(f"{', '.join(injected)}: the in-process simulator injects dropouts, stragglers and "
                          "corrupt or duplicated replies; on Flower they happen for real, so set these to 0")
    if cfg.workers > 1:
        raise ConfigError(f"workers = {cfg.workers}: worker processes are the in-process simulator's; on Flower "
                          "every node is its own ClientApp, so set workers = 1")
    return cfg, _runner_options(runner)


def _run_config_keys(message: str) -> str:
    """A validator's message with every config field it names as its run-config key (``attack = 'x'`` ->
    ``faults.attack = 'x'``, ``mask_rounds must`` -> ``prune.mask-rounds must``)."""
    for name, section in FIELD_SECTIONS.items():
        key = name.replace("_", "-")
        message = re.sub(mentioned(name), f"{section}.{key}" if section else key, message)
    return message


def _runner_options(values: dict) -> RunnerOptions:
    defaults = RunnerOptions()
    out = {}
    for name, value in values.items():
        kind = type(getattr(defaults, name))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind):
            raise ConfigError(f"run config {name.replace('_', '-')} = {value!r} must be of type {kind.__name__}")
        out[name] = value
    options = RunnerOptions(**out)
    for name in ("round_timeout", "connect_timeout"):
        if not math.isfinite(getattr(options, name)) or getattr(options, name) <= 0:
            raise ConfigError(f"run config {name.replace('_', '-')} must be a finite number > 0 of seconds")
    return options


def node_settings(node_config: Mapping[str, ConfigValue], cfg: Config) -> NodeSettings:
    """Check a SuperNode's node config against the run: it needs its partition of `cfg.nodes`."""
    missing = [k for k in ("partition-id", "num-partitions") if k not in node_config]
    if missing:
        raise ConfigError(f"SuperNode node config lacks {', '.join(missing)}; start it with "
                          f"--node-config \"partition-id=<i> num-partitions={cfg.nodes}\"")
    pid, num = node_config["partition-id"], node_config["num-partitions"]
    if not isinstance(pid, int) or not isinstance(num, int) or isinstance(pid, bool) or isinstance(num, bool):
        raise ConfigError(f"partition-id and num-partitions must be integers, got {pid!r} and {num!r}")
    if num != cfg.nodes:
        raise ConfigError(f"this SuperNode has num-partitions = {num} but the run has nodes = {cfg.nodes}; "
                          f"restart it with num-partitions={cfg.nodes} or run with --run-config nodes={num}")
    if not 0 <= pid < num:
        raise ConfigError(f"partition-id = {pid} is outside 0..{num - 1}")
    data_dir = node_config.get("data-dir") or None
    if data_dir is not None and not isinstance(data_dir, str):
        raise ConfigError(f"data-dir must be a quoted path, as in --node-config 'data-dir=\"/data/mpfl\"'; got {data_dir!r}")
    keep_warm = node_config.get("keep-warm", NodeSettings.keep_warm)
    if isinstance(keep_warm, bool) or not isinstance(keep_warm, (int, float)) or keep_warm < 0:
        raise ConfigError(f"keep-warm must be a number of seconds >= 0 (0: no warm node process), got {keep_warm!r}")
    return NodeSettings(pid, num, data_dir, float(keep_warm))


def with_local_init(run_config: Mapping[str, ConfigValue], node_config: Mapping[str, ConfigValue]) -> dict:
    """The run config as a SuperNode sees it: in a run with an ``--init`` file, ``train.init`` names
    the node's own copy (node config ``init``, else the run's path where that exists on this
    machine), or nothing, and a node without a copy asks the server for the initial weights. A run
    without one builds them from the seed, whatever the node config says: it outlives the run."""
    own = node_config.get("init") or ""
    if not isinstance(own, str):
        raise ConfigError(f"init must be a quoted path, as in --node-config 'init=\"/data/w0.pt\"'; got {own!r}")
    keys = [k for k in run_config if k.replace("-", "_") in ("train.init", "init")]
    if not any(run_config[k] for k in keys):
        return dict(run_config)
    path = own or next(str(run_config[k]) for k in keys if run_config[k])
    local = path if Path(path).is_file() else ""
    return {**{k: v for k, v in run_config.items() if k not in keys}, "train.init": local}


def node_config(cfg: Config, node: NodeSettings) -> Config:
    """The run's config as seen by one SuperNode: its own data directory, if it set one."""
    return cfg.with_overrides({"data_dir": node.data_dir}) if node.data_dir else cfg
