"""Comparison tables and plots from run directories, so any set of runs can be read side by side.

Simulator, study and Flower runs share one directory format (`mpfl.records`), so they mix
freely. Runs are reported in sections of one dataset, partition and model. Runs whose configs
differ only in the seed (and in how they were executed: threads, workers, data directory) form
one group, reported as mean ± sample standard deviation (ddof=1) over its n distinct seeds;
runs of different runners (the summary's ``runner``: simulator, flower-deployment,
flower-simulation) never share a group, and the runner shows as a variant where it differs;
runs that repeat a seed are averaged first, so a repeat never counts as another seed. Config
fields that differ from the most common value in the section are listed as the group's
*variant* (an ablation such as ``consensus=threshold`` or ``nodes=50``); method options
(``[prune]``, ``[codec]``, ``[robust]``) are compared among runs of the same method only.

Run directories without a summary (unfinished runs) or that cannot be read (a finished run's
``rounds.jsonl`` must parse to the end and hold every round its summary counts) are listed as
skipped, with the reason, and the report covers the rest; a run that recorded no test accuracy
(``--rounds 0``) appears with "–" and is left out of the plots.

A report refreshes the files an earlier report wrote (a report.md that opens with its heading, PNGs
at its plot names, a JSON list of its rows) and refuses, before writing anything, to replace any
other file in their place unless forced.

Bytes are summed from ``rounds.jsonl``. "Bytes vs FedAvg" divides a run's bytes (up + down)
by those of the dense FedAvg run (float32 values) with the same dataset, partition, model,
nodes, training rounds and seed, and averages that ratio over the group's seeds. The traffic of a
final federated evaluation (Flower runs) is reported apart, and the nodes a run lost
(``lost_nodes``) are listed with the step and the reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache, partial
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from matplotlib import colormaps
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import AutoLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from .config import Config, flatten
from .data import DATASETS
from .errors import ConfigError, PathError, RunDirError
from .files import atomic_write, refuse_link
from .locks import refuse_if_locked
from .methods import METHODS
from .partition import PARTITIONS
from .records import (
    CONFIG,
    MOVED_ASIDE,
    ROUNDS_JSONL,
    RUNNER,
    SUMMARY,
    counted,
    is_flower_run,
    is_run_record,
    read_rounds,
    read_summary,
    recorded_nothing,
    stopped_before_round_1,
)
from .resume import refusal

FIGSIZE, DPI = (7.0, 4.5), 120
ABLATION_LABEL_WIDTH, ABLATION_INCHES_PER_LINE = 44, 0.16  # variant labels wrap; a plot of many grows taller
REPORT_MD, HEADING = "report.md", "# mpfl report"  # the report's file, and its first line (how a refresh knows it)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_NAMES = ("accuracy_vs_round", "accuracy_vs_bytes", "accuracy_vs_sparsity", "ablation")  # each section's plots
ROW_KEYS = frozenset({"method", "dataset", "partition", "runs"})  # keys of every JSON row mpfl report has written
# Fields shown in their own columns (or meaningless across runs), never listed as a variant.
SHOWN = {"method", "dataset", "partition", "alpha", "shards", "sparsity", "model", "seed", "data_dir", "threads",
         "workers"}
NOT_GROUPED = {"seed", "data_dir", "threads", "workers"}
METHOD_OPTIONS = {"prune", "codec", "robust"}  # config sections whose fields are compared within a method
_PLAIN = FuncFormatter(lambda x, _: format(Decimal(f"{x:.6g}"), ",f"))  # 0.00002, 0.5, 2,000,000: never 1e+06
COLUMNS = {  # JSON key -> markdown header
    "method": "Method", "model": "Model", "variant": "Variant", "dataset": "Dataset", "partition": "Partition",
    "sparsity": "Target sparsity", "n": "n", "final_accuracy": "Final acc. (%)", "best_accuracy": "Best acc. (%)",
    "rounds": "Rounds (mask+train)", "bytes_up": "Up (MB)", "bytes_down": "Down (MB)", "bytes_vs_fedavg": "Bytes vs FedAvg",
    "bits_per_param": "Bits/param/round (up / down)", "wall_time": "Wall time (s)",
    "bytes_eval_down": "Eval down (MB)", "bytes_eval_up": "Eval up (B)",
}
PRECISION_STYLES = {"float32": "--", "float16": ":", "int8": "-."}  # accuracy-vs-bytes lines of value precisions
OPTIONAL = {"variant", "bytes_eval_down", "bytes_eval_up"}  # columns shown only when some row has a value
DEVICE_COLUMNS = {  # the pruned model on a device, relative to the dense model
    "method": "Method", "variant": "Variant", "sparsity": "Target sparsity", "params_kept": "Params kept",
    "model_bytes": "Model (kB)", "flops_per_sample": "MFLOPs / sample", "train_time_vs_dense": "Train round vs FedAvg",
}


@cache
def _defaults() -> dict[str, Any]:
    """The package's default config, flattened, and the default runner."""
    return {**flatten(Config().to_dict()), "runner": RUNNER}


