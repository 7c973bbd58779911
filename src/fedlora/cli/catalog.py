"""What ``fedlora methods`` and ``fedlora tasks`` print: the two registries, as text or Markdown tables.

Why: the methods and tasks tables in the docs were kept by hand and drifted from the code. Here each
row is read from the registries (a method's :class:`~fedlora.aggregation.registry.MethodSpec` and
:class:`~fedlora.aggregation.types.TrainingPolicy`, a task's attributes), and docs/methods.md and
docs/tasks.md are this module's Markdown output, written by :data:`DOCS`'s commands; a test fails when
a committed file differs from what the registries give now.
"""

from __future__ import annotations

import math
from fedlora.aggregation.options import AtLeast, AtMost, GreaterThan, OptionSpec

FORMATS = ("text", "markdown")
DOCS = {  # committed file -> the command that regenerates it
    "docs/methods.md": "fedlora methods --format markdown > docs/methods.md",
    "docs/tasks.md": "fedlora tasks --format markdown > docs/tasks.md",
}
METHOD_COLUMNS = ("method", "summary", "clients train", "clients upload", "clients download", "options (default)",
                  "secure aggregation", "mixed ranks", "source")
TASK_COLUMNS = ("task", "family", "metric", "summary", "data and splits")
OPTION_SEPARATOR = "; "


def _factors(a: bool, b: bool) -> str:
    return ", ".join(f for f, on in (("A", a), ("B", b)) if on) or "nothing"


def _option(spec: OptionSpec) -> str:
    """``solver ∈ {als, adamw} = als``, ``max_sweeps int ≥ 0 = 100``, ``decay float in [0, 1] = 1``."""
    if isinstance(spec.kind, tuple):
        kind = "∈ {" + ", ".join(map(str, spec.kind)) + "}"
    else:
        kind = getattr(spec.kind, "__name__", str(spec.kind))
        low = next((b for b in spec.bounds if isinstance(b, (AtLeast, GreaterThan))), None)
        high = next((b for b in spec.bounds if isinstance(b, AtMost)), None)
        if isinstance(low, AtLeast) and high is not None:
            kind += f" in [{low.low:g}, {high.high:g}]"
        else:
            kind += f" ≥ {low.low:g}" if isinstance(low, AtLeast) else f" > {low.low:g}" if low is not None else ""
            kind += f" ≤ {high.high:g}" if high is not None else ""
    default = spec.default
    if isinstance(default, bool):
        shown = str(default).lower()  # as typed: --method-option rebalance=true
    elif isinstance(default, float):
        shown = "∞" if math.isinf(default) else f"{default:g}"
    else:
        shown = str(default)
    return f"{spec.name} {kind} = {shown}"


def _builtin(obj: object) -> bool:
    return getattr(obj, "__module__", "").startswith("fedlora.")


def method_rows(builtin_only: bool = False) -> list[dict[str, str]]:
    """One row per registered method, in name order (the columns of :data:`METHOD_COLUMNS`); ``builtin_only``:
    fedlora's own, not those a plugin or a test registered in this process."""
    from fedlora.aggregation.registry import available_methods, get_method

    rows = []
    for name in available_methods():
        spec = get_method(name)
        if builtin_only and not _builtin(spec.fn):
            continue
        policy = spec.policy
        if policy.alternate:  # the round's half (for_round) says which factor; describe both halves
            train = upload = "B in odd rounds, A in even rounds"
        else:
            train = _factors(policy.train_A, policy.train_B) + (" (B stays on the client)" if policy.local_B else "")
            upload = _factors(policy.upload_A, policy.upload_B)
        if spec.phased is not None:  # no factor: a sum-friendly upload in each of its round trips
            upload = f"no factor: one sketch in each of {spec.phased.phases} round trips"
        download = {"factors": "A, B" if policy.download_full_adapter else _factors(policy.upload_A, policy.upload_B),
                    "residual": "A, B and the d×k residual T − B̄Ā (merged into W0)",
                    "stacked": "every client's A, B, stacked (merged into W0; LoRA re-initialised)"}[policy.download]
        # weighting is every method's (aggregate applies it), with the choices the method declares; a server-
        # drawn seed is not the user's to set
        options = [OptionSpec("weighting", spec.weightings, (), "examples")]
        options += [s for n, s in spec.option_specs.items() if n != "weighting" and not (policy.server_seed and n == "seed")]
        ranks = ", ".join(policy.rank_maps)
        rows.append({
            "method": name,
            "summary": spec.summary,
            "clients train": train,
            "clients upload": upload,
            "clients download": download,
            "options (default)": OPTION_SEPARATOR.join(map(_option, options)),
            "secure aggregation": "no (needs each client's update)" if policy.needs_individual_updates else "yes (sums)",
            "mixed ranks": f"yes (--rank-map {ranks})" if ranks else "no",
            "source": spec.source or "–",
        })
    return rows


