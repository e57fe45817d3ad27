"""Run directories: the resolved config, a JSON-lines and CSV log per round, and a final summary.

Every runner writes the same layout, so `mpfl report` treats simulator and Flower runs alike:

    <run>/config.toml     the resolved configuration (reload it with `mpfl run --config`)
    <run>/rounds.jsonl    one JSON object per round
    <run>/rounds.csv      the same rounds as a flat table
    <run>/summary.json    final figures, the config, the seed and the software versions
    <run>/final.npz       the final weights and mask (for `mpfl export`)
    <run>/checkpoint.npz  server and node state after the last complete round (simulator; removed
                          when the run ends unless `mpfl run --keep-checkpoint`)
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import tomli_w
import torch

from ._version import __version__
from .attacks import malicious_ids
from .checkpoint import CHECKPOINT, FINAL, save_final
from .config import SECTIONS, Config, field_types, flatten
from .core.params import Mask, Weights
from .costs import model_stats
from .devices import describe
from .errors import ConfigError, RunDirError
from .files import atomic_write, refuse_link
from .locks import LOCK, refuse_if_locked
from .methods import method_of
from .plugins import fingerprints, installed_plugins
from .protocol import RoundRecord, mistyped, record_problem, typed_dict_problem

if TYPE_CHECKING:
    from .experiment import Experiment

CONFIG, ROUNDS_JSONL, ROUNDS_CSV, SUMMARY = "config.toml", "rounds.jsonl", "rounds.csv", "summary.json"
RUN_JSON = "run.json"
"""The run's identity (`mpfl.resume`): a random id and the hash of the config that decides its results."""
RUN_FILES = frozenset({CONFIG, ROUNDS_JSONL, ROUNDS_CSV, SUMMARY, FINAL, CHECKPOINT})
"""The files a run directory's records are made of (the layout above)."""
CSV_COLUMNS = ("step", "phase", "round", "method", "seed", "accuracy", "loss", "target_density", "density", "hamming",
               "agreement", "bytes_up", "bytes_down", "cum_bytes_up", "cum_bytes_down", "time", "elapsed", "nodes",
               "dropped")


class _AlwaysSummarized(TypedDict):
    """The keys every `summary.json` has (see `RunSummary`)."""

    method: str
    dataset: str
    model: str
    partition: str
    nodes: int
    seed: int
    sparsity: float  # the configured sparsity of a pruning method, 0 for the others
    final_accuracy: float | None  # of the last evaluated round; None if none was evaluated
    best_accuracy: float | None
    final_loss: float | None
    final_density: float | None
    rounds: int  # rounds recorded: mask and training rounds together
    train_rounds: int
    mask_rounds: int
    bytes_up: int  # of every round's messages, nodes to server
    bytes_down: int
    wall_time: float  # seconds, over every invocation of a resumed run
    train_round_time: float | None  # the mean wall time of a training round
    runner: str  # "simulator", "flower-simulation" or "flower-deployment"
    lost_nodes: list[dict[str, Any]]  # nodes whose last request failed: node, step, phase, reason
    bytes_eval_down: int  # federated evaluation on the nodes (Flower runs), outside the rounds
    bytes_eval_up: int
    config: dict[str, Any]  # the run's config, as config.toml holds it
    versions: dict[str, Any]  # mpfl, torch, python, and the plug-ins' source hashes


class RunSummary(_AlwaysSummarized, total=False):
    """A finished run's `summary.json`: what `summarize` writes and the runners add."""

    malicious_nodes: list[int]
    device: str
    limited_counts: dict[str, Any]  # nodes whose sample count claims were bounded, with what each claimed
    plugin_changes: list[dict[str, Any]]  # plug-ins whose code changed while the run was resumed
    params_kept: int  # the final model's parameters, size and cost, pruned and dense (mpfl.costs)
    emptied_layers: list[str]  # prunable tensors the final mask prunes whole (only when there are any)
    params_dense: int
    model_bytes: int
    model_bytes_dense: int
    flops_per_sample: int
    flops_per_sample_dense: int
    megabytes_total: float  # traffic both ways, and bits per parameter per node and round
    bits_per_param_up: float | None
    bits_per_param_down: float | None
    train_bits_per_param_up: float | None
    train_bits_per_param_down: float | None
    partitions: dict[str, Any]  # Flower runs: partition id -> Flower node id
    missing_partitions: list[int]
    federated_eval: dict[str, Any]


SUMMARY_CONFIG_FIELDS = ("method", "seed", "dataset", "partition", "alpha", "shards", "model")
"""The config fields a summary must hold: those `mpfl report` groups and labels runs by."""


