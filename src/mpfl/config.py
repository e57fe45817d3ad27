"""One typed configuration for every run, settable from a TOML file and from CLI flags.

A TOML file has top-level run keys and the sections ``[data]``, ``[train]``, ``[prune]``,
``[adapt]``, ``[codec]``, ``[robust]`` and ``[faults]``; every field is also a CLI flag of the same name (``--lr``,
``--batch-size``, ...), since field names are unique across sections.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import sys
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, get_type_hints

from .attacks import ATTACKS
from .codec import MASK_CODERS, VALUE_DTYPES
from .core.aggregate import AGGREGATORS
from .core.consensus import RULES
from .core.masks import CRITERIA, SCHEDULES, SCOPES
from .errors import ConfigError
from .methods import METHODS
from .partition import PARTITIONS
from .plugins import load_plugins
from .registry import UnknownNameError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REWINDS = ("init", "none")
TRAIN_INITS = ("rewind", "local")
OPTIMIZERS = ("sgd", "adam")
VOTE_WEIGHTINGS = ("samples", "agreement", "trimmed")
ADAPT_DROPS = ("server", "votes")


REGISTRIES = {"method": METHODS, "criterion": CRITERIA, "consensus": RULES, "aggregator": AGGREGATORS,
              "attack": ATTACKS}
"""The fields that name an entry of a registry (plug-ins may add entries), by field."""


def field_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of every field that names one of a set: the registries' names (so
    registered plug-ins count) and the fixed options of the core."""
    return {**{name: registry.names() for name, registry in REGISTRIES.items()}, "partition": PARTITIONS,
            "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "scope": SCOPES, "rewind": REWINDS,
            "train_init": TRAIN_INITS, "mask_coder": tuple(MASK_CODERS), "value_dtype": ("auto", *VALUE_DTYPES),
            "vote_weighting": VOTE_WEIGHTINGS, "adapt_drop": ADAPT_DROPS}


DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")


def check_device_name(device: str) -> None:
    """Refuse a device that is not auto, cpu, cuda, cuda:N or mps (whether it exists is checked when a run starts)."""
    kind, _, index = device.partition(":")
    if kind not in DEVICE_KINDS or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"device = {device!r} is not one of auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps")


def _field(default: Any, text: str, *, aliases: tuple[str, ...] = ()) -> Any:
    """A config field with its one-line description (the flag's `--help` text, kept here so every field
    has exactly one) and names users commonly try for it (suggested when they do)."""
    return field(default=default, metadata={"help": text, "aliases": aliases})


PLUGIN_HINT = "If a plug-in registers it, load the plug-in with --plugins MODULE_OR_FILE"
"""What an unknown registry name's error adds, after any close name it suggests (a plug-in's name may be close to
a built-in one)."""


def _choice(name: str, value: str) -> None:
    options = field_choices()[name]
    if value not in options:
        hint = difflib.get_close_matches(str(value).strip().lower(), options, n=1)
        extra = (f" Did you mean {hint[0]!r}?" if hint else "") + (f" {PLUGIN_HINT}" if name in REGISTRIES else "")
        raise UnknownNameError(f"{name} = {value!r} is not one of {', '.join(options)}.{extra}")


MAX_ALPHA = 1e6
"""The largest Dirichlet concentration: at 1e6 every node's class shares are those of the data to within
a thousandth, and numpy's Dirichlet sampler overflows for very large ones."""


def _range(name: str, value: float, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False) -> None:
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{name} = {value} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ConfigError(f"{name} = {value} must be {'<' if hi_open else '<='} {hi}")


def _finite(cfg: Any) -> None:
    """Refuse NaN and infinity in every float field: they would pass every range check."""
    for section in [cfg] + [getattr(cfg, name) for name in SECTIONS]:
        for f in fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} = {value} must be a finite number")


NAMES_ANY_CASE = ("model", "dataset", "device")
"""Fields whose names are read in any case but have no option list here: the registries `mpfl.config` cannot
import without torch (`registry.normalise` spells theirs in lower case) and torch's device names (`CUDA:1`)."""

DATASET_ALIASES = {"fashion-mnist": ("fashionmnist", "fmnist", "fashion_mnist"), "cifar10": ("cifar-10",),
                   "cifar100": ("cifar-100",)}
