"""The `mpfl` command end to end: a short run writes its records; bad input stops before any work."""

import json

import pytest

from mpfl.cli import main
from mpfl.config import ATTACKS, Config
from mpfl.records import read_rounds, read_summary

SMALL = ["--nodes", "3", "--rounds", "2", "--mask-rounds", "2", "--train-samples", "1200", "--test-samples", "300",
         "--threads", "1", "--quiet"]


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


def test_run_help_lists_each_flag_with_its_default_and_choices(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--")}
    assert "faults.attack (default none; one of " + ", ".join(ATTACKS) + ")" in lines["--attack"]
    assert "train.lr (default 0.05)" in lines["--lr"] and "prune.sparsity (default 0.9)" in lines["--sparsity"]
    assert "one of" not in lines["--nodes"]
