"""The `mpfl` command end to end: a short run writes its records; bad input stops before any work."""

import contextlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import mpfl
from conftest import RECORD_KEYS, bits
from mpfl.cli import main
from mpfl.config import ATTACKS, FIELD_SECTIONS, Config, field_help
from mpfl.export import load_final
from mpfl.records import read_rounds, read_summary

SMALL = ["--nodes", "3", "--rounds", "2", "--mask-rounds", "2", "--train-samples", "1200", "--test-samples", "300",
         "--threads", "1", "--workers", "1", "--quiet"]  # one process: worker start-up would dominate runs this small


def test_run_writes_config_rounds_csv_and_summary(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--out", str(out), "--seed", "3"]) == 0
    cfg = Config.from_toml(out / "config.toml")
    assert cfg.seed == 3 and cfg.nodes == 3
    rounds = read_rounds(out)
    assert [r["phase"] for r in rounds] == ["mask", "mask", "train", "train"]
    csv_lines = (out / "rounds.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(rounds)
    assert csv_lines[0].startswith("step,phase,round,method,seed,accuracy")
    summary = read_summary(out)
    assert summary["seed"] == 3 and summary["config"] == cfg.to_dict()
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rounds)
    assert summary["final_accuracy"] == rounds[-1]["accuracy"]


def test_config_file_with_flag_overrides(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('method = "fedavg"\nnodes = 3\nrounds = 1\nthreads = 1\n[data]\ntrain_samples = 600\ntest_samples = 100\n'
                    '[train]\nlr = 0.01\n')
    out = tmp_path / "run"
    assert main(["run", "--config", str(path), "--lr", "0.02", "--out", str(out), "--quiet"]) == 0
    cfg = Config.from_toml(out / "config.toml")
    assert cfg.method == "fedavg" and cfg.train.lr == 0.02 and cfg.data.train_samples == 600


def test_flags_replace_bad_values_of_the_file_and_errors_about_the_file_name_it(tmp_path, capsys):
    path = tmp_path / "exp.toml"
    path.write_text('nodes = "four"\n[train]\nlr = -5.0\n')
    out = tmp_path / "run"
    assert main(["run", "--config", str(path), *SMALL, "--lr", "0.02", "--out", str(out)]) == 0
    cfg = Config.from_toml(out / "config.toml")
    assert cfg.nodes == 3 and cfg.train.lr == 0.02
    assert main(["run", "--config", str(path), *SMALL, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"lr = -5.0 must be > 0 (set in the config file {str(path)!r})" in err.replace("\n", " ")
    assert not (tmp_path / "r").exists()
    path.write_text("rounds = 20\n")  # "rounds" also appears in the message below, which is about a flag
    assert main(["run", "--config", str(path), *SMALL, "--mask-average-from", "-9", "--out", str(tmp_path / "r")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--mask-average-from = -9 counts back past the first of 2 mask rounds" in err and "config file" not in err
    path.write_text("[trainn]\nlr = 0.1\n")  # a misspelt section is the file's too
    assert main(["run", "--config", str(path), *SMALL, "--out", str(tmp_path / "r")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"unknown config key 'trainn'. Did you mean 'train'? (set in the config file {str(path)!r})" in err


def test_resuming_from_another_folder_says_where_relative_paths_are_read(tmp_path, capsys, monkeypatch):
    import torch

    from mpfl.models import build_model
    from mpfl.sim import simulate

    monkeypatch.chdir(tmp_path)
    torch.save(build_model("mlp", (1, 28, 28), 10).state_dict(), "init.pt")

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(Config().with_overrides({"init": "init.pt", "nodes": 3, "train_samples": 900, "test_samples": 100,
                                          "mask_rounds": 1, "rounds": 1}), tmp_path / "run", on_round=stop)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["run", "--resume", str(tmp_path / "run")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "init = 'init.pt': no such file" in err and "names 'init.pt' relative to the folder the run was started in" in err
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", str(tmp_path / "run"), "--quiet"]) == 0


def test_a_run_without_out_that_stops_before_writing_leaves_no_folder_and_one_that_runs_its_own(tmp_path, capsys,
                                                                                                   monkeypatch):
    import mpfl.sim

    monkeypatch.chdir(tmp_path)
    real = mpfl.sim.simulate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as a Ctrl-C while the workers start

    monkeypatch.setattr(mpfl.sim, "simulate", interrupted)
    assert main(["run", *SMALL]) == 130
    assert "interrupted before the run started; nothing was written" in capsys.readouterr().err
    assert list((tmp_path / "runs").iterdir()) == []
    monkeypatch.setattr(mpfl.sim, "simulate", real)
    assert main(["run", *SMALL, "--rounds", "1", "--mask-rounds", "1"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "summary.json").is_file()


def test_an_existing_run_directory_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"precious": True}))
    assert main(["run", *SMALL, "--out", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text()) == {"precious": True}


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "sparsity = 1.5 must be < 1"),
    (["--consensus", "majority"], "consensus = 'majority' is not one of"),
    (["--config", "/no/such.toml"], "does not exist"),
    (["--nodes", "ten"], "nodes must be of type int"),
])
def test_bad_input_gives_a_clear_error_and_exit_code_2(tmp_path, capsys, args, message):
    assert main(["run", *args, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "r").exists()


def test_partition_summary(capsys):
    assert main(["partition", "--nodes", "4", "--partition", "dirichlet", "--alpha", "0.1", "--train-samples", "2000"]) == 0
    out = capsys.readouterr().out
    assert "node" in out and len([line for line in out.splitlines() if line.strip()]) >= 5


def test_partition_names_flags_without_effect_as_run_does(tmp_path, capsys):
    assert main(["partition", "--nodes", "2", "--train-samples", "100", "--alpha", "0.3", "--data-dir",
                 str(tmp_path)]) == 0
    printed = capsys.readouterr()
    err = " ".join(printed.err.split())
    assert "note: --alpha has no effect with --partition iid" in err
    assert f"note: --data-dir {tmp_path} does not hold the mnist files" in err and "note" not in printed.out


def test_run_help_lists_each_flag_with_its_description_default_and_choices(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith("--")}
    flat = " ".join(out.split())
    for name, text in field_help().items():
        assert f"--{name.replace('_', '-')} " in flat and " ".join(text.split()) in flat, name
    assert "what the malicious nodes do (default none; one of " + ", ".join(ATTACKS) + ") [faults]" in lines["--attack"]
    assert "(default 0.05) [train]" in lines["--lr"] and "(default 1)" in lines["--threads"]
    assert "one of" not in lines["--nodes"]


def test_every_config_field_has_a_one_line_description():
    texts = field_help()
    assert set(texts) == set(FIELD_SECTIONS)
    assert all(text and "\n" not in text and len(text) < 200 for text in texts.values())


def test_partition_help_shows_only_its_own_flags(capsys):
    with pytest.raises(SystemExit):
        main(["partition", "--help"])
    out = capsys.readouterr().out
    assert "--alpha" in out and "--nodes" in out and "--seed" in out
    assert "--lr" not in out and "--sparsity" not in out and "--attack" not in out


@pytest.mark.parametrize("argv", [["run", "--out", ""], ["run", "--config", ""], ["run", "--data-dir", ""],
                                  ["run", "--resume", ""], ["export", "x", "--out", ""], ["report", "x", "--json", ""]])
def test_an_empty_path_is_refused_before_anything_runs(argv, tmp_path, capsys, monkeypatch):
    """An unset shell variable gives "": it would mean the current folder (an export into it) or the default."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    flag = argv[argv.index("") - 1]
    assert exc.value.code == 2 and f"{flag} is empty; give a path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["report", ""], ["report", "runs", ""], ["export", ""]])
def test_an_empty_run_dir_is_refused_before_anything_runs(argv, tmp_path, capsys, monkeypatch):
    """`mpfl report "$RUN"` with RUN unset wrote a report into the current folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "a RUN_DIR is empty; give the path of a run directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"mpfl {mpfl.__version__}"
    done = subprocess.run([sys.executable, "-m", "mpfl", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"mpfl {mpfl.__version__}"


def test_version_help_and_bad_values_answer_without_importing_torch():
    """Only the commands that run something import torch (seconds of start-up): `mpfl --version`, the
    help of every command but export (whose formats come from the export module) and a run's bad flag
    value answer at once."""
    code = ("import contextlib, io, sys; from mpfl.cli import main\n"
            "for argv in (['--version'], ['--help'], *([c, '--help'] for c in ('run', 'partition', 'report', 'study'))):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "print(main(['run', '--nodes', '0']), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "2 False" and "--nodes = 0 must be >= 1" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate 0.1. Did you mean --lr?"),
    (["--nodse", "3"], "Did you mean --nodes?"),
])
def test_unknown_flags_are_one_line_with_a_suggestion(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["run", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_run_flag_given_to_partition_says_where_it_belongs(capsys):
    with pytest.raises(SystemExit):
        main(["partition", "--lr", "0.1"])
    assert "--lr is a flag of mpfl run" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--lr", "fast"], "--lr must be of type float, got 'fast'"),
    (["--min-nodes", "5", "--nodes", "3"], "--min-nodes = 5 is larger than --nodes = 3"),
    (["--partition", "shards", "--shards", "700"], "shards = 700 per node for --nodes = 3"),
    (["--exclude", "1.weight", "--exclude", "9.*"], "--exclude '9.*' matches no prunable layer"),
    (["--threads", "100000"], "--threads = 100000 must be <= 1024"),
    (["--value-limit", "-1e3"], "--value-limit = -1000.0 must be > 0"),
    (["--extrapolate", "-.5"], "--extrapolate = -0.5 must be > 0"),
    (["--layer-floor", "0.5"], "--layer-floor = 0.5 keeps more of every layer than sparsity = 0.9 leaves"),
    (["--aggregator", "krum", "--byzantine", "3"], "--byzantine = 3 allows for at least as many malicious nodes"),
    (["--data-dir", __file__], "is a file; give the folder that holds the datasets"),
])
def test_errors_name_the_flag_that_was_given(tmp_path, capsys, args, message):
    assert main(["run", *SMALL, *args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_round_left_without_replies_by_simulated_faults_says_which_and_warns_nothing(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["run", *SMALL, "--dropout", "1", "--out", str(tmp_path / "r")]) == 2
    assert [str(w.message) for w in caught] == []
    err = capsys.readouterr().err
    assert "only 0 valid replies" in err and "simulates faults (--dropout = 1): lower them" in err
    assert "--min-nodes" not in err  # already at its lowest, 1
    assert main(["run", *SMALL, "--dropout", "1", "--min-nodes", "2", "--out", str(tmp_path / "s")]) == 2
    assert "simulates faults (--dropout = 1): lower them or --min-nodes" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["1", "2"])  # an error in a worker process reaches the user as it is
def test_a_diverged_run_says_to_lower_the_learning_rate(tmp_path, capsys, workers):
    args = _without(SMALL, "--workers") + ["--workers", workers]
    assert main(["run", *args, "--lr", "50", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    err = " ".join(err.split())
    assert "refusing to encode NaN or Inf values" in err and "training diverged: lower the learning rate (--lr)" in err


def test_exclude_takes_repeated_flags_and_commas(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--exclude", "1.weight", "--exclude", "3.*,1.*", "--out", str(out)]) == 0
    assert Config.from_toml(out / "config.toml").prune.exclude == ("1.weight", "3.*", "1.*")
    final = load_final(out)
    assert list(final.mask) == ["5.weight"] and not final.mask["5.weight"].all()


def test_path_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile" / "sub", tmp_path / "afile"):
        assert main(["run", *SMALL, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "choose another --out" in err and len(err.strip().splitlines()) == 1
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def _unwritable(folder: Path) -> bool:
    try:
        (folder / "probe").mkdir()
    except OSError:
        return True
    (folder / "probe").rmdir()
    return False


def test_unwritable_places_are_one_line_errors(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    where = next((d for d in (locked, Path("/sys")) if _unwritable(d)), None)  # root may write anywhere but /sys
    if where is None:
        pytest.skip("no unwritable folder to try")
    assert main(["run", *SMALL, "--out", str(where / "run")]) == 2
    err = capsys.readouterr().err
    assert "cannot create run directory" in err and "choose another --out" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "runs").mkdir()
    assert main(["run", *SMALL, "--out", str(tmp_path / "runs" / "one")]) == 0
    assert main(["report", str(tmp_path / "runs"), "--out", str(where / "report")]) == 2
    err = capsys.readouterr().err
    assert "choose another path" in err and len(err.strip().splitlines()) == 1


def test_a_full_disk_mid_run_says_to_free_space_and_resume(tmp_path, capsys, monkeypatch):
    import errno

    from mpfl import sim

    save, saved = sim.save_checkpoint, []

    def filling(folder, *args, **kwargs):
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "checkpoint.npz"))
        saved.append(save(folder, *args, **kwargs))

    out = tmp_path / "run"
    monkeypatch.setattr(sim, "save_checkpoint", filling)
    assert main(["run", *SMALL, "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err == (f"error: cannot use '{out / 'checkpoint.npz'}': No space left on device; free some space, then "
                   f"continue with: mpfl run --resume {out}")
    monkeypatch.setattr(sim, "save_checkpoint", save)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0


# --------------------------------------------------------------------------- output


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`mpfl` in a fresh process with pipes for stdout and stderr (so no terminal is attached)."""
    return subprocess.run([sys.executable, "-m", "mpfl", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_without_a_terminal_each_round_is_a_line_on_stderr_and_the_summary_goes_to_stdout(tmp_path):
    loud = [a for a in SMALL if a != "--quiet"]
    done = _run("run", *loud, "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("final accuracy ") and len(done.stdout.strip().splitlines()) == 1
    rounds = [line for line in done.stderr.splitlines() if line.startswith("round")]
    assert [line.split()[1] for line in rounds] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(" eta " in line for line in rounds) and rounds[-1].endswith("eta 0 s")
    assert "acc " in rounds[-1] and "density 0.100" in rounds[-1]


def test_more_threads_than_cores_gets_a_note(tmp_path):
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    loud = [a for a in SMALL if a not in ("--quiet",)]
    done = _run("run", *loud, "--threads", str(cores + 1), "--rounds", "0", "--mask-rounds", "1",
                "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert f"note: --threads {cores + 1} is more than the {cores} cores" in " ".join(done.stderr.split())


def test_more_worker_threads_than_cores_get_a_note(tmp_path, capsys, monkeypatch):
    import mpfl.parallel

    monkeypatch.setattr(mpfl.parallel, "available_cores", lambda: 2)
    loud = [a for a in _without(SMALL, "--workers") if a != "--quiet"]
    assert main(["run", *loud, "--workers", "3", "--rounds", "0", "--mask-rounds", "1", "--out", str(tmp_path / "a")]) == 0
    assert ("note: 3 worker processes x 1 torch thread is more than the 2 cores this process may use: the extra "
            "processes only take turns on them (--workers 2 gives the same results)") in " ".join(capsys.readouterr().err.split())
    assert main(["run", *loud, "--workers", "2", "--rounds", "0", "--mask-rounds", "1", "--out", str(tmp_path / "b")]) == 0
    assert "worker processes x" not in capsys.readouterr().err


def test_json_log_format_for_machines(tmp_path):
    loud = [a for a in SMALL if a != "--quiet"]
    done = _run("run", *loud, "--log-format", "json", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    start, *events = [json.loads(line) for line in done.stderr.splitlines()]  # every line is one JSON object
    assert start == {"event": "start", "method": "mpfl", "dataset": "mnist", "model": "mlp", "nodes": 3, "seed": 0,
                     "threads": 1, "workers": 1, "run_dir": str(tmp_path / "run")}
    assert [e["step"] for e in events] == [1, 2, 3, 4] and all(e["total_steps"] == 4 for e in events)
    assert all(e["event"] == "round" for e in events)
    assert events[-1]["eta_s"] == 0 and events[-1]["accuracy"] == read_rounds(tmp_path / "run")[-1]["accuracy"]
    summary = json.loads(done.stdout)
    assert summary["run_dir"] == str(tmp_path / "run") and summary == {"run_dir": summary["run_dir"],
                                                                      **_without_config(read_summary(tmp_path / "run"))}


def test_notes_are_json_events_in_a_json_log(tmp_path):
    loud = [a for a in SMALL if a != "--quiet"]
    done = _run("run", *loud, "--log-format", "json", "--alpha", "0.1", "--rounds", "0", "--mask-rounds", "1",
                "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    start, note, *rounds = [json.loads(line) for line in done.stderr.splitlines()]
    assert start["event"] == "start" and [r["step"] for r in rounds] == [1]
    assert note == {"event": "note", "message": "note: --alpha has no effect with --partition iid"}


def test_a_tensorboard_path_that_cannot_be_a_folder_is_refused_before_the_run_starts(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    (tmp_path / "afile").write_text("mine\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.toml").write_text("nodes = 3\n")
    for bad, says in [(tmp_path / "afile", "is a file; give a folder for the event files"),
                      (tmp_path / "other", "is a run directory; give a folder of its own"),
                      (tmp_path / "other" / "tensorboard", f"is inside the run directory {tmp_path / 'other'}; give"),
                      (tmp_path / "afile" / "tb", f"cannot write in {tmp_path / 'afile'}; choose another folder")]:
        assert main(["run", *SMALL, "--tensorboard", str(bad), "--out", str(tmp_path / "run")]) == 2
        assert says in capsys.readouterr().err
        assert not (tmp_path / "run").exists() and (tmp_path / "afile").read_text() == "mine\n"


def _without_config(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "config"}


def test_the_checkpoint_is_removed_at_the_end_unless_kept(tmp_path):
    assert main(["run", *SMALL, "--out", str(tmp_path / "a")]) == 0
    assert not (tmp_path / "a" / "checkpoint.npz").exists() and (tmp_path / "a" / "final.npz").exists()
    assert main(["run", *SMALL, "--keep-checkpoint", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "checkpoint.npz").exists()


def test_tensorboard_events_hold_every_round(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["run", *SMALL, "--tensorboard", "--out", str(out)]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = read_rounds(out)
    tags = events.Tags()["scalars"]
    for tag in ("test/accuracy", "test/loss", "mask/density", "bytes/up", "bytes/down", "bytes/cumulative_up"):
        assert tag in tags
    assert [e.step for e in events.Scalars("bytes/up")] == [r["step"] for r in records]
    assert [e.value for e in events.Scalars("bytes/up")] == [float(r["bytes_up"]) for r in records]
    assert [e.value for e in events.Scalars("mask/density")] == pytest.approx([r["density"] for r in records])
    evaluated = [r for r in records if r["accuracy"] is not None]
    assert [e.step for e in events.Scalars("test/accuracy")] == [r["step"] for r in evaluated]
    assert [e.value for e in events.Scalars("test/accuracy")] == pytest.approx([r["accuracy"] for r in evaluated])


def test_tensorboard_directory_of_ones_choice(tmp_path):
    pytest.importorskip("tensorboard")
    assert main(["run", *SMALL, "--tensorboard", str(tmp_path / "tb"), "--out", str(tmp_path / "run")]) == 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_without_tensorboard_installed_the_flag_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(["run", *SMALL, "--tensorboard", "--out", str(tmp_path / "run")]) == 2
    assert 'pip install "mpfl[tensorboard]"' in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- memory


def test_a_run_that_cannot_fit_in_memory_is_refused_before_it_starts(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--nodes", "10000000", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "of memory" in err and "use at most --nodes" in err and "--no-memory-check" in err
    assert not out.exists()


def test_the_memory_check_compares_with_what_is_available(tmp_path, capsys, monkeypatch):
    import mpfl.resources

    small = {"nodes": 3, "rounds": 2, "mask_rounds": 2, "train_samples": 1200, "test_samples": 300, "workers": 1}
    estimate = mpfl.resources.estimate_run(Config().with_overrides(small))  # SMALL's config
    monkeypatch.setattr(mpfl.resources, "available_memory", lambda: estimate.total - 1)
    assert main(["run", *SMALL, "--out", str(tmp_path / "refused")]) == 2
    assert "use at most --nodes 2" in capsys.readouterr().err
    assert main(["run", *SMALL, "--no-memory-check", "--out", str(tmp_path / "forced")]) == 0
    monkeypatch.setattr(mpfl.resources, "available_memory", lambda: estimate.total)
    assert main(["run", *SMALL, "--out", str(tmp_path / "fits")]) == 0


def test_automatic_workers_lowered_to_fit_in_memory_are_said(tmp_path, capsys, monkeypatch):
    import mpfl.parallel
    import mpfl.resources

    monkeypatch.setattr(mpfl.parallel, "available_cores", lambda: 4)
    small = {"nodes": 3, "rounds": 2, "mask_rounds": 2, "train_samples": 1200, "test_samples": 300, "workers": 1}
    fits_one = mpfl.resources.estimate_run(Config().with_overrides(small)).total
    monkeypatch.setattr(mpfl.resources, "available_memory", lambda: fits_one)
    args = [a for a in _without(SMALL, "--workers") if a != "--quiet"]
    assert main(["run", *args, "--out", str(tmp_path / "run")]) == 0
    assert "note: 1 worker process instead of one per core, so that the run fits in the memory available" in \
        " ".join(capsys.readouterr().err.split())
    assert Config.from_toml(tmp_path / "run" / "config.toml").workers == 1
    monkeypatch.setattr(mpfl.resources, "available_memory", lambda: fits_one - 2**20)  # not even with one worker
    assert main(["run", *args, "--out", str(tmp_path / "refused")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "of memory" in err and "worker process instead" not in err  # refused, without a note that it fits
    assert "ask a share of the nodes per round (--fraction, and --mask-fraction for mask rounds)" in err


def _without(args: list[str], flag: str) -> list[str]:
    at = args.index(flag)
    return args[:at] + args[at + 2 :]


def test_run_trains_in_a_process_per_core_unless_told_and_gets_the_same_run(tmp_path):
    auto = [a for a in _without(SMALL, "--workers") if a != "--quiet"]
    done = _run("run", *auto, "--log-format", "json", "--out", str(tmp_path / "auto"))
    assert done.returncode == 0, done.stderr
    start = json.loads(done.stderr.splitlines()[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert start["workers"] == min(cores, 8, 3)  # --nodes 3 at --threads 1: a process per core, one per node at most
    assert Config.from_toml(tmp_path / "auto" / "config.toml").workers == 0
    assert main(["run", *SMALL, "--out", str(tmp_path / "one")]) == 0
    auto_final, one_final = load_final(tmp_path / "auto"), load_final(tmp_path / "one")
    assert bits(auto_final.weights.values()) == bits(one_final.weights.values())
    assert [{k: r.get(k) for k in RECORD_KEYS} for r in read_rounds(tmp_path / "auto")] == \
        [{k: r.get(k) for k in RECORD_KEYS} for r in read_rounds(tmp_path / "one")]


def test_workers_from_a_config_file_or_a_flag_win_over_the_run_default(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("workers = 1\n")
    assert main(["run", *_without(SMALL, "--workers"), "--config", str(path), "--rounds", "0", "--out",
                 str(tmp_path / "file")]) == 0
    assert Config.from_toml(tmp_path / "file" / "config.toml").workers == 1
    assert main(["run", *_without(SMALL, "--workers"), "--workers", "2", "--rounds", "0", "--out",
                 str(tmp_path / "flag")]) == 0
    assert Config.from_toml(tmp_path / "flag" / "config.toml").workers == 2
    assert Config().workers == 1  # the Python API stays in one process: scripts need no __main__ guard


def test_run_help_shows_the_run_default_of_workers(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--workers INT processes that train the nodes .*?\(default (\w+)\)", text)[1] == "0"


def test_with_json_logs_errors_and_refusals_are_json_too(tmp_path, capsys):
    assert main(["run", *SMALL, "--out", str(tmp_path / "done")]) == 0
    capsys.readouterr()
    for argv in (["run", "--model", "mlpp", "--log-format", "json"], ["run", "--bogus", "1", "--log-format=json"],
                 ["run", "--resume", str(tmp_path / "done"), "--log-format", "json"]):
        with pytest.raises(SystemExit) if "--bogus" in argv else contextlib.nullcontext():
            assert main(argv) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["event"] == "error", argv
        assert not json.loads(lines[0])["message"].startswith(("error", "mpfl")), argv  # the event names it an error
    assert "holds a finished run" in json.loads(lines[0])["message"]


def test_resuming_a_folder_that_does_not_exist_says_so(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path / "nope")]) == 2
    assert "does not exist; give the run directory of the run to continue" in capsys.readouterr().err


def test_rerunning_a_saved_config_elsewhere_names_its_relative_plug_in_path(tmp_path, capsys, monkeypatch):
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "myplug.py").write_text("import mpfl\n")
    monkeypatch.chdir(tmp_path / "here")
    assert main(["run", *SMALL, "--plugins", "myplug.py", "--rounds", "0", "--out", str(tmp_path / "run")]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["run", "--config", str(tmp_path / "run" / "config.toml"), "--out", str(tmp_path / "again")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "plug-in 'myplug.py' could not be imported" in err
    assert "names 'myplug.py' relative to the folder the run was started in: run from that folder" in err
    monkeypatch.chdir(tmp_path / "here")
    assert main(["run", "--config", str(tmp_path / "run" / "config.toml"), "--quiet", "--out",
                 str(tmp_path / "again")]) == 0


def test_a_data_dir_without_the_dataset_is_named_with_the_folder_the_data_come_from(tmp_path, data_env, capsys):
    from mpfl.notes import idle_flags

    typo = tmp_path / "dat"  # missing: MNIST comes from the next root that holds it, the copy in the package
    shipped = Path(mpfl.__file__).parent / "_data"
    assert idle_flags(Config().with_overrides({"data_dir": str(typo)}), ["data_dir"]) == [
        f"--data-dir {typo} does not hold the mnist files, so they are read from {shipped}; check the path if you meant "
        "your own copy"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "MNIST").symlink_to(shipped / "MNIST", target_is_directory=True)
    assert idle_flags(Config().with_overrides({"data_dir": str(tmp_path / "data")}), ["data_dir"]) == []
    assert main(["run", *_without(SMALL, "--quiet"), "--data-dir", str(typo), "--out", str(tmp_path / "r")]) == 0
    assert f"note: --data-dir {typo} does not hold the mnist files" in " ".join(capsys.readouterr().err.split())


def test_output_into_a_pipe_its_reader_closed_ends_quietly_as_cat_does():
    """`mpfl partition | head -1`: once head has exited, a write fails with a broken pipe; that is no error
    of the user's to report, so mpfl ends at once with SIGPIPE's exit code and says nothing."""
    script = ("import os, sys\nread, write = os.pipe()\nos.close(read)\nos.dup2(write, 1)\n"
              "from mpfl.cli import main\nsys.exit(main(['partition', '--nodes', '20', '--train-samples', '600']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (141, "")


def test_mpfl_run_prints_its_end_notes_on_stderr_after_the_summary(tmp_path, capsys, monkeypatch):
    import mpfl.notes

    monkeypatch.setattr(mpfl.notes, "FALL_FROM_BEST", -1.0)  # every run's final accuracy is "below" its best
    assert main(["run", *_without(SMALL, "--quiet"), "--out", str(tmp_path / "r")]) == 0
    out, err = capsys.readouterr()
    assert "final accuracy" in out and "note: the final accuracy" not in out
    assert "note: the final accuracy" in err
    assert main(["run", *SMALL, "--out", str(tmp_path / "q")]) == 0
    assert "note:" not in capsys.readouterr().err


def test_report_and_export_send_a_run_that_recorded_nothing_to_a_new_start_not_to_a_resume(tmp_path, capsys):
    """Faults on every node stop the run at its first round; a resume would only repeat that."""
    runs = tmp_path / "runs"
    assert main(["run", *SMALL, "--dropout", "1", "--out", str(runs / "faulty")]) == 2
    assert main(["run", *SMALL, "--out", str(runs / "fine")]) == 0
    capsys.readouterr()
    assert main(["report", str(runs), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert "faulty" in err and "stopped before its first round (nothing was recorded); a new run may start there" in err
    assert "--resume" not in err
    assert main(["export", str(runs / "faulty"), "--out", str(tmp_path / "export")]) == 2
    assert "stopped before its first round (nothing was recorded)" in capsys.readouterr().err


def test_the_folder_of_a_run_that_recorded_nothing_takes_a_new_run(tmp_path, capsys):
    """Once what stopped it at its first round is fixed, the same command runs again in the same
    folder: the stopped run left only its settings and identity, which the new run replaces."""
    from mpfl.records import CONFIG, RUN_JSON

    out = tmp_path / "run"
    assert main(["run", *SMALL, "--dropout", "1", "--out", str(out)]) == 2
    stopped = (out / RUN_JSON).read_text()
    assert sorted(p.name for p in out.iterdir()) == [CONFIG, RUN_JSON]
    assert main(["run", *SMALL, "--out", str(out)]) == 0
    assert "dropout = 0.0" in (out / CONFIG).read_text() and (out / RUN_JSON).read_text() != stopped
    assert (out / "summary.json").is_file()
def test_a_data_dir_whose_files_are_not_the_published_ones_is_noted(tmp_path, data_env):
    import gzip
    import shutil

    from mpfl.notes import idle_flags

    raw = tmp_path / "data" / "MNIST" / "raw"  # the right names, but another content (here: re-packed labels)
    shutil.copytree(Path(mpfl.__file__).parent / "_data" / "MNIST" / "raw", raw)
    labels = raw / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes()), mtime=0))
    assert idle_flags(Config().with_overrides({"data_dir": str(tmp_path / "data")}), ["data_dir"]) == [
        f"--data-dir {tmp_path / 'data'}: the md5 of train-labels-idx1-ubyte.gz is not the published one for mnist; "
        "check that the folder holds mnist"]


def test_flags_the_rest_of_the_config_leaves_without_effect_are_named_at_the_start(tmp_path, capsys):
    from mpfl.notes import idle_flags

    fedavg = Config().with_overrides({"method": "fedavg", "partition": "iid"})
    assert idle_flags(fedavg, ["alpha", "shards", "sparsity", "adapt_every", "lr"]) == [
        "--alpha has no effect with --partition iid", "--shards has no effect with --partition iid",
        "--sparsity has no effect with --method fedavg, which does not prune",
        "--adapt-every has no effect with --method fedavg, which does not prune"]
    mpfl = Config().with_overrides({"partition": "dirichlet", "consensus": "threshold"})
    assert idle_flags(mpfl, ["alpha", "tau", "percentile", "sparsity"]) == [
        "--percentile has no effect with --consensus threshold"]
    assert idle_flags(mpfl.with_overrides({"consensus": "histogram"}), ["tau", "percentile"]) == [
        "--tau has no effect with --consensus histogram"]
    for method in ("ssfl", "random"):
        assert idle_flags(mpfl.with_overrides({"method": method, "mask_rounds": 3}), ["mask_rounds"]) == [
            f"--mask-rounds has no effect with --method {method}, which finds its mask in one round"]
    assert idle_flags(mpfl.with_overrides({"mask_rounds": 3}), ["mask_rounds"]) == []
    few = {"nodes": 4, "fraction": 0.5}
    assert idle_flags(mpfl.with_overrides({**few, "min_nodes": 3}), ["fraction"]) == [
        "--fraction 0.5 of 4 nodes is fewer than --min-nodes 3, so every round asks 3 nodes"]
    assert idle_flags(mpfl.with_overrides({**few, "min_nodes": 2}), ["fraction"]) == []
    assert idle_flags(mpfl.with_overrides({"method": "ssfl", "mask_rounds": 1}), ["mask_rounds"]) == []
    label_skew = {"core_share": 0.2, "mask_average_from": 1}  # options of MPFL's own mask vote
    assert idle_flags(mpfl.with_overrides({**label_skew, "method": "centralized"}), list(label_skew)) == [
        "--core-share has no effect with --method centralized: no mask round of this run sends cores",
        "--mask-average-from has no effect with --method centralized, whose mask rounds average no values"]
    assert idle_flags(mpfl.with_overrides({"criterion": "filter", "core_share": 0.5}), ["core_share"]) == [
        "--core-share has no effect with filter masks: no mask round of this run sends cores"]
    assert idle_flags(mpfl.with_overrides(label_skew), list(label_skew)) == []
    search = {"extrapolate": 10.0, "mask_epochs": 3}  # MPFL's nodes' local mask search
    assert idle_flags(mpfl.with_overrides({**search, "method": "centralized"}), list(search)) == [
        f"--{flag} has no effect with --method centralized, whose nodes search no masks of their own"
        for flag in ("extrapolate", "mask-epochs")]
    assert idle_flags(mpfl.with_overrides({**search, "criterion": "saliency"}), list(search)) == [
        "--mask-epochs has no effect with --criterion saliency, which scores the weights instead of training them"]
    assert idle_flags(mpfl.with_overrides(search), list(search)) == []
    assert idle_flags(mpfl.with_overrides({"core_share": 0.0, "mask_average_from": 0}), list(label_skew)) == []
    assert idle_flags(mpfl.with_overrides({"options": ["layers=1,3", "tau=2"]}), ["options"]) == [
        "--options layers, tau has no effect: only plug-ins read options, and this run loads none (name them with "
        "--plugins)"]
    assert idle_flags(mpfl.with_overrides({"options": ["tau=2"], "plugins": ["numpy"]}), ["options"]) == []
    assert main(["run", *SMALL, "--method", "fedavg", "--alpha", "0.1", "--out", str(tmp_path / "r")]) == 0
    assert "note: --alpha has no effect with --partition iid" not in capsys.readouterr().err  # --quiet: no start line
    assert main(["run", *_without(SMALL, "--quiet"), "--method", "fedavg", "--alpha", "0.1", "--out",
                 str(tmp_path / "s")]) == 0
    assert "note: --alpha has no effect with --partition iid" in capsys.readouterr().err


def test_mask_flag_notes_follow_what_a_method_declares_about_mask_votes(monkeypatch):
    """A method that says its nodes send no mask votes gets the notes a built-in baseline gets; one that
    does not say (a plug-in's default) gets none, since no note can tell what it does."""
    from mpfl.methods import METHODS
    from mpfl.methods.base import MaskedMethod
    from mpfl.notes import idle_flags

    class Undeclared(MaskedMethod):
        name = "undeclared-test"

    class Voteless(Undeclared):
        name = "voteless-test"
        votes_on_masks = False

    for cls in (Undeclared, Voteless):
        monkeypatch.setitem(METHODS._entries, cls.name, cls)
    flags = {"extrapolate": 10.0, "vote_weighting": "samples"}
    assert idle_flags(Config().with_overrides({**flags, "method": "undeclared-test"}), list(flags)) == []
    assert idle_flags(Config().with_overrides({**flags, "method": "voteless-test"}), list(flags)) == [
        "--extrapolate has no effect with --method voteless-test, whose nodes search no masks of their own",
        "--vote-weighting has no effect with --method voteless-test, which takes no mask votes"]


def _record(phase: str, round_: int, accuracy: float | None) -> dict:
    return {"phase": phase, "round": round_, "accuracy": accuracy}


def test_a_final_accuracy_well_below_the_runs_best_is_noted_with_the_best_round():
    from mpfl.notes import end_notes

    records = [_record("mask", 1, None), _record("mask", 2, 0.90), _record("train", 1, 0.92),
               _record("train", 2, 0.95), _record("train", 3, 0.80)]
    fell = {"limited_counts": {}, "final_accuracy": 0.80, "best_accuracy": 0.95}
    momentum, plain = Config(), Config().with_overrides({"server_momentum": 0.0})
    [note] = end_notes(momentum, records, fell)
    assert note.startswith("the final accuracy, 80.00%, is 15.0 points below the run's best, 95.00% after train "
                           "round 2; final.npz and mpfl export hold the last round's weights. Server momentum (0.9)")
    assert end_notes(plain, records, fell) == [note.split(". Server momentum")[0]]
    early = [_record("mask", 1, 0.95), *records[2:3], _record("train", 2, 0.80)]
    assert "momentum" not in end_notes(momentum, early, fell)[0]  # the best was before momentum stepped
    assert end_notes(momentum, records, {**fell, "final_accuracy": 0.91}) == []  # 4 points: within a run's swing
    limited = end_notes(momentum, records[:4], {"limited_counts": {"2": 5000}, "final_accuracy": 0.95,
                                                "best_accuracy": 0.95})
    assert [n.split(" claimed")[0] for n in limited] == ["1 of 10 nodes"] and "raise --count-limit" in limited[0]
    forged = end_notes(momentum, records[:4], {"limited_counts": {"2": 5000}, "malicious_nodes": [2, 7],
                                               "final_accuracy": 0.95, "best_accuracy": 0.95})
    assert forged[0].endswith("(summary.json: limited_counts); all of them the run's malicious nodes")


def test_a_density_far_from_the_share_of_the_model_kept_is_noted():
    from mpfl.notes import end_notes

    records = [_record("train", 1, 0.9)]
    summary = {"limited_counts": {}, "final_accuracy": 0.9, "best_accuracy": 0.9, "final_density": 0.1,
               "params_kept": 197_410, "params_dense": 199_210}
    excluded = Config().with_overrides({"exclude": ["1.weight"]})
    assert end_notes(excluded, records, summary) == [
        "density 0.100 is that of the prunable weights; with the layers --exclude keeps dense the model keeps 99.1% "
        "of its parameters (197,410 of 199,210: summary.json's params_kept)"]
    assert end_notes(Config(), records, summary)[0].startswith(
        "density 0.100 is that of the prunable weights; with the layers the method leaves dense")
    assert end_notes(excluded, records, {**summary, "params_kept": 30_000}) == []  # 15 %: within twice the density
    assert end_notes(excluded, records, {**summary, "params_kept": 10_000}) == []  # 5 %: within half the density
    filters = {**summary, "final_density": 0.095, "params_kept": 20_492, "params_dense": 1_663_370}
    assert end_notes(Config().with_overrides({"criterion": "filter"}), records, filters) == [
        "density 0.095 is the share of the filters' weights kept; a dropped filter also drops the weights of the next "
        "layer that read its output, so the shrunk model keeps 1.2% of its parameters (20,492 of 1,663,370: "
        "summary.json's params_kept); a lower --sparsity keeps more"]



def test_attack_and_robustness_flags_the_run_leaves_without_effect_or_weak_are_named():
    from mpfl.notes import idle_flags

    def notes(given: list[str], **overrides) -> list[str]:
        return idle_flags(Config().with_overrides(overrides), given)

    assert notes(["attack"], method="fedavg", malicious=1, attack="inverted-mask") == [
        "--attack inverted-mask has no effect with --method fedavg: it forges the masks nodes vote with, and this "
        "method takes no votes"]
    assert notes(["attack"], malicious=1, attack="inverted-mask") == []  # mpfl's nodes vote
    assert notes(["attack"], method="fedavg", malicious=1, attack="sign-flip") == []  # every method sends values
    assert notes(["attack_scale"], malicious=1, attack="sign-flip", attack_scale=3) == [
        "--attack-scale has no effect with --attack sign-flip (only --attack scale reads it)"]
    assert notes(["malicious"], nodes=4, malicious=2, attack="sign-flip") == [
        "--malicious 2 of 4 nodes leaves no honest majority, which every robust rule needs to tell the honest nodes "
        "apart (docs/trust.md)"]
    assert notes(["malicious"], nodes=5, malicious=2, attack="sign-flip") == []
    assert notes(["malicious"], nodes=4, malicious=2, attack="silent") == []  # silent nodes leave honest replies only
    assert notes(["attack_samples"], attack_samples=100) == [
        "--attack-samples has no effect without --malicious: only malicious nodes forge their counts"]
    assert notes(["trim"], trim=0.3) == ["--trim has no effect with --aggregator mean"]
    assert notes(["trim"], trim=0.3, vote_weighting="trimmed") == []  # the votes are trimmed
    assert notes(["byzantine"], byzantine=2, aggregator="median") == ["--byzantine has no effect with --aggregator median"]
    assert notes(["vote_weighting"], method="fedavg", vote_weighting="samples") == [
        "--vote-weighting has no effect with --method fedavg, which takes no mask votes"]
    # int(0.2 x 4) = 0: neither the trimmed mean nor trimmed votes leave anyone out of 4 nodes
    none_trimmed = ["--trim 0.2 trims none of the 4 nodes a round asks (int(trim x nodes) from each end); raise --trim "
                    "to at least 0.25 or ask more nodes"]
    assert notes(["aggregator"], nodes=4, aggregator="trimmed-mean") == none_trimmed
    assert notes(["vote_weighting", "trim"], nodes=4, vote_weighting="trimmed") == none_trimmed
    assert notes(["aggregator"], nodes=5, aggregator="trimmed-mean") == []
    # int(0.33 x 3) = 0 too, so the advice rounds up; of 2 nodes no --trim below 0.5 trims any
    assert notes(["trim"], nodes=6, fraction=0.5, aggregator="trimmed-mean", trim=0.33)[0].endswith(
        "raise --trim to at least 0.34 or ask more nodes")
    assert notes(["aggregator"], nodes=4, fraction=0.5, aggregator="trimmed-mean")[0].endswith(
        "ask more nodes (no --trim below 0.5 trims any of 2)")
    # the trimmed votes and an averaged mask round ask every node: trimming there has an effect
    sampled = {"nodes": 6, "fraction": 0.5, "mask_fraction": 1.0}
    assert notes(["trim"], **sampled, consensus="threshold", vote_weighting="trimmed") == []
    assert notes(["aggregator"], **sampled, aggregator="trimmed-mean") == []
    assert notes(["aggregator", "byzantine"], nodes=5, aggregator="krum", byzantine=2) == [
        "Krum withstands 2 malicious nodes (--byzantine) only with at least 7 replies a round, and a training round "
        "here asks 5"]
    assert notes(["aggregator"], **sampled, aggregator="krum") == [
        "Krum withstands 1 malicious node (--byzantine) only with at least 5 replies a round, and a training round here "
        "asks 3"]
    assert notes(["aggregator", "byzantine"], nodes=10, aggregator="krum", byzantine=3) == []


def test_paths_and_messages_are_printed_as_given_not_read_as_rich_markup_or_emoji_codes(tmp_path, capsys):
    """A path holding ":x:" (an emoji code to rich) or "[/]" (a closing tag) is printed as typed: not as
    an emoji, not dropped, and not as a rich.errors.MarkupError traceback instead of the command's own line."""
    odd = tmp_path / "a:x:b"
    assert main(["report", str(odd)]) == 2
    assert capsys.readouterr().err == f"error: no run directory found: '{odd}' is missing (no such file or folder)\n"
    study = tmp_path / "s[" / "]x"  # the path s[/]x
    assert main(["study", "--dry-run", "--out", str(study), "--datasets", "mnist"]) == 0
    assert f"-> {study}\n" in capsys.readouterr().err


@pytest.mark.parametrize("argv, wanted", [
    (["run", "--log-format", "json"], True), (["run", "--log-format=json"], True), (["run", "--log", "json"], True),
    (["run", "--log-form=json"], True), (["run", "--log-format", "json", "--log-format", "text"], False),
    (["run", "--log-format", "text", "--log", "json"], True), (["run", "--lo", "json"], False), (["run"], False),
    (["run", "--log-format"], False),
])
def test_json_errors_follow_the_log_flag_as_argparse_reads_it(argv, wanted):
    from mpfl._launch import json_log_requested

    assert json_log_requested(argv) is wanted


def test_an_argument_error_under_a_shortened_log_flag_is_json(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--log", "json", "--bogus"])
    assert json.loads(capsys.readouterr().err)["event"] == "error"


def test_study_takes_plugins_as_mpfl_run_does(tmp_path, capsys):
    """Comma-separated or repeated, each checked with the same message."""
    empty = tmp_path / "empty.py"
    empty.write_text("")
    errors = []
    for command in (["run", "--out", str(tmp_path / "r")], ["study", "--dry-run", "--out", str(tmp_path / "s")]):
        assert main([*command, "--plugins", f"{empty},a b", "--plugins", "c"]) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and "plug-in 'a b' is neither a module name" in errors[0]
