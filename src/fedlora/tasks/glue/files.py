"""Strict readers for the original GLUE file layout on disk (no network, ever).

The files are tab-separated with no quoting (GLUE sentences contain unbalanced ``"``), so they are read
with ``csv.QUOTE_NONE``. Every malformed row is reported with its file and line number instead of being
skipped, because a silently shortened dataset would corrupt the experiments built on it.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets

from fedlora.tasks.glue.specs import TaskSpec

FIX_HINT = (
    "Pass --data-dir (or FEDLORA_DATA_DIR) pointing at a GLUE directory such as ../shared/data/glue, "
    "or unset both to download nyu-mll/glue from the Hugging Face hub."
)


@dataclass(frozen=True)
class FileFormat:
    """How to pull the task's columns out of one file layout.

    ``header=True``: ``columns`` maps our column name -> header name, and rows must have as many
    fields as the header. ``header=False``: ``columns`` maps our name -> field position; a row must
    have ``width`` fields, or at least ``width`` when ``extra_ok`` (STS-B rows carry licence fields).
    """

    header: bool
    columns: dict[str, str | int]
    width: int = 0
    extra_ok: bool = False


@dataclass(frozen=True)
class Layout:
    """One on-disk variant of a task: train/test file names (relative to the task folder) and format."""

    train: str | None
    test: str
    formats: tuple[FileFormat, ...]


def _h(*fields: str, label: str = "label") -> FileFormat:
    """Header format whose text columns keep their names except where given as ``ours=theirs``."""
    cols: dict[str, str | int] = {}
    for f in fields:
        ours, _, theirs = f.partition("=")
        cols[ours] = theirs or ours
    cols["label"] = label
    return FileFormat(header=True, columns=cols)


# Task folder names and layouts, as written by GLUE's download_glue_data.py (plus the variants in
# ../shared/data/glue described in its SOURCES.md). The first layout whose files exist wins.
LAYOUTS: dict[str, tuple[str, tuple[Layout, ...]]] = {
    "sst2": ("SST-2", (Layout("train.tsv", "dev.tsv", (_h("sentence"),)),)),
    "mrpc": ("MRPC", (Layout(
        "train.tsv", "dev.tsv", (_h("sentence1=#1 String", "sentence2=#2 String", label="Quality"),)),)),
    "rte": ("RTE", (Layout("train.tsv", "dev.tsv", (_h("sentence1", "sentence2"),)),)),
    # This CoLA copy is `sentence<TAB>label`; GLUE's own is `source<TAB>label<TAB>mark<TAB>sentence`.
    "cola": ("CoLA", (Layout("train.tsv", "dev.tsv", (
        FileFormat(False, {"sentence": 0, "label": 1}, width=2),
        FileFormat(False, {"sentence": 3, "label": 1}, width=4),
    )),)),
    # QNLI train is often missing offline: train=None means "split the dev file" (see loading.py).
    "qnli": ("QNLI", (
        Layout("train.tsv", "dev.tsv", (_h("question", "sentence"),)),
        Layout(None, "dev.tsv", (_h("question", "sentence"),)),
    )),
    "qqp": ("QQP", (Layout("train.tsv", "dev.tsv", (_h("question1", "question2", label="is_duplicate"),)),)),
    "mnli": ("MNLI", (Layout(
        "train.tsv", "dev_matched.tsv",
        (_h("premise=sentence1", "hypothesis=sentence2", label="gold_label"),)),)),
    "stsb": ("STS-B", (
        Layout("sts-train.csv", "sts-dev.csv", (
            FileFormat(False, {"label": 4, "sentence1": 5, "sentence2": 6}, width=7, extra_ok=True),)),
        Layout("train.tsv", "dev.tsv", (_h("sentence1", "sentence2", label="score"),)),
    )),
}


def find_layout(spec: TaskSpec, data_dir: Path) -> tuple[Path, Layout]:
    """Return the task folder and the first layout whose files all exist, else FileNotFoundError."""
    folder_name, layouts = LAYOUTS[spec.name]
    if not (data_dir / folder_name).is_dir() and (data_dir / "glue" / folder_name).is_dir():
        data_dir = data_dir / "glue"  # the data root (../shared/data) given: every task takes the same --data-dir
    folder = data_dir / folder_name
    if not data_dir.is_dir():
        raise FileNotFoundError(f"GLUE data directory {data_dir} does not exist. {FIX_HINT}")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Task folder {folder} for {spec.name!r} does not exist in the GLUE data directory. {FIX_HINT}"
        )
    tried: list[str] = []
    for layout in layouts:
        needed = [folder / name for name in (layout.train, layout.test) if name is not None]
        if all(p.is_file() for p in needed):
            return folder, layout
        tried.append(" + ".join(str(p) for p in needed))
    raise FileNotFoundError(
        f"No usable {spec.name!r} files in {folder}; looked for: {'; '.join(tried)}. {FIX_HINT}"
    )


# Longest field read (characters). Real GLUE sentences are < 2,000; a longer field is kept (the
# tokenizer truncates it) up to this bound, past which the file is reported as broken.
MAX_FIELD_CHARS = 16 * 1024 * 1024


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) for each non-blank line; utf-8-sig strips MRPC's BOM."""
    if csv.field_size_limit() < MAX_FIELD_CHARS:  # csv's default 131,072 chars raises mid-file
        csv.field_size_limit(MAX_FIELD_CHARS)
    line = 0
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for fields in reader:
                line = reader.line_num
                if fields and any(fields):  # blank lines carry no example; skip rather than fail
                    yield reader.line_num, fields
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not valid UTF-8 ({exc}). Re-download the file. {FIX_HINT}") from exc
    except csv.Error as exc:  # e.g. a field over MAX_FIELD_CHARS: a broken file, not a sentence
        raise ValueError(f"{path}:{line + 1}: unreadable TSV row ({exc}). {FIX_HINT}") from None


