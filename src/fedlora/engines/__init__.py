"""Engines that drive the round protocol: :mod:`.local` (one process) and :mod:`.flower` (Flower apps)."""
