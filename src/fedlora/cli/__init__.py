"""The front door: ``fedlora`` and ``python -m fedlora`` (:mod:`.commands`), its parser, the demo and the catalog."""

from fedlora.cli.commands import main

__all__ = ["main"]
