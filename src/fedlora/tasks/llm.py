"""The paper's LLM tasks: ``gsm8k`` (maths), ``mbpp`` and ``humaneval`` (code), and ``mathcode`` (both, domain-skewed).

Data: with ``--data-dir`` (or ``$FEDLORA_DATA_DIR``) the files are read from disk, never the
network: the folder may be the data root (``../shared/data``, holding ``gsm8k/``, ``mbpp/``,
``humaneval/``) or the task's own folder. Without one, the same data comes from the Hugging Face hub
(``openai/gsm8k`` config ``main``, ``google-research-datasets/mbpp`` config ``full``,
``openai/openai_humaneval``) through the same code after the first read.

* ``gsm8k``: train 7,473 / test 1,319. The model is trained on the worked solution (calculator
  annotations ``<<48/2=24>>`` removed) ending in ``#### n``; scored by exact match of the final
  number (:func:`~fedlora.tasks.scoring.last_number` vs the number after ``####``).
* ``mbpp``: the paper's split by task_id: train 601–974 (374), test 11–510 (500). The prompt is the
  task text and its three asserts (which name the function); the target is the reference solution
  in a fenced block. Scored by pass@1 of greedy decoding: the generated code runs with the asserts
  in the sandbox (:mod:`fedlora.sandbox`), never in this process.
* ``humaneval``: trains on MBPP's train split, tests on HumanEval's 164 problems (evaluation only).
* ``mathcode``: clients hold GSM8K and MBPP rows mixed by a Dirichlet over the two domains
  (``--alpha`` skews the domain mix): the realistic non-IID case for LLMs. Metrics per domain
  (``gsm8k/exact_match``, ``mbpp/pass@1``, each domain's loss) and ``domain_mean``, the mean of the
  two main metrics.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.util.progress import phase
from fedlora.tasks.base import register_task
from fedlora.tasks.causal_lm import COLUMNS, CausalLMTask

if TYPE_CHECKING:
    import datasets

    from fedlora.sandbox import TestProblem
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from fedlora.config.run import RunConfig
    from fedlora.models.runtime import Runtime

MBPP_TRAIN_IDS, MBPP_TEST_IDS = range(601, 975), range(11, 511)
CODE_TIMEOUT_S = 20.0  # per generated program: MBPP's slowest reference (task 123) takes ~9 s on a busy 2-core CPU


def find_file(data_dir: str | Path, folder: str, name: str) -> Path:
    """``data_dir/folder/name`` (data root given) or ``data_dir/name`` (the task's folder given)."""
    root = Path(data_dir).expanduser()
    for path in (root / folder / name, root / name):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} not found in {root / folder} or {root}; pass --data-dir the data root "
                            f"(e.g. ../shared/data, holding {folder}/) or the {folder} folder itself")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (optionally gzip); a malformed line, or one that is valid JSON but not an
    object (a string, number, list or null), is reported with its number."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number} is not valid JSON ({exc.msg}); each line must be one object") from None
                if not isinstance(row, dict):  # callers index rows by field name: a str or int would crash them
                    kind = "null" if row is None else {bool: "boolean", str: "string", list: "list"}.get(type(row), "number")
                    raise ValueError(f"{path}:{number} is a JSON {kind}, not an object; each line must be one object")
                rows.append(row)
    return rows


def local_dir(data_dir: str | Path | None) -> Path | None:
    from fedlora.tasks.glue.loading import resolve_data_dir

    return resolve_data_dir(data_dir)


def from_hub(*args: Any, **kwargs: Any) -> Any:
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # offline users get one line and a pointer to the local alternative
        from fedlora.tasks.glue.loading import hub_unavailable

        raise hub_unavailable(str(args[0]), exc, "a data folder such as ../shared/data") from None


def split(rows: list[dict[str, str]]) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS},
                                      features=datasets.Features({c: datasets.Value("string") for c in COLUMNS}))


# ---------------------------------------------------------------------------------------------- GSM8K
def gsm8k_row(question: str, answer: str) -> dict[str, str]:
    from fedlora.tasks.scoring import gsm8k_reference

    worked = re.sub(r"<<[^>]*>>", "", answer)  # calculator annotations: noise for a model that has no calculator
    return {"prompt": question.strip(), "response": worked.strip(), "reference": gsm8k_reference(answer),
            "domain": "gsm8k"}


