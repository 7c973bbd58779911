"""The decoder-LLM tasks (gsm8k, mbpp, humaneval, mathcode, instruct): data, encoding, training, evaluation.

Properties rather than smoke: the loss is on the response tokens only; gradient accumulation gives
the update of the whole batch; batched left-padded generation equals one prompt at a time; the
teacher-forced loss equals transformers' own; the reference answers score 1 through the task's
scoring (so prompt, reference and program assembly fit together) and a wrong answer 0; quantity
and domain skews split as documented. Models: the tiny random GQA Llama of conftest.py (non-square
v_proj), the real SmolLM2-135M only in test_end_to_end_llm.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.aggregation import get_method
from fedlora.config.run import ConfigError, RunConfig
from fedlora.tasks.partitioning import quantity_partition
from fedlora.models.runtime import resolve_runtime
from fedlora.tasks import get_task
from fedlora.tasks.causal_lm import IGNORE, generate, teacher_forced
from fedlora.models.training import train_local

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "gsm8k").is_dir(), reason=f"{DATA} not found (../shared beside the repo)")
CPU = resolve_runtime("cpu", "fp32")


@pytest.fixture(scope="module")
def tiny(tiny_llama_path):
    return get_task("gsm8k").build_model(tiny_llama_path, 4, 8.0, (), seed=0)


@pytest.fixture(scope="module")
def gsm8k():
    if not (DATA / "gsm8k").is_dir():
        pytest.skip(f"{DATA} not found")
    return get_task("gsm8k").load(DATA)


# -- data -------------------------------------------------------------------------------------------
@needs_data
def test_gsm8k_mbpp_humaneval_load_the_documented_splits_from_the_root_or_their_folder(gsm8k) -> None:
    assert (len(gsm8k["train"]), len(gsm8k["test"])) == (7473, 1319)
    assert get_task("gsm8k").load(DATA / "gsm8k")["test"][0] == gsm8k["test"][0]  # folder or root: same rows
    row = gsm8k["train"][0]
    assert "<<" not in row["response"] and row["response"].endswith(f"#### {row['reference']}")
    mbpp = get_task("mbpp").load(DATA)
    assert (len(mbpp["train"]), len(mbpp["test"])) == (374, 500)
    assert "assert " in mbpp["test"][0]["prompt"] and mbpp["test"][0]["response"].startswith("```python\n")
    humaneval = get_task("humaneval").load(DATA)
    assert (len(humaneval["train"]), len(humaneval["test"])) == (374, 164)


def test_a_missing_data_file_names_the_paths_tried(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train.jsonl not found in .*gsm8k"):
        get_task("gsm8k").load(tmp_path)


@needs_data
def test_reference_answers_score_one_and_wrong_answers_zero_through_each_task() -> None:
    gsm, mbpp, humaneval = (get_task(t).load(DATA)["test"].select(range(6)) for t in ("gsm8k", "mbpp", "humaneval"))
    rows = gsm.to_list()
    assert get_task("gsm8k").score(rows, [r["response"] for r in rows])[0] == {"exact_match": 1.0}
    assert get_task("gsm8k").score(rows, ["The answer is 0.5."] * 6)[0] == {"exact_match": 0.0}
    for name, data in (("mbpp", mbpp), ("humaneval", humaneval)):
        rows = data.to_list()
        metrics, passed = get_task(name).score(rows, [r["response"] for r in rows])  # the reference, in its fence
        assert metrics == {"pass@1": 1.0} and all(passed), name
        assert get_task(name).score(rows, ["def f():\n    pass"] * 6)[0] == {"pass@1": 0.0}, name


@needs_data
def test_mathcode_mixes_the_domains_and_alpha_skews_each_clients_mix() -> None:
    task = get_task("mathcode")
    data = task.load(DATA)
    keys = task.partition_key(data["train"])
    assert np.bincount(keys).tolist() == [7473, 374]
    from fedlora.tasks.partitioning import partition

    parts = partition(data["train"], 4, 0.1, seed=0, keys=keys)
    shares = [np.mean(np.asarray(p["domain"]) == "mbpp") for p in parts]
    iid = np.mean(keys)  # 0.048
    assert max(shares) > 3 * iid  # some client holds far more code than the pool does


def test_quantity_skew_is_a_disjoint_cover_with_unequal_sizes_and_deterministic() -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"x": list(range(1000))})
    parts = quantity_partition(ds, 10, 0.3, seed=1)
    rows = np.concatenate([p["x"] for p in parts])
    assert sorted(rows.tolist()) == list(range(1000))  # every row once
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 2 and max(sizes) > 3 * 1000 / 10  # skewed, and nobody empty
    assert [p["x"] for p in quantity_partition(ds, 10, 0.3, seed=1)] == [p["x"] for p in parts]
    flat = [len(p) for p in quantity_partition(ds, 10, 1000.0, seed=1)]
    assert max(flat) < 1.5 * 100  # a large alpha is nearly equal


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_instruct_detects_fields_joins_alpaca_input_and_names_a_bad_row(tmp_path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)}
                                           for i in range(20)] + [{"instruction": "Sum", "input": "2 3", "output": "5"}])
    data = get_task("instruct").load(tmp_path)
    assert (len(data["train"]), len(data["test"])) == (19, 2)  # a fixed 10% held out
    assert {"prompt": "Sum\n\n2 3", "response": "5"}.items() <= next(
        r for r in [*data["train"], *data["test"]] if r["response"] == "5" and "Sum" in r["prompt"]).items()
    task = get_task("instruct").configure(RunConfig(task="instruct", data_dir=str(tmp_path), prompt_field="q",
                                                    alpha=None))
    with pytest.raises(ValueError, match=r"train.jsonl:1 has no prompt text .*--prompt-field q"):
        task.load(tmp_path)
    with pytest.raises(ValueError, match="pass --data-dir"):
        get_task("instruct").load(None)


def test_instruct_scores_token_accuracy_or_exact_match_when_asked(tmp_path) -> None:
    plain = get_task("instruct").configure(RunConfig(task="instruct"))
    asked = get_task("instruct").configure(RunConfig(task="instruct", exact_match=True))
    assert (plain.metric, plain.generates) == ("token_accuracy", False)
    assert (asked.metric, asked.generates) == ("exact_match", True)
    assert get_task("instruct").metric == "token_accuracy"  # the registered instance is untouched
    rows = [{"reference": "Paris"}, {"reference": "4"}]
    assert asked.score(rows, ["  paris ", "5"]) == ({"exact_match": 0.5}, [True, False])


# -- encoding and training ---------------------------------------------------------------------------
@needs_data
def test_the_loss_is_on_the_response_only_and_the_prompt_is_what_generation_starts_from(tiny, gsm8k) -> None:
    model, tokenizer = tiny
    task = get_task("gsm8k")
    enc = task.encode(gsm8k["test"].select(range(8)), tokenizer, max_length=512)
    for row in enc:
        n = len(row["prompt_ids"])
        assert row["input_ids"][:n] == row["prompt_ids"]
        assert row["labels"][:n] == [IGNORE] * n and row["labels"][n:] == row["input_ids"][n:]
        assert tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")
        assert tokenizer.decode(row["input_ids"][n:]).endswith("<|im_end|>")  # the model learns to stop
    short = task.encode(gsm8k["test"].select(range(8)), tokenizer, max_length=64)
    for row, full in zip(short, enc):
        response = sum(y != IGNORE for y in full["labels"])
        assert len(row["input_ids"]) <= 64 and sum(y != IGNORE for y in row["labels"]) >= min(32, response)
        kept = sum(y == IGNORE for y in row["labels"])  # the training row's prompt is cut from the left...
        assert row["input_ids"][:kept] == full["prompt_ids"][len(full["prompt_ids"]) - kept:]
        assert row["prompt_ids"] == full["prompt_ids"]  # ...the generation prompt is not: no answer to make room for


@needs_data
def test_no_generation_prompt_is_cut_for_the_reference_answers_length(smollm2_path) -> None:
    """HumanEval at the default --max-length 512 lost 21 of 164 prompts' chat header, imports or signature
    (and MBPP one) to the reference answer's budget; every prompt here is shorter than the model's room."""
    from transformers import AutoTokenizer

    from fedlora.models.decoder import format_prompt

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    for name in ("humaneval", "mbpp"):
        test = get_task(name).load(DATA)["test"]
        encoded = get_task(name).encode(test, tokenizer, max_length=512)
        whole = tokenizer([format_prompt(tokenizer, p) for p in test["prompt"]], add_special_tokens=False)["input_ids"]
        cut = [i for i, (ids, w) in enumerate(zip(encoded["prompt_ids"], whole)) if list(ids) != w]
        assert cut == [], f"{name}: {len(cut)} of {len(test)} generation prompts cut"
        assert max(len(ids) for ids in encoded["input_ids"]) <= 512  # the training rows keep their budget


def test_generation_cuts_only_what_exceeds_the_models_positions(tiny) -> None:
    model, tokenizer = tiny  # 512 positions
    rng = np.random.default_rng(0)
    long = rng.integers(100, 1000, size=600).tolist()
    assert generate(model, tokenizer, [long], 4, CPU, batch_size=1) == generate(model, tokenizer, [long[-508:]], 4, CPU, 1)
    with pytest.raises(ValueError, match="--max-new-tokens 512 leaves no room for a prompt in the model's 512 positions"):
        generate(model, tokenizer, [long[:10]], 512, CPU, batch_size=1)


@needs_data
def test_gradient_accumulation_gives_the_whole_batchs_update(tiny, gsm8k) -> None:
    model, tokenizer = tiny
    task = get_task("gsm8k")
    enc = task.encode(gsm8k["train"].select(range(4)), tokenizer, max_length=96)
    batch = task.collate(tokenizer)([enc[i] for i in range(4)])
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    after = []
    for pieces in (1, 2, 4):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        train_local(model, iter([batch]), 1, 1e-2, get_method("fedit").policy, seed=0, runtime=CPU,
                    micro_batches=pieces, loss_weight=task.loss_weight)
        after.append({n: p.detach().clone() for n, p in model.named_parameters() if n in start})
    for other in after[1:]:
        for n in start:
            assert torch.allclose(other[n], after[0][n], atol=1e-6), n
    assert any(not torch.equal(after[0][n], start[n]) for n in start)  # it did train


@needs_data
def test_teacher_forced_loss_equals_transformers_own(tiny, gsm8k) -> None:
    model, tokenizer = tiny
    task = get_task("gsm8k")
    enc = task.encode(gsm8k["test"].select(range(3)), tokenizer, max_length=128)
    ours = teacher_forced(model, enc, task.collate(tokenizer), CPU, batch_size=2)
    batch = task.collate(tokenizer)([enc[i] for i in range(3)])
    with torch.no_grad():
        theirs = float(model(**batch).loss)  # mean over the batch's supervised tokens
    assert ours["loss"] == pytest.approx(theirs, rel=1e-5)
    assert 0 <= ours["token_accuracy"] <= 1 and ours["perplexity"] == pytest.approx(np.exp(ours["loss"]), rel=1e-6)


@needs_data
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny, gsm8k) -> None:
    model, tokenizer = tiny
    enc = get_task("gsm8k").encode(gsm8k["test"].select(range(5)), tokenizer, max_length=256)
    prompts = enc["prompt_ids"]
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    batched = generate(model, tokenizer, prompts, 6, CPU, batch_size=5)
    alone = [generate(model, tokenizer, [p], 6, CPU, batch_size=1)[0] for p in prompts]
    assert batched == alone


@needs_data
def test_evaluate_writes_samples_and_caps_generations(tiny, gsm8k) -> None:
    model, tokenizer = tiny
    config = RunConfig(task="gsm8k", max_new_tokens=4, max_eval_generations=2)
    task = get_task("gsm8k").configure(config)
    enc = task.encode(gsm8k["test"].select(range(5)), tokenizer, max_length=256)
    samples: list[dict] = []
    metrics = task.evaluate(model, enc, tokenizer, CPU, samples)
    assert set(metrics) >= {"loss", "perplexity", "token_accuracy", "exact_match", "main"}
    assert metrics["main"] == metrics["exact_match"] and len(samples) == 2
    assert set(samples[0]) == {"domain", "prompt", "reference", "generation", "correct"}
    no_gen = get_task("gsm8k").configure(config.replace(max_new_tokens=0)).evaluate(model, enc, tokenizer, CPU)
    assert "exact_match" not in no_gen and no_gen["main"] == no_gen["token_accuracy"]


def test_a_max_new_tokens_the_model_cannot_hold_is_refused_when_the_model_is_built(tiny_llama_path) -> None:
    from fedlora.tasks.build import build_model

    with pytest.raises(ValueError, match="--max-new-tokens 512 leaves no room"):
        build_model(RunConfig(task="gsm8k", model=tiny_llama_path, max_new_tokens=512))


# -- config ------------------------------------------------------------------------------------------
def test_quantised_bases_refuse_methods_that_merge_into_the_frozen_weights() -> None:
    for method in ("fedex-lora", "flora"):
        with pytest.raises(ConfigError, match="4-bit"):
            RunConfig(task="gsm8k", method=method, load_in_4bit=True)
    RunConfig(task="gsm8k", method="flora-na", load_in_4bit=True)  # allowed by the config; the loader checks CUDA


def test_llm_options_are_validated_up_front() -> None:
    with pytest.raises(ConfigError, match="grad-accum"):
        RunConfig(batch_size=4, grad_accum=3)
    with pytest.raises(ConfigError, match="skew"):
        RunConfig(skew="labels")
    with pytest.raises(ConfigError, match="max-new-tokens"):
        RunConfig(max_new_tokens=-1)
    assert RunConfig(target_modules=("auto",)).target_modules == ()
    with pytest.raises(ConfigError, match="decoder-LLM tasks only"):
        RunConfig(task="sst2", load_in_4bit=True)
