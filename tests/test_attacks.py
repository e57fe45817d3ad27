"""The attacks a malicious node runs, each against what its docstring says it does: who is malicious,
poisoned data, forged masks and values, silence."""

import numpy as np
import pytest
import torch

from conftest import tiny_config
from mpfl.attacks import ATTACKS, attack_of, attacks_of_kind, malicious_ids
from mpfl.core.masks import keep_count
from mpfl.experiment import Experiment
from mpfl.node import Node, make_trainer
from mpfl.protocol import NodeFailure
from mpfl.sim import simulate


def malicious(attack: str, **overrides) -> tuple[Node, Experiment]:
    """The first malicious node of a 4-node run with one attacker running `attack`, and the run's
    experiment, whose shared data every node's view reads."""
    cfg = tiny_config(nodes=4, malicious=1, attack=attack, **overrides)
    exp = Experiment.from_config(cfg)
    bad = malicious_ids(cfg)[0]
    return Node(bad, cfg, make_trainer(cfg, exp.model, exp.spec), exp.node_data(bad), w0=exp.w0), exp


def malicious_node(attack: str, **overrides) -> Node:
    return malicious(attack, **overrides)[0]


def random_masks(node: Node, density: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(s) < density for s in node.spec.prunable_shapes]


def test_the_malicious_nodes_are_a_seeded_choice_and_only_they_attack():
    cfg = tiny_config(nodes=10, malicious=3, attack="sign-flip")
    bad = malicious_ids(cfg)
    assert bad == sorted(set(bad)) and len(bad) == 3 and all(0 <= n < 10 for n in bad)
    assert malicious_ids(cfg) == bad  # the same seed, the same nodes
    assert len({tuple(malicious_ids(cfg.with_overrides({"seed": s}))) for s in range(10)}) > 1
    assert [attack_of(cfg, n) is ATTACKS.get("sign-flip") for n in range(10)] == [n in bad for n in range(10)]
    assert all(attack_of(tiny_config(nodes=10), n) is None for n in range(10))


def test_attacks_are_grouped_by_kind():
    assert attacks_of_kind("data") == ["noise", "shuffle"]
    assert attacks_of_kind("mask") == ["random-mask", "inverted-mask", "important-mask"]
    assert attacks_of_kind("values") == ["scale", "sign-flip", "large-values"]
    assert attacks_of_kind("silent") == ["silent"] and ATTACKS.get("silent").silent
    assert not any(ATTACKS.get(name).silent for name in ATTACKS if name != "silent")


def test_noise_replaces_the_nodes_images_by_seeded_gaussian_noise_and_keeps_its_labels():
    node, exp = malicious("noise")
    own = exp.node_data(node.id)
    n = own.num_samples
    assert node.data.num_samples == n and node.data.train.tolist() == list(range(n)) and len(node.data.val) == 0
    assert node.data.x.shape == (n, *own.x.shape[1:])
    assert torch.equal(node.data.y, own.y[own.train])
    assert abs(float(node.data.x.mean())) < 0.02 and abs(float(node.data.x.std()) - 1) < 0.02
    assert torch.equal(malicious_node("noise").data.x, node.data.x)
    assert not torch.equal(malicious_node("noise", seed=1).data.x[:10], node.data.x[:10])


