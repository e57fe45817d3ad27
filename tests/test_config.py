"""Config: defaults, TOML and flag overrides, and errors that name the problem and the fix."""

import json
import re

import pytest

from mpfl.config import FIELD_SECTIONS, Config, field_types
from mpfl.errors import ConfigError
from mpfl.records import new_run_dir


def test_round_trip_through_a_dict_and_toml(tmp_path):
    import tomli_w

    cfg = Config().with_overrides({"lr": 0.1, "exclude": "0.*,3.weight", "nodes": 20, "percentile": 40.0})
    assert Config.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(cfg.to_dict()))
    assert Config.from_toml(path) == cfg
    assert cfg.prune.exclude == ("0.*", "3.weight")


def test_overrides_reach_the_owning_section_and_convert_strings():
    cfg = Config().with_overrides({"lr": "0.2", "epochs": "3", "early_stop": "false", "data_dir": "/x", "test_samples": None})
    assert cfg.train.lr == 0.2 and cfg.train.epochs == 3
    assert cfg.prune.early_stop is False
    assert cfg.data.data_dir == "/x" and cfg.data.test_samples is None


def test_a_choice_given_in_any_case_is_recorded_as_its_registry_or_option_list_spells_it(tmp_path):
    given = {"method": " MPFL", "model": "MLP", "dataset": "MNIST", "criterion": "Magnitude", "partition": "IID",
             "value_dtype": "INT8", "aggregator": "Mean", "schedule": "Linear"}
    cfg = Config().with_overrides(given)
    assert cfg == Config().with_overrides({key: value.strip().lower() for key, value in given.items()})
    assert "MLP" not in (text := json.dumps(cfg.to_dict())) and "INT8" not in text
    assert "-mlp-" in new_run_dir(cfg, tmp_path).name


def test_a_dataset_named_by_an_alias_is_recorded_by_the_name_its_registry_gives_it(tmp_path):
    from mpfl.data import DATASETS

    aliases = list(DATASETS.snapshot()[1])  # every alias registered, mapped to its name
    assert "fmnist" in aliases and "cifar-10" in aliases
    for alias in aliases:
        assert Config().with_overrides({"dataset": alias.upper()}).data.dataset == DATASETS.canonical(alias)
    assert "-fashion-mnist-" in new_run_dir(Config().with_overrides({"dataset": "FMNIST"}), tmp_path).name