"""The built-in datasets' other names, which `mpfl.data` registers; here because a config, which cannot import
torch, records each dataset by its one name (`--dataset fmnist` is `fashion-mnist`)."""
_DATASET_NAMES = {alias: name for name, aliases in DATASET_ALIASES.items() for alias in aliases}


def _spell_names(cfg: Any) -> None:
    """Every choice spelled as its registry or option list spells it (`--model MLP` is `mlp`, `--method MPFL`
    is `mpfl`, a registry alias its name), so a run's config, its folder's name and the report's groups name
    each choice one way. Unknown names are left for `validate` to refuse with the choices."""
    choices = field_choices()
    for owner, section in [(None, cfg)] + [(name, getattr(cfg, name)) for name in SECTIONS]:
        spelled = {}
        for f in fields(section):
            value = getattr(section, f.name)
            if not isinstance(value, str) or not value.strip() or not (f.name in choices or f.name in NAMES_ANY_CASE):
                continue
            key = value.strip().lower()
            if f.name in REGISTRIES and key in REGISTRIES[f.name]:
                key = REGISTRIES[f.name].canonical(key)
            elif f.name == "dataset":
                key = _DATASET_NAMES.get(key, key)
            if key != value and (f.name in NAMES_ANY_CASE or key in choices[f.name]):
                spelled[f.name] = key
        if spelled and owner is None:
            for name, value in spelled.items():
                object.__setattr__(cfg, name, value)
        elif spelled:
            object.__setattr__(cfg, owner, replace(section, **spelled))


MAX_THREADS = 1024
"""Most torch threads a run may ask for: far beyond any useful count, below where torch crashes."""
MAX_STEPS = 10**6
"""The most rounds a run can have, warm-up, mask and training rounds together: a run plans every
round before the first (a million rounds take about a second and 0.2 GB to plan, a hundred million
would take minutes and 20 GB before failing), far below the 2**32 - 1 that messages can number."""


@dataclass(frozen=True)
class DataConfig:
    """Which data, where it lives and how it is split across nodes."""

    dataset: str = _field("mnist", "dataset to train on: mnist, fashion-mnist, cifar10, cifar100 or a registered one")
    data_dir: str | None = _field(None, "folder holding the datasets; none = $MPFL_DATA, then the user cache "
                                        "(missing files are downloaded; MNIST also ships with the package)",
                                  aliases=("root",))
    partition: str = _field("iid", "how the training data is split over the nodes", aliases=("split",))
    alpha: float = _field(0.5, "Dirichlet concentration of --partition dirichlet; smaller means stronger label skew",
                          aliases=("dirichlet_alpha",))
    shards: int = _field(2, "label shards per node with --partition shards", aliases=("shards_per_node",))
    val_fraction: float = _field(0.1, "share of each node's samples held out for validation (at least one of a "
                                 "node of 2 or more, so nodes of a few samples hold out more)",
                                 aliases=("validation_fraction",))
    train_samples: int | None = _field(None, "use only the first n training samples (all when there are fewer); "
                                             "none = all",
                                       aliases=("num_train", "n_train"))
    test_samples: int | None = _field(None, "evaluate on the first n test samples (all when there are fewer); "
                                            "none = all",
                                      aliases=("num_test", "n_test"))

    def validate(self) -> None:
        _choice("partition", self.partition)
        _range("alpha", self.alpha, 0, MAX_ALPHA, lo_open=True)
        _range("shards", self.shards, 1)
        _range("val_fraction", self.val_fraction, 0, 1, hi_open=True)
        for name in ("train_samples", "test_samples"):
            value = getattr(self, name)
            if value is not None:
                _range(name, value, 1)


