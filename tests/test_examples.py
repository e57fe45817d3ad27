"""The examples in examples/ run as documented."""

import runpy
from pathlib import Path

import numpy as np
import pytest

from mpfl.checkpoint import load_final
from mpfl.cli import main
from mpfl.config import Config
from mpfl.records import read_rounds, read_summary

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_custom_extensions_example_runs_with_the_users_own_pieces():
    module = runpy.run_path(str(EXAMPLES / "custom_extensions.py"))
    result = module["main"]()
    assert result.summary["config"]["data"]["dataset"] == "blobs"
    assert result.summary["final_accuracy"] > 0.9
    # the two-thirds rule keeps only entries that at least 2/3 of the nodes kept, so each mask round
    # removes at least the share the nodes were asked to remove
    assert result.summary["final_density"] <= 0.5 + 1e-9
    assert all(not (m & ~p).any() for p, m in zip(result.masks[0], result.mask))
    assert [w.shape for w in result.weights] == [(32, 16), (32,), (2, 32), (2,)]
    assert np.isfinite(np.concatenate([w.ravel() for w in result.weights])).all()


def test_custom_extensions_example_runs_twice_in_one_process():
    """A notebook reruns cells: registering the same names again must not stop the example."""
    module = runpy.run_path(str(EXAMPLES / "custom_extensions.py"))
    module["main"]()
    again = runpy.run_path(str(EXAMPLES / "custom_extensions.py"))
    assert again["main"]().summary["config"]["data"]["dataset"] == "blobs"


def test_custom_extensions_example_serves_mpfl_run_as_a_plug_in_as_its_docstring_says(tmp_path, monkeypatch):
    source = (EXAMPLES / "custom_extensions.py").read_text()
    command = " ".join(source.split('"""')[1].split("mpfl run ", 1)[1].split()).replace("\\ ", "")
    monkeypatch.chdir(EXAMPLES.parent)
    assert main(["run", *command.split(), "--quiet", "--out", str(tmp_path / "run")]) == 0
    summary = read_summary(tmp_path / "run")
    assert summary["config"]["data"]["dataset"] == "blobs" and summary["final_accuracy"] > 0.9


def test_the_example_config_runs_and_flags_override_it(tmp_path):
    cfg = Config.from_toml(EXAMPLES / "experiment.toml")
    assert cfg.data.partition == "dirichlet" and cfg.prune.sparsity == 0.9
    out = tmp_path / "run"
    assert main(["run", "--config", str(EXAMPLES / "experiment.toml"), "--seed", "1", "--train-samples", "1000",
                 "--test-samples", "200", "--mask-rounds", "1", "--rounds", "1", "--quiet", "--out", str(out)]) == 0
    saved = Config.from_toml(out / "config.toml")
    assert saved.seed == 1 and saved.data.alpha == 0.5 and saved.train.model == "mlp"


@pytest.mark.slow
def test_random_vote_example_runs_as_its_docstring_says_with_the_same_masks_in_worker_processes(tmp_path, monkeypatch):
    """A method with node work of its own: each docstring command (one process, then worker processes) runs,
    prunes on the schedule, and draws the same proposals, since they come from the plug-in's seeded stream."""
    source = (EXAMPLES / "random_vote.py").read_text()
    commands = [line.split("mpfl run ", 1)[1].split() for line in source.split('"""')[1].splitlines() if "mpfl run " in line]
    small = ["--nodes", "3", "--mask-rounds", "2", "--rounds", "1", "--train-samples", "1500", "--test-samples", "300",
             "--threads", "1", "--quiet"]
    monkeypatch.chdir(EXAMPLES.parent)
    outs = [tmp_path / str(i) for i in range(len(commands))]
    for command, out in zip(commands, outs):
        assert main(["run", *command, *small, "--out", str(out)]) == 0
    assert len(outs) == 2 and read_summary(outs[1])["config"]["workers"] == 2
    records = [read_rounds(out) for out in outs]
    assert [r["phase"] for r in records[0]] == ["mask", "mask", "train"]
    assert records[0][-1]["density"] == pytest.approx(0.1, abs=0.001)
    keys = ("step", "accuracy", "target_density", "density", "bytes_up", "bytes_down")
    assert [{k: r[k] for k in keys} for r in records[0]] == [{k: r[k] for k in keys} for r in records[1]]
    one, two = load_final(outs[0]).mask, load_final(outs[1]).mask
    assert all(np.array_equal(one[name], two[name]) for name in one)
