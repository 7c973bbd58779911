"""One frozen, validated configuration per federated run (local engine and Flower alike).

Every field is declared exactly once, here, with its section, default and help
(:func:`fedlora.config.schema.option`); the ``fedlora run`` flags, the Flower app config keys
and the data-cache key are derived from these declarations (tests fail if pyproject.toml's
``[tool.flwr.app.config]`` drifts from them). Every value is checked when the config is built,
method options included, before any model or data is loaded, with a message that names the
option and the accepted values: a run that starts will not die on a typo later.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config.privacy import validate_privacy
from fedlora.config.schema import option


class ConfigError(ValueError):
    """An invalid option; the message names it and what is accepted."""


def parse_alpha(text: str) -> float | None:
    """``"iid"`` → None (IID split), else the Dirichlet concentration."""
    return None if text.strip().lower() == "iid" else float(text)


def parse_optional_int(text: str) -> int | None:
    """``""``, ``"all"`` or ``"auto"`` → None (no cap / the task's default), else the integer.

    ``"0"`` is the integer 0, which validation refuses: "no cap" is spelled ``all`` on the command line,
    in TOML and in Flower's config alike, as the Python API spells it None (or ``"all"``)."""
    return None if text.strip().lower() in ("", "all", "none", "auto") else int(text)


def parse_optional_str(text: str) -> str | None:
    return text or None


def parse_modules(text: str) -> tuple[str, ...]:
    """``"q_proj v_proj"`` or ``"q_proj,v_proj"`` → names; ``"auto"`` or ``""`` → () (PEFT's default)."""
    names = tuple(text.replace(",", " ").split())
    return () if names in ((), ("auto",)) else names


def parse_ranks(text: str) -> tuple[int, ...]:
    """``"2 4 8"`` or ``"2,4,8"`` → (2, 4, 8); ``""`` or ``"none"`` → () (every client at --rank)."""
    words = text.replace(",", " ").split()
    return () if words in ([], ["none"]) else tuple(int(w) for w in words)


def _show_auto(value: Any) -> Any:
    return "auto" if value is None else value


def _task_names() -> list[str]:
    from fedlora.tasks import available_tasks

    return available_tasks()


def _method_names() -> list[str]:
    from fedlora.aggregation import available_methods

    return available_methods()


@dataclass(frozen=True)
class RunConfig:
    """Everything one run depends on, frozen and validated in ``__post_init__`` before anything loads.

    Every field is declared once with :func:`option` (its section, default, help text, parser, and whether
    it keys the tokenised-data cache); the CLI flags, TOML keys, Flower run-config keys and the model
    card's command line are all derived from these declarations (:mod:`fedlora.config.schema`), and a
    test fails when they drift. A run is deterministic given this object, its seed included.
    """

    # -- data: what each client holds (data=True: part of the tokenised-data cache key)
    task: str = option("sst2", "data", lambda: f"task: {', '.join(_task_names())}", data=True)
    data_dir: str | None = option(None, "data", "local data folder (GLUE layout for GLUE tasks); unset: "
                                  "$FEDLORA_DATA_DIR, else the Hugging Face hub", parse=parse_optional_str, data=True)
    max_length: int | None = option(None, "data", "tokens per example, longer ones are truncated ('auto': the task's "
                                    "default: 64 for GLUE, 512 for the LLM tasks)", parse=parse_optional_int,
                                    show=_show_auto, data=True)
    skew: str = option("auto", "data", "what --alpha skews: 'key' = the mix of the task's partition key (GLUE: "
                       "labels; mathcode: domains), 'quantity' = client sizes (Dirichlet over clients, rows IID), "
                       "'auto' = key if the task has one, else quantity", data=True)
    prompt_field: str = option("", "data", "instruct task: the prompt column of your JSON lines (unset: auto-detect "
                               "prompt/instruction/question/input)", data=True)
    response_field: str = option("", "data", "instruct task: the response column (unset: auto-detect "
                                 "response/output/answer/completion)", data=True)
    # -- model and LoRA
    model: str | None = option(None, "model", "hub id or local path; unset: the task's bundled default model",
                               parse=parse_optional_str)
    rank: int = option(8, "model", "LoRA rank r")
    lora_alpha: float = option(16.0, "model", "LoRA alpha (the update is scaled by alpha / r)")
    client_ranks: tuple[int, ...] = option((), "model", "per-client LoRA ranks <= --rank: one per client, or a list "
                                           "each client's rank is drawn from (seeded); unset: every client trains "
                                           "--rank", many=True, metavar="R", parse=lambda text: parse_ranks(text),
                                           show=lambda v: " ".join(map(str, v)))
    rank_map: str = option("truncate", "model", "how the server's rank-R adapter reaches a lower-rank client: "
                           "'truncate' (HetLoRA: its first r components) or 'svd' (FlexLoRA: best rank-r "
                           "approximation of the product)")
    target_modules: tuple[str, ...] = option((), "model", "names of the Linear layers LoRA adapts ('auto': PEFT's "
                                             "default for the model type: query value on BERT, q_proj v_proj on "
                                             "Llama/Qwen/Mistral)", many=True, metavar="NAME", parse=parse_modules,
                                             show=lambda v: " ".join(v) or "auto")
    load_in_4bit: bool = option(False, "model", "QLoRA: load the frozen base in 4 bit (CUDA + bitsandbytes only; "
                                "methods that merge into the frozen weights are refused)")
    # -- training on each client, each round
    local_steps: int = option(10, "training", "optimizer steps per client per round")
    batch_size: int = option(32, "training", "examples per step")
    lr: float = option(5e-3, "training", "AdamW learning rate on LoRA and head (fresh optimizer each round)")
    grad_accum: int = option(1, "training", "micro-batches per step: --batch-size rows are processed in this many "
                             "pieces (same update, less memory)")
    gradient_checkpointing: bool = option(False, "training", "recompute activations in the backward pass (less "
                                          "memory, ~30% slower; models that support it)")
    lora_dropout: float = option(0.0, "training", "dropout on the LoRA branch's input (PEFT's lora_dropout; 0: off)")
    weight_decay: float = option(0.0, "training", "AdamW decoupled weight decay on the LoRA factors and head")
    lr_schedule: str = option("constant", "training", "learning-rate schedule over the whole run's rounds x "
                              "local steps: constant, linear or cosine (decay to 0; transformers' formulas)")
    warmup_steps: int = option(0, "training", "linear lr warm-up over the run's first N optimizer steps (counted "
                               "as round x local step, like --lr-schedule)")
    max_grad_norm: float = option(0.0, "training", "clip the gradients' global L2 norm to this before each step "
                                  "(fp16: after unscaling); 0: no clipping")
    client_batch: int | None = option(1, "training", "clients trained together, one forward/backward through the "
                                      "frozen model per local step (local engine; Flower trains one client per "
                                      "node): K, or 'auto' (CUDA: the whole round, halved on out-of-memory; CPU: 1)",
                                      parse=parse_optional_int, show=_show_auto)
    # -- federation
    # The default is the frontier's pick at FedIT's bytes (docs/results.md, "The frontier"); flora-na is the paper's method.
    method: str = option("flora-na-stable", "federation", lambda: f"aggregation method: {', '.join(_method_names())}")
    method_options: dict[str, Any] = option({}, "federation", "method option, repeatable, e.g. solver=adamw "
                                            "(each method's options: README, Methods)", pairs=True)
    rounds: int = option(20, "federation", "federated rounds")
    clients: int = option(10, "federation", "number of clients", data=True)
    alpha: float | None = option(0.5, "federation", "Dirichlet concentration over the task's partition key "
                                 "(labels), or 'iid'", parse=parse_alpha,
                                 show=lambda v: "iid" if v is None else v, data=True)
    fraction: float = option(1.0, "federation", "share of clients sampled each round")
    min_clients: int = option(1, "federation", "rounds with fewer valid client updates are skipped")
    clip_factor: float = option(3.0, "federation", "clip each client's update (factors and head) to this many times "
                                "the round's median update norm; 0: off (README, Failure modes)")
    seed: int = option(0, "federation", "seed of everything: partition, init, batches, client sampling", data=True)
    # -- privacy: user-level differential privacy (DP-FedAvg; docs/privacy.md)
    dp_clip: float = option(0.0, "privacy", "user-level DP: clip each client's update (uploaded factors and head, "
                            "jointly) to this L2 norm C, and add Gaussian noise to their sum; 0: no DP")
    dp_epsilon: float = option(0.0, "privacy", "the run's privacy budget ε: without --dp-noise, the noise is calibrated "
                               "so --rounds rounds spend exactly ε; with it, the run stops before ε is exceeded; 0: none")
    dp_noise: float = option(0.0, "privacy", "noise multiplier z (the sum's noise has std z·C); 0: calibrated from "
                             "--dp-epsilon")
    dp_delta: float = option(1e-5, "privacy", "δ of the (ε, δ) guarantee; below 1 / --clients")
    dp_sgd_clip: float = option(0.0, "privacy", "record-level DP-SGD inside each client (Opacus): clip every example's "
                                "gradient (LoRA factors and head) to this L2 norm and add Gaussian noise; 0: off")
    dp_sgd_epsilon: float = option(0.0, "privacy", "record-level budget ε (every client's, at --dp-sgd-delta): calibrates "
                                   "the noise over --rounds x --local-steps steps, or with --dp-sgd-noise stops the run "
                                   "before it is exceeded; 0: none")
    dp_sgd_noise: float = option(0.0, "privacy", "record-level noise multiplier z; 0: calibrated from --dp-sgd-epsilon")
    dp_sgd_delta: float = option(1e-5, "privacy", "δ of the record-level guarantee; below 1 / the smallest client's "
                                 "training examples")
    # -- evaluation
    divergence: str = option("every", "evaluation", "aggregation divergence report: 'every' round, every N rounds "
                             "(and the last), or 'off' (not measured: the record's divergence is null)",
                             metavar="every|N|off")
    eval_local_every: int = option(5, "evaluation", "rounds between local (personalised) evaluations; 0: never")
    local_test_fraction: float = option(0.2, "evaluation", "share of each client's data held out as its local test",
                                        data=True)
    max_eval_examples: int | None = option(None, "evaluation", "cap on the global test set ('all': no cap)",
                                           parse=parse_optional_int, show=lambda v: "all" if v is None else v)
    max_local_eval_examples: int = option(200, "evaluation", "cap on each client's local test split", data=True)
    max_new_tokens: int = option(256, "evaluation", "LLM tasks: tokens generated per test prompt (greedy); 0: "
                                 "teacher-forced loss only, no generation")
    max_eval_generations: int | None = option(None, "evaluation", "LLM tasks: generate for at most this many of "
                                              "the evaluated examples (the teacher-forced loss uses all; 'all': no cap)",
                                              parse=parse_optional_int, show=lambda v: "all" if v is None else v)
    exact_match: bool = option(False, "evaluation", "instruct task: also generate and score exact match against the "
                               "response (gsm8k, mbpp and humaneval always generate)")
    allow_unsandboxed_code: bool = option(False, "evaluation", "mbpp/humaneval/mathcode: run generated code even where "
                                          "the kernel sandbox (bubblewrap + cgroup) cannot be set up; the code can "
                                          "then read and change your files: at your own risk (README, Sandbox)")
    log_to: str = option("", "evaluation", "also log every round's metrics to tensorboard, wandb or mlflow "
                         "(several: comma-separated; unset: off)")
    # -- runtime
    device: str = option("auto", "runtime", "auto, cpu, cuda, cuda:N or mps (auto: cuda when available)")
    precision: str = option("fp32", "runtime", "fp32, bf16 or fp16: autocast for training and evaluation "
                            "(frozen-weight merges stay float32)")
    out: str = option("runs/latest", "runtime", "run directory: config.json, metrics.jsonl, plots, the adapter")

    def __post_init__(self) -> None:
        _validate(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> RunConfig:
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"config.json has unknown options {unknown}; known: {sorted(known)}")
        if "target_modules" in raw:
            raw["target_modules"] = tuple(raw["target_modules"])
        return RunConfig(**raw)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_sampled(self) -> int:
        return max(1, round(self.fraction * self.clients))


def divergence_due(setting: str, round_: int, rounds: int) -> bool:
    """Whether round ``round_`` of ``rounds`` measures the divergence under ``--divergence`` ``setting``.

    'every': each round; 'off': never; N: rounds N, 2N, … and the last (so a run's final divergence is
    always known unless it is off). Measuring costs the server an SVD-sized step per round (issue 23 §2).
    """
    if setting == "off":
        return False
    if setting == "every":
        return True
    return round_ % int(setting) == 0 or round_ >= rounds


PRECISIONS = ("fp32", "bf16", "fp16")
SKEWS = ("auto", "key", "quantity")
CAPS = ("max_eval_examples", "max_eval_generations")  # None (spelled all) is no cap; 0 is refused, not "all"
# A cheap bound before loading: far above any LoRA rank in use, below what would allocate absurd factors.
# The real bound, min(d, k) of the adapted layers, is checked once the model is built
# (fedlora.models.checks.check_rank), before any training.
MAX_RANK = 4096
# What each field's declared type accepts, by kind: a value of another type (JSON null, a TOML boolean
# for a string...) is refused in one line here, instead of crashing later checks with a traceback.
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "text"),
    "int": (lambda v: _is_int(v), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "tuple": (lambda v: isinstance(v, (tuple, list)), "a list"),
    "dict": (lambda v: isinstance(v, dict), "a table of KEY=VALUE options"),
}


