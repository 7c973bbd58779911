"""Instruction tuning of a decoder LLM: prompt-masked loss, scored by the teacher-forced loss and by generating.

A subclass loads rows with four string columns (see :data:`COLUMNS`): ``prompt``, ``response`` (the
target the model is trained on), ``reference`` (what :meth:`CausalLMTask.score` compares a
generation with: GSM8K's final number, MBPP's asserts as JSON, ...) and ``domain`` (the sub-task
a row belongs to, for domain-skewed federations); and implements :meth:`~CausalLMTask.score`.
Formatting (the model's chat template), encoding, batching, the model (any Hugging Face causal LM;
default SmolLM2-135M-Instruct) and the evaluation loop are shared here.

Encoding: ``input_ids = prompt tokens + response tokens (+ end-of-turn)``, ``labels`` the same with
the prompt positions set to -100, so the loss is on the response only. Longer rows than
``max_length`` keep at least half of their budget for the response and cut the prompt from the left.
``prompt_ids`` (the whole formatted prompt, encoded on its own) is what generation starts from: the
reference answer's length is a training budget and must not cut the prompt a model answers. Only
what exceeds the model's positions less ``max_new_tokens`` is cut, from the left, at generation.

Evaluation: the mean token NLL and next-token accuracy on the response tokens (teacher forcing:
cheap, and the signal that separates methods on small models), then, unless ``max_new_tokens`` is 0,
batched greedy generation from the prompts, scored by the subclass. ``main`` is the task's metric;
without generation it falls back to the token accuracy (so that it stays higher-is-better).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from abc import abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.util.progress import duration, phase, update_phase
from fedlora.tasks.base import Collate, Task

if TYPE_CHECKING:
    import datasets
    from peft import PeftModel
    from torch import Tensor, nn
    from transformers import PreTrainedTokenizerBase

    from fedlora.config.run import RunConfig
    from fedlora.models.runtime import Runtime

log = logging.getLogger(__name__)
COLUMNS = ("prompt", "response", "reference", "domain")
IGNORE = -100  # the label value transformers' causal-LM loss skips


class CausalLMTask(Task):
    """A generative task on a decoder LLM with LoRA (PEFT ``CAUSAL_LM``; no head).

    Attributes (set per run by :meth:`configure`):
        max_new_tokens: tokens generated per test prompt; 0: teacher-forced metrics only.
        max_generations: generate for the first this many evaluated rows only (None: all).
        generates: whether evaluation generates at all (the instruct task only with ``--exact-match``).
        load_in_4bit, gradient_checkpointing: passed to the model loader.
        eval_batch_size: prompts per generation batch and rows per teacher-forced batch.
        system_prompt: a system message for the chat template (None: the template's default).
    """

    default_max_length = 512
    max_new_tokens = 256
    allow_unsandboxed_code = False  # code tasks: run generated code without the kernel sandbox (user's explicit risk)
    max_generations: int | None = None
    generates = True
    load_in_4bit = False
    gradient_checkpointing = False
    model_options = frozenset({"load_in_4bit", "gradient_checkpointing"})
    eval_batch_size = 8
    system_prompt: str | None = None

    @property
    def family(self) -> str:
        return "decoder LLM (causal LM, prompt-masked loss)"

    def configure(self, config: RunConfig) -> CausalLMTask:
        task = copy.copy(self)
        task.max_new_tokens = config.max_new_tokens
        task.max_generations = config.max_eval_generations
        task.load_in_4bit = config.load_in_4bit
        task.gradient_checkpointing = config.gradient_checkpointing
        task.allow_unsandboxed_code = config.allow_unsandboxed_code
        return task

    @abstractmethod
    def score(self, rows: list[dict[str, str]], generations: list[str]) -> tuple[dict[str, float], list[bool]]:
        """Metrics of ``generations`` (decoded, special tokens removed) against ``rows`` (their
        :data:`COLUMNS`), including ``self.metric``; and whether each generation is correct."""

    # -- data -------------------------------------------------------------------------------------
    def encode(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.Dataset:
        """Adds ``input_ids``, ``attention_mask``, ``labels`` (prompt masked) and ``prompt_ids``; keeps the text."""
        from fedlora.models.decoder import format_prompt, format_response

        missing = [c for c in COLUMNS if c not in ds.column_names]
        if missing:
            raise ValueError(f"task {self.name!r}: rows lack columns {missing} (have {ds.column_names})")
        bos = _bos(tokenizer)

        def encode_batch(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            prompts = [format_prompt(tokenizer, p, self.system_prompt) for p in batch["prompt"]]
            responses = [format_response(tokenizer, r) for r in batch["response"]]
            p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
            r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
            out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": [], "prompt_ids": []}
            for whole, r in zip(p_ids, r_ids):
                whole = bos + whole
                r = r[: max(max_length // 2, max_length - len(whole))]  # the response keeps >= half the budget
                p = whole[len(whole) - (max_length - len(r)):] if len(whole) + len(r) > max_length else whole
                out["input_ids"].append(p + r)
                out["attention_mask"].append([1] * (len(p) + len(r)))
                out["labels"].append([IGNORE] * len(p) + r)
                out["prompt_ids"].append(whole)  # not p: generation has no reference answer to make room for
            return out

        return ds.map(encode_batch, batched=True, desc=f"encoding {self.name}")

    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Collate:
        return functools.partial(pad_right, pad_id=_pad_id(tokenizer))

    def loss_weight(self, batch: dict[str, Any]) -> int:
        """Supervised tokens: the ones the shifted causal-LM loss averages over."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Next-token cross-entropy over the supervised tokens (labels ≠ -100), as transformers' causal LM loss."""
        import torch

        shifted = logits[:, :-1].float()  # (b, L-1, V): position t predicts token t+1
        return torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=IGNORE)

    def example_losses(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Each row's mean next-token loss over its own supervised tokens (b,); 0 for a row with none.

        Not :meth:`loss`'s token-weighted mean over the batch: there one row's length would scale every other
        row's gradient, which a per-example clip cannot bound (record-level DP-SGD needs rows independent)."""
        import torch

        shifted = logits[:, :-1].float()  # (b, L-1, V)
        target = labels[:, 1:]  # (b, L-1)
        tokens = torch.nn.functional.cross_entropy(shifted.transpose(1, 2), target, ignore_index=IGNORE,
                                                   reduction="none")  # (b, L-1), 0 where ignored
        counts = (target != IGNORE).sum(1)  # (b,)
        return tokens.sum(1) / counts.clamp(min=1)

    # -- model ------------------------------------------------------------------------------------
    def build_model(
        self, model: str | None, rank: int, lora_alpha: float, target_modules: Sequence[str], seed: int
    ) -> tuple[PeftModel, PreTrainedTokenizerBase]:
        """``model`` (default: SmolLM2-135M-Instruct, converted once from the bundled GGUF) + LoRA."""
        from fedlora.models.decoder import default_causal_lm_path, load_causal_lm

        return load_causal_lm(model or default_causal_lm_path(), rank, lora_alpha, list(target_modules) or None, seed,
                              load_in_4bit=self.load_in_4bit, gradient_checkpointing=self.gradient_checkpointing)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(
        self, model: nn.Module, data: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, runtime: Runtime,
        samples: list[dict[str, Any]] | None = None,
    ) -> dict[str, float]:
        with phase("teacher-forced loss"):
            metrics = teacher_forced(model, data, self.collate(tokenizer), runtime, self.eval_batch_size)
        if self.generates and self.max_new_tokens > 0 and len(data):
            if self.max_generations is not None and len(data) > self.max_generations:
                data = data.select(range(self.max_generations))
            generations = generate(model, tokenizer, data["prompt_ids"], self.max_new_tokens, runtime,
                                   self.eval_batch_size, what=self.name)
            rows = data.select_columns(list(COLUMNS)).to_list()
            with phase("scoring"):
                scored, correct = self.score(rows, generations)
            metrics.update(scored)
            if samples is not None:
                samples.extend({"domain": r["domain"], "prompt": r["prompt"], "reference": r["reference"],
                                "generation": g, "correct": bool(c)} for r, g, c in zip(rows, generations, correct))
        metrics["main"] = metrics.get(self.metric, metrics["token_accuracy"])
        return metrics


def pad_right(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Rows of (unpadded) ``input_ids``/``labels`` → ``(b, L)`` tensors padded on the right to the longest row."""
    import torch

    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (b, L)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)  # (b, L)
    mask = torch.zeros((len(rows), length), dtype=torch.long)  # (b, L)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.as_tensor(r["input_ids"])
        labels[i, :n] = torch.as_tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def teacher_forced(model: nn.Module, data: datasets.Dataset, collate: Collate, runtime: Runtime,
                   batch_size: int) -> dict[str, float]:
    """Mean NLL per response token (``loss``), ``perplexity`` and next-token ``token_accuracy`` over ``data``."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    nll, correct, tokens = 0.0, 0, 0
    columns = data.select_columns(["input_ids", "labels"])
    order = np.argsort([len(ids) for ids in columns["input_ids"]], kind="stable")  # similar lengths: less padding
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            cols = columns[order[start:start + batch_size].tolist()]  # {column: values of these rows}
            batch = runtime.to_device(collate([{"input_ids": i, "labels": y}
                                               for i, y in zip(cols["input_ids"], cols["labels"])]))
            labels = batch.pop("labels")[:, 1:]  # (b, L-1): token t+1 is predicted at position t
            with runtime.autocast():
                logits = model(**batch).logits[:, :-1]  # (b, L-1, V)
            keep = labels != IGNORE
            picked = logits[keep].float()  # (n, V)
            nll += float(F.cross_entropy(picked, labels[keep], reduction="sum"))
            correct += int((picked.argmax(-1) == labels[keep]).sum())
            tokens += int(keep.sum())
    model.train(was_training)
    if tokens == 0:
        return {"loss": math.nan, "perplexity": math.nan, "token_accuracy": 0.0}
    return {"loss": nll / tokens, "perplexity": math.exp(min(nll / tokens, 50.0)), "token_accuracy": correct / tokens}


def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, runtime: Runtime, batch_size: int, what: str = "") -> list[str]:
    """Greedy continuations of token-id ``prompts`` (left-padded batches of similar length), decoded
    without special tokens, in the order of ``prompts``. Shows progress (tqdm, on a terminal) and logs it."""
    import torch
    from tqdm.auto import tqdm

    pad = _pad_id(tokenizer)
    stop = sorted({i for i in (tokenizer.eos_token_id, _end_of_turn_id(tokenizer)) if i is not None})
    room = prompt_room(model, max_new_tokens)
    if room is not None:  # only what the model cannot hold goes, from the left (the question is at the end)
        prompts = [p[len(p) - room:] if len(p) > room else p for p in prompts]
    order = np.argsort([len(p) for p in prompts], kind="stable")
    texts: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    bar = tqdm(total=len(prompts), desc=f"generating {what}".strip(), unit="prompt", disable=None, leave=False)
    with torch.inference_mode(), phase(f"generation 0/{len(order)}"):
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            length = max(len(prompts[i]) for i in index)
            ids = torch.full((len(index), length), pad, dtype=torch.long)  # (b, L) left-padded
            mask = torch.zeros((len(index), length), dtype=torch.long)
            for row, i in enumerate(index):
                ids[row, length - len(prompts[i]):] = torch.as_tensor(prompts[i])
                mask[row, length - len(prompts[i]):] = 1
            with runtime.autocast():
                out = model.generate(input_ids=ids.to(runtime.device), attention_mask=mask.to(runtime.device),
                                     max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                     eos_token_id=stop, use_cache=True)
            decoded = tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
            for i, text in zip(index, decoded):
                texts[i] = text.strip()
            bar.update(len(index))
            done = min(start + batch_size, len(order))
            elapsed = time.perf_counter() - started
            log.info("generating %s: %d/%d prompts, %.0f s, ~%.0f s left", what, done, len(order), elapsed,
                     elapsed / done * (len(order) - done))
            update_phase(f"generation {done}/{len(order)}"
                         + (f", ~{duration(elapsed / done * (len(order) - done))} left" if done < len(order) else ""))
    bar.close()
    model.train(was_training)
    return texts


def prompt_room(model: nn.Module, max_new_tokens: int) -> int | None:
    """The longest prompt ``model`` can continue by ``max_new_tokens`` tokens (None: its positions are not limited)."""
    from fedlora.models.checks import max_positions

    limit = max_positions(model)
    if limit is None:
        return None
    if max_new_tokens >= limit:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's {limit} "
                         f"positions; use --max-new-tokens {limit // 2} or less")
    return limit - max_new_tokens


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return int(pad)


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[bos] for tokenizers that expect one and whose chat template does not write it (Llama-2 style base models)."""
    if tokenizer.bos_token_id is None or not getattr(tokenizer, "add_bos_token", False):
        return []
    if tokenizer.chat_template and tokenizer.bos_token and tokenizer.bos_token in tokenizer.chat_template:
        return []
    return [int(tokenizer.bos_token_id)]


def _end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id of what closes an assistant turn in the chat template (``<|im_end|>``, ``<|eot_id|>``...), when it
    is one token; generation stops there as well as at eos."""
    from fedlora.models.decoder import end_of_turn

    ids = tokenizer(end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None
