"""The study runner on a tiny grid: runs cells, resumes without rerunning, keeps unfinished attempts aside."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mpfl.sim
import mpfl.study
from conftest import comparable
from mpfl.checkpoint import load_final
from mpfl.cli import main
from mpfl.config import Config
from mpfl.errors import ConfigError, PathError, RoundError, RunDirError, WorkerError
from mpfl.records import read_rounds, read_summary
from mpfl.study import PRESETS, Cell, cell_name, estimate_seconds, grid, preset_cells, run_study, unique

TINY = {"nodes": 3, "rounds": 1, "mask_rounds": 1, "train_samples": 1200, "test_samples": 300, "threads": 1}
CELLS = [Cell("t", {**TINY, "method": "fedavg"}), Cell("t", {**TINY, "method": "mpfl"})]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, run_study(CELLS, out, quiet=True)


def counting(monkeypatch):
    """Replace the simulator by a counter of the cells it is asked to run."""
    calls = []
    monkeypatch.setattr(mpfl.sim, "simulate", lambda cfg, out, **kw: calls.append(out) or pytest.fail("rerun"))
    return calls


def test_each_cell_runs_into_a_directory_named_from_its_config(study):
    out, result = study
    names = [cell_name(c.config()) for c in CELLS]
    assert sorted(p.name for p in result.ran) == sorted(names) and not result.failed
    for cell, name in zip(CELLS, names):
        assert read_summary(out / name)["config"] == cell.config().to_dict()
    assert (out / "report.md").is_file() and "| fedavg |" in (out / "report.md").read_text()
    assert [c["name"] for c in json.loads((out / "study.json").read_text())] == names


def test_a_second_invocation_skips_finished_cells(study, monkeypatch):
    out, _ = study
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    calls = counting(monkeypatch)
    again = run_study(CELLS, out, quiet=True)
    assert calls == [] and again.ran == [] and len(again.skipped) == len(CELLS)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == mtimes


def test_a_report_file_of_the_user_in_the_study_folder_is_refused_before_any_cell_runs(tmp_path, monkeypatch):
    (tmp_path / "report.md").write_text("my notes\n")
    calls = counting(monkeypatch)
    with pytest.raises(PathError, match="report.md was not written by mpfl report, so it is not replaced"):
        run_study(CELLS, tmp_path, quiet=True)
    assert calls == [] and (tmp_path / "report.md").read_text() == "my notes\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


@pytest.mark.parametrize("record", ["config.toml", "summary.json"])
def test_a_run_directory_is_refused_as_a_study_folder_before_any_cell_runs(tmp_path, monkeypatch, record):
    (tmp_path / record).write_text("{}\n")
    calls = counting(monkeypatch)
    with pytest.raises(ConfigError, match=f"{tmp_path} is a run directory .*; a study needs a folder of its own"):
        run_study(CELLS, tmp_path, quiet=True)
    assert calls == [] and [p.name for p in tmp_path.iterdir()] == [record]
    assert main(["study", "--out", str(tmp_path), "--dry-run", "--datasets", "mnist"]) == 2  # says so as a real one


def test_an_unfinished_cell_is_moved_aside_and_run_again(tmp_path):
    cell = CELLS[0]
    path = tmp_path / cell_name(cell.config())
    path.mkdir()
    (path / "rounds.jsonl").write_text('{"step": 1}\n')
    result = run_study([cell], tmp_path, quiet=True)
    assert result.ran == [path] and (path / "summary.json").is_file()
    assert (tmp_path / f"{path.name}.incomplete-1" / "rounds.jsonl").read_text() == '{"step": 1}\n'


def test_a_finished_cell_of_another_config_is_refused(study, tmp_path):
    out, _ = study
    src = out / cell_name(CELLS[0].config())
    other = Cell("t", {**TINY, "method": "fedavg", "seed": 5})
    dest = tmp_path / cell_name(other.config())
    dest.mkdir()
    (dest / "summary.json").write_text((src / "summary.json").read_text())
    with pytest.raises(ConfigError, match="another config"):
        run_study([other], tmp_path, quiet=True)


def test_a_finished_cell_with_a_damaged_summary_is_named(study, tmp_path):
    cell = tmp_path / cell_name(CELLS[0].config())
    cell.mkdir()
    (cell / "summary.json").write_text('{"method": "mpfl", "final')
    with pytest.raises(RunDirError, match="summary.json is damaged"):
        run_study([CELLS[0]], tmp_path, quiet=True)


def test_cells_run_side_by_side_in_processes_end_bit_for_bit_as_in_one_process(study, tmp_path):
    out, _ = study
    result = run_study(CELLS, tmp_path, quiet=True, report=False, jobs=2)
    assert sorted(result.ran) == sorted(tmp_path / cell_name(c.config()) for c in CELLS) and not result.failed
    for path in result.ran:
        alone, side_by_side = load_final(out / path.name), load_final(path)
        assert all(np.array_equal(alone.weights[k], side_by_side.weights[k]) for k in alone.weights)
        assert comparable(read_rounds(out / path.name)) == comparable(read_rounds(path))


def cell_whose_training_round(folder, statement: str) -> Cell:
    """A tiny cell of a plug-in method (written into `folder`) whose training round runs `statement` instead."""
    plugin = folder / "method.py"
    plugin.write_text("import os, signal\nfrom mpfl.methods import register_method\nfrom mpfl.methods.mpfl import Mpfl\n\n"
                      "@register_method\nclass Broken(Mpfl):\n    name = 'broken-test'\n\n"
                      f"    def train_round(self, server, step):\n        {statement}\n")
    return Cell("t", {**TINY, "method": "broken-test", "plugins": [str(plugin)]})


def test_a_cell_failing_in_a_pool_process_is_named_with_its_error_and_the_others_run(tmp_path, capsys):
    broken = cell_whose_training_round(tmp_path, "raise RuntimeError('broken on purpose')")
    out = tmp_path / "s"
    result = run_study([broken, CELLS[0]], out, quiet=True, report=False, jobs=2)
    path = out / cell_name(broken.config())
    assert result.failed == {path: "RuntimeError: broken on purpose"}
    assert result.ran == [out / cell_name(CELLS[0].config())]
    err = capsys.readouterr().err
    assert "in train_round" in err  # the traceback of an error that is not mpfl's own
    assert "done" not in err  # quiet: the failure only


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_cell_whose_code_calls_sys_exit_fails_alone(tmp_path, jobs):
    exits = cell_whose_training_round(tmp_path, "raise SystemExit(3)")
    out = tmp_path / "s"
    result = run_study([exits, CELLS[0]], out, quiet=True, report=False, jobs=jobs)
    assert result.failed == {out / cell_name(exits.config()): "SystemExit: 3"}
    assert result.ran == [out / cell_name(CELLS[0].config())]


def test_each_finished_cell_is_a_line_unless_quiet(tmp_path, capsys):
    from rich.console import Console

    result = run_study(CELLS[:1], tmp_path, console=Console(stderr=True), report=False)
    assert capsys.readouterr().err.count(f"done {result.ran[0].name}: accuracy ") == 1


class RecordingProgress(mpfl.study.Progress):
    """A progress display that keeps every description each line showed, and which lines were removed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shown, self.removed = {}, []

    def update(self, task_id, **kwargs):
        if "description" in kwargs:
            self.shown.setdefault(task_id, []).append(kwargs["description"])
        super().update(task_id, **kwargs)

    def remove_task(self, task_id):
        self.removed.append(task_id)
        super().remove_task(task_id)


