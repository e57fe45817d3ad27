"""Untrusted nodes for attack studies: poisoned data, forged masks, forged values, silence.

The data attacks are the two the reference implementation studies (a node trained on noise
inputs, a node with shuffled labels); the others forge what a node reports while following
the protocol to the letter, so only the server's robust rules can stop them. A silent node
never replies, which is what the honest nodes alone would agree on: the reference for how
much of an attack the robust rules remove.

An attack is a registered `Attack`; a node that the config makes malicious (`attack_of`)
applies its hooks, on the simulator and on Flower alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .core.masks import Mask, select, top_k
from .registry import Registry, registry
from .seeds import Stream, rng

if TYPE_CHECKING:
    from .config import Config
    from .core.params import Weights
    from .core.training import LocalData
    from .node import Node


@dataclass(frozen=True)
class Attack:
    """What a malicious node does differently from an honest one. `kind` groups attacks in
    reports: "none", "data", "mask", "values" or "silent"."""

    kind: str
    poison: Callable[[LocalData, tuple[int, ...]], LocalData] | None = None
    forge_mask: Callable[[Node, Mask, Mask, Weights, int], Mask] | None = None
    forge_values: Callable[[Node, Weights, Weights, int], Weights] | None = None

    @property
    def silent(self) -> bool:
        """A silent node withholds every reply."""
        return self.kind == "silent"


ATTACKS: Registry[Attack] = registry("attack")


def register_attack(name: str, attack: Attack) -> None:
    """Add an attack that `faults.attack` can name."""
    ATTACKS.register(name, attack)


def attacks_of_kind(kind: str) -> list[str]:
    """The registered attacks of one kind ("data", "mask", "values", ...), in registration order."""
    return [name for name in ATTACKS.names() if ATTACKS.get(name).kind == kind]


def malicious_ids(cfg: Config) -> list[int]:
    """Which nodes are malicious: a seeded choice of `faults.malicious` of them."""
    return sorted(_malicious(cfg.seed, cfg.nodes, cfg.faults.malicious))


@functools.lru_cache(maxsize=8)
def _malicious(seed: int, nodes: int, count: int) -> frozenset[int]:
    """The draw behind `malicious_ids`, made once per run rather than once per node built."""
    return frozenset(rng(seed, Stream.MALICIOUS).choice(nodes, size=count, replace=False).tolist())


def attack_of(cfg: Config, node_id: int) -> Attack | None:
    """The attack node `node_id` runs, or None for an honest node."""
    if not cfg.faults.malicious or node_id not in _malicious(cfg.seed, cfg.nodes, cfg.faults.malicious):
        return None
    return ATTACKS.get(cfg.faults.attack)


def _noise(data: LocalData, key: tuple[int, ...]) -> LocalData:
    """Gaussian-noise inputs in place of the node's images (labels kept)."""
    import torch

    from .core.training import LocalData, generator

    idx = data.train
    x = torch.randn((len(idx),) + tuple(data.x.shape[1:]), generator=generator(*key)).to(data.x.device)
    return LocalData(x, data.y[idx].clone(), torch.arange(len(idx)), torch.arange(0))


def _shuffle(data: LocalData, key: tuple[int, ...]) -> LocalData:
    """The node's labels shuffled among its own samples."""
    import torch

    from .core.training import LocalData, generator

    idx = data.train
    y = data.y.clone()
    y[idx] = data.y[idx[torch.randperm(len(idx), generator=generator(*key))]]
    return LocalData(data.x, y, idx, data.val)


def _random_mask(node: Node, mask: Mask, current: Mask, start: Weights, step: int) -> Mask:
    """As many entries as the honest mask, chosen uniformly."""
    draws = rng(node.cfg.seed, step, node.id, Stream.FORGED_MASK)
    return [top_k(draws.random(c.shape), c, int(m.sum())).reshape(c.shape) for m, c in zip(mask, current)]


def _inverted_mask(node: Node, mask: Mask, current: Mask, start: Weights, step: int) -> Mask:
    """Exactly the entries the honest mask prunes."""
    return [c & ~m for m, c in zip(mask, current)]


def _important_mask(node: Node, mask: Mask, current: Mask, start: Weights, step: int) -> Mask:
    """The smallest weights, so that the largest ones get pruned."""
    return select([-np.abs(w) for w in node.spec.pick(start)], current, node.steps[step].density,
                  node.cfg.prune.scope, node.cfg.prune.layer_floor)


def _scaled(factor: Callable[[Node], float]) -> Callable[[Node, Weights, Weights, int], Weights]:
    """A forger that reports start + factor x (trained - start)."""

    def forge(node: Node, trained: Weights, start: Weights, step: int) -> Weights:
        f = np.float32(factor(node))
        return [(s + f * (t - s)).astype(np.float32) for t, s in zip(trained, start)]

    return forge


def _within_limit(node: Node, trained: Weights, start: Weights, step: int) -> Weights:
    """Every reported value at half of `robust.value_limit`, with the sign of the node's own update:
    a forgery that passes the server's value check."""
    big = np.float32(node.cfg.robust.value_limit / 2)
    return [np.where(t >= s, big, -big).astype(np.float32) for t, s in zip(trained, start)]


ATTACKS.register("none", Attack("none"))
ATTACKS.register("noise", Attack("data", poison=_noise))
ATTACKS.register("shuffle", Attack("data", poison=_shuffle))
ATTACKS.register("random-mask", Attack("mask", forge_mask=_random_mask))
ATTACKS.register("inverted-mask", Attack("mask", forge_mask=_inverted_mask))
ATTACKS.register("important-mask", Attack("mask", forge_mask=_important_mask))
ATTACKS.register("scale", Attack("values", forge_values=_scaled(lambda node: node.cfg.faults.attack_scale)))
ATTACKS.register("sign-flip", Attack("values", forge_values=_scaled(lambda node: -1.0)))
ATTACKS.register("large-values", Attack("values", forge_values=_within_limit))
ATTACKS.register("silent", Attack("silent"))
