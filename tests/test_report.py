"""`mpfl report` on short runs: the table's numbers against the run records, and each plot a valid PNG."""

import json
import os
import re
import shutil
import struct
import warnings

import matplotlib.image
import numpy as np
import pytest

from conftest import round_record, shown_tick_labels, tiny_config
from mpfl.cli import main
from mpfl.records import read_rounds, read_summary
from mpfl.report import DPI, FIGSIZE, Group, Row, format_variant, group_runs, load_runs, plot_ablation, precision_groups
from mpfl.sim import simulate

SEEDS = (0, 1)
PLOTS = ("accuracy_vs_round-mnist-iid-mlp.png", "accuracy_vs_bytes-mnist-iid-mlp.png",
         "accuracy_vs_sparsity-mnist-iid-mlp.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for method in ("mpfl", "fedavg"):
        for seed in SEEDS:
            simulate(tiny_config(method=method, seed=seed, mask_rounds=1), root / f"{method}-{seed}")
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(runs), "--out", str(out), "--json", str(out / "table.json")]) == 0
    rows = {row["method"]: row for row in json.loads((out / "table.json").read_text())}
    return out, rows


def total_bytes(run_dir):
    return sum(r["bytes_up"] + r["bytes_down"] for r in read_rounds(run_dir))


def test_rows_match_the_run_records(runs, report):
    _, rows = report
    assert set(rows) == {"mpfl", "fedavg"}
    for method, row in rows.items():
        assert set(row) == set(Row.__annotations__)  # the JSON rows hold exactly the keys `Row` documents
        dirs = [runs / f"{method}-{seed}" for seed in SEEDS]
        summaries = [read_summary(d) for d in dirs]
        final = [s["final_accuracy"] for s in summaries]
        assert row["n"] == 2 and row["seeds"] == list(SEEDS)
        assert row["final_accuracy"] == pytest.approx(np.mean(final))
        assert row["final_accuracy_std"] == pytest.approx(np.std(final, ddof=1))
        assert row["best_accuracy"] == pytest.approx(np.mean([s["best_accuracy"] for s in summaries]))
        for key in ("bytes_up", "bytes_down"):
            assert row[key] == pytest.approx(np.mean([sum(r[key] for r in read_rounds(d)) for d in dirs]))
        assert row["train_rounds"] == 2 and row["mask_rounds"] == (1 if method == "mpfl" else 0)
        assert row["wall_time"] == pytest.approx(np.mean([s["wall_time"] for s in summaries]))
    ratios = [total_bytes(runs / f"mpfl-{s}") / total_bytes(runs / f"fedavg-{s}") for s in SEEDS]
    assert rows["mpfl"]["bytes_vs_fedavg"] == pytest.approx(np.mean(ratios))
    assert rows["fedavg"]["bytes_vs_fedavg"] == pytest.approx(1.0)
    assert rows["mpfl"]["sparsity"] == 0.9 and rows["fedavg"]["sparsity"] == 0.0


def test_markdown_table_shows_mean_and_spread(report):
    out, rows = report
    text = (out / "report.md").read_text()
    mpfl = rows["mpfl"]
    assert "| Method | Model | Dataset | Partition | Target sparsity | n | Final acc. (%) |" in text
    assert f"{100 * mpfl['final_accuracy']:.2f} ± {100 * mpfl['final_accuracy_std']:.2f}" in text
    assert f"{100 * mpfl['bytes_vs_fedavg']:.1f}%" in text
    assert "## mnist, iid, mlp" in text and "| mpfl | mlp | mnist | iid | 0.9 | 2 |" in text
    for name in PLOTS:
        assert f"]({name})" in text


def test_bytes_vs_fedavg_says_when_only_some_runs_have_a_fedavg_run_to_compare_with(runs, tmp_path):
    for name in ("mpfl-0", "mpfl-1", "fedavg-0"):  # no fedavg run of seed 1
        shutil.copytree(runs / name, tmp_path / "runs" / name)
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "--json", str(tmp_path / "t.json")]) == 0
    row = next(r for r in json.loads((tmp_path / "t.json").read_text()) if r["method"] == "mpfl")
    assert row["bytes_vs_fedavg"] == pytest.approx(total_bytes(runs / "mpfl-0") / total_bytes(runs / "fedavg-0"))
    assert row["bytes_vs_fedavg_runs"] == 1 and row["n_runs"] == 2
    assert f"{100 * row['bytes_vs_fedavg']:.1f}% (1 of 2 runs)" in (tmp_path / "r" / "report.md").read_text()


def test_settings_every_run_shares_away_from_the_defaults_are_named_above_the_table(report):
    out, _ = report
    text = (out / "report.md").read_text()
    # tiny_config: 3 nodes (default 10), 2 rounds (10), 1,500 / 300 images (all); mask_rounds=1 (5) only matters to
    # mpfl, as fedavg does not prune; batch_size 32 is the default, threads has its own place
    assert ("## mnist, iid, mlp\n\nEvery run here shares these settings, which differ from mpfl's defaults: nodes=3, "
            "rounds=2, test_samples=300, train_samples=1500, mpfl: mask_rounds=1.\n") in text


