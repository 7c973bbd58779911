"""The round protocol is written once and names no method: engines read each method's declarations."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedlora.aggregation import available_methods, get_method
from fedlora.config.run import RunConfig
from fedlora.protocol.plan import sample_clients

SRC = Path(__file__).resolve().parents[3] / "src" / "fedlora"
# bench/ compares every method against the paper's baseline (FedIT) in its reports; the methods
# themselves live in aggregation/methods/. Everything else is engine code and must not branch on names.
NOT_ENGINE = ("aggregation/methods/", "bench/")


def engine_modules() -> list[Path]:
    return [p for p in SRC.rglob("*.py") if not any(part in p.relative_to(SRC).as_posix() for part in NOT_ENGINE)]


def test_no_engine_module_compares_a_method_name():
    names = set(available_methods())
    offenders = []
    for path in engine_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                literals = [n for o in operands for n in ast.walk(o) if isinstance(n, ast.Constant)]
                if any(isinstance(c.value, str) and c.value in names for c in literals):
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, f"engine code branches on a method name: {offenders}"


def test_the_scan_would_catch_a_name_comparison(tmp_path):
    tree = ast.parse('if config.method == "flora":\n    pass\n')
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert compares and compares[0].comparators[0].value in available_methods()


def test_no_engine_imports_another_engines_private_helpers():
    for path in engine_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedlora"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.relative_to(SRC)} imports private {private} from {node.module}"


@pytest.mark.parametrize("method", available_methods())
def test_every_method_declares_what_the_engines_need(method):
    policy = get_method(method).policy
    assert policy.download in ("factors", "residual", "stacked")
    assert policy.train_A or policy.train_B
    # a client uploads a factor, or a phased method's sums (FedASK's sketches) instead of any factor
    assert policy.upload_A or policy.upload_B or get_method(method).phased is not None
    assert set(policy.private_factors) <= {"A", "B"}
    if policy.private_factors:  # a private factor never travels in the protocol
        assert not policy.upload_B
    if not policy.needs_individual_updates:  # sums suffice: no per-client products, no merges
        assert not policy.merges_into_base


def test_secure_aggregation_column_matches_the_methods_definitions():
    only_sums = {m for m in available_methods() if not get_method(m).policy.needs_individual_updates}
    assert {"fedit", "ffa-lora", "fedsa-lora", "fedask"} <= only_sums
    assert not only_sums & {"flora-na", "fedex-lora", "flora", "svd"}


def test_client_sampling_is_seeded_sorted_and_covers_the_fraction():
    config = RunConfig(clients=10, fraction=0.3, seed=4)
    rounds = [sample_clients(config, r) for r in range(1, 6)]
    assert all(len(c) == 3 and c == sorted(c) and len(set(c)) == 3 for c in rounds)
    assert rounds == [sample_clients(config, r) for r in range(1, 6)]  # deterministic
    assert len({tuple(c) for c in rounds}) > 1  # and not the same clients every round
    assert sample_clients(config.replace(fraction=1.0), 3) == list(range(10))
