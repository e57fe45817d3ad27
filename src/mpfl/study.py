"""The experimental study: MPFL against FedAvg and pruning baselines over a resumable grid of runs.

A study is a list of cells, each a set of flat overrides on top of `Config()`, so changes to
the algorithm's defaults flow into every cell. Each cell runs into its own directory under
the study folder, named from its config (a readable slug plus a hash of the whole config,
the data directory aside), so a cell whose ``summary.json`` exists is skipped and an
interrupted study resumes where it stopped. A cell directory without a summary is an
unfinished attempt: it is moved aside to ``<name>.incomplete-<n>`` (never deleted) and the
cell runs again from scratch. The study's report covers the cells of the current grid only.

The grid (every preset):

* main comparison: all 8 methods x {mnist, fashion-mnist} x {iid, dirichlet 0.5, dirichlet 0.1,
  shards (2 classes per node)} at sparsity 0.9, over the preset's seeds;
* averaging: mpfl with its kept values averaged from the second mask round on (the label-skew
  setting) on the same datasets, partitions and seeds;
* sparsity sweep: mpfl, fedavg-prune and random at 0.5 ... 0.98 on mnist iid, same seeds;
* precision: mpfl, topk and fedavg-prune with float32, float16 and int8 values on mnist iid at
  0.9, same seeds;
* ablations on mnist iid at 0.9, seed 0, of mpfl: consensus rule, mask criterion (magnitude
  per layer / global, filter, saliency), rewind (init, or none with local training init); and
  of mpfl and fedavg: the number of nodes (5, 10, 20, 50 sharing the same training samples) and
  plain FedAvg steps (server_momentum = 0);
* label-skew ablation on mnist dirichlet 0.1 and shards at 0.9, seed 0, of mpfl: averaging from
  the second mask round, each of the options that make the mask hold under label skew switched
  off alone, and all of them together.

Cells that coincide (the default consensus rule is also the main mpfl cell) run once.

Methods of one's own, written as plug-ins, meet the baselines in the main comparison alone (the rest
of the grid studies MPFL itself): ``mpfl study --plugins examples/random_vote.py --methods
mpfl,fedavg,random-vote --datasets mnist --seeds 1`` (`preset_cells`' `methods` and `plugins`) runs
those methods on the preset's datasets, partitions and seeds at sparsity 0.9. The plug-ins are named
in every cell's config, so each process that runs a cell imports them (and the cells' names differ
from those of a study without them).

Cells run one after the other in the study's process (`run_study`'s default), or `jobs` at a
time in a pool of processes (``mpfl study``'s default: one per CPU core); every cell runs on one
torch thread, so its results are the same either way. As with a run's worker processes, a script
that runs a study with `jobs` above 1 must do so under ``if __name__ == "__main__":``.

Sizing, measured on a 2-core x86 machine with one torch thread per run, runs one after the
other: mlp, 10 nodes, one local epoch. A
round costs about 22 us per training sample (x1.5 in mask-search rounds, x1.6 with 50 nodes)
plus about 1.5 s per run to load data and build the model; cnn rounds cost ~35x more, so
both presets use mlp. `estimate_seconds` applies that model to each cell's round plan (so it
follows the configured mask_rounds); ``mpfl study --dry-run`` prints it per cell.

* quick: 5,000 training / 2,000 test samples, 5 training rounds, 1 seed: 124 runs, estimated
  7 min. Its 88 MNIST cells (``--datasets mnist``) took 7 min 48 s one after the other and 3 min
  46 s with ``--jobs 2`` on a 2-core 2.0 GHz Xeon, with the same figures in every cell.
* full: 20,000 training / 10,000 test samples, 20 training rounds, 3 seeds: 310 runs,
  estimated 79 min on an otherwise idle core; measured about 60 min of wall time as two
  processes on the 2 cores beside other work.
  The model undercounts MPFL's cells (mask adaptation's gradient batches, averaged values):
  they take up to 2x their estimate.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import re
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.queues import SimpleQueue
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .config import Config, mentioned
from .data import DATASETS as DATASET_REGISTRY
from .data import available_datasets, data_search_path, dataset_available, load_dataset
from .errors import ConfigError, DataError, MpflError, WorkerError
from .files import atomic_write
from .locks import RunLock, refuse_if_locked
from .methods import METHODS, method_of, plan
from .parallel import forkserver_available, refuse_in_a_starting_worker
from .progress import plain_console
from .records import CONFIG, MOVED_ASIDE, SUMMARY, counted, read_summary
from .registry import UnknownNameError

if TYPE_CHECKING:
    from .sim import RunResult

DATASETS = ("mnist", "fashion-mnist")
PARTITIONS = ({"partition": "iid"}, {"partition": "dirichlet", "alpha": 0.5}, {"partition": "dirichlet", "alpha": 0.1},
              {"partition": "shards", "shards": 2})
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
MAIN_SPARSITY = 0.9
MAX_SEEDS = 100
MAIN_METHODS = ("mpfl", "fedavg", "fedavg-prune", "topk", "centralized", "random", "local", "ssfl")
SWEEP_METHODS = ("mpfl", "fedavg-prune", "random")
PRECISIONS = ("float32", "float16", "int8")
PRECISION_METHODS = ("mpfl", "topk", "fedavg-prune")
# Each option that makes MPFL's mask hold under label skew, set to the value that switches it off.
SKEW_OPTIONS_OFF = {"extrapolate": 1.0, "core_share": 0.0, "mask_average_from": 0, "adapt_every": 0,
                    "mask_epochs": 1, "scope": "layer", "server_momentum": 0.0}
SKEW_PARTITIONS = ({"partition": "dirichlet", "alpha": 0.1}, {"partition": "shards", "shards": 2})
# MPFL with its kept values averaged from the second mask round on: more accurate under label skew, more bytes.
EARLY_AVERAGING = {"mask_average_from": 2}
ABLATIONS: dict[str, list[dict[str, Any]]] = {
    "consensus": [{"consensus": rule} for rule in ("vote", "threshold", "dynamic", "histogram")],
    "criterion": [{"criterion": "magnitude", "scope": "layer"}, {"criterion": "magnitude", "scope": "global"},
                  {"criterion": "filter"}, {"criterion": "saliency"}],
    "rewind": [{"rewind": "init", "train_init": "rewind"}, {"rewind": "none", "train_init": "local"}],
    "nodes": [{"nodes": n} for n in (5, 10, 20, 50)],
    "server": [{"server_momentum": 0.0}],
    "label-skew": [{}, EARLY_AVERAGING, *({name: off} for name, off in SKEW_OPTIONS_OFF.items()), SKEW_OPTIONS_OFF],
}
# FedAvg gets the node counts too, so each has a dense reference for accuracy and bytes.
ABLATION_METHODS = {"consensus": ("mpfl",), "criterion": ("mpfl",), "rewind": ("mpfl",), "nodes": ("mpfl", "fedavg"),
                    "server": ("mpfl", "fedavg"), "label-skew": ("mpfl",)}
# The data each ablation axis runs on (every other axis: mnist iid).
ABLATION_PARTITIONS = {"label-skew": SKEW_PARTITIONS}
# Prune settings named in a cell's directory when they differ from these (fixed, so a name depends on the config only).
UNTAGGED = {"consensus": "vote", "criterion": "magnitude", "scope": "global", "rewind": "none", "train_init": "local"}

# The cost model of `estimate_seconds`, measured as described in the module docstring.
SETUP_SECONDS = 1.5
SAMPLE_ROUND_SECONDS = 22e-6
MASK_ROUND_FACTOR = 1.5
PER_NODE_FACTOR = 0.02


@dataclass(frozen=True)
class Preset:
    """A sized study: the overrides every cell starts from, and the seeds of the main comparison and sweep."""

    base: dict[str, Any]
    seeds: int
    about: str


PRESETS = {
    "quick": Preset({"model": "mlp", "nodes": 10, "rounds": 5, "train_samples": 5000, "test_samples": 2000,
                     "threads": 1}, seeds=1, about="every cell of the grid, small: a smoke test of the whole study"),
    "full": Preset({"model": "mlp", "nodes": 10, "rounds": 20, "train_samples": 20000, "test_samples": 10000,
                    "threads": 1}, seeds=3, about="the reported study: 3 seeds for the main comparison and sweep"),
}


@dataclass(frozen=True)
class Cell:
    """One run of a study: the part of the grid it belongs to and its flat overrides of `Config()`."""

    group: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self, data_dir: str | None = None) -> Config:
        """The cell's full config (the data directory is where to read data, not part of the cell)."""
        return Config().with_overrides({**self.overrides, **({"data_dir": data_dir} if data_dir else {})})


