"""Named random streams: their numbers are part of every run's results, so they never change."""

import numpy as np

from mpfl.seeds import POOLED, Stream, rng


def test_stream_numbers_are_fixed():
    """A renumbered stream would change every run that draws from it (which nodes are asked, which are
    malicious, every injected fault) without any error: runs of older versions could no longer be repeated."""
    assert {s.name: int(s) for s in Stream} == {"SAMPLE": 1, "RANDOM_MASK": 2, "MALICIOUS": 3, "FAULTS": 4, "POISON": 5,
                                               "FORGED_MASK": 6, "REGROW": 7, "MASK_SAMPLE": 8, "CRITERION": 9}
    assert POOLED == 2**31 - 1


def test_a_draw_depends_on_its_key_only():
    first = rng(0, 3, Stream.SAMPLE).random(4)
    rng(0, 3, Stream.FAULTS).random(100)  # another purpose's draws in between shift nothing
    assert np.array_equal(rng(0, 3, Stream.SAMPLE).random(4), first)
    assert np.array_equal(np.random.default_rng([0, 3, 1]).random(4), first)
    assert not np.array_equal(rng(0, 3, Stream.FAULTS).random(4), first)
    assert not np.array_equal(rng(1, 3, Stream.SAMPLE).random(4), first)
