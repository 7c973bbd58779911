"""`python -m fedlora` is the same as the `fedlora` console script."""

from fedlora.cli import main

raise SystemExit(main())
