"""Every long phase of a run is named where the user sees progress (fedlora.util.progress.phase).

That a real run names its phases in the bar is checked by test_end_to_end.py's tiny toy run (no extra run here)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

from fedlora.util import progress
from fedlora.util.progress import current_phase, on_phase, phase, update_phase
from fedlora.tasks import causal_lm


def test_phases_nest_rename_and_end_and_listeners_see_each_change() -> None:
    seen: list[str] = []
    with on_phase(seen.append):
        with phase("local evaluation"):
            with phase("generation 0/8"):
                update_phase("generation 4/8")
            assert current_phase() == "local evaluation"
    assert seen == ["local evaluation", "local evaluation: generation 0/8", "local evaluation: generation 4/8",
                    "local evaluation", ""]
    update_phase("ignored")  # outside any phase: nothing to rename
    assert current_phase() == ""


def test_a_phase_that_raises_still_ends() -> None:
    try:
        with phase("scoring"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert current_phase() == ""


def test_a_long_phase_is_logged_with_its_duration(monkeypatch, caplog) -> None:
    clock = iter([0.0, 42.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    with caplog.at_level("INFO", logger="fedlora.util.progress"), phase("global evaluation"):
        pass
    assert "global evaluation: 42 s" in caplog.text


class _Decoder(torch.nn.Module):
    """Stands in for a causal LM: "generates" zeros, so generation's progress is tested without a model."""

    config = SimpleNamespace(max_position_embeddings=64)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 **_: object) -> torch.Tensor:
        return torch.cat([input_ids, torch.zeros(len(input_ids), max_new_tokens, dtype=torch.long)], dim=1)


def test_generation_counts_its_prompts_in_the_phase(monkeypatch) -> None:
    monkeypatch.setattr(causal_lm, "_end_of_turn_id", lambda tokenizer: None)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0,
                                batch_decode=lambda ids, skip_special_tokens: ["x"] * len(ids))
    runtime = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    seen: list[str] = []
    with on_phase(seen.append), phase("local evaluation"):
        causal_lm.generate(_Decoder(), tokenizer, [[1, 2], [3], [4, 5, 6], [7], [8]], 4, runtime, batch_size=2)
    assert seen[1] == "local evaluation: generation 0/5"
    assert [s.split(": ")[1].split(",")[0] for s in seen[2:5]] == ["generation 2/5", "generation 4/5",
                                                                     "generation 5/5"]
    assert "left" in seen[2] and "left" not in seen[4]  # an estimate while prompts remain

