"""MPFL: nodes train locally and vote with their masks; the server agrees a consensus mask, then
trains on it and lets the nodes repair it by vote.

The mask search and its defaults are built for label-skewed data, where each node holds a few
classes (docs/results.md, "Label skew"):

* nodes rank weights by how far their training moved them (`extrapolate`), not by magnitude,
  which every node would share through w0;
* each node also marks its core (`core_share` of its own mask), and any node's core outranks
  plain votes, so what the classes of one or two nodes need survives the vote;
* from mask round `mask_average_from` on (by default the last, or the second when mask rounds
  sample the nodes), nodes also send their kept values and every later round starts from their
  average, so training (and, averaged earlier, the nodes' masks) starts from a shared model;
* in training, every `adapt_every` rounds the nodes vote for pruned weights to regrow and the
  server swaps them for its smallest kept weights, at constant density.

`local` is the consensus ablation: MPFL with a single voter.

Each mask round asks a seeded sample of the nodes (`prune.mask_fraction`, by default
`train.fraction`): the consensus is taken over the sampled nodes' votes, and a node left out
catches up with the current mask when it is next asked (docs/architecture.md, "Many nodes, few
asked", says what this changes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import codec
from ..core import adapt, masks
from ..core.consensus import VoteContext, agreement_weights, consensus, tally, trimmed_tally, with_cores
from ..errors import PayloadError
from ..protocol import TASK_ADAPT, TASK_MASK, Round, Step
from .base import MaskedMethod

if TYPE_CHECKING:
    from ..server import Server


@dataclass
class _MaskExtras:
    """What a mask reply carries besides the mask: the node's core, and its kept values with the
    supports they lie on (each only in the rounds that ask for it)."""

    core: masks.Mask | None = None
    holds: masks.Mask | None = None
    values: list[np.ndarray] | None = None


class Mpfl(MaskedMethod):
    """Masked pruning over FL: local masks up and consensus masks down, then kept values."""

    name = "mpfl"
    votes_on_masks = True
    description = "vote of the nodes' local masks, pruned further each round; repaired by vote in training"

    def voters(self, server: Server, step: Step) -> list[int]:
        """The nodes asked for a local mask in mask round `step`: the round's sample of the nodes."""
        return server.sample(step)

    # ------------------------------------------------------------------ message shapes

    def sends_cores(self, step: Step) -> bool:
        prune = self.cfg.prune
        return (step.phase == "mask" and prune.core_share > 0 and not self.structured
                and self.cfg.robust.vote_weighting != "trimmed")

    def average_start(self) -> int:
        """The first mask round whose kept values are averaged (`mask_average_from`, negative counted from
        the end: -1 is the last mask round); 0: none. Unset, it is the last mask round, or the second
        when mask rounds sample the nodes: a sampled node's own weights come from the last round it was
        asked in, or from w0, so without a shared start every round's masks would come from stale weights."""
        prune = self.cfg.prune
        start, rounds = prune.mask_average_from, prune.mask_rounds
        if start is None:
            return min(2, rounds) if self.cfg.mask_round_fraction < 1 else rounds
        return rounds + 1 + start if start < 0 else start

    def averages(self, step: Step) -> bool:
        start = self.average_start()
        return step.phase == "mask" and 0 < start <= step.index

    def shares_start(self, step: Step) -> bool:
        start = self.average_start()
        after_warmup = step.index == 1 and self.cfg.prune.warmup_rounds > 0
        return step.phase == "mask" and ((0 < start < step.index) or after_warmup)

    def swap_fraction(self, step: Step) -> float:
        if step.phase != "train" or self.structured:
            return 0.0
        settings = self.cfg.adapt
        return adapt.swap_fraction(step.index, self.cfg.rounds, settings.adapt_every, settings.adapt_fraction,
                                   settings.adapt_until)

    # ------------------------------------------------------------------ mask search

    def mask_round(self, server: Server, step: Step, prev_density: float) -> tuple[Round, masks.Mask, dict]:
        """Voters train and send local masks over the current support (with their cores and kept
        values when asked); the server tallies the (robustly weighted) votes, lets the cores
        outrank plain votes, applies the consensus rule and averages the kept values."""
        state, prune = server.state, self.cfg.prune
        cores, averaging = self.sends_cores(step), self.averages(step)
        support = state.mask
        start = [self.weights_body(server, step, server.spec.supports(support))] if self.shares_start(step) else []
        requests = server.requests(self.voters(server, step), start, w0=step)
        extras: dict[int, _MaskExtras] = {}

        def decode(node: int, reply: Sequence[bytes]) -> codec.Body:
            body = codec.decode_mask(reply[0], support, round=step.step, base_version=state.version,
                                     structured=self.structured)
            rest, extra = list(reply[1:]), _MaskExtras()
            if cores:
                extra.core = codec.decode_mask(rest.pop(0), body.tensors, round=step.step,
                                               base_version=state.version).tensors
            if averaging:
                extra.holds = server.spec.supports(body.tensors)
                counts = [int(np.count_nonzero(s)) for s in extra.holds]
                values = codec.decode_kept_values(rest.pop(0), counts, round=step.step, base_version=state.version)
                server.check_values(values)
                extra.values = values.tensors
            extras[node] = extra
            return body

        exchanged = server.exchange(TASK_MASK, step, requests, decode, bodies=1 + cores + averaging)
        server.acknowledge(exchanged, w0=True)
        voted = list(exchanged.replies)
        local = [exchanged.replies[n].tensors for n in voted]
        ctx = VoteContext(density=step.density, prev_density=prev_density, num_nodes=len(local), scope=prune.scope,
                          floor=prune.layer_floor, tau=prune.tau, percentile=prune.percentile, structured=self.structured,
                          tiebreak=[np.abs(w) for w in server.spec.pick(state.w0)], options=self.cfg.plugin_options)
        votes, vote_weights = self.votes(local, exchanged.weights(), support)
        if cores:
            votes = with_cores(votes, [extras[n].core for n, w in zip(voted, vote_weights) if w > 0])
        new = consensus(votes, support, prune.consensus, ctx)
        if averaging:
            counted = [(n, w) for n, w in zip(voted, vote_weights) if w > 0]
            state.weights = server.average_held([extras[n].values for n, _ in counted],
                                                [extras[n].holds for n, _ in counted],
                                                [w for _, w in counted], server.spec.supports(new))
        agreement = float(np.mean([masks.agreement(m, new, support) for m in local]))
        shares = np.asarray(vote_weights) / np.sum(vote_weights)
        return exchanged, new, {"agreement": agreement,
                                "vote_weights": {str(n): round(float(w), 6) for n, w in zip(voted, shares)}}

    def votes(self, local: Sequence[masks.Mask], counts: Sequence[float], support: masks.Mask
              ) -> tuple[list[np.ndarray], list[float]]:
        """The votes per entry from the voters' local masks, and each voter's weight in them: its
        (bounded) sample count, that scaled by its agreement with the majority (`agreement`), or
        the same for all (`trimmed`, a per-entry trimmed mean whatever the nodes claim)."""
        robust = self.cfg.robust
        if robust.vote_weighting == "trimmed":
            return trimmed_tally(local, robust.trim), [1.0] * len(local)
        if robust.vote_weighting == "agreement":
            counts = list(agreement_weights(local, counts, support))
        return tally(local, counts), list(counts)

    def after_mask(self, server: Server, step: Step, mask: masks.Mask) -> None:
        """After an averaging round the global weights are the nodes' average (already masked)."""
        if not self.averages(step):
            super().after_mask(server, step, mask)

    def _averaged(self, server: Server) -> bool:
        """Whether some mask round of this run averaged the nodes' values (the training start is then theirs)."""
        return any(self.averages(s) and s.step in server.state.history for s in self.planned if s.phase == "mask")

    def start_training(self, server: Server) -> None:
        """Training continues from the last average of the mask phase, if there was one; else w0 masked."""
        if self._averaged(server):
            server.state.weights = server.spec.apply(server.state.weights, server.state.mask)
        else:
            super().start_training(server)

    # ------------------------------------------------------------------ training

    def sends_weights(self, server: Server, step: Step, nodes: Sequence[int]) -> bool:
        """With train_init = local and no averaged start, the first training round sends no weights
        when every sampled node took part in the mask phase: each starts from its own trained weights."""
        own = self.cfg.prune.train_init == "local" and step.phase == "train" and step.index == 1
        return not (own and not self._averaged(server) and all(n in server.state.w0_sent for n in nodes))

    def train_round(self, server: Server, step: Step) -> Round:
        """Masked FedAvg; in an adaptation round the nodes also vote on pruned weights to regrow and
        the server swaps them in at constant density (regrown weights start at 0)."""
        fraction = self.swap_fraction(step)
        if fraction == 0:
            return super().train_round(server, step)
        state = server.state
        supports = server.spec.supports(state.mask)
        pruned = [~m for m in state.mask]
        nodes = server.sample(step)
        requests = server.requests(nodes, [self.weights_body(server, step, supports)])
        node_votes = self.cfg.adapt.adapt_drop == "votes"
        counts = adapt.swap_counts(state.mask, fraction)
        regrow: dict[int, list[np.ndarray]] = {}
        drop: dict[int, list[np.ndarray]] = {}

        def decode(node: int, reply: Sequence[bytes]) -> codec.Body:
            body = codec.decode_values(reply[0], supports, round=step.step, base_version=state.version)
            regrow[node] = _swap_vote("regrow", reply[1], pruned, counts, step, state.version)
            if node_votes:
                drop[node] = _swap_vote("drop", reply[2], state.mask, counts, step, state.version)
            return body

        exchanged = server.exchange(TASK_ADAPT, step, requests, decode, bodies=2 + node_votes)
        server.acknowledge(exchanged)
        state.weights = server.advance(step, server.aggregate(exchanged))
        voted, weights = list(exchanged.replies), exchanged.weights()
        kept = server.spec.pick(state.weights)
        if node_votes:
            drop_scores, _ = self.votes([drop[n] for n in voted], weights, state.mask)
        else:
            drop_scores = adapt.server_drop(kept, state.mask)
        regrow_scores, _ = self.votes([regrow[n] for n in voted], weights, pruned)
        new, grown, _ = adapt.swap(state.mask, regrow_scores, drop_scores, counts, kept)
        server.adopt_mask(step, new)
        state.weights = server.spec.apply(state.weights, new)
        exchanged.metrics.update({"swap_fraction": round(fraction, 6), "swapped": int(sum(int(g.sum()) for g in grown))})
        return exchanged


def _swap_vote(kind: str, body: bytes, over: masks.Mask, counts: Sequence[int], step: Step, version: int
               ) -> list[np.ndarray]:
    """A node's regrow or drop vote, which must name exactly the swap count of each layer, as every
    node's does: a vote for more positions would weigh as several nodes' votes."""
    vote = codec.decode_mask(body, over, round=step.step, base_version=version).tensors
    for i, (layer, k) in enumerate(zip(vote, counts)):
        if int(np.count_nonzero(layer)) != k:
            raise PayloadError(f"the {kind} vote names {int(np.count_nonzero(layer))} positions of prunable tensor "
                               f"{i}, not its swap count {k}")
    return vote


class Local(Mpfl):
    """The consensus ablation: one node's masks, no vote."""

    name = "local"
    description = "one node's mask, no consensus"

    def voters(self, server: Server, step: Step) -> list[int]:
        """Always the first reachable node, whatever the sampling: the ablation needs one node's masks."""
        return server.node_ids()[:1]
