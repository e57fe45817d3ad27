"""Continuing a run safely: the run's identity, the checks before a checkpoint is trusted, and the
round log recovered after a crash.

A run directory holds `run.json` (a random run id and the hash of the run's config) from its start,
and every checkpoint carries the same identity, the config itself, how many rounds were recorded
and the last of them. Before `mpfl run --resume` trusts a checkpoint it refuses one of another run,
or a config edited since (naming what differs), and reports a damaged file by name and cause; a last
line of `rounds.jsonl` that a crash cut short is put back from the checkpoint's copy. Records are
synced to disk before each checkpoint, so a checkpoint never gets ahead of the records it follows.

Plug-in code may change between a run's invocations (a plug-in that broke its contract is fixed and the
run resumed), so it is not refused: each checkpoint carries the plug-ins' source hashes, and a resumed
run lists every change, with the first step the new code ran, in its summary (`plugin_changes`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import tomli_w

from .checkpoint import CHECKPOINT, FINAL, damaged, int_in, load_checkpoint, read_meta
from .config import Config, flatten, refuse_quoted_values
from .core.params import ParamSpec, Weights
from .errors import MpflError, RunDirError
from .files import atomic_write
from .node import NodeState
from .plugins import fingerprints
from .records import CONFIG, ROUNDS_JSONL, RUN_JSON, SUMMARY, counted, read_rounds
from .server import ServerState

RUNTIME_FIELDS = frozenset({"workers"})
"""Fields that change how fast a run goes, never what it computes (worker processes give bit-identical
results; torch threads may not): a resumed run may change them."""
_IDENTITY_KEYS = ("run_id", "config_sha256")


def result_config(cfg: Config) -> dict:
    """The config as a plain dict without the runtime fields: what decides a run's results."""
    return _result_fields(cfg.to_dict())


def config_sha256(cfg: Config) -> str:
    """A hash of everything in the config that decides the run's results."""
    return hashlib.sha256(json.dumps(result_config(cfg), sort_keys=True).encode()).hexdigest()


def new_identity(cfg: Config) -> dict:
    """A fresh run identity: a random run id and the config's hash."""
    return {"run_id": uuid.uuid4().hex, "config_sha256": config_sha256(cfg)}


def write_identity(folder: Path, identity: dict) -> None:
    """Write `run.json` (atomically)."""
    atomic_write(folder / RUN_JSON, json.dumps(identity, indent=2) + "\n")


def read_identity(folder: Path) -> dict | None:
    """The identity in `run.json`, None if there is none; a damaged file is a RunDirError."""
    path = folder / RUN_JSON
    if not path.exists():
        return None
    try:
        identity = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise damaged(path, exc) from None
    if not isinstance(identity, dict) or not all(isinstance(identity.get(k), str) for k in _IDENTITY_KEYS):
        raise damaged(path, f"it does not hold {' and '.join(_IDENTITY_KEYS)}")
    return identity


def checkpoint_run(identity: dict, cfg: Config, records: list[dict], plugin_changes: list[dict]) -> dict:
    """What a checkpoint carries about its run: the identity, the config, the records so far (their
    number and the last one, which a crash may cut from the log), the plug-ins' source hashes and the
    changes to them since the run started."""
    return {**identity, "config": result_config(cfg), "records": len(records), "last_record": records[-1],
            "plugins": fingerprints(cfg.plugins), "plugin_changes": plugin_changes}


def plugin_changes(meta: dict | None, cfg: Config) -> list[dict]:
    """The plug-in changes of a run resumed from the checkpoint `meta` (None: a run from step 1): those
    it recorded, and one per plug-in whose source now differs from the checkpoint's, from the next step
    on (`plugin`, `step`, `sha256_before`, `sha256_after`; a hash is None where there was no file)."""
    if meta is None:
        return []
    run = meta["run"]
    if "plugins" not in run:  # written by an mpfl that did not hash plug-ins: nothing to compare with
        return []
    before, now = run["plugins"], fingerprints(cfg.plugins)
    step = run["last_record"]["step"] + 1
    return list(run.get("plugin_changes", [])) + [
        {"plugin": name, "step": step, "sha256_before": before.get(name), "sha256_after": now.get(name)}
        for name in sorted(before.keys() | now.keys()) if before.get(name) != now.get(name)]


def changes(saved: dict, current: dict, source: str = "checkpoint") -> str:
    """The fields on which two config dicts differ, as ``field = now (checkpoint: before)``, naming where
    the saved config comes from."""
    old, new = flatten(saved, prefixed=True), flatten(current, prefixed=True)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    shown = [f"{k} = {new.get(k, 'unset')!r} ({source}: {old.get(k, 'unset')!r})" for k in keys[:5]]
    return ", ".join(shown) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "") if keys else "no field"