def summary_problem(summary: object) -> str | None:
    """Why a value read from `summary.json` is not a `RunSummary` whose config has its fields' types;
    None if it is one. Field values are not checked against registries: a run of a plug-in's method
    names a method this process may not know."""
    problem = typed_dict_problem(summary, RunSummary)
    if problem is not None:
        return problem
    config, hints = summary["config"], field_types()
    sections = [k for k in SECTIONS if not isinstance(config.get(k, {}), dict)]
    if sections:
        return f"config.{sections[0]} is not a table"
    flat = flatten(config)
    missing = [k for k in SUMMARY_CONFIG_FIELDS if k not in flat]
    return f"config: no {', '.join(missing)}" if missing else mistyped(flat, hints, "config: ")


def new_run_dir(cfg: Config, root: str | Path = "runs") -> Path:
    """Create a new, empty run directory under `root` named after the run and its start time, and
    return it. Each name is taken by an exclusive mkdir, so that runs started in the same second
    (a sweep's background jobs) each get a folder of their own (`-2`, `-3`, ...)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-{cfg.method}-{cfg.data.dataset}-{cfg.train.model}-s{cfg.seed}"
    make_run_dir(base.parent)
    path, n = base, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        except OSError as exc:
            raise ConfigError(f"cannot create run directory {str(path)!r}: {exc.strerror}; choose an --out") from None


@contextlib.contextmanager
def removed_if_unused(path: Path, *, made: bool) -> Iterator[None]:
    """On the way out, remove `path` if it was `made` for this run and is still empty: a run that stopped
    before writing anything (Ctrl-C while its workers start, a bad setting found late) leaves no empty
    folder behind, which `--resume` would call "not a run directory". A folder with any file stays."""
    try:
        yield
    finally:
        if made:
            with contextlib.suppress(OSError):
                path.rmdir()


def is_flower_run(records: Iterable[RoundRecord]) -> bool:
    """Whether round records were written by the Flower ServerApp (each holds its `flower` timings)."""
    return any("flower" in r for r in records)


def _csv_value(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else value


def is_run_record(path: Path) -> bool:
    """Whether `path` is one of a run directory's records (`RUN_FILES` in a folder that holds a config.toml)."""
    return path.name in RUN_FILES and (path.parent / CONFIG).is_file()


def counted(n: int, noun: str) -> str:
    """`n` and the noun, plural unless n is 1: "1 run", "3 runs"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


MOVED_ASIDE = ".incomplete-"
"""A study cell's folder that held an unfinished attempt is renamed `<cell>.incomplete-<n>` before the
cell runs again (`study.prepare_cell`); a report tells such a folder apart by this part of its name."""


def recorded_nothing(path: Path) -> bool:
    """Whether the run in `path` stopped before its first round: no checkpoint and an empty or missing
    log (a resume would only repeat what stopped it, such as a missing option or faults on every node)."""
    log = path / ROUNDS_JSONL
    return not (path / CHECKPOINT).exists() and not (log.is_file() and log.stat().st_size)


def takes_new_run(path: Path) -> bool:
    """Whether `path` holds only what a run that stopped before its first round wrote (its config.toml and
    run.json, the latter so that a config of the user's own is never taken for it): a new run replaces them."""
    return (recorded_nothing(path) and (path / RUN_JSON).is_file()
            and {p.name for p in path.iterdir()} <= {LOCK, CONFIG, RUN_JSON, ROUNDS_JSONL})


def stopped_before_round_1(path: Path) -> str:
    """How a report or an export names a run that recorded nothing, and whether a new run may start there."""
    return "stopped before its first round (nothing was recorded)" + (
        "; a new run may start there again" if takes_new_run(path) else "")


def check_run_dir(path: Path, *, resume: bool = False) -> None:
    """Refuse a run directory that is a file, a dangling link, in use by another process or already holds
    results (unless resuming it). A folder holding only the settings and identity of a run that stopped
    before its first round is free: a new run replaces them (the same command again, once what stopped
    it is fixed)."""
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"run directory {str(path)!r} is a symbolic link to a missing folder "
                          f"({str(path.readlink())!r}); create that folder or choose another --out")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run directory {str(path)!r} exists and is not a directory; choose another --out")
    refuse_if_locked(path)
    if not resume and path.is_dir() and any(p.name != LOCK for p in path.iterdir()):
        if takes_new_run(path):
            return
        if (path / CONFIG).is_file() and not (path / SUMMARY).is_file() and not recorded_nothing(path):
            raise ConfigError(f"run directory {str(path)!r} holds an unfinished run; continue it with "
                              f"mpfl run --resume {path}, or choose another --out")
        raise ConfigError(f"run directory {str(path)!r} already holds files; choose another --out")