def grid(base: dict[str, Any], seeds: int, datasets: Sequence[str] = DATASETS,
         methods: Sequence[str] | None = None) -> list[Cell]:
    """The study's cells for a sizing `base`: main comparison on each of `datasets`, then MPFL's averaging
    and, if mnist is among the datasets, the sparsity sweep, precision and ablations; without duplicates.
    With `methods`, the main comparison of those methods only (a comparison of methods of one's own with
    the baselines: the rest of the grid studies MPFL itself)."""
    cells = [Cell("main", {**base, "method": m, "dataset": d, **p, "sparsity": MAIN_SPARSITY, "seed": s})
             for d in datasets for p in PARTITIONS for m in methods or MAIN_METHODS for s in range(seeds)]
    if methods:
        return unique(cells)
    cells += [Cell("averaging", {**base, "method": "mpfl", "dataset": d, **p, "sparsity": MAIN_SPARSITY, "seed": s,
                                 **EARLY_AVERAGING})
              for d in datasets for p in PARTITIONS for s in range(seeds)]
    if "mnist" in datasets:
        cells += [Cell("sparsity", {**base, "method": m, "dataset": "mnist", "partition": "iid", "sparsity": sp,
                                    "seed": s})
                  for m in SWEEP_METHODS for sp in SPARSITIES for s in range(seeds)]
        cells += [Cell("precision", {**base, "method": m, "dataset": "mnist", "partition": "iid",
                                     "sparsity": MAIN_SPARSITY, "value_dtype": dtype, "seed": s})
                  for m in PRECISION_METHODS for dtype in PRECISIONS for s in range(seeds)]
        cells += [Cell(f"ablation:{axis}", {**base, "method": method, "dataset": "mnist", **partition,
                                            "sparsity": MAIN_SPARSITY, "seed": 0, **variant})
                  for axis, variants in ABLATIONS.items() for partition in ABLATION_PARTITIONS.get(axis, PARTITIONS[:1])
                  for method in ABLATION_METHODS[axis] for variant in variants]
    return unique(cells)


