"""mpfl: Masked Pruning over Federated Learning."""

__version__ = "0.1.0"