@dataclass(frozen=True)
class TrainConfig:
    """The model and the local training every node runs."""

    model: str = _field("mlp", "model architecture: mlp, cnn, lenet5, vgg11, resnet18 or a registered one",
                        aliases=("arch", "architecture"))
    init: str | None = _field(None, "state_dict file with the initial weights; none = seeded random weights",
                              aliases=("init_weights", "pretrained"))
    optimizer: str = _field("sgd", "local optimizer of every node", aliases=("optim",))
    lr: float = _field(0.05, "learning rate of the local optimizer", aliases=("learning_rate", "step_size"))
    momentum: float = _field(0.0, "momentum of the local optimizer")
    weight_decay: float = _field(0.0, "L2 weight decay of the local optimizer", aliases=("l2", "wd"))
    epochs: int = _field(1, "local epochs per round", aliases=("local_epochs", "num_epochs"))
    batch_size: int = _field(32, "local minibatch size", aliases=("bs", "batchsize"))
    fraction: float = _field(1.0, "share of the nodes sampled in each round (mask rounds too, unless "
                                  "--mask-fraction says otherwise)",
                             aliases=("fraction_fit", "client_fraction"))
    server_momentum: float = _field(0.9, "momentum of the server's step in each training round (FedAvgM): the "
                                         "global weights move by v = server_momentum * v + (average - weights); "
                                         "BatchNorm statistics take the average; 0 = plain FedAvg",
                                   aliases=("fedavgm",))
    device: str | None = _field(None, "where nodes train and the server evaluates: cpu, cuda, cuda:N, mps, or auto "
                                      "(cuda if available, else mps, else cpu); none = cpu. Messages are the same "
                                      "bytes on every device", aliases=("accelerator",))

    def validate(self) -> None:
        _choice("optimizer", self.optimizer)
        _range("lr", self.lr, 0, lo_open=True)
        _range("momentum", self.momentum, 0, 1, hi_open=True)
        _range("weight_decay", self.weight_decay, 0)
        _range("epochs", self.epochs, 1)
        _range("batch_size", self.batch_size, 1)
        _range("fraction", self.fraction, 0, 1, lo_open=True)
        _range("server_momentum", self.server_momentum, 0, 1, hi_open=True)
        if self.device is not None:
            check_device_name(self.device)
        if self.init is not None and not Path(self.init).is_file():
            what = "is a folder" if Path(self.init).is_dir() else "no such file"
            raise ConfigError(f"init = {self.init!r}: {what}; pass the path of a saved state_dict")


@dataclass(frozen=True)
class PruneConfig:
    """How the mask is found: schedule, local criterion, consensus rule and starting points."""

    sparsity: float = _field(0.9, "final share of the prunable weights removed",
                             aliases=("prune_rate", "target_sparsity"))
    mask_rounds: int = _field(5, "rounds of mask search before training", aliases=("prune_rounds", "pruning_rounds"))
    schedule: str = _field("geometric", "how the target sparsity rises over the mask rounds")
    criterion: str = _field("magnitude", "how each node picks its local mask")
    scope: str = _field("global", "pruning budget: one threshold over all layers (global; each keeps at least "
                                  "--layer-floor) or the same density in every layer (layer)")
    consensus: str = _field("vote", "rule that turns the nodes' masks into the consensus mask", aliases=("rule",))
    tau: float = _field(0.5, "vote share a weight needs to be kept with --consensus threshold (the density then "
                             "follows the votes, not --sparsity)", aliases=("threshold",))
    percentile: float | None = _field(None, "with --consensus histogram, the vote percentile (0-100) below which "
                                            "each mask round prunes, overriding --sparsity; none = the share the "
                                            "--sparsity schedule removes")
    rewind: str = _field("none", "start of each mask round: init = the initial weights, "
                                 "none = the node's own last weights")
    train_init: str = _field("local", "start of training: rewind = the initial weights, "
                                      "local = each node's own weights (needs --rewind none)")
    warmup_rounds: int = _field(0, "dense FedAvg rounds before the mask search", aliases=("warmup",))
    exclude: tuple[str, ...] = _field((), "layer name patterns (fnmatch, e.g. '1.weight') never pruned; "
                                          "repeat the flag for several", aliases=("exclude_layers",))
    layer_floor: float = _field(0.01, "least density any layer keeps with --scope global")
    saliency_batches: int = _field(4, "batches each node scores with --criterion saliency")
    early_stop: bool = _field(True, "end the mask search early once the consensus mask stops changing")
    mask_epochs: int = _field(2, "local epochs of each MPFL node in a mask round (the pooled-data search of "
                                 "centralized keeps --epochs)")
    extrapolate: float = _field(100.0, "MPFL's local score |w0 + extrapolate * (w - w0)|: 1 ranks weights by "
                                       "magnitude, larger values by how far the node's training moved them")
    mask_average_from: int | None = _field(None, "from this mask round on (negative: counted from the end), MPFL "
                                                 "nodes also send kept values and later rounds start from their mean; "
                                                 "0: never; none = the last, or 2 when mask rounds sample nodes")
    mask_fraction: float | None = _field(None, "share of the nodes asked in each mask round; none = --fraction. "
                                               "A node left out catches up with the mask updates it missed when "
                                               "next asked", aliases=("mask_sample",))
    core_share: float = _field(0.1, "share of its own mask each MPFL node marks as its core; any node's core "
                                     "outranks plain votes, so what few nodes' classes need survives (0: off)")

    def validate(self) -> None:
        _range("sparsity", self.sparsity, 0, 1, hi_open=True)
        _range("mask_rounds", self.mask_rounds, 1)
        _choice("schedule", self.schedule)
        _choice("criterion", self.criterion)
        _choice("scope", self.scope)
        _choice("consensus", self.consensus)
        _range("tau", self.tau, 0, 1, lo_open=True)
        if self.percentile is not None:
            _range("percentile", self.percentile, 0, 100)
        _choice("rewind", self.rewind)
        _choice("train_init", self.train_init)
        if self.train_init == "local" and self.rewind != "none":
            raise ConfigError("train_init = 'local' starts training from each node's own weights, which only exist "
                              "with rewind = 'none'; with rewind = 'init' also set train_init = 'rewind'")
        _range("warmup_rounds", self.warmup_rounds, 0)
        _range("layer_floor", self.layer_floor, 0, 1)
        _range("saliency_batches", self.saliency_batches, 1)
        _range("mask_epochs", self.mask_epochs, 1)
        _range("extrapolate", self.extrapolate, 0, lo_open=True)
        if self.mask_average_from is not None and not -self.mask_rounds <= self.mask_average_from <= self.mask_rounds:
            past = "back past the first" if self.mask_average_from < 0 else "past the last"
            raise ConfigError(f"mask_average_from = {self.mask_average_from} counts {past} of {self.mask_rounds} mask "
                              f"rounds; use a round number 1 .. {self.mask_rounds}, -1 .. -{self.mask_rounds} (from the "
                              "end) or 0 (no averaging)")
        _range("core_share", self.core_share, 0, 1)
        if self.mask_fraction is not None:
            _range("mask_fraction", self.mask_fraction, 0, 1, lo_open=True)