def preset_cells(name: str, seeds: int | None = None, datasets: Sequence[str] | None = None,
                 methods: Sequence[str] | None = None, plugins: Sequence[str] = ()) -> list[Cell]:
    """The cells of a named preset, optionally with another number of seeds or other datasets, or only the
    main comparison of `methods` (`grid`). `plugins` are imported first, so the datasets and methods they
    register can be named, and are named in every cell's config, so each process that runs a cell imports them."""
    if name not in PRESETS:
        raise ConfigError(f"unknown study preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if seeds is not None and not 1 <= seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds must be between 1 and {MAX_SEEDS} (each seed repeats the grid's runs), got {seeds}")
    base = {**preset.base, "plugins": list(plugins)} if plugins else preset.base
    Config().with_overrides(base)  # imports the plug-ins (refused as mpfl run refuses them): their names count below
    if datasets is not None:
        unknown = [d for d in datasets if d not in DATASET_REGISTRY]
        if unknown or not datasets:
            raise ConfigError(f"--datasets {','.join(unknown)}: choose from {', '.join(available_datasets())}")
        datasets = [DATASET_REGISTRY.canonical(d) for d in datasets]  # any case, or another name (fmnist), as mpfl run
    if methods is not None:
        methods = _method_names(methods, plugins)
    return grid(base, seeds or preset.seeds, tuple(dict.fromkeys(datasets)) if datasets else DATASETS, methods)


def _method_names(names: Sequence[str], plugins: Sequence[str]) -> list[str]:
    """`names` as a run's config names each method (any case, or another name, as ``mpfl run --method`` takes
    it), without repeats; an unknown one is refused as ``mpfl run --method`` refuses it."""
    if not names:
        raise ConfigError(f"--methods names no method; choose from {', '.join(METHODS.names())}")
    try:
        return list(dict.fromkeys(Config().with_overrides({"plugins": list(plugins), "method": name}).method
                                  for name in names))
    except UnknownNameError as exc:
        raise UnknownNameError(re.sub(mentioned("method"), "--methods", str(exc))) from None


