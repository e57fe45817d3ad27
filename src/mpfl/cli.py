"""The `mpfl` command: run experiments, inspect data splits, report, run studies and export models.

Every config field is a flag of the same name (``--lr 0.1``, ``--batch-size 64``); a
``--config file.toml`` supplies a base that flags override. Progress goes to stderr, results
to stdout; errors are one line on stderr with exit code 2, and Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from rich.markup import escape

from . import __version__
from ._launch import INTERRUPTED, json_log_requested
from .config import (
    FIELD_SECTIONS,
    SECTION_PREFIX,
    Config,
    field_aliases,
    field_choices,
    field_help,
    field_types,
    mentioned,
    overridden,
    refuse_quoted_values,
    split_items,
)
from .errors import WORKER_NOTE, ConfigError, MethodError, MpflError, PathError, WorkerError
from .interrupts import sigterm_as_interrupt
from .notes import end_notes, flag, idle_flags
from .plugins import from_plugin_code
from .progress import LOG_FORMATS, plain_console
from .protocol import RoundRecord

console = plain_console()
PARTITION_FIELDS = ("seed", "nodes", "plugins", *(name for name, section in FIELD_SECTIONS.items() if section == "data"))
RUN_DEFAULTS = {"workers": 0}
"""Where `mpfl run` departs from the Python API's defaults: it trains the nodes in one process per core
(the same results as one process), which a script may only do under an ``if __name__ == "__main__":`` guard."""


def _metavar(name: str, hint: object) -> str:
    """The metavar of a field's flag: INT, FLOAT, TEXT, BOOL, or for a repeatable list what one item is."""
    text = str(hint)
    if "tuple" in text:
        return {"exclude": "PATTERN", "plugins": "MODULE"}.get(name, "TEXT")
    for name, shown in (("bool", "BOOL"), ("int", "INT"), ("float", "FLOAT")):
        if text.startswith(name) or text == f"<class '{name}'>":
            return shown
    return "TEXT"


def _shown(value: object) -> str:
    """A default as the help shows it: none for None or an empty list."""
    return "none" if value is None or value == () else str(value)


