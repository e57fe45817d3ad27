"""Plug-ins: a method defined outside the package runs from the CLI and in worker processes;
registries give one error type; names are restored after each test."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import comparable, tiny_config
from mpfl.checkpoint import load_final, read_meta
from mpfl.cli import main
from mpfl.config import Config
from mpfl.core import masks
from mpfl.errors import ConfigError, MethodError
from mpfl.methods import METHODS
from mpfl.records import read_rounds
from mpfl.registry import Registry, UnknownNameError
from mpfl.resume import resume_notes
from mpfl.sim import simulate

EXAMPLE = Path(__file__).parents[1] / "examples" / "custom_method.py"
SMALL = ["--nodes", "3", "--rounds", "1", "--mask-rounds", "2", "--train-samples", "1500", "--test-samples", "300",
         "--threads", "1", "--workers", "1", "--quiet"]


def run_example(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    args = ["run", "--plugins", str(EXAMPLE), "--method", "mpfl-dense-head", *SMALL, *extra, "--out", str(out)]
    assert main(args) == 0
    return out


def test_the_example_method_runs_from_the_cli_and_keeps_the_classifier_dense(tmp_path):
    out = run_example(tmp_path, "one")
    mask = load_final(out).mask
    assert "5.weight" not in mask and {"1.weight", "3.weight"} <= set(mask)
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == round(0.1 * sum(m.size for m in mask.values()))  # the others share the budget
    config = (out / "config.toml").read_text()
    assert "mpfl-dense-head" in config and str(EXAMPLE) in config
    mpfl = simulate(tiny_config(nodes=3, rounds=1, mask_rounds=2, train_samples=1500, test_samples=300))
    assert len(mpfl.mask) == 3 and len(mask) == 2


@pytest.mark.slow
def test_the_example_method_runs_in_worker_processes_with_the_same_results(tmp_path):
    one, two = run_example(tmp_path, "one"), run_example(tmp_path, "two", "--workers", "2")
    rows = [[json.loads(line) for line in (d / "rounds.jsonl").read_text().splitlines()] for d in (one, two)]
    keys = ("step", "accuracy", "loss", "bytes_up", "bytes_down", "density")
    assert [{k: r[k] for k in keys} for r in rows[0]] == [{k: r[k] for k in keys} for r in rows[1]]
    a, b = load_final(one), load_final(two)
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)


def test_a_plugin_that_cannot_be_imported_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    assert main(["run", "--plugins", str(tmp_path / "missing.py"), *SMALL, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "missing.py" in err and "could not be imported" in err and "Pass a module name" in err
    assert "relative path" not in err  # an absolute path was given
    assert not (tmp_path / "r").exists()
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--plugins", "missing.py", *SMALL, "--out", str(tmp_path / "r")]) == 2
    assert (f"(a relative path is read from the folder mpfl runs in, here {tmp_path}; for a recorded run, that is the "
            "folder it was started in; or give an absolute path)") in capsys.readouterr().err
    (tmp_path / "beside_xyz.py").write_text("")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert main(["run", "--plugins", "beside_xyz", *SMALL, "--out", str(tmp_path / "r")]) == 2
    assert ("(beside_xyz is in the folder mpfl runs in, which is not on the Python path of the mpfl command: pass "
            "--plugins beside_xyz.py)") in capsys.readouterr().err
    for name in (".rel", "pkg.", "two..dots", "has space"):
        assert main(["run", "--plugins", name, *SMALL, "--out", str(tmp_path / "r")]) == 2
        assert f"plug-in {name!r} is neither a module name" in capsys.readouterr().err
    (tmp_path / "json.py").write_text("import mpfl\n")  # hidden behind the standard library's json
    assert main(["run", "--plugins", "json", *SMALL, "--out", str(tmp_path / "r")]) == 2
    assert ("plug-in 'json' names a module of Python's standard library, which registers nothing; rename your module, "
            "or pass the path of its file (--plugins ./json.py)") in capsys.readouterr().err
    (tmp_path / "pkg_xyz").mkdir()
    (tmp_path / "pkg_xyz" / "__init__.py").write_text("")
    for name in ("pkg_xyz", "pkg_xyz.sub"):  # a package: its name cannot be given as a file
        assert main(["run", "--plugins", name, *SMALL, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert f"plug-in {name!r} could not be imported: ModuleNotFoundError" in err, err
        assert "(pkg_xyz is in the folder mpfl runs in, which is not on the Python path of the mpfl command: run " \
               "PYTHONPATH=. mpfl ... or python -m mpfl ...)" in err
    monkeypatch.syspath_prepend(str(tmp_path))  # the folder on the path: only the sub-module is missing
    assert main(["run", "--plugins", "pkg_xyz.nosub", *SMALL, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "No module named 'pkg_xyz.nosub'" in err and "PYTHONPATH" not in err
    for module, text in (("nosuchmodule_xyz", "could not be imported: ModuleNotFoundError"),
                         ("mpfl.core.nosuchmodule_xyz", "could not be imported: ModuleNotFoundError")):
        assert main(["run", "--plugins", module, *SMALL, "--out", str(tmp_path / "r")]) == 2
        assert text in capsys.readouterr().err


def test_two_plugins_registering_one_name_are_refused_naming_the_second(tmp_path, capsys):
    for name in ("first.py", "second.py"):
        (tmp_path / name).write_text("import mpfl\n\nmpfl.register_rule('same', lambda votes, support, ctx: support)\n")
    argv = ["run", "--plugins", str(tmp_path / "first.py"), "--plugins", str(tmp_path / "second.py"), *SMALL]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"a consensus rule named 'same' is already registered (by {tmp_path / 'first.py'})" in err
    assert err.endswith(f"(while importing plug-in '{tmp_path / 'second.py'}')")
    (tmp_path / "third.py").write_text("import mpfl\n\nmpfl.register_rule('vote', lambda votes, support, ctx: support)\n")
    assert main(["run", "--plugins", str(tmp_path / "third.py"), *SMALL, "--out", str(tmp_path / "r")]) == 2
    assert "a consensus rule named 'vote' is already registered (built in)" in capsys.readouterr().err


def test_a_plugin_whose_own_code_fails_is_told_where_and_not_to_change_its_path(tmp_path, capsys):
    plugin = tmp_path / "broken.py"
    plugin.write_text("import mpfl\n\nlimit = 1 / 0\n")
    assert main(["run", "--plugins", str(plugin), *SMALL, "--out", str(tmp_path / "r")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"plug-in '{plugin}' failed while it was imported: " in err and f"(at {plugin}:3); fix the plug-in" in err
    assert "Pass a module name" not in err and not (tmp_path / "r").exists()
    plugin.write_text("import mpfl\n\ndef rule(votes, support, ctx:\n    return support\n")  # the compiler's error
    assert main(["run", "--plugins", str(plugin), *SMALL, "--out", str(tmp_path / "r")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"failed while it was imported: SyntaxError: '(' was never closed (at {plugin}:3); fix the plug-in" in err


def test_a_config_names_its_plugins_so_the_method_is_known_when_it_is_built(tmp_path):
    (tmp_path / "my_plugin.py").write_text(
        "from mpfl.methods import register_method\nfrom mpfl.methods.mpfl import Local\n\n"
        "@register_method\nclass Solo(Local):\n    name = 'solo-test'\n")
    with pytest.raises(UnknownNameError, match="method = 'solo-test'"):
        Config().with_overrides({"method": "solo-test"})
    cfg = Config().with_overrides({"method": "solo-test", "plugins": str(tmp_path / "my_plugin.py")})
    assert cfg.method == "solo-test" and "solo-test" in METHODS


def test_a_plugin_that_calls_sys_exit_stops_the_run_with_its_code_and_says_how_to_resume(tmp_path, capsys):
    plugin = tmp_path / "quits.py"
    plugin.write_text("import sys\nfrom mpfl.methods import register_method\nfrom mpfl.methods.mpfl import Mpfl\n\n"
                      "@register_method\nclass Quits(Mpfl):\n    name = 'quits-test'\n\n"
                      "    def train_round(self, server, step):\n        sys.exit(3)\n")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["run", "--plugins", str(plugin), "--method", "quits-test", *SMALL, "--out", str(out)])
    assert stopped.value.code == 3
    assert f"called sys.exit(3); continue with: mpfl run --resume {out}" in " ".join(capsys.readouterr().err.split())
    broken = hashlib.sha256(plugin.read_bytes()).hexdigest()
    plugin.write_text(plugin.read_text().replace("        sys.exit(3)", "        return super().train_round(server, step)"))
    mended = hashlib.sha256(plugin.read_bytes()).hexdigest()
    resumed = subprocess.run([sys.executable, "-m", "mpfl", "run", "--resume", str(out)], capture_output=True,
                             text=True, timeout=120)  # a new process, as a user's resume: the mended plug-in
    assert resumed.returncode == 0, resumed.stderr
    assert [json.loads(line)["phase"] for line in (out / "rounds.jsonl").read_text().splitlines()] == ["mask"] * 2 + ["train"]
    assert (f"note: plug-in {plugin} changed since the last checkpoint (sha256 {broken[:12]} -> {mended[:12]}): the "
            "rounds from step 3 on run the new code") in " ".join(resumed.stderr.split())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"]["plugins"] == {str(plugin): mended}
    assert summary["plugin_changes"] == [{"plugin": str(plugin), "step": 3, "sha256_before": broken, "sha256_after": mended}]


def test_a_run_records_the_hash_of_each_plugin_it_imported_and_an_unchanged_resume_lists_no_change(tmp_path, monkeypatch):
    by_path = tmp_path / "by_path.py"
    by_path.write_text("X = 1\n")
    module = _importable_plugin(tmp_path, monkeypatch, "hashed_plugin")
    cfg = tiny_config(nodes=2, rounds=1, mask_rounds=1, plugins=[str(by_path), "hashed_plugin"],
                      method="hashed-plugin")
    out = tmp_path / "run"
    simulate(cfg, out, keep_checkpoint=True)
    expected = {str(by_path): hashlib.sha256(by_path.read_bytes()).hexdigest(),
                "hashed_plugin": hashlib.sha256(module.read_bytes()).hexdigest()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"]["plugins"] == expected and "plugin_changes" not in summary
    assert read_meta(out)["run"]["plugins"] == expected
    assert resume_notes(out, cfg) == []
    by_path.write_text("X = 2\n")  # edited after this process imported it: the run's code is still the first
    assert resume_notes(out, cfg) == []


def test_a_plugin_that_calls_sys_exit_in_a_worker_process_ends_the_run_the_same_way(tmp_path, capsys):
    plugin = tmp_path / "quits_in_node.py"
    plugin.write_text("import sys\nimport mpfl\nmpfl.register_criterion('quits', lambda *args, **kw: sys.exit(4))\n")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["run", "--plugins", str(plugin), "--criterion", "quits", *SMALL, "--workers", "2", "--out", str(out)])
    assert stopped.value.code == 4
    assert f"called sys.exit(4); continue with: mpfl run --resume {out}" in " ".join(capsys.readouterr().err.split())


def _importable_plugin(tmp_path: Path, monkeypatch, module: str) -> Path:
    """A plug-in file that registers the method `module` (dashes for underscores), importable as `module`."""
    path = tmp_path / f"{module}.py"
    path.write_text("from mpfl.methods import register_method\nfrom mpfl.methods.mpfl import Local\n\n"
                    f"@register_method\nclass Plugged(Local):\n    name = {module.replace('_', '-')!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return path


def test_a_plugin_file_the_script_imported_itself_is_not_run_twice(tmp_path, monkeypatch):
    import importlib

    path = _importable_plugin(tmp_path, monkeypatch, "own_plugin_test")
    importlib.import_module("own_plugin_test")  # as `import own_plugin_test` in a user's script
    cfg = Config().with_overrides({"method": "own-plugin-test", "plugins": str(path)})
    assert cfg.method == "own-plugin-test" and METHODS.get(cfg.method) is sys.modules["own_plugin_test"].Plugged
    monkeypatch.delitem(sys.modules, "own_plugin_test")


def test_a_plugin_named_by_path_and_then_by_module_runs_once(tmp_path, monkeypatch):
    path = _importable_plugin(tmp_path, monkeypatch, "twice_plugin_test")
    cfg = Config().with_overrides({"method": "twice-plugin-test", "plugins": [str(path), "twice_plugin_test"]})
    assert METHODS.get(cfg.method) is sys.modules["twice_plugin_test"].Plugged
    monkeypatch.delitem(sys.modules, "twice_plugin_test")


def test_registries_share_one_name_rule_and_one_error():
    reg: Registry[int] = Registry("widget")
    reg.register(" Big-One ", 1, aliases=("big",))
    assert reg.get("BIG-ONE") == 1 and reg.get("Big") == 1 and "big-one" in reg and reg.names() == ("big-one",)
    with pytest.raises(UnknownNameError, match="unknown widget 'big-on'.*Did you mean 'big-one'") as err:
        reg.get("big-on")
    assert isinstance(err.value, ValueError)
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("BIG", 2)
    reg.register("big-one", 3, replace=True)
    assert reg.get("big-one") == 3


@pytest.mark.parametrize("name", ["my-task", "2nd", "my task", ""])
def test_a_node_task_needs_a_name_flower_can_route(name):
    from mpfl.node import NODE_TASKS, register_task

    with pytest.raises(ConfigError, match="letters, digits and underscores"):
        register_task(name, lambda node, step, weights: [])
    register_task("my_task_2", lambda node, step, weights: [])
    assert "my_task_2" in NODE_TASKS


def test_a_plug_in_rule_or_aggregator_that_says_what_it_reads_gets_the_idle_flag_notes():
    from mpfl.core.aggregate import register_aggregator, weighted_average
    from mpfl.core.consensus import register_rule
    from mpfl.notes import idle_flags

    def keep(votes, support, ctx):
        return [s.copy() for s in support]

    def mean(tensors, weights, **_):
        return weighted_average(tensors, weights)

    register_rule("reads-tau-test", keep, reads="tau")  # one name as a string
    register_rule("silent-test", keep)
    register_aggregator("reads-trim-test", mean, reads=["trim"])
    register_aggregator("silent-agg-test", mean)
    said = Config().with_overrides({"consensus": "reads-tau-test", "aggregator": "reads-trim-test"})
    unsaid = Config().with_overrides({"consensus": "silent-test", "aggregator": "silent-agg-test"})
    flags = ["tau", "percentile", "trim", "byzantine"]
    assert idle_flags(said, flags) == ["--percentile has no effect with --consensus reads-tau-test",
                                       "--byzantine has no effect with --aggregator reads-trim-test"]
    assert idle_flags(unsaid, flags) == []


@pytest.mark.parametrize("register, reads, phrase", [
    ("rule", ("tua",), r"consensus rule 'typo-test': reads = 'tua' is not a setting it is given; name some of "
                       r"percentile, tau"),
    ("rule", 5, r"consensus rule 'typo-test': reads = 5 must be setting names"),
    ("aggregator", [["trim"]], r"aggregator 'typo-test': reads = \[\['trim'\]\] must be setting names"),
    ("aggregator", ("trim", "lr"), r"aggregator 'typo-test': reads = 'lr' is not a setting it is given; name some of "
                                   r"byzantine, trim"),
])
def test_a_plug_in_naming_a_setting_it_is_not_given_is_refused_as_it_registers(register, reads, phrase):
    from mpfl.core.aggregate import register_aggregator
    from mpfl.core.consensus import RULES, register_rule

    with pytest.raises(ConfigError, match=phrase):
        if register == "rule":
            register_rule("typo-test", lambda votes, support, ctx: support, reads=reads)
        else:
            register_aggregator("typo-test", lambda tensors, weights, **_: tensors[0], reads=reads)
    assert "typo-test" not in RULES


@pytest.mark.parametrize("name", ["my/model", "back\\slash"])
def test_a_name_that_would_split_a_folder_name_is_refused(name):
    from mpfl.models import register_model

    with pytest.raises(ConfigError) as info:
        register_model(name, lambda input_shape, num_classes: None)
    assert str(info.value) == f"a model name cannot hold '/' or '\\' ({name!r}): run and study folders are named after it"


def test_registrations_are_undone_between_tests_part_one():
    from mpfl.core.consensus import RULES, register_rule

    register_rule("only-in-this-test", lambda votes, support, ctx: support)
    assert "only-in-this-test" in RULES


def test_registrations_are_undone_between_tests_part_two():
    from mpfl.core.consensus import RULES

    assert "only-in-this-test" not in RULES


def test_installed_packages_announce_plugins_by_entry_point(tmp_path, monkeypatch):
    from mpfl import plugins
    from mpfl.core.consensus import RULES

    (tmp_path / "mpfl_fake_plugin.py").write_text(
        "from mpfl.core.consensus import register_rule\n\n"
        "register_rule('keep-support-test', lambda votes, support, ctx: [s.copy() for s in support])\n")
    info = tmp_path / "mpfl_fake_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mpfl-fake-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mpfl.plugins]\nfake = mpfl_fake_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins._loaded.discard(plugins.ENTRY_POINT_GROUP)
    assert "keep-support-test" not in RULES
    cfg = Config().with_overrides({"consensus": "keep-support-test"})
    assert cfg.prune.consensus == "keep-support-test"
    assert plugins.installed_plugins()["fake"] == "mpfl-fake-plugin 0.1"  # what a run's summary records
    summary = simulate(tiny_config(nodes=2, rounds=1, mask_rounds=1, consensus="keep-support-test")).summary
    assert summary["versions"]["plugin_packages"]["fake"] == "mpfl-fake-plugin 0.1"


def test_a_method_that_breaks_its_contract_is_refused_with_what_it_must_do(tmp_path):
    from mpfl.errors import MethodError
    from mpfl.experiment import Experiment
    from mpfl.methods import MaskedMethod, Method, register_method

    @register_method
    class NoMaskRound(MaskedMethod):
        name = "no-mask-round-test"

    @register_method
    class SilentTraining(Method):
        name = "silent-training-test"

        def train_round(self, server, step):
            return None

    @register_method
    class SilentMasks(MaskedMethod):
        name = "silent-masks-test"

        def mask_round(self, server, step, prev_density):
            return None

    with pytest.raises(MethodError, match=r"mask_round must return \(the Round of its exchange, the new mask, a dict"):
        simulate(tiny_config(method="silent-masks-test"), tmp_path / "masks")
    with pytest.raises(MethodError, match="plans mask rounds but defines no mask_round; define it"):
        Experiment.from_config(tiny_config(method="no-mask-round-test"))
    with pytest.raises(MethodError, match="train_round must return the Round of its exchange .* got NoneType"):
        simulate(tiny_config(method="silent-training-test"), tmp_path / "run")


def test_a_methods_new_mask_and_metrics_are_held_to_the_contract_before_anything_is_saved(tmp_path):
    from mpfl.errors import MethodError
    from mpfl.methods import register_method
    from mpfl.methods.mpfl import Mpfl

    def returning(name, change):
        def mask_round(self, server, step, prev_density):
            exchanged, new, metrics = Mpfl.mask_round(self, server, step, prev_density)
            return change(exchanged, new, metrics, server.state.mask)

        register_method(type("Changed", (Mpfl,), {"name": name, "mask_round": mask_round}))
        return name

    new_mask = "mask_round's new mask must be a list of 3 boolean arrays"
    cases = {
        "short": (lambda r, new, m, cur: (r, new[:-1], m), f"{new_mask}.* it holds 2 items"),
        "float": (lambda r, new, m, cur: (r, [n.astype(np.float32) for n in new], m),
                  f"{new_mask}.* item 0 is a float32 array"),
        "grown": (lambda r, new, m, cur: (r, [np.ones_like(c) for c in cur], m) if server_round(r) > 1 else (r, new, m),
                  f"{new_mask}.* item 0 keeps entries the current mask has pruned"),
        "none-metrics": (lambda r, new, m, cur: (r, new, None), "mask_round must give its metrics as a dict, got NoneType"),
        "set-metric": (lambda r, new, m, cur: (r, new, {**m, "kept": {1, 2}}),
                       "mask_round: every metric must be a number, string, list or dict \\(a set is not a JSON value\\)"),
        "step-metric": (lambda r, new, m, cur: (r, new, {**m, "step": 9, "time": 1.0}),
                        "mask_round: metrics step, time are keys the server records itself; name them otherwise"),
        "mistyped-metric": (lambda r, new, m, cur: (r, new, {**m, "agreement": "high"}),
                            "mask_round: agreement = 'high' is not float, the type mpfl.protocol.RoundRecord gives it"),
    }
    for name, (change, says) in cases.items():
        out = tmp_path / name
        with pytest.raises(MethodError, match=f"^method '{name}-test': {says}"):
            simulate(tiny_config(method=returning(f"{name}-test", change), mask_rounds=2), out)
        assert not (out / "checkpoint.npz").exists() or name == "grown"  # a bad round is never checkpointed
    numpy_metric = returning("numpy-metric-test", lambda r, new, m, cur: (r, new, {**m, "kept": np.int64(7),
                                                                                    "per_layer": np.arange(3)}))
    record = simulate(tiny_config(method=numpy_metric, mask_rounds=1), tmp_path / "numpy").records[0]
    assert (record["kept"], record["per_layer"]) == (7, [0, 1, 2]) and type(record["kept"]) is int


def test_the_global_weights_a_method_leaves_are_held_to_the_contract_before_anything_is_saved(tmp_path):
    from mpfl.methods import register_method
    from mpfl.methods.baselines import FedAvgPrune

    def leaving(name, change):
        def train_round(self, server, step):
            exchanged = FedAvgPrune.train_round(self, server, step)
            if step.phase == "train":  # FedAvgPrune's mask rounds train through train_round too
                server.state.weights = change(server.state.weights)
            return exchanged

        register_method(type("Leaving", (FedAvgPrune,), {"name": name, "train_round": train_round}))
        return name

    contract = ("train_round must leave server.state.weights one float array per tensor, of its shape, and zero "
                "wherever server.state.mask prunes")
    cases = {"dense": (lambda ws: [w + np.float32(0.01) for w in ws], "1.weight holds [1-9][0-9]* nonzero values where"),
             "flat": (lambda ws: [w.reshape(-1) for w in ws], "item 0 is a float32 array of shape \\(156800,\\)"),
             "short": (lambda ws: ws[:-1], "it holds 5 items")}
    for name, (change, says) in cases.items():
        out = tmp_path / name
        with pytest.raises(MethodError, match=f"^method '{name}-test': {contract}.*; {says}"):
            simulate(tiny_config(method=leaving(f"{name}-test", change), sparsity=0.5), out)
        assert [r["phase"] for r in read_rounds(out)] == ["mask", "mask"]  # the broken training round was never recorded


def test_a_mask_round_returning_the_wrong_tuple_is_told_what_it_returned(tmp_path):
    from mpfl.methods import register_method
    from mpfl.methods.mpfl import Mpfl

    for name, result in (("pair-test", lambda r: r[:2]), ("unwrapped-test", lambda r: (None, *r[1:]))):
        register_method(type("Wrong", (Mpfl,), {"name": name, "mask_round": lambda self, server, step, prev, f=result:
                                                f(Mpfl.mask_round(self, server, step, prev))}))
    with pytest.raises(MethodError, match="a dict of metrics\\), got a tuple of 2 items$"):
        simulate(tiny_config(method="pair-test"), tmp_path / "pair")
    with pytest.raises(MethodError, match="got a tuple whose first item is a NoneType$"):
        simulate(tiny_config(method="unwrapped-test"), tmp_path / "unwrapped")


def server_round(exchanged):
    """The mask round an exchange belongs to, from the round number of its decoded replies."""
    return next(iter(exchanged.replies.values())).round


def test_a_method_class_needs_a_name_of_its_own_and_the_decorator_may_replace_one():
    from mpfl.methods import register_method
    from mpfl.methods.mpfl import Mpfl

    with pytest.raises(ConfigError, match="^method class Unnamed has no name of its own \\(it inherits 'mpfl'\\): set name"):
        @register_method
        class Unnamed(Mpfl):
            description = "forgot its name"

    @register_method(replace=True)
    class Replacement(Mpfl):
        name = "mpfl"

    assert METHODS.get("mpfl") is Replacement


def test_a_method_that_only_trains_claims_no_sparsity_in_its_records_or_notes(tmp_path):
    """A plain `Method` subclass trains dense weights by FedAvg: its summary, round records and start-of-run
    notes say it does not prune, while every built-in method but fedavg still does."""
    from mpfl.methods import Method, register_method
    from mpfl.notes import idle_flags

    @register_method
    class Plain(Method):
        name = "plain-test"

    cfg = tiny_config(method="plain-test", rounds=2, sparsity=0.9, mask_rounds=3)
    result = simulate(cfg, tmp_path / "run")
    assert result.summary["sparsity"] == 0.0 and result.summary["final_density"] == 1.0
    assert [r["target_density"] for r in read_rounds(tmp_path / "run")] == [1.0, 1.0]
    assert idle_flags(cfg, ["sparsity", "mask_rounds"]) == [
        "--sparsity has no effect with --method plain-test, which does not prune",
        "--mask-rounds has no effect with --method plain-test, which does not prune"]
    assert [name for name in METHODS if not METHODS.get(name).prunes] == ["fedavg", "plain-test"]


def test_a_plug_in_registered_only_in_the_running_script_fails_in_worker_processes_before_any_file_is_written(tmp_path):
    from mpfl.core.masks import magnitude_mask, register_criterion

    register_criterion("script-only-test", magnitude_mask)  # in this process only: worker processes never see it
    out = tmp_path / "run"
    with pytest.raises(UnknownNameError, match="a worker process could not set up its nodes: unknown mask criterion "
                                               "'script-only-test'.*Worker processes imported no plug-ins"):
        simulate(tiny_config(criterion="script-only-test", workers=2), out)
    assert not out.exists()


def test_plug_ins_read_the_runs_options_and_a_criterion_may_draw_from_its_own_seeded_generator(tmp_path):
    """`--options KEY=VALUE` reaches a rule (ctx.options) and a criterion (options=), and is recorded;
    a criterion that names `rng` gets a generator seeded by (seed, round, node): the same masks for
    the same seed, others for another."""
    from mpfl.core.consensus import register_rule
    from mpfl.core.masks import register_criterion

    seen = []

    def random_keep(weights, current, density, *, rng, options, **_):
        seen.append(dict(options))
        return [c & (rng.random(c.shape) < float(options["keep"])) for c in current]

    def at_least(votes, support, ctx):
        return [s & (v * ctx.num_nodes >= int(ctx.options["k"]) - 1e-9) for v, s in zip(votes, support)]

    register_criterion("random-keep-test", random_keep)
    register_rule("at-least-test", at_least)
    cfg = tiny_config(criterion="random-keep-test", consensus="at-least-test", vote_weighting="trimmed", trim=0.0,
                      options=("keep=0.5", "k=2"), mask_rounds=1, rounds=1, nodes=3)  # trimmed, untrimmed: counts
    first, again = simulate(cfg, tmp_path / "run"), simulate(cfg)
    assert seen and all(s == {"keep": "0.5", "k": "2"} for s in seen)
    assert Config.from_toml(tmp_path / "run" / "config.toml").plugin_options == {"keep": "0.5", "k": "2"}
    assert all((a == b).all() for a, b in zip(first.masks[1], again.masks[1]))
    other = simulate(cfg.with_overrides({"seed": 1}))
    assert any((a != b).any() for a, b in zip(first.masks[1], other.masks[1]))
    assert masks.density(first.masks[1]) == pytest.approx(0.5, abs=0.01)  # P(2 or 3 of 3 keep) = 3/8 + 1/8


@pytest.mark.parametrize(("registration", "flag", "says"), [
    ("mpfl.register_criterion('none', lambda weights, current, density, **_: None)", "--criterion",
     "the mask the criterion 'none' returned must be a list of 3 boolean arrays"),
    ("mpfl.register_rule('none', lambda votes, support, ctx: [v > 0 for v in votes[:1]])", "--consensus",
     "the mask the consensus rule 'none' returned must be a list of 3 boolean arrays"),
])
def test_a_plug_in_that_breaks_the_mask_contract_stops_the_run_with_one_line(tmp_path, capsys, registration, flag,
                                                                              says):
    plugin = tmp_path / "broken.py"
    plugin.write_text(f"import mpfl\n{registration}\n")
    out = tmp_path / "run"
    assert main(["run", "--plugins", str(plugin), flag, "none", *SMALL, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.endswith(f"; once it is fixed, continue with: mpfl run --resume {out}")
    assert (out / "config.toml").is_file()  # the run directory stays, as after any stopped run


def test_a_plug_ins_own_error_keeps_its_type_from_a_worker_and_is_one_json_object_when_asked(tmp_path, capsys):
    plugin = tmp_path / "broken.py"
    plugin.write_text("import mpfl\n\ndef broken(weights, current, density, **_):\n"
                      "    raise ValueError('broken on purpose')\n\nmpfl.register_criterion('broken', broken)\n")
    with pytest.raises(ValueError, match="broken on purpose") as raised:  # as with one process
        simulate(tiny_config(plugins=(str(plugin),), criterion="broken", workers=2))
    assert any(note.startswith("raised in worker process") and "in broken" in note for note in raised.value.__notes__)
    capsys.readouterr()
    args = ["run", "--plugins", str(plugin), "--criterion", "broken", *SMALL, "--workers", "2"]
    assert main([*args, "--out", str(tmp_path / "text")]) == 1  # the worker's traceback from the plug-in on
    err = capsys.readouterr().err
    assert err.startswith("ValueError: broken on purpose\nraised in worker process ")
    assert f'File "{plugin}", line 4, in broken' in err and "mpfl/" not in err
    assert err.rstrip().endswith("the run stopped on this error; once it is fixed, continue with: mpfl run --resume "
                                 f"{tmp_path / 'text'}")
    assert main([*args, "--options", "keep=abc", "--out", str(tmp_path / "options")]) == 1  # it may be their value
    assert capsys.readouterr().err.rstrip().endswith("(if the fix is another --options value, start a new run with "
                                                     "--out NEW_DIR instead: a resumed run keeps its options)")
    args.extend(["--log-format", "json"])
    assert main([*args, "--out", str(tmp_path / "run")]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert event["event"] == "error" and event["message"] == "ValueError: broken on purpose"
    assert "raise ValueError('broken on purpose')" in event["traceback"]


def test_an_aggregator_that_breaks_its_contract_mid_run_leaves_a_checkpoint_the_fixed_run_resumes_from(tmp_path):
    """The server checks an aggregate before it keeps it: a broken one never reaches the checkpoint,
    so once the rule is fixed the run resumes and ends as a run with the fixed rule from the start."""
    from mpfl.core.aggregate import register_aggregator, weighted_average

    calls = {"n": 0, "broken": True}

    def mean_until_broken(tensors, weights, **_):
        calls["n"] += 1
        out = weighted_average(tensors, weights)
        return out[:-1] if calls["broken"] and calls["n"] == 3 else out  # the last mask round's average, then training

    register_aggregator("breaks-test", mean_until_broken)
    cfg = tiny_config(aggregator="breaks-test", rounds=3)
    with pytest.raises(MethodError, match="the aggregator 'breaks-test' must return a list of 6 float arrays"):
        simulate(cfg, tmp_path / "run")
    assert read_meta(tmp_path / "run")["next_step"] == cfg.prune.mask_rounds + 2  # the first training round's
    calls["broken"] = False
    resumed, fresh = simulate(cfg, tmp_path / "run", resume=True), simulate(cfg)
    assert all(np.array_equal(a, b) for a, b in zip(resumed.weights, fresh.weights))
    assert comparable(resumed.records) == comparable(fresh.records)


def test_an_aggregators_values_where_the_mask_prunes_are_cleared_with_or_without_server_momentum(monkeypatch):
    """An aggregator returns full tensors; the global weights keep its values on the mask only, in
    training rounds with server momentum (its step is taken on the mask) and without (the aggregate itself),
    and in adaptation rounds, whose regrown weights start at exactly 0."""
    from mpfl.core.aggregate import register_aggregator, weighted_average
    from mpfl.experiment import Experiment
    from mpfl.methods.mpfl import Mpfl

    register_aggregator("shifted-test", lambda tensors, weights, **_: [w + 1 for w in weighted_average(tensors, weights)])
    regrown: list[np.ndarray] = []
    train_round = Mpfl.train_round

    def watched(self, server, step):
        before = [m.copy() for m in server.state.mask]
        out = train_round(self, server, step)
        regrown.extend(w[m & ~b] for w, m, b in zip(server.spec.pick(server.state.weights), server.state.mask, before))
        return out

    monkeypatch.setattr(Mpfl, "train_round", watched)
    for momentum in (0.0, 0.9):
        cfg = tiny_config(aggregator="shifted-test", server_momentum=momentum, mask_rounds=1, rounds=2, adapt_every=1,
                          adapt_until=1.0)
        result = simulate(cfg)
        pruned = Experiment.from_config(cfg).spec.pick(result.weights)
        assert all(not w[~m].any() for w, m in zip(pruned, result.mask)) and masks.density(result.mask) < 0.2
        assert all((w[m] != 0).all() for w, m in zip(pruned, result.mask))  # the shift reached every kept value
        assert sum(w.size for w in regrown) > 0 and not any(w.any() for w in regrown)
        regrown.clear()


def test_a_consensus_rule_that_narrows_the_current_mask_in_place_is_stopped_not_obeyed():
    """Every consensus mask is read-only once the server adopts it, so a rule that changes `support`
    in place (which would also change the history and make the round look converged) stops the run."""
    from mpfl.core.consensus import register_rule

    def in_place(votes, support, ctx):
        for v, s in zip(votes, support):
            s &= v >= 0.5
        return list(support)

    register_rule("in-place-test", in_place)
    with pytest.raises(ValueError, match="read-only"):
        simulate(tiny_config(consensus="in-place-test", mask_rounds=3, rounds=1))


def test_an_option_the_plug_in_reads_but_the_run_was_not_given_is_a_one_line_error(tmp_path, capsys):
    plugin = tmp_path / "keep.py"
    plugin.write_text("import mpfl\n\ndef keep(weights, current, density, *, rng, options, **_):\n"
                      "    return [c & (rng.random(c.shape) < float(options['keep'])) for c in current]\n\n"
                      "mpfl.register_criterion('keep', keep)\n")
    assert main(["run", "--plugins", str(plugin), "--criterion", "keep", *SMALL, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: a plug-in reads the option keep, which this run was not given; start a new run with "
                   '--out NEW_DIR --options keep=VALUE (in a config file, options = ["keep=VALUE"])')


def test_options_no_plug_in_read_are_named_at_the_end_of_the_run_with_those_read(tmp_path, capsys):
    """A misspelt key is read by nothing: the end of the run names it with the keys the plug-ins read, those
    read in worker processes too, and a likely meant one; a plug-in that lists the options reads them all."""
    from mpfl.config import Options
    from mpfl.notes import end_notes

    plugin = tmp_path / "opts.py"
    plugin.write_text("import mpfl\nfrom mpfl.core.masks import magnitude_mask\n\n"
                      "def at_least(votes, support, ctx):\n"
                      "    return [s & (v >= float(ctx.options.get('thr', '0.5'))) for v, s in zip(votes, support)]\n\n"
                      "def keep(weights, current, density, *, options, **_):\n"
                      "    return magnitude_mask(weights, current, density * float(options['keep']))\n\n"
                      "mpfl.register_rule('at-least-opt', at_least)\nmpfl.register_criterion('keep-opt', keep)\n")
    args = ["run", "--plugins", str(plugin), "--consensus", "at-least-opt", "--criterion", "keep-opt", *SMALL[:-1],
            "--workers", "2", "--options", "thx=0.9,keep=1,batch=2"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert ("note: no plug-in read --options thx, batch, so they had no effect; the plug-ins read keep, thr (did you "
            "mean thr for thx?)") in " ".join(capsys.readouterr().err.split())
    cfg = Config().with_overrides({"options": ("thr=0.9",)})
    assert end_notes(cfg, [], {"limited_counts": {}, "final_accuracy": None, "best_accuracy": None}, {"thr"}) == []
    assert end_notes(cfg, [], {"limited_counts": {}, "final_accuracy": None, "best_accuracy": None}, None) == []
    # without plug-ins the start of the run already said that options do nothing: not again at its end
    assert end_notes(cfg, [], {"limited_counts": {}, "final_accuracy": None, "best_accuracy": None}, set()) == []
    with_plugin = cfg.with_overrides({"plugins": (str(plugin),)})
    assert end_notes(with_plugin, [], {"limited_counts": {}, "final_accuracy": None, "best_accuracy": None},
                     set()) == ["no plug-in read --options thr, so it had no effect; the plug-ins read no option"]
    Options.read.clear()
    assert dict(cfg.plugin_options.items()) == {"thr": "0.9"} and Options.read == {"thr"}


def test_a_plug_ins_error_shows_its_own_frames_and_an_error_of_mpfls_own_its_whole_traceback(tmp_path, capsys,
                                                                                              monkeypatch):
    """A plug-in's author needs the frames of their code, not the dozens of mpfl's that called it; an error
    inside mpfl, with no frame of the user's, is shown whole."""
    import mpfl.server
    from mpfl.core.masks import density

    plugin = tmp_path / "rule.py"
    plugin.write_text("import mpfl\n\ndef boom(votes, support, ctx):\n    raise RuntimeError('boom')\n\n"
                      "mpfl.register_rule('boom', boom, reads=())\n")
    assert main(["run", "--plugins", str(plugin), "--consensus", "boom", *SMALL, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[:4] == ["Traceback (most recent call last):", f'  File "{plugin}", line 4, in boom',
                                    "    raise RuntimeError('boom')", "RuntimeError: boom"]
    helpers = tmp_path / "helpers"  # a plug-in's own helper module, which it imports: its frames are the plug-in's
    helpers.mkdir()
    (helpers / "rulebook.py").write_text("def boom(votes, support, ctx):\n    raise RuntimeError('in a helper')\n")
    monkeypatch.syspath_prepend(str(helpers))
    monkeypatch.delitem(sys.modules, "rulebook", raising=False)  # imported below: gone again after the test
    (tmp_path / "uses.py").write_text("import mpfl\nfrom rulebook import boom\n\n"
                                      "mpfl.register_rule('helper-boom', boom, reads=())\n")
    assert main(["run", "--plugins", str(tmp_path / "uses.py"), "--consensus", "helper-boom", *SMALL,
                 "--out", str(tmp_path / "h")]) == 1
    assert capsys.readouterr().err.splitlines()[:2] == ["Traceback (most recent call last):",
                                                        f'  File "{helpers / "rulebook.py"}", line 2, in boom']
    monkeypatch.setattr(mpfl.server.Server, "run", density)  # a TypeError raised inside mpfl's own code
    with pytest.raises(TypeError):
        main(["run", *SMALL, "--out", str(tmp_path / "own")])

    def not_a_plug_in(server):  # code outside mpfl that no --plugins named (a library, a script): shown whole too
        raise KeyError("elsewhere")

    monkeypatch.setattr(mpfl.server.Server, "run", not_a_plug_in)
    with pytest.raises(KeyError):
        main(["run", *SMALL, "--out", str(tmp_path / "elsewhere")])


def test_a_rule_that_empties_a_layer_is_named_in_the_summary_and_a_note(tmp_path, capsys):
    """A consensus rule may return any subset, the empty one too; the run goes on, and its end says
    which layers the final mask prunes whole (the default run empties none)."""
    from mpfl.records import read_summary

    plugin = tmp_path / "empty.py"
    plugin.write_text("import numpy as np\nimport mpfl\n\ndef first_only(votes, support, ctx):\n"
                      "    return [s if i == 0 else np.zeros_like(s) for i, s in enumerate(support)]\n\n"
                      "mpfl.register_rule('first-only', first_only, reads=())\n")
    args = ["run", *[a for a in SMALL if a != "--quiet"], "--plugins", str(plugin), "--consensus", "first-only"]
    assert main([*args, "--out", str(tmp_path / "r")]) == 0
    summary = read_summary(tmp_path / "r")
    assert summary["emptied_layers"] == ["3.weight", "5.weight"]  # mlp's prunable tensors after the first
    assert ("note: the final mask prunes every weight of 3.weight, 5.weight (summary.json: emptied_layers)"
            in " ".join(capsys.readouterr().err.split()))
    assert main(["run", *SMALL, "--out", str(tmp_path / "plain")]) == 0
    assert "emptied_layers" not in read_summary(tmp_path / "plain")


def test_help_with_plugins_lists_the_names_they_register(tmp_path, capsys):
    plugin = tmp_path / "helpme.py"
    plugin.write_text("import mpfl\n\nmpfl.register_rule('help-rule', lambda votes, support, ctx: support, reads=())\n")
    with pytest.raises(SystemExit):
        main(["run", "--plugins", str(plugin), "--help"])
    assert ", help-rule) [prune]" in " ".join(capsys.readouterr().out.split())  # among the consensus rules
    with pytest.raises(SystemExit):
        main(["run", f"--plugins={tmp_path / 'missing.py'}", "--help"])
    out, err = capsys.readouterr()
    assert "usage: mpfl run" in out and err.startswith("note: the help lists no names of this plug-in: plug-in")


def test_plug_in_code_is_what_a_plug_ins_import_brought_in_outside_installed_packages(tmp_path, monkeypatch):
    """The files a traceback may start at: modules new since the import began that lie outside mpfl, the
    standard library and installed packages, and the named module's package wherever it is installed."""
    from mpfl import plugins

    mine = tmp_path / "minehelper.py"
    mine.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "minehelper", raising=False)
    before = set(sys.modules) - {"numpy", "numpy.linalg"}  # as if the plug-in imported numpy first
    __import__("minehelper")
    plugins._note_files(before, None)
    files = plugins.plugin_files()
    assert mine.resolve() in files
    assert not any(f.is_relative_to(Path(np.__file__).resolve().parent) for f in files)  # an installed package
    plugins._note_files(set(sys.modules), "numpy")  # an entry point's package: noted wherever it is installed
    assert Path(np.__file__).resolve() in plugins.plugin_files()
    monkeypatch.delitem(sys.modules, "minehelper")