def _require(ok: bool, option: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"--{option.replace('_', '-')}={value!r} is invalid: {accepted}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_types(c: RunConfig) -> None:
    """Every field holds a value of its declared type (``X | None``: None too); ``"all"`` for a cap is None."""
    for name in CAPS:
        if isinstance(getattr(c, name), str) and getattr(c, name).strip().lower() == "all":
            object.__setattr__(c, name, None)  # the Python API may spell "no cap" as the flag does
    for f in dataclasses.fields(c):
        declared = str(f.type).replace(" ", "")
        optional = declared.endswith("|None")
        kind = declared.removesuffix("|None").split("[")[0]
        value = getattr(c, f.name)
        if kind not in _KINDS or (optional and value is None):
            continue
        ok, what = _KINDS[kind]
        if not ok(value):
            unset = " or unset (null / \"\")" if optional else ""
            got = "null" if value is None else type(value).__name__
            _require(False, f.name, value, f"must be {what}{unset}, not {got}")


# Names only: the trackers themselves live in fedlora.runs.trackers and are imported when a run opens them.
TRACKERS = ("tensorboard", "wandb", "mlflow")
LR_SCHEDULES = ("constant", "linear", "cosine")  # fedlora.models.optim.lr_factor implements them


def check_trackers(names: str | Iterable[str]) -> tuple[str, ...]:
    """``names`` ("tensorboard,wandb", or a list) validated against :data:`TRACKERS` (ConfigError naming the bad one)."""
    names = tuple(names.replace(",", " ").split()) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"--log-to {' '.join(unknown)}: unknown tracker; use any of {', '.join(TRACKERS)}")
    return names


