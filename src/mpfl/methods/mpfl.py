"""MPFL: nodes train locally and vote with their masks; the server agrees a consensus mask.

`local` is the consensus ablation: MPFL with a single voter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .. import codec
from ..core import masks
from ..core.consensus import VoteContext, agreement_weights, consensus, tally, trimmed_tally
from ..protocol import TASK_MASK, Round, Step
from .base import MaskedMethod

if TYPE_CHECKING:
    from ..server import Server


class Mpfl(MaskedMethod):
    """Masked pruning over FL: w0 once, local masks up and consensus masks down, then kept values."""

    name = "mpfl"
    description = "vote of the nodes' local masks, pruned further each round"

    def voters(self, nodes: Sequence[int]) -> list[int]:
        """The nodes asked for a local mask in each mask round."""
        return list(nodes)

    def mask_round(self, server: Server, step: Step, prev_density: float) -> tuple[Round, masks.Mask, dict]:
        """Voters train and send local masks over the current support; the server tallies the
        (robustly weighted) votes and applies the consensus rule."""
        st, p, robust = server.state, self.cfg.prune, self.cfg.robust
        mask_bodies: dict[int, bytes] = {}
        w0: dict[str, bytes] = {}
        requests = {n: server.w0_body(n, step, w0) + server.mask_update(n, mask_bodies)
                    for n in self.voters(server.node_ids())}
        support = st.mask

        def decode(node: int, reply: Sequence[bytes]) -> codec.Body:
            return codec.decode_mask(reply[0], support, round=step.step, base_version=st.version,
                                     structured=self.structured)

        rnd = server.exchange(TASK_MASK, step, requests, decode)
        server.acknowledge(rnd, w0=True)
        local = [b.tensors for b in rnd.replies.values()]
        ctx = VoteContext(density=step.density, prev_density=prev_density, num_nodes=len(local), scope=p.scope,
                          floor=p.layer_floor, tau=p.tau, percentile=p.percentile, structured=self.structured,
                          tiebreak=[np.abs(w) for w in server.spec.pick(st.w0)])
        weights = rnd.weights()
        if robust.vote_weighting == "agreement":
            weights = list(agreement_weights(local, weights, support))
        elif robust.vote_weighting == "trimmed":
            weights = [1.0] * len(local)  # trimmed votes count every node alike, whatever it claims
        votes = trimmed_tally(local, robust.trim) if robust.vote_weighting == "trimmed" else tally(local, weights)
        new = consensus(votes, support, p.consensus, ctx)
        agreement = float(np.mean([masks.agreement(m, new, support) for m in local]))
        shares = np.asarray(weights) / np.sum(weights)
        return rnd, new, {"agreement": agreement,
                          "vote_weights": {str(n): round(float(w), 6) for n, w in zip(rnd.replies, shares)}}

    def sends_weights(self, server: Server, step: Step, nodes: Sequence[int]) -> bool:
        """With train_init = local, the first training round sends no weights when every sampled
        node took part in the mask phase: each starts from its own trained weights under the mask."""
        own = self.cfg.prune.train_init == "local" and step.phase == "train" and step.index == 1
        return not (own and all(n in server.state.w0_sent for n in nodes))


class Local(Mpfl):
    """The consensus ablation: one node's masks, no vote."""

    name = "local"
    description = "one node's mask, no consensus"

    def voters(self, nodes: Sequence[int]) -> list[int]:
        return list(nodes)[:1]
