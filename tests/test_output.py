"""What a run shows and leaves behind: round lines and ETA, Ctrl-C held back while a round is
written, TensorBoard events across a resume, and the memory estimate against measured peaks."""

import io
import json
import os
import signal

import pytest

from conftest import tiny_config
from mpfl.config import Config
from mpfl.errors import ResourceError
from mpfl.interrupts import deferred_interrupts
from mpfl.methods import plan
from mpfl.progress import Eta, RoundLog, format_seconds, round_text
from mpfl.records import read_rounds
from mpfl.resources import PROCESS_BYTES, check_memory, estimate_run, fit_workers
from mpfl.sim import simulate


def _record(step: int, phase: str, time: float, **extra) -> dict:
    return {"step": step, "phase": phase, "round": step, "time": time, "accuracy": None, "loss": None,
            "density": 0.5, "cum_bytes_up": 1_000_000, "cum_bytes_down": 2_000_000, **extra}


def test_eta_weighs_the_rounds_left_by_their_phase():
    cfg = Config().with_overrides({"mask_rounds": 2, "rounds": 3})
    eta = Eta(plan(cfg))
    assert eta.add(_record(1, "mask", 3.0)) == pytest.approx(3.0 + 3 * 3.0)  # training not seen yet: overall mean
    assert eta.add(_record(2, "mask", 5.0)) == pytest.approx(3 * 4.0)
    assert eta.add(_record(3, "train", 1.0)) == pytest.approx(2 * 1.0)
    assert eta.add(_record(5, "train", 1.0)) == 0


def test_round_lines_and_json_events():
    cfg = Config().with_overrides({"mask_rounds": 1, "rounds": 1})
    text, events = io.StringIO(), io.StringIO()
    for fmt, stream in (("text", text), ("json", events)):
        with RoundLog(plan(cfg), log_format=fmt, stream=stream) as log:
            log(_record(1, "mask", 2.0, dropped={"3": "dropped out"}))
            log(_record(2, "train", 1.0, accuracy=0.9123, loss=0.25))
    lines = text.getvalue().splitlines()
    assert lines[0].startswith("round   1/2   mask") and "eta 2 s" in lines[0] and "node 3: dropped out" in lines[0]
    assert "acc 91.23%  loss 0.2500" in lines[1] and lines[1].endswith("eta 0 s")
    assert [json.loads(line)["eta_s"] for line in events.getvalue().splitlines()] == [2.0, 0]
    assert round_text(_record(1, "mask", 0.5), 2, None).endswith("eta ?")
    assert lines[0].index("density") == lines[1].index("density")  # the columns line up with and without accuracy
    assert lines[0].index(" MB so far") == lines[1].index(" MB so far")
    assert [format_seconds(s) for s in (4.4, 65, 7300)] == ["4 s", "1 min 05 s", "2 h 01 min"]


def test_quiet_shows_nothing():
    stream = io.StringIO()
    with RoundLog(plan(Config()), quiet=True, stream=stream) as log:
        log(_record(1, "mask", 1.0))
    assert stream.getvalue() == ""