def test_shuffle_permutes_the_labels_among_the_nodes_own_samples_only():
    node, exp = malicious("shuffle")
    own = exp.node_data(node.id)
    true_labels = Experiment.from_config(node.cfg).dataset.y_train
    assert torch.equal(own.y, true_labels)  # the shared labels, which every other node reads, stay true
    idx = own.train
    assert torch.equal(node.data.train, idx) and torch.equal(node.data.val, own.val) and torch.equal(node.data.x, own.x)
    assert sorted(node.data.y[idx].tolist()) == sorted(own.y[idx].tolist())
    assert (node.data.y[idx] != own.y[idx]).float().mean() > 0.5
    others = torch.ones(len(own.y), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(node.data.y[others], own.y[others])


def test_a_random_mask_keeps_as_many_entries_as_the_honest_one_chosen_uniformly_from_the_current_mask():
    node = malicious_node("random-mask")
    current, honest = random_masks(node, 0.6, 0), random_masks(node, 0.3, 1)
    honest = [h & c for h, c in zip(honest, current)]
    start = node.spec.apply(node.built_w0, current)
    forged = node.forge_mask(honest, current, start, 1)
    assert [int(f.sum()) for f in forged] == [int(h.sum()) for h in honest]
    assert all(not (f & ~c).any() for f, c in zip(forged, current))
    assert all(0.2 < (f & h).sum() / h.sum() < 0.4 for f, h in zip(forged, honest))  # 0.3 / 0.6 by chance alone
    again, later = node.forge_mask(honest, current, start, 1), node.forge_mask(honest, current, start, 2)
    assert all(np.array_equal(a, f) for a, f in zip(again, forged))
    assert not all(np.array_equal(b, f) for b, f in zip(later, forged))


def test_an_inverted_mask_is_exactly_what_the_honest_mask_prunes():
    node = malicious_node("inverted-mask")
    current, honest = random_masks(node, 0.6, 0), random_masks(node, 0.3, 1)
    honest = [h & c for h, c in zip(honest, current)]
    forged = node.forge_mask(honest, current, node.spec.apply(node.built_w0, current), 1)
    for f, h, c in zip(forged, honest, current):
        assert np.array_equal(f | h, c) and not (f & h).any()


def test_an_important_mask_keeps_the_smallest_weights_at_the_rounds_density():
    node = malicious_node("important-mask")
    current = random_masks(node, 0.8, 0)
    start = node.spec.apply(node.built_w0, current)
    forged = node.forge_mask(random_masks(node, 0.5, 1), current, start, 1)
    size = sum(c.size for c in current)  # a round's density is a share of the whole model, as for honest masks
    assert sum(int(f.sum()) for f in forged) == keep_count(size, node.steps[1].density)
    for f, c, w in zip(forged, current, node.spec.pick(start)):
        assert not (f & ~c).any()
        assert np.abs(w[f]).max() <= np.abs(w[c & ~f]).min()  # every kept weight is at most every dropped one


@pytest.mark.parametrize(("attack", "factor"), [("scale", 10.0), ("sign-flip", -1.0)])
def test_scaled_values_report_the_start_plus_a_multiple_of_the_update(attack, factor):
    node = malicious_node(attack)
    rng = np.random.default_rng(0)
    start = [rng.normal(size=s).astype(np.float32) for s in node.spec.shapes]
    trained = [s + rng.normal(scale=0.01, size=s.shape).astype(np.float32) for s in start]
    forged = node.forge_values(trained, start, 3)
    for f, t, s in zip(forged, trained, start):
        assert f.dtype == np.float32
        np.testing.assert_allclose(f, s.astype(np.float64) + factor * (t.astype(np.float64) - s), rtol=1e-5, atol=1e-6)


def test_large_values_sit_at_half_the_value_limit_with_the_sign_of_the_update():
    node = malicious_node("large-values", value_limit=100.0)
    start = [np.array([1.0, 2.0, 3.0], dtype=np.float32)]
    trained = [np.array([1.5, 1.0, 3.0], dtype=np.float32)]
    assert node.forge_values(trained, start, 3)[0].tolist() == [50.0, -50.0, 50.0]  # no change counts as up


def test_a_silent_node_withholds_every_reply():
    node = malicious_node("silent")
    reply = node.handle("train", 1, [])
    assert isinstance(reply, NodeFailure) and "silent" in reply.reason


@pytest.mark.parametrize("aggregator, bounded", [("mean", False), ("median", True), ("trimmed-mean", True),
                                                 ("krum", True)])
def test_forged_values_of_a_mask_round_reach_its_average_and_a_robust_aggregator_bounds_them(aggregator, bounded):
    """A one-round mask phase averages the kept values its nodes send; a value attacker forges those
    too, which the mean takes in and every robust aggregator leaves out."""
    cfg = tiny_config(nodes=5, malicious=1, attack="large-values", aggregator=aggregator, mask_rounds=1, rounds=0)
    largest = max(float(np.abs(w).max()) for w in simulate(cfg).weights)
    assert (largest < 1.0) if bounded else largest == cfg.robust.value_limit / 2


def test_top_k_nodes_forge_the_update_they_send():
    clean = simulate(tiny_config(method="topk", nodes=4, rounds=1)).weights
    forged = simulate(tiny_config(method="topk", nodes=4, rounds=1, malicious=1, attack="large-values")).weights
    assert max(float(np.abs(w).max()) for w in clean) < 1.0
    assert max(float(np.abs(w).max()) for w in forged) > 100.0  # a quarter of half the value limit, where kept
