"""What coding a trained model's values costs its accuracy, and how much of it BatchNorm's statistics take.

    python benchmarks/precision.py [--quick] [--json PATH] [--models resnet18 ...]

Each model is trained centrally (the package's local trainer, plain SGD at lr 0.05, batches of
32) on the first 3,000 MNIST training images for 2 epochs (1,000 images and 1 epoch with
--quick), then evaluated on the first 2,000 test images with its weights as they arrive after
a trip through the codec: float32 (exact), float16, int8 (one scale per tensor, the default for
kept values) with the running statistics as float32, as the nodes and the server send them, and
int8 for the statistics too. BatchNorm's running variances travel in the same values as the
weights, and a per-tensor int8 scale would round the small ones coarsely, which the last two rows
tell apart. Reported per row: ``model``, ``values``,
``accuracy``, ``loss``, and ``var_range`` (largest over smallest running variance of the most
spread BatchNorm layer; none for a model without BatchNorm).
"""

from __future__ import annotations

import numpy as np
import torch
from _common import emit, parser

from mpfl import codec
from mpfl.core.params import get_weights, param_spec
from mpfl.core.training import LocalData, LocalTrainer, evaluate, generator
from mpfl.data import load_dataset
from mpfl.models import build_model

COLUMNS = ("model", "values", "accuracy", "loss", "var_range")
TEST_IMAGES = 2000


def round_trip(weights: list[np.ndarray], dtype: str, exact: tuple[int, ...] = ()) -> list[np.ndarray]:
    """The weights as a node receives them in a VALUES body of `dtype` over all-ones supports, the
    tensors in `exact` as float32."""
    supports = [np.ones(w.shape, dtype=bool) for w in weights]
    body = codec.encode_values(weights, supports, round=1, dtype=dtype, exact=exact)
    return codec.decode_values(body, supports).tensors


def measure(name: str, images: int, epochs: int) -> list[dict]:
    """Train `name` centrally, then evaluate it under each value coding (see the module docstring)."""
    torch.manual_seed(0)
    dataset = load_dataset("mnist")
    model = build_model(name, dataset.input_shape, dataset.num_classes)
    spec = param_spec(model)
    trainer = LocalTrainer(model, spec, lr=0.05, batch_size=32)
    data = LocalData(dataset.x_train, dataset.y_train, torch.arange(images), torch.arange(0))
    trained, _ = trainer.train(get_weights(model, spec), None, data, epochs, generator(0))
    variances = [trained[i] for i in spec.statistics if spec.names[i].endswith("running_var")]
    spread = max((float(v.max() / v.min()) for v in variances), default=None)
    codings = {"float32": round_trip(trained, "float32"), "float16": round_trip(trained, "float16"),
               "int8, statistics float32 (as sent)": round_trip(trained, "int8", spec.statistics),
               "int8, statistics int8 too": round_trip(trained, "int8")}
    x, y = dataset.x_test[:TEST_IMAGES], dataset.y_test[:TEST_IMAGES]
    rows = []
    for values, weights in codings.items():
        accuracy, loss = evaluate(model, spec, weights, x, y)
        rows.append({"model": name, "values": values, "accuracy": accuracy, "loss": loss, "var_range": spread})
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--models", nargs="+", default=["resnet18"], help="models to measure (default: resnet18)")
    args = p.parse_args()
    images, epochs = (1000, 1) if args.quick else (3000, 2)
    rows = [row for name in args.models for row in measure(name, images, epochs)]
    emit(f"Accuracy after coding the values of a model trained on {images:,} MNIST images for {epochs} epoch(s)",
         rows, args.json, COLUMNS)


if __name__ == "__main__":
    main()