def test_the_value_rows_without_a_variant_have_is_named_where_it_is_not_the_default(runs, tmp_path):
    """Three runs on 1,500 images and one on 3,000: only the last row's variant names train_samples, so
    the text above the table says the others' value (not the default, all images)."""
    for name in ("mpfl-0", "mpfl-1", "fedavg-0", "fedavg-1"):
        shutil.copytree(runs / name, tmp_path / "runs" / name)
    edited = tmp_path / "runs" / "fedavg-1" / "summary.json"
    summary = json.loads(edited.read_text())
    summary["config"]["data"]["train_samples"] = 3000
    edited.write_text(json.dumps(summary))
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    text = " ".join((tmp_path / "out" / "report.md").read_text().split())
    assert ("Every run here shares these settings, which differ from mpfl's defaults: nodes=3, rounds=2, "
            "test_samples=300, mpfl: mask_rounds=1.") in text
    assert ("A row whose variant does not name a setting has its most common value here, which differs from mpfl's "
            "default for: train_samples=1500.") in text
    assert "| train_samples=3000 |" in text


@pytest.mark.parametrize("name", PLOTS)
def test_each_plot_is_a_png_of_the_expected_size(report, name):
    out, _ = report
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI)) == (840, 540)
    assert matplotlib.image.imread(out / name).shape[:2] == (height, width)


def test_curves_plot_the_steps_every_seed_evaluated_with_mean_traffic_and_accuracy(runs, tmp_path, monkeypatch):
    """Two seeds' hand-made rounds: seed 0 evaluates steps 2 and 4, seed 1 steps 1, 2 and 4."""
    import dataclasses

    import matplotlib.figure

    from mpfl.report import plot_accuracy_vs_bytes, plot_accuracy_vs_round

    run = load_runs([runs / "mpfl-0"])[0]
    seed0 = [round_record(1, bytes_up=100, bytes_down=1), round_record(2, bytes_up=100, bytes_down=1, accuracy=0.5),
             round_record(3, bytes_up=100, bytes_down=1), round_record(4, bytes_up=100, bytes_down=1, accuracy=0.7)]
    seed1 = [round_record(1, bytes_up=300, bytes_down=3, accuracy=0.1),
             round_record(2, bytes_up=300, bytes_down=3, accuracy=0.6), round_record(3, bytes_up=300, bytes_down=3),
             round_record(4, bytes_up=300, bytes_down=3, accuracy=0.9)]
    group = Group([dataclasses.replace(run, rounds=seed0), dataclasses.replace(run, rounds=seed1)], {})
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path: drawn.append(fig))
    plot_accuracy_vs_round([group], tmp_path / "a.png", "t")
    plot_accuracy_vs_bytes([group], tmp_path / "b.png", "t")
    by_round, by_bytes = (fig.axes[0].lines[0].get_xydata() for fig in drawn)
    accuracy = [100 * (0.5 + 0.6) / 2, 100 * (0.7 + 0.9) / 2]
    np.testing.assert_allclose(by_round, [[2, accuracy[0]], [4, accuracy[1]]])
    traffic = [(2 * 101 + 2 * 303) / 2 / 1e6, (4 * 101 + 4 * 303) / 2 / 1e6]  # cumulative up + down, in MB
    np.testing.assert_allclose(by_bytes, np.column_stack([traffic, accuracy]))


