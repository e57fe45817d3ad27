"""Untrusted nodes for the simulator: poisoned data, forged masks and forged values.

The data attacks are the two the reference implementation studies (a node trained on noise
inputs, a node with shuffled labels); the others forge what a node reports while following
the protocol to the letter, so only the server's robust rules can stop them. A silent node
never replies, which is what the honest nodes alone would agree on: the reference for how
much of an attack the robust rules remove.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .config import Config
from .core.masks import select, top_k
from .core.params import Mask, Weights
from .core.training import LocalData, LocalTrainer, generator
from .node import Node, NodeState
from .protocol import NodeFailure, Reply

DATA_ATTACKS = ("noise", "shuffle")
MASK_ATTACKS = ("random-mask", "inverted-mask", "important-mask")
VALUE_ATTACKS = ("scale", "sign-flip")


def malicious_ids(cfg: Config) -> list[int]:
    """Which nodes are malicious: a seeded choice of `faults.malicious` of them."""
    rng = np.random.default_rng([cfg.seed, 3])
    return sorted(rng.choice(cfg.nodes, size=cfg.faults.malicious, replace=False).tolist())


def poison(data: LocalData, attack: str, key: tuple[int, ...]) -> LocalData:
    """A node's data with Gaussian-noise inputs or with its labels shuffled among its samples."""
    gen = generator(*key)
    idx = data.train
    if attack == "noise":
        x = torch.randn((len(idx),) + tuple(data.x.shape[1:]), generator=gen)
        return LocalData(x, data.y[idx].clone(), torch.arange(len(idx)), torch.arange(0))
    y = data.y.clone()
    y[idx] = data.y[idx[torch.randperm(len(idx), generator=gen)]]
    return LocalData(data.x, y, idx, data.val)


class MaliciousNode(Node):
    """A node that runs `cfg.faults.attack` while speaking the protocol correctly."""

    def __init__(self, node_id: int, cfg: Config, trainer: LocalTrainer, data: LocalData, state: NodeState | None = None) -> None:
        attack = cfg.faults.attack
        if attack in DATA_ATTACKS:
            data = poison(data, attack, (cfg.seed, node_id, 5))
        super().__init__(node_id, cfg, trainer, data, state)
        self.attack = attack

    def handle(self, task: str, step: int, bodies: Sequence[bytes]) -> Reply:
        """A silent node withholds every reply; the others answer, forging what the attack forges."""
        if self.attack == "silent":
            return NodeFailure("withheld its reply (silent attack)")
        return super().handle(task, step, bodies)

    def forge_mask(self, mask: Mask, current: Mask, start: Weights, step: int) -> Mask:
        """Random: as many entries as the honest mask, uniformly; inverted: the entries the honest
        mask prunes; important: the smallest weights, so the largest ones get pruned."""
        if self.attack == "random-mask":
            rng = np.random.default_rng([self.cfg.seed, step, self.id, 6])
            return [top_k(rng.random(c.shape), c, int(m.sum())).reshape(c.shape) for m, c in zip(mask, current)]
        if self.attack == "inverted-mask":
            return [c & ~m for m, c in zip(mask, current)]
        if self.attack == "important-mask":
            density = self.steps[step].density
            return select([-np.abs(w) for w in self.spec.pick(start)], current, density, self.cfg.prune.scope,
                          self.cfg.prune.layer_floor)
        return mask

    def forge_values(self, trained: Weights, start: Weights, step: int) -> Weights:
        """Scale: the update multiplied by `attack_scale`; sign-flip: the update reversed."""
        factor = {"scale": self.cfg.faults.attack_scale, "sign-flip": -1.0}.get(self.attack)
        if factor is None:
            return trained
        return [(s + np.float32(factor) * (t - s)).astype(np.float32) for t, s in zip(trained, start)]

