"""Communication per round: the paper's closed forms, the library's ``round_bytes``, and real runs.

Three sources must agree, and :func:`check_measured` / :func:`formula_rows` assert that they do:
1. ``CLOSED_FORM``: per-client, per-module float counts written here from the methods' definitions
   (README table), independently of the library;
2. ``fedlora.aggregation.communication.round_bytes`` from each method's TrainingPolicy;
3. ``lora_bytes_up/down`` that a real run wrote to metrics.jsonl, at the adapter shapes read back
   from its checkpoint and the clients actually sampled that round. (The engine fills these from
   ``round_bytes`` too, so 3 checks that the engine charges the right shapes and client count.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from fedlora.aggregation import LoraPair, get_method
from fedlora.aggregation.communication import FLOAT32_BYTES, phase_bytes, round_bytes

# (floats up, floats down) per client and module in round t (1-based); A is (r, k), B is (d, r), U
# clients in the round. Only alternating methods (RoLoRA) depend on t.
CLOSED_FORM: dict[str, Callable[[int, int, int, int, int], tuple[int, int]]] = {
    "fedit": lambda r, d, k, U, t: (r * k + d * r, r * k + d * r),
    "svd": lambda r, d, k, U, t: (r * k + d * r, r * k + d * r),
    "flora-na": lambda r, d, k, U, t: (r * k + d * r, r * k + d * r),  # p, q never leave the server
    "flora-na-stable": lambda r, d, k, U, t: (r * k + d * r, r * k + d * r),  # likewise
    "fedrot-lora": lambda r, d, k, U, t: (r * k + d * r, r * k + d * r),  # rotations are the server's
    "svd-ef": lambda r, d, k, U, t: (r * k + d * r, r * k + d * r),  # the (d, k) residual stays on the server
    "ffa-lora": lambda r, d, k, U, t: (d * r, d * r),  # A frozen at a shared seed
    "fedsvd": lambda r, d, k, U, t: (d * r, r * k + d * r),  # B up; the server re-factorises, both come down
    "rolora": lambda r, d, k, U, t: (d * r if t % 2 else r * k, r * k + d * r),  # B up in odd rounds, A in even
    "fedsa-lora": lambda r, d, k, U, t: (r * k, r * k),  # B stays on the client
    "fedex-lora": lambda r, d, k, U, t: (r * k + d * r, r * k + d * r + d * k),  # + dense residual
    "flora": lambda r, d, k, U, t: (r * k + d * r, U * (r * k + d * r)),  # every client's stacked factors
    # sketches Y (d, s) and Z (k, s) up; Q (d, s) and the new adapter down; s = 4r capped at min(d, k) by default
    "fedask": lambda r, d, k, U, t, sketch=0: ((s := min(sketch or 4 * r, d, k)) * (d + k), s * d + r * k + d * r),
}
# (name, adapted modules, d, k): q and v projections of every layer.
PAPER_SHAPES = (("RoBERTa-large", 48, 1024, 1024), ("LLaMA-2-7B", 64, 4096, 4096))
PAPER_RANK, PAPER_CLIENTS = 16, 10


def shape_adapter(modules: list[tuple[str, int, int, int]]) -> dict[str, LoraPair]:
    """An adapter with the right shapes and no memory (meta tensors): round_bytes reads shapes only."""
    return {name: LoraPair(torch.empty(r, k, device="meta"), torch.empty(d, r, device="meta")) for name, r, d, k in modules}


def closed_form_bytes(method: str, modules: list[tuple[str, int, int, int]], clients: int, round_: int = 1,
                      options: dict[str, Any] | None = None) -> tuple[int, int]:
    """``options``: the method's (only FedASK's ``sketch`` changes its bytes)."""
    up = down = 0
    for _, r, d, k in modules:
        extra = {"sketch": int((options or {}).get("sketch", 0))} if method == "fedask" else {}
        u, dn = CLOSED_FORM[method](r, d, k, clients, round_, **extra)
        up, down = up + u, down + dn
    return up * clients * FLOAT32_BYTES, down * clients * FLOAT32_BYTES


def library_bytes(method: str, modules: list[tuple[str, int, int, int]], clients: int, round_: int = 1,
                  options: dict[str, Any] | None = None) -> tuple[int, int]:
    """``round_bytes`` for round ``round_`` (the round's policy: alternating methods upload one factor), plus a
    phased method's round trips (``phase_bytes``)."""
    spec = get_method(method)
    adapter = shape_adapter(modules)
    up, down = round_bytes(spec.policy.for_round(round_), adapter, clients)
    if spec.phased is not None:
        phase_up, phase_down = phase_bytes(spec.phased, adapter, clients, dict(options or {}))
        up, down = up + phase_up, down + phase_down
    return up, down


def formula_rows(methods: list[str]) -> list[dict[str, Any]]:
    """MB per round at the paper's model shapes, asserting closed form == round_bytes in an odd and an even round.

    The MB reported are the mean of the two rounds: an alternating method's average per round.
    """
    rows = []
    for model, count, d, k in PAPER_SHAPES:
        modules = [(f"m{i}", PAPER_RANK, d, k) for i in range(count)]
        for method in methods:
            both = []
            for round_ in (1, 2):
                lib = library_bytes(method, modules, PAPER_CLIENTS, round_)
                ref = closed_form_bytes(method, modules, PAPER_CLIENTS, round_)
                assert lib == ref, f"{method} at {model}, round {round_}: round_bytes {lib} != closed form {ref}"
                both.append(lib)
            up, down = (sum(b[0] for b in both) / 2, sum(b[1] for b in both) / 2)
            rows.append({"model": model, "method": method, "mb_up": up / 1e6, "mb_down": down / 1e6})
    return rows


def checkpoint_modules(run_dir: Path) -> list[tuple[str, int, int, int]]:
    """(module, r, d, k) of the adapter actually trained, read from the checkpoint's tensor headers."""
    from safetensors import safe_open

    from fedlora.protocol.checkpoint import CHECKPOINT_FILE

    modules = []
    with safe_open(str(run_dir / CHECKPOINT_FILE), framework="pt") as f:
        for key in sorted(f.keys()):
            if key.startswith("adapter/") and key.endswith("/A"):
                name = key[len("adapter/"):-2]
                r, k = f.get_slice(key).get_shape()
                d, _ = f.get_slice(f"adapter/{name}/B").get_shape()
                modules.append((name, r, d, k))
    return modules


def check_measured(run_dir: Path) -> list[dict[str, Any]]:
    """Each round of a real run: recorded LoRA bytes == round_bytes == closed form (raises if not)."""
    config = json.loads((run_dir / "config.json").read_text())
    method = config["method"]
    modules = checkpoint_modules(run_dir)
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        clients = len(record["clients"])
        measured = (record["lora_bytes_up"], record["lora_bytes_down"])
        lib = library_bytes(method, modules, clients, record["round"], config.get("method_options"))
        ref = closed_form_bytes(method, modules, clients, record["round"], config.get("method_options"))
        assert measured == lib == ref, f"{run_dir} round {record['round']}: measured {measured}, round_bytes {lib}, closed form {ref}"
        rows.append({"method": method, "round": record["round"], "clients": clients, "modules": len(modules),
                     "shape": f"r={modules[0][1]} d={modules[0][2]} k={modules[0][3]}",
                     "measured_up": measured[0], "measured_down": measured[1], "formula_up": ref[0], "formula_down": ref[1]})
    return rows


def formula_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"| model (r={PAPER_RANK}, U={PAPER_CLIENTS}) | method | MB up/round | MB down/round | down vs fedit |", "|---|---|---|---|---|"]
    fedit = {r["model"]: r["mb_down"] for r in rows if r["method"] == "fedit"}
    for r in rows:
        ratio = f"{r['mb_down'] / fedit[r['model']]:.2f}×" if r["model"] in fedit else "–"
        lines.append(f"| {r['model']} | {r['method']} | {r['mb_up']:.2f} | {r['mb_down']:.2f} | {ratio} |")
    return "\n".join(lines)


def measured_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | round | clients | modules | shape | measured up (B) | formula up (B) | measured down (B) | formula down (B) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['round']} | {r['clients']} | {r['modules']} | {r['shape']} | {r['measured_up']} | "
                     f"{r['formula_up']} | {r['measured_down']} | {r['formula_down']} |")
    return "\n".join(lines)
