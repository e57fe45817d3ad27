"""Run mpfl on Flower: a ServerApp and a ClientApp that drive the simulator's Server and Node.

`mpfl.flower.server_app:app` and `mpfl.flower.client_app:app` are the components named in
``[tool.flwr.app]`` of pyproject.toml; docs/deployment.md shows how to run them on several
machines.
"""