def _run_info(folder: Path, meta: dict) -> dict:
    """The run identity a checkpoint carries; one without it is refused."""
    run = meta.get("run")
    keys = (*_IDENTITY_KEYS, "config", "records", "last_record")
    if not isinstance(run, dict) or not all(k in run for k in keys):
        raise damaged(folder / CHECKPOINT, "it carries no run identity; it was written by an older mpfl or edited")
    if not (all(isinstance(run[k], str) for k in _IDENTITY_KEYS) and isinstance(run["config"], dict)):
        raise damaged(folder / CHECKPOINT, "its run identity or config is malformed")
    last = run["last_record"]
    if not (int_in(run["records"], 1) and isinstance(last, dict) and int_in(last.get("step"), 1)):
        raise damaged(folder / CHECKPOINT, f"its record count {run['records']!r} or last record is malformed")
    if not (isinstance(run.get("plugins", {}), dict) and isinstance(run.get("plugin_changes", []), list)):
        raise damaged(folder / CHECKPOINT, "its plug-in hashes or plug-in changes are malformed")
    return run


def resume_notes(folder: Path, cfg: Config) -> list[str]:
    """What a user resuming the run in `folder` should know before it goes on: the plug-ins whose code
    changed since its checkpoint. Empty when there is no readable checkpoint (the run then says why)."""
    try:
        meta = read_meta(folder) if (folder / CHECKPOINT).exists() else None
        known = list(_run_info(folder, meta).get("plugin_changes", [])) if meta is not None else []
        new = plugin_changes(meta, cfg)[len(known):]
    except (RunDirError, OSError):
        return []
    return [f"plug-in {c['plugin']} changed since the last checkpoint (sha256 {_short(c['sha256_before'])} -> "
            f"{_short(c['sha256_after'])}): the rounds from step {c['step']} on run the new code, and the run's "
            "summary.json lists the change (plugin_changes)" for c in new]


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "none"


def check_resumable(folder: Path, cfg: Config | None) -> dict | None:
    """The checkpoint's metadata once it is known to be this run's and written with this config; None
    when there is no checkpoint yet (the run starts again from step 1). Cheap: no arrays are read.
    Without `cfg`, the checks that compare configs are left out (building one imports its plug-ins)."""
    if not (folder / CHECKPOINT).exists():
        recorded = read_rounds(folder) if (folder / ROUNDS_JSONL).exists() else []
        if len(recorded) > 1:
            raise RunDirError(f"{folder / ROUNDS_JSONL} holds {len(recorded)} rounds but {folder} has no {CHECKPOINT} "
                              "(removed?), so the run cannot continue from them; start a new run with --out NEW_DIR")
        if cfg is None:
            return None
        saved, asked = result_config(Config.from_toml(folder / CONFIG)), result_config(cfg)
        if saved != asked:
            raise RunDirError(f"the run in {folder} was started with another config: {changes(saved, asked, CONFIG)}; "
                              f"resume it with the config in {folder / CONFIG}, or start a new run in another folder")
        return None
    meta = read_meta(folder)
    run = _run_info(folder, meta)
    identity = read_identity(folder)
    if identity is not None and run["run_id"] != identity["run_id"]:
        raise RunDirError(f"{folder / CHECKPOINT} belongs to another run (run id {run['run_id'][:12]}, but "
                          f"{folder / RUN_JSON} names {identity['run_id'][:12]}); put this run's checkpoint back, "
                          "or start a new run with --out NEW_DIR")
    if cfg is not None and run["config_sha256"] != config_sha256(cfg):
        raise _edited(folder, run["config"], result_config(cfg))
    return meta


def _edited(folder: Path, saved: dict, current: dict, source: str = CHECKPOINT) -> RunDirError:
    """The error for a config that differs from the one the folder's checkpoint (or summary) was written with."""
    foreign = "" if (folder / RUN_JSON).exists() else f" (or, if {source} is another run's, put this run's back)"
    return RunDirError(f"the config of {folder} differs from the one its {source} was written with: "
                       f"{changes(saved, current, source.split('.')[0])}; undo the edit to {folder / CONFIG}{foreign}, "
                       "or start a new run with --out NEW_DIR")


def read_config(folder: Path) -> Config:
    """The saved config of the run in `folder`. Building a config imports the plug-ins it names, that is, runs
    their code, so when `config.toml` names plug-ins they are first compared, as the file holds them, with
    those the run recorded (in its summary once finished, else in its checkpoint, after `check_resumable`'s
    checks without a config): an edit naming another plug-in is refused before any plug-in is imported."""
    data = Config.read_toml(folder / CONFIG)
    if data.get("plugins"):
        recorded, source = _recorded_config(folder)
        if recorded is not None and data["plugins"] != recorded.get("plugins", []):
            raise _edited(folder, *(_result_fields(config) for config in (recorded, data)), source)
    refuse_quoted_values(data)
    return Config.from_dict(data)