def test_ctrl_c_inside_a_deferred_block_arrives_when_it_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("still writing")
    assert done == ["still writing"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_tensorboard_events_of_a_resumed_run_hold_every_step_once(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mpfl.tensorboard import TensorBoardLog

    cfg, out, board = tiny_config(rounds=3, mask_rounds=2), tmp_path / "run", tmp_path / "tb"

    def stop_after_step_3(record):
        log(record)
        if record["step"] == 3:
            raise KeyboardInterrupt

    log = TensorBoardLog(board)
    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, out, on_round=stop_after_step_3)
    log.close()
    log = TensorBoardLog(board)
    simulate(cfg, out, on_round=log, resume=True)
    log.close()
    events = EventAccumulator(str(board))
    events.Reload()
    assert [e.step for e in events.Scalars("bytes/up")] == [r["step"] for r in read_rounds(out)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("model, nodes, measured_mib", [("mlp", 1000, 2071), ("mlp", 3000, 5323), ("cnn", 10, 694),
                                                        ("cnn", 100, 1879)])
def test_the_memory_estimate_is_close_to_measured_peaks(model, nodes, measured_mib):
    estimate = estimate_run(Config().with_overrides({"model": model, "nodes": nodes}))
    assert 0.9 * measured_mib <= estimate.total / 2**20 <= 1.2 * measured_mib


def test_automatic_workers_shrink_to_what_fits_and_set_ones_stay(monkeypatch):
    import mpfl.parallel

    monkeypatch.setattr(mpfl.parallel, "available_cores", lambda: 8)
    auto = Config().with_overrides({"workers": 0})
    full = estimate_run(auto)
    one = estimate_run(auto.with_overrides({"workers": 1}))
    assert full.total == one.total + 8 * PROCESS_BYTES  # 8 workers beside the run's own process
    assert fit_workers(auto, full, full.total) is auto and fit_workers(auto, full, None) is auto
    assert fit_workers(auto, full, full.total - 1).workers == 7
    assert fit_workers(auto, full, full.total - 6 * PROCESS_BYTES).workers == 2
    assert fit_workers(auto, full, full.total - 6 * PROCESS_BYTES - 1).workers == 1  # one worker is no worker: the run's own
    assert fit_workers(auto, full, 0).workers == 1  # the memory check then says what else to lower
    set_by_user = auto.with_overrides({"workers": 8})
    assert fit_workers(set_by_user, estimate_run(set_by_user), 0) is set_by_user


def test_workers_beyond_the_nodes_cost_nothing_and_a_too_large_fixed_part_names_its_levers():
    capped = estimate_run(Config().with_overrides({"nodes": 4, "workers": 100}))
    assert capped == estimate_run(Config().with_overrides({"nodes": 4, "workers": 4}))
    with pytest.raises(ResourceError, match="use fewer --workers") as refused:
        check_memory(capped, capped.fixed - 1)
    assert "--train-samples" not in str(refused.value)  # the estimate counts the whole dataset whatever the slice
    assert capped == estimate_run(Config().with_overrides({"nodes": 4, "workers": 4, "train_samples": 600}))
    with pytest.raises(ResourceError, match="use at most --nodes 2"):
        check_memory(capped, capped.fixed + 2 * capped.per_node + 1)


def test_a_run_whose_mask_history_cannot_fit_is_told_to_use_fewer_rounds():
    """The history of a long run is most of its fixed memory: the levers named are the rounds, not
    the workers or the data."""
    short, long = (estimate_run(Config().with_overrides({"rounds": rounds})) for rounds in (10, 400_000))
    assert long.history > 1000 * short.history and long.fixed - long.history == short.fixed - short.history
    with pytest.raises(ResourceError, match=r"of it for the server's history of consensus masks .* use fewer --rounds"):
        check_memory(long, long.fixed - 1)
    with pytest.raises(ResourceError, match="use fewer --workers"):
        check_memory(short, short.fixed - 1)


def test_round_records_and_the_summary_have_the_keys_their_contracts_name_with_their_types(tmp_path):
    """`RoundRecord` is the records' contract and `RunSummary` the summary's: every key a run writes is
    named there, with its type."""
    import types
    import typing

    from mpfl.protocol import RoundRecord
    from mpfl.records import RunSummary, summary_problem

    def allowed(hint) -> tuple[type, ...]:
        parts = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        return tuple(typing.get_origin(part) or part for part in parts)

    result = simulate(tiny_config(rounds=4), tmp_path / "run")
    hints = typing.get_type_hints(RoundRecord)
    written = read_rounds(tmp_path / "run")
    assert [set(r) for r in written] == [set(r) for r in result.records]
    for record in written:
        assert RoundRecord.__required_keys__ <= set(record) <= set(hints), set(record) ^ set(hints)
        assert all(isinstance(value, allowed(hints[key])) for key, value in record.items()), record
    assert {"hamming", "agreement", "vote_weights"} <= set(written[0])
    assert set(result.summary) <= set(typing.get_type_hints(RunSummary)) and summary_problem(result.summary) is None
    assert any("swapped" in r for r in written if r["phase"] == "train")  # an adaptation round


def test_a_rounds_dropped_nodes_name_each_reason_once_in_the_order_first_seen():
    from mpfl.progress import round_text

    dropped = {"0": "no reply within 60 s", "2": "rejected: checksum mismatch", "3": "no reply within 60 s"}
    assert round_text(_record(1, "train", 1.0, dropped=dropped), 2, None).endswith(
        "  dropped nodes 0, 3: no reply within 60 s; node 2: rejected: checksum mismatch")