def check_resumable_dir(path: Path) -> None:
    """Refuse to resume a folder that is missing, is not a run directory or holds a finished run."""
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist; give the run directory of the run to continue")
    if not (path / CONFIG).is_file():
        raise ConfigError(f"{str(path)!r} is not a run directory (no config.toml); nothing to resume")
    if (path / SUMMARY).exists():
        raise ConfigError(f"{str(path)!r} holds a finished run; there is nothing to resume")
    if (path / ROUNDS_JSONL).exists() and is_flower_run(read_rounds(path)):
        raise ConfigError(f"{str(path)!r} holds a Flower run, and only simulator runs can be resumed; start it again "
                          "with flwr run (docs/deployment.md)")
    check_run_dir(path, resume=True)


def _csv_text(records: Iterable[dict], *, header: bool) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    for r in records:
        writer.writerow({k: _csv_value(r.get(k)) for k in CSV_COLUMNS})
    return out.getvalue()


def make_run_dir(path: Path) -> None:
    """Create a run directory (and its parents) if missing, with a one-line error if it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create run directory {str(path)!r}: {exc.strerror}; choose another --out") from None


class RunDir:
    """Writes one run's records; refuses to overwrite a directory that already holds results."""

    def __init__(self, path: str | Path, cfg: Config, *, resume: bool = False) -> None:
        self.path = Path(path)
        check_run_dir(self.path, resume=resume)
        make_run_dir(self.path)
        self.cfg = cfg
        if not resume:
            atomic_write(self.path / CONFIG, tomli_w.dumps(cfg.to_dict()))

    def log(self, record: RoundRecord) -> None:
        """Append one round to the JSON-lines and CSV logs, synced to disk (so that a checkpoint written
        after it never gets ahead of the records)."""
        csv_path = self.path / ROUNDS_CSV
        _append(self.path / ROUNDS_JSONL, json.dumps(record) + "\n")
        _append(csv_path, _csv_text([record], header=not _has_content(csv_path)))

    def rewrite(self, records: list[RoundRecord]) -> None:
        """Atomically replace the round logs with `records` (on resume: drop rounds after the checkpoint)."""
        atomic_write(self.path / ROUNDS_JSONL, "".join(json.dumps(r) + "\n" for r in records))
        atomic_write(self.path / ROUNDS_CSV, _csv_text(records, header=True))

    def finish(self, summary: dict) -> None:
        """Write the final summary (atomically)."""
        atomic_write(self.path / SUMMARY, json.dumps(summary, indent=2) + "\n")


RUNNER = "simulator"


def summary_line(summary: dict, out: Path) -> str:
    """A run's final figures in one line, as `mpfl run` prints them and the ServerApp logs them."""
    acc = "n/a" if summary["final_accuracy"] is None else f"{100 * summary['final_accuracy']:.2f}%"
    density = "n/a" if summary["final_density"] is None else f"{summary['final_density']:.3f}"
    return (f"final accuracy {acc}, density {density}, bytes up {summary['bytes_up']:,} down "
            f"{summary['bytes_down']:,}, {summary['wall_time']:.1f} s. Records in {out}")


def lost_nodes(records: Iterable[RoundRecord]) -> list[dict]:
    """Nodes whose last request in the run failed: the step from which they stayed out, its phase and
    the reason (a node that replied again later was only absent for a while, and is not listed)."""
    lost: dict[str, dict] = {}
    for r in records:
        for node in r["nodes"]:
            lost.pop(str(node), None)
        for node, reason in r["dropped"].items():
            lost.setdefault(node, {"node": int(node), "step": r["step"], "phase": r["phase"], "reason": reason})
    return sorted(lost.values(), key=lambda entry: (entry["step"], entry["node"]))