def unique(cells: Sequence[Cell]) -> list[Cell]:
    """Cells with distinct configs, keeping the first of each."""
    seen: dict[str, Cell] = {}
    for cell in cells:
        seen.setdefault(cell_name(cell.config()), cell)
    return list(seen.values())


def _identity(config: dict[str, Any]) -> str:
    """The config as canonical JSON, without the machine-specific data directory."""
    data = json.loads(json.dumps(config))
    data.get("data", {}).pop("data_dir", None)
    return json.dumps(data, sort_keys=True)


def cell_name(cfg: Config) -> str:
    """A directory name that is a function of the config: readable slug plus a hash of everything else."""
    data_cfg, prune = cfg.data, cfg.prune
    part = data_cfg.partition + {"dirichlet": f"{data_cfg.alpha:g}", "shards": str(data_cfg.shards)}.get(data_cfg.partition, "")
    tags = [f"{k}-{getattr(prune, k)}" for k, usual in UNTAGGED.items() if getattr(prune, k) != usual]
    digest = hashlib.sha256(_identity(cfg.to_dict()).encode()).hexdigest()[:10]
    return "-".join([cfg.method, data_cfg.dataset, part, f"sp{prune.sparsity:g}", f"n{cfg.nodes}", f"s{cfg.seed}", *tags, digest])


def estimate_seconds(cfg: Config) -> float:
    """Expected wall time of a run on one mlp thread, from its round plan (see the module docstring)."""
    samples = (cfg.data.train_samples or 60000) * (1 - cfg.data.val_fraction) * cfg.train.epochs
    per_round = samples * SAMPLE_ROUND_SECONDS * (1 + PER_NODE_FACTOR * cfg.nodes)
    total = SETUP_SECONDS
    method = method_of(cfg)
    for step in method.plan():
        if step.phase == "train":
            total += per_round * cfg.train.fraction
        elif step.phase == "mask" and method.trains_in_mask_rounds:
            total += per_round * MASK_ROUND_FACTOR * cfg.prune.mask_epochs / cfg.train.epochs
        elif step.phase == "warmup":
            total += per_round
    return total


def cell_status(path: Path) -> str:
    """done (has a summary), incomplete (has files but no summary) or todo."""
    if (path / SUMMARY).is_file():
        return "done"
    return "incomplete" if path.is_dir() and any(path.iterdir()) else "todo"


def prepare_cell(path: Path, cfg: Config) -> bool:
    """Whether the cell must run: a finished cell is checked and skipped, an unfinished one moved aside first."""
    status = cell_status(path)
    if status == "done":
        if _identity(read_summary(path)["config"]) != _identity(cfg.to_dict()):
            raise ConfigError(f"{str(path)!r} holds a run of another config; move it away or choose another --out")
        return False
    if status == "incomplete":
        refuse_if_locked(path)  # an mpfl run of its own may be writing there
        n = 1
        while path.with_name(f"{path.name}{MOVED_ASIDE}{n}").exists():
            n += 1
        path.rename(path.with_name(f"{path.name}{MOVED_ASIDE}{n}"))
    return True


@dataclass
class StudyResult:
    """What a study invocation did: cells run, skipped as already done, failed (with the reason), report files."""

    ran: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    report: list[Path] = field(default_factory=list)


