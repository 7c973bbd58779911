"""What ``fedlora run`` may do with a run directory: start fresh, replace (``--overwrite``), or resume.

A fresh run refuses a directory that already holds a run, so a typo in ``--out`` cannot silently
replace 12 rounds of someone's results; ``--overwrite`` removes that run's outputs first (only
files fedlora writes, never anything else in the folder).

What is a fedlora run: a folder holding :data:`RUN_MARKER`, which every run writes when it starts
(:func:`claim`). Runs from before the marker are recognised by a stricter test: a config.json whose
keys are RunConfig's *and* a checkpoint whose safetensors header carries fedlora's metadata. Any other
folder that holds a name fedlora writes (config.json, adapter/, wandb/, ...) is refused, with or
without ``--overwrite``: fedlora would delete or overwrite someone else's files there.

``--resume RUN_DIR`` continues *the same experiment*. The checkpoint records the config it was
saved under; config.json and any option given on the command line are compared with it, and
only the fields in :data:`RESUMABLE` may differ. Anything else (method, seed, task, clients, lr,
...) would make the resumed rounds a different experiment glued to the old ones, and is refused
naming the field and both values. ``data_dir`` may change, but the data may not: the checkpoint
records the content hashes of the files the run trained on (:mod:`fedlora.tasks.fingerprint`), and a
folder with other content is refused naming both folders (a moved copy of the same files resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from fedlora.protocol.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, ServerState, load_state
from fedlora.util.atomic import atomic_write_text
from fedlora.config.run import ConfigError, RunConfig
from fedlora.tasks.fingerprint import check_same_data

# Fields a resumed run may change, and why each is safe to change.
RESUMABLE = {
    "rounds": "extend (or finish) the run: later rounds continue the same sequence",
    "device": "where it computes (CPU and GPU results differ in the last bits, not in the protocol)",
    "data_dir": "where the same data lives on this machine (its content is checked: fedlora.tasks.fingerprint)",
    "out": "the run directory is RUN_DIR itself",
    "log_to": "where metrics are mirrored, not what is trained",
}
RUN_FILES = ("config.json", "checkpoint.safetensors", "checkpoint.safetensors.tmp", "metrics.jsonl",
             "metrics.jsonl.tmp", "accuracy.png", "divergence.png")  # accuracy.png: the plot's name before 2026-12
RUN_PLOTS = "global_*.png"  # one plot per metric, named by it (fedlora.reporting.curves.plot_file_name)
RUN_DIRS = ("adapter", "adapter.tmp", "adapter.old", "generations", "private", "tensorboard", "wandb")  # --log-to's too


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Names (dests) of the ``fedlora run`` options typed in ``argv``, defaults left out.

    Parses ``argv`` again with every default of the run sub-command suppressed, so an option equal
    to its default still counts as given (``--method flora-na-stable`` on a fedit run is a change).
    """
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run = subparsers.choices["run"]
    for action in run._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "verbose"}


def _saved(text: str, **now: Any) -> RunConfig:
    """A saved config (config.json, or the checkpoint's copy) with ``now``'s values of resumable fields
    put in before it is validated: the old ``data_dir`` may no longer exist (the data was moved)."""
    raw = json.loads(text)
    if isinstance(raw, dict):
        raw.update(now)
    return RunConfig.from_json(json.dumps(raw))