@dataclass
class Run:
    """One finished run directory: its summary, its round records and its flattened config."""

    path: Path
    summary: dict
    rounds: list[dict]
    flat: dict[str, Any] = field(init=False)
    sections: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.flat = {**flatten(self.summary["config"]), "runner": self.summary.get("runner", RUNNER)}
        if self.flat["dataset"] in DATASETS:  # recorded by an alias or in another case before configs spelled it
            self.flat["dataset"] = DATASETS.canonical(self.flat["dataset"])
        self.sections = {}
        for key, value in self.summary["config"].items():
            self.sections.update(dict.fromkeys(value, key) if isinstance(value, dict) else {key: ""})

    @property
    def method(self) -> str:
        return self.flat["method"]

    @property
    def reference(self) -> bool:
        """Whether the run is of the dense baseline that the others' bytes and times are compared with."""
        return self.method in METHODS and METHODS.get(self.method).reference

    @property
    def bytes_up(self) -> int:
        return sum(r["bytes_up"] for r in self.rounds)

    @property
    def bytes_down(self) -> int:
        return sum(r["bytes_down"] for r in self.rounds)

    @property
    def section(self) -> tuple[str, str, str]:
        """Dataset, partition label and model: what a run's numbers can be compared within."""
        return self.flat["dataset"], self.partition, self.flat["model"]

    @property
    def partition(self) -> str:
        """The partition as a label: iid, dirichlet(0.5) or shards(2)."""
        p = self.flat["partition"]
        return {"dirichlet": f"dirichlet({self.flat['alpha']:g})", "shards": f"shards({self.flat['shards']})"}.get(p, p)

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step, cumulative bytes (up + down) and accuracy of every evaluated round."""
        cum = np.cumsum([r["bytes_up"] + r["bytes_down"] for r in self.rounds])
        rows = [(r["step"], c, r["accuracy"]) for r, c in zip(self.rounds, cum) if r.get("accuracy") is not None]
        steps, cum_bytes, acc = (np.array(col, dtype=float) for col in zip(*rows)) if rows else (np.empty(0),) * 3
        return steps, cum_bytes, acc


@dataclass
class Group:
    """Runs whose configs differ only in the seed."""

    runs: list[Run]
    variant: dict[str, Any]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def seeds(self) -> list[int]:
        """The distinct seeds of the group's runs."""
        return sorted({r.flat["seed"] for r in self.runs})

    def per_seed(self, key: str) -> list[float | None]:
        """A summary figure per distinct seed (the mean of runs that repeat a seed; None if any lacks it)."""
        out = []
        for seed in self.seeds:
            values = [r.summary.get(key) for r in self.runs if r.flat["seed"] == seed]
            out.append(None if None in values else float(np.mean(values)))
        return out

    @property
    def label(self) -> str:
        return self.first.method + (f" · {format_variant(self.variant)}" if self.variant else "")


def is_run_dir(path: Path) -> bool:
    """Whether `path` is one run's directory (it holds a summary, a config or round records)."""
    return any((path / name).is_file() for name in (SUMMARY, CONFIG, ROUNDS_JSONL))


def find_run_dirs(paths: Iterable[str | Path]) -> tuple[list[Path], dict[Path, str]]:
    """Run directories among `paths` (finished or not), each path a run directory or a folder holding
    some (at any depth), and the paths that are neither with the reason, so that one stray entry of
    ``mpfl report runs/*`` is skipped; a ConfigError when no path holds a run directory."""
    found: dict[Path, None] = {}
    strays: dict[Path, str] = {}
    for raw in paths:
        path = Path(raw)
        if is_run_dir(path):
            found[path.resolve()] = None
        elif not path.exists():
            strays[path] = "missing (no such file or folder)"
        elif not path.is_dir():
            strays[path] = "not a run directory nor a folder of run directories"
        elif runs := sorted({p.parent.resolve() for name in (SUMMARY, CONFIG) for p in path.rglob(name)}):
            found.update(dict.fromkeys(runs))
        else:
            strays[path] = "a folder without run directories"
    if not found:
        raise ConfigError(f"no run directory found: {'; '.join(f'{str(p)!r} is {why}' for p, why in strays.items())}")
    return list(found), strays


@dataclass
class Scan:
    """The finished runs found among some paths, and the run directories left out with the reason."""

    runs: list[Run] = field(default_factory=list)
    skipped: dict[Path, str] = field(default_factory=dict)


def _unfinished(path: Path) -> str:
    """Why an unfinished run directory is left out, with how far it got and how to finish it (or that
    a process is still running it)."""
    try:
        records, damage = read_rounds(path), None
    except FileNotFoundError:  # stopped before its first round
        records, damage = [], None
    except (OSError, ValueError) as exc:
        records, damage = [], exc
    recorded = f"{counted(len(records), 'round')} recorded"
    try:
        refuse_if_locked(path)
    except RunDirError:
        return f"still running ({recorded} so far); report on it once it has finished"
    if damage is not None:
        return f"unfinished, and cannot be read ({type(damage).__name__}: {damage})"
    if MOVED_ASIDE in path.name:
        return (f"an unfinished attempt at a study cell, moved aside when the study ran the cell again "
                f"({path.name.split(MOVED_ASIDE)[0]}); delete it once that cell has finished")
    if recorded_nothing(path):
        return f"unfinished: it {stopped_before_round_1(path)}"
    if is_flower_run(records):
        return f"unfinished Flower run ({recorded}, no summary.json), which cannot be resumed"
    if (why := refusal(path, plugins=False)) is not None:  # a report runs no plug-in's code
        return f"unfinished ({recorded}, no summary.json), and cannot be resumed: {why}"
    return f"unfinished ({recorded}, no summary.json); finish it with mpfl run --resume {path}"


def _finished_run(path: Path) -> Run:
    """A finished run directory, read; a RunDirError when its round log is damaged or cut short (it must hold
    every round its summary counts), since the report's bytes are summed from it."""
    summary, rounds = read_summary(path), read_rounds(path, complete=True)
    if len(rounds) != summary["rounds"]:
        raise RunDirError(f"{path / ROUNDS_JSONL} does not match {SUMMARY} (rounds: {len(rounds)} recorded, "
                          f"{summary['rounds']} counted); restore the file from a copy")
    return Run(path, summary, rounds)