def print_plan(cells: Sequence[Cell], out: str | Path, console: Console, data_dir: str | None = None,
               jobs: int = 1) -> float:
    """Print every cell with its status and estimated time (on one core; `jobs` cells at once divide the
    wall time); return the estimated seconds still to run on one core."""
    console.print(f"{'#':>4}  {'group':<20} {'rounds':>6} {'est. s':>7}  {'status':<10} cell")
    todo, per_group = 0.0, {}
    for i, cell in enumerate(cells, 1):
        cfg = cell.config(data_dir)
        name, est = cell_name(cfg), estimate_seconds(cfg)
        status = cell_status(Path(out) / name)
        console.print(f"{i:>4}  {cell.group:<20} {len(plan(cfg)):>6} {est:>7.1f}  {status:<10} {name}", soft_wrap=True,
                      markup=False)
        n, t = per_group.get(cell.group, (0, 0.0))
        per_group[cell.group] = (n + 1, t + est)
        todo += 0.0 if status == "done" else est
    for group, (n, t) in per_group.items():
        console.print(f"  {group:<20} {n:>4} cell{'' if n == 1 else 's'}  {t / 60:6.1f} min", markup=False)
    at_once = f"{jobs} cells at a time" if jobs > 1 else "one cell at a time"
    console.print(f"{counted(len(cells), 'cell')}, estimated {sum(t for _, t in per_group.values()) / 60:.1f} min in all on one "
                  f"core; still to run: about {todo / 60 / jobs:.1f} min ({at_once}, one torch thread each)")
    return todo


def missing_datasets(cells: Sequence[Cell], data_dir: str | None = None) -> dict[str, str]:
    """The cells' datasets that are not on this machine yet, each with where they were looked for."""
    names = sorted({cell.config(data_dir).data.dataset for cell in cells})
    return {name: ", ".join(map(str, data_search_path(data_dir))) for name in names
            if not dataset_available(name, data_dir)}


def _check_datasets(names: set[str], data_dir: str | None) -> None:
    """Fail before the first run if a dataset cannot be found (or downloaded), not halfway through."""
    for name in sorted(names):
        try:
            load_dataset(name, data_dir)
        except DataError as exc:
            others = ",".join(sorted(names - {name})) or "mnist"
            raise DataError(f"{exc} To run the study without it: --datasets {others}") from None


def check_study_folder(out: Path) -> None:
    """Refuse a run directory as a study's folder: its cells are run directories inside it, which a report of
    the folder would not look into."""
    if (out / CONFIG).exists() or (out / SUMMARY).exists():
        raise ConfigError(f"{out} is a run directory (it holds {CONFIG}); a study needs a folder of its own (its cells "
                          "are run directories inside it): choose another --out")


def run_study(cells: Sequence[Cell], out: str | Path, *, data_dir: str | None = None, console: Console | None = None,
              quiet: bool = False, report: bool = True, force: bool = False, jobs: int = 1) -> StudyResult:
    """Run every cell not yet done into `out/<cell name>`, then write the study's report into `out` (a report.md
    or plot there that mpfl report did not write is refused before any cell runs, unless `force`). With `jobs`
    above 1, that many cells run at once in a pool of processes (`run_in_processes`)."""
    from .report import check_report_folder

    refuse_in_a_starting_worker()  # a script without a __main__ guard, re-imported by a pool process
    console = console or plain_console()
    out = Path(out)
    check_study_folder(out)
    planned = [(cell, cfg, out / cell_name(cfg)) for cell in cells for cfg in [cell.config(data_dir)]]
    _check_datasets({cfg.data.dataset for _, cfg, path in planned if cell_status(path) != "done"}, data_dir)
    if report:
        check_report_folder(out, force=force)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, kind="study"):  # a second study on the folder would move aside and rerun the cells this one runs
        return _run_locked(planned, out, console=console, quiet=quiet, report=report, force=force, jobs=jobs)


def _run_locked(planned: Sequence[tuple[Cell, Config, Path]], out: Path, *, console: Console, quiet: bool, report: bool,
                force: bool, jobs: int) -> StudyResult:
    """`run_study` once it holds the study folder's lock."""
    from .report import scan_runs, write_report

    atomic_write(out / "study.json", json.dumps(
        [{"name": path.name, "group": cell.group, "overrides": cell.overrides} for cell, _, path in planned], indent=2))
    result = StudyResult()
    todo = [(cfg, path) for _, cfg, path in planned if prepare_cell(path, cfg)]
    result.skipped = [path for _, _, path in planned if cell_status(path) == "done"]
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=quiet) as progress:
        overall = progress.add_task("", total=sum(estimate_seconds(cfg) for cfg, _ in todo) or 1)
        if jobs > 1:
            run_in_processes(todo, jobs, progress, overall, result)
        else:
            for i, (cfg, path) in enumerate(todo, 1):
                progress.update(overall, description=f"cell {i}/{len(todo)} ({len(result.skipped)} already done)")
                _run_cell(cfg, path, progress, result)
                progress.advance(overall, estimate_seconds(cfg))
    if result.failed:
        console.print(f"[red]{counted(len(result.failed), 'cell')} failed:[/] "
                      + escape(", ".join(p.name for p in result.failed)))
    finished = [path for _, _, path in planned if cell_status(path) == "done"]
    if report and finished:
        scan = scan_runs(finished)  # a cell whose files do not agree is listed in the report, not left out unsaid
        for path, why in scan.skipped.items():
            console.print("[yellow]left out of the report:[/] " + escape(f"{path.name}: {why}"))
        left_out = {**{path: f"failed: {why}" for path, why in result.failed.items()}, **scan.skipped}
        result.report = write_report(scan.runs, out, skipped=left_out, force=force)
        if not quiet:
            console.print(escape(f"report: {result.report[0]}"))
    return result