@dataclass(frozen=True)
class AdaptConfig:
    """How MPFL repairs its mask during training: regrow votes from the nodes, swaps at constant density."""

    adapt_every: int = _field(2, "every k-th training round, nodes also vote for pruned weights to regrow and the "
                                 "server swaps them in (0: the mask stays fixed)")
    adapt_fraction: float = _field(0.3, "share of each layer's kept weights swapped at the first adaptation; "
                                        "it decays with a cosine")
    adapt_until: float = _field(0.75, "share of the training rounds after which the mask stays fixed")
    adapt_batches: int = _field(16, "local batches a node's regrow gradient is measured on")
    adapt_drop: str = _field("server", "which kept weights make room: server = smallest global |w| (no message), "
                                       "votes = the nodes' smallest local |w|")

    def validate(self) -> None:
        _range("adapt_every", self.adapt_every, 0)
        _range("adapt_fraction", self.adapt_fraction, 0, 1)
        _range("adapt_until", self.adapt_until, 0, 1)
        _range("adapt_batches", self.adapt_batches, 1)
        _choice("adapt_drop", self.adapt_drop)


@dataclass(frozen=True)
class CodecConfig:
    """How messages are coded on the wire."""

    mask_coder: str = _field("range", "how masks are coded on the wire: range (entropy coded) or packbits")
    value_dtype: str = _field("auto", "how values are sent: float32, float16, int8 with a scale per tensor, or auto "
                              "(int8, and float32 for dense FedAvg, the reference)", aliases=("dtype",))

    def validate(self) -> None:
        _choice("mask_coder", self.mask_coder)
        _choice("value_dtype", self.value_dtype)