def scan_runs(paths: Iterable[str | Path]) -> Scan:
    """Read every finished run directory among `paths`; note unfinished and unreadable ones as skipped."""
    found, strays = find_run_dirs(paths)
    scan = Scan(skipped=dict(strays))
    for path in found:
        if not (path / SUMMARY).is_file():
            scan.skipped[path] = _unfinished(path)
            continue
        try:
            scan.runs.append(_finished_run(path))
        except FileNotFoundError as exc:
            scan.skipped[path] = f"cannot be read: {exc.filename} is missing; restore it from a copy"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            scan.skipped[path] = f"cannot be read ({type(exc).__name__}: {exc})"
    return scan


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every finished, readable run directory found among `paths`."""
    return scan_runs(paths).runs


def format_variant(variant: dict[str, Any]) -> str:
    """`key=value, ...`; an unset sample count reads `all` (every sample), another unset value `none`."""
    return ", ".join(f"{k}={('all' if k.endswith('_samples') else 'none') if v is None else v}"
                     for k, v in variant.items())


def _group_key(run: Run) -> str:
    """What a run's group shares: its config, less the seed and what does not change results, and
    less settings its config leaves without effect (the alpha of a split that is not dirichlet, the
    shards of one that is not shards, the sparsity of a method that does not prune), which the
    row would not show."""
    p = run.flat["partition"]
    idle = {key for key, partition in (("alpha", "dirichlet"), ("shards", "shards")) if p != partition}
    key = {k: v for k, v in run.flat.items() if k not in NOT_GROUPED | idle}
    key["sparsity"] = run.summary["sparsity"]
    return json.dumps(key, sort_keys=True)


def _modal(runs: Sequence[Run], key: str) -> str:
    """The most common value of a config field among runs (as JSON, so any value compares); in a tie
    the package default, so that the variant names what was changed from it."""
    counts = Counter(json.dumps(r.flat.get(key)) for r in runs)
    top = max(counts.values())
    tied = sorted(v for v, n in counts.items() if n == top)
    default = json.dumps(_defaults().get(key))
    return default if default in tied else tied[0]


def _variant(run: Run, runs: Sequence[Run]) -> dict[str, Any]:
    """The config fields in which `run` differs from the most common value in its section; method
    options only against runs of the same method."""
    section = [r for r in runs if r.section == run.section]
    same_method = [r for r in section if r.method == run.method]
    variant = {}
    for key in sorted({k for r in section for k in r.flat} - SHOWN):
        peers = same_method if run.sections.get(key) in METHOD_OPTIONS else section
        if json.dumps(run.flat.get(key)) != _modal(peers, key):
            variant[key] = run.flat.get(key)
    return variant


def shared_settings(runs: Sequence[Run]) -> list[str]:
    """What no variant can name: the settings every run of `runs` shares at a value other than the package
    default (`key=value`), and the method options every run of one method shares so (`method: key=value`;
    pruning options only for methods that prune). A reader then knows, say, that all runs had 3 nodes."""
    defaults, shared = _defaults(), []

    def uniform(group: Sequence[Run], key: str) -> bool:
        values = {json.dumps(r.flat.get(key)) for r in group}
        return len(values) == 1 and values.pop() != json.dumps(defaults.get(key))

    keys = sorted({k for r in runs for k in r.flat} - SHOWN)
    shared += [f"{k}={runs[0].flat.get(k)}" for k in keys
               if runs[0].sections.get(k) not in METHOD_OPTIONS and uniform(runs, k)]
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        prunes = method not in METHODS or METHODS.get(method).prunes
        shared += [f"{method}: {k}={mine[0].flat.get(k)}" for k in keys if mine[0].sections.get(k) in METHOD_OPTIONS
                   and (prunes or mine[0].sections.get(k) != "prune") and uniform(mine, k)]
    return shared


def unnamed_settings(groups: Sequence[Group]) -> list[str]:
    """The value of each setting some group's variant names that the rows not naming it have, where that
    is not the package default (`key=value`): variants are listed against the most common value, so
    without this a reader could not tell that, say, the other runs had 2,000 training samples."""
    runs, defaults = [r for g in groups for r in g.runs], _defaults()
    named = sorted({k for g in groups for k in g.variant if g.first.sections.get(k) not in METHOD_OPTIONS})
    return [f"{k}={json.loads(modal)}" for k in named if (modal := _modal(runs, k)) != json.dumps(defaults.get(k))]


def plugin_code(run: Run) -> str | None:
    """A short digest of the plug-in files the run loaded (the summary's ``versions.plugins``: their
    SHA-256), None for a run without plug-ins: two runs of one config with other plug-in code are not
    repeats of one experiment."""
    code = run.summary.get("versions", {}).get("plugins")
    return hashlib.sha256(json.dumps(code, sort_keys=True).encode()).hexdigest()[:8] if code else None


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group runs that differ only in their seed, and name each group's variant within its section; runs
    of one config made with other plug-in code are groups of their own, named by that code's digest."""
    groups: dict[tuple[str, str | None], list[Run]] = defaultdict(list)
    for run in runs:
        groups[_group_key(run), plugin_code(run)].append(run)
    versions = Counter(key for key, _ in groups)
    out = []
    for (key, code), members in groups.items():
        members.sort(key=lambda r: (r.flat["seed"], str(r.path)))
        variant = _variant(members[0], runs)
        out.append(Group(members, {**variant, "plugin_code": code} if versions[key] > 1 else variant))
    out.sort(key=_sort_key)
    return out


def _order(items: Sequence[str], value: str) -> tuple[int, str]:
    """Known names in their canonical order, others after them alphabetically."""
    return (items.index(value), "") if value in items else (len(items), value)


def _section_key(r: Run) -> tuple:
    """Datasets in the package's order; partitions from iid to the most skewed."""
    kind = _order(PARTITIONS, r.flat["partition"])
    skew = -r.flat["alpha"] if r.flat["partition"] == "dirichlet" else r.flat["shards"]
    return (_order(DATASETS.names(), r.flat["dataset"]), kind, skew, r.flat["model"])


def _sort_key(g: Group) -> tuple:
    r = g.first
    variant = tuple((k, (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))) for k, v in g.variant.items())
    return (_section_key(r), r.summary["sparsity"], _order(METHODS.names(), r.method), len(g.variant), variant)


