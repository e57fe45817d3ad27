"""The algorithm core: masks, consensus and aggregation, with no I/O and no transport."""