@pytest.mark.parametrize("variants, height", [(3, 540), (30, None)])
def test_an_ablation_plot_grows_with_its_variants_and_keeps_every_label(runs, tmp_path, variants, height):
    run = load_runs([runs / "mpfl-0"])[0]
    long = {"consensus": "histogram", "extrapolate": 1.0, "mask_average_from": 0, "core_share": 0.0}
    groups = [Group([run], {})] + [Group([run], {**long, "seed_of_variant": i}) for i in range(variants - 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when the labels leave the axes no room
        png = plot_ablation(groups, tmp_path / "ablation.png", "mnist, iid, mlp")
    width, got = struct.unpack(">II", png.read_bytes()[16:24])
    assert width == 840 and (got == height if height else got > 540)


def test_runs_named_one_by_one_report_into_report_and_a_folder_of_runs_into_itself(runs, tmp_path, monkeypatch):
    """`mpfl report runs/*` writes to report/ whether the glob finds one run or several, never into a run."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "study"
    shutil.copytree(runs / "mpfl-0", folder / "mpfl-0")
    before = sorted(p.name for p in (folder / "mpfl-0").iterdir())
    assert main(["report", str(folder / "mpfl-0")]) == 0
    assert (tmp_path / "report" / "report.md").is_file()
    assert sorted(p.name for p in (folder / "mpfl-0").iterdir()) == before
    assert main(["report", str(folder)]) == 0
    assert (folder / "report.md").is_file()


def test_a_single_run_directory_and_python_api(runs, tmp_path, capsys):
    assert main(["report", str(runs / "mpfl-0"), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"1 run -> {tmp_path / 'report.md'} and ")
    text = (tmp_path / "report.md").read_text()
    assert "| mpfl | mlp | mnist | iid | 0.9 | 1 |" in text and "\n1 run in 1 group. " in text
    assert [r.path.name for r in load_runs([runs, runs / "fedavg-1"])] == ["fedavg-0", "fedavg-1", "mpfl-0", "mpfl-1"]


def test_a_run_that_recorded_its_dataset_by_another_spelling_is_reported_with_its_dataset(runs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs / "mpfl-0", old)
    summary = json.loads((old / "summary.json").read_text())
    summary["config"]["data"]["dataset"] = "MNIST"  # as runs of older versions recorded what they were given
    (old / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(runs / "mpfl-1"), str(old), "--out", str(tmp_path / "r"), "--json",
                 str(tmp_path / "rows.json")]) == 0
    assert [(r["dataset"], r["n"]) for r in json.loads((tmp_path / "rows.json").read_text())] == [("mnist", 2)]


def test_a_folder_without_runs_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert f"no run directory found: '{tmp_path / 'empty'}' is a folder without run directories" in capsys.readouterr().err


def test_entries_beside_the_runs_that_are_no_runs_are_skipped_with_the_reason(runs, tmp_path, capsys):
    runs = shutil.copytree(runs, tmp_path / "runs")
    (runs / "notes.txt").write_text("mine\n")
    (runs / "report").mkdir()
    paths = sorted(str(p) for p in runs.iterdir())  # what the shell makes of runs/*
    assert main(["report", *paths, str(runs / "typo"), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr()
    out = " ".join((printed.err + printed.out).split())
    assert f"skipped {runs / 'notes.txt'}: not a run directory nor a folder of run directories" in out
    assert f"skipped {runs / 'report'}: a folder without run directories" in out
    assert f"skipped {runs / 'typo'}: missing (no such file or folder)" in out
    assert "(3 skipped)" in out


def test_an_unfinished_run_whose_log_is_damaged_is_skipped_as_unreadable_not_as_resumable(runs, tmp_path, capsys):
    run = shutil.copytree(next(p for p in runs.iterdir() if (p / "summary.json").is_file()), tmp_path / "cut")
    (run / "summary.json").unlink()
    lines = (run / "rounds.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "accuracy": "high"})
    (run / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["report", str(run), str(runs), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr()
    out = " ".join((printed.err + printed.out).split())
    assert f"skipped {run}: unfinished, and cannot be read (" in out and "is not a round record" in out
    assert "--resume" not in out


def test_device_costs_follow_the_final_mask(runs, report):
    out, rows = report
    from mpfl.checkpoint import load_final

    final = load_final(runs / "mpfl-0")
    pruned = sum(int((~m).sum()) for m in final.mask.values())
    dense = 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    summary = read_summary(runs / "mpfl-0")
    assert summary["params_dense"] == dense and summary["params_kept"] == dense - pruned
    assert summary["flops_per_sample_dense"] == 2 * (784 * 200 + 200 * 200 + 200 * 10)
    mask_bits = sum(m.size for m in final.mask.values())
    assert summary["model_bytes"] == 4 * (dense - pruned) + (mask_bits + 7) // 8  # kept float32 values and 1-bit mask
    weights = {name: w * final.mask.get(name, True) for name, w in final.weights.items()}
    assert summary["flops_per_sample"] == 2 * sum(int(np.count_nonzero(w)) for w in weights.values() if w.ndim == 2)
    assert rows["mpfl"]["params_kept"] == pytest.approx(np.mean([read_summary(runs / f"mpfl-{s}")["params_kept"] for s in SEEDS]))
    times = [read_summary(runs / f"{m}-{s}")["train_round_time"] for m in ("mpfl", "fedavg") for s in SEEDS]
    want = np.mean([times[i] / times[2 + i] for i in range(2)])
    assert rows["mpfl"]["train_time_vs_dense"] == pytest.approx(want)
    assert "Params kept" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """cnn FedAvg and MPFL beside mlp MPFL, a repeat of one seed, a run without training rounds
    (so without accuracy) and a run interrupted after its first round."""
    root = tmp_path_factory.mktemp("mixed")
    small = {"nodes": 2, "train_samples": 600, "test_samples": 200, "mask_rounds": 1, "rounds": 1}
    simulate(tiny_config(**small, model="cnn", method="fedavg"), root / "cnn-fedavg")
    simulate(tiny_config(**small, model="cnn"), root / "cnn-mpfl")
    simulate(tiny_config(**small), root / "mlp-mpfl")
    simulate(tiny_config(**small), root / "mlp-mpfl-repeat")
    simulate(tiny_config(**{**small, "rounds": 0}), root / "mlp-no-training")
    with pytest.raises(KeyboardInterrupt):
        simulate(tiny_config(**small), root / "unfinished", on_round=_interrupt)
    return root


def _interrupt(record: dict) -> None:
    raise KeyboardInterrupt


def test_runs_of_different_models_are_reported_apart(mixed, tmp_path):
    out = tmp_path / "report"
    paths = [str(p) for p in sorted(mixed.iterdir())]
    assert main(["report", *paths, "--out", str(out), "--json", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    by = {(r["model"], r["method"], r["variant"]): r for r in rows}
    assert set(by) == {("cnn", "fedavg", ""), ("cnn", "mpfl", ""), ("mlp", "mpfl", ""), ("mlp", "mpfl", "rounds=0")}
    assert by[("cnn", "mpfl", "")]["bytes_vs_fedavg"] is not None and by[("mlp", "mpfl", "")]["bytes_vs_fedavg"] is None
    text = (out / "report.md").read_text()
    assert "## mnist, iid, cnn" in text and "## mnist, iid, mlp" in text
    for name in ("accuracy_vs_round-mnist-iid-cnn.png", "accuracy_vs_round-mnist-iid-mlp.png"):
        assert (out / name).is_file()
    assert "| mpfl | cnn | mnist | iid | 0.9 | 1 |" in text


def test_a_repeated_seed_counts_once(mixed, tmp_path):
    assert main(["report", str(mixed), "--out", str(tmp_path), "--json", str(tmp_path / "rows.json")]) == 0
    row = next(r for r in json.loads((tmp_path / "rows.json").read_text())
               if r["model"] == "mlp" and r["variant"] == "")
    assert row["n"] == 1 and row["n_runs"] == 2 and row["seeds"] == [0, 0]
    assert row["final_accuracy_std"] is None
    assert "| 1 (2 runs) |" in (tmp_path / "report.md").read_text()


def test_an_unfinished_flower_run_is_skipped_without_telling_to_resume_it(mixed, tmp_path, capsys):
    flower = shutil.copytree(mixed / "unfinished", tmp_path / "flower")
    (flower / "rounds.jsonl").write_text("".join(json.dumps(round_record(step, flower={"0": {"fit": 0.1}})) + "\n"
                                                 for step in (1, 2)))
    assert main(["report", str(flower), str(mixed / "mlp-mpfl"), "--out", str(tmp_path / "out")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"skipped {flower}: unfinished Flower run (2 rounds recorded, no summary.json), which cannot be resumed" in err
    assert "--resume" not in err


def test_a_run_still_going_is_skipped_as_running_not_as_one_to_resume(mixed, tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    fd = os.open(mixed / "unfinished" / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert main(["report", str(mixed / "unfinished"), str(mixed / "mlp-mpfl"), "--out", str(tmp_path)]) == 0
    finally:
        os.close(fd)
        os.unlink(mixed / "unfinished" / ".lock")
    err = capsys.readouterr().err
    assert "still running (1 round recorded so far); report on it once it has finished" in err
    assert "--resume" not in err


def test_a_run_without_accuracy_and_an_unfinished_one_do_not_stop_the_report(mixed, tmp_path, capsys):
    assert main(["report", str(mixed / "mlp-no-training"), str(mixed / "unfinished"), str(mixed / "mlp-mpfl"),
                 str(mixed / "mlp-mpfl-repeat"), "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "(1 skipped)" in captured.out and f"skipped {mixed / 'unfinished'}: unfinished" in captured.err
    text = (tmp_path / "report.md").read_text()
    assert "No test accuracy recorded" in text and "mpfl · rounds=0" in text
    assert f"mpfl run --resume {mixed / 'unfinished'}" in text
    assert "| mpfl | mlp | rounds=0 | mnist | iid | 0.9 | 1 | – | – | 1+0 |" in text


def test_only_unfinished_runs_is_a_one_line_error(mixed, capsys):
    assert main(["report", str(mixed / "unfinished")]) == 2
    err = capsys.readouterr().err
    assert "no finished runs to report on" in err and "mpfl run --resume" in err and len(err.strip().splitlines()) == 1


def test_each_value_precision_is_a_line_of_the_accuracy_vs_bytes_plot(runs, tmp_path):
    for dtype in ("float32", "float16"):
        simulate(tiny_config(method="mpfl", seed=0, mask_rounds=1, value_dtype=dtype), tmp_path / f"mpfl-{dtype}")
    groups = group_runs(load_runs([runs, tmp_path]))
    shown = {format_variant(g.variant) for g in precision_groups(groups, 0.9)}
    assert shown == {"value_dtype=float32", "value_dtype=float16"}
    assert main(["report", str(runs), str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "accuracy_vs_bytes-mnist-iid-mlp.png").is_file()
    full = next(g for g in groups if g.variant == {"value_dtype": "float32"})
    int8 = next(g for g in groups if not g.variant and g.first.method == "mpfl")
    # float32 kept values cost 4 bytes each where int8 costs 1: the float32 run sends more
    assert full.first.summary["bytes_up"] > int8.first.summary["bytes_up"]


def test_settings_a_run_leaves_without_effect_do_not_split_its_seeds(runs, tmp_path):
    """An iid split has no alpha or shards to speak of and FedAvg prunes nothing: seeds run with other
    values of those form one row with the others."""
    other = tmp_path / "fedavg-1"
    shutil.copytree(runs / "fedavg-1", other)
    summary = read_summary(other)
    summary["config"]["data"].update(alpha=0.1, shards=5)
    summary["config"]["prune"]["sparsity"] = 0.5
    (other / "summary.json").write_text(json.dumps(summary))
    rows = [str(runs / "fedavg-0"), str(other)]
    assert main(["report", *rows, "--out", str(tmp_path / "report"), "--json", str(tmp_path / "rows.json")]) == 0
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert (row["n"], row["seeds"], row["variant"]) == (2, [0, 1], "")


def test_runs_of_different_runners_are_never_averaged_together(runs, tmp_path):
    """Flower runs of the simulator's configs form their own rows, named by their runner, with their
    federated evaluation's traffic and the nodes they lost."""
    lost = {"node": 1, "step": 3, "phase": "train", "reason": "SuperNode 42 is no longer connected"}
    for seed in SEEDS:
        flower = tmp_path / f"flower-{seed}"
        shutil.copytree(runs / f"mpfl-{seed}", flower)
        summary = read_summary(flower)
        summary.update(runner="flower-deployment", lost_nodes=[lost, {**lost, "node": 2}] if seed else [],
                       bytes_eval_down=1_593_792,
                       bytes_eval_up=48, final_accuracy=summary["final_accuracy"] - 0.1)
        (flower / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "report"
    paths = [str(runs / f"mpfl-{s}") for s in SEEDS] + [str(tmp_path / f"flower-{s}") for s in SEEDS]
    assert main(["report", *paths, "--out", str(out), "--json", str(tmp_path / "rows.json")]) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert set(rows) == {"", "runner=flower-deployment"}
    sim, flower = rows[""], rows["runner=flower-deployment"]
    assert sim["n"] == flower["n"] == 2 and sim["bytes_eval_down"] is None and sim["bytes_eval_up"] is None
    want = np.mean([read_summary(runs / f"mpfl-{s}")["final_accuracy"] for s in SEEDS])
    assert sim["final_accuracy"] == pytest.approx(want) and flower["final_accuracy"] == pytest.approx(want - 0.1)
    assert (flower["bytes_eval_down"], flower["bytes_eval_up"]) == (1_593_792, 48)
    text = (out / "report.md").read_text()
    assert "| Eval down (MB) | Eval up (B) |" in text and "| 1.59 | 48 |" in text
    assert "| – | – |" in text  # the simulator's row: it has no federated evaluation, not one of 0 bytes
    assert (f"- `{tmp_path / 'flower-1'}` (flower-deployment): node 1, node 2 from step 3 (train): "
            "SuperNode 42 is no longer connected") in text  # one line for the nodes lost alike


@pytest.mark.parametrize("name", ["report.md", PLOTS[0], "rows.json"])
def test_a_file_mpfl_did_not_write_is_refused_unless_forced(runs, tmp_path, capsys, name):
    """The report refreshes its own files, but a user's file in the place of one stays intact until --force."""
    command = ["report", str(runs / "mpfl-0"), "--out", str(tmp_path), "--json", str(tmp_path / "rows.json")]
    assert main(command) == 0 and main(command) == 0  # a refresh of mpfl's own files needs no flag
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / name).write_text("mine\n")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / name} was not written by mpfl report" in err and "--force" in err
    assert (tmp_path / name).read_text() == "mine\n"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != name} == {
        k: v for k, v in written.items() if k != name}  # refused before anything was written
    assert main([*command, "--force"]) == 0
    assert (tmp_path / name).read_bytes() != b"mine\n"
    assert json.loads((tmp_path / "rows.json").read_text())[0]["runs"] == [str(runs / "mpfl-0")]