def _validate(c: RunConfig) -> None:
    from fedlora.aggregation import AggregationError, available_methods, get_method
    from fedlora.tasks import available_tasks, get_task

    _check_types(c)

    try:
        task = get_task(c.task)
    except (KeyError, ValueError):
        _require(False, "task", c.task, f"use one of {', '.join(available_tasks())}")
    for name in ("load_in_4bit", "gradient_checkpointing"):
        _require(not getattr(c, name) or name in task.model_options, name, getattr(c, name),
                 f"is implemented for the decoder-LLM tasks only, not {task.name!r}")
    _require(c.method in available_methods(), "method", c.method, f"use one of {', '.join(available_methods())}")
    try:
        checked = get_method(c.method).check_options(c.method_options)
    except AggregationError as exc:
        raise ConfigError(f"--method-option: {exc}") from None
    object.__setattr__(c, "method_options", checked)  # typed values ("200" -> 200), still frozen afterwards
    _validate_ranks(c)
    if isinstance(c.target_modules, (tuple, list)):
        object.__setattr__(c, "target_modules", parse_modules(" ".join(map(str, c.target_modules))))
    _require(_is_number(c.clip_factor) and c.clip_factor >= 0, "clip_factor", c.clip_factor,
             "must be a finite number >= 0 (0: no clipping)")
    for name in ("rounds", "clients", "local_steps", "batch_size", "rank", "min_clients", "grad_accum"):
        value = getattr(c, name)
        _require(_is_int(value) and value >= 1, name, value, "must be an integer >= 1")
    _require(_is_int(c.seed), "seed", c.seed, "must be an integer")
    _require(c.rank <= MAX_RANK, "rank", c.rank, f"must be <= {MAX_RANK} (and at most the adapted layers' "
             "min(d, k), checked when the model is built)")
    for f in dataclasses.fields(c):  # any float option, today's and future ones: inf/nan trains nothing sensible
        value = getattr(c, f.name)
        _require(not isinstance(value, float) or math.isfinite(value), f.name, value, "must be a finite number")
    _require(c.alpha is None or (_is_number(c.alpha) and c.alpha > 0), "alpha", c.alpha,
             "the Dirichlet concentration must be a finite number > 0 (or 'iid')")
    _require(_is_number(c.fraction) and 0 < c.fraction <= 1, "fraction", c.fraction,
             "the share of clients per round must be in (0, 1]")
    _require(c.min_clients <= c.num_sampled, "min_clients", c.min_clients,
             f"more than the {c.num_sampled} client(s) sampled per round (--clients {c.clients} x --fraction "
             f"{c.fraction}): every round would be skipped and nothing trained; lower it or sample more clients")
    _require(_is_number(c.lr) and c.lr > 0, "lr", c.lr, "the learning rate must be a finite number > 0")
    _require(_is_number(c.lora_alpha) and c.lora_alpha > 0, "lora_alpha", c.lora_alpha,
             "must be a finite number > 0 (the LoRA scaling is lora_alpha / rank)")
    _require(c.max_length is None or (_is_int(c.max_length) and c.max_length >= 8), "max_length", c.max_length,
             "must be an integer >= 8 (or 'auto'): a sentence pair takes 3 special tokens ([CLS] a [SEP] b "
             "[SEP]) plus a few of each sentence, and below that the tokenizer cannot truncate a pair at all")
    _require(c.batch_size % c.grad_accum == 0, "grad_accum", c.grad_accum,
             f"must divide --batch-size={c.batch_size} (each micro-batch holds batch_size / grad_accum rows)")
    _require(c.skew in SKEWS, "skew", c.skew, f"use one of {', '.join(SKEWS)}")
    _require(all(isinstance(m, str) and m for m in c.target_modules), "target_modules", c.target_modules,
             "names of Linear layers, e.g. query value (or auto)")
    for name in CAPS:
        _require(getattr(c, name) is None or (_is_int(getattr(c, name)) and getattr(c, name) >= 1), name,
                 getattr(c, name), "must be an integer >= 1, or all for no cap (0 is not 'no cap': write all)")
    _require(_is_int(c.max_new_tokens) and c.max_new_tokens >= 0, "max_new_tokens", c.max_new_tokens,
             "must be an integer >= 0 (0: no generation)")
    for name in ("gradient_checkpointing", "load_in_4bit", "exact_match", "allow_unsandboxed_code"):
        _require(isinstance(getattr(c, name), bool), name, getattr(c, name), "must be true or false")
    if c.load_in_4bit and get_method(c.method).policy.merges_into_base:
        _require(False, "load_in_4bit", c.load_in_4bit,
                 f"--method {c.method} merges each round's residual into the frozen weights, which are 4-bit here "
                 "and cannot take it; use a method that does not ("
                 + ", ".join(m for m in available_methods() if not get_method(m).policy.merges_into_base)
                 + ") or drop --load-in-4bit")
    _require(isinstance(c.divergence, str) and (c.divergence in ("every", "off") or
             (c.divergence.isdigit() and int(c.divergence) >= 1)), "divergence", c.divergence,
             "must be 'every', 'off' or a whole number of rounds N >= 1")
    _require(_is_int(c.eval_local_every) and c.eval_local_every >= 0, "eval_local_every", c.eval_local_every,
             "must be an integer >= 0 (0 disables local evaluation)")
    _require(_is_number(c.local_test_fraction) and 0 < c.local_test_fraction < 1, "local_test_fraction",
             c.local_test_fraction, "must be in (0, 1)")
    _require(_is_int(c.max_local_eval_examples) and c.max_local_eval_examples >= 1, "max_local_eval_examples",
             c.max_local_eval_examples, "must be >= 1")
    _require(c.precision in PRECISIONS, "precision", c.precision, f"use one of {', '.join(PRECISIONS)}")
    _validate_device(c.device)
    check_trackers(c.log_to)
    if c.data_dir is not None:
        _require(Path(c.data_dir).is_dir(), "data_dir", c.data_dir, "no such directory; point it at a data folder "
                 "such as ../shared/data/glue")
    if c.model is not None and (c.model.startswith((".", "/", "~")) or Path(c.model).exists()):
        _require(Path(c.model).expanduser().is_dir(), "model", c.model,
                 "no such model directory; give a hub id or a local model folder")
    # training knobs (fedlora.models.optim): lora_dropout, weight_decay, max_grad_norm, lr_schedule, warmup_steps
    for name in ("lora_dropout", "weight_decay", "max_grad_norm"):
        _require(_is_number(getattr(c, name)) and getattr(c, name) >= 0, name, getattr(c, name),
                 "must be a finite number >= 0 (0: off)")
    _require(c.lora_dropout < 1, "lora_dropout", c.lora_dropout, "is a probability: use a value in [0, 1)")
    _require(c.client_batch is None or (_is_int(c.client_batch) and c.client_batch >= 1), "client_batch",
             c.client_batch, "must be an integer >= 1 (1: one client at a time) or 'auto'")
    _require(c.client_batch in (1, None) or c.precision != "fp16", "client_batch", c.client_batch,
             "cannot be combined with --precision fp16 (one client's loss-scale overflow would skip every client's "
             "step); use --precision bf16, or --client-batch 1")
    _require(c.lr_schedule in LR_SCHEDULES, "lr_schedule", c.lr_schedule, f"use one of {', '.join(LR_SCHEDULES)}")
    _require(_is_int(c.warmup_steps) and c.warmup_steps >= 0, "warmup_steps", c.warmup_steps,
             "must be an integer >= 0 (0: no warm-up)")
    validate_privacy(c, _require)