@dataclass(frozen=True)
class RobustConfig:
    """How the parameter server defends against bad nodes: vote weighting and value aggregation."""

    vote_weighting: str = _field("agreement", "weight of a node's mask, regrow and drop votes: samples = its "
                                              "(bounded) share of the data; agreement = the same, nodes far from the "
                                              "majority left out; trimmed = equal, extremes trimmed")
    trim: float = _field(0.2, "share trimmed at each end by trimmed votes and --aggregator trimmed-mean")
    aggregator: str = _field("mean", "how the server combines the nodes' values: mean (FedAvg) or a robust rule",
                             aliases=("aggregation",))
    byzantine: int = _field(1, "number of malicious nodes --aggregator krum allows for")
    value_limit: float = _field(1e4, "replies holding a value beyond +-this are rejected")
    count_limit: float = _field(2.5, "a node's sample count weighs at most this multiple of the (lower) median "
                                              "node's")

    def validate(self) -> None:
        _choice("vote_weighting", self.vote_weighting)
        _range("trim", self.trim, 0, 0.5, hi_open=True)
        _choice("aggregator", self.aggregator)
        _range("byzantine", self.byzantine, 0)
        _range("value_limit", self.value_limit, 0, lo_open=True)
        _range("count_limit", self.count_limit, 1)


@dataclass(frozen=True)
class FaultConfig:
    """Faults and attacks the simulator injects, all seeded: dropouts, stragglers, corrupt or
    duplicated replies, and malicious nodes."""

    dropout: float = _field(0.0, "probability that a node drops out of a round (simulated)")
    straggler: float = _field(0.0, "probability that a node replies after the deadline (simulated)")
    corrupt: float = _field(0.0, "probability that a reply arrives with a flipped byte (simulated)")
    duplicate: float = _field(0.0, "probability that a node sends its reply twice (simulated)")
    malicious: int = _field(0, "number of malicious nodes", aliases=("attackers",))
    attack: str = _field("none", "what the malicious nodes do")
    attack_scale: float = _field(10.0, "factor by which --attack scale multiplies an update")
    attack_samples: float = _field(1.0, "malicious nodes claim this many times their training samples")

    def rates(self) -> dict[str, float]:
        """The simulated faults' probabilities by name (dropout, straggler, corrupt, duplicate)."""
        return {name: getattr(self, name) for name in ("dropout", "straggler", "corrupt", "duplicate")}

    def validate(self) -> None:
        for name, rate in self.rates().items():
            _range(name, rate, 0, 1)
        _range("malicious", self.malicious, 0)
        _range("attack_samples", self.attack_samples, 0, lo_open=True)
        _choice("attack", self.attack)
        if self.malicious and self.attack == "none":
            raise ConfigError(f"malicious = {self.malicious} needs an attack; choose one of "
                              f"{', '.join(a for a in ATTACKS.names() if ATTACKS.get(a).kind != 'none')}")
        if self.attack != "none" and not self.malicious:  # else the run is a clean one, which nothing would say
            raise ConfigError(f"attack = {self.attack!r} needs malicious nodes; set malicious to how many nodes "
                              "attack, or leave attack at 'none'")


class MissingOption(ConfigError, KeyError):
    """An option a plug-in reads that the run was not given: a KeyError to the plug-in, a one-line
    config error to the user (the run cannot resume with options it was not started with)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Options(dict):
    """The run's `options` (``--options KEY=VALUE``) as plug-ins read them: a dict whose missing key
    says how to give it, where a plain KeyError would only name the key. Every key a plug-in looks up
    (``options[key]``, ``get``, ``in``) is noted in `read`, and listing the options (iterating, ``items()``)
    notes them all, so that the end of a run can name an option nothing read (a misspelt key)."""

    read: ClassVar[set[str]] = set()
    """The keys looked up in this process since a run cleared it (`mpfl.sim`; worker processes report theirs)."""

    def __getitem__(self, key: str) -> str:
        Options.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        Options.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        Options.read.add(key)
        return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        Options.read.update(dict.keys(self))
        return super().__iter__()

    def keys(self) -> KeysView[str]:
        Options.read.update(dict.keys(self))
        return super().keys()

    def values(self) -> ValuesView[str]:
        Options.read.update(dict.keys(self))
        return super().values()

    def items(self) -> ItemsView[str, str]:
        Options.read.update(dict.keys(self))
        return super().items()

    def __missing__(self, key: str) -> str:
        raise MissingOption(f"a plug-in reads the option {key}, which this run was not given; start a new run with "
                            f"--out NEW_DIR --options {key}=VALUE (in a config file, options = [\"{key}=VALUE\"])")


def flatten(config: Mapping[str, Any], *, prefixed: bool = False) -> dict[str, Any]:
    """A config dict as `Config.to_dict` writes it, with its sections' fields at the top level: as
    ``field`` (names are unique across sections) or, with `prefixed`, as ``section.field``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{name}" if prefixed else name: v for name, v in value.items()})
        else:
            flat[key] = value
    return flat