@register_task("gsm8k")
class GSM8KTask(CausalLMTask):
    """Grade-school maths word problems; metric: exact match of the final number."""

    metric = "exact_match"
    summary = "grade-school maths word problems, trained on worked solutions; scored on the final number"
    data = ("openai/gsm8k `main` from the hub, or `--data-dir` holding gsm8k/train.jsonl and test.jsonl; "
            "train 7,473 / test 1,319")

    def data_files(self, data_dir: str | Path | None) -> list[Path]:
        root = local_dir(data_dir)
        return [] if root is None else [find_file(root, "gsm8k", f"{s}.jsonl") for s in ("train", "test")]

    def load(self, data_dir: str | Path | None) -> datasets.DatasetDict:
        import datasets

        root = local_dir(data_dir)
        if root is None:
            hub = from_hub("openai/gsm8k", "main")
            parts = {s: [dict(r) for r in hub[s]] for s in ("train", "test")}
        else:
            parts = {s: read_jsonl(find_file(root, "gsm8k", f"{s}.jsonl")) for s in ("train", "test")}
        return datasets.DatasetDict({s: split([gsm8k_row(r["question"], r["answer"]) for r in rows])
                                     for s, rows in parts.items()})

    def score(self, rows: list[dict[str, str]], generations: list[str]) -> tuple[dict[str, float], list[bool]]:
        from fedlora.tasks.scoring import last_number, numbers_equal

        correct = [numbers_equal(last_number(g), r["reference"]) for r, g in zip(rows, generations)]
        return {"exact_match": float(np.mean(correct)) if correct else 0.0}, correct


# ---------------------------------------------------------------------------------------------- code
def mbpp_row(problem: dict[str, Any]) -> dict[str, str]:
    code = problem["code"].replace("\r\n", "\n").strip()
    tests = "\n".join(problem["test_list"])
    from fedlora.tasks.scoring import shadowed_builtins

    reference = {"test_list": list(problem["test_list"]), "test_setup_code": problem.get("test_setup_code") or "",
                 "shadows": shadowed_builtins(problem["code"])}
    return {"prompt": f"{problem['text'].strip()}\nYour code should pass these tests:\n{tests}",
            "response": f"```python\n{code}\n```", "reference": json.dumps(reference), "domain": "mbpp"}


def humaneval_row(problem: dict[str, Any]) -> dict[str, str]:
    reference = {k: problem[k] for k in ("prompt", "test", "entry_point")}
    return {"prompt": f"Complete this Python function:\n```python\n{problem['prompt']}```",
            "response": f"```python\n{problem['prompt']}{problem['canonical_solution']}```",
            "reference": json.dumps(reference), "domain": "humaneval"}


def mbpp_problems(data_dir: str | Path | None) -> dict[str, list[dict[str, Any]]]:
    """MBPP's train (601–974) and test (11–510) problems, from disk or the hub."""
    root = local_dir(data_dir)
    if root is None:
        hub = from_hub("google-research-datasets/mbpp", "full")
        return {s: [dict(r) for r in hub[s]] for s in ("train", "test")}
    problems = read_jsonl(find_file(root, "mbpp", "mbpp.jsonl"))
    return {"train": [p for p in problems if p["task_id"] in MBPP_TRAIN_IDS],
            "test": [p for p in problems if p["task_id"] in MBPP_TEST_IDS]}


def run_code(problems: list[TestProblem], allow_unsandboxed: bool) -> list[bool]:
    """Whether each candidate passed its tests, as judged outside its sandbox (:func:`fedlora.sandbox.run_tests`)."""
    from fedlora.sandbox import Limits, run_tests

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # else tokenizers warns at each sandbox fork
    limits = Limits(timeout_s=CODE_TIMEOUT_S, cpu_s=int(CODE_TIMEOUT_S))
    with phase(f"running {len(problems)} generated programs"):
        return [r.passed for r in run_tests(problems, limits, allow_unsandboxed=allow_unsandboxed)]


@register_task("mbpp")
class MBPPTask(CausalLMTask):
    """Mostly Basic Python Problems; metric: pass@1 (greedy) of the generated function on the three asserts."""

    metric = "pass@1"
    summary = "Mostly Basic Python Problems: write the function; greedy pass@1 on its three asserts, run in the sandbox"
    data = ("google-research-datasets/mbpp `full` from the hub, or `--data-dir` holding mbpp/mbpp.jsonl; "
            "train task_ids 601–974 (374) / test 11–510 (500)")

    def preflight(self) -> None:
        """Refuse before loading anything when generated code would have to run outside the kernel sandbox."""
        if self.max_new_tokens > 0:
            from fedlora.sandbox import boundary_or_refuse

            boundary_or_refuse(self.allow_unsandboxed_code)

    def data_files(self, data_dir: str | Path | None) -> list[Path]:
        root = local_dir(data_dir)
        return [] if root is None else [find_file(root, "mbpp", "mbpp.jsonl")]

    def load(self, data_dir: str | Path | None) -> datasets.DatasetDict:
        import datasets

        problems = mbpp_problems(data_dir)
        return datasets.DatasetDict({s: split([mbpp_row(p) for p in ps]) for s, ps in problems.items()})

    def score(self, rows: list[dict[str, str]], generations: list[str]) -> tuple[dict[str, float], list[bool]]:
        from fedlora.tasks.scoring import extract_code, mbpp_problem

        refs = [json.loads(r["reference"]) for r in rows]
        passed = run_code([mbpp_problem(extract_code(g), ref["test_setup_code"], ref["test_list"], ref.get("shadows", ()))
                           for ref, g in zip(refs, generations)], self.allow_unsandboxed_code)
        return {"pass@1": float(np.mean(passed)) if passed else 0.0}, passed


