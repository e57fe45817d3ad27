"""The benchmark scripts: every one takes --quick and --json; the bare loop they compare with trains
what the run trains; the label-skew benchmark's grid: `--set` reaches every run and keeps its cached
cells apart."""

import subprocess
import sys

import pytest

from conftest import BENCHMARKS, benchmark_module, shown_tick_labels
from mpfl.config import Config


@pytest.fixture(scope="module")
def noniid():
    return benchmark_module("noniid")


def test_set_values_are_read_as_json_where_they_parse(noniid):
    assert noniid.setting("server_momentum=0.9") == ("server_momentum", 0.9)
    assert noniid.setting("exclude=[\"5.weight\"]") == ("exclude", ["5.weight"])
    assert noniid.setting("scope=layer") == ("scope", "layer")
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        noniid.setting("server_momentum")


def test_a_setting_reaches_every_method_and_its_cells_are_cached_apart(noniid):
    plain = noniid.cells(["mnist"], ["shards2"], ["mpfl", "fedavg"], 1, None, False)
    changed = noniid.cells(["mnist"], ["shards2"], ["mpfl", "fedavg"], 1, None, False, {"server_momentum": 0.0})
    assert [Config().with_overrides(c["overrides"]).train.server_momentum for c in changed] == [0.0, 0.0]
    assert all("server_momentum" not in c["overrides"] for c in plain)
    assert {noniid.key(c) for c in plain}.isdisjoint(noniid.key(c) for c in changed)
    row = {k: changed[0][k] for k in ("dataset", "partition", "method", "seed", "settings")}  # as run_cell returns it
    assert noniid.key(row) == noniid.key(changed[0])
    older = {k: plain[0][k] for k in ("dataset", "partition", "method", "seed")}  # a cache line written before --set
    assert noniid.key(older) == noniid.key(plain[0])


HELP_OF_EACH = """
import contextlib, io, runpy, sys
sys.path.insert(0, sys.argv[1])
for script in sys.argv[2:]:
    sys.argv = [script, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        runpy.run_path(script, run_name="__main__")
    print(script, "--quick" in out.getvalue(), "--json" in out.getvalue())
"""


def test_every_benchmark_takes_quick_and_json():
    scripts = sorted(str(p) for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
    assert len(scripts) >= 10
    done = subprocess.run([sys.executable, "-c", HELP_OF_EACH, str(BENCHMARKS), *scripts], capture_output=True,
                          text=True, check=True, timeout=120)
    answers = [line.split() for line in done.stdout.splitlines()]
    assert [a[0] for a in answers] == scripts
    assert [a for a in answers if a[1:] != ["True", "True"]] == []


def test_the_bare_loop_trains_a_mask_rounds_epochs_in_mask_rounds_and_a_training_rounds_otherwise():
    """The simulator's nodes train `mask_epochs` epochs in a mask round (2 by default) and `epochs` in a
    training round; a bare loop of fewer batches would make the run's overhead look larger than it is."""
    import math

    from conftest import tiny_config
    from mpfl.experiment import Experiment
    from mpfl.models import build_model

    bare_round = benchmark_module("_common").bare_round
    exp = Experiment.from_config(tiny_config(mask_epochs=2, epochs=1, batch_size=32))
    model = build_model("mlp", exp.dataset.input_shape, exp.dataset.num_classes)
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    batches = math.ceil(exp.node_data(0).num_samples / 32)
    for phase, epochs in (("mask", 2), ("train", 1)):
        calls.clear()
        bare_round(model, exp, 1, [0], exp.w0, phase)
        assert len(calls) == epochs * batches and sum(calls) == epochs * exp.node_data(0).num_samples


def test_the_momentum_benchmark_reads_its_figures_from_the_training_rounds_of_the_run():
    from conftest import tiny_config
    from mpfl.sim import simulate

    momentum = benchmark_module("momentum")
    setting = {"nodes": 2, "train_samples": 400, "test_samples": 200, "mask_rounds": 1, "rounds": 3}
    row = momentum.run(setting, 0.9)
    records = simulate(tiny_config(**setting, server_momentum=0.9)).records
    training = [r for r in records if r["phase"] == "train"]
    assert row["final_accuracy"] == training[-1]["accuracy"]
    assert row["best_accuracy"] == max(r["accuracy"] for r in training)
    assert training[row["best_round"] - 1]["accuracy"] == row["best_accuracy"]
    assert row["lowest_loss"] == min(r["loss"] for r in training) <= row["final_loss"] == training[-1]["loss"]


@pytest.mark.parametrize("args, message", [
    (["--partitions", "shards"], "unknown partition shards; choose from iid, dir0.5, dir0.1, shards2"),
    (["--set", "alpha=0.05"], "--set alpha would relabel the grid's rows"),
])
def test_the_label_skew_benchmark_refuses_names_it_would_misread_before_running(args, message):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "noniid.py"), "--quick", *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr


def test_the_scale_plot_gives_the_checkpoint_an_axis_of_its_own_and_reads_plain_numbers(tmp_path, drawn):
    """Rows of an earlier run of the benchmark: a checkpoint of 5-6 MB drawn beside 650-1,600 MiB of memory
    lay flat along zero, and the log axes read 10^4 and 2x10^-1."""
    measured = ((10, 0.37, 0.21, 648, 5.0), (100, 0.92, 0.27, 648, 5.0), (1000, 1.17, 0.60, 673, 5.1),
                (10000, 1.74, 4.44, 1614, 6.4))
    rows = [{"nodes": n, "mask_rounds": 5, "rounds": 20, "setup_s": setup, "round_s": per_round, "peak_rss_mib": rss,
             "checkpoint_mb": checkpoint} for n, setup, per_round, rss, checkpoint in measured]
    benchmark_module("scale").plot(rows, tmp_path / "scale.png")
    (fig,) = drawn

    def axes_of(key):
        (ax,) = [ax for ax in fig.axes for line in ax.lines if list(line.get_ydata()) == [r[key] for r in rows]]
        return ax

    checkpoint, memory, seconds = axes_of("checkpoint_mb"), axes_of("peak_rss_mib"), axes_of("round_s")
    assert checkpoint is not memory and (checkpoint.get_ylabel(), memory.get_ylabel()) == ("MB", "MiB")
    assert checkpoint.get_ylim()[0] == 0 and 6.4 < checkpoint.get_ylim()[1] < 2 * 6.4
    for ax in fig.axes:
        assert list(shown_tick_labels(ax.xaxis).values()) == ["10", "100", "1,000", "10,000"]
    assert all(float(label) == pytest.approx(y) for y, label in shown_tick_labels(seconds.yaxis).items())
    assert len(shown_tick_labels(seconds.yaxis)) >= 3
