"""The package's layers point down: a module imports only from its own layer or the layers below it.

Layers, bottom to top (docs/architecture.md draws them):

    util                        no fedlora imports at all
    aggregation, sandbox        pure maths over tensors; the code sandbox
    testing                     failpoints and synthetic clients (used by tests and the crash tests)
    config                      RunConfig, its declarations and files
    models                      loaders, PEFT bridge, training, optimiser knobs, runtime
    tasks                       what is learned from which data, scored how (GLUE, LLM tasks)
    protocol                    the round: server, client, records, checkpoint, federation
    reporting                   plots and tables from metrics.jsonl
    runs                        a run's folder: start/resume rules, lock, trackers, model card, outputs
    engines                     local and Flower
    cli, bench                  the front

Every import counts, including those inside functions and under ``TYPE_CHECKING`` (a local import
hides a cycle; it does not remove it). The one exception is the task registry: config validates a
task name by looking it up (``fedlora.tasks.get_task``/``available_tasks``/``task_for``), as it looks
methods up in the aggregation registry, which sits below it anyway.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "fedlora"
LAYERS: list[tuple[str, ...]] = [
    ("util",),
    ("aggregation", "sandbox", "privacy"),
    ("testing",),
    ("config",),
    ("models",),
    ("tasks",),
    ("protocol",),
    ("reporting",),
    ("runs",),
    ("engines",),
    ("cli", "bench", "__init__", "__main__"),
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
REGISTRY = ("fedlora.tasks", {"get_task", "available_tasks", "task_for", "register_task"})


def _layer(module: str) -> str:
    """``fedlora.protocol.rounds`` -> ``protocol``; ``fedlora.tasks`` -> ``tasks``."""
    return module.split(".")[1]


def _imports(path: Path) -> list[tuple[int, str, set[str]]]:
    """(line, absolute module, names) of every ``fedlora`` import in one file, relative ones resolved."""
    package = ["fedlora", *path.relative_to(SRC).with_suffix("").parts]
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, set()) for a in node.names if a.name.startswith("fedlora.")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = {a.name for a in node.names}
            if base == "fedlora":  # `from fedlora import x`: x is the module
                found += [(node.lineno, f"fedlora.{n}", set()) for n in names]
            elif base.startswith("fedlora."):
                found.append((node.lineno, base, names))
    return found


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        own = path.relative_to(SRC).parts[0].removesuffix(".py")
        for line, module, names in _imports(path):
            target = _layer(module)
            if target not in LEVEL:
                bad.append(f"{path.relative_to(SRC)}:{line}: {module} is in no layer (add it to LAYERS)")
            elif LEVEL[target] > LEVEL[own] and not (module == REGISTRY[0] and names and names <= REGISTRY[1]):
                bad.append(f"{path.relative_to(SRC)}:{line}: {own} imports {module} ({target}, a layer above)")
    return bad


def test_every_top_level_package_is_in_a_layer() -> None:
    names = {p.name.removesuffix(".py") for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert names == set(LEVEL), f"not in LAYERS: {sorted(names - set(LEVEL))}; gone: {sorted(set(LEVEL) - names)}"


def test_imports_point_down_only() -> None:
    bad = upward_imports()
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_check_sees_upward_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test can fail: a model module that imports the protocol (inside a function) is caught."""
    fake = tmp_path / "fedlora"
    (fake / "models").mkdir(parents=True)
    (fake / "protocol").mkdir()
    (fake / "models" / "bad.py").write_text("def f():\n    from fedlora.protocol.rounds import Server\n")
    (fake / "protocol" / "good.py").write_text("from ..models import bad\n")
    monkeypatch.setattr(f"{__name__}.SRC", fake)
    assert upward_imports() == ["models/bad.py:2: models imports fedlora.protocol.rounds (protocol, a layer above)"]
