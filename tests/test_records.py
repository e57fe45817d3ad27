"""Run directories: which folders a run may write to or resume, the round logs (JSON lines and CSV) as
they are appended, rewritten and read back, and the summary's figures worked out by hand."""

from __future__ import annotations

import csv
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import round_record as record
from conftest import tiny_config
from mpfl.errors import ConfigError, RunDirError
from mpfl.records import (
    CONFIG,
    CSV_COLUMNS,
    ROUNDS_CSV,
    ROUNDS_JSONL,
    RUN_JSON,
    SUMMARY,
    RunDir,
    check_resumable_dir,
    check_run_dir,
    lost_nodes,
    make_run_dir,
    new_run_dir,
    read_rounds,
    read_summary,
    record_problem,
    removed_if_unused,
    stopped_before_round_1,
    summarize,
    summary_line,
)

CFG = tiny_config()




def test_a_new_run_dir_is_made_named_after_the_run_and_runs_of_the_same_second_get_one_each(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261202-053449")
    base = f"20261202-053449-{CFG.method}-mnist-{CFG.train.model}-s{CFG.seed}"
    first = new_run_dir(CFG, tmp_path / "runs")
    assert first == tmp_path / "runs" / base and first.is_dir() and not any(first.iterdir())
    with ThreadPoolExecutor(8) as pool:  # eight runs started at once, as a sweep's background jobs are
        made = list(pool.map(lambda _: new_run_dir(CFG, tmp_path / "runs"), range(8)))
    assert sorted(p.name for p in made) == sorted(f"{base}-{n}" for n in range(2, 10))


def test_a_folder_made_for_a_run_goes_if_the_run_left_it_empty_and_stays_otherwise(tmp_path):
    for made, write, stays in [(True, False, False), (True, True, True), (False, False, True)]:
        folder = tmp_path / f"{made}-{write}"
        folder.mkdir()
        with pytest.raises(KeyboardInterrupt), removed_if_unused(folder, made=made):
            if write:
                (folder / "config.toml").write_text("seed = 0\n")
            raise KeyboardInterrupt
        assert folder.is_dir() == stays


def test_a_run_may_write_to_a_new_or_empty_folder_or_resume_its_own(tmp_path):
    check_run_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_run_dir(tmp_path / "empty")
    (tmp_path / "empty" / CONFIG).write_text("")
    check_run_dir(tmp_path / "empty", resume=True)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("x"), "exists and is not a directory"),
    (lambda p: p.symlink_to(p.with_name("gone")), "is a symbolic link to a missing folder ('"),
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")), "already holds files; choose another --out"),
    (lambda p: (p.mkdir(), (p / CONFIG).write_text(""), (p / ROUNDS_JSONL).write_text("{}\n")),
     "holds an unfinished run; continue it with mpfl run --resume"),
    (lambda p: (p.mkdir(), (p / CONFIG).write_text("")),  # no run.json: the user's own config, not a run's
     "already holds files; choose another --out"),
    (lambda p: (p.mkdir(), (p / CONFIG).write_text(""), (p / RUN_JSON).write_text("{}"), (p / "notes.txt").write_text("x")),
     "already holds files; choose another --out"),
    (lambda p: (p.mkdir(), (p / CONFIG).write_text(""), (p / SUMMARY).write_text("{}")), "already holds files"),
])
def test_a_folder_that_is_not_free_for_a_new_run_is_refused(tmp_path, make, message):
    out = tmp_path / "run"
    make(out)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_run_dir(out)


def test_a_run_that_recorded_nothing_takes_a_new_run_only_where_mpfl_wrote_all_its_folder_holds(tmp_path):
    """Run, report and export agree: without run.json, the config may be the user's own file."""
    out = tmp_path / "run"
    out.mkdir()
    (out / CONFIG).write_text("")
    assert stopped_before_round_1(out) == "stopped before its first round (nothing was recorded)"
    with pytest.raises(ConfigError, match="already holds files"):
        check_run_dir(out)
    (out / RUN_JSON).write_text("{}")
    assert stopped_before_round_1(out).endswith("(nothing was recorded); a new run may start there again")
    check_run_dir(out)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist; give the run directory"),
    (lambda p: p.mkdir(), "is not a run directory (no config.toml)"),
    (lambda p: (p.mkdir(), (p / CONFIG).write_text(""), (p / SUMMARY).write_text("{}")), "holds a finished run"),
    (lambda p: (p.mkdir(), (p / CONFIG).write_text(""),
                (p / ROUNDS_JSONL).write_text(json.dumps(record(1, "mask", flower={"0": {"fit": 0.1}})) + "\n")),
     "holds a Flower run, and only simulator runs can be resumed; start it again with flwr run"),
])
def test_only_an_unfinished_simulator_run_directory_is_resumed(tmp_path, make, message):
    out = tmp_path / "run"
    make(out)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_resumable_dir(out)


