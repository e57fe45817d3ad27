"""The baselines MPFL is measured against, each a small `Method`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .. import codec
from ..codec import Kind
from ..core import masks
from ..core.aggregate import weighted_average
from ..protocol import TASK_SCORES, TASK_TOPK, Round, Step
from ..seeds import Stream, rng
from .base import MaskedMethod, Method, OneShotMethod

if TYPE_CHECKING:
    from ..server import Server


class FedAvg(Method):
    """Dense FedAvg: the reference every other method's accuracy and bytes are compared with."""

    name = "fedavg"
    votes_on_masks = False
    description = "dense weights both ways, no mask"
    reference = True
    default_value_dtype = "float32"


class TopK(Method):
    """Dense weights down; each node uploads its top-k update (with coded positions) and keeps
    the rest as error feedback. The density matches the masked methods' final density."""

    name = "topk"
    votes_on_masks = False
    description = "dense weights down, top-k updates with coded positions up (error feedback)"
    prunes = True  # its top-k updates keep 1 - sparsity of the weights

    def train_round(self, server: Server, step: Step) -> Round:
        state, spec = server.state, server.spec
        body = self.weights_body(server, step, spec.supports(spec.full_mask(shared=True)))
        limits = [int(np.prod(s)) for s in spec.shapes]
        for i, size in zip(spec.prunable, spec.prunable_sizes):
            limits[i] = masks.keep_count(int(size), step.density)

        def decode(node: int, reply: Sequence[bytes]) -> codec.Body:
            return codec.decode_sparse(reply[0], spec.shapes, max_ones=limits, round=step.step)

        exchanged = server.exchange(TASK_TOPK, step, server.requests(server.sample(step), [body]), decode)
        state.weights = server.advance(step, [w + u for w, u in zip(state.weights, server.aggregate(exchanged))])
        return exchanged


class FedAvgPrune(MaskedMethod):
    """Dense-then-masked FedAvg whose server prunes the aggregate by magnitude on the schedule
    (the reference implementation's baseline)."""

    name = "fedavg-prune"
    votes_on_masks = False
    description = "the server prunes the FedAvg aggregate by magnitude on the schedule"

    def has_global_model(self, step: Step) -> bool:
        return True

    def mask_round(self, server: Server, step: Step, prev_density: float) -> tuple[Round, masks.Mask, dict]:
        """A FedAvg round on the current mask, then magnitude pruning of the aggregate."""
        exchanged = self.train_round(server, step)
        state, prune = server.state, self.cfg.prune
        choose = masks.filter_mask if self.structured else masks.magnitude_mask
        new = choose(server.spec.pick(state.weights), state.mask, step.density, scope=prune.scope, floor=prune.layer_floor)
        state.weights = server.spec.apply(state.weights, new)
        return exchanged, new, {}

    def after_mask(self, server: Server, step: Step, mask: masks.Mask) -> None:
        """The pruned aggregate stays the global model."""

    def start_training(self, server: Server) -> None:
        """Without rewinding, training continues from the pruned aggregate."""
        if self.cfg.prune.rewind == "none":
            server.state.weights = server.spec.apply(server.state.weights, server.state.mask)
        else:
            super().start_training(server)


class Centralized(MaskedMethod):
    """The pooled-data reference: iterative pruning on all nodes' data pooled at the server, the mask one
    machine holding all the data would find (MPFL's votes can beat it under label skew)."""

    name = "centralized"
    votes_on_masks = False
    description = "iterative magnitude pruning on the pooled data (the mask one machine holding all the data would find)"
    needs_pooled_data = True

    def mask_round(self, server: Server, step: Step, prev_density: float) -> tuple[Round, masks.Mask, dict]:
        start = server.spec.apply(server.state.w0, server.state.mask)
        new, _ = server.oracle.find_mask(start, server.state.mask, step.density, step.step)
        return Round(), new, {}


class Random(OneShotMethod):
    """A seeded random mask with the target density in every layer (no messages)."""

    name = "random"
    votes_on_masks = False
    description = "random, same per-layer density"

    def mask_round(self, server: Server, step: Step, prev_density: float) -> tuple[Round, masks.Mask, dict]:
        draw = rng(self.cfg.seed, step.step, Stream.RANDOM_MASK)
        new = []
        for shape in server.spec.prunable_shapes:
            shape_rows = (shape[0],) if self.structured else shape
            flags = masks.top_k(draw.random(shape_rows), np.ones(shape_rows, dtype=bool),
                                masks.keep_count(int(np.prod(shape_rows)), step.density))
            new.append(masks.expand_rows(flags, shape) if self.structured else flags.reshape(shape))
        return Round(), new, {}


class Ssfl(OneShotMethod):
    """SSFL (Ohib et al.): nodes send dense SNIP saliency scores once; the server sums them and
    keeps the top entries."""

    name = "ssfl"
    votes_on_masks = False
    description = "top-k of the nodes' summed SNIP scores, sent dense once"

    @property
    def structured(self) -> bool:
        """Scores are per weight, so SSFL's masks are unstructured whatever the criterion."""
        return False

    def mask_round(self, server: Server, step: Step, prev_density: float) -> tuple[Round, masks.Mask, dict]:
        requests = server.requests(server.sample(step), w0=step)
        shapes = server.spec.prunable_shapes

        def decode(node: int, reply: Sequence[bytes]) -> codec.Body:
            return codec.decode_dense(reply[0], Kind.SCORES, shapes, round=step.step)

        exchanged = server.exchange(TASK_SCORES, step, requests, decode)
        server.acknowledge(exchanged, w0=True)
        total = weighted_average([b.tensors for b in exchanged.replies.values()], exchanged.weights())
        prune = self.cfg.prune
        return exchanged, masks.select(total, server.state.mask, step.density, prune.scope, prune.layer_floor), {}
