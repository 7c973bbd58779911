"""Fast checks of the Flower glue: run-config mapping, wire format, certificates (no Ray, no processes)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from fedlora.aggregation import LoraPair
from fedlora.config import ConfigError, RunConfig
from fedlora.flower.config import run_config_from_flower
from fedlora.flower.wire import deltas_record, model_record, record_to_deltas, record_to_model

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def flower_defaults() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_the_fedlora_run_defaults():
    config, options = run_config_from_flower(flower_defaults())
    assert config == RunConfig().replace(out="runs/flower")
    assert options.min_train_nodes == 1 and options.min_available_nodes == 0


def test_overrides_use_the_cli_spellings():
    raw = flower_defaults() | {"alpha": "iid", "method-options": "solver=adamw scope=global", "data-dir": "",
                               "max-eval-examples": 0, "target-modules": "query key value", "local-steps": 3}
    config, _ = run_config_from_flower(raw)
    assert config.alpha is None and config.data_dir is None and config.max_eval_examples is None
    assert config.method_options == {"solver": "adamw", "scope": "global"}
    assert config.target_modules == ("query", "key", "value") and config.local_steps == 3


@pytest.mark.parametrize("change, needle", [({"rounds-typo": 3}, "unknown keys"), ({"method": "nope"}, "--method"),
                                            ({"min-train-nodes": 0}, "min-train-nodes")])
def test_bad_config_is_named(change, needle):
    with pytest.raises(ConfigError, match=needle):
        run_config_from_flower(flower_defaults() | change)


def test_model_record_uses_peft_names_and_round_trips():
    adapter = {"bert.encoder.layer.0.attention.self.query": LoraPair(A=torch.randn(2, 5), B=torch.randn(4, 2))}
    head = {"classifier.weight": torch.randn(2, 4), "classifier.bias": torch.randn(2)}
    record = model_record(adapter, head)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in record
    assert "base_model.model.classifier.weight" in record
    back, back_head = record_to_model(record)
    assert torch.equal(back["bert.encoder.layer.0.attention.self.query"].B, adapter["bert.encoder.layer.0.attention.self.query"].B)
    assert set(back_head) == set(head) and all(torch.equal(back_head[k], head[k]) for k in head)


def test_deltas_come_back_in_round_order():
    deltas = {3: {"m": torch.ones(2, 2)}, 1: {"m": torch.zeros(2, 2), "n": torch.eye(2)}}
    back = record_to_deltas(deltas_record(deltas))
    assert list(back) == [1, 3] and torch.equal(back[1]["n"], torch.eye(2))


def test_certificates_are_for_loopback_and_signed_by_the_ca(tmp_path):
    from cryptography import x509

    from fedlora.flower.local import generate_certificates

    paths = generate_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
