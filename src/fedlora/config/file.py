"""``fedlora run --config FILE``: the run's options from a TOML file, or from a run's ``config.json``.

A config file holds the same fields as the flags, under the same names (``local-steps`` or
``local_steps``), read the same way (:func:`fedlora.config.schema.read_text`: ``alpha = "iid"``,
``max-length = "auto"``, ``target-modules = "query value"`` or a list) and validated by the same
:class:`~fedlora.config.run.RunConfig`. Fields may sit at the top level or in a table named after their
section (``[training]``, ``[federation]``, ...), as ``fedlora run --help`` groups them. Flags on the
command line override the file (``--method-option`` adds to the file's method options). An unknown
key is refused, naming it and the nearest known one: a typo must not silently run the default.

A run directory's ``config.json`` (what ``fedlora run`` wrote, JSON) is read by the same rules, so
``fedlora run --config runs/x/config.json --seed 1 --out runs/x-seed1`` repeats a run with one change.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from pathlib import Path
from typing import Any

from fedlora.config.run import ConfigError
from fedlora.config.schema import SECTIONS, flag, read_text


class ConfigFileError(ConfigError):
    """A config file that cannot be read, or holds an unknown key or an unreadable value."""


def read_config_file(path: str | Path, cls: type) -> dict[str, Any]:
    """``{field name: value}`` of the declared fields of ``cls`` set in the TOML or JSON file ``path``.

    Values are parsed as the flags parse them but not yet validated: the caller builds ``cls``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigFileError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML (name it .json if it is JSON)"
        raise ConfigFileError(f"--config {path}: not valid {kind}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigFileError(f"--config {path}: expected a table of options, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    values: dict[str, Any] = {}
    for key, value in _flatten(raw):
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigFileError(f"--config {path}: unknown option {key!r}{_nearest(name, fields)}; "
                                  f"`fedlora run --help` lists the known ones")
        if name in values:
            raise ConfigFileError(f"--config {path}: {flag(name)} is set twice (dashed and underscored, or in "
                                  "two tables); keep one")
        try:
            values[name] = _value(fields[name], value)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigFileError(f"--config {path}: {key} = {value!r} is invalid: {exc}") from None
    return values


def _flatten(raw: dict[str, Any]) -> list[tuple[str, Any]]:
    """Top-level keys, and the keys of tables named after a section (``[training] lr = ...``)."""
    items: list[tuple[str, Any]] = []
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            items += list(value.items())
        else:
            items.append((key, value))
    return items


def _nearest(name: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {flag(close[0])!r}?)" if close else ""


def _value(f: dataclasses.Field, value: Any) -> Any:
    """One field's value from its TOML/JSON form, read as the flag reads its text."""
    meta = f.metadata
    if value is None or isinstance(value, bool):  # JSON null (unset), TOML/JSON booleans: as they are
        return value
    if isinstance(value, dict):
        if not meta["pairs"]:
            raise TypeError("a table is only accepted for method-options")
        return dict(value)
    if isinstance(value, list):
        if not meta["many"]:
            raise TypeError(f"a list is only accepted for options that take several values, not {flag(f.name)}")
        return read_text(f, " ".join(map(str, value)))
    return read_text(f, str(value))  # numbers too: an int field refuses 1.5 as --rounds 1.5 does