def _fedavg_bytes(runs: Sequence[Run]) -> dict[tuple, float]:
    """Mean total bytes of the dense FedAvg runs, by the key runs are matched on."""
    totals: dict[tuple, list[int]] = defaultdict(list)
    for r in runs:
        if r.reference and r.flat.get("value_dtype", "float32") in ("float32", "auto"):
            totals[_match_key(r)].append(r.bytes_up + r.bytes_down)
    return {k: float(np.mean(v)) for k, v in totals.items()}


def _fedavg_round_time(runs: Sequence[Run]) -> dict[tuple, float]:
    """Mean training-round wall time of the dense FedAvg runs, by the key runs are matched on."""
    times: dict[tuple, list[float]] = defaultdict(list)
    for r in runs:
        if r.reference and r.summary.get("train_round_time"):
            times[_match_key(r)].append(r.summary["train_round_time"])
    return {k: float(np.mean(v)) for k, v in times.items()}


def _mean_of(runs: Sequence[Run], key: str) -> float | None:
    values = [x.summary.get(key) for x in runs]
    return float(np.mean(values)) if values and None not in values else None


def _match_key(r: Run) -> tuple:
    f = r.flat
    return (f["dataset"], r.partition, f["model"], f["nodes"], f["rounds"], f["seed"])


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std of the values that exist (no std from fewer than two)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


class Row(TypedDict):
    """One group's row of the report's table (and of `mpfl report --json`): figures are means over
    the group's runs, `_std` their sample standard deviations (accuracies' over seeds, the bytes ratio's
    over the runs that have one; None for a single value)."""

    method: str
    model: str
    variant: str  # the settings that set the group apart in its section ("" for none)
    dataset: str
    partition: str  # with its alpha or shards, e.g. dirichlet(0.1)
    sparsity: float  # the target sparsity
    n: int  # distinct seeds
    n_runs: int  # runs (a repeated seed is averaged first)
    final_accuracy: float | None
    final_accuracy_std: float | None
    best_accuracy: float | None
    best_accuracy_std: float | None
    warmup_rounds: float
    mask_rounds: float
    train_rounds: float
    bytes_up: float
    bytes_down: float
    bytes_vs_fedavg: float | None  # (up + down) over the matching dense FedAvg run's
    bytes_vs_fedavg_std: float | None
    bytes_vs_fedavg_runs: int  # runs that have a matching FedAvg run
    bits_per_param_up: float | None
    bits_per_param_down: float | None
    megabytes_total: float | None
    wall_time: float
    bytes_eval_down: float | None  # a final federated evaluation's traffic (Flower runs; None: the simulator's)
    bytes_eval_up: float | None
    params_kept: float | None  # the final model on a device, and the dense model's figures (mpfl.costs)
    params_dense: float | None
    model_bytes: float | None
    model_bytes_dense: float | None
    flops_per_sample: float | None
    flops_per_sample_dense: float | None
    train_time_vs_dense: float | None  # a training round's wall time over the matching FedAvg run's
    seeds: list[int]
    runs: list[str]  # the run directories


def table(runs: Sequence[Run]) -> list[Row]:
    """One row per group of runs (`Row`), in the report's order."""
    fedavg, fedavg_time = _fedavg_bytes(runs), _fedavg_round_time(runs)
    rows: list[Row] = []
    for g in group_runs(runs):
        r, rs = g.first, g.runs
        final, final_std = _mean_std(g.per_seed("final_accuracy"))
        best, best_std = _mean_std(g.per_seed("best_accuracy"))
        ratios = [(x.bytes_up + x.bytes_down) / fedavg[_match_key(x)] for x in rs if _match_key(x) in fedavg]
        ratio, ratio_std = _mean_std(ratios)
        mask = float(np.mean([x.summary["mask_rounds"] for x in rs]))
        train = float(np.mean([x.summary["train_rounds"] for x in rs]))
        warmup = float(np.mean([x.summary["rounds"] for x in rs])) - mask - train
        times = [x.summary["train_round_time"] / fedavg_time[_match_key(x)] for x in rs
                 if _match_key(x) in fedavg_time and x.summary.get("train_round_time")]
        device = {k: _mean_of(rs, k) for k in ("params_kept", "params_dense", "model_bytes", "model_bytes_dense",
                                                "flops_per_sample", "flops_per_sample_dense")}
        simulated = r.flat["runner"] == RUNNER  # the simulator has no federated evaluation, whose bytes would be 0
        rows.append({
            **device, "train_time_vs_dense": float(np.mean(times)) if times else None,
            "method": r.method, "model": r.flat["model"], "variant": format_variant(g.variant),
            "dataset": r.flat["dataset"], "partition": r.partition, "sparsity": r.summary["sparsity"],
            "n": len(g.seeds), "n_runs": len(rs),
            "final_accuracy": final, "final_accuracy_std": final_std, "best_accuracy": best, "best_accuracy_std": best_std,
            "warmup_rounds": warmup, "mask_rounds": mask, "train_rounds": train,
            "bytes_up": float(np.mean([x.bytes_up for x in rs])), "bytes_down": float(np.mean([x.bytes_down for x in rs])),
            "bytes_vs_fedavg": ratio, "bytes_vs_fedavg_std": ratio_std, "bytes_vs_fedavg_runs": len(ratios),
            **{k: _mean_of(rs, k) for k in ("bits_per_param_up", "bits_per_param_down", "megabytes_total")},
            "wall_time": float(np.mean([x.summary["wall_time"] for x in rs])),
            **{key: None if simulated else float(np.mean([x.summary.get(key, 0) for x in rs]))
               for key in ("bytes_eval_down", "bytes_eval_up")},
            "seeds": [x.flat["seed"] for x in rs], "runs": [str(x.path) for x in rs],
        })
    return rows