class RoundLines:
    """One live progress line per running cell, advanced by each round it finishes: the cell's phase,
    round and accuracy. Rounds come from `on_round` in this process, or from a pool process's queue."""

    def __init__(self, progress: Progress, cells: dict[str, Config]) -> None:
        self.progress, self.cells = progress, cells
        self.tasks: dict[str, TaskID] = {}

    def show(self, path: str, phase: str, round: int, accuracy: float | None) -> None:
        """Advance the line of the cell in `path` by one round (adding the line at its first round)."""
        if path not in self.tasks:
            self.tasks[path] = self.progress.add_task("", total=len(plan(self.cells[path])))
        acc = "acc    -  " if accuracy is None else f"acc {100 * accuracy:5.2f}%"
        name = escape(f"{Path(path).name[:48]:<48}")  # a registered name may hold "[", which the line reads as markup
        self.progress.update(self.tasks[path], advance=1, description=f"  {name} {phase:>6} {round:>3} {acc}")

    def finish(self, path: str) -> None:
        """Remove the line of a cell that has ended."""
        if path in self.tasks:
            self.progress.remove_task(self.tasks.pop(path))


def _run_cell(cfg: Config, path: Path, progress: Progress, result: StudyResult) -> None:
    """Run one cell with a live line of its rounds; record a failure instead of stopping the study."""
    from .sim import simulate

    lines = RoundLines(progress, {str(path): cfg})

    def on_round(record: dict) -> None:
        lines.show(str(path), record["phase"], record["round"], record.get("accuracy"))

    try:
        _record(cfg, _attempt(path, lambda: simulate(cfg, path, on_round=on_round)), progress, result)
    finally:
        lines.finish(str(path))