def test_round_logs_hold_each_round_once_as_json_and_as_a_flat_table(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, CFG)
    assert (out / CONFIG).is_file()
    rounds = [record(1, "mask", accuracy=None, density=0.5, extra="not a column"),
              record(2, nodes=(0,), dropped={"1": "timed out"}, accuracy=0.25, density=0.5)]
    for r in rounds:
        run.log(r)
    assert read_rounds(out) == rounds
    with open(out / ROUNDS_CSV, newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == list(CSV_COLUMNS)
    by_column = [dict(zip(header, row)) for row in rows]
    assert [row["accuracy"] for row in by_column] == ["", "0.25"]
    assert [row["nodes"] for row in by_column] == ["[0,1]", "[0]"]
    assert json.loads(by_column[1]["dropped"]) == {"1": "timed out"} and by_column[0]["dropped"] == "{}"
    assert by_column[0]["loss"] == "" and "extra" not in header


def test_rewrite_replaces_both_logs_and_later_rounds_append_after_it(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, CFG)
    for step in (1, 2, 3):
        run.log(record(step))
    run.rewrite([record(1)])
    run.log(record(2, accuracy=0.5))
    assert read_rounds(out) == [record(1), record(2, accuracy=0.5)]
    lines = (out / ROUNDS_CSV).read_text().splitlines()
    assert len(lines) == 3 and lines[0] == ",".join(CSV_COLUMNS) and lines[2].startswith("2,train,")


def test_an_empty_csv_log_gets_its_header_with_the_first_round(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, CFG)
    (out / ROUNDS_CSV).write_text("")
    run.log(record(1))
    assert (out / ROUNDS_CSV).read_text().splitlines()[0] == ",".join(CSV_COLUMNS)


def test_the_summary_is_written_as_json_and_read_back(tmp_path):
    run = RunDir(tmp_path / "run", CFG)
    summary = summarize(CFG, [record(1, accuracy=0.5)], 2.0)
    run.finish(summary)
    assert read_summary(tmp_path / "run") == json.loads(json.dumps(summary))


def _summary(**changes) -> dict:
    """A summary as a run writes it (through JSON), with `changes` to its keys or, as ``config__train__lr``,
    to nested ones."""
    summary = json.loads(json.dumps(summarize(CFG, [record(1, accuracy=0.5)], 2.0)))
    for key, value in changes.items():
        *path, name = key.split("__")
        where = summary
        for part in path:
            where = where[part]
        where[name] = value
    return summary


NOT_SUMMARIES = {
    "a list": ([_summary()], "not a JSON object"),
    "a figure missing": ({k: v for k, v in _summary().items() if k != "rounds"}, "no rounds"),
    "accuracy as text": (_summary(final_accuracy="high"), "final_accuracy = 'high' is not float | None"),
    "wall time missing a value": (_summary(wall_time=None), "wall_time = None is not float"),
    "lost nodes not a list": (_summary(lost_nodes="none"), "lost_nodes = 'none' is not list[dict[str, typing.Any]]"),
    "a cost as text": (_summary(params_kept="20k"), "params_kept = '20k' is not int"),
    "config not a table": (_summary(config=[1]), "config = [1] is not dict[str, typing.Any]"),
    "a config section not a table": (_summary(config__train=3), "config.train is not a table"),
    "a config field missing": (_summary(config={"seed": 0}), "config: no method, dataset, partition, alpha, shards"),
    "a config field of another type": (_summary(config__seed=[1]), "config: seed = [1] is not int"),
    "a field in a section of another type": (_summary(config__train__lr="fast"), "config: lr = 'fast' is not float"),
}


@pytest.mark.parametrize("case", list(NOT_SUMMARIES))
def test_a_summary_file_that_is_not_a_run_summary_is_named_with_the_problem(tmp_path, case):
    value, problem = NOT_SUMMARIES[case]
    (tmp_path / SUMMARY).write_text(json.dumps(value))
    with pytest.raises(RunDirError) as refused:
        read_summary(tmp_path)
    assert f"summary.json is not a run summary ({problem}" in str(refused.value)


def test_a_summary_of_a_plugins_method_with_costs_and_flower_figures_is_read(tmp_path):
    summary = _summary(method="my-method", config__method="my-method", params_kept=10, bits_per_param_up=None,
                       partitions={"0": 12345}, federated_eval={"accuracy": 0.5}, my_figure=[1, "a"])
    (tmp_path / SUMMARY).write_text(json.dumps(summary))
    assert read_summary(tmp_path) == summary


def test_a_summary_that_is_not_json_is_named_damaged(tmp_path):
    (tmp_path / SUMMARY).write_text('{"method": ')
    with pytest.raises(RunDirError, match="summary.json is damaged"):
        read_summary(tmp_path)
    (tmp_path / SUMMARY).write_bytes(b"\xff\xfe")
    with pytest.raises(RunDirError, match="summary.json is damaged"):
        read_summary(tmp_path)


def test_a_run_directory_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot create run directory .*file/run.*; choose another --out"):
        make_run_dir(tmp_path / "file" / "run")


def test_a_resumed_run_dir_keeps_the_config_it_has(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / CONFIG).write_text("# the run's own\n")
    RunDir(out, CFG, resume=True)
    assert (out / CONFIG).read_text() == "# the run's own\n"


def test_a_cut_last_line_is_left_out_unless_the_log_is_complete_and_any_other_bad_line_is_named(tmp_path):
    (tmp_path / ROUNDS_JSONL).write_text(json.dumps(record(1)) + "\n\n" + '{"step": 2, "pha')
    assert read_rounds(tmp_path) == [record(1)]
    with pytest.raises(RunDirError, match="rounds.jsonl line 3 is damaged"):
        read_rounds(tmp_path, complete=True)
    (tmp_path / ROUNDS_JSONL).write_text('{"step": 2, "pha\n' + json.dumps(record(1)) + "\n")
    with pytest.raises(RunDirError, match="rounds.jsonl line 1 is damaged"):
        read_rounds(tmp_path)


NOT_RECORDS = {
    "a list": ([1, 2], "not a JSON object"),
    "keys missing": ({"step": 2, "phase": "train"}, "no accuracy, bytes_down, bytes_up, cum_bytes_down"),
    "step as text": (record("2"), "step = '2' is not int"),
    "step true": (record(True), "step = True is not int"),
    "step as a float": (record(2.0), "step = 2.0 is not int"),
    "accuracy as text": (record(2, accuracy="high"), "accuracy = 'high' is not float | None"),
    "bytes missing a value": (record(2, bytes_up=None), "bytes_up = None is not int"),
    "nodes not a list": ({**record(2), "nodes": 3}, "nodes = 3 is not list[int]"),
    "a node not a number": (record(2, nodes=["0"]), "nodes = ['0'] is not list[int]"),
    "dropped a list": ({**record(2), "dropped": ["1"]}, "dropped = ['1'] is not dict[str, str]"),
    "dropped a number": ({**record(2), "dropped": 3}, "dropped = 3 is not dict[str, str]"),
    "a dropped node not an id": (record(2, dropped={"one": "gone"}), "a dropped node is not a node id"),
    "a vote weight as text": (record(2, vote_weights={"0": "half"}), "vote_weights = {'0': 'half'} is not dict[str, float]"),
}


@pytest.mark.parametrize("case", list(NOT_RECORDS))
def test_a_line_that_is_not_a_round_record_is_named_with_the_problem(tmp_path, case):
    value, problem = NOT_RECORDS[case]
    (tmp_path / ROUNDS_JSONL).write_text(json.dumps(record(1)) + "\n" + json.dumps(value) + "\n")
    with pytest.raises(RunDirError) as refused:
        read_rounds(tmp_path)
    assert f"rounds.jsonl line 2 is not a round record ({problem}" in str(refused.value)


def test_records_with_whole_numbers_for_floats_and_metrics_of_a_methods_own_are_read():
    records = [record(1, density=1, accuracy=0, time=3, layer_density=[1, 0.5], vote_weights={"0": 0.25, "1": 1}),
               record(2, flower={"node": [1, "x"]}, my_metric="anything", dropped={"12": "timed out"})]
    assert all(record_problem(r) is None for r in records)


def test_a_log_that_is_not_text_is_named(tmp_path):
    (tmp_path / ROUNDS_JSONL).write_bytes(b"\xff\xfe" * 8)
    with pytest.raises(RunDirError, match="rounds.jsonl is damaged"):
        read_rounds(tmp_path)


def test_lost_nodes_are_those_whose_last_request_failed_from_the_round_they_left():
    rounds = [
        record(1, "mask", nodes=(0, 1, 3), dropped={"2": "timed out"}),
        record(2, "mask", nodes=(0, 2), dropped={"1": "bad reply", "3": "gone"}),
        record(3, nodes=(0, 2), dropped={"1": "still gone", "3": "gone"}),
        record(4, nodes=(2,), dropped={"0": "gone"}),
    ]
    assert lost_nodes(rounds) == [{"node": 1, "step": 2, "phase": "mask", "reason": "bad reply"},
                                  {"node": 3, "step": 2, "phase": "mask", "reason": "gone"},
                                  {"node": 0, "step": 4, "phase": "train", "reason": "gone"}]
    assert lost_nodes(rounds[:1] + [record(2, nodes=(2,))]) == []


def test_the_summary_holds_the_runs_figures_worked_out_from_its_rounds():
    rounds = [
        record(1, "mask", accuracy=0.5, time=9.0, cum_bytes_up=10, cum_bytes_down=20, density=0.5, loss=1.0),
        record(2, accuracy=0.75, time=2.0, cum_bytes_up=30, cum_bytes_down=50, density=0.5, loss=0.5),
        record(3, accuracy=None, time=4.0, cum_bytes_up=45, cum_bytes_down=80, density=0.25, loss=None),
    ]
    summary = summarize(CFG, rounds, 12.5)
    assert {k: summary[k] for k in ("final_accuracy", "best_accuracy", "final_loss", "final_density", "rounds",
                                    "train_rounds", "mask_rounds", "bytes_up", "bytes_down", "wall_time",
                                    "train_round_time", "runner", "lost_nodes", "seed", "sparsity", "bytes_eval_up",
                                    "bytes_eval_down")} == {
        "final_accuracy": 0.75, "best_accuracy": 0.75, "final_loss": None, "final_density": 0.25, "rounds": 3,
        "train_rounds": 2, "mask_rounds": 1, "bytes_up": 45, "bytes_down": 80, "wall_time": 12.5,
        "train_round_time": 3.0, "runner": "simulator", "lost_nodes": [], "seed": CFG.seed,
        "sparsity": CFG.prune.sparsity, "bytes_eval_up": 0, "bytes_eval_down": 0}
    assert summary["config"] == CFG.to_dict() and "plugins" not in summary["versions"]
    assert summarize(CFG, rounds, 1.0, {"runner": "flower-deployment"})["runner"] == "flower-deployment"
    assert summarize(CFG.with_overrides({"method": "fedavg"}), rounds, 1.0)["sparsity"] == 0.0


def test_a_run_without_rounds_or_accuracies_is_summarised_as_unknown_not_zero(tmp_path):
    summary = summarize(CFG, [], 0.5)
    assert (summary["final_accuracy"], summary["best_accuracy"], summary["final_density"]) == (None, None, None)
    assert (summary["bytes_up"], summary["train_round_time"]) == (0, None)
    assert summary_line(summary, tmp_path) == f"final accuracy n/a, density n/a, bytes up 0 down 0, 0.5 s. Records in {tmp_path}"
    line = summary_line({**summary, "final_accuracy": 0.97186, "final_density": 0.1, "bytes_up": 3087760,
                         "bytes_down": 2753680, "wall_time": 52.04}, tmp_path)
    assert line.startswith("final accuracy 97.19%, density 0.100, bytes up 3,087,760 down 2,753,680, 52.0 s.")
