"""Named random streams: their numbers are part of every run's results, so they never change."""

import numpy as np

from mpfl.seeds import POOLED, SETUP, Stream, plugin_rng, rng


def test_stream_numbers_are_fixed():
    """A renumbered stream would change every run that draws from it (which nodes are asked, which are
    malicious, every injected fault) without any error: runs of older versions could no longer be repeated."""
    assert {s.name: int(s) for s in Stream} == {"SAMPLE": 1, "RANDOM_MASK": 2, "MALICIOUS": 3, "FAULTS": 4, "POISON": 5,
                                               "FORGED_MASK": 6, "REGROW": 7, "MASK_SAMPLE": 8, "CRITERION": 9,
                                               "PLUGIN": 10}
    assert POOLED == 2**31 - 1


def test_a_draw_depends_on_its_key_only():
    first = rng(0, 3, Stream.SAMPLE).random(4)
    rng(0, 3, Stream.FAULTS).random(100)  # another purpose's draws in between shift nothing
    assert np.array_equal(rng(0, 3, Stream.SAMPLE).random(4), first)
    assert np.array_equal(np.random.default_rng([0, 3, 1]).random(4), first)
    assert not np.array_equal(rng(0, 3, Stream.FAULTS).random(4), first)
    assert not np.array_equal(rng(1, 3, Stream.SAMPLE).random(4), first)


def test_a_plugin_draws_from_a_stream_of_its_own_name():
    """Plug-ins key their draws by name: one plug-in's draws repeat with its inputs, and neither another
    plug-in's nor a built-in stream's draws are its own (its key is pinned: it is part of its runs' results)."""
    first = plugin_rng("random-vote", 0, 3, 1).random(4)
    assert np.array_equal(plugin_rng("random-vote", 0, 3, 1).random(4), first)
    assert np.array_equal(rng(0, 3, 1, Stream.PLUGIN, 0xAA9772D5).random(4), first)
    assert np.array_equal(plugin_rng("random-vote", 0, 3).random(4), rng(0, 3, Stream.PLUGIN, 0xAA9772D5).random(4))
    others = [plugin_rng("random-votes", 0, 3, 1), plugin_rng("random-vote", 0, 3), plugin_rng("random-vote", 1, 3, 1),
              plugin_rng("random-vote", 0, SETUP, 1), plugin_rng("random-vote", 0, 3, 2),
              *(rng(0, 3, 1, stream) for stream in Stream)]
    assert not any(np.array_equal(other.random(4), first) for other in others)


def test_no_two_purposes_draw_from_the_same_key(monkeypatch):
    """Every generator a run builds, by family (numpy, torch) and key (trailing zeros dropped, as numpy's
    SeedSequence pads them), comes from one call site: a run with sampled mask and training rounds, a
    poisoned node, injected faults, adaptation rounds and forged masks."""
    import inspect
    import sys

    from conftest import tiny_config
    from mpfl.core import training
    from mpfl.seeds import rng as numpy_rng
    from mpfl.sim import simulate

    torch_generator, users = training.generator, {}

    def recording(family, make):
        def build(*key):
            caller = inspect.stack()[1]
            site = f"{caller.filename}:{caller.function}"
            trimmed = list(key)
            while trimmed and trimmed[-1] == 0:
                trimmed.pop()
            users.setdefault((family, tuple(trimmed)), set()).add(site)
            return make(*key)

        return build

    for name, module in list(sys.modules.items()):
        if name.startswith("mpfl"):
            if getattr(module, "rng", None) is numpy_rng:
                monkeypatch.setattr(module, "rng", recording("numpy", numpy_rng))
            if getattr(module, "generator", None) is torch_generator:
                monkeypatch.setattr(module, "generator", recording("torch", torch_generator))
    # seed 3 makes nodes 0 and 1 malicious; with poison keyed (seed, node, POISON), node 1's noise would come
    # from node 5's training key in round 1, (seed, 1, 5)
    cfg = tiny_config(nodes=6, mask_rounds=2, rounds=4, fraction=0.7, mask_fraction=1.0, malicious=2, attack="noise",
                      dropout=0.1, adapt_every=1, adapt_until=1.0, seed=3, train_samples=1200, test_samples=100)
    simulate(cfg)
    simulate(cfg.with_overrides({"attack": "random-mask", "mask_fraction": 0.6}))
    assert {family for family, _ in users} == {"numpy", "torch"} and len(users) > 50
    shared = {key: sites for key, sites in users.items() if len(sites) > 1}
    assert not shared, shared
