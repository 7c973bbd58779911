"""The argument parser every fedlora command uses: no abbreviations, and a "did you mean" for a misspelt option.

Why: argparse accepts any unambiguous prefix, so ``--local-step 3`` silently meant ``--local-steps 3``
(and would change meaning the day another ``--local-step...`` option appears), and a misspelt option
got the top-level usage and "unrecognized arguments", with no hint. Here prefixes are refused, and an
unknown option is reported on one line by the sub-command it was given to, with the closest option
it has (TOML keys in ``--config`` files already get the same hint, :mod:`fedlora.config.file`)::

    fedlora run: error: unknown option --local-step; did you mean --local-steps?
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` without prefix matching whose unknown options get one line and a suggestion (exit 2).

    Sub-parsers made by ``add_subparsers().add_parser`` are of this class too (argparse's default).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.refuse(parsed, extras)
        return parsed

    def refuse(self, parsed: argparse.Namespace, extras: list[str]) -> NoReturn:
        """Exit 2 naming the first unknown option (or stray argument) and, for an option, its closest match."""
        target = self.command_parser(parsed)
        word = next((w for w in extras if w.startswith("-") and w != "-"), extras[0])
        if not word.startswith("-"):
            target.exit(2, f"{target.prog}: error: unexpected argument {word!r}; `{target.prog} --help` lists what "
                           "it takes\n")
        flag = word.split("=", 1)[0]
        known = [s for parser in dict.fromkeys((target, self)) for a in parser._actions for s in a.option_strings]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"`{target.prog} --help` lists the options"
        target.exit(2, f"{target.prog}: error: unknown option {flag}; {hint}\n")

    def command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The sub-command's parser the arguments went to (this parser when it has no sub-commands)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = getattr(parsed, action.dest, None)
                if chosen in action.choices:
                    return action.choices[chosen]
        return self
