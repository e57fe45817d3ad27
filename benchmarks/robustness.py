"""MPFL under attack: accuracy and final-mask overlap with the clean run, with and without robust rules.

    python benchmarks/robustness.py [--quick] [--json PATH] [--attacks a,b] [--counts 1,2,3] [--claims 1000]

MNIST, 10 IID nodes, mlp, sparsity 0.9, the package's default MPFL settings. Three groups of rows:

* every attack, with 1, 2 and 3 malicious nodes of 10, under the default rules (votes weighted by
  agreement with the majority mask, FedAvg mean) and the robust ones (the same votes and a
  coordinate-wise trimmed mean of the kept values, trimming 20 % at each end);
* forged sample counts: malicious nodes send inverted masks and claim `--claims` times their
  samples (`--attack-samples`), under sample-weighted votes (`samples`, the earlier default), the
  default rules and the robust rules;
* a value attack inside `value_limit` (`large-values`: every value at half the limit) against each
  aggregator: mean, trimmed-mean, median and Krum (told how many nodes are malicious).

Accuracy drop and mask overlap (the Jaccard index of the consensus masks at the end of the mask
phase, which is what the vote decides; mask adaptation then moves them during training, with the
malicious nodes training as honestly as their attack allows) are taken against the clean run;
`mask_jaccard_honest` compares with the run, under the same vote weighting, in which the
malicious nodes stay silent: what the honest nodes alone agree on, and so the most any defence can
recover (none for the value attacks, whose nodes vote honestly in the mask phase).
--quick uses a 12,000-image slice, 3 mask and 5 training rounds, and one and two malicious nodes.
"""

from __future__ import annotations

from _common import emit, parser

from mpfl.attacks import ATTACKS, attacks_of_kind
from mpfl.config import Config
from mpfl.core.masks import jaccard
from mpfl.sim import simulate

RULES = {"samples": {"vote_weighting": "samples"}, "default": {},
         "robust": {"vote_weighting": "agreement", "aggregator": "trimmed-mean", "trim": 0.2}}
AGGREGATORS = ("mean", "trimmed-mean", "median", "krum")
COLUMNS = ["attack", "malicious", "claims", "rules", "final_accuracy", "accuracy_drop", "mask_jaccard",
           "mask_jaccard_honest"]


def _cells(attacks: list[str], counts: list[int], claims: float) -> list[tuple[str, int, float, str, dict]]:
    """Every run after the clean one: (attack, malicious, claims, rules label, config overrides)."""
    cells = [("none", 0, 1.0, "robust", RULES["robust"])]
    cells += [(a, n, 1.0, r, RULES[r]) for a in attacks for n in counts for r in ("default", "robust")]
    cells += [("inverted-mask", n, claims, r, RULES[r]) for n in counts for r in ("samples", "default", "robust")]
    cells += [("large-values", n, 1.0, agg, {"aggregator": agg, "byzantine": n}) for n in counts for agg in AGGREGATORS]
    return cells


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--attacks", default=",".join(a for a in ATTACKS.names() if a not in ("none", "silent", "large-values")),
                   help="attacks of the first group (large-values has its own group, against every aggregator)")
    p.add_argument("--counts", default="1,2,3")
    p.add_argument("--claims", type=float, default=1000.0, help="the factor forging nodes multiply their sample count by")
    args = p.parse_args()
    base = {"model": "mlp", "nodes": 10, "sparsity": 0.9, "eval_every": 0, "threads": 1}
    counts = [int(c) for c in args.counts.split(",")]
    if args.quick:
        base.update(train_samples=12000, mask_rounds=3, rounds=5)
        counts = [c for c in counts if c <= 2]

    def run(**overrides):
        return simulate(Config().with_overrides({**base, **overrides}))

    def voted(result):
        """The consensus mask at the end of the mask phase."""
        return result.masks[max(r["step"] for r in result.records if r["phase"] == "mask")]

    default_weighting = Config().robust.vote_weighting
    clean = run()
    clean_acc, clean_mask = clean.summary["final_accuracy"], voted(clean)
    honest = {(n, vw): voted(run(malicious=n, attack="silent", vote_weighting=vw))
              for n in counts for vw in {"samples", default_weighting}}
    values = set(attacks_of_kind("values"))
    rows = [{"attack": "none", "malicious": 0, "claims": 1.0, "rules": "default", "final_accuracy": clean_acc,
             "accuracy_drop": 0.0, "mask_jaccard": 1.0, "mask_jaccard_honest": 1.0}]
    for attack, n, claims, rules, overrides in _cells(args.attacks.split(","), counts, args.claims):
        faults = {"malicious": n, "attack": attack, "attack_samples": claims} if n else {}
        result = run(**overrides, **faults)
        acc = result.summary["final_accuracy"]
        reference = honest[n, overrides.get("vote_weighting", default_weighting)] if n else clean_mask
        rows.append({"attack": attack, "malicious": n, "claims": claims, "rules": rules, "final_accuracy": acc,
                     "accuracy_drop": clean_acc - acc, "mask_jaccard": jaccard(voted(result), clean_mask),
                     "mask_jaccard_honest": None if attack in values else jaccard(voted(result), reference)})
        print(rows[-1], flush=True)
    emit(f"MNIST, {base['model']}, 10 IID nodes, sparsity 0.9: attacks vs robust rules", rows, args.json, COLUMNS)


if __name__ == "__main__":
    main()