def _percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _num(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def _cell(row: dict, key: str) -> str:
    if key in ("final_accuracy", "best_accuracy"):
        return _percent(row[key], row[key + "_std"])
    if key == "bytes_vs_fedavg":
        ratio, matched = row[key], row["bytes_vs_fedavg_runs"]
        if ratio is None:
            return "–"
        fewer = f" ({matched} of {row['n_runs']} runs)" if matched < row["n_runs"] else ""
        return f"{100 * ratio:.{1 if ratio >= 0.01 else 2}f}%{fewer}"
    if key == "rounds":
        prefix = f"{_num(row['warmup_rounds'])}w+" if row["warmup_rounds"] else ""
        return f"{prefix}{_num(row['mask_rounds'])}+{_num(row['train_rounds'])}"
    if key in ("bytes_eval_down", "bytes_eval_up") and row[key] is None:
        return "–"
    if key in ("bytes_up", "bytes_down", "bytes_eval_down"):
        return f"{row[key] / 1e6:.2f}"
    if key == "bits_per_param":
        up, down = row["bits_per_param_up"], row["bits_per_param_down"]
        return "–" if up is None or down is None else f"{up:.3g} / {down:.3g}"
    if key == "bytes_eval_up":
        return f"{row[key]:,.0f}"
    if key == "wall_time":
        return f"{row[key]:.1f}"
    if key == "sparsity":
        return f"{row[key]:g}"
    if key in ("params_kept", "model_bytes", "flops_per_sample"):
        value, dense = row[key], row[key.replace("_kept", "_dense") if key == "params_kept" else key + "_dense"]
        if value is None or not dense:
            return "–"
        scale = {"params_kept": 1, "model_bytes": 1e3, "flops_per_sample": 1e6}[key]
        shown = f"{value:,.0f}" if key == "params_kept" else f"{value / scale:.3g}"
        return f"{shown} ({100 * value / dense:.1f}%)"
    if key == "train_time_vs_dense":
        return "–" if row[key] is None else f"{row[key]:.2f}x"
    if key == "n":
        return str(row["n"]) + (f" ({row['n_runs']} runs)" if row["n_runs"] != row["n"] else "")
    return str(row[key]) if row[key] != "" else "–"


def to_markdown(rows: Sequence[dict], columns: dict[str, str] = COLUMNS) -> str:
    """A markdown table of `table` rows (optional columns, such as the variant, only when some row has a value)."""
    keys = [k for k in columns if k not in OPTIONAL or any(r[k] for r in rows)]
    lines = ["| " + " | ".join(columns[k] for k in keys) + " |",
             "|" + "|".join("---" if k in ("method", "model", "variant", "dataset", "partition") else "---:"
                            for k in keys) + "|"]
    lines += ["| " + " | ".join(_cell(r, k) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


EXTRA_COLORS = ("C8", "C9", *colormaps["Dark2"].colors)
"""Colours for methods the report does not know (plug-ins'), in turn by name: matplotlib's two
default colours no built-in method takes, then ColorBrewer's Dark2."""


def _palette(groups: Iterable[Group]) -> dict[str, Any]:
    """A colour per method of `groups`: a built-in method's own, the same in every plot, and distinct
    ones for the others (plug-in methods, which the report process has not imported)."""
    names = METHODS.names()
    others = sorted({g.first.method for g in groups} - set(names))
    return {**{m: f"C{i % 10}" for i, m in enumerate(names)},
            **{m: EXTRA_COLORS[i % len(EXTRA_COLORS)] for i, m in enumerate(others)}}


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _percent_range(lo: float, hi: float) -> tuple[float, float]:
    """An accuracy axis' limits kept within 0-100 %: autoscaling pads past the data (and a ±1 std band or bar
    can reach past it), which would show accuracies no run can have."""
    return max(lo, 0.0), min(hi, 100.0)


def _mean_curve(group: Group) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps evaluated in every seed, with the mean cumulative bytes and the mean and std of accuracy."""
    curves = [r.curve() for r in group.runs]
    common = sorted(set.intersection(*(set(c[0].tolist()) for c in curves)))
    if not common:
        return (np.empty(0),) * 4
    at = [[np.flatnonzero(c[0] == s)[0] for s in common] for c in curves]
    cum = np.mean([c[1][i] for c, i in zip(curves, at)], axis=0)
    acc = np.array([c[2][i] for c, i in zip(curves, at)])
    std = acc.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
    return np.array(common), cum, acc.mean(axis=0), std


def _curve_groups(groups: Sequence[Group]) -> tuple[list[Group], float | None]:
    """Per method the groups with the fewest variant fields, at the sparsity most methods share (plus FedAvg)."""
    pruned = [g for g in groups if not g.first.reference]
    per_sparsity = Counter()
    for s in {g.first.summary["sparsity"] for g in pruned}:
        per_sparsity[s] = len({g.first.method for g in pruned if g.first.summary["sparsity"] == s})
    main = max(per_sparsity, key=lambda s: (per_sparsity[s], s)) if per_sparsity else None
    chosen = [g for g in groups if g.first.reference or g.first.summary["sparsity"] == main]
    fewest = {m: min(len(g.variant) for g in chosen if g.first.method == m) for m in {g.first.method for g in chosen}}
    return [g for g in chosen if len(g.variant) == fewest[g.first.method]], main


def _title_suffix(where: str, sparsity: float | None) -> str:
    return where + (f", sparsity {sparsity:g}" if sparsity is not None else "")


def plot_accuracy_vs_round(groups: Sequence[Group], path: Path, title: str) -> Path:
    """Test accuracy per round (mask search and training rounds), mean over seeds with a ±1 std band."""
    fig, ax = _figure(f"Accuracy per round: {title}", "round (mask search + training)", "test accuracy (%)")
    colors = _palette(groups)
    for g in groups:
        steps, _, acc, std = _mean_curve(g)
        ax.plot(steps, 100 * acc, marker=".", color=colors[g.first.method], label=g.label)
        ax.fill_between(steps, 100 * (acc - std), 100 * (acc + std), color=colors[g.first.method], alpha=0.15)
    ax.set_ylim(*_percent_range(*ax.get_ylim()))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, loc="best", ncol=2)
    fig.savefig(path)
    return path


def precision_groups(groups: Sequence[Group], sparsity: float | None) -> list[Group]:
    """The groups at `sparsity` that differ from their method's defaults only in how values travel."""
    return [g for g in groups if set(g.variant) == {"value_dtype"} and g.first.summary["sparsity"] == sparsity]


def plot_accuracy_vs_bytes(groups: Sequence[Group], path: Path, title: str) -> Path:
    """Test accuracy against cumulative traffic (up + down, log scale): what each method pays for
    accuracy; a method shown at several value precisions gets one line style per precision."""
    fig, ax = _figure(f"Accuracy vs traffic: {title}", "cumulative bytes up + down (MB, log scale)", "test accuracy (%)")
    colors = _palette(groups)
    for g in groups:
        _, cum, acc, _ = _mean_curve(g)
        style = PRECISION_STYLES.get(g.variant.get("value_dtype"), "-")
        ax.plot(cum / 1e6, 100 * acc, marker=".", linestyle=style, color=colors[g.first.method], label=g.label)
    ax.set_ylim(*_percent_range(*ax.get_ylim()))
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    ax.legend(fontsize=8, loc="best", ncol=2)
    fig.savefig(path)
    return path


def plain_log_ticks(axis: Axis) -> None:
    """Label a log axis with plain numbers at 1, 2 and 5 times each power of ten (at the powers alone over more
    than three decades, at evenly spaced values within one), where matplotlib would write exponents (1e+06,
    10^2, 2x10^-1) or leave a narrow range with a single label."""
    lo, hi = sorted(axis.get_view_interval())
    subs = (1.0, 2.0, 5.0) if hi / lo <= 1000 else (1.0,)
    axis.set_major_locator(AutoLocator() if hi / lo < 10 else LogLocator(subs=subs))
    axis.set_major_formatter(_PLAIN)
    axis.set_minor_formatter(NullFormatter())


def plot_accuracy_vs_sparsity(groups: Sequence[Group], path: Path, title: str) -> Path:
    """Final accuracy against sparsity per method (mean ± std over seeds); dense FedAvg as a reference line."""
    fig, ax = _figure(f"Final accuracy vs sparsity: {title}", "sparsity (logit scale)", "final test accuracy (%)")
    ticks, colors = set(), _palette(groups)
    for method in sorted({g.first.method for g in groups}, key=lambda m: _order(METHODS.names(), m)):
        mine = sorted((g for g in groups if g.first.method == method), key=lambda g: g.first.summary["sparsity"])
        stats = [_mean_std(g.per_seed("final_accuracy")) for g in mine]
        mean = np.array([100 * m for m, _ in stats])
        std = np.array([100 * (s or 0.0) for _, s in stats])
        if mine[0].first.reference:
            ax.axhline(mean.mean(), color=colors[method], linestyle="--", label="fedavg (dense)")
            continue
        x = np.array([g.first.summary["sparsity"] for g in mine])
        for level in mean[x == 0]:  # a logit axis has no place for sparsity 0: a reference line, as dense FedAvg's
            ax.axhline(level, color=colors[method], linestyle=":", label=f"{method} at sparsity 0")
        if (x > 0).any():
            ticks.update(x[x > 0].tolist())
            ax.errorbar(x[x > 0], mean[x > 0], yerr=std[x > 0], marker="o", capsize=3, color=colors[method],
                        label=mine[0].label)
    ax.set_ylim(*_percent_range(*ax.get_ylim()))
    if ticks:
        placed = sorted(ticks)
        ax.set_xscale("logit")
        ax.set_xlim(*_sparsity_limits(placed))
        ax.set_xticks(placed, [f"{t:g}" for t in placed])
        ax.minorticks_off()
    else:
        ax.set(xlabel="", xticks=[])
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path)
    return path


def _sparsity_limits(sparsities: Sequence[float]) -> tuple[float, float]:
    """The logit sparsity axis' limits: a 5 % margin around the sparsities, or a logit unit each side of a
    single one (which matplotlib would put at, or past, the axes' right edge)."""
    lo, hi = (float(np.log(s / (1 - s))) for s in (min(sparsities), max(sparsities)))
    pad = 0.05 * (hi - lo) or 1.0
    return float(1 / (1 + np.exp(pad - lo))), float(1 / (1 + np.exp(-hi - pad)))


def plot_ablation(groups: Sequence[Group], path: Path, title: str) -> Path:
    """Final accuracy of each variant against its method's baseline (dashed), mean ± std over seeds."""
    fig, ax = _figure(f"Variants: {title}", "final test accuracy (%); dashed: each method's baseline", "")
    y = np.arange(len(groups))[::-1]
    colors = _palette(groups)
    for yi, g in zip(y, groups):
        mean, std = _mean_std(g.per_seed("final_accuracy"))
        color = colors[g.first.method]
        if not g.variant:
            ax.axvline(100 * mean, color=color, linestyle="--", linewidth=1, alpha=0.6)
        ax.errorbar(100 * mean, yi, xerr=100 * (std or 0.0), fmt="o", capsize=3, color=color,
                    markerfacecolor="white" if not g.variant else color)
    ax.set_xlim(*_percent_range(*ax.get_xlim()))
    labels = ablation_labels(groups)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(-0.7, len(groups) - 0.3)
    label_lines = sum(label.count("\n") + 1 for label in labels)
    fig.set_size_inches(FIGSIZE[0], max(FIGSIZE[1], ABLATION_INCHES_PER_LINE * label_lines + 1.5))
    fig.savefig(path)
    return path


def ablation_labels(groups: Sequence[Group]) -> list[str]:
    """Each group's line in the ablation plot: its method and variant, or "baseline", which names the
    settings it shares with the other rows where they are not the package's defaults."""
    several = len({g.first.summary["sparsity"] for g in groups if not g.first.reference}) > 1
    unnamed = unnamed_settings(groups)
    baseline = f"baseline ({', '.join(unnamed)})" if unnamed else "baseline"
    labels = []
    for g in groups:
        where = f" @ {g.first.summary['sparsity']:g}" if several and not g.first.reference else ""
        labels.append(textwrap.fill(f"{g.first.method}{where}: {format_variant(g.variant) or baseline}",
                                    ABLATION_LABEL_WIDTH))
    return labels


def _ablation_groups(groups: Sequence[Group]) -> list[Group]:
    """Groups that share method and sparsity with at least one other group: a baseline and its variants."""
    by_cell: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups:
        by_cell[(g.first.method, g.first.summary["sparsity"])].append(g)
    return [g for cell in by_cell.values() if len(cell) > 1 for g in cell]


def _slug(*parts: str) -> str:
    return "-".join(p.replace("(", "").replace(")", "").replace(" ", "") for p in parts)


def _has_accuracy(group: Group) -> bool:
    """Whether any run of the group recorded a test accuracy (a `--rounds 0` run has none)."""
    return any(v is not None for v in group.per_seed("final_accuracy"))


def _section_plots(groups: Sequence[Group], out: Path,
                   section: tuple[str, str, str]) -> list[tuple[str, Path, Callable[[], Path]]]:
    """One section's plots in `out`: each plot's name, its file and what draws it (so the files can be
    checked before any is written)."""
    where = ", ".join(section)
    groups = [g for g in groups if _has_accuracy(g)]
    curve_groups, main = _curve_groups(groups) if groups else ([], None)
    title = _title_suffix(where, main)
    by_round, by_bytes, by_sparsity, variants = PLOT_NAMES
    plots = [(plot_accuracy_vs_round, by_round, curve_groups, title),
             (plot_accuracy_vs_bytes, by_bytes, curve_groups + precision_groups(groups, main), title),
             (plot_accuracy_vs_sparsity, by_sparsity, [g for g in groups if not g.variant],
              _title_suffix(where, None))]
    if ablation := _ablation_groups(groups):
        pruned = {g.first.summary["sparsity"] for g in ablation if not g.first.reference}
        shared = pruned.pop() if len(pruned) == 1 else None
        plots.append((plot_ablation, variants, ablation, _title_suffix(where, shared)))
    files = {name: out / f"{name}-{_slug(*section)}.png" for _, name, _, _ in plots}
    return [(name, files[name], partial(plot, chosen, files[name], plot_title))
            for plot, name, chosen, plot_title in plots if chosen]


def _lost_nodes(runs: Sequence[Run]) -> list[str]:
    """Markdown lines listing the nodes each run lost or left out, with the step and the reason (none if no run lost any)."""
    lines = []
    for r in runs:
        same: dict[tuple, list[str]] = {}  # nodes lost at one step for one reason share a line
        for e in r.summary.get("lost_nodes", []):
            same.setdefault((e["step"], e["phase"], e["reason"]), []).append(_node_name(e))
        lines += [f"- `{r.path}` ({r.flat['runner']}): {', '.join(names)} from step {step} ({phase}): {reason}"
                  for (step, phase, reason), names in same.items()]
    return ["## Lost nodes", "", *lines, ""] if lines else []


def _node_name(entry: dict) -> str:
    """A lost node as the report names it: its partition, and its Flower SuperNode where known."""
    node = "a SuperNode without a partition" if entry["node"] is None else f"node {entry['node']}"
    return node + (f" (SuperNode {entry['supernode']})" if entry.get("supernode") is not None else "")


def _is_report_md(path: Path) -> bool:
    """Whether a report.md is one mpfl report wrote: its first line is the report's heading."""
    with open(path, "rb") as f:
        return f.readline().rstrip(b"\r\n") == HEADING.encode()


def _is_png(path: Path) -> bool:
    """Whether a file at one of the report's plot names is a PNG (as the report's plots are)."""
    with open(path, "rb") as f:
        return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


def _is_table_json(path: Path) -> bool:
    """Whether a JSON file is one mpfl report wrote: a list of table rows, each with the rows' keys."""
    try:
        rows = json.loads(path.read_bytes())
    except ValueError:
        return False
    return isinstance(rows, list) and bool(rows) and all(isinstance(r, dict) and ROW_KEYS <= r.keys() for r in rows)


def _check_json_path(path: Path) -> None:
    """Refuse a --json path that is a folder or lies in a folder that does not exist, before anything is written."""
    if path.is_dir():
        raise PathError(f"--json {path} is a folder; give a file path, such as {path / 'report.json'}")
    if not path.parent.is_dir():
        raise PathError(f"--json {path}: the folder {path.parent} does not exist; create it or choose another --json path")


def _check_targets(targets: Sequence[tuple[Path, Callable[[Path], bool], str]], force: bool) -> None:
    """Refuse, before anything is written, to write through a link, over a folder or over a run's own
    records (even if forced), or (unless `force`) to replace a file that mpfl report did not write: a
    user's own report.md, plot or JSON stays intact."""
    for path, ours, flag in targets:
        refuse_link(path)
        if path.is_dir():
            raise PathError(f"{path} is a folder where the report writes a file; remove it or choose another {flag}")
        if is_run_record(path):
            raise PathError(f"{path} is a record of the run in {path.parent}, which a report never replaces (not even "
                            f"with --force); choose another {flag}")
        if not force and path.exists() and not ours(path):
            raise PathError(f"{path} was not written by mpfl report, so it is not replaced: move it, choose another "
                            f"{flag}, or pass --force to replace it")


def check_report_folder(out: str | Path, *, force: bool = False) -> None:
    """Refuse, before a long job such as a study runs, a report folder where the report would replace a
    report.md or a plot that mpfl report did not write (which `write_report` would refuse at the end)."""
    out = Path(out)
    if not out.is_dir():
        return
    _check_targets(_folder_targets(out, [png for name in PLOT_NAMES for png in sorted(out.glob(f"{name}-*.png"))]),
                   force)


def _earlier_plots(out: Path) -> set[str]:
    """The plots in `out` that the report.md an earlier mpfl report wrote there shows (and that are still
    its plain PNG files), so that a refreshed report leaves none of them behind undescribed."""
    md = out / REPORT_MD
    if not md.is_file() or not _is_report_md(md):
        return set()
    shown = re.findall(r"!\[[^\]]*\]\(([^)/\\]+\.png)\)", md.read_text(encoding="utf-8", errors="replace"))
    return {name for name in shown if name.split("-")[0] in PLOT_NAMES and (out / name).is_file()
            and not (out / name).is_symlink() and _is_png(out / name)}


def _folder_targets(out: Path, pngs: Sequence[Path]) -> list[tuple[Path, Callable[[Path], bool], str]]:
    """The report's files in `out` (report.md and the given plots), each with how to tell one mpfl report wrote."""
    return [(out / REPORT_MD, _is_report_md, "--out"), *((png, _is_png, "--out") for png in pngs)]


def write_report(runs: Sequence[Run], out: str | Path, *, json_path: str | Path | None = None,
                 skipped: dict[Path, str] | None = None, force: bool = False) -> list[Path]:
    """Write report.md and its PNG plots into `out` (and the table as JSON if asked); return the files
    written. `skipped` run directories are listed with the reason they were left out. A file in the way
    that mpfl report did not write is refused before any file is written (only `out` may have been
    created), unless `force`; its own earlier report is refreshed."""
    if not runs:
        why = "".join(f"; {path}: {reason}" for path, reason in (skipped or {}).items())
        raise ConfigError(f"no finished runs to report on{why}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if json_path is not None:
        json_path = Path(json_path)
        _check_json_path(json_path)
    rows = table(runs)
    text, plots = _markdown(runs, rows, out, skipped)
    own = [out / REPORT_MD, *(png for png, _ in plots)]
    if json_path is not None and json_path.resolve() in {p.resolve() for p in own}:
        raise ConfigError(f"--json {json_path} is a file the report itself writes; choose another path for the table")
    targets = _folder_targets(out, [png for png, _ in plots])
    _check_targets(targets + ([(json_path, _is_table_json, "--json path")] if json_path is not None else []), force)
    earlier = _earlier_plots(out)
    for _, draw in plots:
        draw()
    atomic_write(out / REPORT_MD, text)
    for stale in earlier - {png.name for png, _ in plots}:  # the earlier report's plots this one does not draw
        (out / stale).unlink(missing_ok=True)
    written = own
    if json_path is not None:
        atomic_write(json_path, json.dumps(rows, indent=2) + "\n")
        written.append(json_path)
    return written


def _markdown(runs: Sequence[Run], rows: Sequence[dict], out: Path,
              skipped: dict[Path, str] | None) -> tuple[str, list[tuple[Path, Callable[[], Path]]]]:
    """The text of report.md, and the plots it shows: each plot's file in `out` and what draws it."""
    groups = group_runs(runs)
    plots: list[tuple[Path, Callable[[], Path]]] = []
    md = [HEADING, "",
          f"{counted(len(runs), 'run')} in {counted(len(groups), 'group')}. Accuracy is on the test set, mean ± sample "
          "std over the n distinct seeds of a group; runs of different runners are never averaged together. Rounds "
          "count mask-search and training rounds. Bytes vs FedAvg divides total bytes (up + down) by those of the "
          "dense FedAvg run with the same dataset, partition, model, nodes, rounds and seed (a row that has such a run "
          "for only some of its runs says how many); a final federated evaluation's traffic is not part of them.", ""]
    for section in dict.fromkeys(g.first.section for g in groups):
        mine = [g for g in groups if g.first.section == section]
        here = [r for r in rows if (r["dataset"], r["partition"], r["model"]) == section]
        md += [f"## {', '.join(section)}", ""]
        if shared := shared_settings([r for g in mine for r in g.runs]):
            md += [f"Every run here shares these settings, which differ from mpfl's defaults: {', '.join(shared)}.", ""]
        if unnamed := unnamed_settings(mine):
            md += [f"A row whose variant does not name a setting has its most common value here, which differs "
                   f"from mpfl's default for: {', '.join(unnamed)}.", ""]
        md += [to_markdown(here), ""]
        if blind := [g.label for g in mine if not _has_accuracy(g)]:
            md += [f"No test accuracy recorded (no training round was evaluated), so not plotted: {'; '.join(blind)}.", ""]
        md += ["The pruned model on a device (the share of the dense model in brackets; model size: the kept "
               "float32 values and a 1-bit mask, the least a sparse file needs, or the shrunk model when whole "
               "filters are dropped, while `mpfl export` writes torch's sparse formats, which hold indices; "
               "training-round wall time relative to the matched FedAvg run):", "", to_markdown(here, DEVICE_COLUMNS)]
        for name, png, draw in _section_plots(mine, out, section):
            plots.append((png, draw))
            md += [f"![{name.replace('_', ' ')}, {', '.join(section)}]({png.name})", ""]
    md += _lost_nodes(runs)
    md += ["## Runs", ""] + [f"- `{r.path}`" for r in runs] + [""]
    if skipped:
        md += ["## Skipped", ""] + [f"- `{path}`: {reason}" for path, reason in skipped.items()] + [""]
    return "\n".join(md), plots
