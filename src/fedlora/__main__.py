"""`python -m fedlora` is the same as the `fedlora` console script."""

from fedlora.cli.commands import main

if __name__ == "__main__":  # `fedlora bench --workers N` spawns processes that re-import this module
    raise SystemExit(main())
