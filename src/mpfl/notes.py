"""What `mpfl run` says besides its rounds: notes at the start on the flags the rest of the config
leaves without effect (or weaker than they look), and notes at the end on figures a user would
otherwise read past. Notes never stop a run; errors do (`config.Config.validate`)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .config import FIELD_SECTIONS, Config
from .protocol import RoundRecord

if TYPE_CHECKING:
    from .methods import Method
    from .registry import Registry


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


def idle_flags(cfg: Config, given: Iterable[str]) -> list[str]:
    """Notes on the flags in `given` that the rest of `cfg` leaves without effect, so that a setting
    a run ignores is said rather than silently recorded (--tau and --percentile only under a rule
    registered as not reading them)."""
    from .core.consensus import RULES
    from .core.consensus import SETTINGS as RULE_SETTINGS
    from .data import dataset_root, unpublished_files
    from .methods import method_of
    from .plugins import installed_plugins
    from .records import counted

    method, notes = method_of(cfg), []
    for name in given:
        if name == "data_dir":
            root = dataset_root(cfg.data.dataset, cfg.data.data_dir)
            if root is not None and root != Path(cfg.data.data_dir).expanduser():
                notes.append(f"--data-dir {cfg.data.data_dir} does not hold the {cfg.data.dataset} files, so they are "
                             f"read from {root}; check the path if you meant your own copy")
            elif root is not None and (odd := unpublished_files(cfg.data.dataset, root)):
                notes.append(f"--data-dir {cfg.data.data_dir}: the md5 of {', '.join(odd)} is not the published "
                             f"one for {cfg.data.dataset}; check that the folder holds {cfg.data.dataset}")
        elif name == "alpha" and cfg.data.partition != "dirichlet" or name == "shards" and cfg.data.partition != "shards":
            notes.append(f"{flag(name)} has no effect with --partition {cfg.data.partition}")
        elif FIELD_SECTIONS.get(name) in ("prune", "adapt") and not method.prunes:
            notes.append(f"{flag(name)} has no effect with --method {cfg.method}, which does not prune")
        elif name == "fraction" and cfg.train.fraction < 1 and round(cfg.train.fraction * cfg.nodes) < cfg.min_nodes:
            notes.append(f"--fraction {cfg.train.fraction:g} of {cfg.nodes} nodes is fewer than --min-nodes "
                         f"{cfg.min_nodes}, so every round asks {counted(cfg.asked(cfg.train.fraction), 'node')}")
        elif name == "mask_rounds" and (found := sum(s.phase == "mask" for s in method.planned)) != \
                cfg.prune.mask_rounds:
            notes.append(f"--mask-rounds has no effect with --method {cfg.method}, which finds its mask in "
                         f"{'one round' if found == 1 else f'{found} rounds'}")
        elif name in ("extrapolate", "mask_epochs") and (why := _no_local_training(cfg, method, name)):
            notes.append(f"{flag(name)} has no effect with {why}")
        elif name == "core_share" and cfg.prune.core_share > 0 and \
                not any(method.sends_cores(step) for step in method.planned):
            why = ("filter masks" if method.structured else "--vote-weighting trimmed" if
                   cfg.robust.vote_weighting == "trimmed" else f"--method {cfg.method}")
            notes.append(f"--core-share has no effect with {why}: no mask round of this run sends cores")
        elif name == "mask_average_from" and cfg.prune.mask_average_from != 0 and \
                not any(method.averages(step) for step in method.planned):
            notes.append(f"--mask-average-from has no effect with --method {cfg.method}, whose mask rounds average no "
                         "values")
        elif name == "options" and cfg.options and not cfg.plugins and not installed_plugins():
            notes.append(f"--options {', '.join(cfg.plugin_options)} has no effect: only plug-ins read options, and this run "
                         "loads none (name them with --plugins)")
        elif name in ("attack", "attack_scale", "attack_samples", "malicious", "trim", "byzantine", "vote_weighting",
                      "aggregator"):
            notes += [note for note in _idle_trust_flag(cfg, method, name) if note not in notes]
        elif name in RULE_SETTINGS and _ignores(RULES, cfg.prune.consensus, name):
            notes.append(f"{flag(name)} has no effect with --consensus {cfg.prune.consensus}")
    return notes


def _ignores(entries: Registry, entry: str, setting: str) -> bool:
    """Whether a registered rule is known not to read `setting` (a plug-in that does not say may)."""
    reads = entries.reads(entry)
    return reads is not None and setting not in reads


def _no_local_training(cfg: Config, method: Method, name: str) -> str | None:
    """Why --extrapolate or --mask-epochs does nothing in this run (None if it may): they shape the
    local mask search of MPFL's nodes, which the built-in baselines do not run, and a scoring criterion
    does not train in it (so its nodes train no mask epochs)."""
    from .core.masks import CRITERIA

    if method.votes_on_masks is False:
        return f"--method {cfg.method}, whose nodes search no masks of their own"
    if name == "mask_epochs" and CRITERIA.get(cfg.prune.criterion).needs_scores:
        return f"--criterion {cfg.prune.criterion}, which scores the weights instead of training them"
    return None


def _idle_trust_flag(cfg: Config, method: Method, name: str) -> list[str]:
    """Notes on an attack or robustness flag the run leaves without effect, or with less than it
    seems: a mask attack where no node votes, a trim that rounds to no node, Krum with too few replies."""
    from .attacks import ATTACKS
    from .core.aggregate import AGGREGATORS, SETTINGS
    from .records import counted

    faults, robust = cfg.faults, cfg.robust
    no_votes = method.votes_on_masks is False
    trims_votes = bool(method.votes_on_masks) and robust.vote_weighting == "trimmed"
    if name == "attack" and ATTACKS.get(faults.attack).kind == "mask" and no_votes:
        return [f"--attack {faults.attack} has no effect with --method {cfg.method}: it forges the masks nodes vote "
                "with, and this method takes no votes"]
    if name == "attack_scale" and faults.attack != "scale":
        return [f"--attack-scale has no effect with --attack {faults.attack} (only --attack scale reads it)"]
    if name == "malicious" and 2 * faults.malicious >= cfg.nodes and ATTACKS.get(faults.attack).kind != "silent":
        return [f"--malicious {faults.malicious} of {cfg.nodes} nodes leaves no honest majority, which every "
                "robust rule needs to tell the honest nodes apart (docs/trust.md)"]
    if name == "attack_samples" and not faults.malicious:
        return ["--attack-samples has no effect without --malicious: only malicious nodes forge their counts"]
    if name == "vote_weighting" and no_votes:
        return [f"--vote-weighting has no effect with --method {cfg.method}, which takes no mask votes"]
    if name in SETTINGS and _ignores(AGGREGATORS, robust.aggregator, name) and not (name == "trim" and trims_votes):
        return [f"{flag(name)} has no effect with --aggregator {robust.aggregator}"]
    # the rounds the aggregator combines replies in, by the nodes each asks; trimmed votes are the mask rounds'
    aggregated = {"training": cfg.asked(cfg.train.fraction)}
    if any(method.averages(step) for step in method.planned):
        aggregated["averaged mask"] = cfg.asked(cfg.mask_round_fraction)
    trimmed = dict(aggregated) if robust.aggregator == "trimmed-mean" else {}
    if trims_votes:
        trimmed["mask"] = cfg.asked(cfg.mask_round_fraction)
    notes = []
    if name in ("trim", "aggregator", "vote_weighting") and trimmed and \
            all(int(robust.trim * asked) == 0 for asked in trimmed.values()):
        most = max(trimmed.values())
        least = math.ceil(100 / most) / 100  # the smallest --trim that leaves one node out at each end
        fix = f"raise --trim to at least {least:g} or ask more nodes" if least < 0.5 else \
            "ask more nodes (no --trim below 0.5 trims any of 2)"
        notes.append(f"--trim {robust.trim:g} trims none of the {most} nodes a round asks (int(trim x nodes) from each "
                     f"end); {fix}")
    byzantine = robust.byzantine
    if name in ("byzantine", "aggregator") and robust.aggregator == "krum" and \
            (few := {kind: asked for kind, asked in aggregated.items() if asked < 2 * byzantine + 3}):
        kind, asked = min(few.items(), key=lambda item: item[1])
        notes.append(f"Krum withstands {counted(byzantine, 'malicious node')} (--byzantine) only "
                     f"with at least {2 * byzantine + 3} replies a round, and a {kind} round here asks {asked}")
    return notes


FALL_FROM_BEST = 0.05
"""How far the final accuracy may lie below the run's best before the end of the run says so."""