def summarize(cfg: Config, records: Iterable[RoundRecord], wall_time: float, extra: dict | None = None) -> RunSummary:
    """Final figures of a run from its round records; `extra` (the runner's own figures) overrides
    the defaults of a simulator run (`runner`, `lost_nodes`, no federated evaluation traffic)."""
    records = list(records)
    accs = [r["accuracy"] for r in records if r.get("accuracy") is not None]
    train_times = [r["time"] for r in records if r["phase"] == "train" and r.get("time") is not None]
    last = records[-1] if records else {}
    return {
        "method": cfg.method, "dataset": cfg.data.dataset, "model": cfg.train.model, "partition": cfg.data.partition,
        "nodes": cfg.nodes, "seed": cfg.seed, "sparsity": cfg.prune.sparsity if method_of(cfg).prunes else 0.0,
        "final_accuracy": accs[-1] if accs else None, "best_accuracy": max(accs) if accs else None,
        "final_loss": last.get("loss"), "final_density": last.get("density"),
        "rounds": len(records), "train_rounds": sum(r["phase"] == "train" for r in records),
        "mask_rounds": sum(r["phase"] == "mask" for r in records),
        "bytes_up": last.get("cum_bytes_up", 0), "bytes_down": last.get("cum_bytes_down", 0),
        "wall_time": wall_time, "train_round_time": sum(train_times) / len(train_times) if train_times else None,
        "runner": RUNNER, "lost_nodes": lost_nodes(records), "bytes_eval_down": 0, "bytes_eval_up": 0,
        **(extra or {}),
        "config": cfg.to_dict(),
        "versions": {"mpfl": __version__, "torch": torch.__version__, "python": platform.python_version(),
                     **({"plugins": fingerprints(cfg.plugins)} if cfg.plugins else {}),
                     **({"plugin_packages": installed} if (installed := installed_plugins()) else {})},
    }


def _has_content(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def _append(path: Path, text: str) -> None:
    """Append to a log file and sync it to disk; never through a symbolic link."""
    refuse_link(path)
    with open(path, "a", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_rounds(path: str | Path, *, complete: bool = False) -> list[RoundRecord]:
    """The round records of a run directory. A last line that a crash cut short (no newline, not valid
    JSON) is left out, unless `complete` (the log of a finished run, which no crash cut short); any other
    line that is not a round record is a RunDirError naming the file and line."""
    file = Path(path) / ROUNDS_JSONL
    try:
        lines = file.read_text().split("\n")
    except UnicodeDecodeError as exc:
        raise RunDirError(f"{file} is damaged (not text: {exc.reason}); restore it from a copy") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if number == len(lines) and not complete:
                break  # a line cut short by a crash: the round it held is redone or restored on resume
            raise RunDirError(f"{file} line {number} is damaged ({exc}); restore the file from a copy") from None
        problem = record_problem(record)
        if problem:
            raise RunDirError(f"{file} line {number} is not a round record ({problem}); restore the file from a copy")
        records.append(record)
    return records


def read_summary(path: str | Path) -> RunSummary:
    """The summary of a finished run directory; a RunDirError naming the file when it is not one."""
    file = Path(path) / SUMMARY
    try:
        summary = json.loads(file.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise RunDirError(f"{file} is damaged ({exc}); restore it from a copy or run the run again") from None
    problem = summary_problem(summary)
    if problem:
        raise RunDirError(f"{file} is not a run summary ({problem}); restore it from a copy or run the run again")
    return summary


def traffic_units(records: Sequence[RoundRecord], params: int) -> dict:
    """The field's units of traffic: megabytes both ways, and bits per model parameter per node
    and round (a dense float32 FedAvg round is 32 each way), over the whole run and over the
    training phase alone. Rounds count once per node that took part (replied)."""
    out: dict = {"megabytes_total": sum(r["bytes_up"] + r["bytes_down"] for r in records) / 1e6}
    for prefix, chosen in (("", records), ("train_", [r for r in records if r["phase"] == "train"])):
        node_rounds = sum(len(r["nodes"]) for r in chosen)
        for way in ("up", "down"):
            total = sum(r[f"bytes_{way}"] for r in chosen)
            out[f"{prefix}bits_per_param_{way}"] = 8 * total / (params * node_rounds) if node_rounds and params else None
    return out


def finish_run(exp: Experiment, run_dir: RunDir | None, weights: Weights, mask: Mask, records: list[RoundRecord],
               wall_time: float, extra: dict) -> RunSummary:
    """The run's summary (with the pruned model's size and cost, and its traffic in the field's
    units); written with the final weights to `run_dir` when there is one."""
    stats = model_stats(exp.model, exp.spec, weights, mask, exp.dataset.input_shape, method_of(exp.cfg).structured)
    stats.update(traffic_units(records, stats["params_dense"]))
    if emptied := [name for name, kept in zip(exp.spec.prunable_names, mask) if not kept.any()]:
        stats["emptied_layers"] = emptied
    summary = summarize(exp.cfg, records, wall_time,
                        {"malicious_nodes": malicious_ids(exp.cfg), "device": describe(exp.device), **extra, **stats})
    if run_dir is not None:
        save_final(run_dir.path, exp.spec, weights, mask, exp.dataset.input_shape, exp.dataset.num_classes)
        run_dir.finish(summary)
    return summary
