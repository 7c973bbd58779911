"""`fedlora methods` and `fedlora tasks` print the registries, and docs/methods.md and docs/tasks.md are their
Markdown output: a registry change without regenerating the docs fails here, as does a hand-kept test count."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedlora.cli import commands as cli
from fedlora.aggregation import available_methods, get_method
from fedlora.cli.catalog import DOCS, METHOD_COLUMNS, TASK_COLUMNS, method_rows, render, task_rows
from fedlora.tasks import available_tasks

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("path", sorted(DOCS))
def test_committed_docs_are_what_the_registries_give_now(path: str) -> None:
    what = Path(path).stem
    # fedlora's own entries only: other tests register methods and tasks in this process
    assert (REPO / path).read_text() == render(what, "markdown", builtin_only=True), \
        f"{path} has drifted from the registries; regenerate it: {DOCS[path]}"


@pytest.mark.parametrize("what", ["methods", "tasks"])
def test_the_cli_prints_the_docs_file_byte_for_byte_and_a_text_listing(what: str, capsys) -> None:
    assert cli.main([what, "--format", "markdown"]) == 0
    assert capsys.readouterr().out == render(what, "markdown")  # so `... > docs/X.md` writes the checked file
    assert cli.main([what]) == 0
    text = capsys.readouterr().out
    names = available_methods() if what == "methods" else available_tasks()
    assert [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")] == names


def test_every_method_row_follows_its_registered_policy_and_names_a_source() -> None:
    rows = {r["method"]: r for r in method_rows(builtin_only=True)}
    for name, row in rows.items():
        spec = get_method(name)
        assert set(row) == set(METHOD_COLUMNS) and row["summary"] == spec.summary
        assert row["source"] == spec.source and spec.source, f"{name} registers no source"
        assert row["secure aggregation"].startswith("yes (sums)" if not spec.policy.needs_individual_updates else "no")
        assert row["mixed ranks"].startswith("yes" if spec.policy.mixed_ranks else "no")
    assert rows["ffa-lora"]["clients train"] == "B" and rows["fedsa-lora"]["clients upload"] == "A"
    assert rows["svd"]["mixed ranks"] == "yes (--rank-map truncate, svd)" and rows["fedsvd"]["mixed ranks"].endswith("truncate)")


def test_every_user_option_is_listed_with_its_default_and_bounds() -> None:
    rows = {r["method"]: r["options (default)"].split("; ") for r in method_rows(builtin_only=True)}
    for name, options in rows.items():
        spec = get_method(name)
        listed = [o.split(" ", 1)[0] for o in options]
        user = [n for n in spec.option_specs if n != "weighting" and not (spec.policy.server_seed and n == "seed")]
        assert listed == ["weighting", *user], name
        assert options[0] == "weighting ∈ {" + ", ".join(spec.weightings) + "} = examples"
    assert "solver ∈ {als, adamw} = als" in rows["flora-na"] and "max_sweeps int ≥ 0 = 100" in rows["flora-na"]
    assert "max_deviation float ≥ 0 = ∞" in rows["flora-na"] and "lr float > 0 = 0.01" in rows["flora-na"]
    assert "rebalance bool = true" in rows["flora-na-stable"] and "decay float in [0, 1] = 1" in rows["svd-ef"]
    assert not any(o.startswith("seed ") for o in rows["flora"])  # drawn by the server each round


def test_every_task_row_names_its_family_metric_summary_and_data() -> None:
    rows = {r["task"]: r for r in task_rows(builtin_only=True)}
    for name, row in rows.items():
        assert set(row) == set(TASK_COLUMNS) and all(v and v != "–" for v in row.values()), name
    assert rows["stsb"]["family"] == "encoder regression" and rows["stsb"]["metric"] == "pearson"
    assert rows["mnli"]["family"] == "encoder classification (3 classes)"
    assert all(rows[t]["family"].startswith("decoder LLM") for t in ("gsm8k", "mbpp", "humaneval", "mathcode", "instruct"))
    assert "7,473" in rows["gsm8k"]["data and splits"] and "validation_matched" in rows["mnli"]["data and splits"]


def test_markdown_cells_escape_pipes_and_names_are_code() -> None:
    from fedlora.cli.catalog import markdown_table

    table = markdown_table(("name", "summary"), [{"name": "x", "summary": "a | b"}], code="name")
    assert table.splitlines()[2] == "| `x` | a \\| b |"


def test_no_document_states_a_hand_kept_test_count() -> None:
    # "774 tests" in the README drifted from the 776 collected: counts are for pytest to print, not prose to keep.
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        found = re.findall(r"\b\d[\d,]{2,} tests\b", path.read_text())
        assert not found, f"{path.relative_to(REPO)} states a test count: {found}"
