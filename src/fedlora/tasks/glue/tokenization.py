"""Tokenise text-classification datasets (GLUE and the like): truncated, unpadded, torch-formatted model inputs.

Batches are padded where they are drawn (:meth:`fedlora.tasks.classification.ClassificationTask`).
"""

from __future__ import annotations

import hashlib

import datasets
from transformers import PreTrainedTokenizerBase

from fedlora.tasks.glue.specs import TaskSpec, get_spec

def tokenize(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, task: str | TaskSpec, max_length: int
) -> datasets.Dataset:
    """Encode a GLUE task's text field(s) (as a pair when there are two) and keep only model inputs.

    Returns a torch-formatted dataset with ``input_ids``, ``attention_mask``, ``token_type_ids``
    (if the tokenizer produces them) and ``labels`` (int64, or float32 for STS-B). Sequences are
    truncated to ``max_length`` but not padded: batches are padded where they are drawn.
    """
    spec = get_spec(task)
    return encode_text(ds, tokenizer, spec.text_fields, max_length, name=spec.name, regression=spec.is_regression)


def encode_text(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_fields: tuple[str, ...],
    max_length: int,
    *,
    name: str,
    regression: bool = False,
) -> datasets.Dataset:
    """:func:`tokenize` for any text (pair) classification dataset with columns ``text_fields`` and ``label``.

    ``name`` labels the progress bar and enters the cache fingerprint; ``regression`` casts the
    labels to float32 (else they stay integer class ids).
    """
    missing = [c for c in (*text_fields, "label") if c not in ds.column_names]
    if missing:
        raise ValueError(f"Dataset for {name!r} lacks columns {missing}; it has {ds.column_names}.")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(*(batch[f] for f in text_fields), truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        return dict(enc)

    # datasets would otherwise fingerprint `encode` by dill-pickling the whole tokenizer on every call:
    # 0.3-0.5 s per split, most of a run's start-up. A hash of what determines the output is enough.
    fingerprint = hashlib.sha256(
        "|".join(map(str, (ds._fingerprint, name, *text_fields, type(tokenizer).__name__, tokenizer.name_or_path,
                           len(tokenizer), max_length))).encode()
    ).hexdigest()[:32]
    out = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {name}",
                 new_fingerprint=fingerprint)
    if regression:
        out = out.cast_column("labels", datasets.Value("float32"))
    out.set_format("torch")
    return out