def _attempt(path: Path, run: Callable[[], RunResult]) -> dict:
    """A cell's outcome: ``{"path", "summary"}``, or ``{"path", "error"}`` (with the traceback of an error
    that is not mpfl's own), so that one failing cell (a bug in one method, or a plug-in that calls
    sys.exit) stops no other."""
    try:
        return {"path": str(path), "summary": run().summary}
    except MpflError as exc:
        return {"path": str(path), "error": str(exc)}
    except (Exception, SystemExit) as exc:
        return {"path": str(path), "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def _record(cfg: Config, outcome: dict, progress: Progress, result: StudyResult) -> None:
    """Count a cell's outcome and print its line: accuracy, wall time and the estimate (unless the progress is
    off: quiet), or the error."""
    path = Path(outcome["path"])
    if "error" in outcome:
        result.failed[path] = outcome["error"]
        progress.console.print("[red]failed[/] " + escape(f"{path.name}: {outcome['error']}"), highlight=False)
        if "traceback" in outcome:
            progress.console.print(outcome["traceback"], highlight=False, markup=False)
        return
    summary = outcome["summary"]
    result.ran.append(path)
    if progress.disable:
        return
    acc = "n/a" if summary["final_accuracy"] is None else f"{100 * summary['final_accuracy']:.2f}%"
    progress.console.print(f"done {path.name}: accuracy {acc}, {summary['wall_time']:.1f} s "
                           f"(estimated {estimate_seconds(cfg):.1f} s)", markup=False)


def run_in_processes(todo: Sequence[tuple[Config, Path]], jobs: int, progress: Progress, overall: TaskID,
                     result: StudyResult) -> None:
    """Run the cells `jobs` at a time in a pool of processes, each of which imports torch and loads the data
    once for all the cells it runs. A cell's results are those of running it alone: every draw comes from
    its config, and it runs on one torch thread. Each running cell has a live line of its rounds, which the
    pool's processes send over a queue. On Ctrl-C (or any error here) the pool is stopped at once; the cells
    it was running are unfinished, and the next invocation moves them aside and runs them again."""
    if many := [path.name for cfg, path in todo if cfg.workers != 1]:
        raise ConfigError(f"cells with workers other than 1 ({', '.join(many[:3])}) cannot run side by side, as "
                          "a pool's processes start no workers of their own; run the study with jobs = 1")
    cells = {str(path): cfg for cfg, path in todo}
    context = mp.get_context("forkserver" if forkserver_available() else "spawn")
    # a SimpleQueue's put writes to its pipe at once (a Queue's feeder thread writes later), so every round
    # of a cell is in the pipe before the cell's outcome is sent, and is shown before its line is removed
    rounds = None if progress.disable else context.SimpleQueue()
    lines = RoundLines(progress, cells)
    # concurrent.futures, not multiprocessing.Pool: a Pool whose process is killed (out of memory) waits forever
    # for that process's cell, while an executor fails the cells it had not finished (BrokenProcessPool)
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_send_rounds_to, initargs=(rounds,))
    try:
        running = {pool.submit(run_cell_alone, (cfg.to_dict(), path)) for path, cfg in cells.items()}
        while running:
            done, running = wait(running, timeout=ROUND_POLL_SECONDS, return_when=FIRST_COMPLETED)
            _show_rounds(rounds, lines)
            for future in done:
                outcome = future.result()
                lines.finish(outcome["path"])
                cfg = cells[outcome["path"]]
                _record(cfg, outcome, progress, result)
                progress.update(overall, description=f"{len(result.ran) + len(result.failed)}/{len(todo)} cells "
                                                     f"({len(result.skipped)} already done)")
                progress.advance(overall, estimate_seconds(cfg))
    except BrokenProcessPool:
        left = len(todo) - len(result.ran) - len(result.failed)
        codes = [process.exitcode for process in (pool._processes or {}).values()]
        if any(code is not None and code >= 0 for code in codes):  # not killed by a signal: exited
            why, hint = ('exited while it started or ran a cell (a script that runs a study with jobs above 1 must do '
                         'so under `if __name__ == "__main__":`)', "")
        else:
            why, hint = "was killed (out of memory?) while it ran a cell", " (with a smaller --jobs if memory is short)"
        raise WorkerError(f"a process of the study {why}; the finished cells are kept in {todo[0][1].parent}: run the "
                          f"same mpfl study command again to run the {left} unfinished ones{hint}") from None
    finally:
        _stop(pool)
        if rounds is not None:
            rounds.close()


ROUND_POLL_SECONDS = 0.2
"""How often the study's process shows the rounds its pool's processes finished."""


def _show_rounds(rounds: SimpleQueue | None, lines: RoundLines) -> None:
    """Show every round the pool's processes have sent so far."""
    while rounds is not None and not rounds.empty():
        lines.show(*rounds.get())


def _stop(pool: ProcessPoolExecutor) -> None:
    """End the pool at once: cells not started are dropped and running ones stopped, to be run again by the
    next invocation (Python 3.14's ProcessPoolExecutor.terminate_workers does the same)."""
    for process in list((pool._processes or {}).values()):
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


_rounds: SimpleQueue | None = None
"""In a pool process: where its cells' finished rounds go (None when the study shows no progress)."""


def _send_rounds_to(rounds: SimpleQueue | None) -> None:
    """A pool process's initializer: send the rounds of the cells it runs to `rounds`."""
    global _rounds
    _rounds = rounds


def run_cell_alone(task: tuple[dict, str]) -> dict:
    """One cell (its config as a dict, its folder) in a pool process: its outcome (`_attempt`)."""
    from .sim import simulate

    config, path = task

    def on_round(record: dict) -> None:
        if _rounds is not None:
            _rounds.put((path, record["phase"], record["round"], record.get("accuracy")))

    return _attempt(Path(path), lambda: simulate(Config.from_dict(config), Path(path), on_round=on_round))
