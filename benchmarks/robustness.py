"""MPFL under attack: accuracy and final-mask overlap with the clean run, with and without robust rules.

    python benchmarks/robustness.py [--quick] [--json PATH] [--attacks a,b] [--counts 1,2,3]

MNIST, 10 IID nodes, mlp, sparsity 0.9, the package's default MPFL settings. For each attack and
number of malicious nodes (1, 2, 3 of 10) the run is repeated with the plain rules (sample-weighted
votes, FedAvg mean) and with the robust ones (votes weighted by agreement with the majority mask,
coordinate-wise trimmed mean of the kept values, trimming 20 % at each end). Accuracy drop and
mask overlap (the Jaccard index of the final masks) are taken against the clean run;
`mask_jaccard_honest` compares with the run, under the same rules, in which the malicious nodes
stay silent: what the honest nodes alone agree on, and so the most any defence can recover
(none for the value attacks, whose nodes vote honestly in the mask phase).
--quick uses a 12,000-image slice, 3 mask and 5 training rounds, and one and two malicious nodes.
"""

from __future__ import annotations

from _common import emit, parser

from mpfl.attacks import VALUE_ATTACKS
from mpfl.config import ATTACKS, Config
from mpfl.core.masks import jaccard
from mpfl.sim import simulate

ROBUST = {"vote_weighting": "agreement", "aggregator": "trimmed-mean", "trim": 0.2}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--attacks", default=",".join(a for a in ATTACKS if a not in ("none", "silent")))
    p.add_argument("--counts", default="1,2,3")
    args = p.parse_args()
    base = {"model": "mlp", "nodes": 10, "sparsity": 0.9, "eval_every": 0}
    counts = [int(c) for c in args.counts.split(",")]
    if args.quick:
        base.update(train_samples=12000, mask_rounds=3, rounds=5)
        counts = [c for c in counts if c <= 2]

    def run(robust: bool, **faults):
        return simulate(Config().with_overrides({**base, **(ROBUST if robust else {}), **faults}))

    clean = run(False)
    clean_acc, clean_mask = clean.summary["final_accuracy"], clean.mask
    honest = {(n, robust): run(robust, malicious=n, attack="silent").mask for n in counts for robust in (False, True)}
    rows = [{"attack": "none", "malicious": 0, "robust": False, "final_accuracy": clean_acc, "accuracy_drop": 0.0,
             "mask_jaccard": 1.0, "mask_jaccard_honest": 1.0}]
    cells = [("none", 0, True)] + [(a, n, r) for a in args.attacks.split(",") for n in counts for r in (False, True)]
    for attack, n, robust in cells:
        result = run(robust, **({"malicious": n, "attack": attack} if n else {}))
        acc = result.summary["final_accuracy"]
        rows.append({"attack": attack, "malicious": n, "robust": robust, "final_accuracy": acc,
                     "accuracy_drop": clean_acc - acc, "mask_jaccard": jaccard(result.mask, clean_mask),
                     "mask_jaccard_honest": None if attack in VALUE_ATTACKS else
                     jaccard(result.mask, honest[n, robust] if n else clean_mask)})
        print(rows[-1], flush=True)
    emit(f"MNIST, {base['model']}, 10 IID nodes, sparsity 0.9: attacks vs robust rules", rows, args.json,
         ["attack", "malicious", "robust", "final_accuracy", "accuracy_drop", "mask_jaccard", "mask_jaccard_honest"])


if __name__ == "__main__":
    main()