def _add_config_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None,
                      command_defaults: dict[str, object] | None = None) -> None:
    """A flag for each config field in `names` (default: all), with its description, default and choices;
    `command_defaults` are the command's own defaults where they differ from the config's."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with the base configuration")
    group = parser.add_argument_group("configuration", "Each flag overrides the --config file, where it is the key "
                                      "of the same name (with _ for -), in the [section] shown.")
    defaults, command_defaults = Config(), command_defaults or {}
    for name in names or field_types():
        section = FIELD_SECTIONS[name]
        default = getattr(getattr(defaults, section) if section else defaults, name)
        _add_field_flag(group, name, command_defaults.get(name, default))


def _add_field_flag(group: argparse._ActionsContainer, name: str, default: object) -> None:
    """The flag of config field `name`, its value in ``args.cfg_<name>`` (a list for a repeatable field), with its
    description, `default`, choices and [section]: one definition for mpfl run's flags and the ones other
    commands share with it (mpfl study's --plugins)."""
    section, choices, types = FIELD_SECTIONS[name], field_choices(), field_types()
    text = f"{field_help()[name]} (default {_shown(default)}"
    text += (f"; one of {', '.join(choices[name])})" if name in choices else ")") + (f" [{section}]" if section else "")
    repeat = "tuple" in str(types[name])
    group.add_argument(flag(name), dest=f"cfg_{name}", default=None, metavar=_metavar(name, types[name]),
                       action="append" if repeat else "store", help=text.replace("%", "%%"))


def _given(args: argparse.Namespace) -> dict[str, object]:
    """The config fields set by flags on this command line."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def config_from_args(args: argparse.Namespace, command_defaults: dict[str, object] | None = None) -> Config:
    """The config a command line asks for: the command's own defaults, the file's values (if any) over
    them and the flags' on top, checked together, so a flag can replace a bad value of the file; an
    error about a value the file set says so."""
    data = Config.read_toml(args.config) if args.config else {}
    overrides = {name: value for name, value in (command_defaults or {}).items() if not _in_file(data, name)}
    overrides.update(_given(args))
    for name, value in overrides.items():
        if isinstance(value, list):
            overrides[name] = split_items(name, value)
    try:
        if args.config:
            refuse_quoted_values(data, replaced=overrides)
        return Config.from_dict(overridden(data, overrides))
    except ConfigError as exc:
        if args.config and _names_file_value(str(exc), data, overrides):
            raise type(exc)(f"{exc} (set in the config file {str(args.config)!r})") from None
        if args.config and (hint := _relative_paths_hint(args.config, "run")):
            raise type(exc)(f"{exc}{hint}") from None
        raise


def _in_file(data: dict, name: str) -> bool:
    """Whether a config file's `data` sets the field `name` (in its section)."""
    section = FIELD_SECTIONS[name]
    table = data.get(section) if section else data
    return isinstance(table, dict) and name in table


def _names_file_value(message: str, data: dict, flags: Iterable[str]) -> bool:
    """Whether an error `message` is about a key the config file sets and no flag replaces: it names the key
    as the validators do (``key = value``, ``[section.]key must``, or ``'[section.]key'``)."""
    keys = set(data)  # every top-level key and [section] name
    keys |= {key for value in data.values() if isinstance(value, dict) for key in value}
    return any(re.search(rf"{mentioned(key)}|'{SECTION_PREFIX}{re.escape(key)}'", message) for key in keys - set(flags))


def name_flags(message: str, names: Iterable[str]) -> str:
    """An error message with the config fields set on the command line named as their flags
    (``train.lr must be ...`` -> ``--lr must be ...``), so it points at what the user typed."""
    for name in names:
        message = re.sub(mentioned(name), flag(name), message)
    return message


def _resume_target(args: argparse.Namespace) -> tuple[Config, Path]:
    """The saved config and directory of the run `--resume` names."""
    from .records import CONFIG, check_resumable_dir
    from .resume import RUNTIME_FIELDS, read_config

    speed = {name: value for name, value in _given(args).items() if name in RUNTIME_FIELDS}
    others = [flag(name) for name in _given(args) if name not in RUNTIME_FIELDS]
    others += [flag for flag, given in (("--config", args.config), ("--out", args.out)) if given]
    if others:
        raise ConfigError(f"--resume continues a run in its own folder with its own saved config; leave out "
                          f"{', '.join(others)} (of the run's settings it takes only "
                          f"{', '.join(flag(n) for n in sorted(RUNTIME_FIELDS))}, which changes only the speed)")
    out = Path(args.resume)
    check_resumable_dir(out)
    try:
        return read_config(out).with_overrides(speed), out
    except ConfigError as exc:
        raise type(exc)(f"{exc}{_relative_paths_hint(out / CONFIG, 'resume')}") from None


def _relative_paths_hint(path: str | Path, action: str) -> str:
    """A hint for a config file whose relative file paths (--init, --plugins files) do not resolve from
    here: they are read from the folder a command runs in, not from the file's folder."""
    data = Config.read_toml(path)
    train, plugins = data.get("train"), data.get("plugins")
    files = [train.get("init")] if isinstance(train, dict) else []
    files += [p for p in plugins if str(p).endswith(".py")] if isinstance(plugins, list) else []
    relative = [p for p in files if isinstance(p, str) and not Path(p).is_absolute() and not Path(p).exists()]
    if not relative:
        return ""
    return (f" ({path} names {', '.join(map(repr, relative))} relative to the folder the run was started in: "
            f"{action} from that folder)")


def _steps_done(out: Path) -> int:
    """The last step recorded in a run directory being resumed (where its progress continues)."""
    from .records import read_rounds

    try:
        return max((r["step"] for r in read_rounds(out)), default=0)
    except (OSError, ValueError, KeyError):
        return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = None if args.resume else config_from_args(args, RUN_DEFAULTS)  # a bad value is refused before torch loads
    from .records import check_run_dir, new_run_dir, removed_if_unused

    if args.resume:
        cfg, out = _resume_target(args)
    else:
        out = Path(args.out) if args.out else new_run_dir(cfg)
        check_run_dir(out)
    with removed_if_unused(out, made=not (args.resume or args.out)):  # the folder new_run_dir made, if still empty
        return _run_in(args, cfg, out)


def _run_in(args: argparse.Namespace, cfg: Config, out: Path) -> int:
    """`mpfl run` once its config and run directory are known: the memory check, the run with its
    progress, and what to say when it stops."""
    from .methods import plan
    from .progress import RoundLog
    from .resources import available_memory, check_memory, estimate_run, fit_workers
    from .resume import resume_notes
    from .sim import simulate
    from .tensorboard import TENSORBOARD_DIR, TensorBoardLog

    if not args.no_memory_check and (estimate := estimate_run(cfg)) is not None:
        available = available_memory()
        fitted = fit_workers(cfg, estimate, available)
        check_memory(estimate if fitted is cfg else estimate_run(fitted), available)  # no note on a run refused
        if fitted is not cfg:
            if not args.quiet:
                _notice("note", f"note: {fitted.workers} worker process{'es' if fitted.workers > 1 else ''} instead "
                        "of one per core, so that the run fits in the memory available", args.log_format)
            cfg = fitted
    board = TensorBoardLog(args.tensorboard or out / TENSORBOARD_DIR, out) if args.tensorboard is not None else None
    if not args.quiet:
        _print_start(cfg, out, args.log_format, resume_notes(out, cfg) if args.resume else idle_flags(cfg, _given(args)))
    try:
        with RoundLog(plan(cfg), _steps_done(out) if args.resume else 0, log_format=args.log_format,
                      quiet=args.quiet, console=console) as log:
            result = simulate(cfg, out, on_round=log if board is None else _both(log, board), resume=bool(args.resume),
                              keep_checkpoint=args.keep_checkpoint)
    except WorkerError as exc:  # killed, out of memory perhaps: the run goes on from its last checkpoint
        hint = _resume_hint(out)
        raise WorkerError(f"{exc}; {hint}" if hint else str(exc)) from None
    except MethodError as exc:  # a plug-in broke its contract: once it is fixed, the run goes on
        hint = _resume_hint(out)
        raise MethodError(f"{exc}; once it is fixed, {hint}" if hint else str(exc)) from None
    except OSError as exc:  # a full disk, a file made read-only: once that is fixed, the run goes on
        if not (hint := _resume_hint(out)):
            raise
        raise PathError(_os_error_text(exc, hint)) from None
    except Exception as exc:  # a plug-in's own error (or a bug), shown with its traceback: the same
        if not isinstance(exc, MpflError) and (hint := _resume_hint(out)):
            exc.add_note(f"the run stopped on this error; once it is fixed, {hint}")
            if cfg.options:  # a plug-in's error may be about the value it was given, which a resume keeps
                exc.add_note("(if the fix is another --options value, start a new run with --out NEW_DIR instead: "
                             "a resumed run keeps its options)")
        raise
    except KeyboardInterrupt:
        hint = _resume_hint(out)
        _notice("interrupted", f"interrupted; {hint}" if hint else "interrupted before the run started; nothing was "
                "written", args.log_format)
        return INTERRUPTED
    except SystemExit as exc:  # mpfl never exits from inside a run: a plug-in's hook or model did
        _notice("stopped", f"the run stopped: code it ran (a plug-in?) called sys.exit({exc.code!r}); "
                f"{_resume_hint(out) or 'nothing was written'}", args.log_format)
        raise
    finally:
        if board is not None:
            board.close()
    _print_summary(result.summary, out, args.log_format)
    if not args.quiet:
        for note in end_notes(cfg, result.records, result.summary, result.options_read):
            _notice("note", f"note: {note}", args.log_format)
    return 0


def _resume_hint(out: Path) -> str | None:
    """How to continue a stopped run, or None when it stopped before writing its run directory."""
    from .records import CONFIG

    return f"continue with: mpfl run --resume {out}" if (out / CONFIG).is_file() else None


def _print_start(cfg: Config, out: Path, log_format: str, notes: Sequence[str] = ()) -> None:
    """The run's first line on stderr: what runs where, as text or (--log-format json) one JSON object,
    so that every line a JSON log holds parses."""
    from .parallel import available_cores, worker_count
    from .records import counted

    cores, workers = available_cores(), worker_count(cfg)
    shown = {"method": cfg.method, "dataset": cfg.data.dataset, "model": cfg.train.model, "nodes": cfg.nodes,
             "seed": cfg.seed, "threads": cfg.threads or "all", "workers": workers}
    if cfg.train.device is not None:  # where `auto` lands, and the GPU's name
        from .devices import describe, resolve_device

        shown["device"] = describe(resolve_device(cfg.train.device))
    if log_format == "json":
        print(json.dumps({"event": "start", **shown, "run_dir": str(out)}), file=sys.stderr, flush=True)
    else:
        text = " ".join(f"{k}={v}" for k, v in shown.items()) + f" -> {out}"
        console.print("[bold]mpfl run[/] " + escape(text), highlight=False)
    if cfg.threads > cores:
        notes = [f"--threads {cfg.threads} is more than the {cores} cores this process may use; torch slows down "
                 "sharply when its threads outnumber the cores", *notes]
    elif cfg.threads and workers > 1 and workers * cfg.threads > cores:
        notes = [f"{workers} worker processes x {counted(cfg.threads, 'torch thread')} is more "
                 f"than the {cores} cores this process may use: the extra processes only take turns on them "
                 f"(--workers {max(1, cores // cfg.threads)} gives the same results)", *notes]
    for note in notes:
        _notice("note", f"note: {note}", log_format)


def _both(first: Callable[[RoundRecord], None], second: Callable[[RoundRecord], None]
          ) -> Callable[[RoundRecord], None]:
    """One round callback that calls two."""
    def on_round(record: RoundRecord) -> None:
        first(record)
        second(record)

    return on_round


def _print_summary(s: dict, out: Path, log_format: str) -> None:
    """The run's final figures on stdout: one line of text, or one JSON object with --log-format json."""
    from .records import summary_line

    if log_format == "json":
        print(json.dumps({"run_dir": str(out), **{k: v for k, v in s.items() if k != "config"}}), flush=True)
        return
    print(summary_line(s, out), flush=True)


def cmd_partition(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .partition import format_summary, make_partition, summarize

    cfg = config_from_args(args)
    for note in idle_flags(cfg, _given(args)):  # on stderr, as mpfl run gives them: the split stays on stdout
        _notice("note", f"note: {note}", "text")
    data_cfg = cfg.data
    data = load_dataset(data_cfg.dataset, data_cfg.data_dir).take(data_cfg.train_samples, data_cfg.test_samples)
    part = make_partition(data.y_train.numpy(), cfg.nodes, data_cfg.partition, alpha=data_cfg.alpha,
                          shards_per_node=data_cfg.shards, val_fraction=data_cfg.val_fraction, seed=cfg.seed)
    print(format_summary(summarize(data.y_train.numpy(), part, data.num_classes)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .records import counted
    from .report import is_run_dir, scan_runs, write_report

    scan = scan_runs(args.paths)
    for path, why in scan.skipped.items() if scan.runs else ():
        console.print(escape(f"skipped {path}: {why}"), highlight=False)
    # a folder of runs (a study's) holds its report; runs named one by one, even one, share report/
    folder = len(args.paths) == 1 and not is_run_dir(Path(args.paths[0]))
    out = Path(args.out) if args.out else Path(args.paths[0]) if folder else Path("report")
    written = write_report(scan.runs, out, json_path=args.json, skipped=scan.skipped, force=args.force)
    plots = counted(sum(p.suffix == ".png" for p in written), "plot")
    print(f"{counted(len(scan.runs), 'run')} -> {written[0]} and {plots} in {out}"
          + (f" ({len(scan.skipped)} skipped)" if scan.skipped else ""))
    return 0


MAX_STUDY_JOBS = 8
"""Most cells `mpfl study` runs at once unless --jobs says otherwise: each process holds its own copy of the data."""


def cmd_study(args: argparse.Namespace) -> int:
    from .parallel import available_cores
    from .study import PRESETS, check_study_folder, missing_datasets, preset_cells, print_plan, run_study

    if args.jobs < 0:
        raise ConfigError(f"--jobs = {args.jobs} must be >= 0 (0: one cell per CPU core at a time, at most 8)")
    jobs = args.jobs or min(available_cores(), MAX_STUDY_JOBS)
    cells = preset_cells(args.preset, args.seeds, datasets=args.datasets, methods=args.methods,
                         plugins=split_items("plugins", args.cfg_plugins or []))
    out = Path(args.out) if args.out else Path("studies") / args.preset
    if not args.quiet:
        about = PRESETS[args.preset].about if args.methods is None else \
            f"the main comparison of {', '.join(dict.fromkeys(cell.overrides['method'] for cell in cells))}"
        console.print("[bold]mpfl study[/] " + escape(f"preset={args.preset} ({about}) -> {out}"), highlight=False)
    if args.dry_run:
        check_study_folder(out)
        print_plan(cells, out, plain_console(stderr=False), args.data_dir, jobs)
        missing = missing_datasets(cells, args.data_dir)
        present = sorted({cell.overrides["dataset"] for cell in cells} - set(missing))
        for name, where in missing.items():
            print(f"missing data: {name} is not in {where}; it is downloaded when the study starts if this machine "
                  f"is online" + (f", or run without it: --datasets {','.join(present)}" if present else ""))
        return 0
    try:
        result = run_study(cells, out, data_dir=args.data_dir, console=console, quiet=args.quiet, force=args.force,
                           jobs=jobs)
    except KeyboardInterrupt:
        console.print(escape(f"interrupted; the finished cells are kept in {out}: run the same mpfl study command again "
                             "to continue with the rest"), highlight=False)
        return INTERRUPTED
    print(f"ran {len(result.ran)}, already done {len(result.skipped)}, failed {len(result.failed)}")
    return 1 if result.failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    """`mpfl export`: write the compact model and print its savings."""
    from .export import EXPORT_JSON, export_run

    info = export_run(args.run_dir, args.out, formats=args.format, layout=args.layout, batch=args.latency_batch,
                      repeats=args.repeats, threads=args.threads, force=args.force)
    dense, pruned = info["dense"], info["pruned"]
    print(f"{'':<12}{'dense':>14}{'pruned':>14}{'ratio':>8}   (pruned bytes: {info['files'][info['primary']]})")
    for key, label, fmt in (("parameters", "parameters", ",d"), ("bytes", "bytes", ",d"), ("flops", "FLOPs", ",d"),
                            ("latency_ms", "latency ms", ".3f")):
        print(f"{label:<12}{dense[key]:>14{fmt}}{pruned[key]:>14{fmt}}{pruned[key] / dense[key]:>8.3f}")
    if info["not_compact_because"]:
        print(f"note: the filter mask's model was not shrunk, so it is stored as sparse tensors: "
              f"{info['not_compact_because']}")
    if pruned["latency_note"]:  # the same dense kernels run both: the ratio is timing noise, not a speed-up
        print(f"note: latency: {pruned['latency_note']}; the ratio is run-to-run noise")
    if info["max_abs_diff"] > 1e-4:
        print(f"note: the exported model differs from the masked model by up to {info['max_abs_diff']:.3g} in its outputs: "
              "the run's final weights give dropped filters nonzero biases (as runs of earlier mpfl versions did), "
              "and the compact model drops them")
    out = Path(args.out) if args.out else Path(args.run_dir) / "export"
    print(f"wrote {', '.join(info['files'].values())} and {EXPORT_JSON} to {out}")
    return 0


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_run_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    run = sub.add_parser("run", help="run one experiment on the in-process simulator",
                         description="Run one experiment on the in-process simulator. Progress goes to stderr (a "
                                     "live bar on a terminal, one line per round otherwise), the summary to stdout.")
    _add_config_flags(run, command_defaults=RUN_DEFAULTS)
    out = run.add_argument_group("output")
    out.add_argument("--out", help="run directory (default: a new folder under runs/)")
    out.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    out.add_argument("--quiet", action="store_true", help="no progress on stderr, only the summary on stdout")
    out.add_argument("--log-format", choices=LOG_FORMATS, default="auto",
                     help="progress: auto = a live bar on a terminal, else one text line per round; text; "
                          "json = one JSON object per round on stderr and the summary as JSON on stdout")
    out.add_argument("--tensorboard", nargs="?", const="", metavar="DIR",
                     help="also write TensorBoard event files (default DIR: RUN_DIR/tensorboard; a folder of "
                          "its own per run; needs pip install \"mpfl[tensorboard]\")")
    out.add_argument("--keep-checkpoint", action="store_true",
                     help="keep checkpoint.npz when the run ends (default: remove it; final.npz stays)")
    out.add_argument("--no-memory-check", action="store_true",
                     help="run even if the estimated memory exceeds what the machine has available")
    run.set_defaults(func=cmd_run)
    return run


class _ExportFormats:
    """The formats `mpfl export` writes, read from `mpfl.export` (which imports torch) only when argparse
    checks a ``--format`` value or shows the export help, so that other commands and ``--version`` start fast."""

    def __iter__(self) -> Iterator[str]:
        from .export import FORMATS

        return iter(FORMATS)

    def __contains__(self, value: object) -> bool:
        return value in tuple(self)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `export` subcommand."""
    p = sub.add_parser("export", help="write a run's final model in compact form, with its size, FLOPs and latency")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--format", nargs="+", choices=_ExportFormats(), default=None, metavar="FORMAT",
                   help="files to write, one or more of %(choices)s (default: state_dict torchscript for filter "
                        "masks, state_dict for a run that pruned nothing, sparse otherwise; state_dict or sparse is "
                        "always among them)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/export)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier export in the output directory: the files its export.json lists that this "
                        "export does not write are removed, other files stay (a model.* or mask.bin it does not list "
                        "is refused)")
    p.add_argument("--layout", choices=("csr", "coo"), default="csr", help="sparse tensor layout (default: csr)")
    p.add_argument("--latency-batch", type=int, default=1,
                   help="batch size of the latency measurement (1 to 4096; default 1)")
    p.add_argument("--repeats", type=int, default=50, help="timed forward passes per model (at least 1; default 50)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the latency measurement (0: torch's default; default 1)")
    p.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpfl", description="Masked Pruning over Federated Learning.")
    parser.add_argument("--version", action="version", version=f"mpfl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    part = sub.add_parser("partition", help="show how the data is split over the nodes",
                          description="Show how the training data is split over the nodes: each node's sample "
                                      "count and label histogram, as a run with the same flags would split it.")
    _add_config_flags(part, PARTITION_FIELDS)
    part.set_defaults(func=cmd_partition)
    _add_export_parser(sub)
    report = sub.add_parser("report", help="compare run directories: a markdown table and PNG plots")
    report.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run directories, or folders holding them")
    report.add_argument("--out", help="where to write report.md and the plots (default: the folder, when one "
                        "folder of runs is given, such as a study's; else report/)")
    report.add_argument("--json", metavar="PATH", help="also write the table rows as a JSON list")
    report.add_argument("--force", action="store_true",
                        help="replace a report.md, plot or JSON file that mpfl report did not write")
    report.set_defaults(func=cmd_report)
    study = sub.add_parser("study", help="run the study grid (resumable), then report on it",
                           description="Run the study grid (resumable), then report on it. To compare a method "
                                       "of your own with the baselines: mpfl study --plugins examples/random_vote.py "
                                       "--methods mpfl,fedavg,random-vote --datasets mnist --seeds 1 (the plug-ins "
                                       "are named in every cell's config, so each process that runs a cell "
                                       "imports them).")
    study.add_argument("--preset", choices=("quick", "full"), default="quick", help="grid size (default: quick)")
    study.add_argument("--out", help="study folder (default: studies/<preset>)")
    study.add_argument("--seeds", type=int, metavar="N",
                       help="how many seeds (0, 1, ... N-1) the main comparison and sparsity sweep run (default: the "
                       "preset's: 1 quick, 3 full)")
    study.add_argument("--datasets", type=_comma_list, metavar="NAMES",
                       help="datasets of the main comparison, comma-separated (default: mnist,fashion-mnist; "
                            "--datasets mnist needs no download)")
    study.add_argument("--methods", type=_comma_list, metavar="NAMES",
                       help="run only the main comparison (the datasets, partitions and seeds at sparsity 0.9) of "
                            "these methods, comma-separated: built-in ones or ones --plugins registers (default: the "
                            "whole grid, whose main comparison has every built-in method)")
    _add_field_flag(study, "plugins", ())
    study.add_argument("--data-dir", help="where the datasets are (else $MPFL_DATA, the user cache, a download)")
    study.add_argument("--dry-run", action="store_true",
                       help="list the cells, their estimated time and any missing data; run nothing")
    study.add_argument("--jobs", type=int, default=0, metavar="N",
                       help="cells run at once in a pool of processes, each on one torch thread (same results as 1); "
                            "default 0: one per CPU core, at most 8")
    study.add_argument("--quiet", action="store_true", help="no progress display")
    study.add_argument("--force", action="store_true",
                       help="replace a report.md or plot in the study folder that mpfl report did not write")
    study.set_defaults(func=cmd_study)
    return parser


def _suggest(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    """A hint for the first unknown flag: the flag it is another name for, a flag it is close to, or
    that it belongs to `mpfl run` (whose config flags other subcommands only partly take)."""
    flags = [s for action in parser._actions for s in action.option_strings]
    for arg in (a.split("=")[0] for a in unknown if a.startswith("--")):
        bare = arg[2:].replace("-", "_")
        owner = bare if bare in FIELD_SECTIONS else next((n for n, al in field_aliases().items() if bare in al), None)
        if owner is not None and flag(owner) in flags:
            return f" Did you mean {flag(owner)}?"
        if owner is not None:
            return f" {flag(owner)} is a flag of mpfl run."
        if close := difflib.get_close_matches(arg, flags, n=1, cutoff=0.75):
            return f" Did you mean {close[0]}?"
    return ""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that points at --help, not the whole usage (one
    JSON object when the command line asks for ``--log-format json``)."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        text = f"{message} (see {self.prog} --help)"
        if self.json_errors:  # the event says it is an error, as in every other error's JSON line
            self.exit(2, json.dumps({"event": "error", "message": text}) + "\n")
        self.exit(2, f"{self.prog}: error: {text}\n")


_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.IGNORECASE)


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """`--flag -1e-3` as `--flag=-1e-3`: argparse takes only plain negative numbers as a flag's value and
    reads one in exponent form as an unknown flag."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_NUMBER.match(token):
            out[-1] += "=" + token
        else:
            out.append(token)
    return out


PATH_FLAGS = ("out", "config", "resume", "data_dir", "init", "json")
"""Flags that name a file or folder, which an empty value cannot."""


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse a command line; unknown flags are refused by the subcommand with a suggestion. Asked for
    help, the plug-ins it names are loaded first, so that the choices it lists hold their names too."""
    tokens = _join_negative_values(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(tokens):
        _load_named_plugins(tokens)
    parser = build_parser()
    _Parser.json_errors = json_log_requested(tokens)
    args, unknown = parser.parse_known_args(tokens)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    if unknown:
        sub.error(f"unrecognized arguments: {' '.join(unknown)}.{_suggest(sub, unknown)}")
    empty = [f"--{name.replace('_', '-')}" for name in PATH_FLAGS
             if "" in (getattr(args, name, None), getattr(args, f"cfg_{name}", None))]
    if empty:  # an unset shell variable, say: "" would otherwise mean the current folder or the default
        sub.error(f"{empty[0]} is empty; give a path" + ("" if empty[0] in ("--resume", "--config") else
                                                           ", or leave the flag out for its default"))
    if "" in (getattr(args, "run_dir", None), *getattr(args, "paths", ())):
        sub.error("a RUN_DIR is empty; give the path of a run directory")
    return args


def _load_named_plugins(tokens: Sequence[str]) -> None:
    """Load the plug-ins `--plugins` names in `tokens` (``--plugins A,B``, ``--plugins=A`` or repeated); the help
    says so when one cannot be loaded, and lists the names it could load."""
    from .plugins import load_plugins

    names = [value for flag, value in zip(tokens, tokens[1:]) if flag == "--plugins"]
    names += [token.split("=", 1)[1] for token in tokens if token.startswith("--plugins=")]
    try:
        load_plugins(split_items("plugins", names))
    except MpflError as exc:
        _notice("note", f"note: the help lists no names of this plug-in: {exc}", "auto")


def _notice(event: str, text: str, log_format: str) -> None:
    """A line on stderr about how a command ended: text, or with ``--log-format json`` one JSON object
    (``{"event": ..., "message": ...}``), so that every line of a JSON log parses."""
    if log_format == "json":
        print(json.dumps({"event": event, "message": text}), file=sys.stderr, flush=True)
    else:
        console.print(("[red]error:[/] " if event == "error" else "") + escape(text), soft_wrap=True, highlight=False)


def _os_error_text(exc: OSError, hint: str | None = None) -> str:
    """What a failed file operation tells the user: the file, the system's reason and the fix, which
    for a run that had started (`hint`: how to resume it) is to fix the cause and resume."""
    where = f" {str(exc.filename)!r}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space"
    else:
        fix = "make it writable" if hint else "choose another path"
    return f"cannot use{where}: {exc.strerror or exc}; {fix}" + (f", then {hint}" if hint else "")


def _error(text: str, log_format: str) -> int:
    """Print a one-line error; return the exit code of a refused command."""
    _notice("error", text, log_format)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mpfl` console script."""
    args = _parse(argv)
    log_format = getattr(args, "log_format", "auto")
    try:
        with sigterm_as_interrupt():
            return args.func(args)
    except MpflError as exc:
        return _error(name_flags(" ".join(str(exc).split()), _given(args)), log_format)
    except BrokenPipeError:  # what reads the output stopped (`mpfl partition | head`): end quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit does not fail too
        return 128 + signal.SIGPIPE
    except OSError as exc:
        return _error(_os_error_text(exc), log_format)
    except KeyboardInterrupt:
        _notice("interrupted", "interrupted", log_format)
        return INTERRUPTED
    except Exception as exc:  # a bug, or a plug-in's own error: its traceback, as one JSON object if asked for
        if log_format == "json":
            print(json.dumps({"event": "error", "message": f"{type(exc).__name__}: {exc}",
                              "traceback": traceback.format_exc()}), file=sys.stderr, flush=True)
            return 1
        users = from_plugin_code(exc.__traceback__)
        if users is None and not any(note.startswith(WORKER_NOTE) for note in getattr(exc, "__notes__", ())):
            raise  # an error of mpfl's own: its whole traceback
        # a plug-in's: from its own frames on (in a worker, the note holds them), not the dozens of mpfl's before
        print("".join(traceback.format_exception(type(exc), exc, users)), end="", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