@register_task("humaneval")
class HumanEvalTask(MBPPTask):
    """Trains on MBPP's train split; tests on HumanEval's 164 problems; metric: pass@1 (greedy)."""

    summary = "complete the function: trains on MBPP, greedy pass@1 on HumanEval's tests, run in the sandbox"
    data = ("train: MBPP's (as mbpp); test: openai/openai_humaneval from the hub, or `--data-dir` holding "
            "humaneval/HumanEval.jsonl.gz (164 problems)")

    def data_files(self, data_dir: str | Path | None) -> list[Path]:
        root = local_dir(data_dir)
        return [] if root is None else [find_file(root, "humaneval", "HumanEval.jsonl.gz"), *super().data_files(root)]

    def load(self, data_dir: str | Path | None) -> datasets.DatasetDict:
        import datasets

        root = local_dir(data_dir)
        if root is None:
            problems = [dict(r) for r in from_hub("openai/openai_humaneval")["test"]]
        else:
            problems = read_jsonl(find_file(root, "humaneval", "HumanEval.jsonl.gz"))
        train = split([mbpp_row(p) for p in mbpp_problems(data_dir)["train"]])
        return datasets.DatasetDict(train=train, test=split([humaneval_row(p) for p in problems]))

    def score(self, rows: list[dict[str, str]], generations: list[str]) -> tuple[dict[str, float], list[bool]]:
        from fedlora.tasks.scoring import humaneval_completion, humaneval_problem

        refs = [json.loads(r["reference"]) for r in rows]
        passed = run_code([humaneval_problem(ref["prompt"], humaneval_completion(ref["prompt"], g, ref["entry_point"]),
                                             ref["test"], ref["entry_point"]) for ref, g in zip(refs, generations)],
                          self.allow_unsandboxed_code)
        return {"pass@1": float(np.mean(passed)) if passed else 0.0}, passed


# ---------------------------------------------------------------------------------------------- domains
@register_task("mathcode")
class MathCodeTask(CausalLMTask):
    """GSM8K + MBPP; ``--alpha`` skews each client's domain mix; metrics per domain and their mean."""

    metric = "domain_mean"
    summary = "GSM8K and MBPP rows mixed; `--alpha` skews each client's domain mix; metrics per domain and their mean"
    data = "gsm8k's and mbpp's (as those tasks), concatenated: train 7,847 / test 1,819"

    def __init__(self) -> None:
        self.domains: dict[str, CausalLMTask] = {"gsm8k": GSM8KTask(), "mbpp": MBPPTask()}

    def configure(self, config: RunConfig) -> MathCodeTask:
        task = super().configure(config)
        assert isinstance(task, MathCodeTask)
        task.domains = {name: sub.configure(config) for name, sub in self.domains.items()}
        return task

    def data_files(self, data_dir: str | Path | None) -> list[Path]:
        return [path for sub in self.domains.values() for path in sub.data_files(data_dir)]

    def load(self, data_dir: str | Path | None) -> datasets.DatasetDict:
        import datasets

        parts = {name: sub.load(data_dir) for name, sub in self.domains.items()}
        return datasets.DatasetDict({s: datasets.concatenate_datasets([p[s] for p in parts.values()])
                                     for s in ("train", "test")})

    def preflight(self) -> None:
        for sub in self.domains.values():
            sub.preflight()

    def partition_key(self, train: datasets.Dataset) -> np.ndarray:
        """The domain index of each row (0: gsm8k, 1: mbpp)."""
        names = list(self.domains)
        return np.array([names.index(d) for d in train["domain"]], dtype=np.int64)

    def evaluate(self, model: nn.Module, data: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                 runtime: Runtime, samples: list[dict[str, Any]] | None = None) -> dict[str, float]:
        """Each domain's rows scored by its own task; ``loss`` and ``domain_mean`` average the domains present."""
        metrics: dict[str, float] = {}
        mains, losses = [], []
        domain = np.asarray(data["domain"])
        for name, sub in self.domains.items():
            rows = np.flatnonzero(domain == name)
            if len(rows) == 0:
                continue
            scored = sub.evaluate(model, data.select(rows), tokenizer, runtime, samples)
            metrics.update({f"{name}/{k}": v for k, v in scored.items() if k != "main"})
            mains.append(scored["main"])
            losses.append(scored["loss"])
        metrics["loss"] = float(np.mean(losses)) if losses else float("nan")
        metrics["domain_mean"] = metrics["main"] = float(np.mean(mains)) if mains else 0.0
        return metrics

    def score(self, rows: list[dict[str, str]], generations: list[str]) -> tuple[dict[str, float], list[bool]]:
        raise NotImplementedError("mathcode scores each domain with its own task (see evaluate)")
