"""What the server and the nodes agree on without sending it: the round plan and the transport.

Both sides derive the same plan from the run's config, so a request only needs its task
name, its step number and its encoded bodies. A runner supplies a `Transport` that delivers
bodies to nodes and brings back their replies: in process for the simulator, over Flower's
grid for deployments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Protocol, Sequence

from .config import Config
from .core.masks import target_density

TASK_MASK, TASK_TRAIN, TASK_SCORES, TASK_TOPK = "mask", "train", "scores", "topk"
TASKS = (TASK_MASK, TASK_TRAIN, TASK_SCORES, TASK_TOPK)

# Methods whose mask comes from the vote of nodes over several rounds (or one node's masks).
ITERATIVE_MASK = ("mpfl", "local", "fedavg-prune", "centralized")
ONE_SHOT_MASK = ("random", "ssfl")


@dataclass(frozen=True)
class Step:
    """One round of a run: its global number, phase, number within the phase and target density."""

    step: int
    phase: str
    index: int
    density: float


def plan(cfg: Config) -> list[Step]:
    """The rounds of a run: dense warm-up, mask search, then (masked) federated training."""
    s, p = cfg.prune.sparsity, cfg.prune
    final = 1.0 if cfg.method == "fedavg" else 1.0 - s
    phases: list[tuple[str, list[float]]] = []
    if cfg.method in ITERATIVE_MASK + ONE_SHOT_MASK:
        phases.append(("warmup", [1.0] * p.warmup_rounds))
    if cfg.method in ITERATIVE_MASK:
        phases.append(("mask", [target_density(t, p.mask_rounds, s, p.schedule) for t in range(1, p.mask_rounds + 1)]))
    elif cfg.method in ONE_SHOT_MASK:
        phases.append(("mask", [final]))
    phases.append(("train", [final] * cfg.rounds))
    steps, n = [], 0
    for phase, densities in phases:
        for i, d in enumerate(densities, start=1):
            n += 1
            steps.append(Step(n, phase, i, d))
    return steps


class NodeFailure(NamedTuple):
    """A node that gave no usable reply, and why."""

    reason: str


Reply = Sequence[bytes] | NodeFailure


class Transport(Protocol):
    """Delivers one round's requests and collects the replies that arrive."""

    def node_ids(self) -> list[int]:
        """The partition ids of the nodes that can currently be reached."""
        ...

    def exchange(self, task: str, step: int, requests: Mapping[int, Sequence[bytes]]) -> dict[int, Reply]:
        """Send each node its bodies; return each node's reply bodies or the reason it failed."""
        ...
