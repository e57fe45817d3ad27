"""Everything a run builds from its config before the first round: data, split, model, initial weights.

Both runners call `Experiment.from_config`, so a node process on another machine derives
exactly the same partition, model and initial weights from the same config and seed.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .compact import CompactModel, compactable, mask_key
from .config import Config
from .core.params import Mask, ParamSpec, Weights, get_weights, param_spec
from .core.training import LocalData, evaluate
from .data import Dataset, load_dataset
from .devices import use_device
from .errors import ConfigError
from .methods import method_of
from .models import build_model, load_init
from .partition import Partition, make_partition


def set_threads(cfg: Config) -> None:
    """Use the configured number of torch threads (0: leave torch's setting, by default one per core)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def _check_exclude(model: nn.Module, patterns: tuple[str, ...]) -> None:
    """Refuse `exclude` patterns that match none of the model's prunable layers (a typo would
    otherwise prune the layer it meant to keep)."""
    spec = param_spec(model)
    layers = [spec.names[i] for i in spec.prunable]
    unmatched = [p for p in patterns if not fnmatch.filter(layers, p)]
    if unmatched:
        raise ConfigError(f"--exclude {', '.join(map(repr, unmatched))} matches no prunable layer of this model; "
                          f"its prunable layers are {', '.join(layers)}")


def _check_layer_floor(cfg: Config, prunes: bool) -> None:
    """Refuse a global-scope pruning run whose per-layer floor keeps more than the target density allows:
    every layer would keep at least `layer_floor`, so the requested sparsity could not be reached."""
    prune = cfg.prune
    if prunes and prune.scope == "global" and prune.layer_floor > (1 - prune.sparsity) + 1e-9:
        raise ConfigError(f"layer_floor = {prune.layer_floor} keeps more of every layer than sparsity = "
                          f"{prune.sparsity} leaves of the model ({1 - prune.sparsity:.4g}); lower --layer-floor or --sparsity")


@dataclass
class Experiment:
    """The built pieces of a run."""

    cfg: Config
    dataset: Dataset
    partition: Partition
    model: nn.Module
    spec: ParamSpec
    w0: Weights
    device: torch.device = torch.device("cpu")
    _shrunk: tuple[bytes, CompactModel] | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_config(cls, cfg: Config, dataset: Dataset | None = None) -> Experiment:
        """Load data (unless `dataset` is the run's data already loaded, as worker processes get it),
        split it, build the model with the run's seed and read `--init` weights; the model and the data
        then move to the run's device (`mpfl.devices`), once: nodes train and the server evaluates there."""
        set_threads(cfg)
        device = use_device(cfg)
        data_cfg = cfg.data
        if dataset is None:
            dataset = load_dataset(data_cfg.dataset, data_cfg.data_dir).take(data_cfg.train_samples, data_cfg.test_samples)
        partition = make_partition(dataset.y_train.cpu().numpy(), cfg.nodes, data_cfg.partition, alpha=data_cfg.alpha,
                                   shards_per_node=data_cfg.shards, val_fraction=data_cfg.val_fraction, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.train.model, dataset.input_shape, dataset.num_classes)
        if cfg.train.init is not None:
            load_init(model, cfg.train.init)
        _check_exclude(model, cfg.prune.exclude)
        method = method_of(cfg)
        method.check_hooks()
        _check_layer_floor(cfg, method.prunes)
        spec = param_spec(model, cfg.prune.exclude, structured=method.structured, keep=method.prunable_layers)
        if not spec.prunable and method.prunes:
            raise ConfigError(f"no prunable layers left in model {cfg.train.model!r} after exclude = "
                              f"{list(cfg.prune.exclude)}; exclude fewer layers")
        w0 = get_weights(model, spec)
        return cls(cfg, dataset.to(device), partition, model.to(device), spec, w0, device)

    def node_data(self, node: int) -> LocalData:
        """Node `node`'s view of the shared training tensors."""
        return LocalData(self.dataset.x_train, self.dataset.y_train,
                         torch.from_numpy(self.partition.train[node]), torch.from_numpy(self.partition.val[node]))

    def pooled_data(self) -> LocalData:
        """All nodes' training samples together (the centralized upper bound)."""
        train = np.sort(np.concatenate(self.partition.train))
        return LocalData(self.dataset.x_train, self.dataset.y_train, torch.from_numpy(train),
                         torch.from_numpy(np.concatenate(self.partition.val)))

    def cleared(self, weights: Weights, mask: Mask) -> Weights:
        """`weights` as the nodes train them. Under a filter mask on a model `mpfl.compact` can shrink,
        nodes train the shrunk model, so everything a dropped filter owns (its bias, BatchNorm entries
        and the next layer's inputs from it) is zero; the server's model, clearing the same entries,
        computes what the nodes' and the exported model compute. Otherwise `weights` unchanged."""
        if not self._trains_shrunk:
            return weights
        key = mask_key(mask)
        if self._shrunk is None or self._shrunk[0] != key:
            self._shrunk = (key, CompactModel(self.model, self.spec, mask))
        return self._shrunk[1].clear(weights)

    @functools.cached_property
    def _trains_shrunk(self) -> bool:
        """Whether the nodes train the shrunk model (`node.make_trainer`'s choice of CompactTrainer)."""
        return method_of(self.cfg).structured and compactable(self.model)

    def evaluate(self, weights: Weights) -> tuple[float, float]:
        """Accuracy and loss of `weights` on the test set."""
        return evaluate(self.model, self.spec, weights, self.dataset.x_test, self.dataset.y_test)