def _parse_label(spec: TaskSpec, raw: str, where: str) -> int | float:
    """Turn a label field into an int class id (by number or hub name) or an STS-B float score."""
    raw = raw.strip()
    if spec.is_regression:
        try:
            score = float(raw)
        except ValueError:
            score = float("nan")
        if not 0.0 <= score <= 5.0:  # also rejects NaN
            raise ValueError(f"{where}: STS-B score {raw!r} is not a number in [0, 5].")
        return score
    if raw in spec.label_names:  # RTE/QNLI/MNLI files may spell labels out
        return spec.label_names.index(raw)
    if raw.isascii() and raw.isdigit() and int(raw) < spec.num_labels:
        return int(raw)
    allowed = [str(i) for i in range(spec.num_labels)] + list(spec.label_names)
    raise ValueError(f"{where}: label {raw!r} is not one of {allowed}.")


def _resolve(fmt: FileFormat, header: list[str], path: Path) -> dict[str, int]:
    """Map our column names to field positions using the file's header line."""
    positions = {}
    for ours, theirs in fmt.columns.items():
        if theirs not in header:
            raise ValueError(
                f"{path}, line 1: header {header} has no column {theirs!r} (needed for {ours!r}). "
                f"Is this the right GLUE file? {FIX_HINT}"
            )
        positions[ours] = header.index(theirs)
    return positions


def read_file(spec: TaskSpec, path: Path, formats: tuple[FileFormat, ...]) -> datasets.Dataset:
    """Parse one GLUE file into a Dataset with the task's text fields and ``label``.

    Raises:
        ValueError: a row has the wrong number of fields or a bad label; the message names the file
            and 1-based line number.
    """
    columns: dict[str, list] = {name: [] for name in (*spec.text_fields, "label")}
    rows = _rows(path)
    fmt: FileFormat | None = None
    positions: dict[str, int] = {}
    width = 0
    for line, fields in rows:
        where = f"{path}, line {line}"
        if fmt is None:  # first line fixes the format: a header, or the width of a headerless row
            fmt = _choose_format(formats, fields, where)
            width = len(fields) if fmt.header else fmt.width
            if fmt.header:
                positions = _resolve(fmt, fields, path)
                continue
            positions = {k: int(v) for k, v in fmt.columns.items()}
        if len(fields) != width and not (fmt.extra_ok and len(fields) > width):
            raise ValueError(
                f"{where}: expected {width} tab-separated fields, found {len(fields)}. "
                "The file is truncated or was edited with a tool that changed tabs/quotes; "
                f"restore the original file. {FIX_HINT}"
            )
        for name, pos in positions.items():
            columns[name].append(_parse_label(spec, fields[pos], where) if name == "label" else fields[pos])
    if not columns["label"]:
        raise ValueError(f"{path} contains no examples. {FIX_HINT}")
    return datasets.Dataset.from_dict(columns, features=features_for(spec))


def _choose_format(formats: tuple[FileFormat, ...], fields: list[str], where: str) -> FileFormat:
    """Pick the format matching the first line: header formats always match, headerless by width."""
    for fmt in formats:
        if fmt.header or len(fields) == fmt.width or (fmt.extra_ok and len(fields) > fmt.width):
            return fmt
    widths = sorted({f.width for f in formats})
    raise ValueError(f"{where}: expected one of {widths} tab-separated fields, found {len(fields)}.")


def features_for(spec: TaskSpec) -> datasets.Features:
    """Column types matching the hub's nyu-mll/glue (ClassLabel ids, float32 STS-B scores)."""
    feats = {name: datasets.Value("string") for name in spec.text_fields}
    feats["label"] = (
        datasets.Value("float32") if spec.is_regression else datasets.ClassLabel(names=list(spec.label_names))
    )
    return datasets.Features(feats)
