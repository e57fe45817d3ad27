"""Flower's cost per round without mpfl: an echo ClientApp and a ServerApp that times its rounds."""
