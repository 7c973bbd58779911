"""``toy``: a tiny built-in sentiment task, generated from fixed word lists (no files, no network).

Each sentence puts a film subject in a template with one or two adjectives of one polarity
("the plot was dreadful.", "honestly, the cast felt superb."); the label is the polarity. 256
training and 64 test sentences, balanced, distinct, and the same on every machine (a fixed
generator seed, independent of the run's seed: the run's seed only partitions and trains). The
bundled MiniLM separates the two word lists within a few LoRA steps, so end-to-end tests of the
engine take seconds instead of tokenising SST-2 — and still exercise every real code path.
"""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from fedlora.tasks.base import register_task
from fedlora.tasks.classification import SequenceClassificationTask, accuracy

if TYPE_CHECKING:
    import datasets

GENERATOR_SEED = 20_250_101
NUM_TRAIN, NUM_TEST = 256, 64  # both even: half of each split per label
LABEL_NAMES = ("negative", "positive")
ADJECTIVES = (
    ("terrible", "awful", "boring", "dreadful", "dull", "horrible", "painful", "lousy", "tedious", "clumsy"),
    ("wonderful", "great", "delightful", "brilliant", "charming", "superb", "excellent", "lovely", "moving", "fresh"),
)
SUBJECTS = ("the movie", "this film", "the story", "the acting", "the music", "the ending", "the script",
            "the cast", "the plot", "the dialogue")
TEMPLATES = ("{s} was {a}.", "{s} is {a} and {b}.", "i thought {s} was {a}.", "honestly, {s} felt {a}.",
             "{s} was {a}, really {b}.", "what a {a} experience, {s} was {b}.")


def generate(n_per_label: int, rng: np.random.Generator, exclude: set[str]) -> tuple[list[str], list[int]]:
    """``n_per_label`` distinct sentences per label, none in ``exclude``, labels interleaved 0, 1, 0, 1..."""
    sentences: list[str] = []
    labels: list[int] = []
    seen = set(exclude)
    for _ in range(n_per_label):
        for label, words in enumerate(ADJECTIVES):
            while True:  # ~6,000 combinations per label: a fresh one is found in a few draws
                a, b = rng.choice(len(words), size=2, replace=False)
                text = TEMPLATES[rng.integers(len(TEMPLATES))].format(
                    s=SUBJECTS[rng.integers(len(SUBJECTS))], a=words[a], b=words[b])
                if text not in seen:
                    break
            seen.add(text)
            sentences.append(text)
            labels.append(label)
    return sentences, labels


@register_task("toy")
class ToyTask(SequenceClassificationTask):
    """Binary sentiment of generated one-line film reviews; metric: accuracy (chance: 0.5)."""

    text_fields = ("sentence",)
    num_labels = 2
    metric = "accuracy"
    summary = "sentiment of generated one-line film reviews (chance: 0.5); checks a setup in seconds"
    data = f"generated from fixed word lists (no files, no network): {NUM_TRAIN} train / {NUM_TEST} test"

    def data_files(self, data_dir: str | Path | None) -> list[Path]:
        return []  # generated: no file is read, whatever --data-dir says

    def load(self, data_dir: str | Path | None = None) -> datasets.DatasetDict:
        """The fixed train/test splits; ``data_dir`` is ignored (the data is generated)."""
        import datasets

        rng = np.random.default_rng(GENERATOR_SEED)
        train = generate(NUM_TRAIN // 2, rng, exclude=set())
        test = generate(NUM_TEST // 2, rng, exclude=set(train[0]))
        features = datasets.Features(
            {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABEL_NAMES))})

        def split(rows: tuple[list[str], list[int]]) -> datasets.Dataset:
            return datasets.Dataset.from_dict({"sentence": rows[0], "label": rows[1]}, features=features)

        return datasets.DatasetDict(train=split(train), test=split(test))

    def score(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        value = accuracy(predictions, labels)
        return {"accuracy": value, "main": value}
