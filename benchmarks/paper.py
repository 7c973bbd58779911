"""Reproduce the FLoRA-NA paper's experiments (arXiv 2509.26399) with the local engine.

Same options as `fedlora bench`; e.g.
    python benchmarks/paper.py --preset quick
    python benchmarks/paper.py --preset headline --data-dir ../shared/data/glue
See docs/results.md for the presets, their budgets and the results.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model and --data-dir need no network

from fedlora.bench import main

if __name__ == "__main__":
    sys.exit(main())