def sample_size(fraction: float, available: int, min_nodes: int) -> int:
    """The nodes a round asks when it samples `fraction` of `available` ones: at least `min_nodes`, at most all."""
    return min(available, max(min_nodes, round(fraction * available)))


@dataclass(frozen=True)
class Config:
    """Everything that determines a run; saved with its results so it can be reproduced."""

    method: str = _field("mpfl", "the federated method: mpfl, or a baseline to compare it with")
    seed: int = _field(0, "seed of every random choice: data split, initial weights, batches, faults")
    nodes: int = _field(10, "number of nodes the training data is split over",
                        aliases=("num_nodes", "n_nodes", "clients", "num_clients"))
    rounds: int = _field(10, "federated training rounds after the mask search (the progress line and summary.json's "
                             "rounds also count the mask rounds)", aliases=("num_rounds", "train_rounds"))
    min_nodes: int = _field(1, "fewest valid replies a round needs to go on", aliases=("min_clients",))
    eval_every: int = _field(1, "evaluate the global model every k-th round of a phase (0: only after the last)")
    threads: int = _field(1, "torch threads per training process; 1 stays fast beside other work (--workers "
                             "gives parallelism); 0 = torch's choice, all cores, which slows down sharply on a busy "
                             "machine", aliases=("num_threads",))
    workers: int = _field(1, "processes that train the nodes side by side (same results as 1); 0 = one per CPU "
                             "core at --threads each, at most 8 (1 on a GPU)",
                          aliases=("processes", "num_workers"))
    plugins: tuple[str, ...] = _field((), "modules or .py files to import first, which register datasets, models, "
                                           "methods and other pieces by name; repeat the flag for several")
    options: tuple[str, ...] = _field((), "settings of your plug-ins as KEY=VALUE, which a criterion, rule or method "
                                           "reads as text; repeat the flag for several", aliases=("plugin_options",))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)

    @property
    def plugin_options(self) -> Options:
        """`options` as a dict, KEY -> VALUE (text: a plug-in converts what it reads)."""
        return Options((key.strip(), value.strip()) for key, value in (option.split("=", 1) for option in self.options))

    @property
    def mask_round_fraction(self) -> float:
        """Share of the nodes each mask round asks: `prune.mask_fraction`, or `train.fraction` when unset."""
        return self.train.fraction if self.prune.mask_fraction is None else self.prune.mask_fraction

    def __post_init__(self) -> None:
        """Import the plug-ins the config names first, so the names they register are valid choices."""
        load_plugins(self.plugins)
        _spell_names(self)
        self.validate()

    def validate(self) -> None:
        """Check every value; raise ConfigError naming the field and the allowed values."""
        _finite(self)
        _choice("method", self.method)
        _range("seed", self.seed, 0, 2**32 - 1)
        _range("nodes", self.nodes, 1)
        _range("rounds", self.rounds, 0)
        steps = self.prune.warmup_rounds + self.prune.mask_rounds + self.rounds
        if steps > MAX_STEPS:
            raise ConfigError(f"warmup_rounds + mask_rounds + rounds = {steps:,}, but a run has at most {MAX_STEPS:,} "
                              "rounds (it plans every round before the first); use fewer rounds")
        _range("min_nodes", self.min_nodes, 1)
        if self.min_nodes > self.nodes:
            raise ConfigError(f"min_nodes = {self.min_nodes} is larger than nodes = {self.nodes}")
        _range("eval_every", self.eval_every, 0)
        _range("threads", self.threads, 0, MAX_THREADS)
        _range("workers", self.workers, 0)
        keys = [option.partition("=")[0].strip() for option in self.options]
        for option, key in zip(self.options, keys):
            if "=" not in option or not key:
                raise ConfigError(f"options: {option!r} is not KEY=VALUE; write each plug-in setting as key=value")
        if len(set(keys)) < len(keys):
            twice = sorted({k for k in keys if keys.count(k) > 1})
            raise ConfigError(f"options: {', '.join(twice)} given more than once; give each key one value")
        if self.faults.malicious > self.nodes:
            raise ConfigError(f"malicious = {self.faults.malicious} is larger than nodes = {self.nodes}")
        if self.robust.aggregator == "krum" and self.robust.byzantine >= self.nodes:
            raise ConfigError(f"byzantine = {self.robust.byzantine} allows for at least as many malicious nodes as "
                              f"the run has (nodes = {self.nodes}); use --byzantine below {self.nodes}")
        for section in (self.data, self.train, self.prune, self.adapt, self.codec, self.robust, self.faults):
            section.validate()

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (TOML/JSON-ready; None values dropped) that `from_dict` turns back into this config."""
        return _drop_none(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build a config from nested dicts, rejecting unknown keys and wrong types."""
        return _build(cls, data, "")

    @classmethod
    def from_toml(cls, path: str | Path) -> Config:
        """Read a TOML config file."""
        data = cls.read_toml(path)
        refuse_quoted_values(data)
        return cls.from_dict(data)

    @staticmethod
    def read_toml(path: str | Path) -> dict[str, Any]:
        """The nested dict of a TOML config file, not yet checked (see `from_dict`)."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {str(path)!r} is a folder; give the path of a .toml file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            bom = " (it starts with a byte order mark: save it as UTF-8 without one)" if path.read_bytes()[:3] == \
                b"\xef\xbb\xbf" else ""
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}{bom}") from None
        return data

    def asked(self, fraction: float) -> int:
        """The nodes a round asks when it samples `fraction` of all of them (`sample_size`)."""
        return sample_size(fraction, self.nodes, self.min_nodes)

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A copy with flat `field = value` overrides applied to whichever section owns the field."""
        if not isinstance(overrides, Mapping):
            raise TypeError(f"with_overrides takes a dict of field names to values, such as {{'nodes': 3}}; got a "
                            f"{type(overrides).__name__}")
        return Config.from_dict(overridden(self.to_dict(), overrides))


SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainConfig, "prune": PruneConfig, "adapt": AdaptConfig,
                             "codec": CodecConfig, "robust": RobustConfig, "faults": FaultConfig}


def overridden(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested config `data` (as `to_dict` or a TOML file gives it) with flat `field = value`
    overrides put into whichever section owns each field; `data` itself is left as it was."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for name, value in overrides.items():
        section = FIELD_SECTIONS.get(name)
        if section is None:
            raise ConfigError(_unknown(name, FIELD_SECTIONS))
        target = out.setdefault(section, {}) if section else out
        if not isinstance(target, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {target!r}")
        target[name] = value
    return out


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, tuple):
        return list(value)
    return value


COMMAND_FLAGS = ("out", "resume", "config", "quiet")
"""Flags of `mpfl run` that are not part of a run's config (so not keys of its file)."""


def _unknown(name: str, known: Any) -> str:
    prefix, _, bare = name.rpartition(".")
    if bare in FIELD_SECTIONS and FIELD_SECTIONS[bare] != prefix:
        home = f"[{FIELD_SECTIONS[bare]}]" if FIELD_SECTIONS[bare] else "the top level, before any [section]"
        return f"config key {name!r} is in the wrong place: {bare} belongs in {home}"
    if bare in COMMAND_FLAGS:
        return f"{bare} is not a config setting but a flag of the command (--{bare}); give it on the command line"
    owner = next((f for f, names in field_aliases().items() if bare in names), None)
    hint = [f"{FIELD_SECTIONS[owner]}.{owner}" if prefix and FIELD_SECTIONS[owner] else owner] if owner else []
    hint = hint or difflib.get_close_matches(name, list(known), n=1)
    suggestion = f" Did you mean {hint[0]!r}?" if hint else f" Known keys: {', '.join(sorted(known))}"
    return f"unknown config key {name!r}." + suggestion


def split_items(name: str, texts: Iterable[str]) -> list[str]:
    """The items of a list setting given as comma-separated text (a flag, a Flower run config). In
    `options`, a part without ``=`` continues the value before it, so ``layers=1,3`` is one option."""
    items: list[str] = []
    for part in (p.strip() for text in texts for p in text.split(",")):
        if name == "options" and items and "=" not in part:
            items[-1] = f"{items[-1]},{part}"
        elif part:
            items.append(part)
    return items


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Convert a TOML/CLI value to the field's type, or explain what type was expected."""
    text = str(hint)
    if value is None or ("None" in text and isinstance(value, str) and value.lower() == "none"):
        if "None" in text:
            return None
        raise ConfigError(f"{name} must not be empty")
    if "tuple" in text:
        if isinstance(value, str):
            value = split_items(name, [value])
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings, got {value!r}")
        return tuple(value)
    for typ in (bool, int, float, str):
        if text.startswith(typ.__name__) or text == f"<class '{typ.__name__}'>":
            break
    else:  # pragma: no cover - every field has one of the types above
        raise ConfigError(f"{name} has an unsupported type {text}")
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) and abs(value) > sys.float_info.max:  # a TOML integer of any length
            raise ConfigError(f"{name} is out of range: a number with {len(str(abs(value)))} digits is too large for a float")
        return float(value)
    elif typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif typ is str and isinstance(value, str):
        return value
    if isinstance(value, str) and typ in (int, float):
        try:
            return typ(value)
        except ValueError:
            pass
    raise ConfigError(f"{name} must be of type {typ.__name__}, got {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{prefix.rstrip('.')}] must be a table of keys, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(_unknown(prefix + key, [prefix + k for k in known]))
        if is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, hints[key], value)
    return cls(**kwargs)