def _differences(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    a, b = json.loads(old.to_json()), json.loads(new.to_json())  # as config.json holds them: lists, not tuples
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def _refuse(diffs: dict[str, tuple[Any, Any]], what: str) -> None:
    fixed = {k: v for k, v in diffs.items() if k not in RESUMABLE}
    if fixed:
        name, (old, new) = next(iter(sorted(fixed.items())))
        more = f" (and {', '.join(sorted(fixed)[1:])})" if len(fixed) > 1 else ""
        raise ConfigError(f"--resume: {what} sets {name}={new!r}{more} but the checkpoint was trained with "
                          f"{name}={old!r}; a resumed run must be the same experiment (only "
                          f"{', '.join(RESUMABLE)} may change); start a new run with another --out instead")


def check_same_experiment(saved_json: str | None, config: RunConfig) -> None:
    """Refuse to resume a checkpoint saved under ``saved_json`` with ``config`` unless only :data:`RESUMABLE`
    fields differ (the engine's own check, for callers of :func:`fedlora.engines.local.run` that bypass the CLI)."""
    if saved_json:
        _refuse(_differences(_saved(saved_json, out=config.out, data_dir=config.data_dir), config), "the config")


def check_resume(state: ServerState, config: RunConfig) -> None:
    """The engines' own resume check (for callers of :func:`fedlora.engines.local.run` and the Flower
    ServerApp, which bypass the CLI): the same experiment (:func:`check_same_experiment`) on the same data."""
    check_same_experiment(state.config, config)
    check_same_data(state.data, config)


def resume_config(run_dir: Path, given: dict[str, Any]) -> RunConfig:
    """The config to resume ``run_dir`` with: the checkpoint's, with the resumable changes of
    config.json and of ``given`` (options typed on the command line) applied; refuses any other change."""
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"no run to resume in {run_dir} (config.json and {CHECKPOINT_FILE} are needed); "
                                "--resume takes the --out directory of an earlier run")
    state = load_state(run_dir)  # verified against its digest
    on_disk = _saved((run_dir / CONFIG_FILE).read_text(), out=str(run_dir),
                     **({"data_dir": given["data_dir"]} if "data_dir" in given else {}))
    saved = _saved(state.config, out=str(run_dir), data_dir=on_disk.data_dir) if state.config else on_disk
    _refuse(_differences(saved, on_disk), f"{run_dir / CONFIG_FILE} (edited?)")
    if "out" in given and Path(given["out"]).resolve() != run_dir.resolve():
        raise ConfigError(f"--out {given['out']} with --resume {run_dir}: a resumed run continues in its own "
                          "directory; drop --out")
    changes = {k: v for k, v in given.items() if k != "out"}
    try:
        config = on_disk.replace(**changes)
    except ConfigError as exc:
        raise ConfigError(f"--resume: {exc}") from None
    _refuse(_differences(saved, config), "the command line")
    if config.rounds < state.round:
        raise ConfigError(f"--resume: --rounds {config.rounds} but {run_dir} has already completed {state.round} "
                          "rounds; give --rounds >= that to finish or extend the run")
    schedule = getattr(config, "lr_schedule", "constant")
    if config.rounds != saved.rounds and schedule != "constant":
        raise ConfigError(f"--resume: --rounds {config.rounds} (was {saved.rounds}) with --lr-schedule {schedule}: "
                          "the schedule spans all rounds, so the rounds already trained followed another one; "
                          "resume without --rounds, or start a new run")
    check_same_data(state.data, config)  # after the rest: hashing reads the data files
    return config


RUN_MARKER = ".fedlora-run"
MARKER_TEXT = ("This folder is a fedlora run directory. `fedlora run --overwrite` may replace the files fedlora "
               "wrote here (config.json, checkpoint, metrics, plots, adapter/, generations/, tensorboard/, wandb/).\n")
# Keys every config.json fedlora ever wrote holds: with all keys RunConfig fields, a pre-marker run's config.
_CORE_KEYS = frozenset({"task", "method", "rank", "rounds", "clients", "seed", "out"})


def is_run(out: Path) -> bool:
    """Whether ``out`` is a fedlora run directory: it holds :data:`RUN_MARKER`, or it is a run from before the
    marker (a fedlora config.json and a checkpoint with fedlora's metadata)."""
    marker = out / RUN_MARKER
    if marker.is_file() and not marker.is_symlink():
        return True
    return _fedlora_config(out / CONFIG_FILE) and _fedlora_checkpoint(out / CHECKPOINT_FILE)