def end_notes(cfg: Config, records: Sequence[RoundRecord], summary: dict,
              options_read: Collection[str] | None = None) -> list[str]:
    """Notes on a finished run's figures that a user would otherwise read past: nodes whose sample
    counts were limited, a final accuracy well below the run's best (the saved model is the last
    round's; with server momentum, the sign of a run overshooting or diverging), a density far from the
    share of the model kept (layers left dense; a filter mask's dropped filters, which take the next layer's
    inputs with them), layers the final mask prunes whole, and options that no plug-in read
    (`options_read`, the keys the run's plug-ins looked up, where known: `mpfl.sim.RunResult.options_read`),
    a misspelt key left silently unused otherwise."""
    from .plugins import installed_plugins

    notes = []
    loads_plugins = bool(cfg.plugins or installed_plugins())  # else the start of the run said the options do nothing
    unread = [key for key in dict.keys(cfg.plugin_options) if key not in (options_read or ())]
    if options_read is not None and loads_plugins and unread:
        read = sorted(map(str, options_read))
        guesses = [guess[0] if len(unread) == 1 else f"{guess[0]} for {key}" for key in unread
                   if (guess := difflib.get_close_matches(key, read, n=1))]
        notes.append(f"no plug-in read --options {', '.join(unread)}, so {'it' if len(unread) == 1 else 'they'} had no "
                     f"effect; the plug-ins read {', '.join(read) if read else 'no option'}"
                     + (f" (did you mean {', '.join(guesses)}?)" if guesses else ""))
    if limited := summary["limited_counts"]:
        attackers = {str(n) for n in summary.get("malicious_nodes", [])}
        advice = ("all of them the run's malicious nodes" if set(limited) <= attackers else
                  "for honest nodes of an uneven split, raise --count-limit to weigh them by their own counts")
        notes.append(f"{len(limited)} of {cfg.nodes} nodes claimed more than --count-limit "
                     f"({cfg.robust.count_limit:g}) times the median node's training samples and weighed as holding "
                     f"that many (summary.json: limited_counts); {advice}")
    final, best = summary["final_accuracy"], summary["best_accuracy"]
    if final is not None and best - final > FALL_FROM_BEST:
        at = next(r for r in records if r["accuracy"] == best)
        note = (f"the final accuracy, {final:.2%}, is {100 * (best - final):.1f} points below the run's best, "
                f"{best:.2%} after {at['phase']} round {at['round']}; final.npz and mpfl export hold the last round's "
                "weights")
        if cfg.train.server_momentum and at["phase"] == "train":
            note += (f". Server momentum ({cfg.train.server_momentum:g}) can overshoot in a run's last rounds and "
                     "diverge over long runs: a lower --server-momentum is steadier (docs/benchmarks.md, \"Server "
                     "momentum over long runs\")")
        notes.append(note)
    if emptied := summary.get("emptied_layers"):
        notes.append(f"the final mask prunes every weight of {', '.join(emptied)} (summary.json: emptied_layers): "
                     "what passes through is the bias alone, whatever the input; no built-in method empties a "
                     "layer, so check the mask criterion or consensus rule, or use a lower --sparsity")
    kept, dense, density = summary.get("params_kept"), summary.get("params_dense"), summary.get("final_density")
    if kept and dense and density:
        share, figures = kept / dense, f"({kept:,} of {dense:,}: summary.json's params_kept)"
        if share > 2 * density:
            left = "--exclude keeps" if cfg.prune.exclude else "the method leaves"
            notes.append(f"density {density:.3f} is that of the prunable weights; with the layers {left} dense the "
                         f"model keeps {share:.1%} of its parameters {figures}")
        elif share < density / 2:
            notes.append(f"density {density:.3f} is the share of the filters' weights kept; a dropped filter also "
                         f"drops the weights of the next layer that read its output, so the shrunk model keeps "
                         f"{share:.1%} of its parameters {figures}; a lower --sparsity keeps more")
    return notes