def test_every_field_is_a_unique_flag():
    names = list(field_types())
    assert len(names) == len(set(names)) == len(FIELD_SECTIONS)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"metod": "mpfl"}, "unknown config key 'metod'. Did you mean 'method'"),
        ({"method": "fedavgg"}, "method = 'fedavgg' is not one of .* Did you mean 'fedavg'"),
        ({"method": "FEDAVGG"}, "method = 'FEDAVGG' is not one of .* Did you mean 'fedavg'"),
        ({"train": {"lr": 0}}, "lr = 0.0 must be > 0"),
        ({"train": {"lr": "fast"}}, "train.lr must be of type float"),
        ({"train": {"lr": 10**400}}, "train.lr is out of range: a number with 401 digits is too large for a float"),
        ({"prune": {"sparsity": 1.0}}, "sparsity = 1.0 must be < 1"),
        ({"prune": {"schedul": "linear"}}, "unknown config key 'prune.schedul'. Did you mean 'prune.schedule'"),
        ({"nodes": 2, "min_nodes": 3}, "min_nodes = 3 is larger than nodes = 2"),
        ({"prune": {"rewind": "init"}}, "only exist with rewind = 'none'; with rewind = 'init' also set train_init"),
        ({"data": {"partition": "dirichlet", "alpha": -1.0}}, "alpha = -1.0 must be > 0"),
        ({"data": {"partition": "dirichlet", "alpha": 1e308}}, "alpha = 1e\\+308 must be <= 1000000.0"),
        ({"train": {"init": "/no/such/file.pt"}}, "no such file"),
        ({"train": {"init": "/"}}, "init = '/': is a folder; pass the path of a saved state_dict"),
        ({"train": 3}, r"\[train\] must be a table"),
        ({"nodes": True}, "nodes must be of type int"),
        ({"train": {"learning_rate": 0.1}}, "unknown config key 'train.learning_rate'. Did you mean 'train.lr'"),
        ({"num_nodes": 3}, "unknown config key 'num_nodes'. Did you mean 'nodes'"),
        ({"threads": -1}, "threads = -1 must be >= 0"),
        ({"train": {"server_momentum": 1.0}}, "server_momentum = 1.0 must be < 1"),
        ({"prune": {"mask_average_from": -6}}, r"counts back past the first of 5 mask rounds; use a round number 1 \.\. 5, "
                                               r"-1 \.\. -5 \(from the end\) or 0 \(no averaging\)"),
        ({"prune": {"mask_average_from": 6}}, r"mask_average_from = 6 counts past the last of 5 mask rounds"),
        ({"threads": 100000}, "threads = 100000 must be <= 1024"),
        ({"rounds": 10**6 - 4, "prune": {"mask_rounds": 5}}, r"warmup_rounds \+ mask_rounds \+ rounds = 1,000,001, "
                                                             r"but a run has at most 1,000,000 rounds \(it plans every"),
        ({"nodes": 4, "robust": {"aggregator": "krum", "byzantine": 4}}, "byzantine = 4 allows for at least as many"),
        ({"train": {"sparsity": 0.5}}, r"'train.sparsity' is in the wrong place: sparsity belongs in \[prune\]"),
        ({"lr": 0.1}, r"'lr' is in the wrong place: lr belongs in \[train\]"),
        ({"data": {"nodes": 3}}, "nodes belongs in the top level, before any"),
        ({"faults": {"malicious": 2}}, "malicious = 2 needs an attack; choose one of .*scale"),
        ({"faults": {"attack": "scale"}}, "attack = 'scale' needs malicious nodes; set malicious to how many nodes"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(data, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(data)


RANGE_ENDS = [  # (field, the end it admits, the value just beyond it)
    # shares of the nodes: some node must be asked, and at most all of them
    ("fraction", 1.0, 0.0), ("fraction", 1.0, 1.5), ("mask_fraction", 1.0, 1.01),
    # held out for validation, every node keeps something to train on; momentum 1 never forgets an update
    ("val_fraction", 0.0, 1.0), ("momentum", 0.0, 1.0), ("server_momentum", 0.0, -0.1),
    # other shares and probabilities
    ("dropout", 1.0, 1.5), ("adapt_fraction", 1.0, 1.5), ("adapt_until", 1.0, 1.5), ("tau", 1.0, 1.5),
    ("core_share", 1.0, 1.5), ("layer_floor", 0.0, -0.1), ("sparsity", 0.0, -0.1), ("count_limit", 1.0, 0.99),
    ("percentile", 100.0, 101.0), ("percentile", 0.0, -1.0),
    # counts: at least one of each, or none at all where 0 turns the feature off
    ("shards", 1, 0), ("epochs", 1, 0), ("mask_epochs", 1, 0), ("batch_size", 1, 0), ("train_samples", 1, 0),
    ("mask_rounds", 1, 0), ("saliency_batches", 1, 0), ("adapt_batches", 1, 0), ("adapt_every", 0, -1),
    ("byzantine", 0, -1), ("mask_average_from", -5, -6),
]


@pytest.mark.parametrize("name, allowed, refused", RANGE_ENDS)
def test_each_range_admits_its_end_and_refuses_the_value_beyond(name, allowed, refused):
    Config().with_overrides({name: allowed})
    with pytest.raises(ConfigError, match=rf"^{name} = {refused} (must be|counts back past the first)"):
        Config().with_overrides({name: refused})


def test_limits_that_depend_on_other_fields_only_apply_where_they_matter():
    assert Config.from_dict({"nodes": 1}).robust.byzantine == 1  # krum's allowance means nothing to the mean


def test_none_in_a_file_clears_an_optional_field_as_the_flag_does(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\ntrain_samples = "none"\n[prune]\nmask_fraction = "None"\nrewind = "none"\n')
    cfg = Config.from_toml(path)
    assert cfg.data.train_samples is None and cfg.prune.mask_fraction is None
    assert cfg.prune.rewind == "none"  # a choice named none stays a string
    with pytest.raises(ConfigError, match="nodes must be of type int, got 'none'"):
        Config.from_dict({"nodes": "none"})


def test_bad_toml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("method = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.from_toml(bad)


def test_one_torch_thread_unless_asked():
    assert Config().threads == 1
    assert Config().with_overrides({"threads": 0}).threads == 0


def test_overrides_that_are_not_a_dict_are_refused_with_what_to_give():
    with pytest.raises(TypeError, match=r"with_overrides takes a dict of field names to values, such as \{'nodes': 3\}; "
                                        "got a list"):
        Config().with_overrides([("nodes", 3)])


def test_an_option_a_plug_in_reads_but_the_run_lacks_says_how_to_give_it():
    options = Config().with_overrides({"options": ("keep=0.5",)}).plugin_options
    assert options == {"keep": "0.5"} and options.get("k") is None
    with pytest.raises(KeyError) as missing:  # what a plug-in may catch, and a config error to the user
        options["k"]
    assert isinstance(missing.value, ConfigError)
    assert str(missing.value) == ("a plug-in reads the option k, which this run was not given; start a new run with "
                                  '--out NEW_DIR --options k=VALUE (in a config file, options = ["k=VALUE"])')


def test_an_option_whose_value_holds_commas_is_read_alike_from_flags_files_and_flower(tmp_path):
    from mpfl.cli import build_parser, config_from_args
    from mpfl.flower.settings import from_run_config

    wanted = {"layers": "1,3", "k": "2", "name": "a b"}
    args = build_parser().parse_args(["run", "--options", "layers=1, 3,k=2", "--options", "name=a b"])
    assert config_from_args(args).plugin_options == wanted
    (tmp_path / "run.toml").write_text('options = ["layers=1,3", "k=2", "name=a b"]\n')
    assert Config.from_toml(tmp_path / "run.toml").plugin_options == wanted
    assert from_run_config({"options": "layers=1,3,k=2,name=a b"})[0].plugin_options == wanted
    with pytest.raises(ConfigError, match="options: '3' is not KEY=VALUE"):
        config_from_args(build_parser().parse_args(["run", "--options", "3,k=2"]))


def test_an_unknown_name_a_plug_in_could_register_points_to_plugins():
    with pytest.raises(ConfigError, match="criterion = 'update-mag' is not one of .* load the plug-in with --plugins"):
        Config().with_overrides({"criterion": "update-mag"})
    # a plug-in's name may be close to a built-in one: the guess does not hide the hint
    with pytest.raises(ConfigError, match="Did you mean 'random'[?] If a plug-in registers it, load the plug-in with "
                                          "--plugins MODULE_OR_FILE$"):
        Config().with_overrides({"method": "random-vote"})
    with pytest.raises(ConfigError, match="scope = 'xyz' is not one of layer, global.$"):
        Config().with_overrides({"scope": "xyz"})


def test_a_quoted_number_or_boolean_in_a_config_file_is_refused_unless_a_flag_replaces_it(tmp_path, capsys):
    from mpfl.cli import main

    path = tmp_path / "run.toml"
    for text, says in (('nodes = " 4 "\n', "nodes = ' 4 ' is text; write it without quotes (a TOML number)"),
                       ('[prune]\nearly_stop = "no"\n', "[prune] early_stop = 'no' is text; write true or false, "
                                                        "without quotes"),
                       ('[prune]\nearly_stop = "true"\n', "early_stop = 'true' is text; write it without quotes (a TOML "
                                                          "boolean)"),
                       ('[data]\ntrain_samples = "all"\n', "train_samples = 'all' is text; write a number, without "
                                                           "quotes, or leave the key out for the default"),
                       ('[prune]\nsparsity = "0.9"\n', "[prune] sparsity = '0.9' is text")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(says)):
            Config.from_toml(path)
    path.write_text('nodes = "4"\n[data]\ntrain_samples = "none"\n')  # TOML has no null: "none" stays allowed
    assert main(["run", "--config", str(path), "--nodes", "2", "--train-samples", "300", "--test-samples", "100",
                 "--mask-rounds", "1", "--rounds", "0", "--quiet", "--out", str(tmp_path / "run")]) == 0
    assert Config.from_toml(tmp_path / "run" / "config.toml").nodes == 2


def test_config_file_mistakes_that_are_not_settings_say_what_they_are(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(b"\xef\xbb\xbfnodes = 4\n")
    with pytest.raises(ConfigError, match="starts with a byte order mark: save it as UTF-8 without one"):
        Config.from_toml(path)
    path.write_text('out = "runs/x"\n')
    with pytest.raises(ConfigError, match=r"^out is not a config setting but a flag of the command \(--out\)"):
        Config.from_toml(path)