@pytest.mark.parametrize("jobs", [1, 2])
def test_each_running_cell_has_a_live_line_of_every_round_it_finished(tmp_path, monkeypatch, jobs):
    from io import StringIO

    from rich.console import Console

    made = []
    monkeypatch.setattr(mpfl.study, "Progress", lambda *a, **kw: made.append(RecordingProgress(*a, **kw)) or made[-1])
    cells = [Cell("t", {**TINY, "method": "fedavg", "rounds": 3}), Cell("t", {**TINY, "method": "mpfl", "rounds": 2})]
    result = run_study(cells, tmp_path, console=Console(file=StringIO()), report=False, jobs=jobs)
    assert len(result.ran) == 2 and not result.failed
    progress = made[0]
    lines = {task: shown for task, shown in progress.shown.items() if shown[0].startswith("  ")}  # not the study's bar
    by_cell = {shown[0].split()[0]: shown for shown in lines.values()}
    for path in result.ran:
        expected = [[r["phase"], str(r["round"]), "acc", "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"]
                    for r in read_rounds(path)]
        assert [line.split()[1:] for line in by_cell[path.name[:48]]] == expected
    assert sorted(progress.removed) == sorted(lines) and progress.task_ids == [progress.task_ids[0]]


def test_ctrl_c_stops_the_pool_and_the_next_invocation_runs_what_is_missing(tmp_path, monkeypatch):
    cells = [Cell("t", {**TINY, "method": "fedavg", "seed": seed}) for seed in range(4)]
    real = mpfl.study._record

    def interrupted_after_the_first(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(mpfl.study, "_record", interrupted_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        run_study(cells, tmp_path, quiet=True, report=False, jobs=2)
    done = sorted(p for p in tmp_path.iterdir() if (p / "summary.json").is_file())  # the first, or the first two
    assert 1 <= len(done) <= 2
    monkeypatch.setattr(mpfl.study, "_record", real)
    result = run_study(cells, tmp_path, quiet=True, report=False, jobs=2)
    assert sorted(result.skipped) == done and len(result.ran) == 4 - len(done) and not result.failed


def test_a_pool_process_killed_in_a_cell_stops_the_study_with_one_error_and_the_next_invocation_goes_on(tmp_path):
    killed = cell_whose_training_round(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)")
    out = tmp_path / "s"
    with pytest.raises(WorkerError, match=rf"^a process of the study was killed \(out of memory\?\) while it ran a "
                                          rf"cell; the finished cells are kept in {out}: run the same mpfl study "
                                          rf"command again to run the [12] unfinished ones"):
        run_study([killed, CELLS[0]], out, quiet=True, report=False, jobs=2)
    result = run_study([CELLS[0]], out, quiet=True, report=False, jobs=2)
    assert len(result.ran) + len(result.skipped) == 1 and not result.failed


@pytest.mark.slow
def test_a_script_without_a_main_guard_gets_one_error_that_says_what_to_do(tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text("from mpfl.study import Cell, run_study\n"
                      f"run_study([Cell('t', {CELLS[0].overrides!r})], 'out', quiet=True, report=False, jobs=2)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.count("Traceback") == 1  # the pool's processes stop quietly
    assert done.stderr.strip().splitlines()[-1] == (
        "mpfl.errors.WorkerError: a process of the study exited while it started or ran a cell (a script that runs a "
        'study with jobs above 1 must do so under `if __name__ == "__main__":`); the finished cells are kept in out: '
        "run the same mpfl study command again to run the 1 unfinished ones")


def test_cells_with_worker_processes_of_their_own_are_refused_side_by_side(tmp_path):
    with pytest.raises(ConfigError, match="cannot run side by side"):
        run_study([Cell("t", {**TINY, "workers": 2})], tmp_path, quiet=True, report=False, jobs=2)


def test_a_failing_cell_does_not_stop_the_others(tmp_path, monkeypatch):
    real = mpfl.sim.simulate

    def flaky(cfg, out, **kw):
        if cfg.method == "fedavg":
            raise RoundError("no node replied")
        return real(cfg, out, **kw)

    monkeypatch.setattr(mpfl.sim, "simulate", flaky)
    result = run_study(CELLS, tmp_path, quiet=True)
    assert [p.name for p in result.failed] == [cell_name(CELLS[0].config())]
    assert [p.name for p in result.ran] == [cell_name(CELLS[1].config())]
    report = (tmp_path / "report.md").read_text()  # the report says which cell it lacks, and why
    assert f"{cell_name(CELLS[0].config())}`: failed: no node replied" in report


def test_presets_cover_the_grid_and_fit_their_time_budgets():
    for name, budget in (("quick", 15 * 60), ("full", 180 * 60)):
        cells = preset_cells(name)
        configs = [c.config() for c in cells]
        assert len({cell_name(c) for c in configs}) == len(cells)
        seeds = PRESETS[name].seeds
        main_cells = [c for c in cells if c.group == "main"]
        assert len(main_cells) == 8 * 2 * 4 * seeds
        assert {c.config().data.partition for c in main_cells} == {"iid", "dirichlet", "shards"}
        assert {c.prune.sparsity for c in configs if c.method == "random"} == {0.5, 0.8, 0.9, 0.95, 0.98}
        precision = {(c.method, c.codec.value_dtype) for c in configs if c.data.partition == "iid"}
        assert {(m, d) for m in ("mpfl", "topk", "fedavg-prune") for d in ("float32", "float16", "int8")} <= precision
        skew = [c for c in configs if c.method == "mpfl" and c.seed == 0 and c.data.dataset == "mnist"
                and (c.data.partition == "shards" or c.data.alpha == 0.1 and c.data.partition == "dirichlet")]
        for partition in ("dirichlet", "shards"):
            here = [c for c in skew if c.data.partition == partition]
            assert {c.prune.extrapolate for c in here} == {1.0, 100.0} and {c.adapt.adapt_every for c in here} == {0, 2}
            assert {c.prune.core_share for c in here} == {0.0, 0.1} and {c.prune.scope for c in here} == {"global", "layer"}
            assert {c.prune.mask_epochs for c in here} == {1, 2} and {c.prune.mask_average_from for c in here} == {None, 0, 2}
        averaging = [c for c in cells if c.group == "averaging"]
        assert len(averaging) == 2 * 4 * seeds and {c.config().prune.mask_average_from for c in averaging} == {2}
        ablation = [c for c in configs if c.method == "mpfl" and c.data.dataset == "mnist" and c.data.partition == "iid"
                    and c.prune.sparsity == 0.9 and c.seed == 0]
        assert {c.prune.consensus for c in ablation} == {"vote", "threshold", "dynamic", "histogram"}
        assert {c.nodes for c in ablation} == {5, 10, 20, 50}
        assert {(c.prune.rewind, c.prune.train_init) for c in ablation} == {("init", "rewind"), ("none", "local")}
        assert sum(estimate_seconds(c) for c in configs) < budget / 2


def test_cells_start_from_the_current_defaults():
    cells = grid({"rounds": 1}, seeds=1)
    assert cells[0].config().prune.mask_rounds == Config().prune.mask_rounds
    duplicate = unique([Cell("a", {"method": "mpfl"}), Cell("b", {"method": "mpfl", "consensus": "vote"})])
    assert [c.group for c in duplicate] == ["a"]


def test_dry_run_lists_cells_with_estimates(tmp_path, capsys, monkeypatch):
    calls = counting(monkeypatch)
    assert main(["study", "--preset", "quick", "--dry-run", "--out", str(tmp_path / "s")]) == 0
    text = capsys.readouterr().out
    assert calls == [] and not (tmp_path / "s").exists()
    assert "ablation:nodes" in text and "still to run" in text and len(preset_cells("quick")) == text.count(" todo ")


def test_datasets_option_keeps_the_grid_on_the_named_datasets(capsys):
    mnist_only = preset_cells("quick", datasets=["mnist"])
    assert {c.config().data.dataset for c in mnist_only} == {"mnist"}
    assert len([c for c in mnist_only if c.group == "main"]) == 8 * 4
    assert {c.group for c in mnist_only} == {c.group for c in preset_cells("quick")}
    fashion_only = preset_cells("quick", datasets=["fashion-mnist"])
    assert {c.group for c in fashion_only} == {"main", "averaging"}
    assert preset_cells("quick", datasets=["FMNIST", "MNIST"]) == preset_cells("quick", datasets=["fashion-mnist",
                                                                                                 "mnist"])
    with pytest.raises(ConfigError, match="--datasets mnst: choose from mnist"):
        preset_cells("quick", datasets=["mnst"])


MY_METHOD = ("from mpfl.methods import register_method\nfrom mpfl.methods.mpfl import Mpfl\n\n"
             "@register_method\nclass Mine(Mpfl):\n    name = 'my-method'\n")


def test_without_methods_the_grid_is_the_whole_one_and_plugins_are_named_in_each_cell(tmp_path):
    assert [len(preset_cells(name)) for name in PRESETS] == [124, 310]  # the counts of the module docstring
    plugin = tmp_path / "mine.py"
    plugin.write_text(MY_METHOD)
    cells = preset_cells("quick", datasets=["mnist"], plugins=[str(plugin)])
    assert len(cells) == 88 and {c.config().plugins for c in cells} == {(str(plugin),)}


def test_methods_plan_the_main_comparison_of_those_methods_only(tmp_path, capsys, monkeypatch):
    cells = preset_cells("quick", seeds=2, datasets=["mnist"], methods=["MPFL", "FedAvg", "fedavg"])
    whole = [c for c in preset_cells("quick", seeds=2, datasets=["mnist"]) if c.group == "main"]
    assert len(cells) == 2 * 4 * 2 and cells == [c for c in whole if c.overrides["method"] in ("mpfl", "fedavg")]
    calls = counting(monkeypatch)
    out = tmp_path / "s"
    assert main(["study", "--dry-run", "--methods", "mpfl,FedAvg", "--seeds", "2", "--datasets", "mnist",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert calls == [] and not out.exists() and text.count(" todo ") == 16
    assert all(cell_name(c.config()) in text for c in cells) and "ablation" not in text


def test_an_unknown_method_is_refused_as_mpfl_run_refuses_it_before_any_cell_runs(tmp_path, capsys, monkeypatch):
    calls = counting(monkeypatch)
    out = tmp_path / "s"
    assert main(["run", "--method", "random-vote", "--out", str(tmp_path / "r")]) == 2
    refused = " ".join(capsys.readouterr().err.split())
    assert refused.endswith("Did you mean 'random'? If a plug-in registers it, load the plug-in with --plugins "
                            "MODULE_OR_FILE")
    assert main(["study", "--methods", "mpfl,random-vote", "--out", str(out)]) == 2
    assert " ".join(capsys.readouterr().err.split()) == refused.replace("--method", "--methods")
    plugin = tmp_path / "mine.py"
    plugin.write_text(MY_METHOD)
    assert main(["study", "--plugins", str(plugin), "--methods", "my-methd", "--out", str(out)]) == 2
    assert "local, ssfl, my-method. Did you mean 'my-method'?" in " ".join(capsys.readouterr().err.split())
    assert calls == [] and not out.exists()


def test_a_plugin_method_runs_beside_a_baseline_in_pool_processes_and_is_in_the_report(tmp_path, capsys, monkeypatch):
    plugin = tmp_path / "mine.py"
    plugin.write_text(MY_METHOD)
    monkeypatch.setitem(PRESETS, "quick", mpfl.study.Preset(TINY, seeds=1, about="tiny"))
    monkeypatch.setattr(mpfl.study, "PARTITIONS", mpfl.study.PARTITIONS[:1])  # iid only: two cells
    out = tmp_path / "s"
    assert main(["study", "--plugins", str(plugin), "--methods", "fedavg,My-Method", "--datasets", "mnist",
                 "--jobs", "2", "--quiet", "--out", str(out)]) == 0
    assert "ran 2, already done 0, failed 0" in capsys.readouterr().out
    names = [cell["name"] for cell in json.loads((out / "study.json").read_text())]
    assert [read_summary(out / name)["config"]["plugins"] for name in names] == [[str(plugin)]] * 2
    report = (out / "report.md").read_text()
    assert "| fedavg |" in report and "| my-method |" in report


@pytest.mark.parametrize("seeds", [0, 101])
def test_seeds_outside_what_a_study_can_run_are_refused_at_once(seeds):
    with pytest.raises(ConfigError, match=f"--seeds must be between 1 and 100 .*, got {seeds}"):
        preset_cells("full", seeds)


def test_dry_run_names_missing_data_and_how_to_do_without_it(tmp_path, capsys, data_env):
    assert main(["study", "--dry-run", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert f"missing data: fashion-mnist is not in {data_env}" in out and "--datasets mnist" in out
    assert main(["study", "--dry-run", "--datasets", "mnist", "--out", str(tmp_path / "s")]) == 0
    assert "missing data" not in capsys.readouterr().out


def test_a_missing_dataset_stops_the_study_before_any_run_and_says_how_to_skip_it(tmp_path, capsys, data_env,
                                                                                  monkeypatch):
    import mpfl.data

    monkeypatch.setattr(mpfl.data, "_download_dataset", lambda key, roots: (_ for _ in ()).throw(OSError("offline")))
    calls = counting(monkeypatch)
    assert main(["study", "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert calls == [] and "fashion-mnist" in err and "--datasets mnist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_ctrl_c_keeps_the_finished_cells_and_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    real, calls = mpfl.sim.simulate, []

    def stopped_at_the_second_cell(cfg, out, **kw):
        calls.append(out)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, out, **kw)

    monkeypatch.setattr(mpfl.sim, "simulate", stopped_at_the_second_cell)
    monkeypatch.setattr(mpfl.study, "preset_cells", lambda *args, **kw: CELLS)
    out = tmp_path / "s"
    assert main(["study", "--quiet", "--jobs", "1", "--out", str(out)]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert f"interrupted; the finished cells are kept in {out}: run the same mpfl study command again" in err
    monkeypatch.setattr(mpfl.sim, "simulate", real)
    assert main(["study", "--quiet", "--jobs", "1", "--out", str(out)]) == 0
    assert "ran 1, already done 1, failed 0" in capsys.readouterr().out


def test_a_second_study_on_a_folder_a_study_is_running_in_is_refused_and_touches_nothing(tmp_path, monkeypatch):
    """Two studies on one folder would each move the other's running cells aside and run them again,
    writing both into one cell's records."""
    from mpfl.locks import RunLock

    aside = tmp_path / cell_name(CELLS[0].config())
    aside.mkdir()
    (aside / "rounds.jsonl").write_text('{"step": 1}\n')
    calls = counting(monkeypatch)
    with RunLock(tmp_path, kind="study"), pytest.raises(RunDirError, match=f"study folder '{tmp_path}' is in use by "
                                                                            r"process \d+ \(an mpfl study running there\)"):
        run_study(CELLS, tmp_path, quiet=True)
    assert calls == [] and (aside / "rounds.jsonl").is_file() and not list(tmp_path.glob("*.incomplete-*"))


def test_an_unfinished_cell_an_mpfl_run_is_writing_is_not_moved_aside(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    cell = tmp_path / cell_name(CELLS[0].config())
    cell.mkdir()
    (cell / "config.toml").write_text("")
    calls = counting(monkeypatch)
    fd = os.open(cell / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RunDirError, match="is in use by"):
            run_study([CELLS[0]], tmp_path, quiet=True)
    finally:
        os.close(fd)
    assert calls == [] and cell.is_dir() and not list(tmp_path.glob("*.incomplete-*"))


def test_a_finished_cell_whose_records_disagree_is_named_in_the_studys_report(study, tmp_path, capsys):
    out = tmp_path / "study"
    shutil.copytree(study[0], out)
    damaged = out / cell_name(CELLS[0].config())
    log = damaged / "rounds.jsonl"
    log.write_text(log.read_text() * 2)  # two processes' records interleaved in one cell
    run_study(CELLS, out)
    assert f"left out of the report: {damaged.name}: " in capsys.readouterr().err
    text = (out / "report.md").read_text()
    assert damaged.name in text and "1 run in 1 group" in text


def test_the_plan_prints_a_registered_name_that_reads_as_markup_as_it_is(tmp_path):
    import io

    from rich.console import Console

    from mpfl.data import register_dataset
    from mpfl.study import print_plan

    register_dataset("odd[red]set", lambda data_dir: None)  # the plan only names it
    cells = [cell for cell in preset_cells("quick", datasets=["odd[red]set"]) if cell.group == "main"][:1]
    out = io.StringIO()
    print_plan(cells, tmp_path, Console(file=out, width=300))
    assert "odd[red]set" in out.getvalue() and cell_name(cells[0].config()) in out.getvalue()


def test_a_cells_progress_line_shows_a_name_that_reads_as_markup_as_it_is(tmp_path):
    import io

    from rich.console import Console
    from rich.progress import Progress, TextColumn

    from mpfl.study import RoundLines

    out = io.StringIO()
    path = str(tmp_path / "mpfl-odd[red]set-sp0.9")
    with Progress(TextColumn("{task.description}"), console=Console(file=out, width=200)) as progress:
        RoundLines(progress, {path: Config()}).show(path, "mask", 1, None)
        progress.refresh()
    assert "mpfl-odd[red]set-sp0.9" in out.getvalue()
