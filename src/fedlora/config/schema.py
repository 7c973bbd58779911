"""How a configuration field is declared once and derived everywhere else.

A field of a frozen config dataclass is declared with :func:`option`: its default, its section
(data, model, training, federation, evaluation, runtime, ...), a one-line help text, and, where
the type alone does not say it, how to read it from text. Everything else is derived from that
one declaration, so nothing can drift:

* ``fedlora run`` flags (:func:`add_arguments`, :func:`from_namespace`): ``--local-steps`` for
  ``local_steps``, grouped by section, with the default in the help; ``fedlora run --config FILE``
  reads the same names from a TOML or JSON file (:mod:`fedlora.config.file`, with :func:`read_text`);
* the Flower app config (:func:`from_flower`, :func:`flower_table`): the same dashed names as keys,
  in ``[tool.flwr.app.config]`` of pyproject.toml (a test checks that table against this);
* the data-cache key: the fields declared with ``data=True`` (:func:`data_fields`).

TOML and ``--run-config`` have no null: an unset optional value is written ``""``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

SECTIONS = ("data", "model", "training", "federation", "privacy", "evaluation", "runtime", "flower")


def option(
    default: Any,
    section: str,
    help: str | Callable[[], str],
    *,
    parse: Callable[[str], Any] | None = None,
    show: Callable[[Any], str] | None = None,
    metavar: str | None = None,
    many: bool = False,
    pairs: bool = False,
    data: bool = False,
    cli: bool = True,
) -> Any:
    """A dataclass field with the metadata the derivations read.

    ``help``: one line, or a function giving it (for lists read from a registry when help is shown).
    ``parse``: text → value (default: the field's type from its default: int, float, str).
    ``show``: value → text, the inverse of ``parse`` (for ``--run-config`` and the TOML table).
    ``many``: a tuple of strings (``--target-modules query value``; ``"query value"`` on Flower).
    ``pairs``: a dict from repeated ``KEY=VALUE`` (``--method-option solver=adamw``).
    ``data``: the field changes the clients' data, so it is part of the data-cache key.
    ``cli``: False for fields that ``fedlora run`` sets itself (none today).
    """
    if section not in SECTIONS:
        raise ValueError(f"unknown config section {section!r}; use one of {SECTIONS}")
    meta = {"section": section, "help": help, "parse": parse, "show": show, "metavar": metavar, "many": many,
            "pairs": pairs, "data": data, "cli": cli}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def parse_pair(text: str) -> tuple[str, Any]:
    """``"steps=200"`` → ``("steps", 200)``; values are JSON where they parse (numbers, booleans)."""
    if "=" not in text:
        raise ValueError(f"wants KEY=VALUE, e.g. solver=adamw; got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _reader(f: dataclasses.Field) -> Callable[[str], Any]:
    meta = f.metadata
    if meta["parse"] is not None:
        return meta["parse"]
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        return lambda text: {"true": True, "false": False}[text.strip().lower()]
    if isinstance(default, (int, float)):
        return type(default)
    return str


def read_text(f: dataclasses.Field, text: str) -> Any:
    """One field's value from its text form (a CLI word, a ``--run-config`` value)."""
    meta = f.metadata
    if meta["many"]:
        names = tuple(text.replace(",", " ").split())
        return meta["parse"](" ".join(names)) if meta["parse"] is not None else names
    if meta["pairs"]:
        return dict(parse_pair(t) for t in text.split())
    return _reader(f)(text)


def show_value(f: dataclasses.Field, value: Any) -> str | int | float | bool:
    """One field's value as Flower's config (TOML) holds it; :func:`read_text` reads it back."""
    meta = f.metadata
    if meta["show"] is not None:
        return meta["show"](value)
    if meta["many"]:
        return " ".join(value)
    if meta["pairs"]:
        return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in value.items())
    if value is None:
        return ""
    return value


def flag(name: str) -> str:
    return name.replace("_", "-")


