"""The `Method` hooks: what a federated method plans and decides, free of transport.

Shaped like Flower's `Strategy`: the `Server` is the protocol engine (it exchanges messages,
validates replies, keeps mask versions and state, samples and aggregates) and calls a
method's hooks at fixed points of a run:

    plan()                      the rounds: (phase, index, target density) per step
    mask_round(server, step, prev_density)  a mask-phase round: exchange what it needs, return the new mask
    after_mask(server, step, mask)  the global weights once a new mask is agreed
    start_training(server)      the global weights the training phase starts from
    train_round(server, step)   a warm-up or training round: exchange, then set the global weights

A method is a small registered class (`register_method`); its class attributes say what the
rest of the package needs to know about it, so no module ever compares a method's name.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from .. import codec
from ..core.masks import CRITERIA, Mask, target_density
from ..errors import MethodError
from ..protocol import TASK_TRAIN, Round, Step

if TYPE_CHECKING:
    from ..config import Config
    from ..server import Server


class Method:
    """A federated method that trains dense weights by FedAvg: override hooks to change it."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    prunes: ClassVar[bool] = False
    """Whether the final model is pruned to `prune.sparsity` (False: a dense model, sparsity 0): True on
    `MaskedMethod`, False on a `Method` that only trains, so that its records claim no target sparsity."""
    reference: ClassVar[bool] = False
    """Whether this is the dense baseline that reports compare accuracy and bytes with."""
    needs_pooled_data: ClassVar[bool] = False
    """Whether the server needs every node's data (only the simulator has it)."""
    trains_in_mask_rounds: ClassVar[bool] = False
    """Whether its mask rounds train locally (what a mask round costs, for run-time estimates)."""
    votes_on_masks: ClassVar[bool | None] = None
    """Whether its nodes search masks of their own (MPFL's local search: `--extrapolate`,
    `--mask-epochs`) and send them as votes (`--vote-weighting`, mask attacks): True or False where
    declared; None, where a method does not say, lets no start-of-run note claim either."""
    default_value_dtype: ClassVar[str] = "int8"
    """How values travel when `codec.value_dtype` is "auto" (measured: int8 costs MPFL under 0.1 point)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # ------------------------------------------------------------------ what the method is

    @property
    def value_dtype(self) -> str:
        """The wire dtype of every value this method's messages carry, both ways."""
        chosen = self.cfg.codec.value_dtype
        return self.default_value_dtype if chosen == "auto" else chosen

    @property
    def structured(self) -> bool:
        """Whether masks keep or drop whole filters (1 bit per filter on the wire)."""
        return CRITERIA.get(self.cfg.prune.criterion).structured

    def prunable_layers(self, names: Sequence[str]) -> list[str]:
        """The prunable tensors (Linear / Conv weights not excluded by config) this method may prune."""
        return list(names)

    def final_density(self) -> float:
        """The density of the model that the training phase trains."""
        return 1.0 - self.cfg.prune.sparsity if self.prunes else 1.0

    def phases(self) -> list[tuple[str, list[float]]]:
        """The run's phases in order, each a name and the target density of each of its rounds."""
        return [("train", [self.final_density()] * self.cfg.rounds)]

    def plan(self) -> list[Step]:
        """Every round of the run, numbered from 1 across phases."""
        steps: list[Step] = []
        for phase, densities in self.phases():
            for index, density in enumerate(densities, start=1):
                steps.append(Step(len(steps) + 1, phase, index, density))
        return steps

    @functools.cached_property
    def planned(self) -> tuple[Step, ...]:
        """`plan()`, made once (a method's config does not change): the server runs it, and the hooks
        below consult it for every node of every round."""
        return tuple(self.plan())

    def has_global_model(self, step: Step) -> bool:
        """Whether the server holds a model worth evaluating after `step` (not during a mask search)."""
        return step.phase != "mask"

    # ------------------------------------------------------------------ message shapes (both sides)

    def sends_cores(self, step: Step) -> bool:
        """Whether mask replies of `step` carry the node's core (class-aware consensus)."""
        return False

    def averages(self, step: Step) -> bool:
        """Whether mask replies of `step` carry the node's kept values, for the server to average."""
        return False

    def shares_start(self, step: Step) -> bool:
        """Whether mask requests of `step` carry the weights every node starts from."""
        return False

    def swap_fraction(self, step: Step) -> float:
        """Share of each layer's kept weights swapped after training round `step` (0: no adaptation)."""
        return 0.0

    def keeps_own_weights(self, step: Step) -> bool:
        """Whether a round after `step` (which ran) may start a node from its own trained weights, so
        nodes must keep them: a later mask round without a shared start, or, with train_init = local
        and no averaged mask round so far, the first training round. Otherwise nodes drop them, and
        node state stops growing with the population."""
        prune = self.cfg.prune
        if prune.rewind != "none" or step.phase == "train":
            return False
        later = [s for s in self.planned if s.step > step.step]
        if any(s.phase == "mask" and not self.shares_start(s) for s in later):
            return True
        averaged = any(s.phase == "mask" and self.averages(s) for s in self.planned if s.step <= step.step)
        return prune.train_init == "local" and not averaged and any(s.phase == "train" for s in later)

    # ------------------------------------------------------------------ rounds

    def mask_round(self, server: Server, step: Step, prev_density: float) -> tuple[Round, Mask, dict]:
        """One mask-phase round: the exchange, the new mask (a subset of the current one) and metrics."""
        raise MethodError(f"method {self.name!r} plans mask rounds but defines no mask_round")

    def check_hooks(self) -> None:
        """Refuse, before a run starts, a method whose plan has mask rounds but that defines no `mask_round`."""
        if type(self).mask_round is Method.mask_round and any(s.phase == "mask" for s in self.plan()):
            raise MethodError(f"method {self.name!r} plans mask rounds but defines no mask_round; define it (as "
                              "mpfl.methods.mpfl.Mpfl does) or plan no mask rounds")

    def after_mask(self, server: Server, step: Step, mask: Mask) -> None:
        """The global weights once `mask` is agreed: w0 masked by it."""
        server.state.weights = server.spec.apply(server.state.w0, mask)

    def start_training(self, server: Server) -> None:
        """The training phase starts from w0 masked by the final mask."""
        server.state.weights = server.spec.apply(server.state.w0, server.state.mask)

    def weights_body(self, server: Server, step: Step, supports: Mask) -> bytes:
        """The global weights inside `supports` as a VALUES body of this method's value dtype, coded
        over the server's mask version (a model's running statistics travel as float32)."""
        state = server.state
        return codec.encode_values(state.weights, supports, round=step.step, base_version=state.version, dtype=self.value_dtype,
                                   exact=server.spec.statistics)

    def sends_weights(self, server: Server, step: Step, nodes: Sequence[int]) -> bool:
        """Whether a training round sends the global weights (else nodes start from their own)."""
        return True

    def train_round(self, server: Server, step: Step) -> Round:
        """Masked FedAvg: sampled nodes get the mask updates they miss and the kept values, train,
        and send their kept values back; the global weights become their aggregate (`Server.aggregate`:
        zero where the mask prunes, whatever the aggregator returns there)."""
        state = server.state
        supports = server.spec.supports(state.mask)
        nodes = server.sample(step)
        values = [self.weights_body(server, step, supports)] if self.sends_weights(server, step, nodes) else []
        requests = server.requests(nodes, values)

        def decode(node: int, reply: Sequence[bytes]) -> codec.Body:
            return codec.decode_values(reply[0], supports, round=step.step, base_version=state.version)

        exchanged = server.exchange(TASK_TRAIN, step, requests, decode)
        server.acknowledge(exchanged)
        state.weights = server.advance(step, server.aggregate(exchanged))
        return exchanged


class MaskedMethod(Method):
    """A method that agrees on a mask before training on it: dense warm-up rounds, mask rounds
    pruning on the schedule down to the target density, then masked FedAvg."""

    prunes = True
    trains_in_mask_rounds = True

    def mask_densities(self) -> list[float]:
        """The target density of each mask round: the schedule from 1 down to 1 - sparsity."""
        prune = self.cfg.prune
        return [target_density(t, prune.mask_rounds, prune.sparsity, prune.schedule) for t in range(1, prune.mask_rounds + 1)]

    def phases(self) -> list[tuple[str, list[float]]]:
        warmup = ("warmup", [1.0] * self.cfg.prune.warmup_rounds)
        return [warmup, ("mask", self.mask_densities())] + super().phases()


class OneShotMethod(MaskedMethod):
    """A masked method that picks its mask in a single round at the target density."""

    trains_in_mask_rounds = False

    def mask_densities(self) -> list[float]:
        return [self.final_density()]
