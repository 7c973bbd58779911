"""``instruct``: federate your own instruction data (JSON lines with a prompt and a response per row).

``--data-dir`` is a folder with ``train.jsonl`` and, optionally, ``test.jsonl`` (without one, a
fixed 10% of train, seed 0 whatever the run's seed, is held out as the global test set, so every run
tests on the same rows). The column names are ``--prompt-field``/``--response-field``; unset, the
first present of :data:`PROMPT_FIELDS` / :data:`RESPONSE_FIELDS` is used (Alpaca-style files with
``instruction`` + ``input`` get both joined as the prompt).

Metrics: the teacher-forced ``loss``, ``perplexity`` and ``token_accuracy`` on the responses (main:
``token_accuracy``); with ``--exact-match`` the model also generates and ``exact_match`` (responses
compared after trimming, case-folding and collapsing whitespace) becomes the main metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.tasks.base import register_task
from fedlora.tasks.causal_lm import CausalLMTask
from fedlora.tasks.llm import read_jsonl, split

if TYPE_CHECKING:
    import datasets

    from fedlora.config.run import RunConfig

PROMPT_FIELDS = ("prompt", "instruction", "question", "input", "query")
RESPONSE_FIELDS = ("response", "output", "answer", "completion", "target")
TEST_FRACTION, SPLIT_SEED = 0.1, 0


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


@register_task("instruct")
class InstructTask(CausalLMTask):
    """Your prompt/response pairs; metric: token accuracy, or exact match with ``--exact-match``."""

    metric = "token_accuracy"
    summary = ("your prompt/response pairs; metric: next-token accuracy on the responses, or exact match "
               "with `--exact-match`")
    data = ("your `--data-dir`: train.jsonl (and test.jsonl; without it a fixed 10% of train is the test set), "
            "one JSON object per line")
    generates = False
    prompt_field = ""
    response_field = ""

    def configure(self, config: RunConfig) -> InstructTask:
        task = super().configure(config)
        assert isinstance(task, InstructTask)
        task.prompt_field, task.response_field = config.prompt_field, config.response_field
        task.generates = config.exact_match
        task.metric = "exact_match" if config.exact_match else "token_accuracy"
        return task

    def data_files(self, data_dir: str | Path | None) -> list[Path]:
        if data_dir is None:
            return []  # load() says what is missing
        root = Path(data_dir).expanduser()
        return [root / name for name in ("train.jsonl", "test.jsonl") if (root / name).is_file()]

    def load(self, data_dir: str | Path | None) -> datasets.DatasetDict:
        import datasets

        if data_dir is None:
            raise ValueError("the instruct task reads your own data: pass --data-dir a folder with train.jsonl "
                             "(and optionally test.jsonl), one JSON object per line with a prompt and a response")
        root = Path(data_dir).expanduser()
        if not (root / "train.jsonl").is_file():
            raise FileNotFoundError(f"{root / 'train.jsonl'} not found; the instruct task needs train.jsonl "
                                    "(and optionally test.jsonl) in --data-dir")
        train = [self.row(r, root / "train.jsonl", i) for i, r in enumerate(read_jsonl(root / "train.jsonl"), 1)]
        if (root / "test.jsonl").is_file():
            test = [self.row(r, root / "test.jsonl", i) for i, r in enumerate(read_jsonl(root / "test.jsonl"), 1)]
        else:
            order = np.random.default_rng(SPLIT_SEED).permutation(len(train))
            n_test = max(1, round(TEST_FRACTION * len(train)))
            test = [train[i] for i in sorted(order[:n_test])]
            train = [train[i] for i in sorted(order[n_test:])]
        return datasets.DatasetDict(train=split(train), test=split(test))

    def row(self, raw: dict[str, Any], path: Path, number: int) -> dict[str, str]:
        """One file row as the task's columns; a row without a prompt or response is an error naming it."""
        prompt_key = self.prompt_field or next((k for k in PROMPT_FIELDS if k in raw), None)
        response_key = self.response_field or next((k for k in RESPONSE_FIELDS if k in raw), None)
        for what, key, known in (("prompt", prompt_key, PROMPT_FIELDS), ("response", response_key, RESPONSE_FIELDS)):
            if key is None or not isinstance(raw.get(key), str):
                hint = f"--{what}-field {key}" if key else f"--{what}-field NAME (tried {', '.join(known)})"
                raise ValueError(f"{path}:{number} has no {what} text (keys: {sorted(raw)}); set {hint}")
        assert prompt_key is not None and response_key is not None
        prompt = raw[prompt_key]
        if not self.prompt_field and prompt_key == "instruction" and isinstance(raw.get("input"), str) and raw["input"]:
            prompt = f"{prompt}\n\n{raw['input']}"  # Alpaca: the instruction and its input
        return {"prompt": prompt, "response": raw[response_key], "reference": raw[response_key], "domain": "instruct"}

    def score(self, rows: list[dict[str, str]], generations: list[str]) -> tuple[dict[str, float], list[bool]]:
        correct = [normalise(g) == normalise(r["reference"]) for r, g in zip(rows, generations)]
        return {"exact_match": float(np.mean(correct)) if correct else 0.0}, correct