def _recorded_config(folder: Path) -> tuple[dict | None, str]:
    """The config the run in `folder` recorded, and where: its summary's once finished, else its checkpoint's
    (None when it has neither: a run that has not reached its first checkpoint)."""
    if (folder / SUMMARY).exists():
        try:
            config = json.loads((folder / SUMMARY).read_text())["config"]
            if not isinstance(config, dict):
                raise TypeError(f"its config is a {type(config).__name__}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunDirError(f"{folder / SUMMARY} cannot be read ({type(exc).__name__}: {exc}), so the plug-ins "
                              f"{folder / CONFIG} names cannot be checked against those the run loaded; restore the "
                              "file from a copy") from None
        return config, SUMMARY
    if (folder / FINAL).exists() and not (folder / CHECKPOINT).exists():
        raise RunDirError(f"{folder} holds a finished run's {FINAL} but neither its {SUMMARY} nor a {CHECKPOINT}, so "
                          f"the plug-ins {folder / CONFIG} names cannot be checked against those the run loaded; "
                          f"restore {SUMMARY} from a copy")
    meta = check_resumable(folder, None)
    return (meta["run"]["config"] if meta is not None else None), CHECKPOINT


def _result_fields(config: dict) -> dict:
    """A config dict's fields that decide a run's results (those `changes` may name)."""
    return {key: value for key, value in config.items() if key not in RUNTIME_FIELDS}


def refusal(folder: Path, *, plugins: bool = True) -> str | None:
    """Why ``mpfl run --resume folder`` would be refused by its first checks (None: they pass), so that a
    report or export never suggests a resume that fails. Without `plugins`, a run whose config names
    plug-ins is checked without its config, whose reading would run their code. Cheap: no arrays are read."""
    try:
        skip = not plugins and bool(Config.read_toml(folder / CONFIG).get("plugins"))
        meta = check_resumable(folder, None if skip else read_config(folder))
        if meta is not None and isinstance(meta.get("next_step"), int):
            recover_records(folder, _run_info(folder, meta), meta["next_step"])
    except MpflError as exc:
        return str(exc)
    return None


def restart(folder: Path, cfg: Config) -> dict:
    """A run that starts from step 1 (a new one, or one resumed before its first checkpoint): its config
    and a fresh identity are written."""
    identity = new_identity(cfg)
    atomic_write(folder / CONFIG, tomli_w.dumps(cfg.to_dict()))
    write_identity(folder, identity)
    return identity


def recover_records(folder: Path, run: dict, next_step: int) -> list[dict]:
    """The records up to the checkpoint: those in `rounds.jsonl`, with the checkpointed round's line put
    back from the checkpoint when a crash cut it, less the one round a crash may have logged past it
    (it is redone); any other gap or extra round is a RunDirError."""
    path = folder / ROUNDS_JSONL
    logged = read_rounds(folder) if path.exists() else []
    records = [r for r in logged if r["step"] < next_step]
    beyond = [r["step"] for r in logged if r["step"] >= next_step]
    if len(beyond) > 1:  # a crash leaves at most one: the round whose checkpoint it prevented, which is redone
        raise RunDirError(f"{path} holds {len(beyond)} rounds past {CHECKPOINT} (steps {', '.join(map(str, beyond))}), "
                          "which a resume would drop: the checkpoint is older than the log (put back from a copy?); "
                          "restore the checkpoint written with the log, or start a new run with --out NEW_DIR")
    last = run["last_record"]
    if len(records) == run["records"] - 1 and all(r["step"] < last["step"] for r in records):
        records.append(last)
    if len(records) == run["records"] and records and json.dumps(records[-1]) != json.dumps(last):
        raise RunDirError(f"{path}: the record of step {last['step']} (line {len(records)}) differs from the copy in "
                          f"{CHECKPOINT}, so the log was edited; restore it, or start a new run with --out NEW_DIR")
    if len(records) != run["records"]:
        raise RunDirError(f"{path} holds {counted(len(records), 'round')} before step {next_step}, but {CHECKPOINT} was written "
                          f"after {run['records']} (the last one at step {last['step']}): the log was cut or "
                          "edited; restore it, or start a new run with --out NEW_DIR")
    return records


def load_resumed(folder: Path, cfg: Config, spec: ParamSpec, w0: Weights, meta: dict, steps: int
                 ) -> tuple[ServerState, dict[int, NodeState], list[dict], dict]:
    """The server and node states, the records so far and the identity of a run `check_resumable` accepted;
    `w0` are the initial weights its config builds, which the checkpoint must hold."""
    server, nodes = load_checkpoint(folder, spec, steps=steps, nodes=cfg.nodes, w0=w0)
    run = _run_info(folder, meta)
    records = recover_records(folder, run, server.next_step)
    identity = {k: run[k] for k in _IDENTITY_KEYS}
    if read_identity(folder) is None:  # lost: the checkpoint, now accepted with the log, names the run
        write_identity(folder, identity)
    return server, nodes, records, identity
