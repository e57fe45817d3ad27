"""Named random streams: every random draw of a run comes from (seed, [step, node,] stream).

Keeping each purpose on its own stream makes draws independent of the order in which they
happen, so the simulator, its worker processes and Flower draw the same numbers, and a new
kind of draw never shifts an old one. The values are part of the results' identity: never
renumber one, only add new ones.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """What a random draw is for (the last entry of its seed key)."""

    SAMPLE = 1          # which nodes a round asks (server)
    RANDOM_MASK = 2     # the `random` method's mask (server)
    MALICIOUS = 3       # which nodes are malicious (config)
    FAULTS = 4          # injected dropouts, stragglers, corruption (simulator)
    POISON = 5          # a data attack's noise or label shuffle (node)
    FORGED_MASK = 6     # a random-mask attack's forged mask (node)
    REGROW = 7          # the batches a node measures its regrow gradient on (node)
    MASK_SAMPLE = 8     # which nodes a mask round asks (server)
    CRITERION = 9       # a plug-in criterion's own draws (its `rng`, node)


POOLED = 2**31 - 1
"""The node id of the server's pooled-data search (`centralized`), distinct from every real node."""


def rng(*key: int) -> np.random.Generator:
    """A numpy generator for a seed key such as (seed, step, Stream.SAMPLE)."""
    return np.random.default_rng([int(k) for k in key])
