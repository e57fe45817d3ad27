"""Named random streams: every random draw of a round comes from a key of small integers.

Keeping each purpose on its own stream makes draws independent of the order in which they
happen, so the simulator, its worker processes and Flower draw the same numbers, and a new
kind of draw never shifts an old one. The values are part of the results' identity: never
renumber one, only add new ones.

Three key layouts, so that no two purposes share a generator's key:

* a node's local training and scoring (torch): ``(seed, step, node)``;
* any other draw of a node or made for one (torch or numpy): ``(seed, step, node, stream)``,
  with step `SETUP` for draws made once before the first round;
* the server's draws (numpy): ``(seed, step, stream)``, or ``(seed, stream)`` once per run.
  These may equal a node's training key as integers, but numpy's PCG64 and torch's Mersenne
  Twister turn a key into unrelated sequences;
* a plug-in's draws (numpy, `plugin_rng`): those keys with stream `PLUGIN` followed by a 32-bit
  hash of the plug-in's name, so that plug-ins draw apart from each other and from every stream
  added later.

numpy's SeedSequence pads a key shorter than four 32-bit words with zeros, so ``(seed, 3)`` is
``(seed, 3, 0)``: that is why streams are numbered from 1. Before the first round, the data split
(`mpfl.partition`, a generator of the seed alone) and the initial model (``torch.manual_seed(seed)``)
are drawn once.
"""

from __future__ import annotations

import hashlib
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
    PLUGIN = 10         # a plug-in method's or node task's own draws, keyed by its name too (`plugin_rng`)


SETUP = 0
"""The step of a draw made once, before the first round (rounds count from 1)."""

POOLED = 2**31 - 1
"""The node id of the server's pooled-data search (`centralized`), distinct from every real node."""


def rng(*key: int) -> np.random.Generator:
    """A numpy generator for a seed key such as (seed, step, Stream.SAMPLE)."""
    return np.random.default_rng([int(k) for k in key])


def plugin_rng(name: str, seed: int, step: int, node: int | None = None) -> np.random.Generator:
    """A numpy generator of plug-in `name`'s own (a method, a node task): keyed ``(seed, step, node,
    Stream.PLUGIN, h)`` for a node's draws, ``(seed, step, Stream.PLUGIN, h)`` for the server's (`node` None),
    with h the first 32 bits of the sha256 of `name`. The same inputs give the same draws in every runner,
    worker process and resumed run; two names draw apart unless their hashes collide (about 1 in 4 billion)."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
    return rng(seed, step, Stream.PLUGIN, h) if node is None else rng(seed, step, node, Stream.PLUGIN, h)