def task_rows(builtin_only: bool = False) -> list[dict[str, str]]:
    """One row per registered task, in name order (the columns of :data:`TASK_COLUMNS`); ``builtin_only`` as
    in :func:`method_rows`."""
    from fedlora.tasks import available_tasks, get_task

    rows = []
    for name in available_tasks():
        task = get_task(name)
        if builtin_only and not _builtin(type(task)):
            continue
        doc = (type(task).__doc__ or "").strip().splitlines()
        rows.append({
            "task": name,
            "family": task.family or "–",
            "metric": task.metric,
            "summary": task.summary or (doc[0].replace("``", "`") if doc else "–"),
            "data and splits": task.data or "–",
        })
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe would end the Markdown cell


def markdown_table(columns: tuple[str, ...], rows: list[dict[str, str]], code: str) -> str:
    """A Markdown table; the ``code`` column's values as code spans (names a user types)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"`{row[c]}`" if c == code else _cell(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def text_blocks(columns: tuple[str, ...], rows: list[dict[str, str]]) -> str:
    """One block per row for a terminal: the name and summary, then one indented line per other column."""
    width = max(len(c) for c in columns[1:])
    blocks = []
    for row in rows:
        name, *rest = columns
        lines = [f"{row[name]}: {row['summary']}"]
        for column in rest:
            if column != "summary":  # options one per line: flora-na has eleven
                first, *more = row[column].split(OPTION_SEPARATOR) if column.startswith("options") else [row[column]]
                lines += [f"  {column:<{width}}  {first}", *(f"  {'':<{width}}  {m}" for m in more)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


HEADERS = {
    "methods": ("# Aggregation methods",
                "Every registered method (`fedlora.aggregation.registry`), with what its `TrainingPolicy` declares: which "
                "LoRA factors clients train, upload and download, its options (`--method-option NAME=VALUE`), whether "
                "the server needs only sums of the uploads (what secure aggregation such as Flower's SecAgg+ reveals), "
                "and which `--rank-map` modes mixed client ranks (`--client-ranks`) may use."),
    "tasks": ("# Tasks",
              "Every registered task (`fedlora.tasks`): the model family, the headline metric (`main` in metrics.jsonl, "
              "higher is better), what is learned and where the data comes from. Without `--data-dir` (or "
              "`$FEDLORA_DATA_DIR`) data comes from the Hugging Face hub; with it, from local files and never the network."),
}


def render(what: str, fmt: str = "text", builtin_only: bool = False) -> str:
    """``what`` ("methods" or "tasks") in ``fmt`` ("text" or "markdown", the latter with its docs header)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is invalid: use one of {', '.join(FORMATS)}")
    columns, rows = (METHOD_COLUMNS, method_rows(builtin_only)) if what == "methods" else \
        (TASK_COLUMNS, task_rows(builtin_only))
    if fmt == "text":
        return text_blocks(columns, rows)
    title, intro = HEADERS[what]
    command = DOCS[f"docs/{what}.md"]
    return "\n\n".join([title, f"<!-- Generated from the registries by `{command}`; do not edit by hand "
                        "(tests/unit/cli/test_catalog.py fails when this file and the registries differ). -->",
                        intro, markdown_table(columns, rows, code=columns[0])]) + "\n"