def _field_sections() -> dict[str, str]:
    owners: dict[str, str] = {f.name: "" for f in fields(Config) if f.name not in SECTIONS}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if f.name in owners:  # pragma: no cover - guarded by a test
                raise RuntimeError(f"config field {f.name!r} is defined twice")
            owners[f.name] = section
    return owners


FIELD_SECTIONS = _field_sections()


SECTION_PREFIX = rf"(?:(?:{'|'.join(SECTIONS)})\.)?"
"""A regex of the optional ``section.`` before a field's name in a message."""


def mentioned(name: str) -> str:
    """A regex of the field `name` as validators name it in a message: ``[section.]name = ...`` or
    ``... must``, so that a runner can rename it as its user typed it (a flag, a run-config key)."""
    return rf"(?<![\w.-]){SECTION_PREFIX}{re.escape(name)}(?= = | must )"


def refuse_quoted_values(data: dict[str, Any], replaced: Iterable[str] = ()) -> None:
    """TOML has numbers and booleans of its own: a quoted one ("4", "yes") for a number or boolean field
    is a mistake the file's reader should see, as `4.0` for a whole number is (flags, being text, may).
    Fields in `replaced` (set by flags too) are left to the flags."""
    types, replaced = field_types(), set(replaced)
    tables = [("", data), *((f"[{name}] ", table) for name, table in data.items() if isinstance(table, dict))]
    for where, table in tables:
        for key, value in table.items():
            kind = "" if key in replaced else str(types.get(key, ""))
            if isinstance(value, str) and re.match(r"(<class ')?(int|float|bool)\b", kind) and not (
                    "None" in kind and value.strip().lower() == "none"):
                raise ConfigError(f"{where}{key} = {value!r} is text; {_unquoted(value, kind)}")


def _unquoted(value: str, kind: str) -> str:
    """How to write a quoted number or boolean as TOML's own: unquoted, when that reads as one."""
    if "bool" in kind:
        return ("write it without quotes (a TOML boolean)" if value.strip() in ("true", "false")
                else "write true or false, without quotes")
    try:
        float(value)
    except ValueError:
        return f"write a number, without quotes{', or leave the key out for the default' if 'None' in kind else ''}"
    return "write it without quotes (a TOML number)"


@functools.cache
def field_types() -> Mapping[str, Any]:
    """Every flat field name with its type hint (for building CLI flags and checking summaries), resolved
    once: `typing.get_type_hints` takes milliseconds, and `mpfl report` checks every run's config."""
    types = {k: v for k, v in get_type_hints(Config).items() if k not in SECTIONS}
    for cls in SECTIONS.values():
        types.update(get_type_hints(cls))
    return MappingProxyType(types)


def _flat_fields() -> dict[str, Any]:
    """Every flat field name with its dataclass field."""
    out = {f.name: f for f in fields(Config) if f.name not in SECTIONS}
    for cls in SECTIONS.values():
        out.update({f.name: f for f in fields(cls)})
    return out


def field_help() -> dict[str, str]:
    """Every flat field name with its one-line description."""
    return {name: f.metadata["help"] for name, f in _flat_fields().items()}


def field_aliases() -> dict[str, tuple[str, ...]]:
    """Every flat field name with the other names users try for it (``learning_rate`` for ``lr``)."""
    return {name: f.metadata["aliases"] for name, f in _flat_fields().items()}