def _fedlora_config(path: Path) -> bool:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    known = {f.name for f in dataclasses.fields(RunConfig)}
    return isinstance(raw, dict) and _CORE_KEYS <= set(raw) <= known


def _fedlora_checkpoint(path: Path) -> bool:
    """A safetensors file whose header's metadata has fedlora's key (read by hand: 8-byte length, JSON header)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size <= 100_000_000 else None
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(header, dict) and isinstance(header.get("__metadata__"), dict) \
        and "fedlora" in header["__metadata__"]


def _outputs(out: Path) -> list[str]:
    """The names fedlora writes that exist in ``out`` (folders with a trailing slash)."""
    files = [name for name in RUN_FILES if (out / name).is_file() or (out / name).is_symlink()]
    files += sorted(p.name for p in out.glob(RUN_PLOTS) if p.is_file() or p.is_symlink())
    dirs = [f"{name}/" for name in RUN_DIRS if (out / name).exists() or (out / name).is_symlink()]
    return files + dirs


def check_start(config: RunConfig, resume: bool) -> None:
    """What an engine checks before loading anything: a fresh run's ``out`` is empty, a fedlora run (which
    it replaces, as the Python API and Flower always have) or holds none of fedlora's names; each
    ``--log-to`` tracker is installed (a missing one would otherwise fail after minutes of loading)."""
    if not resume:
        refuse_existing(Path(config.out), overwrite=True)
    if config.log_to:
        from fedlora.runs.trackers import check_installed

        check_installed(config.log_to)


def check_fresh(out: Path, overwrite: bool) -> None:
    """Refuse to start over a run already in ``out`` unless ``overwrite`` (:func:`refuse_existing`); then
    remove that run's outputs (:func:`remove_outputs`)."""
    refuse_existing(out, overwrite)
    if overwrite:
        remove_outputs(out)


def refuse_existing(out: Path, overwrite: bool, resume_hint: bool = True) -> None:
    """Refuse a run already in ``out`` unless ``overwrite``, and a folder that is not a fedlora run but holds
    names fedlora writes (whatever ``overwrite`` says). Changes nothing. ``resume_hint``: the refusal
    suggests ``--resume`` (``fedlora run``; ``fedlora demo`` has none)."""
    present = _outputs(out)
    if present and not is_run(out):
        raise ConfigError(f"--out {out} is not a fedlora run directory (no {RUN_MARKER}, and no fedlora config.json "
                          f"with its checkpoint) but holds {', '.join(present)}, which a run would overwrite or "
                          "delete; nothing was changed: choose another --out")
    existing = [name for name in ("config.json", CHECKPOINT_FILE, "metrics.jsonl") if (out / name).exists()]
    if existing and not overwrite:
        resume = f"continue it with --resume {out}, " if resume_hint else ""
        raise ConfigError(f"--out {out} already holds a run ({', '.join(existing)}); {resume}replace it with "
                          "--overwrite, or choose another --out")


def remove_outputs(out: Path) -> None:
    """Remove what a fedlora run wrote in ``out`` (a fedlora run: :func:`refuse_existing` first), nothing else."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for plot in out.glob(RUN_PLOTS):
        if plot.is_file() or plot.is_symlink():
            plot.unlink()
    for name in RUN_DIRS:
        if (out / name).is_symlink():  # the link, never what it points to (rmtree refuses links anyway)
            (out / name).unlink()
        elif (out / name).is_dir():
            shutil.rmtree(out / name)


def claim(out: Path) -> None:
    """Mark ``out`` as a fedlora run directory (:data:`RUN_MARKER`), once; called when a run starts."""
    marker = out / RUN_MARKER
    if marker.is_symlink() or not marker.is_file():
        marker.unlink(missing_ok=True)  # a link there is not ours to write through
        atomic_write_text(marker, MARKER_TEXT)