def test_a_json_file_of_another_shape_is_refused(runs, tmp_path, capsys):
    (tmp_path / "mine.json").write_text('{"not": "rows"}\n')
    assert main(["report", str(runs / "mpfl-0"), "--out", str(tmp_path / "out"), "--json",
                 str(tmp_path / "mine.json")]) == 2
    assert f"{tmp_path / 'mine.json'} was not written by mpfl report" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == '{"not": "rows"}\n' and not (tmp_path / "out" / "report.md").exists()


@pytest.mark.parametrize("record", ["summary.json", "rounds.jsonl", "config.toml"])
def test_a_runs_own_records_are_never_replaced_not_even_when_forced(runs, tmp_path, capsys, record):
    run = shutil.copytree(runs / "mpfl-0", tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for force in ([], ["--force"]):
        assert main(["report", str(run), "--out", str(tmp_path / "out"), "--json", str(run / record), *force]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{run / record} is a record of the run in {run}, which a report never replaces" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before and not (tmp_path / "out" / "report.md").exists()


def test_a_run_whose_summary_was_edited_into_another_shape_is_skipped_with_the_reason(runs, tmp_path, capsys):
    edited = shutil.copytree(runs / "mpfl-0", tmp_path / "edited")
    summary = json.loads((edited / "summary.json").read_text())
    (edited / "summary.json").write_text(json.dumps({**summary, "final_accuracy": "97 %"}))
    assert main(["report", str(edited), str(runs / "mpfl-1"), "--out", str(tmp_path / "report")]) == 0
    assert (f"skipped {edited}: cannot be read (RunDirError: {edited / 'summary.json'} is not a run summary "
            "(final_accuracy = '97 %' is not float | None)") in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("damage", ["cut 40 bytes", "last line removed"])
def test_a_finished_run_with_a_damaged_log_is_skipped(runs, tmp_path, capsys, damage):
    """A finished run's rounds.jsonl must parse to the end and hold every round of its summary; else the
    run is skipped with the reason (its bytes would be wrong), and its files are left as they are."""
    damaged = tmp_path / "damaged"
    shutil.copytree(runs / "mpfl-0", damaged)
    log = damaged / "rounds.jsonl"
    data = log.read_bytes()
    data = data[:-40] if damage == "cut 40 bytes" else data[:data.rstrip(b"\n").rindex(b"\n") + 1]
    log.write_bytes(data)
    out = tmp_path / "report"
    assert main(["report", str(damaged), str(runs / "mpfl-1"), "--out", str(out), "--json", str(tmp_path / "rows.json")]) == 0
    assert f"skipped {damaged}: cannot be read" in capsys.readouterr().err
    [row] = json.loads((tmp_path / "rows.json").read_text())
    assert row["runs"] == [str(runs / "mpfl-1")] and row["bytes_up"] == sum(r["bytes_up"] for r in read_rounds(runs / "mpfl-1"))
    assert f"- `{damaged}`: cannot be read (RunDirError: {log}" in (out / "report.md").read_text()
    assert log.read_bytes() == data
    assert main(["report", str(damaged), "--out", str(out)]) == 2
    assert "no finished runs to report on" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["a folder", "in a missing folder"])
def test_a_json_path_that_cannot_be_a_file_is_a_clear_error(runs, tmp_path, capsys, where):
    json_path = tmp_path / "folder" if where == "a folder" else tmp_path / "missing" / "rows.json"
    (tmp_path / "folder").mkdir()
    assert main(["report", str(runs / "mpfl-0"), "--out", str(tmp_path / "out"), "--json", str(json_path)]) == 2
    err = capsys.readouterr().err
    assert f"--json {json_path}" in err and ".tmp" not in err and len(err.strip().splitlines()) == 1
    assert ("give a file path" if where == "a folder" else "create it or choose another --json path") in err
    assert not (tmp_path / "out" / "report.md").exists() and list((tmp_path / "folder").iterdir()) == []


def test_plug_in_methods_get_colours_of_their_own_and_built_in_methods_keep_theirs():
    from types import SimpleNamespace

    from matplotlib.colors import to_hex

    from mpfl.report import _palette

    methods = ["mpfl", "fedavg", "zeta-plugin", "alpha-plugin", "ssfl"]
    colors = {m: to_hex(c) for m, c in _palette([SimpleNamespace(first=SimpleNamespace(method=m)) for m in methods]).items()}
    shown = [colors[m] for m in methods]
    assert len(set(shown)) == len(methods)
    assert colors["mpfl"] == to_hex("C0") and colors["ssfl"] == to_hex("C7")
    assert (colors["alpha-plugin"], colors["zeta-plugin"]) == (to_hex("C8"), to_hex("C9"))  # in turn by name


def test_an_unfinished_run_that_resume_would_refuse_is_not_sent_to_resume(runs, tmp_path, capsys):
    run = shutil.copytree(next(p for p in runs.iterdir() if (p / "summary.json").is_file()), tmp_path / "left")
    (run / "summary.json").unlink()  # a finished run keeps no checkpoint, so nothing can continue these rounds
    assert main(["report", str(run), str(runs), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr()
    out = " ".join((printed.err + printed.out).split())
    assert f"skipped {run}: unfinished (" in out and "and cannot be resumed: " in out and "has no checkpoint.npz" in out
    assert "mpfl run --resume" not in out


def test_a_finished_run_missing_its_round_log_is_skipped_saying_which_file(runs, tmp_path, capsys):
    run = shutil.copytree(next(p for p in runs.iterdir() if (p / "summary.json").is_file()), tmp_path / "nolog")
    (run / "rounds.jsonl").unlink()
    assert main(["report", str(run), str(runs), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr()
    out = " ".join((printed.err + printed.out).split())
    assert f"skipped {run}: cannot be read: {run / 'rounds.jsonl'} is missing; restore it from a copy" in out


def test_a_variant_names_unset_values_in_words():
    assert format_variant({"train_samples": None, "init": None, "nodes": 5}) == "train_samples=all, init=none, nodes=5"


def test_a_report_runs_no_plug_in_code_named_by_an_unfinished_runs_config(runs, tmp_path, capsys):
    run = shutil.copytree(next(p for p in runs.iterdir() if (p / "summary.json").is_file()), tmp_path / "plugged")
    (run / "summary.json").unlink()
    plugin = tmp_path / "marker.py"
    plugin.write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    config = (run / "config.toml").read_text()
    assert "plugins = []\n" in config
    (run / "config.toml").write_text(config.replace("plugins = []\n", f"plugins = [{str(plugin)!r}]\n", 1))
    assert main(["report", str(run), str(runs), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr()
    out = " ".join((printed.err + printed.out).split())
    assert f"skipped {run}: unfinished (" in out and "and cannot be resumed: " in out  # the log needs no config
    assert not (tmp_path / "imported").exists()


def test_an_ablation_baseline_that_is_not_the_package_default_names_its_settings(tmp_path):
    """Two runs at lr 0.1 and one at the default 0.05: the variant-less row is the lr 0.1 one, and its
    label says so instead of reading as the package's defaults."""
    from mpfl.report import ablation_labels

    small = {"nodes": 2, "train_samples": 400, "test_samples": 100, "mask_rounds": 1, "rounds": 1}
    for name, lr, seed in (("a", 0.1, 0), ("b", 0.1, 1), ("c", 0.05, 0)):
        simulate(tiny_config(**small, lr=lr, seed=seed), tmp_path / name)
    groups = group_runs(load_runs([tmp_path]))
    assert sorted(ablation_labels(groups)) == ["mpfl: baseline (lr=0.1)", "mpfl: lr=0.05"]


@pytest.mark.parametrize("name", ["report.md", PLOTS[0]])
def test_a_json_path_that_is_one_of_the_reports_own_files_is_refused(runs, tmp_path, capsys, name):
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out), "--json", str(out / name)]) == 2
    assert f"--json {out / name} is a file the report itself writes" in capsys.readouterr().err
    assert not (out / name).exists()


def test_a_study_cells_attempt_moved_aside_is_not_sent_to_resume(runs, tmp_path, capsys):
    aside = tmp_path / "fedavg-mnist-iid-n3-s0-abc.incomplete-1"
    with pytest.raises(KeyboardInterrupt):
        simulate(tiny_config(method="fedavg", nodes=2, train_samples=600, test_samples=200, rounds=2), aside,
                 on_round=_interrupt)
    assert main(["report", str(runs), str(aside), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert ("an unfinished attempt at a study cell, moved aside when the study ran the cell again "
            "(fedavg-mnist-iid-n3-s0-abc); delete it once that cell has finished") in err and "--resume" not in err


def test_a_refreshed_report_removes_the_plots_of_its_earlier_version_it_no_longer_draws(mixed, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(mixed / "cnn-mpfl"), str(mixed / "mlp-mpfl"), "--out", str(out)]) == 0
    cnn_plots = sorted(p.name for p in out.glob("*-cnn.png"))
    assert cnn_plots
    (out / "mine.png").write_bytes((out / cnn_plots[0]).read_bytes())  # a user's file, shown by no report
    assert main(["report", str(mixed / "mlp-mpfl"), "--out", str(out)]) == 0
    assert not list(out.glob("*-cnn.png")) and (out / "mine.png").is_file()
    shown = set(re.findall(r"\]\(([^)]+\.png)\)", (out / "report.md").read_text()))
    assert shown == {p.name for p in out.glob("*.png")} - {"mine.png"}


def _seeded(run, seed: int, accuracies, sparsity: float = 0.9, bytes_per_round: int = 100_000):
    """`run` as if it had run with `seed` and `sparsity` and evaluated `accuracies` in its rounds (the last one
    final), each round sending `bytes_per_round`."""
    import dataclasses

    rounds = [round_record(i + 1, bytes_up=bytes_per_round, bytes_down=0, accuracy=a) for i, a in enumerate(accuracies)]
    summary = {**run.summary, "final_accuracy": accuracies[-1], "sparsity": sparsity,
               "config": {**run.summary["config"], "seed": seed}}
    return dataclasses.replace(run, rounds=rounds, summary=summary)


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_a_single_sparsity_is_a_marker_in_the_middle_of_the_sparsity_axis(runs, tmp_path, drawn, sparsity):
    """Runs at one sparsity only: the point and its tick stand in the middle of the axis, not at its edge."""
    from mpfl.report import plot_accuracy_vs_sparsity

    run = load_runs([runs / "mpfl-0"])[0]
    plot_accuracy_vs_sparsity([Group([_seeded(run, 0, [0.6], sparsity)], {})], tmp_path / "s.png", "t")
    ax = drawn[0].axes[0]
    (bars,) = ax.containers
    line = bars.lines[0]
    np.testing.assert_allclose(line.get_xydata(), [[sparsity, 60.0]])
    assert line.get_marker() == "o"
    lo, hi = ax.get_xlim()
    assert _logit(sparsity) - _logit(lo) == pytest.approx(_logit(hi) - _logit(sparsity)) == pytest.approx(1.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{sparsity:g}"]


def test_a_sparsity_of_0_leaves_the_sparsity_axis_to_the_others(runs, tmp_path, drawn):
    import warnings

    from mpfl.report import plot_accuracy_vs_sparsity

    run = load_runs([runs / "mpfl-0"])[0]
    groups = [Group([_seeded(run, 0, [0.9], sparsity)], {"sparsity": sparsity}) for sparsity in (0.0, 0.5, 0.9)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # log(0) in the axis limits warned
        plot_accuracy_vs_sparsity(groups, tmp_path / "s.png", "t")
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "0.9"] and 0 < ax.get_xlim()[0] < 0.5
    [level] = [line for line in ax.get_lines() if line.get_label() == "mpfl at sparsity 0"]  # shown as a level
    assert set(level.get_ydata()) == {90.0}
    plot_accuracy_vs_sparsity(groups[:1], tmp_path / "only0.png", "t")
    only = drawn[1].axes[0]
    assert only.get_xscale() == "linear" and only.get_xlabel() == "" and list(only.get_xticks()) == []


def test_accuracy_axes_end_at_100_and_begin_at_0_percent(runs, tmp_path, drawn):
    """Curves from 0 % to 99 % with a ±1 std band past both ends, and final accuracies of 99 % and 90 % (a mean
    of 94.5 ± 6.4): autoscaling would pad the axes to accuracies no run can have."""
    from mpfl.report import plot_accuracy_vs_bytes, plot_accuracy_vs_round, plot_accuracy_vs_sparsity

    run = load_runs([runs / "mpfl-0"])[0]
    seeds = [_seeded(run, 0, [0.0, 0.95, 0.99]), _seeded(run, 1, [0.02, 0.99, 0.9])]
    group, variant = Group(seeds, {}), Group(seeds, {"lr": 0.1})
    for plot in (plot_accuracy_vs_round, plot_accuracy_vs_bytes, plot_accuracy_vs_sparsity):
        plot([group], tmp_path / f"{plot.__name__}.png", "t")
    plot_ablation([group, variant], tmp_path / "ablation.png", "t")
    limits = [fig.axes[0].get_ylim() for fig in drawn[:3]] + [drawn[3].axes[0].get_xlim()]
    assert [hi for _, hi in limits] == [100.0] * 4
    assert [lo for lo, _ in limits[:2]] == [0.0] * 2 and min(lo for lo, _ in limits[2:]) > 80


@pytest.mark.parametrize("rounds, bytes_per_round", [(20, 20), (20, 100_000), (20, 100_000_000_000), (3, 100_000)])
def test_the_traffic_axis_reads_plain_numbers_of_megabytes(runs, tmp_path, drawn, rounds, bytes_per_round):
    """20 rounds of 20 B, 100 kB or 100 GB each (0.00002 to 2,000,000 MB) with no exponent to decode, and
    0.1 to 0.3 MB, within a decade, with more than a label or two."""
    from mpfl.report import plot_accuracy_vs_bytes

    run = load_runs([runs / "mpfl-0"])[0]
    plot_accuracy_vs_bytes([Group([_seeded(run, 0, [0.5] * rounds, bytes_per_round=bytes_per_round)], {})],
                           tmp_path / "b.png", "t")
    shown = shown_tick_labels(drawn[0].axes[0].xaxis)
    assert len(shown) >= 3
    assert all(float(label.replace(",", "")) == pytest.approx(x) for x, label in shown.items()), shown
    assert all(re.fullmatch(r"\d{1,3}(,\d{3})*(\.\d+)?", label) for label in shown.values()), shown


def test_runs_of_one_config_with_other_plug_in_code_are_not_averaged_together(runs, tmp_path):
    """A plug-in edited between two seeds makes two experiments: each is a row named by its code's digest;
    the same code keeps the seeds together with no mark."""
    import hashlib

    def with_code(codes: dict[int, str]) -> list[dict]:
        for seed, code in codes.items():
            copy = tmp_path / f"{code}-{seed}"
            shutil.copytree(runs / f"mpfl-{seed}", copy)
            summary = read_summary(copy)
            summary["versions"]["plugins"] = {"/work/rule.py": code}
            (copy / "summary.json").write_text(json.dumps(summary))
        rows = tmp_path / f"rows-{'-'.join(codes.values())}.json"
        paths = [str(tmp_path / f"{code}-{seed}") for seed, code in codes.items()]
        assert main(["report", *paths, "--out", str(tmp_path / rows.stem), "--json", str(rows)]) == 0
        return json.loads(rows.read_text())

    digest = {code: hashlib.sha256(json.dumps({"/work/rule.py": code}).encode()).hexdigest()[:8] for code in "ab"}
    split = with_code({0: "a", 1: "b"})
    assert sorted((r["variant"], r["n"]) for r in split) == sorted((f"plugin_code={digest[c]}", 1) for c in "ab")
    same = with_code({0: "c", 1: "c"})
    assert [(r["variant"], r["n"]) for r in same] == [("", 2)]
