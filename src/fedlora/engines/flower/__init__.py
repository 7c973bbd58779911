"""Flower integration: ``fedlora.engines.flower.server_app:app`` and ``fedlora.engines.flower.client_app:app``.

Configured by ``[tool.flwr.app.config]`` in ``pyproject.toml`` (the ``fedlora run`` option
names); see ``docs/flower.md`` for simulation and deployment (with TLS) commands.
"""
