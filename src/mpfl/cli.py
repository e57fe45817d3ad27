"""The `mpfl` command: run experiments and inspect data splits.

Every config field is a flag of the same name (``--lr 0.1``, ``--batch-size 64``); a
``--config file.toml`` supplies a base that flags override.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .config import FIELD_SECTIONS, Config, field_choices, field_types
from .errors import ConfigError, MpflError
from .export import add_export_parser
from .methods import plan
from .records import default_run_dir

console = Console(stderr=True, soft_wrap=True)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metavar(hint: object) -> str:
    """A type hint as help text: `int`, `float | None`, `tuple[str, ...]`."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file with the base configuration")
    group = parser.add_argument_group("configuration (override the file and the defaults)")
    defaults, choices = Config(), field_choices()
    for name, hint in field_types().items():
        section = FIELD_SECTIONS[name]
        default = getattr(getattr(defaults, section) if section else defaults, name)
        text = f"{section + '.' if section else ''}{name} (default {default}"
        text += f"; one of {', '.join(choices[name])})" if name in choices else ")"
        group.add_argument(_flag(name), dest=f"cfg_{name}", default=None, metavar=_metavar(hint),
                           help=text.replace("%", "%%"))


def config_from_args(args: argparse.Namespace) -> Config:
    """The config a command line asks for: file (if any), then flags."""
    base = Config.from_toml(args.config) if args.config else Config()
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    optional = {name for name, hint in field_types().items() if "None" in str(hint)}
    for name, value in overrides.items():
        if name in optional and value.lower() == "none":
            overrides[name] = None
    return base.with_overrides(overrides)


def _progress_printer(cfg: Config, progress: Progress):
    total = len(plan(cfg))
    task = progress.add_task("starting", total=total)

    def on_round(r: dict) -> None:
        acc = f"acc {100 * r['accuracy']:.2f}%" if r.get("accuracy") is not None else "acc   -   "
        mb = (r["cum_bytes_up"] + r["cum_bytes_down"]) / 1e6
        text = f"{r['phase']:>6} {r['round']:>3}  {acc}  density {r['density']:.3f}  {mb:8.2f} MB"
        progress.update(task, advance=1, description=text)
        if r.get("dropped"):
            progress.console.print(f"step {r['step']}: dropped {r['dropped']}")

    return on_round


def cmd_run(args: argparse.Namespace) -> int:
    from .sim import simulate

    if args.resume:
        if args.config or args.out or any(k.startswith("cfg_") and v is not None for k, v in vars(args).items()):
            raise ConfigError("--resume continues a run with its own saved config; give no other config flags or --out")
        out = Path(args.resume)
        if not (out / "config.toml").is_file():
            raise ConfigError(f"{str(out)!r} is not a run directory (no config.toml); nothing to resume")
        cfg = Config.from_toml(out / "config.toml")
    else:
        cfg = config_from_args(args)
        out = Path(args.out) if args.out else default_run_dir(cfg)
    console.print(f"[bold]mpfl run[/] method={cfg.method} dataset={cfg.data.dataset} model={cfg.train.model} "
                  f"nodes={cfg.nodes} seed={cfg.seed} -> {out}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.quiet) as progress:
        result = simulate(cfg, out, on_round=_progress_printer(cfg, progress), resume=bool(args.resume))
    s = result.summary
    acc = "n/a" if s["final_accuracy"] is None else f"{100 * s['final_accuracy']:.2f}%"
    console.print(f"final accuracy {acc}, density {s['final_density']:.3f}, bytes up {s['bytes_up']:,} "
                  f"down {s['bytes_down']:,}, {s['wall_time']:.1f} s. Records in {out}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .partition import format_summary, make_partition, summarize

    cfg = config_from_args(args)
    d = cfg.data
    data = load_dataset(d.dataset, d.data_dir).take(d.train_samples, d.test_samples)
    part = make_partition(data.y_train.numpy(), cfg.nodes, d.partition, alpha=d.alpha, shards_per_node=d.shards,
                          val_fraction=d.val_fraction, seed=cfg.seed)
    print(format_summary(summarize(data.y_train.numpy(), part, data.num_classes)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import load_runs, write_report

    runs = load_runs(args.paths)
    out = Path(args.out) if args.out else Path(args.paths[0]) if len(args.paths) == 1 else Path("report")
    written = write_report(runs, out, json_path=args.json)
    console.print(f"{len(runs)} runs -> {written[0]} and {sum(p.suffix == '.png' for p in written)} plots in {out}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study import PRESETS, preset_cells, print_plan, run_study

    cells = preset_cells(args.preset, args.seeds)
    out = Path(args.out) if args.out else Path("studies") / args.preset
    console.print(f"[bold]mpfl study[/] preset={args.preset} ({PRESETS[args.preset].about}) -> {out}")
    if args.dry_run:
        print_plan(cells, out, Console(), args.data_dir)
        return 0
    result = run_study(cells, out, data_dir=args.data_dir, console=console, quiet=args.quiet)
    console.print(f"ran {len(result.ran)}, already done {len(result.skipped)}, failed {len(result.failed)}")
    return 1 if result.failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpfl", description="Masked Pruning over Federated Learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment on the in-process simulator")
    _add_config_flags(run)
    run.add_argument("--out", help="run directory (default: a new folder under runs/)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.set_defaults(func=cmd_run)
    part = sub.add_parser("partition", help="show how the data is split over the nodes")
    _add_config_flags(part)
    part.set_defaults(func=cmd_partition)
    add_export_parser(sub)
    report = sub.add_parser("report", help="compare run directories: a markdown table and PNG plots")
    report.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run directories, or folders holding them")
    report.add_argument("--out", help="where to write report.md and the plots (default: the one RUN_DIR, else report/)")
    report.add_argument("--json", metavar="PATH", help="also write the table rows as a JSON list")
    report.set_defaults(func=cmd_report)
    study = sub.add_parser("study", help="run the study grid (resumable), then report on it")
    study.add_argument("--preset", choices=("quick", "full"), default="quick", help="grid size (default: quick)")
    study.add_argument("--out", help="study folder (default: studies/<preset>)")
    study.add_argument("--seeds", type=int, help="seeds of the main comparison and sparsity sweep (default: preset's)")
    study.add_argument("--data-dir", help="where the datasets are (else $MPFL_DATA, the user cache, a download)")
    study.add_argument("--dry-run", action="store_true", help="list the cells and their estimated time, run nothing")
    study.add_argument("--quiet", action="store_true", help="no progress display")
    study.set_defaults(func=cmd_study)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mpfl` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MpflError as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
