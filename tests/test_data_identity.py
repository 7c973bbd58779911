"""A run trains on the data it names, and only on that (issue 21, items 10, 11 and 15).

A data file line that is not a JSON object is one line naming file and line, before the model loads;
the Flower data cache is keyed by the data's content, not its path; a resume on other data is refused,
while a moved copy of the same data resumes. Fast: no model is loaded (the engine is stubbed where the
property is about what happens before it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora import cli, simulation


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: what is checked must be checked before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(simulation, "build_model", refuse)
    monkeypatch.setattr(cli, "_quiet_libraries", lambda: None)


# -- item 10: a line that is not an object ---------------------------------------------------------
@pytest.mark.parametrize("line,kind", [('"a prompt on its own"', "string"), ("42", "number"), ("null", "null"),
                                       ('["prompt", "response"]', "list")])
def test_an_instruct_line_that_is_not_an_object_is_one_line_before_the_model_loads(tmp_path, capsys, no_model,
                                                                                  line, kind):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "Say hi.", "response": "hi"}\n' + line + "\n")
    assert cli.main(["run", "--task", "instruct", "--data-dir", str(data), "--out", str(tmp_path / "run")]) == 2
    assert f"{data / 'train.jsonl'}:2 is a JSON {kind}, not an object" in one_line_error(capsys)
