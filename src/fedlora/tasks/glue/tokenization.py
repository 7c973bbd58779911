"""Tokenise text-classification datasets (GLUE and the like) and wrap them in deterministic, dynamically padded DataLoaders."""

from __future__ import annotations

import hashlib

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from fedlora.tasks.glue.specs import TaskSpec, get_spec

# make_loader's public signature has no tokenizer, yet padding needs one. tokenize() therefore tags
# its output's DatasetInfo.description (which select/shuffle/train_test_split copy along) with a key
# into this registry. Tokenizers are few and long-lived, so holding them strongly is fine and keeps
# id()-based keys from being reused.
_TAG = "fedlora-tokenizer:"
_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}


def tokenize(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, task: str | TaskSpec, max_length: int
) -> datasets.Dataset:
    """Encode a GLUE task's text field(s) (as a pair when there are two) and keep only model inputs.

    Returns a torch-formatted dataset with ``input_ids``, ``attention_mask``, ``token_type_ids``
    (if the tokenizer produces them) and ``labels`` (int64, or float32 for STS-B). Sequences are
    truncated to ``max_length`` but not padded: :func:`make_loader` pads per batch.
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
    key = f"{type(tokenizer).__name__}@{id(tokenizer):x}"
    _TOKENIZERS[key] = tokenizer
    out.info.description = _TAG + key
    out.set_format("torch")
    return out


def make_loader(
    tokenized: datasets.Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> DataLoader:
    """A DataLoader that pads each batch with ``DataCollatorWithPadding``.

    The shuffle order comes from a ``torch.Generator`` seeded with ``seed``, so it is the same on
    every run and independent of the global torch RNG. ``tokenizer`` defaults to the one that
    :func:`tokenize` used to build ``tokenized``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    tokenizer = tokenizer or _tokenizer_of(tokenized)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        tokenized,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=DataCollatorWithPadding(tokenizer),
    )


def _tokenizer_of(tokenized: datasets.Dataset) -> PreTrainedTokenizerBase:
    """Find the tokenizer recorded by :func:`tokenize`, or explain how to pass one."""
    description = tokenized.info.description or ""
    tokenizer = _TOKENIZERS.get(description.removeprefix(_TAG)) if description.startswith(_TAG) else None
    if tokenizer is None:
        raise ValueError(
            "make_loader needs the tokenizer for padding: build the dataset with fedlora.tasks.glue.tokenize (or encode_text) "
            "in this process, or pass tokenizer=... explicitly."
        )
    return tokenizer