def _validate_ranks(c: RunConfig) -> None:
    from fedlora.aggregation import get_method
    from fedlora.aggregation.ranks import RANK_MAPS

    if isinstance(c.client_ranks, list):
        object.__setattr__(c, "client_ranks", tuple(c.client_ranks))
    _require(isinstance(c.client_ranks, tuple) and all(_is_int(r) and 1 <= r <= c.rank for r in c.client_ranks)
             if _is_int(c.rank) else True, "client_ranks", c.client_ranks,
             f"each rank must be an integer in [1, --rank={c.rank}] (the server keeps the largest rank)")
    _require(c.rank_map in RANK_MAPS, "rank_map", c.rank_map, f"use one of {', '.join(RANK_MAPS)}")
    if not any(r != c.rank for r in c.client_ranks):
        return
    policy = get_method(c.method).policy
    _require(policy.mixed_ranks, "client_ranks", c.client_ranks,
             f"--method {c.method} does not support mixed client ranks; drop --client-ranks or use one of "
             + ", ".join(m for m in _method_names() if get_method(m).policy.mixed_ranks))
    _require(c.rank_map in policy.rank_maps,
             "rank_map", c.rank_map,
             f"--method {c.method} keeps a frozen or client-held factor that an SVD re-factorisation would replace; "
             "use --rank-map truncate")


def _validate_device(device: str) -> None:
    """Syntax only: whether the device exists is checked when the run starts (it needs torch's runtime)."""
    kind, _, index = device.partition(":")
    ok = device in ("auto", "cpu", "mps", "cuda") or (kind == "cuda" and index.isdigit())
    _require(ok, "device", device, "use auto, cpu, cuda, cuda:N or mps")
