"""MPFL against dense FedAvg and the pruning / compression baselines, side by side.

    python benchmarks/methods.py [--quick] [--json PATH] [--methods mpfl,fedavg,...] [--threads N]

MNIST, 10 IID nodes, cnn, sparsity 0.9, the package's default MPFL settings, the same seed,
data and number of training rounds for every method. Bytes are the encoded messages; the
mask phase (and ssfl's scores, fedavg-prune's pruning rounds) are included in the totals.
--quick runs the mlp on a 12,000-image slice with 3 mask and 5 training rounds.
"""

from __future__ import annotations

from _common import emit, parser

from mpfl.config import Config
from mpfl.sim import simulate

VARIANTS = {
    "fedavg": {"method": "fedavg"},
    "mpfl": {"method": "mpfl"},
    "mpfl-saliency": {"method": "mpfl", "criterion": "saliency"},
    "fedavg-prune": {"method": "fedavg-prune"},
    "topk": {"method": "topk"},
    "centralized": {"method": "centralized"},
    "random": {"method": "random"},
    "local": {"method": "local"},
    "ssfl": {"method": "ssfl"},
}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--methods", default=",".join(VARIANTS), help="comma-separated rows to run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1; 0: torch's choice)")
    args = p.parse_args()
    base = {"model": "cnn", "nodes": 10, "sparsity": 0.9, "partition": "iid", "eval_every": 0, "threads": args.threads}
    if args.quick:
        base.update(model="mlp", train_samples=12000, mask_rounds=3, rounds=5)
    rows = []
    for name in args.methods.split(","):
        cfg = Config().with_overrides({**base, **VARIANTS[name]})
        s = simulate(cfg).summary
        rows.append({"method": name, "final_accuracy": s["final_accuracy"], "mask_rounds": s["mask_rounds"],
                     "train_rounds": s["train_rounds"], "density": s["final_density"], "bytes_up": s["bytes_up"],
                     "bytes_down": s["bytes_down"], "wall_time_s": s["wall_time"]})
        print(f"{name}: accuracy {s['final_accuracy']:.4f}, up {s['bytes_up']:,} B, {s['wall_time']:.0f} s", flush=True)
    dense = next((r for r in rows if r["method"] == "fedavg"), None)
    for r in rows:
        r["up_vs_fedavg"] = r["bytes_up"] / dense["bytes_up"] if dense else None
        r["total_vs_fedavg"] = (r["bytes_up"] + r["bytes_down"]) / (dense["bytes_up"] + dense["bytes_down"]) if dense else None
    title = f"MNIST, {base['model']}, 10 IID nodes, sparsity 0.9, seed 0"
    emit(title, rows, args.json, ["method", "final_accuracy", "mask_rounds", "train_rounds", "density", "bytes_up",
                                  "bytes_down", "up_vs_fedavg", "total_vs_fedavg", "wall_time_s"])


if __name__ == "__main__":
    main()