def default_of(f: dataclasses.Field) -> Any:
    factory: Any = f.default_factory
    return factory() if f.default is dataclasses.MISSING else f.default


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, shown: Mapping[str, str] | None = None, *, given_only: bool = False
) -> None:
    """One ``--flag`` per declared field of ``cls``, grouped by section, its help ending in its default.

    ``shown``: the default to print for a field where it is not the declared one (``fedlora run``'s
    ``--out``). ``given_only``: leave fields not typed on the command line out of the namespace
    (``argparse.SUPPRESS``), so a caller can layer them over another source (``--config FILE``);
    :func:`from_namespace` then returns only the typed ones.
    """
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", False):
            continue
        section = meta["section"]
        group = groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        default = default_of(f)
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_line(f, (shown or {}).get(f.name)),
                                  "metavar": meta["metavar"] or _metavar(default)}
        if given_only:
            kwargs["default"] = argparse.SUPPRESS
        if meta["many"]:
            group.add_argument(f"--{flag(f.name)}", nargs="+", **{"default": default, **kwargs})
        elif meta["pairs"]:
            kwargs["metavar"] = meta["metavar"] or "KEY=VALUE"
            group.add_argument(f"--{flag(f.name).removesuffix('s')}", action="append", type=_pair_arg,
                               **{"default": None, **kwargs})
        elif isinstance(default, bool):  # --flag alone means true; --flag false also reads
            group.add_argument(f"--{flag(f.name)}", type=_arg(f), nargs="?", const=True,
                               **{"default": default, **kwargs})
        else:
            group.add_argument(f"--{flag(f.name)}", type=_arg(f), **{"default": default, **kwargs})


def help_line(f: dataclasses.Field, shown: str | None = None) -> str:
    """The field's one-line help with its default, ``%`` escaped for argparse (``~30% slower``)."""
    text = f.metadata["help"]() if callable(f.metadata["help"]) else f.metadata["help"]
    if shown is None:
        value = show_value(f, default_of(f))
        shown = "unset" if value == "" else str(value).lower() if isinstance(value, bool) else str(value)
    return f"{text} (default: {shown})".replace("%", "%%")


def _metavar(default: Any) -> str | None:
    """A short placeholder by type (``--lr X`` rather than ``--lr LR``); None: argparse's (the name)."""
    if isinstance(default, bool):
        return "true|false"
    if isinstance(default, int):
        return "N"
    if isinstance(default, float):
        return "X"
    return None


def _arg(f: dataclasses.Field) -> Callable[[str], Any]:
    reader = _reader(f)

    def convert(text: str) -> Any:
        try:
            return reader(text)
        except (KeyError, TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid value ({exc})") from None

    convert.__name__ = f.name  # argparse names the option's type in its error
    return convert


def _pair_arg(text: str) -> tuple[str, Any]:
    try:
        return parse_pair(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def from_namespace(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The declared fields' values from parsed arguments (``pairs`` fields become dicts)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False) or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.metadata["pairs"]:
            value = dict(value or [])
        elif f.metadata["many"]:
            value = read_text(f, " ".join(value))
        values[f.name] = value
    return values


def from_flower(cls: type, user_config: Mapping[str, Any], error: Callable[[str], Exception]) -> dict[str, Any]:
    """Declared fields of ``cls`` from a Flower ``run_config`` (dashed keys; values typed by TOML)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = flag(f.name)
        if key not in user_config:
            continue
        raw = user_config[key]
        try:
            values[f.name] = read_text(f, str(raw)) if not isinstance(raw, bool) else raw
        except (KeyError, TypeError, ValueError) as exc:
            raise error(f"[tool.flwr.app.config] {key}={raw!r} is invalid: {exc}") from None
    return values


def flower_table(*classes: type, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table these classes declare (dashed key → TOML value)."""
    table: dict[str, Any] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            value = (overrides or {}).get(f.name, default_of(f))
            table[flag(f.name)] = show_value(f, value)
    return table


def data_fields(cls: type) -> tuple[str, ...]:
    """Names of the fields declared with ``data=True`` (they decide what each client holds)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("data"))
