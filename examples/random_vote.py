"""A method with node work of its own, as a plug-in: nodes propose random masks, the server keeps
the entries that most of them proposed.

    mpfl run --plugins examples/random_vote.py --method random-vote
    mpfl run --plugins examples/random_vote.py --method random-vote --workers 2

In each mask round (on the schedule of `--mask-rounds`) the nodes asked draw one random score per
entry of the consensus mask they hold, from a stream of the method's own (`mpfl.seeds.plugin_rng`:
the same draws in every runner and worker process), and propose the entries with the highest scores
at the round's density. The server weighs each proposal by the node's sample count and keeps the
most-proposed entries at that density (ties broken by a seeded draw of its own); the training phase
then runs masked FedAvg, inherited from `MaskedMethod`. A baseline no data chose the mask of, as
`random` is, but one that travels as votes (and, as `random`, slow to train at high sparsity).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mpfl import MaskedMethod, codec, register_method, register_task
from mpfl.core.masks import Mask, select
from mpfl.core.params import Weights
from mpfl.node import Node
from mpfl.protocol import Round, Step
from mpfl.seeds import plugin_rng
from mpfl.server import Server

NAME = "random-vote"
TASK = "random_vote"  # a node task's name is a Python identifier: Flower routes its messages by it


def propose(node: Node, step: int, weights: Weights | None) -> list[bytes]:
    """The node side: a random subset of the node's consensus mask at the round's density, coded over
    that mask and carrying the node's sample count (which the server weighs its proposal by)."""
    current, prune = node.mask, node.cfg.prune
    draw = plugin_rng(NAME, node.cfg.seed, step, node.id)
    proposal = select([draw.random(m.shape) for m in current], current, node.steps[step].density, prune.scope,
                      prune.layer_floor)
    return [codec.encode_mask(proposal, current, round=step, base_version=node.state.version,
                              coder=node.cfg.codec.mask_coder, num_samples=node.claimed_samples)]


register_task(TASK, propose)


@register_method
class RandomVote(MaskedMethod):
    """Seeded random proposals from the nodes, the most proposed entries kept."""

    name = NAME
    description = "nodes propose seeded random masks; the server keeps the most proposed entries"
    votes_on_masks = False  # no local mask search: MPFL's --extrapolate, --mask-epochs and --vote-weighting do nothing
    trains_in_mask_rounds = False

    @property
    def structured(self) -> bool:
        """Proposals pick single entries, so masks are unstructured whatever the criterion."""
        return False

    def mask_round(self, server: Server, step: Step, prev_density: float) -> tuple[Round, Mask, dict]:
        """The server side: ask the round's sample for proposals (each request brings a node the mask
        updates it missed), then keep the entries with the largest weighted share of proposals."""
        support, version = server.state.mask, server.state.version

        def decode(node: int, reply: Sequence[bytes]) -> codec.Body:
            return codec.decode_mask(reply[0], support, round=step.step, base_version=version)

        exchanged = server.exchange(TASK, step, server.requests(server.sample(step)), decode)
        server.acknowledge(exchanged)
        share = np.asarray(exchanged.weights()) / sum(exchanged.weights())
        proposals = [body.tensors for body in exchanged.replies.values()]
        votes = [sum(a * p[i] for a, p in zip(share, proposals)) for i in range(len(support))]
        # equal shares are common (a few nodes, each proposing a tenth): a seeded draw of the server's own breaks
        # the ties, where the lower index would hand them all to the first layers
        draw = plugin_rng(NAME, self.cfg.seed, step.step)
        prune = self.cfg.prune
        return exchanged, select(votes, support, step.density, prune.scope, prune.layer_floor,
                                 tiebreak=[draw.random(m.shape) for m in support]), {}


if __name__ == "__main__":
    from mpfl import Config, simulate

    cfg = Config().with_overrides({"method": NAME, "train_samples": 6000, "rounds": 5, "threads": 1})
    summary = simulate(cfg).summary
    print(f"accuracy {summary['final_accuracy']:.4f} at density {summary['final_density']:.3f}")
