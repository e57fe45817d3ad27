"""Before a checkpoint is trusted: the run's identity, the config it was written with, the metadata
about its run, and the round log put back together after a crash. Whole stopped-and-resumed runs
are in test_trust.py and test_reliability.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from conftest import round_record, tiny_config
from mpfl.checkpoint import CHECKPOINT
from mpfl.cli import main
from mpfl.errors import RunDirError
from mpfl.records import CONFIG, ROUNDS_JSONL
from mpfl.resume import (
    RUN_JSON,
    changes,
    check_resumable,
    checkpoint_run,
    config_sha256,
    new_identity,
    plugin_changes,
    read_config,
    read_identity,
    recover_records,
    refusal,
    restart,
    result_config,
    resume_notes,
    write_identity,
)
from mpfl.sim import simulate

CFG = tiny_config()


def record(step: int) -> dict:
    return round_record(step, "mask" if step <= 2 else "train", accuracy=step / 10)


def write_log(folder: Path, records: list[dict], tail: str = "") -> None:
    (folder / ROUNDS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def write_meta(folder: Path, run: dict | None) -> None:
    """A checkpoint holding only its metadata, which is all `check_resumable` reads."""
    meta = {"next_step": 4} if run is None else {"next_step": 4, "run": run}
    np.savez(folder / CHECKPOINT, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))


@pytest.fixture
def stopped(tmp_path) -> tuple[Path, dict]:
    """A run folder as a run leaves it after step 3 of CFG: config, identity, log and checkpoint."""
    identity = restart(tmp_path, CFG)
    records = [record(step) for step in (1, 2, 3)]
    write_log(tmp_path, records)
    run = checkpoint_run(identity, CFG, records, [])
    write_meta(tmp_path, run)
    return tmp_path, run


def test_the_config_hash_ignores_worker_processes_and_nothing_that_decides_results():
    assert config_sha256(CFG) == config_sha256(CFG.with_overrides({"workers": 2}))
    for change in ({"seed": 1}, {"lr": 0.5}, {"nodes": 4}, {"sparsity": 0.8}):
        assert config_sha256(CFG.with_overrides(change)) != config_sha256(CFG), change
    assert "workers" not in result_config(CFG) and result_config(CFG)["seed"] == CFG.seed


def test_a_new_identity_is_random_and_carries_the_config_hash():
    first, second = new_identity(CFG), new_identity(CFG)
    assert first["run_id"] != second["run_id"] and len(first["run_id"]) == 32
    assert first["config_sha256"] == second["config_sha256"] == config_sha256(CFG)


def test_changes_name_each_differing_field_with_both_values_sections_flattened():
    saved = {"seed": 0, "train": {"lr": 0.05, "epochs": 1}, "method": "mpfl"}
    assert changes(saved, saved) == "no field"
    assert changes(saved, {**saved, "seed": 7}) == "seed = 7 (checkpoint: 0)"
    assert (changes(saved, {**saved, "train": {"lr": 0.1}}, "config.toml")
            == "train.epochs = 'unset' (config.toml: 1), train.lr = 0.1 (config.toml: 0.05)")
    assert changes({"notes": {"a": 1}}, {"notes": {"a": 2}}) == "notes = {'a': 2} (checkpoint: {'a': 1})"
    shown = ", ".join(f"f{i} = {i} (checkpoint: 'unset')" for i in range(5))
    for count, more in ((5, ""), (6, " and 1 more"), (7, " and 2 more")):
        assert changes({}, {f"f{i}": i for i in range(count)}) == shown + more


def test_an_identity_reads_back_as_written_and_a_missing_one_is_none(tmp_path):
    assert read_identity(tmp_path) is None
    identity = new_identity(CFG)
    write_identity(tmp_path, identity)
    assert read_identity(tmp_path) == identity


@pytest.mark.parametrize("text, problem", [
    ("{not json", "JSONDecodeError"),
    ('["run_id", "config_sha256"]', "it does not hold run_id and config_sha256"),
    ('{"run_id": 7, "config_sha256": "ab"}', "it does not hold run_id and config_sha256"),
    ('{"run_id": "ab"}', "it does not hold run_id and config_sha256"),
])
def test_a_damaged_identity_is_named(tmp_path, text, problem):
    (tmp_path / RUN_JSON).write_text(text)
    with pytest.raises(RunDirError, match=f"run.json is damaged .*{problem}"):
        read_identity(tmp_path)


def test_a_checkpoint_of_this_run_and_config_is_accepted(stopped):
    folder, run = stopped
    assert check_resumable(folder, CFG)["run"] == run
    assert check_resumable(folder, CFG.with_overrides({"workers": 2}))["run"] == run


def test_a_lost_identity_is_not_written_by_the_first_checks_alone(stopped):
    # the checkpoint names the run only once the log agrees with it (load_resumed; test_trust rebuilds one)
    folder, run = stopped
    (folder / RUN_JSON).unlink()
    assert check_resumable(folder, CFG)["run"]["run_id"] == run["run_id"]
    assert read_identity(folder) is None


def test_a_checkpoint_after_the_first_round_is_accepted(stopped):
    folder, run = stopped
    run.update(records=1, last_record=record(1))
    write_meta(folder, run)
    assert check_resumable(folder, CFG)["run"] == run


def test_the_checkpoint_of_another_run_is_refused(stopped):
    folder, run = stopped
    other = new_identity(CFG)
    write_identity(folder, other)
    with pytest.raises(RunDirError, match=f"checkpoint.npz belongs to another run \\(run id {run['run_id'][:12]}, but "
                                          f".*run.json names {other['run_id'][:12]}\\)"):
        check_resumable(folder, CFG)


def test_a_config_edited_since_the_checkpoint_is_refused_naming_the_field(stopped):
    folder, _ = stopped
    with pytest.raises(RunDirError, match=r"differs from the one its checkpoint.npz was written with: seed = 5 "
                                          r"\(checkpoint: 0\)"):
        check_resumable(folder, CFG.with_overrides({"seed": 5}))
    (folder / RUN_JSON).unlink()  # without the run's identity the checkpoint may as well be another run's
    with pytest.raises(RunDirError, match=r"undo the edit to .*config.toml \(or, if checkpoint.npz is another run's, "
                                          r"put this run's back\), or start a new run"):
        check_resumable(folder, CFG.with_overrides({"seed": 5}))


def test_a_plug_in_an_edit_to_the_config_names_is_refused_before_its_code_runs(stopped, capsys):
    folder, _ = stopped
    assert read_config(folder) == CFG
    plugin = folder / "edit.py"
    plugin.write_text("from pathlib import Path\nPath(__file__).with_name('ran').write_text('plug-in code ran')\n")
    (folder / CONFIG).write_text(tomli_w.dumps({**CFG.to_dict(), "plugins": [str(plugin)], "seed": 5}))
    named = f"was written with: plugins = ['{plugin}'] (checkpoint: []), seed = 5 (checkpoint: 0); undo the edit"
    assert main(["run", "--resume", str(folder), "--quiet"]) == 2
    assert named in capsys.readouterr().err
    assert named in refusal(folder)  # what mpfl export says of an unfinished run
    with pytest.raises(RunDirError, match="differs from the one its checkpoint.npz was written with: plugins"):
        read_config(folder)
    assert not (folder / "ran").exists()
    (folder / "summary.json").write_text("{}")  # a summary of its own does not make the edit the run's
    assert main(["export", str(folder)]) == 2
    assert "summary.json cannot be read (KeyError: 'config'), so the plug-ins" in capsys.readouterr().err
    assert not (folder / "ran").exists()


def test_an_export_of_a_finished_run_compares_the_plug_ins_with_its_summary_before_importing_any(tmp_path, capsys):
    folder = tmp_path / "run"
    simulate(CFG, folder)
    plugin = tmp_path / "edit.py"
    plugin.write_text("from pathlib import Path\nPath(__file__).with_name('ran').write_text('plug-in code ran')\n")
    (folder / CONFIG).write_text(tomli_w.dumps({**CFG.to_dict(), "plugins": [str(plugin)]}))
    assert main(["export", str(folder), "--out", str(tmp_path / "export")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"differs from the one its summary.json was written with: plugins = ['{plugin}'] (summary: []); undo" in err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "export").exists()
    (folder / "summary.json").rename(tmp_path / "summary.json")  # no record left: nothing to check the plug-ins by
    assert main(["export", str(folder), "--out", str(tmp_path / "export")]) == 2
    assert "holds a finished run's final.npz but neither its summary.json nor a checkpoint.npz" in " ".join(
        capsys.readouterr().err.split())
    assert not (tmp_path / "ran").exists()
    (tmp_path / "summary.json").rename(folder / "summary.json")
    (folder / CONFIG).write_text(tomli_w.dumps(CFG.to_dict()))  # no plug-ins: nothing to import, nothing to check
    (folder / "summary.json").write_text('{"truncated": ')
    assert main(["export", str(folder), "--out", str(tmp_path / "export")]) == 0


MALFORMED = {
    "no run": (None, "carries no run identity"),
    "no last record": (lambda run: run.pop("last_record"), "carries no run identity"),
    "run id not text": (lambda run: run.update(run_id=12), "its run identity or config is malformed"),
    "config not a table": (lambda run: run.update(config=[1]), "its run identity or config is malformed"),
    "no records": (lambda run: run.update(records=0), "its record count 0 or last record is malformed"),
    "records true": (lambda run: run.update(records=True), "its record count True or last record is malformed"),
    "last record a list": (lambda run: run.update(last_record=[3]), "or last record is malformed"),
    "last step as text": (lambda run: run["last_record"].update(step="3"), "or last record is malformed"),
    "plug-in hashes a list": (lambda run: run.update(plugins=["a"]), "its plug-in hashes or plug-in changes are malformed"),
    "plug-in changes a map": (lambda run: run.update(plugin_changes={}), "plug-in changes are malformed"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_run_metadata_in_the_checkpoint_is_damage(stopped, case):
    folder, run = stopped
    change, problem = MALFORMED[case]
    if change is None:
        run = None
    else:
        change(run)
    write_meta(folder, run)
    with pytest.raises(RunDirError) as refused:
        check_resumable(folder, CFG)
    assert "checkpoint.npz is damaged (" in str(refused.value) and problem in str(refused.value)


def test_without_a_checkpoint_a_run_of_one_round_starts_again_and_more_rounds_are_refused(stopped):
    folder, _ = stopped
    (folder / CHECKPOINT).unlink()
    write_log(folder, [record(1)])
    assert check_resumable(folder, CFG) is None
    write_log(folder, [record(1), record(2)])
    with pytest.raises(RunDirError, match="holds 2 rounds but .* has no checkpoint.npz"):
        check_resumable(folder, CFG)


def test_without_a_checkpoint_the_saved_config_must_be_the_one_asked_for(stopped):
    folder, _ = stopped
    (folder / CHECKPOINT).unlink()
    (folder / ROUNDS_JSONL).unlink()
    (folder / CONFIG).write_text(tomli_w.dumps(CFG.with_overrides({"rounds": 5}).to_dict()))
    with pytest.raises(RunDirError, match=r"another config: rounds = 2 \(config.toml: 5\)"):
        check_resumable(folder, CFG)


def test_the_log_up_to_the_checkpoint_is_kept_and_rounds_after_it_are_dropped(stopped):
    folder, run = stopped
    write_log(folder, [record(step) for step in (1, 2, 3, 4)], tail='{"step": 5, "pha')
    assert recover_records(folder, run, next_step=4) == [record(1), record(2), record(3)]


def test_more_rounds_past_the_checkpoint_than_a_crash_leaves_are_refused_not_dropped(stopped):
    folder, run = stopped
    write_log(folder, [record(step) for step in (1, 2, 3, 4, 5)])
    with pytest.raises(RunDirError, match=r"holds 2 rounds past checkpoint.npz \(steps 4, 5\), which a resume would "
                                          "drop: the checkpoint is older than the log"):
        recover_records(folder, run, next_step=4)


def test_a_last_line_a_crash_cut_is_put_back_from_the_checkpoint(stopped):
    folder, run = stopped
    write_log(folder, [record(1), record(2)], tail=json.dumps(record(3))[:20])
    assert recover_records(folder, run, next_step=4) == [record(1), record(2), record(3)]
    (folder / ROUNDS_JSONL).unlink()
    run = {**run, "records": 1, "last_record": record(1)}
    assert recover_records(folder, run, next_step=2) == [record(1)]


@pytest.mark.parametrize("log", [
    [record(1), record(3)],  # a round lost in the middle
    [record(2)],
    [record(1), record(1), record(2), record(3)],  # a round twice
])
def test_a_log_cut_or_edited_elsewhere_is_refused(stopped, log):
    folder, run = stopped
    write_log(folder, log)
    with pytest.raises(RunDirError, match=r"rounds? before step 4, but checkpoint.npz was written after 3 \(the last "
                                          r"one at step 3\): the log was cut or edited"):
        recover_records(folder, run, next_step=4)


def test_an_edited_last_round_is_named_against_the_checkpoints_copy(stopped):
    folder, run = stopped
    write_log(folder, [record(1), record(2), {**record(3), "accuracy": 0.9}])
    with pytest.raises(RunDirError, match=r"rounds.jsonl: the record of step 3 \(line 3\) differs from the copy in "
                                          r"checkpoint.npz, so the log was edited"):
        recover_records(folder, run, next_step=4)


def test_plug_in_changes_are_those_recorded_then_those_since_the_checkpoint(stopped, monkeypatch):
    folder, run = stopped
    assert plugin_changes(None, CFG) == []
    earlier = {"plugin": "a.py", "step": 2, "sha256_before": "1", "sha256_after": "2"}
    run.update(plugins={"a.py": "2", "b.py": "3"}, plugin_changes=[earlier])
    monkeypatch.setattr("mpfl.resume.fingerprints", lambda names: {"a.py": "2", "c.py": "4"})
    assert plugin_changes({"run": run}, CFG) == [
        earlier, {"plugin": "b.py", "step": 4, "sha256_before": "3", "sha256_after": None},
        {"plugin": "c.py", "step": 4, "sha256_before": None, "sha256_after": "4"}]
    del run["plugins"]
    assert plugin_changes({"run": run}, CFG) == []


def test_resuming_notes_each_plug_in_whose_code_changed_since_the_checkpoint(stopped, monkeypatch):
    folder, run = stopped
    run.update(plugins={"a.py": "0123456789abcdef", "b.py": "same"})
    write_meta(folder, run)
    monkeypatch.setattr("mpfl.resume.fingerprints", lambda names: {"a.py": "fedcba9876543210", "b.py": "same"})
    assert resume_notes(folder, CFG) == [
        "plug-in a.py changed since the last checkpoint (sha256 0123456789ab -> fedcba987654): the rounds from step 4 "
        "on run the new code, and the run's summary.json lists the change (plugin_changes)"]
    monkeypatch.setattr("mpfl.resume.fingerprints", lambda names: {"b.py": "same"})
    assert "(sha256 0123456789ab -> none)" in resume_notes(folder, CFG)[0]


def test_no_notes_without_a_readable_checkpoint(stopped):
    folder, run = stopped
    write_meta(folder, {**run, "records": 0})
    assert resume_notes(folder, CFG) == []
    (folder / CHECKPOINT).unlink()
    assert resume_notes(folder, CFG) == []
